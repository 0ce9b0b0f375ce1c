//! `reflow operator` as an installer runs it: the CRD it prints is the committed one, and a bad
//! kubeconfig is a clear error, not a hang.

use std::process::Command;

#[test]
fn operator_crd_prints_the_committed_crd() {
    let output = Command::new(env!("CARGO_BIN_EXE_reflow")).args(["operator", "crd"]).output().unwrap();
    assert!(output.status.success());
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds/mcpinstance.yaml")).unwrap();
    assert_eq!(String::from_utf8(output.stdout).unwrap(), committed);
}

#[test]
fn operator_run_with_an_unreadable_kubeconfig_fails_naming_it() {
    let output = Command::new(env!("CARGO_BIN_EXE_reflow"))
        .args(["operator", "run", "--kubeconfig", "/nonexistent/kubeconfig", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/kubeconfig"), "{stderr}");
}

/// A data plane told to serve kubernetes targets with a kubeconfig it cannot read: exit 2,
/// naming the key.
#[test]
fn a_data_plane_with_an_unreadable_kubeconfig_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("reflow.yaml");
    std::fs::write(&config, "kubernetes: { enabled: true, kubeconfig: /nonexistent/kubeconfig }\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_reflow"))
        .args(["data-plane", "--config", config.to_str().unwrap(), "--control-plane", "http://127.0.0.1:1"])
        .args(["--token", "0123456789abcdef0123", "--port", "0", "--cache-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("kubernetes.kubeconfig"), "{stderr}");
}
