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

/// Starts `command` (output dropped) and waits until a read of `k` through `endpoint` answers.
fn serving(mut command: Command, endpoint: &str, failure: &str) -> std::process::Child {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !etcdctl(endpoint, &["get", "k"]).status.success() {
        assert!(Instant::now() < deadline, "{failure}");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// The flags of a kubeadm etcd manifest (its TLS flags aside: `tests/tls.rs` has those) start a member
/// unchanged, from the command line, from `ETCD_*` variables, or from etcd's YAML config file.
#[test]
fn a_kubeadm_manifests_flags_etcd_variables_and_config_file_start_a_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (client, peer, metrics) = (free_port(), free_port(), free_port());
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let manifest = [
        format!("--advertise-client-urls={client_url}"),
        format!("--data-dir={}", dir.path().join("etcd").display()),
        "--experimental-initial-corrupt-check=true".into(),
        "--experimental-watch-progress-notify-interval=5s".into(),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=node1={peer_url}"),
        format!("--listen-client-urls={client_url}"),
        format!("--listen-metrics-urls=http://127.0.0.1:{metrics}"),
        format!("--listen-peer-urls={peer_url}"),
        "--name=node1".into(),
        "--snapshot-count=10000".into(),
        "--logger=zap".into(),
        "--log-outputs=stderr".into(),
        "--client-cert-auth=false".into(),
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_quorumkv"))
        .args(&manifest)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !etcdctl(&client_url, &["endpoint", "health"])
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "the manifest's member never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ok(etcdctl(&client_url, &["put", "k", "v"]));
    let _ = child.kill();
    let _ = child.wait();

    // The same member from ETCD_* variables alone.
    let mut etcd_env = Command::new(env!("CARGO_BIN_EXE_quorumkv"));
    for flag in &manifest {
        let (name, value) = flag
            .trim_start_matches("--")
            .split_once('=')
            .expect("name=value");
        etcd_env.env(
            format!("ETCD_{}", name.to_uppercase().replace('-', "_")),
            value,
        );
    }
    let mut child = serving(etcd_env, &client_url, "ETCD_* variables did not start it");
    assert!(ok(etcdctl(&client_url, &["get", "k", "--print-value-only"])).contains('v'));
    let _ = child.kill();
    let _ = child.wait();

    // And from etcd's YAML config file.
    let yaml: String = manifest
        .iter()
        .map(|flag| {
            let (name, value) = flag
                .trim_start_matches("--")
                .split_once('=')
                .expect("name=value");
            format!("{name}: '{value}'\n")
        })
        .collect();
    let config = dir.path().join("etcd.conf.yml");
    std::fs::write(&config, yaml).expect("write config");
    let mut from_file = Command::new(env!("CARGO_BIN_EXE_quorumkv"));
    from_file.arg("--config-file").arg(&config);
    let mut child = serving(from_file, &client_url, "the config file did not start it");
    let _ = child.kill();
    let _ = child.wait();

    // A flag of etcd's that is not built is refused by name, not ignored.
    for (flag, named) in [
        (
            "--client-crl-file=/etc/kubernetes/pki/etcd/crl.pem",
            "--client-crl-file",
        ),
        (
            "--experimental-enable-v2v3=/v2",
            "--experimental-enable-v2v3",
        ),
        ("--no-such-flag=1", "--no-such-flag"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_quorumkv"))
            .args(&manifest)
            .arg(flag)
            .output()
            .expect("run");
        assert!(!out.status.success(), "{flag} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "{flag}: {stderr}");
    }
}
