//! `quorumkv gateway start`, etcd's L4 gateway, run beside `etcd gateway start` (Debian's etcd
//! 3.4, when installed): the same clients (etcdctl) through each, in front of the same real
//! members, must see the same thing: connections taken in turn, a dead member skipped, and
//! taken back once it serves again.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{etcdctl, free_port, ok, wait_until, Server};

struct Gateway {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Gateway {
    /// `etcd gateway start` or `quorumkv gateway start` in front of `endpoints`.
    fn start(kind: &str, endpoints: &str, dir: &Path) -> Gateway {
        let port = free_port();
        let log = dir.join(format!("{kind}-gateway.log"));
        let file = std::fs::File::create(&log).expect("log");
        let program = if kind == "etcd" {
            "etcd".to_string()
        } else {
            env!("CARGO_BIN_EXE_quorumkv").to_string()
        };
        let child = Command::new(program)
            .args([
                "gateway",
                "start",
                &format!("--endpoints={endpoints}"),
                &format!("--listen-addr=127.0.0.1:{port}"),
                "--retry-delay=1s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn the gateway");
        let gateway = Gateway { child, port, log };
        wait_until("the gateway listens", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        gateway
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `who`'s value, read through the gateway by a new etcdctl (a new connection).
    fn who(&self) -> String {
        ok(etcdctl(
            &self.endpoint(),
            &["get", "who", "--print-value-only", "--dial-timeout=3s"],
        ))
        .trim()
        .to_string()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcd_available() -> bool {
    Command::new("etcd").arg("--version").output().is_ok()
}

/// Two single-member clusters, `who` = `a` on one and `b` on the other, so that each answer
/// tells which endpoint the connection went to.
fn through_a_gateway(kind: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root_a = dir.path().join("a");
    let root_b = dir.path().join("b");
    std::fs::create_dir_all(&root_a).expect("dir");
    std::fs::create_dir_all(&root_b).expect("dir");
    let mut a = Server::start(&root_a, &[]);
    let b = Server::start(&root_b, &[]);
    ok(etcdctl(&a.endpoint(), &["put", "who", "a"]));
    ok(etcdctl(&b.endpoint(), &["put", "who", "b"]));
    // With the scheme, as users write them: both gateways drop it.
    let gateway = Gateway::start(
        kind,
        &format!("{},{}", a.endpoint(), b.endpoint()),
        dir.path(),
    );

    let seen: Vec<String> = (0..6).map(|_| gateway.who()).collect();
    assert!(
        seen.iter().any(|s| s == "a") && seen.iter().any(|s| s == "b"),
        "{kind}: connections all went one way: {seen:?}"
    );
    // Writes and watches pass through too (it is only TCP).
    ok(etcdctl(&gateway.endpoint(), &["put", "through", "gateway"]));

    // a dies: every connection goes to b, and a is set aside.
    a.kill9();
    for _ in 0..4 {
        assert_eq!(
            gateway.who(),
            "b",
            "{kind}: a connection went to the dead member"
        );
    }
    assert!(
        gateway.log().contains("deactivated endpoint"),
        "{kind}: {}",
        gateway.log()
    );

    // a serves again: within a retry delay or two, connections go to it again.
    a.spawn();
    a.wait_ready();
    wait_until(
        &format!("{kind}: the gateway takes a back"),
        Duration::from_secs(15),
        || gateway.who() == "a",
    );
}

#[test]
fn quorumkv_gateway_takes_members_in_turn_skips_a_dead_one_and_takes_it_back() {
    if !common::etcdctl_available() {
        eprintln!("skipped: no etcdctl");
        return;
    }
    through_a_gateway("quorumkv");
}

#[test]
fn etcd_gateway_does_the_same_in_the_same_scenario() {
    if !common::etcdctl_available() || !etcd_available() {
        eprintln!("skipped: no etcd or etcdctl");
        return;
    }
    through_a_gateway("etcd");
}

/// Runs `quorumkv gateway start ARGS` to its exit (killed, and the test failed, if it still
/// runs after 10 s): its status and stderr.
fn gateway_exit(args: &[String]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quorumkv"))
        .args(["gateway", "start"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gateway start {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    (status, stderr)
}

#[test]
fn gateway_flags_are_refused_with_a_reason() {
    for (args, reason) in [
        (
            vec!["--endpoints=127.0.0.1"],
            "invalid endpoint \"127.0.0.1\" (want host:port)",
        ),
        (
            vec!["--discovery-srv=example.com"],
            "--discovery-srv: DNS discovery is not built in quorumkv",
        ),
        (vec!["--retry-delay=soon"], "invalid duration"),
    ] {
        let mut all = vec!["--listen-addr=127.0.0.1:0".to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let (status, stderr) = gateway_exit(&all);
        assert!(!status.success(), "{args:?} accepted");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
    // Flags etcd reads only with --discovery-srv are taken (and ignored) without it.
    let mut gateway = Command::new(env!("CARGO_BIN_EXE_quorumkv"))
        .args([
            "gateway",
            "start",
            "--listen-addr=127.0.0.1:0",
            "--trusted-ca-file=/nonexistent/ca.pem",
            "--insecure-discovery",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run");
    std::thread::sleep(Duration::from_millis(500));
    let still_running = gateway.try_wait().expect("try_wait").is_none();
    let _ = gateway.kill();
    let _ = gateway.wait();
    assert!(still_running, "the gateway refused flags etcd takes");
    // A listen address in use is refused by name.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let (status, stderr) = gateway_exit(&[format!("--listen-addr={addr}")]);
    assert!(!status.success());
    assert!(stderr.contains(&format!("listen tcp {addr}")), "{stderr}");
}
