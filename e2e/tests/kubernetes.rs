//! The operator against a real kube-apiserver (with etcd and the controller manager's garbage
//! collector), pods played by the test node agent (the one stand-in: see `reflow_e2e::cluster`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use reflow_data_plane::mcp::McpSettings;
use reflow_e2e::cluster::{Cluster, NodeAgent, ENV_SERVER_IMAGE};
use reflow_e2e::harness::{Gateway, SessionClient};
use reflow_operator::crd::MCPInstance;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const NAMESPACE: &str = "mcp";

fn operator(
    cluster: &Cluster,
    identity: &str,
    lease_seconds: u64,
) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let config = reflow_operator::OperatorConfig {
        kubeconfig: Some(cluster.kubeconfig.clone()),
        namespace: Some(NAMESPACE.into()),
        lease_namespace: NAMESPACE.into(),
        identity: identity.into(),
        lease_seconds,
        listen: "127.0.0.1:0".parse().unwrap(),
        verify_by_pod_ip: true,
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(reflow_operator::run(config, shutdown.clone()));
    (shutdown, task)
}

async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn instance(name: &str, secret: Option<&str>, idle: &str, lifetime: &str) -> MCPInstance {
    serde_json::from_value(json!({
        "apiVersion": "mcp.reflow.io/v1alpha1",
        "kind": "MCPInstance",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "image": ENV_SERVER_IMAGE,
            "port": 8080,
            "subjectKey": "user:alice",
            "targetName": "env",
            "targetID": "00000000-0000-0000-0000-000000000001",
            "secretRef": secret,
            "env": [{"name": "REGION", "value": "eu"}],
            "idleTTL": idle,
            "maxLifetime": lifetime,
        },
    }))
    .unwrap()
}

async fn condition(api: &Api<MCPInstance>, name: &str, kind: &str) -> bool {
    api.get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|i| i.status)
        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == kind && c.status == "True"))
}

/// The environment of the process the agent runs for `pod`.
fn pod_env(agent: &NodeAgent, pod: &str) -> BTreeMap<String, String> {
    let running = agent.running.lock().unwrap();
    let pid = running.get(&format!("{NAMESPACE}/{pod}")).and_then(|p| p.process.pid()).expect("the pod runs");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

async fn setup() -> (Cluster, Client, NodeAgent) {
    // RUST_LOG=reflow_operator=debug (for example) shows what the operator and data plane did.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    let cluster = Cluster::start().await.expect("a test cluster");
    cluster.restricted_namespace(NAMESPACE).await.unwrap();
    let client = cluster.client().await.unwrap();
    let agent = NodeAgent::start(client.clone()).await.unwrap();
    (cluster, client, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_runs_verifies_restarts_and_cleans_up_an_instance() {
    let (cluster, client, agent) = setup().await;
    let (stop, task) = operator(&cluster, "operator-a", 15);
    let instances: Api<MCPInstance> = Api::namespaced(client.clone(), NAMESPACE);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "alice-env"}, "stringData": {"API_KEY": "alpha-secret"},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    instances.create(&PostParams::default(), &instance("alice", Some("alice-env"), "30m", "24h")).await.unwrap();

    eventually(Duration::from_secs(60), "the instance is verified", || condition(&instances, "alice", "Verified"))
        .await;
    let status = instances.get("alice").await.unwrap().status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Ready"));
    let info = status.server_info.clone().unwrap();
    assert_eq!(info.name, "reflow-pod-server");
    assert!(!info.protocol_version.is_empty());
    assert_eq!(status.service_url.as_deref(), Some("http://alice.mcp.svc:8080/mcp"));
    for kind in ["Accepted", "Available", "Verified"] {
        assert!(
            status.conditions.iter().any(|c| c.type_ == kind && c.status == "True"),
            "{kind}: {:?}",
            status.conditions
        );
    }

    // What the operator wrote: admitted under the `restricted` Pod Security level, owned.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let pod_name = status.pod_name.clone().unwrap();
    let pod = pods.get(&pod_name).await.unwrap();
    let spec = pod.spec.clone().unwrap();
    let container = &spec.containers[0];
    let security = container.security_context.clone().unwrap();
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
    assert_eq!(spec.security_context.unwrap().seccomp_profile.unwrap().type_, "RuntimeDefault");
    assert_eq!(spec.automount_service_account_token, Some(false));
    let uid = instances.get("alice").await.unwrap().metadata.uid.unwrap();
    let owned = |refs: Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
        refs.unwrap_or_default().iter().any(|o| o.uid == uid && o.controller == Some(true))
    };
    assert!(owned(pod.metadata.owner_references.clone()));
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    assert!(owned(services.get("alice").await.unwrap().metadata.owner_references));
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), NAMESPACE);
    let policy = policies.get("alice").await.unwrap();
    assert!(owned(policy.metadata.owner_references.clone()));
    let ingress = serde_json::to_value(policy.spec.unwrap().ingress).unwrap();
    assert_eq!(ingress[0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "data-plane");
    assert!(owned(secrets.get("alice-env").await.unwrap().metadata.owner_references));

    // The server's environment: the secret's values and the spec's env, nothing of ours.
    let env = pod_env(&agent, &pod_name);
    assert_eq!(env.get("API_KEY").map(String::as_str), Some("alpha-secret"));
    assert_eq!(env.get("REGION").map(String::as_str), Some("eu"));
    assert_eq!(env.get("MCP_PORT").map(String::as_str), Some("8080"));
    let instance_yaml = serde_json::to_string(&instances.get("alice").await.unwrap()).unwrap();
    assert!(!instance_yaml.contains("alpha-secret"), "no credential in the custom resource");

    // A changed secret restarts the server with the new value: a new pod, the old one gone.
    let patch = json!({"stringData": {"API_KEY": "beta-secret"}});
    secrets.patch("alice-env", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually(Duration::from_secs(60), "a new pod with the new secret", || async {
        let status = instances.get("alice").await.ok().and_then(|i| i.status);
        status.is_some_and(|s| s.pod_name.as_deref() != Some(pod_name.as_str()) && s.server_info.is_some())
    })
    .await;
    let new_pod = instances.get("alice").await.unwrap().status.unwrap().pod_name.unwrap();
    assert_eq!(pod_env(&agent, &new_pod).get("API_KEY").map(String::as_str), Some("beta-secret"));
    eventually(Duration::from_secs(30), "the old pod is gone", || async {
        pods.get_opt(&pod_name).await.unwrap().is_none()
    })
    .await;
    let listed = pods.list(&ListParams::default().labels("mcp.reflow.io/instance=alice")).await.unwrap();
    assert_eq!(listed.items.len(), 1, "one pod per instance");

    // Deleting the instance removes everything it owned.
    instances.delete("alice", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(60), "the instance and its objects are gone", || async {
        instances.get_opt("alice").await.unwrap().is_none()
            && pods.list(&ListParams::default().labels("mcp.reflow.io/instance=alice")).await.unwrap().items.is_empty()
            && services.get_opt("alice").await.unwrap().is_none()
            && policies.get_opt("alice").await.unwrap().is_none()
            && secrets.get_opt("alice-env").await.unwrap().is_none()
    })
    .await;
    assert!(agent.pods().is_empty(), "no server process left: {:?}", agent.pods());

    // A spec the operator cannot run is refused in its status, and nothing is started.
    instances.create(&PostParams::default(), &instance("bad", None, "soon", "24h")).await.unwrap();
    eventually(Duration::from_secs(30), "the bad instance is refused", || async {
        let status = instances.get("bad").await.ok().and_then(|i| i.status);
        status.is_some_and(|s| {
            s.conditions.iter().any(|c| c.type_ == "Accepted" && c.status == "False" && c.reason == "InvalidSpec")
        })
    })
    .await;
    assert!(pods.list(&ListParams::default().labels("mcp.reflow.io/instance=bad")).await.unwrap().items.is_empty());
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_ttl_and_max_lifetime_end_instances() {
    let (cluster, client, agent) = setup().await;
    let (stop, task) = operator(&cluster, "operator-ttl", 15);
    let instances: Api<MCPInstance> = Api::namespaced(client.clone(), NAMESPACE);
    instances.create(&PostParams::default(), &instance("idle", None, "4s", "24h")).await.unwrap();
    instances.create(&PostParams::default(), &instance("used", None, "4s", "10s")).await.unwrap();
    eventually(Duration::from_secs(60), "both verified", || async {
        condition(&instances, "idle", "Verified").await && condition(&instances, "used", "Verified").await
    })
    .await;
    // `used` is reported used every second (as data planes do, under their own field manager):
    // only its lifetime ends it; `idle` ends after its TTL.
    let started = Instant::now();
    let mut idle_gone = None;
    let mut used_gone = None;
    while started.elapsed() < Duration::from_secs(40) && (idle_gone.is_none() || used_gone.is_none()) {
        if used_gone.is_none() {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let patch =
                json!({"apiVersion": "mcp.reflow.io/v1alpha1", "kind": "MCPInstance", "status": {"lastUsedAt": now}});
            let _ = instances
                .patch_status("used", &PatchParams::apply("reflow-data-plane").force(), &Patch::Apply(&patch))
                .await;
        }
        if idle_gone.is_none() && instances.get_opt("idle").await.unwrap().is_none() {
            idle_gone = Some(started.elapsed());
        }
        if used_gone.is_none() && instances.get_opt("used").await.unwrap().is_none() {
            used_gone = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (idle_gone, used_gone) = (idle_gone.expect("the idle instance ended"), used_gone.expect("the used one ended"));
    assert!(used_gone > idle_gone, "in use, only the lifetime ends it: idle {idle_gone:?}, used {used_gone:?}");
    eventually(Duration::from_secs(30), "their pods are gone", || async { agent.pods().is_empty() }).await;
    let metrics_text = {
        // The events say why.
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), NAMESPACE);
        let list = events.list(&ListParams::default()).await.unwrap();
        list.items.iter().filter_map(|e| e.reason.clone()).collect::<Vec<_>>()
    };
    assert!(
        metrics_text.iter().any(|r| r == "Idle") && metrics_text.iter().any(|r| r == "Expired"),
        "{metrics_text:?}"
    );
    // A later instance of the same key comes up again.
    instances.create(&PostParams::default(), &instance("idle", None, "30m", "24h")).await.unwrap();
    eventually(Duration::from_secs(60), "a new instance comes up", || condition(&instances, "idle", "Verified")).await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_reconciles_and_a_killed_operator_converges_without_duplicates() {
    let (cluster, client, _agent) = setup().await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let instances: Api<MCPInstance> = Api::namespaced(client.clone(), NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);

    // Killed at different points of its first reconciles, then restarted: one pod, one service.
    for (i, delay) in [0u64, 30, 80, 150, 300].into_iter().enumerate() {
        let name = format!("crash-{i}");
        let (_stop, task) = operator(&cluster, "operator-crash", 3);
        instances.create(&PostParams::default(), &instance(&name, None, "30m", "24h")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(delay)).await;
        task.abort();
        let _ = task.await;
        // The killed replica's lease runs out; a new one leads.
        let (stop, task) = operator(&cluster, &format!("operator-restarted-{i}"), 3);
        eventually(Duration::from_secs(60), "converged after the kill", || condition(&instances, &name, "Verified"))
            .await;
        let listed = pods.list(&ListParams::default().labels(&format!("mcp.reflow.io/instance={name}"))).await.unwrap();
        assert_eq!(listed.items.len(), 1, "one pod for {name}");
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    // Two replicas: one holds the lease; when it dies, the other takes over.
    let (_stop_a, task_a) = operator(&cluster, "replica-a", 3);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (stop_b, task_b) = operator(&cluster, "replica-b", 3);
    let holder = || async {
        leases.get_opt(reflow_operator::LEASE).await.ok().flatten().and_then(|l| l.spec).and_then(|s| s.holder_identity)
    };
    eventually(Duration::from_secs(30), "replica-a leads", || async { holder().await.as_deref() == Some("replica-a") })
        .await;
    task_a.abort();
    let _ = task_a.await;
    eventually(Duration::from_secs(30), "replica-b takes over", || async {
        holder().await.as_deref() == Some("replica-b")
    })
    .await;
    instances.create(&PostParams::default(), &instance("after-failover", None, "30m", "24h")).await.unwrap();
    eventually(Duration::from_secs(60), "the new leader reconciles", || {
        condition(&instances, "after-failover", "Verified")
    })
    .await;
    stop_b.cancel();
    task_b.await.unwrap().unwrap();
}

/// Kubernetes settings of a data plane on `cluster`: pods reached at their pod IP (the test
/// machine has no Service network), use reported every second.
fn kubernetes_config(cluster: &Cluster, start_timeout: Duration) -> reflow_common::config::KubernetesConfig {
    reflow_common::config::KubernetesConfig {
        enabled: true,
        namespace: NAMESPACE.into(),
        kubeconfig: Some(cluster.kubeconfig.to_string_lossy().into_owned()),
        address: reflow_common::config::KubernetesAddress::Pod,
        start_timeout,
        last_used_interval: Duration::from_secs(1),
        ..Default::default()
    }
}

async fn kubernetes_target(gateway: &Gateway, name: &str, isolation: &str) -> String {
    let target = gateway
        .post(
            "/api/targets",
            json!({"name": name, "transport_type": "kubernetes", "image": ENV_SERVER_IMAGE, "port": 8080,
                   "health_path": "/health", "isolation_boundary": isolation,
                   "env_keys": [{"name": "API_KEY"}]}),
        )
        .await
        .unwrap();
    target["id"].as_str().unwrap().to_string()
}

fn env_answer(answer: &Value) -> Value {
    let text = answer["text"].as_str().unwrap_or_else(|| panic!("the env tool answered {answer}"));
    serde_json::from_str(text).unwrap()
}

/// Calls `tool` until the env it reports has `API_KEY` = `expected` (a credential written just
/// before reaches the data plane with the next snapshot, and the pod with the restart that
/// follows), or panics after a minute.
async fn api_key_eventually(client: &mut SessionClient, tool: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = client.call(tool, json!({"names": ["API_KEY"]})).await;
        if answer["text"].is_string() && env_answer(&answer)["API_KEY"] == expected {
            return;
        }
        assert!(Instant::now() < deadline, "{tool} never reported API_KEY={expected}: {answer}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_client_reaches_per_user_and_shared_pods_through_the_gateway() {
    let (cluster, client, agent) = setup().await;
    let (stop, task) = operator(&cluster, "operator-transport", 15);
    let instances = reflow_data_plane::upstream::kubernetes::Instances::connect(&kubernetes_config(
        &cluster,
        Duration::from_secs(60),
    ))
    .await
    .unwrap();
    let gateway = Gateway::start_with(McpSettings::default().with_kubernetes(instances)).await.unwrap();
    let own = kubernetes_target(&gateway, "own", "per_user").await;
    let shared = kubernetes_target(&gateway, "team", "shared").await;
    gateway.allow_everyone().await.unwrap();
    let (alice, alice_token) = gateway.user("alice@example.com").await.unwrap();
    let (bob, bob_token) = gateway.user("bob@example.com").await.unwrap();
    for (user, value) in [(&alice, "alice-key-1111"), (&bob, "bob-key-2222")] {
        gateway
            .post(&format!("/api/targets/{own}/env/user/{user}"), json!({"key": "API_KEY", "value": value}))
            .await
            .unwrap();
    }
    gateway
        .post(&format!("/api/targets/{shared}/env/default"), json!({"key": "API_KEY", "value": "team-key-3333"}))
        .await
        .unwrap();
    gateway
        .post(&format!("/api/targets/{shared}/env/user/{alice}"), json!({"key": "API_KEY", "value": "alice-only"}))
        .await
        .unwrap();

    let url = format!("{}/mcp", gateway.mcp);
    let mut alices = SessionClient::connect(&url, &alice_token).await;
    let mut bobs = SessionClient::connect(&url, &bob_token).await;
    let names = json!({"names": ["API_KEY", "REFLOW_PARENT_CANARY"]});
    api_key_eventually(&mut alices, "own_env", "alice-key-1111").await;
    api_key_eventually(&mut bobs, "own_env", "bob-key-2222").await;
    api_key_eventually(&mut alices, "team_env", "team-key-3333").await;
    let alice_own = env_answer(&alices.call("own_env", names.clone()).await);
    let bob_own = env_answer(&bobs.call("own_env", names.clone()).await);
    assert_eq!(alice_own["API_KEY"], "alice-key-1111");
    assert_eq!(bob_own["API_KEY"], "bob-key-2222", "per_user: each user's pod has that user's value only");
    let alice_shared = env_answer(&alices.call("team_env", names.clone()).await);
    let bob_shared = env_answer(&bobs.call("team_env", names.clone()).await);
    assert_eq!(alice_shared["API_KEY"], "team-key-3333", "a shared pod gets default values only");
    assert_eq!(bob_shared["API_KEY"], "team-key-3333");

    // Two pods for the per_user target, one for the shared one, each a distinct process.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let by_target = |target: String| {
        let pods = pods.clone();
        async move {
            pods.list(&ListParams::default().labels(&format!("mcp.reflow.io/target-id={target}")))
                .await
                .unwrap()
                .items
                .len()
        }
    };
    assert_eq!(by_target(own.clone()).await, 2);
    assert_eq!(by_target(shared.clone()).await, 1);
    // The control plane lists them with the operator's phase and conditions and the pod's.
    let listed = gateway.get(&format!("/api/targets/{own}/instances")).await.unwrap();
    let listed = listed.as_array().unwrap_or_else(|| panic!("instances: {listed}"));
    assert_eq!(listed.len(), 2, "{listed:?}");
    let mut keys: Vec<&str> = listed.iter().map(|i| i["subject_key"].as_str().unwrap()).collect();
    keys.sort();
    let mut expected = [format!("user:{alice}"), format!("user:{bob}")];
    expected.sort();
    assert_eq!(keys, expected);
    for instance in listed {
        assert_eq!(instance["phase"], "Ready", "{instance}");
        assert_eq!(instance["current"], true, "{instance}");
        let verified = instance["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Verified");
        assert_eq!(verified.map(|c| &c["status"]), Some(&json!("True")), "{instance}");
        assert_eq!(instance["pod"]["phase"], "Running", "{instance}");
        assert!(instance["pod"]["pod_ip"].is_string(), "{instance}");
        assert_eq!(instance["server_info"]["name"], "reflow-pod-server", "{instance}");
    }
    let alice_pid = serde_json::from_str::<Value>(alices.call("own_whoami", json!({})).await["text"].as_str().unwrap())
        .unwrap()["pid"]
        .clone();
    let bob_pid = serde_json::from_str::<Value>(bobs.call("own_whoami", json!({})).await["text"].as_str().unwrap())
        .unwrap()["pid"]
        .clone();
    assert_ne!(alice_pid, bob_pid);

    // The client's token is nowhere in the cluster: not in an instance, a secret or a pod.
    let everything = {
        let instances: Api<MCPInstance> = Api::namespaced(client.clone(), NAMESPACE);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
        let mut text = serde_json::to_string(&instances.list(&ListParams::default()).await.unwrap().items).unwrap();
        text += &serde_json::to_string(&pods.list(&ListParams::default()).await.unwrap().items).unwrap();
        for secret in secrets.list(&ListParams::default()).await.unwrap() {
            for value in secret.data.unwrap_or_default().values() {
                text += &String::from_utf8_lossy(&value.0);
            }
        }
        text
    };
    for token in [&alice_token, &bob_token, &gateway.admin_token] {
        assert!(!everything.contains(token.as_str()), "a client token reached the cluster");
    }
    assert!(everything.contains("alice-key-1111"), "the check above reads the secrets' values");
    for pod in agent.pods().keys() {
        let env = pod_env(&agent, pod.trim_start_matches(&format!("{NAMESPACE}/")));
        assert!(env.values().all(|v| ![&alice_token, &bob_token].contains(&v)), "a token in a pod's env");
    }

    // Use is reported in batches: lastUsedAt appears without a write per request.
    let instances: Api<MCPInstance> = Api::namespaced(client.clone(), NAMESPACE);
    eventually(Duration::from_secs(10), "last use reported", || async {
        instances
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .all(|i| i.status.as_ref().is_some_and(|s| s.last_used_at.is_some()))
    })
    .await;

    // A credential change reaches the pod: the instance restarts with the new value.
    gateway
        .post(&format!("/api/targets/{own}/env/user/{alice}"), json!({"key": "API_KEY", "value": "alice-key-rotated"}))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = env_answer(&alices.call("own_env", names.clone()).await);
        if now["API_KEY"] == "alice-key-rotated" {
            break;
        }
        assert!(Instant::now() < deadline, "the rotated value never reached alice's pod: {now}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(env_answer(&bobs.call("own_env", names.clone()).await)["API_KEY"], "bob-key-2222");

    // restart-instances ends the target's pods; the next call brings a new one up.
    let before = alice_pid;
    let restarted = gateway.post(&format!("/api/targets/{own}/restart-instances"), json!({})).await.unwrap();
    assert_eq!(restarted["restarted"], 2, "both users' instances were ended: {restarted}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = alices.call("own_whoami", json!({})).await;
        if let Some(text) = answer["text"].as_str() {
            if serde_json::from_str::<Value>(text).unwrap()["pid"] != before {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no new pod after restart-instances: {answer}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_server_down_kubernetes_calls_fail_clearly_and_the_rest_is_untouched() {
    let (mut cluster, client, _agent) = setup().await;
    let (stop, task) = operator(&cluster, "operator-outage", 15);
    let instances = reflow_data_plane::upstream::kubernetes::Instances::connect(&kubernetes_config(
        &cluster,
        Duration::from_secs(5),
    ))
    .await
    .unwrap();
    let gateway = Gateway::start_with(McpSettings::default().with_kubernetes(instances)).await.unwrap();
    let own = kubernetes_target(&gateway, "own", "per_user").await;
    let http = reflow_e2e::harness::python_server("example_server.py", &[]).await.unwrap();
    gateway
        .post("/api/targets", json!({"name": "plain", "transport_type": "streamable-http", "url": http.url}))
        .await
        .unwrap();
    gateway.allow_everyone().await.unwrap();
    let (alice, alice_token) = gateway.user("alice@example.com").await.unwrap();
    let (bob, bob_token) = gateway.user("bob@example.com").await.unwrap();
    for user in [&alice, &bob] {
        gateway
            .post(
                &format!("/api/targets/{own}/env/user/{user}"),
                json!({"key": "API_KEY", "value": format!("key-{user}")}),
            )
            .await
            .unwrap();
    }
    let url = format!("{}/mcp", gateway.mcp);
    let mut alices = SessionClient::connect(&url, &alice_token).await;
    let names = json!({"names": ["API_KEY"]});
    api_key_eventually(&mut alices, "own_env", &format!("key-{alice}")).await;

    cluster.stop_apiserver();
    // Alice's pod is known and running: her calls go on. Bob's needs the API server: a clear
    // error within the start timeout. The HTTP target is untouched.
    assert_eq!(env_answer(&alices.call("own_env", names.clone()).await)["API_KEY"], format!("key-{alice}"));
    let mut bobs = SessionClient::connect(&url, &bob_token).await;
    let started = Instant::now();
    let refused = bobs.call("own_env", names.clone()).await;
    let took = started.elapsed();
    let error = refused["error"].as_str().unwrap_or_else(|| panic!("bob's call should fail: {refused}"));
    assert!(error.contains("kubernetes"), "the error names the cause: {error}");
    assert!(took < Duration::from_secs(15), "failed within the configured timeout: {took:?}");
    let sum = bobs.call("plain_add", json!({"a": 2, "b": 3})).await;
    assert_eq!(sum["text"], "5", "other targets are untouched: {sum}");

    // Back: bob's instance comes up, and nothing is duplicated.
    cluster.restart_apiserver().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = bobs.call("own_env", names.clone()).await;
        if answer["text"].is_string() {
            assert_eq!(env_answer(&answer)["API_KEY"], format!("key-{bob}"));
            break;
        }
        if Instant::now() > deadline {
            let all: Api<MCPInstance> = Api::namespaced(client.clone(), NAMESPACE);
            let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
            let instances = all.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
            let pods = pods.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
            panic!(
                "bob's instance never came up: {answer}\ninstances: {:?}\npods: {:?}",
                instances.iter().map(|i| (&i.metadata.name, &i.status)).collect::<Vec<_>>(),
                pods.iter()
                    .map(|p| (&p.metadata.name, p.status.as_ref().map(|s| (&s.phase, &s.pod_ip))))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all: Api<MCPInstance> = Api::namespaced(client.clone(), NAMESPACE);
    assert_eq!(all.list(&ListParams::default()).await.unwrap().items.len(), 2, "one instance per user");
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    assert_eq!(pods.list(&ListParams::default()).await.unwrap().items.len(), 2, "one pod per instance");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// `kubernetes.max_instances` bounds what users can make the cluster run: past it, a new key is
/// refused with a JSON-RPC error naming the setting, and keys that run go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_instances_bounds_how_many_pods_users_can_start() {
    let (cluster, client, _agent) = setup().await;
    let (stop, task) = operator(&cluster, "operator-bound", 15);
    let config = reflow_common::config::KubernetesConfig {
        max_instances: 1,
        ..kubernetes_config(&cluster, Duration::from_secs(30))
    };
    let instances = reflow_data_plane::upstream::kubernetes::Instances::connect(&config).await.unwrap();
    let gateway = Gateway::start_with(McpSettings::default().with_kubernetes(instances)).await.unwrap();
    kubernetes_target(&gateway, "own", "per_user").await;
    gateway.allow_everyone().await.unwrap();
    let (_, alice_token) = gateway.user("alice@example.com").await.unwrap();
    let (_, bob_token) = gateway.user("bob@example.com").await.unwrap();
    let url = format!("{}/mcp", gateway.mcp);
    let mut alices = SessionClient::connect(&url, &alice_token).await;
    let mut bobs = SessionClient::connect(&url, &bob_token).await;
    assert!(alices.call("own_whoami", json!({})).await["text"].is_string());
    let refused = bobs.call("own_whoami", json!({})).await;
    let error = refused["error"].as_str().unwrap_or_else(|| panic!("bob's call should be refused: {refused}"));
    assert!(error.contains("kubernetes.max_instances (1)"), "{error}");
    assert!(alices.call("own_whoami", json!({})).await["text"].is_string(), "the running key goes on");
    let all: Api<MCPInstance> = Api::namespaced(client.clone(), NAMESPACE);
    assert_eq!(all.list(&ListParams::default()).await.unwrap().items.len(), 1);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// An `MCPInstance` as a data plane makes them for `target`, labelled with a target revision
/// that is not the target's current one.
fn stale_instance(name: &str, target: &str) -> MCPInstance {
    let mut instance = instance(name, None, "30m", "24h");
    instance.spec.target_id = target.into();
    instance.metadata.labels = Some(BTreeMap::from([
        ("mcp.reflow.io/target-id".to_string(), target.to_string()),
        ("mcp.reflow.io/target-revision".to_string(), "0000000000000000".to_string()),
    ]));
    instance
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_lists_restarts_and_removes_pods_with_no_data_plane_running() {
    let (cluster, client, _agent) = setup().await;
    let (stop, task) = operator(&cluster, "operator-control-plane", 15);
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let kubernetes = kubernetes_config(&cluster, Duration::from_secs(60));
    let start = |name: &str, kubernetes: Option<&reflow_common::config::KubernetesConfig>| {
        let url = format!("sqlite://{}", dir.path().join(name).display());
        let shutdown = shutdown.clone();
        let kubernetes = kubernetes.cloned();
        async move {
            let (_, _, api) = reflow_e2e::harness::start_control_plane(
                &url,
                "kubernetes-e2e-secret-kubernetes-e2e!",
                "data-plane-token",
                &Default::default(),
                kubernetes.as_ref(),
                &shutdown,
            )
            .await
            .unwrap();
            let http = reqwest::Client::new();
            let registered: Value = http
                .post(format!("{api}/api/auth/register"))
                .json(&json!({"email": "admin@example.com", "password": "kubernetes-e2e-password"}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let token = registered["token"].as_str().unwrap().to_string();
            let target: Value = http
                .post(format!("{api}/api/targets"))
                .bearer_auth(&token)
                .json(&json!({"name": "env", "transport_type": "kubernetes", "image": ENV_SERVER_IMAGE, "port": 8080}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let id = target["id"].as_str().unwrap_or_else(|| panic!("a target: {target}")).to_string();
            let call = move |method: reqwest::Method, path: String| {
                let request = http.request(method, format!("{api}{path}")).bearer_auth(&token);
                async move {
                    let response = request.send().await.unwrap();
                    (response.status().as_u16(), response.json::<Value>().await.unwrap())
                }
            };
            (id, call)
        }
    };
    let (target, call) = start("cluster.db", Some(&kubernetes)).await;
    let instances: Api<MCPInstance> = Api::namespaced(client.clone(), NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let of_target = format!("mcp.reflow.io/target-id={target}");
    let (status, listed) = call(reqwest::Method::GET, format!("/api/targets/{target}/instances")).await;
    assert_eq!((status, listed), (200, json!([])));

    // An instance a data plane made for an earlier definition, running.
    instances.create(&PostParams::default(), &stale_instance("env-old", &target)).await.unwrap();
    eventually(Duration::from_secs(60), "the instance is verified", || condition(&instances, "env-old", "Verified"))
        .await;
    let (status, listed) = call(reqwest::Method::GET, format!("/api/targets/{target}/instances")).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["name"], "env-old");
    assert_eq!(listed[0]["subject_key"], "user:alice");
    assert_eq!(listed[0]["phase"], "Ready");
    assert_eq!(listed[0]["current"], false, "made for another revision: {listed}");
    assert_eq!(listed[0]["pod"]["phase"], "Running", "{listed}");
    let pod_conditions = listed[0]["pod"]["conditions"].as_array().unwrap();
    assert!(pod_conditions.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"), "{listed}");

    // No data plane runs: the control plane ends it itself, and counts it.
    let (status, restarted) = call(reqwest::Method::POST, format!("/api/targets/{target}/restart-instances")).await;
    assert_eq!(status, 200, "{restarted}");
    assert_eq!(restarted["restarted"], 1, "{restarted}");
    assert_eq!(restarted["restart_generation"], 1, "{restarted}");
    eventually(Duration::from_secs(30), "the restarted instance and its pod are gone", || async {
        instances.get_opt("env-old").await.unwrap().is_none()
            && pods.list(&ListParams::default().labels(&of_target)).await.unwrap().items.is_empty()
    })
    .await;

    // Removing the target removes its instances.
    instances.create(&PostParams::default(), &stale_instance("env-again", &target)).await.unwrap();
    eventually(Duration::from_secs(60), "the second instance runs", || condition(&instances, "env-again", "Available"))
        .await;
    let (status, deleted) = call(reqwest::Method::DELETE, format!("/api/targets/{target}")).await;
    assert_eq!(status, 200, "{deleted}");
    eventually(Duration::from_secs(30), "the removed target's instance and pod are gone", || async {
        instances.get_opt("env-again").await.unwrap().is_none()
            && pods.list(&ListParams::default().labels(&of_target)).await.unwrap().items.is_empty()
    })
    .await;

    // A control plane without cluster access says so rather than listing nothing.
    let (target, call) = start("no-cluster.db", None).await;
    let (status, refused) = call(reqwest::Method::GET, format!("/api/targets/{target}/instances")).await;
    assert_eq!(status, 409, "{refused}");
    assert!(refused.to_string().contains("kubernetes.enabled"), "{refused}");

    shutdown.cancel();
    stop.cancel();
    task.await.unwrap().unwrap();
}
