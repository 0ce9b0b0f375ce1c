//! A real Kubernetes control plane for the tests: etcd, kube-apiserver and
//! kube-controller-manager (built once by `scripts/kube-binaries` into `.peers/kube/bin`), with
//! generated certificates, an admin token, and the Reflow CRD installed.
//!
//! Nothing here runs containers, so one part is a stand-in, and only one: [`NodeAgent`] plays
//! the kubelet. It registers a node, binds pending pods to it, runs the MCP server a pod's image
//! stands for as a local process on the pod's own loopback address (127.0.0.x), probes it as the
//! readiness probe says, writes the pod's status, and finishes deleted pods. Everything else
//! (validation, admission with the `restricted` Pod Security level, watches, server-side apply,
//! owner-reference garbage collection, leases) is the real API server and controller manager.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt as _;
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::process::Command;

use crate::harness::{free_port, workspace, Process};

/// The admin's bearer token (group `system:masters`).
const ADMIN_TOKEN: &str = "reflow-test-admin-token";
/// The node the agent plays.
pub const NODE: &str = "reflow-test-node";
/// The image the agent runs as `e2e/peers/pod_server.py`.
pub const ENV_SERVER_IMAGE: &str = "reflow-test/env-server:1";

pub fn kube_bin(name: &str) -> PathBuf {
    workspace().join(".peers/kube/bin").join(name)
}

/// Builds the binaries once (`scripts/kube-binaries`; a no-op when they are there).
pub fn ensure_binaries() {
    let status = std::process::Command::new(workspace().join("scripts/kube-binaries"))
        .status()
        .expect("run scripts/kube-binaries");
    assert!(status.success(), "scripts/kube-binaries failed");
}

#[derive(Debug)]
pub struct Cluster {
    pub server: String,
    pub kubeconfig: PathBuf,
    pub ca_pem: String,
    etcd: Process,
    apiserver: Option<Process>,
    apiserver_command: std::process::Command,
    _controller_manager: Option<Process>,
    dir: tempfile::TempDir,
}

impl Cluster {
    pub async fn start() -> anyhow::Result<Cluster> {
        ensure_binaries();
        let dir = tempfile::tempdir()?;
        let path = dir.path().to_path_buf();
        let path = path.as_path();

        // PKI: a CA, the API server's serving certificate, the service-account signing key.
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "reflow test cluster CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let ca_pem = ca.pem();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let serving_key = rcgen::KeyPair::generate()?;
        let serving = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?
            .signed_by(&serving_key, &issuer)?;
        let sa_key = rcgen::KeyPair::generate()?;
        std::fs::write(path.join("ca.crt"), &ca_pem)?;
        std::fs::write(path.join("serving.crt"), serving.pem())?;
        std::fs::write(path.join("serving.key"), serving_key.serialize_pem())?;
        std::fs::write(path.join("sa.key"), sa_key.serialize_pem())?;
        std::fs::write(path.join("sa.pub"), sa_key.public_key_pem())?;
        std::fs::write(path.join("tokens.csv"), format!("{ADMIN_TOKEN},reflow-admin,1,system:masters\n"))?;

        let etcd_port = free_port();
        let etcd_peer = free_port();
        let mut etcd = Process::spawn(
            "etcd",
            Command::new(kube_bin("etcd"))
                .arg(format!("--data-dir={}", path.join("etcd").display()))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"))
                .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"))
                .arg(format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"))
                .arg("--unsafe-no-fsync")
                .arg("--log-level=error"),
        )?;
        etcd.wait_for_port(etcd_port, Duration::from_secs(30)).await?;

        let port = free_port();
        let mut apiserver_command = std::process::Command::new(kube_bin("kube-apiserver"));
        apiserver_command
            .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--tls-cert-file={}", path.join("serving.crt").display()))
            .arg(format!("--tls-private-key-file={}", path.join("serving.key").display()))
            .arg(format!("--client-ca-file={}", path.join("ca.crt").display()))
            .arg(format!("--token-auth-file={}", path.join("tokens.csv").display()))
            .arg(format!("--service-account-key-file={}", path.join("sa.pub").display()))
            .arg(format!("--service-account-signing-key-file={}", path.join("sa.key").display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--authorization-mode=Node,RBAC")
            .arg("--advertise-address=127.0.0.1")
            // The kubernetes Service cannot point at a loopback address; no endpoint is kept.
            .arg("--endpoint-reconciler-type=none")
            .arg("--v=0");
        let apiserver =
            Process::spawn("kube-apiserver", &mut tokio::process::Command::from(clone(&apiserver_command)))?;
        let server = format!("https://127.0.0.1:{port}");
        let kubeconfig = path.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&server, &ca_pem))?;
        let mut cluster = Cluster {
            server,
            kubeconfig,
            ca_pem,
            etcd,
            apiserver: Some(apiserver),
            apiserver_command,
            _controller_manager: None,
            dir,
        };
        cluster.wait_ready(Duration::from_secs(90)).await?;

        cluster._controller_manager = Some(Process::spawn(
            "kube-controller-manager",
            Command::new(kube_bin("kube-controller-manager"))
                .arg(format!("--kubeconfig={}", cluster.kubeconfig.display()))
                .arg(format!("--authentication-kubeconfig={}", cluster.kubeconfig.display()))
                .arg(format!("--authorization-kubeconfig={}", cluster.kubeconfig.display()))
                .arg(format!("--service-account-private-key-file={}", path.join("sa.key").display()))
                .arg(format!("--root-ca-file={}", path.join("ca.crt").display()))
                // Deployments and ReplicaSets: the install test has the chart's pods made and admitted.
                .arg("--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token,deployment,replicaset")
                .arg("--leader-elect=false")
                .arg("--bind-address=127.0.0.1")
                .arg(format!("--secure-port={}", free_port()))
                .arg("--use-service-account-credentials=false")
                .arg("--v=0"),
        )?);
        let client = cluster.client().await?;
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let crd: CustomResourceDefinition = serde_yaml_ng::from_str(&reflow_operator::crd::crd_yaml())?;
        crds.create(&PostParams::default(), &crd).await.context("install the MCPInstance CRD")?;
        kube::runtime::wait::await_condition(
            crds,
            "mcpinstances.mcp.reflow.io",
            kube::runtime::wait::conditions::is_crd_established(),
        )
        .await?;
        Ok(cluster)
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        reflow_operator::client(Some(&self.kubeconfig)).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?;
        let http = reqwest::Client::builder().add_root_certificate(ca).build()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(process) = self.apiserver.as_mut() {
                if let Some(status) = process.child.try_wait()? {
                    anyhow::bail!("kube-apiserver exited: {status}");
                }
            }
            let ready = http.get(format!("{}/readyz", self.server)).bearer_auth(ADMIN_TOKEN).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "kube-apiserver not ready within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the API server (etcd keeps the state): every client sees it unreachable.
    pub fn stop_apiserver(&mut self) {
        self.apiserver = None;
    }

    /// Starts the API server again on the same address and state.
    pub async fn restart_apiserver(&mut self) -> anyhow::Result<()> {
        let process =
            Process::spawn("kube-apiserver", &mut tokio::process::Command::from(clone(&self.apiserver_command)))?;
        self.apiserver = Some(process);
        self.wait_ready(Duration::from_secs(90)).await
    }

    /// A namespace whose pods must meet the `restricted` Pod Security Standard (enforced by the
    /// API server's admission).
    pub async fn restricted_namespace(&self, name: &str) -> anyhow::Result<()> {
        let namespaces: Api<Namespace> = Api::all(self.client().await?);
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            }},
        }))?;
        namespaces.create(&PostParams::default(), &namespace).await?;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn etcd_pid(&self) -> Option<u32> {
        self.etcd.pid()
    }
}

fn clone(command: &std::process::Command) -> std::process::Command {
    let mut copy = std::process::Command::new(command.get_program());
    copy.args(command.get_args());
    copy
}

fn kubeconfig_yaml(server: &str, ca_pem: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n\
         current-context: test\n"
    )
}

/// The kubelet stand-in (see the module docs).
#[derive(Debug)]
pub struct NodeAgent {
    pub running: Arc<Mutex<HashMap<String, RunningPod>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
pub struct RunningPod {
    pub ip: String,
    pub port: i32,
    pub process: Process,
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl NodeAgent {
    pub async fn start(client: Client) -> anyhow::Result<NodeAgent> {
        // The servers images stand for run on the MCP peers' Python.
        crate::harness::ensure_peers();
        let nodes: Api<Node> = Api::all(client.clone());
        let node: Node =
            serde_json::from_value(json!({"metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}}}))?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        let running: Arc<Mutex<HashMap<String, RunningPod>>> = Arc::default();
        let task = tokio::spawn(agent(client, running.clone()));
        Ok(NodeAgent { running, task })
    }

    /// The pods running now: name → address.
    pub fn pods(&self) -> BTreeMap<String, String> {
        self.running
            .lock()
            .unwrap()
            .iter()
            .map(|(name, pod)| (name.clone(), format!("{}:{}", pod.ip, pod.port)))
            .collect()
    }
}

async fn agent(client: Client, running: Arc<Mutex<HashMap<String, RunningPod>>>) {
    let pods: Api<Pod> = Api::all(client.clone());
    let mut events = watcher(pods, watcher::Config::default()).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let Ok(event) = event else { continue };
        let changed: Vec<Pod> = match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => vec![pod],
            watcher::Event::Delete(pod) => {
                stop(&running, &key(&pod));
                vec![]
            }
            _ => vec![],
        };
        for pod in changed {
            if let Err(error) = handle(&client, &running, pod).await {
                tracing::warn!(%error, "node agent");
            }
        }
    }
}

/// A loopback address of its own for a pod (tests in other processes run agents of their own,
/// so addresses are drawn at random from 127.0.0.0/8, and one whose `port` is taken is skipped).
fn pod_address(port: i32) -> anyhow::Result<String> {
    use rand::Rng as _;
    let port = u16::try_from(port).context("a pod port")?;
    for _ in 0..100 {
        let mut rng = rand::thread_rng();
        let ip = std::net::Ipv4Addr::new(127, rng.gen_range(1..=254), rng.gen(), rng.gen_range(1..=254));
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return Ok(ip.to_string());
        }
    }
    anyhow::bail!("no free loopback address for port {port}")
}

fn key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

fn stop(running: &Mutex<HashMap<String, RunningPod>>, key: &str) {
    running.lock().unwrap().remove(key);
}

async fn handle(client: &Client, running: &Arc<Mutex<HashMap<String, RunningPod>>>, pod: Pod) -> anyhow::Result<()> {
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let spec = pod.spec.clone().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        // The kubelet's part of a deletion: stop the containers, then remove the pod for good.
        stop(running, &key(&pod));
        let _ = pods.delete(&name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
        return Ok(());
    }
    match spec.node_name.as_deref() {
        None => {
            // The scheduler's part: bind to the one node.
            let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                                 "target": {"apiVersion": "v1", "kind": "Node", "name": NODE}});
            let _ = pods
                .create_subresource::<_, serde_json::Value>("binding", &name, &PostParams::default(), &binding)
                .await;
            return Ok(());
        }
        Some(NODE) => {}
        Some(_) => return Ok(()),
    }
    if running.lock().unwrap().contains_key(&key(&pod)) {
        return Ok(());
    }
    let container = spec.containers.first().context("a pod without containers")?.clone();
    let image = container.image.clone().unwrap_or_default();
    let port = container.ports.iter().flatten().next().map(|p| p.container_port).unwrap_or(8080);
    let ip = pod_address(port)?;

    // The environment a kubelet would give the container: its env, then its secrets.
    let mut env: Vec<(String, String)> = Vec::new();
    for from in container.env_from.iter().flatten() {
        if let Some(secret) = &from.secret_ref {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            let secret = secrets.get(&secret.name).await.context("the pod's env secret")?;
            for (k, v) in secret.data.unwrap_or_default() {
                env.push((k, String::from_utf8_lossy(&v.0).into_owned()));
            }
        }
    }
    for var in container.env.iter().flatten() {
        env.push((var.name.clone(), var.value.clone().unwrap_or_default()));
    }
    env.push(("POD_IP".into(), ip.clone()));
    env.push(("POD_NAME".into(), name.clone()));
    let mut command = match image.as_str() {
        ENV_SERVER_IMAGE => {
            let mut command = Command::new(crate::harness::python());
            command.arg(workspace().join("e2e/peers/pod_server.py"));
            command
        }
        other => anyhow::bail!("the node agent has no stand-in for image {other:?}"),
    };
    command.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).envs(env);
    let process = Process::spawn(&format!("pod {name}"), &mut command)?;
    running.lock().unwrap().insert(key(&pod), RunningPod { ip: ip.clone(), port, process });
    let started = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = |ready: bool| {
        json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "127.0.0.1",
            "startTime": started,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": if ready { "True" } else { "False" }},
                {"type": "Ready", "status": if ready { "True" } else { "False" }},
            ],
            "containerStatuses": [{"name": container.name, "image": image, "imageID": "", "ready": ready,
                                   "restartCount": 0, "started": true,
                                   "state": {"running": {"startedAt": started}}}],
        }})
    };
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status(false))).await?;
    // The readiness probe as the pod says (an HTTP GET answering 2xx/3xx, else the port
    // accepting connections), off the watch loop.
    let probe_path = container.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|g| g.path.clone());
    let ready = status(true);
    tokio::spawn(async move {
        let address = format!("{ip}:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let http = reqwest::Client::new();
        let passes = || async {
            match &probe_path {
                Some(path) => http
                    .get(format!("http://{address}{path}"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success() || r.status().is_redirection()),
                None => tokio::net::TcpStream::connect(&address).await.is_ok(),
            }
        };
        while !passes().await {
            if Instant::now() > deadline {
                tracing::warn!(pod = %name, "never listened on {address}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(ready)).await;
    });
    Ok(())
}
