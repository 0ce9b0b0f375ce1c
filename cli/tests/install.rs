//! Installing Reflow: the Helm chart (`chart/`), the compose file (`compose/`) and the image
//! (`Dockerfile`), checked with the real tools (Helm, the Kubernetes schemas, the Compose
//! specification's schema, the test kube-apiserver, buildah) and then run: the configuration
//! each one renders starts a control plane and two data planes (and, for the chart, the operator)
//! that serve MCP.
//!
//! Nothing here runs containers, so a rendered container runs as a local process, translated as
//! a kubelet or a container engine would set it up, and in no other way:
//! - the image's entrypoint (`reflow`) with the container's args, and only the env the image and
//!   the container declare (Secret keys, ConfigMap keys and field references resolved from the
//!   rendered objects);
//! - its own address: each container gets a loopback address of its own (`127.x.y.z`) where a
//!   pod has its IP, and `0.0.0.0` (all of the pod's addresses) becomes that address;
//! - its names: the Services (or compose services) it dials resolve to those addresses through an
//!   `/etc/hosts` of its own (a private mount namespace), so TLS names are checked as in a cluster;
//! - its volumes: ConfigMaps, Secrets and emptyDirs written to a directory, and their mount paths
//!   in args and config files mapped to it;
//! - its user: it runs as the user its securityContext (or compose `user`) names;
//! - in-cluster credentials: a kubeconfig holding its ServiceAccount's token, so the rendered
//!   RBAC is what authorises it against the real API server.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use reflow_e2e::harness::{self, with_hosts, Process, SessionClient};

const RELEASE: &str = "reflow-gateway";
const NAMESPACE: &str = "reflow";
/// The user the image and the chart run as.
const IMAGE_USER: u32 = 65532;
/// The Dockerfile's `ENV` (every container of the image starts with it).
const IMAGE_ENV: &[(&str, &str)] = &[("REFLOW_HOST", "0.0.0.0")];

fn workspace() -> PathBuf {
    harness::workspace()
}

fn chart() -> PathBuf {
    workspace().join("chart")
}

/// Helm, kubernetes-validate and the Compose schema (`scripts/chart-tools`, once).
fn tools() -> PathBuf {
    static DONE: OnceLock<PathBuf> = OnceLock::new();
    DONE.get_or_init(|| {
        let status = std::process::Command::new(workspace().join("scripts/chart-tools")).status().unwrap();
        assert!(status.success(), "scripts/chart-tools failed");
        workspace().join(".peers/chart")
    })
    .clone()
}

fn run(program: &Path, args: &[&str]) -> Result<String, String> {
    let output = std::process::Command::new(program).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{stderr}"))
    }
}

fn helm(args: &[&str]) -> Result<String, String> {
    run(&tools().join("bin/helm"), args)
}

/// `helm template` of the chart as release `reflow-gateway` in namespace `reflow`.
fn template(args: &[&str]) -> Result<String, String> {
    let chart = chart();
    let mut all = vec!["template", RELEASE, chart.to_str().unwrap(), "--namespace", NAMESPACE];
    all.extend_from_slice(args);
    helm(&all)
}

/// The YAML documents of a stream, as JSON values (empty documents left out).
fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|document| Value::deserialize(document).unwrap())
        .filter(|value| !value.is_null())
        .collect()
}

fn ci_values() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    files.sort();
    files
}

/// The objects of one rendering, looked up by kind and name.
struct Manifests(Vec<Value>);

impl Manifests {
    fn find(&self, kind: &str, name: &str) -> &Value {
        self.0
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.0.iter().filter(move |o| o["kind"] == kind)
    }

    fn secret_value(&self, name: &str, key: &str) -> String {
        let secret = self.find("Secret", name);
        let encoded = secret["data"][key].as_str().unwrap_or_else(|| panic!("Secret {name} has no {key}"));
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(encoded).unwrap()).unwrap()
    }
}

/// Kinds the chart renders whose CRDs belong to other projects (cert-manager, the Prometheus
/// Operator): no schema of theirs is bundled with the Kubernetes schemas, and the test API
/// server has not their CRDs.
const FOREIGN_KINDS: &[&str] = &["Certificate", "ServiceMonitor"];

fn pod_templates(manifests: &Manifests) -> Vec<(String, &Value)> {
    manifests
        .of_kind("Deployment")
        .map(|d| (d["metadata"]["name"].as_str().unwrap().to_string(), &d["spec"]["template"]))
        .collect()
}

#[test]
fn every_ci_values_file_lints_renders_and_validates_strictly() {
    let validate = tools().join("venv/bin/kubernetes-validate");
    let files = ci_values();
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for expected in ["minimal", "production", "no-operator", "external-secrets", "telemetry"] {
        assert!(names.contains(&format!("{expected}-values.yaml")), "chart/ci has {expected}-values.yaml: {names:?}");
    }
    let out = tempfile::tempdir().unwrap();
    for file in &files {
        let values = file.to_str().unwrap();
        helm(&["lint", "--strict", chart().to_str().unwrap(), "-f", values])
            .unwrap_or_else(|e| panic!("helm lint --strict -f {values}: {e}"));
        let rendered = template(&["-f", values]).unwrap_or_else(|e| panic!("helm template -f {values}: {e}"));
        let path = out.path().join(file.file_name().unwrap());
        std::fs::write(&path, &rendered).unwrap();
        // Strict: unknown fields are errors. Only kinds of other projects' CRDs lack a schema.
        let report = run(&validate, &["--strict", "--quiet", "-k", "1.37.0", path.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{values} does not validate against the Kubernetes 1.37 schemas:\n{e}"));
        for line in report.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                FOREIGN_KINDS.iter().any(|kind| line.contains(&format!("for kind {kind} "))),
                "{values}: unexpected validation report: {line}"
            );
        }
        let manifests = Manifests(documents(&rendered));
        for object in &manifests.0 {
            let kind = object["kind"].as_str().unwrap();
            let labels = &object["metadata"]["labels"];
            assert_eq!(labels["app.kubernetes.io/part-of"], "reflow", "{values}: {kind} labels: {labels}");
            assert_eq!(labels["app.kubernetes.io/instance"], RELEASE, "{values}: {kind}");
            if FOREIGN_KINDS.contains(&kind) {
                assert!(object["spec"].is_object(), "{values}: {kind} has a spec");
            }
        }
        // The restricted Pod Security Standard, in every pod.
        let templates = pod_templates(&manifests);
        assert!(!templates.is_empty());
        for (name, template) in templates {
            let pod = &template["spec"]["securityContext"];
            assert_eq!(pod["runAsNonRoot"], true, "{values}: {name}");
            assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault", "{values}: {name}");
            for container in template["spec"]["containers"].as_array().unwrap() {
                let context = &container["securityContext"];
                assert_eq!(context["allowPrivilegeEscalation"], false, "{values}: {name}");
                assert_eq!(context["readOnlyRootFilesystem"], true, "{values}: {name}");
                assert_eq!(context["capabilities"]["drop"], json!(["ALL"]), "{values}: {name}");
                assert!(container["readinessProbe"].is_object(), "{values}: {name} has a readiness probe");
                assert!(container["resources"]["requests"].is_object(), "{values}: {name} requests resources");
            }
        }
    }
}

#[test]
fn the_original_install_command_works_as_written() {
    // The original's README, word for word but for the values.
    let rendered = template(&[
        "--set",
        "secrets.jwtSecret=0c6f7d2e9a1b4c3d8e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5",
        "--set",
        "secrets.encryptionKey=Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3Jh",
        "--set",
        "secrets.dbPassword=3f2a9c0d1e4b5a6978877665544332211",
        "--set",
        "config.database.host=my-postgres.default.svc",
    ])
    .unwrap();
    let manifests = Manifests(documents(&rendered));
    let secret = format!("{RELEASE}-secrets");
    assert_eq!(
        manifests.secret_value(&secret, "jwt-secret"),
        "0c6f7d2e9a1b4c3d8e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5"
    );
    assert_eq!(manifests.secret_value(&secret, "encryption-key"), "Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3Jh");
    assert_eq!(manifests.secret_value(&secret, "db-password"), "3f2a9c0d1e4b5a6978877665544332211");
    assert!(manifests.secret_value(&secret, "data-plane-token").len() >= 16, "a data-plane token is generated");
    let config = manifests.find("ConfigMap", &format!("{RELEASE}-config"));
    let control_plane: Value = serde_yaml_ng::from_str(config["data"]["control-plane.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(control_plane["database"]["host"], "my-postgres.default.svc");
    assert_eq!(control_plane["database"]["password"], "${DB_PASSWORD}", "no secret in the ConfigMap");
    assert!(!rendered.contains("3f2a9c0d1e4b5a6978877665544332211\n"), "the password only in the Secret, encoded");
    // Both planes, the operator and the CRD; the control plane in two replicas.
    let deployment = |component: &str| manifests.find("Deployment", &format!("{RELEASE}-{component}")).clone();
    assert_eq!(deployment("control-plane")["spec"]["replicas"], 2);
    assert!(deployment("data-plane")["spec"]["replicas"].is_null(), "the HPA owns the data planes' replicas");
    deployment("operator");
    let crd = manifests.find("CustomResourceDefinition", "mcpinstances.mcp.reflow.io");
    assert_eq!(crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
    let hpa = manifests.find("HorizontalPodAutoscaler", &format!("{RELEASE}-data-plane"));
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(manifests.of_kind("PodDisruptionBudget").count(), 3);
}

#[test]
fn the_chart_refuses_values_that_cannot_work_and_names_them() {
    // Each case: the values set (on top of a database host and password unless it replaces
    // them), and the name the refusal must give.
    const VALID: [&str; 4] = ["--set", "config.database.host=db", "--set", "secrets.dbPassword=x"];
    let with = |extra: &'static str| [VALID.as_slice(), &["--set", extra]].concat();
    for (args, names) in [
        (vec!["--set", "secrets.dbPassword=x"], "config.database.host"),
        (vec!["--set", "config.database.host=db"], "secrets.dbPassword"),
        (with("secrets.jwtSecret=short"), "secrets.jwtSecret"),
        (with("mtls.certManager.enabled=true"), "mtls.certManager.issuerRef.name"),
        // values.schema.json: a misspelt key or a wrong type is an error, not silently ignored.
        (with("secret.jwtSecret=x"), "'secret'"),
        (with("controlPlane.replicas=two"), "replicas"),
        (with("config.database.sslmode=on"), "sslmode"),
    ] {
        let error = template(&args).expect_err(&format!("{args:?} is refused"));
        assert!(error.contains(names), "{args:?}: the error names {names}: {error}");
    }
    // A Secret of one's own: the chart writes none, and every plane reads that one.
    let rendered = template(&["--set", "config.database.host=db", "--set", "secrets.existingSecret=mine"]).unwrap();
    let manifests = Manifests(documents(&rendered));
    assert!(manifests.of_kind("Secret").all(|s| !s["metadata"]["name"].as_str().unwrap().ends_with("-secrets")));
    for (name, template) in pod_templates(&manifests) {
        for container in template["spec"]["containers"].as_array().unwrap() {
            for env in container["env"].as_array().into_iter().flatten() {
                if let Some(reference) = env["valueFrom"]["secretKeyRef"].as_object() {
                    assert_eq!(reference["name"], "mine", "{name}: {env}");
                }
            }
        }
    }
}

/// Maps documented as one value (Kubernetes structures passed through as they are).
const WHOLE: &[&str] = &["resources", "issuerRef", "podSecurityContext", "securityContext", "labels"];

/// Every leaf of `values.yaml`, dotted (lists, empty maps and [`WHOLE`] maps are leaves), with
/// its default.
fn leaves(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
    let whole = WHOLE.iter().any(|w| prefix == *w || prefix.ends_with(&format!(".{w}")));
    match value.as_object() {
        Some(map) if !map.is_empty() && !whole => {
            for (key, child) in map {
                let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                leaves(&path, child, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), value.clone());
        }
    }
}

#[test]
fn the_values_table_in_the_chart_readme_is_values_yaml() {
    let values: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap()).unwrap();
    let mut expected = BTreeMap::new();
    leaves("", &values, &mut expected);
    let readme = std::fs::read_to_string(chart().join("README.md")).unwrap();
    // Rows: | `key` | `default` | description |
    let mut documented = BTreeMap::new();
    let table = readme.split_once("\n## Values\n").expect("chart/README.md has a Values section").1;
    for line in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let key = cells[0].trim_start_matches("| ").trim_matches('`').to_string();
        let default = cells.get(1).map(|c| c.trim().trim_matches('`').to_string()).unwrap_or_default();
        assert!(cells.len() >= 3 && !cells[2].trim_end_matches(" |").trim().is_empty(), "{key} is described");
        documented.insert(key, default);
    }
    let missing: Vec<&String> = expected.keys().filter(|k| !documented.contains_key(*k)).collect();
    let extra: Vec<&String> = documented.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(missing.is_empty(), "values.yaml keys missing from chart/README.md: {missing:?}");
    assert!(extra.is_empty(), "chart/README.md documents keys values.yaml has not: {extra:?}");
    for (key, value) in &expected {
        let shown = serde_json::to_string(value).unwrap();
        let shown = value.as_str().map_or(shown, |s| format!("\"{s}\""));
        assert_eq!(&documented[key], &shown, "chart/README.md: the default of {key}");
    }
}

/// The selector labels of every workload, the names of every Secret and Service, by kind/name.
fn upgrade_invariants(manifests: &Manifests) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for object in &manifests.0 {
        let kind = object["kind"].as_str().unwrap();
        let name = object["metadata"]["name"].as_str().unwrap();
        match kind {
            "Deployment" | "StatefulSet" | "DaemonSet" => {
                out.insert(format!("{kind}/{name}"), object["spec"]["selector"].clone());
            }
            "Service" | "PodDisruptionBudget" => {
                out.insert(format!("{kind}/{name}"), object["spec"]["selector"].clone());
            }
            "Secret" => {
                let mut keys: Vec<&String> = object["data"].as_object().map(|d| d.keys().collect()).unwrap_or_default();
                keys.sort();
                out.insert(format!("{kind}/{name}"), json!(keys));
            }
            "CustomResourceDefinition" => {
                out.insert(format!("{kind}/{name}"), object["spec"]["names"].clone());
            }
            _ => {}
        }
    }
    out
}

#[test]
fn an_upgrade_from_the_previous_chart_keeps_selectors_secrets_and_services() {
    let fixtures = chart().join("tests/upgrade");
    let values = fixtures.join("values.yaml");
    let previous: Vec<PathBuf> = std::fs::read_dir(&fixtures)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "values.yaml")
        .collect();
    assert!(!previous.is_empty(), "the rendering of the previous chart version is kept in chart/tests/upgrade");
    let after = upgrade_invariants(&Manifests(documents(&template(&["-f", values.to_str().unwrap()]).unwrap())));
    // From every version kept, not only the last: a release may be skipped on upgrade.
    for previous in &previous {
        let before = upgrade_invariants(&Manifests(documents(&std::fs::read_to_string(previous).unwrap())));
        assert!(before.keys().any(|k| k.starts_with("Deployment/")), "the fixture has workloads");
        for (key, old) in &before {
            let new = after.get(key).unwrap_or_else(|| {
                panic!("{key} of {} is gone: a renamed object is deleted and recreated on upgrade", previous.display())
            });
            if key.starts_with("Secret/") {
                let old_keys = old.as_array().unwrap();
                let new_keys = new.as_array().unwrap();
                assert!(old_keys.iter().all(|k| new_keys.contains(k)), "{key} lost keys: {old} -> {new}");
            } else {
                assert_eq!(old, new, "{key} changed: selectors and names are immutable across upgrades");
            }
        }
    }
}

#[test]
fn the_chart_carries_the_operators_crd_and_the_dashboards_unchanged() {
    let pairs = [(workspace().join("deploy/crds/mcpinstance.yaml"), chart().join("files/crds/mcpinstance.yaml"))]
        .into_iter()
        .chain(std::fs::read_dir(workspace().join("deploy/observability/grafana/dashboards")).unwrap().map(|entry| {
            let path = entry.unwrap().path();
            let copy = chart().join("files/dashboards").join(path.file_name().unwrap());
            (path, copy)
        }));
    for (source, copy) in pairs {
        assert_eq!(
            std::fs::read(&source).unwrap(),
            std::fs::read(&copy).unwrap_or_default(),
            "{} differs from {}: copy it (cp {} {})",
            copy.display(),
            source.display(),
            source.display(),
            copy.display()
        );
    }
}

// --- against the real API server -----------------------------------------------------------

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::{Discovery, Scope};

async fn create_namespace(client: &kube::Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}}))
    .unwrap();
    match namespaces.create(&PostParams::default(), &namespace).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create namespace {name}: {e}"),
    }
}

/// Server-side apply of every object but `skip` kinds; with `dry_run`, nothing is stored.
async fn apply(client: &kube::Client, manifests: &Manifests, skip: &[&str], dry_run: bool) -> Vec<String> {
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let mut params = PatchParams::apply("reflow-install-test").force();
    params.dry_run = dry_run;
    let mut applied = Vec::new();
    for object in &manifests.0 {
        let kind = object["kind"].as_str().unwrap();
        if skip.contains(&kind) || FOREIGN_KINDS.contains(&kind) {
            continue;
        }
        let (group, version) = match object["apiVersion"].as_str().unwrap().split_once('/') {
            Some((group, version)) => (group, version),
            None => ("", object["apiVersion"].as_str().unwrap()),
        };
        let (resource, capabilities) = discovery
            .resolve_gvk(&kube::core::GroupVersionKind::gvk(group, version, kind))
            .unwrap_or_else(|| panic!("the API server serves no {group}/{version} {kind}"));
        let name = object["metadata"]["name"].as_str().unwrap();
        let api: Api<DynamicObject> = match capabilities.scope {
            Scope::Cluster => Api::all_with(client.clone(), &resource),
            Scope::Namespaced => Api::namespaced_with(
                client.clone(),
                object["metadata"]["namespace"].as_str().unwrap_or(NAMESPACE),
                &resource,
            ),
        };
        api.patch(name, &params, &Patch::Apply(object))
            .await
            .unwrap_or_else(|e| panic!("server-side apply (dry run: {dry_run}) of {kind} {name}: {e}"));
        applied.push(format!("{kind}/{name}"));
    }
    applied
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ci_values_file_applies_with_a_server_side_dry_run_and_the_chart_installs_upgrades_and_uninstalls() {
    let cluster = reflow_e2e::cluster::Cluster::start().await.unwrap();
    let client = cluster.client().await.unwrap();
    for namespace in [NAMESPACE, "reflow-instances"] {
        create_namespace(&client, namespace).await;
    }
    for file in ci_values() {
        let rendered = template(&["-f", file.to_str().unwrap()]).unwrap();
        let manifests = Manifests(documents(&rendered));
        let applied = apply(&client, &manifests, &[], true).await;
        assert!(applied.iter().any(|a| a.starts_with("Deployment/")), "{}: {applied:?}", file.display());
    }
    // A dry run stores nothing.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    assert!(deployments.list(&Default::default()).await.unwrap().items.is_empty());

    // A real install, upgrade and uninstall with Helm (the CRD is the test cluster's already).
    let minimal = chart().join("ci/minimal-values.yaml");
    let kubeconfig = cluster.kubeconfig.to_str().unwrap();
    let chart_dir = chart();
    let release = |verb: &str, extra: &[&str]| {
        let mut args =
            vec![verb, RELEASE, chart_dir.to_str().unwrap(), "--namespace", NAMESPACE, "--kubeconfig", kubeconfig];
        args.extend_from_slice(&["-f", minimal.to_str().unwrap(), "--set", "crds.enabled=false"]);
        args.extend_from_slice(extra);
        helm(&args).unwrap_or_else(|e| panic!("helm {verb}: {e}"))
    };
    release("install", &[]);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let read = |name: String| {
        let secrets = secrets.clone();
        async move { secrets.get(&name).await.unwrap().data.unwrap() }
    };
    let names =
        [format!("{RELEASE}-secrets"), format!("{RELEASE}-control-plane-tls"), format!("{RELEASE}-data-plane-tls")];
    let mut installed = Vec::new();
    for name in &names {
        installed.push(read(name.clone()).await);
    }
    // The restricted Pod Security admission of the namespace accepts every pod the chart makes.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = pods
            .list(&kube::api::ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}")))
            .await
            .unwrap();
        let mut components: Vec<String> = list
            .items
            .iter()
            .filter_map(|p| p.metadata.labels.as_ref()?.get("app.kubernetes.io/component").cloned())
            .collect();
        components.sort();
        components.dedup();
        if components == ["control-plane", "data-plane", "operator"] {
            break;
        }
        assert!(Instant::now() < deadline, "pods of every component are admitted: {components:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Generated once: an upgrade reads back what the install generated, secrets and certificates.
    release("upgrade", &[]);
    for (name, before) in names.iter().zip(&installed) {
        assert_eq!(&read(name.clone()).await, before, "{name} is kept on upgrade");
    }
    // A value given on upgrade wins over the one kept.
    release("upgrade", &["--set", "secrets.dataPlaneToken=a-new-data-plane-token-0123"]);
    let after = read(names[0].clone()).await;
    assert_eq!(after["data-plane-token"].0, b"a-new-data-plane-token-0123");
    assert_eq!(after["jwt-secret"], installed[0]["jwt-secret"]);
    // Uninstall keeps the secrets (the encryption key above all) and removes the rest.
    helm(&["uninstall", RELEASE, "--namespace", NAMESPACE, "--kubeconfig", kubeconfig]).unwrap();
    assert_eq!(read(names[0].clone()).await["encryption-key"], installed[0]["encryption-key"]);
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    assert!(deployments.list(&Default::default()).await.unwrap().items.is_empty());
    // Without the cluster, each render generates anew: the keeping above is the chart's doing.
    let first = Manifests(documents(&template(&["-f", minimal.to_str().unwrap()]).unwrap()));
    let second = Manifests(documents(&template(&["-f", minimal.to_str().unwrap()]).unwrap()));
    assert_ne!(first.secret_value(&names[0], "jwt-secret"), second.secret_value(&names[0], "jwt-secret"));
}

// --- running what the chart and the compose file render ----------------------------------

/// What one container needs to run locally (see the module docs).
struct Container {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Mount path in the container, and the file or directory prepared for it.
    mounts: Vec<(String, PathBuf)>,
    uid: u32,
}

/// A random address of loopback's /8 (a pod's IP, a compose service's address).
fn address() -> Ipv4Addr {
    let bytes: [u8; 3] = rand_bytes();
    Ipv4Addr::new(127, bytes[0].max(2), bytes[1], bytes[2].clamp(1, 254))
}

fn rand_bytes() -> [u8; 3] {
    let id = uuid::Uuid::new_v4();
    let b = id.as_bytes();
    [b[0], b[1], b[2]]
}

/// Replaces every occurrence of each `from` in `text` by its `to`, longest match first, in one
/// pass (a replacement is never replaced again).
fn replace_once(text: &str, pairs: &[(String, String)]) -> String {
    let mut pairs: Vec<&(String, String)> = pairs.iter().collect();
    pairs.sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'outer: while !rest.is_empty() {
        for (from, to) in &pairs {
            if rest.starts_with(from.as_str()) {
                out.push_str(to);
                rest = &rest[from.len()..];
                continue 'outer;
            }
        }
        let next = rest.chars().next().unwrap();
        out.push(next);
        rest = &rest[next.len_utf8()..];
    }
    out
}

/// Starts `container` as a local process at `ip`, resolving names through `hosts`.
fn start(container: &Container, ip: Ipv4Addr, hosts: &Path, logs: &Path, extra_env: &[(&str, &str)]) -> Process {
    let mut pairs: Vec<(String, String)> = vec![("0.0.0.0".into(), ip.to_string())];
    for (path, local) in &container.mounts {
        pairs.push((path.clone(), local.to_string_lossy().into_owned()));
    }
    // Config files are read at their mount paths; the paths inside them move with the mounts.
    for (_, local) in &container.mounts {
        let files: Vec<PathBuf> = if local.is_dir() {
            std::fs::read_dir(local).unwrap().map(|e| e.unwrap().path()).collect()
        } else {
            vec![local.clone()]
        };
        for file in files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "yaml" || e == "yml")) {
            let text = std::fs::read_to_string(&file).unwrap();
            std::fs::write(&file, replace_once(&text, &pairs)).unwrap();
        }
    }
    let binary = Path::new(env!("CARGO_BIN_EXE_reflow"));
    let mut command = with_hosts(hosts, Some(container.uid), binary);
    command.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (key, value) in IMAGE_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())).chain(container.env.clone()) {
        command.env(&key, replace_once(&value, &pairs));
    }
    for (key, value) in extra_env {
        command.env(key, value);
    }
    command.args(container.args.iter().map(|a| replace_once(a, &pairs)));
    let log = logs.join(format!("{}.log", container.name));
    command
        .current_dir(logs)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(logs.join(format!("{}.err", container.name))).unwrap())
        .process_group(0)
        .kill_on_drop(true);
    let child = command.spawn().unwrap();
    Process { child, name: container.name.clone() }
}

/// Lets the containers' user into `dir` (a temporary directory is its creator's only).
fn open_to_all(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Gives `path` (and everything under it) to the container's user, as fsGroup and a volume's
/// ownership would.
fn give_to(path: &Path, uid: u32) {
    let status = std::process::Command::new("chown").args(["-R", &format!("{uid}:{uid}")]).arg(path).status().unwrap();
    assert!(status.success());
}

fn log_of(logs: &Path, name: &str) -> String {
    let read = |ext: &str| std::fs::read_to_string(logs.join(format!("{name}.{ext}"))).unwrap_or_default();
    format!("{}{}", read("log"), read("err"))
}

async fn wait_http(url: &str, logs: &Path, name: &str, process: &mut Process) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let http = reqwest::Client::new();
    loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            panic!("{name} exited ({status}):\n{}", log_of(logs, name));
        }
        if http.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        assert!(Instant::now() < deadline, "{url} not healthy within 90 s:\n{}", log_of(logs, name));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A PostgreSQL role and database on the test server, as an installation's own would be.
struct Database {
    admin: String,
    user: String,
    name: String,
    password: String,
    port: u16,
}

impl Database {
    async fn create() -> Database {
        use sqlx::Connection as _;
        let admin =
            std::env::var("DATABASE_URL").expect("DATABASE_URL names a PostgreSQL server (scripts/test starts one)");
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (user, name, password) =
            (format!("reflow_{}", &id[..12]), format!("reflow_install_{}", &id[..12]), id.clone());
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        sqlx::query(&format!("CREATE ROLE {user} LOGIN PASSWORD '{password}'")).execute(&mut conn).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name} OWNER {user}")).execute(&mut conn).await.unwrap();
        let port = url::Url::parse(&admin).unwrap().port().unwrap_or(5432);
        Database { admin, user, name, password, port }
    }

    async fn drop_all(self) {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&self.admin).await.unwrap();
        sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&mut conn).await.unwrap();
        sqlx::query(&format!("DROP ROLE IF EXISTS {}", self.user)).execute(&mut conn).await.unwrap();
    }
}

/// The first account (an admin), an API token of its own and an allow-everyone policy, through
/// the admin API at `api`.
async fn admin_token(api: &str) -> (String, String) {
    let http = reqwest::Client::new();
    let register = http
        .post(format!("{api}/api/auth/register"))
        .json(&json!({"email": "admin@example.com", "password": "secure123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(register.status().as_u16(), 201, "the first account registers");
    let login = json_of(
        http.post(format!("{api}/api/auth/login"))
            .json(&json!({"email": "admin@example.com", "password": "secure123"})),
    )
    .await;
    let jwt = login["token"].as_str().unwrap().to_string();
    let token =
        json_of(http.post(format!("{api}/api/auth/tokens")).bearer_auth(&jwt).json(&json!({"name": "client"}))).await;
    let policy = http
        .post(format!("{api}/api/policies"))
        .bearer_auth(&jwt)
        .json(
            &json!({"name": "everyone", "effect": "allow", "priority": 10, "subjects": [{"subject_type": "everyone"}]}),
        )
        .send()
        .await
        .unwrap();
    assert!(policy.status().is_success(), "{}", policy.text().await.unwrap());
    (jwt, token["token"].as_str().unwrap().to_string())
}

/// The JSON body of a successful answer to `request`.
async fn json_of(request: reqwest::RequestBuilder) -> Value {
    let response = request.send().await.unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert!(status.is_success(), "{status} {body}");
    body
}

async fn get(api: &str, jwt: &str, path: &str) -> Value {
    json_of(reqwest::Client::new().get(format!("{api}{path}")).bearer_auth(jwt)).await
}

async fn post(api: &str, jwt: &str, path: &str, body: Value) -> Value {
    json_of(reqwest::Client::new().post(format!("{api}{path}")).bearer_auth(jwt).json(&body)).await
}

/// The official Python SDK client in the test's own name space (`hosts`), so it dials Service
/// names as a client in the cluster would.
async fn client_via(hosts: &Path, url: &str, token: &str) -> SessionClient {
    SessionClient::connect_with(with_hosts(hosts, None, &harness::python()), url, token).await
}

/// Calls `tool` until it answers text (a first call may wait for a snapshot or a pod).
async fn call_eventually(client: &mut SessionClient, tool: &str, arguments: Value) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let answer = client.call(tool, arguments.clone()).await;
        if let Some(text) = answer["text"].as_str() {
            return text.to_string();
        }
        assert!(Instant::now() < deadline, "{tool} never answered: {answer}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The container `name` of a rendered pod template, as a [`Container`] whose volumes are
/// written under `dir`.
fn container_of(manifests: &Manifests, template: &Value, name: &str, pod: &str, dir: &Path) -> Container {
    let spec = &template["spec"];
    let container = spec["containers"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap();
    assert!(container["command"].is_null(), "{name} runs the image's entrypoint");
    let uid = spec["securityContext"]["runAsUser"].as_u64().unwrap() as u32;
    std::fs::create_dir_all(dir).unwrap();
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let volume_name = mount["name"].as_str().unwrap();
        let volume = spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == volume_name).unwrap();
        let local = dir.join(volume_name);
        std::fs::create_dir_all(&local).unwrap();
        let write_items = |data: BTreeMap<String, Vec<u8>>, items: &Value| {
            let chosen: Vec<(String, String)> = match items.as_array() {
                Some(items) => items
                    .iter()
                    .map(|i| (i["key"].as_str().unwrap().to_string(), i["path"].as_str().unwrap().to_string()))
                    .collect(),
                None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (key, path) in chosen {
                std::fs::write(local.join(path), &data[&key]).unwrap();
            }
        };
        if let Some(config_map) = volume["configMap"].as_object() {
            let object = manifests.find("ConfigMap", config_map["name"].as_str().unwrap());
            let data = object["data"].as_object().unwrap();
            let data = data.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().as_bytes().to_vec())).collect();
            write_items(data, &volume["configMap"]["items"]);
        } else if let Some(secret) = volume["secret"].as_object() {
            let object = manifests.find("Secret", secret["secretName"].as_str().unwrap());
            let data = object["data"].as_object().unwrap();
            let decode = |v: &Value| base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
            write_items(data.iter().map(|(k, v)| (k.clone(), decode(v))).collect(), &volume["secret"]["items"]);
        } else {
            assert!(
                volume["emptyDir"].is_object(),
                "{name}: volume {volume_name} is a ConfigMap, a Secret or an emptyDir"
            );
        }
        mounts.push((mount["mountPath"].as_str().unwrap().to_string(), local));
    }
    let mut env = Vec::new();
    for entry in container["env"].as_array().into_iter().flatten() {
        let key = entry["name"].as_str().unwrap().to_string();
        let value = if let Some(value) = entry["value"].as_str() {
            value.to_string()
        } else if let Some(reference) = entry["valueFrom"]["secretKeyRef"].as_object() {
            manifests.secret_value(reference["name"].as_str().unwrap(), reference["key"].as_str().unwrap())
        } else {
            match entry["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => pod.to_string(),
                Some("metadata.namespace") => NAMESPACE.to_string(),
                other => panic!("{name}: env {key} from {other:?}"),
            }
        };
        env.push((key, value));
    }
    let args = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    give_to(dir, uid);
    Container { name: pod.to_string(), args, env, mounts, uid }
}

/// A kubeconfig for the ServiceAccount `name`: its token, from the real API server.
async fn service_account_kubeconfig(
    cluster: &reflow_e2e::cluster::Cluster,
    client: &kube::Client,
    name: &str,
    path: &Path,
) {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NAMESPACE);
    let request = serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}})).unwrap();
    let token = accounts.create_token_request(name, &PostParams::default(), &request).await.unwrap();
    let token = token.status.unwrap().token.expect("a token");
    let ca = base64::engine::general_purpose::STANDARD.encode(&cluster.ca_pem);
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\n\
             users:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\n\
             current-context: test\n",
            cluster.server
        ),
    )
    .unwrap();
}

fn hosts_file(path: &Path, names: &[(Ipv4Addr, Vec<String>)]) {
    let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
    for (ip, names) in names {
        text += &format!("{ip} {}\n", names.join(" "));
    }
    std::fs::write(path, text).unwrap();
}

/// A Service's names as a pod in the release namespace resolves them.
fn service_names(service: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{NAMESPACE}"),
        format!("{service}.{NAMESPACE}.svc"),
        format!("{service}.{NAMESPACE}.svc.cluster.local"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_chart_renders_runs_control_plane_data_planes_and_operator_with_its_rbac() {
    harness::ensure_peers();
    let cluster = reflow_e2e::cluster::Cluster::start().await.unwrap();
    let client = cluster.client().await.unwrap();
    create_namespace(&client, NAMESPACE).await;
    let _agent = reflow_e2e::cluster::NodeAgent::start(client.clone()).await.unwrap();
    let db = Database::create().await;
    let database_host = "reflow-db.databases.svc";

    // The original's install command, pointed at this database. The test machine has no Service
    // network, so data planes reach instances at their pod IPs (a documented setting).
    let port = db.port.to_string();
    let rendered = template(&[
        "--set",
        "secrets.jwtSecret=9d3b2a1f0e8c7d6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b",
        "--set",
        "secrets.encryptionKey=0123456789abcdef0123456789abcdef",
        "--set",
        &format!("secrets.dbPassword={}", db.password),
        "--set",
        &format!("config.database.host={database_host}"),
        "--set",
        &format!("config.database.port={port}"),
        "--set",
        &format!("config.database.user={}", db.user),
        "--set",
        &format!("config.database.name={}", db.name),
        "--set-json",
        r#"config.extra={"kubernetes":{"address":"pod"}}"#,
    ])
    .unwrap();
    let manifests = Manifests(documents(&rendered));
    // Everything but the workloads is applied for real (nothing here runs the chart's own pods:
    // they run below as local processes).
    apply(&client, &manifests, &["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"], false).await;

    let work = tempfile::tempdir().unwrap();
    open_to_all(work.path());
    let (cp_ip, dp_ips, operator_ip) = (address(), [address(), address()], address());
    let hosts = work.path().join("hosts");
    hosts_file(
        &hosts,
        &[
            (Ipv4Addr::LOCALHOST, vec![database_host.to_string()]),
            (
                cp_ip,
                [
                    service_names(&format!("{RELEASE}-control-plane")),
                    service_names(&format!("{RELEASE}-control-plane-grpc")),
                ]
                .concat(),
            ),
            (dp_ips[0], service_names(&format!("{RELEASE}-data-plane"))),
        ],
    );
    let templates: BTreeMap<String, &Value> = pod_templates(&manifests).into_iter().collect();
    let pod = |component: &str, n: usize, account: &str| {
        let dir = work.path().join(format!("{component}-{n}"));
        let name = format!("{RELEASE}-{component}-{n}");
        let container = container_of(&manifests, templates[&format!("{RELEASE}-{component}")], component, &name, &dir);
        let kubeconfig = dir.join("kubeconfig");
        (container, kubeconfig, account.to_string())
    };
    let mut running = Vec::new();
    let mut planes = Vec::new();
    for (component, n, ip) in [
        ("control-plane", 0, cp_ip),
        ("data-plane", 0, dp_ips[0]),
        ("data-plane", 1, dp_ips[1]),
        ("operator", 0, operator_ip),
    ] {
        let (container, kubeconfig, account) = pod(component, n, &format!("{RELEASE}-{component}"));
        service_account_kubeconfig(&cluster, &client, &account, &kubeconfig).await;
        give_to(&kubeconfig, container.uid);
        let kubeconfig = kubeconfig.to_string_lossy().into_owned();
        let mut process = start(&container, ip, &hosts, work.path(), &[("KUBECONFIG", &kubeconfig)]);
        let health = match component {
            "operator" => format!("http://{ip}:8081/readyz"),
            _ => format!("http://{ip}:3000/health"),
        };
        wait_http(&health, work.path(), &container.name, &mut process).await;
        if component != "operator" {
            planes.push((container.name.clone(), ip));
        }
        running.push(process);
    }

    // The admin API on the control plane; a kubernetes target, per user.
    let api = format!("http://{cp_ip}:3000");
    let (jwt, token) = admin_token(&api).await;
    let target = post(
        &api,
        &jwt,
        "/api/targets",
        json!({"name": "env", "transport_type": "kubernetes", "image": reflow_e2e::cluster::ENV_SERVER_IMAGE,
               "port": 8080, "health_path": "/health", "isolation_boundary": "per_user", "env_keys": [{"name": "API_KEY"}]}),
    )
    .await;
    let target_id = target["id"].as_str().unwrap();
    post(
        &api,
        &jwt,
        &format!("/api/targets/{target_id}/env/default"),
        json!({"key": "API_KEY", "value": "chart-key-4242"}),
    )
    .await;

    // Through each data plane (a client in the cluster dials the Service; here each name space
    // sends it to one data plane): mTLS to the control plane, the data plane's RBAC to create the
    // instance and its Secret, the operator's to run its pod, the control plane's to list it.
    for (n, dp_ip) in dp_ips.iter().enumerate() {
        let own_hosts = work.path().join(format!("client-hosts-{n}"));
        hosts_file(&own_hosts, &[(*dp_ip, service_names(&format!("{RELEASE}-data-plane")))]);
        let url = format!("http://{RELEASE}-data-plane.{NAMESPACE}.svc:3000/mcp");
        let mut mcp = client_via(&own_hosts, &url, &token).await;
        let text = call_eventually(&mut mcp, "env_env", json!({"names": ["API_KEY"]})).await;
        let env: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(env["API_KEY"], "chart-key-4242", "through {}: {text}", planes[n + 1].0);
    }
    let listed: Value = get(&api, &jwt, &format!("/api/targets/{target_id}/instances")).await;
    let listed = listed.as_array().unwrap_or_else(|| panic!("instances: {listed}"));
    assert_eq!(listed.len(), 1, "one instance for the one user, shared by both data planes: {listed:?}");
    assert_eq!(listed[0]["phase"], "Ready", "{listed:?}");
    // Both data planes hold the snapshot over mTLS, and the control plane knows them.
    let status: Value = get(&api, &jwt, "/api/data-planes").await;
    let nodes: Vec<&str> =
        status["data_planes"].as_array().unwrap().iter().map(|d| d["node_id"].as_str().unwrap()).collect();
    for (name, _) in &planes[1..] {
        assert!(nodes.contains(&name.as_str()), "{name} is connected: {status}");
    }
    drop(running);
    db.drop_all().await;
}

// --- the compose file --------------------------------------------------------------------

/// Compose's interpolation: `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`,
/// `${VAR?error}`, `$VAR` and `$$`. An error reference to an unset (or, with `:`, empty) variable
/// fails as `docker compose` does.
fn interpolate(text: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(body) = rest.strip_prefix('{') {
            let end = body.find('}').ok_or("unclosed ${")?;
            let expression = &body[..end];
            rest = &body[end + 1..];
            let name_end =
                expression.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(expression.len());
            let (name, operator) = expression.split_at(name_end);
            let value = env.get(name);
            let set = value.is_some();
            let non_empty = value.is_some_and(|v| !v.is_empty());
            let resolved = if let Some(default) = operator.strip_prefix(":-") {
                if non_empty {
                    value.unwrap().clone()
                } else {
                    default.to_string()
                }
            } else if let Some(default) = operator.strip_prefix('-') {
                if set {
                    value.unwrap().clone()
                } else {
                    default.to_string()
                }
            } else if let Some(error) = operator.strip_prefix(":?") {
                if !non_empty {
                    return Err(format!("{name}: {error}"));
                }
                value.unwrap().clone()
            } else if let Some(error) = operator.strip_prefix('?') {
                if !set {
                    return Err(format!("{name}: {error}"));
                }
                value.unwrap().clone()
            } else {
                assert!(operator.is_empty(), "unsupported interpolation ${{{expression}}}");
                value.cloned().unwrap_or_default()
            };
            out.push_str(&resolved);
        } else {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            out.push_str(env.get(&rest[..end]).map_or("", String::as_str));
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// A `.env` file's variables.
fn dotenv(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The compose project as `docker compose config` reads it: interpolated from `env`, YAML merge
/// keys applied, as JSON.
fn compose_project(env: &BTreeMap<String, String>) -> Result<Value, String> {
    let text = std::fs::read_to_string(workspace().join("compose/docker-compose.yml")).unwrap();
    let mut yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&interpolate(&text, env)?).map_err(|e| e.to_string())?;
    // A merged mapping may bring merge keys of its own (`data-plane-2` merges `data-plane-1`,
    // which merges `x-reflow`): merge until none is left.
    loop {
        let before = yaml.clone();
        yaml.apply_merge().map_err(|e| e.to_string())?;
        if yaml == before {
            break;
        }
    }
    Ok(serde_json::to_value(yaml).unwrap())
}

/// Validates `project` against the Compose specification's JSON schema (the one compose-go,
/// and so `docker compose`, validates with).
fn validate_compose(project: &Value, dir: &Path) -> Result<(), String> {
    let path = dir.join("compose.json");
    std::fs::write(&path, serde_json::to_vec(project).unwrap()).unwrap();
    let script = "import json, sys, jsonschema\n\
                  schema = json.load(open(sys.argv[1])); project = json.load(open(sys.argv[2]))\n\
                  cls = jsonschema.validators.validator_for(schema)\n\
                  errors = sorted(cls(schema).iter_errors(project), key=lambda e: list(e.path))\n\
                  [print('/'.join(map(str, e.path)) + ': ' + e.message) for e in errors]\n\
                  sys.exit(1 if errors else 0)\n";
    let schema = tools().join("compose-spec.json");
    run(&tools().join("venv/bin/python"), &["-c", script, schema.to_str().unwrap(), path.to_str().unwrap()]).map(|_| ())
}

/// The env of the compose file's `.env.example` with the secrets it asks for set.
fn compose_env(overrides: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut env = dotenv(&std::fs::read_to_string(workspace().join("compose/.env.example")).unwrap());
    for (key, value) in [
        ("DB_PASSWORD", "compose-db-password"),
        ("JWT_SECRET", "7a1e3c5b9d2f4a6c8e0b1d3f5a7c9e2b4d6f8a0c1e3b5d7f9a2c4e6b8d0f1a3c"),
        ("ENCRYPTION_KEY", "abcdef0123456789abcdef0123456789"),
        ("DATA_PLANE_TOKEN", "compose-data-plane-token-0123456789"),
    ]
    .into_iter()
    .chain(overrides.iter().copied())
    {
        env.insert(key.to_string(), value.to_string());
    }
    env
}

#[test]
fn the_compose_file_is_valid_compose_and_refuses_to_start_without_its_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let project = compose_project(&compose_env(&[])).unwrap();
    validate_compose(&project, dir.path()).unwrap_or_else(|e| panic!("compose/docker-compose.yml: {e}"));
    let services = project["services"].as_object().unwrap();
    for service in [
        "postgres",
        "control-plane",
        "data-plane-1",
        "data-plane-2",
        "gateway",
        "otel-collector",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(service), "the compose project runs {service}");
    }
    assert_eq!(project["services"]["gateway"]["ports"][0], "3000:3000", "the gateway on localhost:3000");
    // Every file it mounts is in the repository.
    for (name, service) in services {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('.') {
                let path = workspace().join("compose").join(source);
                assert!(path.exists(), "{name} mounts {source}, which is missing");
            }
        }
    }
    // The schema is strict enough to catch a mistake.
    let mut broken = project.clone();
    broken["services"]["control-plane"]["restart_policy"] = json!("always");
    assert!(validate_compose(&broken, dir.path()).is_err(), "an unknown service key is refused");
    // The secrets .env.example leaves empty stop it, naming the variable.
    let mut unset = compose_env(&[]);
    unset.insert("JWT_SECRET".into(), String::new());
    let error = compose_project(&unset).unwrap_err();
    assert!(error.contains("JWT_SECRET"), "{error}");
}

/// A compose service as a [`Container`], its volumes prepared under `dir`.
fn service_container(project: &Value, service: &str, dir: &Path) -> Container {
    let spec = &project["services"][service];
    let uid: u32 = spec["user"].as_str().unwrap().split(':').next().unwrap().parse().unwrap();
    assert_eq!(spec["read_only"], true, "{service} has a read-only root");
    assert!(spec["entrypoint"].is_null(), "{service} runs the image's entrypoint");
    std::fs::create_dir_all(dir).unwrap();
    let mut mounts = Vec::new();
    for (n, volume) in spec["volumes"].as_array().into_iter().flatten().enumerate() {
        let parts: Vec<&str> = volume.as_str().unwrap().split(':').collect();
        let (source, target) = (parts[0], parts[1]);
        let local = if source.starts_with('.') {
            let file = workspace().join("compose").join(source);
            let local = dir.join(format!("mount-{n}-{}", file.file_name().unwrap().to_string_lossy()));
            std::fs::copy(&file, &local).unwrap();
            local
        } else {
            let local = dir.join(format!("volume-{source}"));
            std::fs::create_dir_all(&local).unwrap();
            local
        };
        mounts.push((target.to_string(), local));
    }
    for (n, tmpfs) in spec["tmpfs"].as_array().into_iter().flatten().enumerate() {
        let local = dir.join(format!("tmpfs-{n}"));
        std::fs::create_dir_all(&local).unwrap();
        mounts.push((tmpfs.as_str().unwrap().to_string(), local));
    }
    let env = spec["environment"]
        .as_object()
        .map(|e| e.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string))).collect())
        .unwrap_or_default();
    let args = spec["command"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    give_to(dir, uid);
    Container { name: service.to_string(), args, env, mounts, uid }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_compose_file_configures_runs_a_control_plane_and_two_data_planes() {
    harness::ensure_peers();
    let db = Database::create().await;
    let port = db.port.to_string();
    let env =
        compose_env(&[("DB_PASSWORD", &db.password), ("DB_PORT", &port), ("DB_USER", &db.user), ("DB_NAME", &db.name)]);
    let project = compose_project(&env).unwrap();
    let work = tempfile::tempdir().unwrap();
    open_to_all(work.path());
    let upstream = harness::everything(harness::Mode::StreamableHttp, None).await.unwrap();

    let ips: BTreeMap<&str, Ipv4Addr> =
        ["control-plane", "data-plane-1", "data-plane-2"].into_iter().map(|s| (s, address())).collect();
    let hosts = work.path().join("hosts");
    let mut names: Vec<(Ipv4Addr, Vec<String>)> =
        vec![(Ipv4Addr::LOCALHOST, vec!["postgres".into(), "otel-collector".into()])];
    names.extend(ips.iter().map(|(service, ip)| (*ip, vec![service.to_string()])));
    hosts_file(&hosts, &names);
    let mut running = Vec::new();
    for (service, ip) in &ips {
        let container = service_container(&project, service, &work.path().join(service));
        let mut process = start(&container, *ip, &hosts, work.path(), &[]);
        wait_http(&format!("http://{ip}:3000/health"), work.path(), service, &mut process).await;
        running.push(process);
    }
    let api = format!("http://{}:3000", ips["control-plane"]);
    let (jwt, token) = admin_token(&api).await;
    post(
        &api,
        &jwt,
        "/api/targets",
        json!({"name": "everything", "transport_type": "streamable-http", "url": upstream.url}),
    )
    .await;
    // A client behind the balancer (service `gateway`) on each data plane in turn.
    for service in ["data-plane-1", "data-plane-2"] {
        let own_hosts = work.path().join(format!("client-hosts-{service}"));
        hosts_file(&own_hosts, &[(ips[service], vec!["gateway".into()])]);
        let mut mcp = client_via(&own_hosts, "http://gateway:3000/mcp", &token).await;
        let text = call_eventually(&mut mcp, "everything_echo", json!({"message": format!("via {service}")})).await;
        assert!(text.contains(&format!("via {service}")), "{service}: {text}");
    }
    drop(running);
    db.drop_all().await;
}

// --- the image ---------------------------------------------------------------------------

/// buildah with its own storage under `root` (nothing of the machine's is touched).
fn buildah(root: &Path, args: &[&str]) -> Result<String, String> {
    let storage = root.join("storage");
    let runroot = root.join("run");
    let mut all =
        vec!["--root", storage.to_str().unwrap(), "--runroot", runroot.to_str().unwrap(), "--storage-driver", "vfs"];
    all.extend_from_slice(args);
    run(Path::new("buildah"), &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_builds_from_scratch_and_serves_as_its_non_root_user() {
    assert!(
        std::process::Command::new("buildah").arg("--version").output().is_ok(),
        "buildah builds the image here (scripts/test installs Debian's buildah)"
    );
    let work = tempfile::tempdir().unwrap();
    let root = work.path();
    // The Dockerfile's builder stage runs scripts/build-static; so does this test, on this
    // machine (no registry to pull the builder image from), and hands its output to the
    // Dockerfile as the binary stage.
    let out = root.join("context/out");
    // With a shell's environment, not cargo's test environment (build scripts track variables
    // such as CARGO_MANIFEST_DIR, so the release build scripts/test makes first is reused).
    let mut build = std::process::Command::new(workspace().join("scripts/build-static"));
    build.arg(&out).env_clear();
    for key in ["PATH", "HOME", "CARGO_HOME", "RUSTUP_HOME"] {
        if let Some(value) = std::env::var_os(key) {
            build.env(key, value);
        }
    }
    let status = build.status().unwrap();
    assert!(status.success(), "scripts/build-static");
    std::fs::write(root.join("context/Containerfile"), "FROM scratch\nCOPY out/ /out/\n").unwrap();
    let context = root.join("context");
    buildah(root, &["bud", "--isolation", "chroot", "-t", "localhost/reflow-binary:test", context.to_str().unwrap()])
        .unwrap();
    let dockerfile = workspace().join("Dockerfile");
    buildah(
        root,
        &[
            "bud",
            "--isolation",
            "chroot",
            "--build-arg",
            "BINARY_FROM=localhost/reflow-binary:test",
            "--build-arg",
            "VERSION=0.1.0",
            "-f",
            dockerfile.to_str().unwrap(),
            "-t",
            "localhost/reflow:test",
            context.to_str().unwrap(),
        ],
    )
    .unwrap_or_else(|e| panic!("buildah bud of the Dockerfile: {e}"));

    let inspect: Value =
        serde_json::from_str(&buildah(root, &["inspect", "--type", "image", "localhost/reflow:test"]).unwrap())
            .unwrap();
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(config["Entrypoint"], json!(["/usr/local/bin/reflow"]));
    assert_eq!(config["WorkingDir"], "/var/lib/reflow");
    assert_eq!(config["Labels"]["org.opencontainers.image.version"], "0.1.0");
    assert!(config["Labels"]["org.opencontainers.image.source"].is_string());

    // Nothing but the binary, its user, the CA bundle and its working directory: no shell.
    let container = buildah(root, &["from", "--name", "reflow-image-test", "localhost/reflow:test"]).unwrap();
    let container = container.trim();
    let mounted = buildah(root, &["mount", container]).unwrap();
    let rootfs = PathBuf::from(mounted.trim());
    let mut files = Vec::new();
    let mut stack = vec![rootfs.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path.strip_prefix(&rootfs).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    assert_eq!(
        files,
        ["etc/group", "etc/passwd", "etc/ssl/certs/ca-certificates.crt", "usr/local/bin/reflow"],
        "the image holds only these files"
    );
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(std::fs::metadata(rootfs.join("var/lib/reflow")).unwrap().uid(), IMAGE_USER);
    let _ = buildah(root, &["umount", container]);

    // Run as the image says (its user, working directory and default command): `reflow up`
    // serves, and writes only under its working directory.
    let port = harness::free_port().to_string();
    let mut child = tokio::process::Command::new("buildah")
        .args(["--root", root.join("storage").to_str().unwrap(), "--runroot", root.join("run").to_str().unwrap()])
        .args(["--storage-driver", "vfs", "run", "--isolation", "chroot", container, "--"])
        .args([
            "/usr/local/bin/reflow",
            "up",
            "--data-dir",
            "/var/lib/reflow/data",
            "--port",
            &port,
            "--grpc-port",
            "0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(root.join("run.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let http = reqwest::Client::new();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the image's reflow exited ({status}): {}", std::fs::read_to_string(root.join("run.err")).unwrap());
        }
        let health = http.get(format!("http://127.0.0.1:{port}/health")).send().await;
        if health.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(Instant::now() < deadline, "no /health: {}", std::fs::read_to_string(root.join("run.err")).unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let version =
        buildah(root, &["run", "--isolation", "chroot", container, "--", "/usr/local/bin/reflow", "--version"])
            .unwrap();
    assert!(version.contains("0.1.0"), "{version}");
    child.kill().await.unwrap();
    let _ = buildah(root, &["rm", container]);
}
