//! `reflow audit verify` against a database holding an audit trail: verified, then tampered
//! with (named, exit code 1), and without a database (exit code 2 naming the key).

use std::process::Command;

use reflow_control_plane::audit::AuditRecord;

fn record(n: u32) -> AuditRecord {
    AuditRecord {
        user_id: Some("u".into()),
        target: Some("github".into()),
        name: Some("create_issue".into()),
        decision: "allowed".into(),
        ..AuditRecord::new(format!("rec-{n}"), "dp-1".into(), chrono::Utc::now(), "/mcp".into(), "tools/call".into())
    }
}

fn verify(url: &str) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_reflow"))
        .args(["audit", "verify", "--database-url", url])
        .env_remove("DATABASE_URL")
        .env_remove("REFLOW_CONFIG")
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

#[test]
fn audit_verify_names_the_first_record_that_was_tampered_with() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("reflow.db").display());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = reflow_control_plane::store::connect(&url, 2).await.unwrap();
        let records: Vec<AuditRecord> = (1..=5).map(record).collect();
        assert_eq!(store.append_audit(&records).await.unwrap(), 5);
    });
    let (code, stdout, stderr) = verify(&url);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("5 records over 1 data planes"), "{stdout}");

    runtime.block_on(async {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query("UPDATE audit_records SET body = REPLACE(body, 'allowed', 'denied') WHERE id = 'rec-3'")
            .execute(&pool)
            .await
            .unwrap();
    });
    let (code, _, stderr) = verify(&url);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("rec-3") && stderr.contains("changed"), "{stderr}");

    let output = Command::new(env!("CARGO_BIN_EXE_reflow"))
        .args(["audit", "verify"])
        .env_remove("DATABASE_URL")
        .env_remove("REFLOW_CONFIG")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("database.url"));
}
