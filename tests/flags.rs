//! Flags come from the command line or from `QUORUMKV_<FLAG>` environment variables, with
//! etcd's defaults (data dir `<name>.quorumkv` in the working directory).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{etcdctl, free_port, ok};

#[test]
fn environment_variables_set_flags_and_the_data_dir_defaults_to_name_dot_quorumkv() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_quorumkv"))
        .current_dir(dir.path())
        .env("QUORUMKV_NAME", "infra0")
        .env("QUORUMKV_LISTEN_CLIENT_URLS", &endpoint)
        .env(
            "QUORUMKV_LISTEN_PEER_URLS",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .env("QUORUMKV_LOG_FORMAT", "json")
        .env("QUORUMKV_MAX_TXN_OPS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !etcdctl(&endpoint, &["endpoint", "health"]).status.success() {
        assert!(Instant::now() < deadline, "server never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        dir.path().join("infra0.quorumkv/member/wal").is_dir(),
        "data dir from --name"
    );
    assert!(dir.path().join("infra0.quorumkv/member/db").exists());
    // QUORUMKV_MAX_TXN_OPS=1 is in force.
    let out = common::etcdctl_stdin(&endpoint, &["txn"], "\n\nput a 1\nput b 2\n\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("too many operations in txn request"));
    ok(etcdctl(&endpoint, &["put", "a", "1"]));
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    let output = child.wait_with_output().expect("wait");
    assert!(output.status.success(), "SIGINT is a clean shutdown");
    let log = String::from_utf8_lossy(&output.stderr);
    let first = log.lines().next().expect("a log line");
    assert!(
        first.starts_with('{') && first.contains("\"level\""),
        "json logs: {first}"
    );
}

#[test]
fn bad_flags_are_refused_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_quorumkv"))
        .args(["--initial-cluster-state", "sideways"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid --initial-cluster-state"));
    let out = Command::new(env!("CARGO_BIN_EXE_quorumkv"))
        .args(["--listen-client-urls", "ftp://x:1"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only http://"));
}
