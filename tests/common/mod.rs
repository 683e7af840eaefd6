//! Helpers for integration tests: a real `quorumkv` process on loopback, etcdctl, a gRPC client.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use quorumkv::proto::etcdserverpb::kv_client::KvClient;
use tonic::transport::Channel;

/// A port for a test server to listen on, chosen below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`, 32768 and up by default). A port handed out
/// by binding port 0 comes from that range, and between the probe and the server's own
/// bind any outgoing connection on the machine may take it as its local port ("Address
/// already in use" in CI). Ports below the range are only ever taken by a listener: each
/// test process walks its own stretch (offset by its pid), never hands out a port twice,
/// and checks that it binds.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(LOW);
    assert!(
        span >= 1_000,
        "the ephemeral port range starts at {ephemeral_low}: no room below it for test servers"
    );
    let base = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (base + step) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{ephemeral_low}")
}

pub struct Server {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
    pub log_path: PathBuf,
    pub extra_args: Vec<String>,
    /// `http` or `https`, for the client and the peer URLs.
    pub client_scheme: &'static str,
    pub peer_scheme: &'static str,
}

impl Server {
    /// Starts a server in a fresh data dir under `root` and waits until it serves.
    pub fn start(root: &Path, extra_args: &[&str]) -> Server {
        let mut server = Server::new(root, extra_args);
        server.spawn();
        server.wait_ready();
        server
    }

    /// A server with its ports chosen, not started.
    pub fn new(root: &Path, extra_args: &[&str]) -> Server {
        Server {
            child: None,
            data_dir: root.join("data"),
            client_port: free_port(),
            peer_port: free_port(),
            log_path: root.join("server.log"),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            client_scheme: "http",
            peer_scheme: "http",
        }
    }

    pub fn peer_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.peer_scheme, self.peer_port)
    }

    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.client_scheme, self.client_port)
    }

    /// Starts the process (on the same data dir and ports) without waiting.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_quorumkv"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(self.endpoint())
            .arg("--advertise-client-urls")
            .arg(self.endpoint())
            .arg("--listen-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(self.peer_url())
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn quorumkv");
        self.child = Some(child);
    }

    /// Waits until `etcdctl endpoint health` answers, or panics with the server's log.
    pub fn wait_ready(&mut self) {
        self.wait_ready_as(&[]);
    }

    /// `wait_ready` with more etcdctl flags (`--user=root:pw` once auth is on: as with etcd,
    /// health asks for a key, which needs a user).
    pub fn wait_ready_as(&mut self, etcdctl_flags: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("server exited early with {status}; log:\n{}", self.log());
                }
            }
            let mut args = etcdctl_flags.to_vec();
            args.extend(["endpoint", "health"]);
            let out = etcdctl(&self.endpoint(), &args);
            if out.status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server did not become ready; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to the running process.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// The member id `etcdctl endpoint status` reports.
    pub fn member_id(&self) -> String {
        let out = ok(etcdctl(&self.endpoint(), &["endpoint", "status"]));
        out.split(", ")
            .nth(1)
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        child.wait().expect("wait")
    }

    /// Runs the server to completion (for start-up failures): returns its exit status.
    pub fn run_to_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.spawn();
        let mut child = self.child.take().expect("spawned");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not exit; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn client(&self) -> KvClient<Channel> {
        KvClient::connect(self.endpoint()).await.expect("connect")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A fresh etcd 3.4 member on loopback, killed when dropped.
pub struct Etcd {
    child: Child,
    pub port: u16,
    pub peer_port: u16,
}

impl Etcd {
    pub fn available() -> bool {
        Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .output()
            .is_ok()
    }

    pub fn start(root: &Path) -> Etcd {
        Etcd::start_with(root, &[])
    }

    /// `start` with more of etcd's flags (`--enable-v2`).
    pub fn start_with(root: &Path, extra: &[&str]) -> Etcd {
        let (port, peer_port) = (free_port(), free_port());
        let client = format!("http://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new("etcd")
            .args(["--data-dir", &root.join("etcd").display().to_string()])
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("default={peer}")])
            .args(["--log-level", "error"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        let etcd = Etcd {
            child,
            port,
            peer_port,
        };
        wait_until("etcd serves", Duration::from_secs(20), || {
            etcdctl(&etcd.endpoint(), &["endpoint", "health"])
                .status
                .success()
        });
        etcd
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn etcdctl_available() -> bool {
    Command::new("etcdctl")
        .arg("version")
        .env("ETCDCTL_API", "3")
        .output()
        .is_ok()
}

pub fn etcdctl(endpoint: &str, args: &[&str]) -> Output {
    etcdctl_stdin(endpoint, args, "")
}

pub fn etcdctl_stdin(endpoint: &str, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint)
        .arg("--dial-timeout=2s")
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl is needed: apt-get install etcd-client (ci/test does)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("etcdctl output")
}

/// etcdctl's stdout; panics with its stderr when it failed.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "etcdctl failed: {}\nstdout: {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

/// etcdctl's stderr; panics when it succeeded.
pub fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "etcdctl unexpectedly succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).expect("utf8")
}

/// The members `names` of one new cluster, each with `extra` flags, started together (none
/// is ready alone).
pub fn start_cluster(root: &Path, names: &[&str], extra: &[&str]) -> Vec<Server> {
    let mut servers = new_cluster(root, names, extra);
    for server in servers.iter_mut() {
        server.spawn();
    }
    for server in servers.iter_mut() {
        server.wait_ready();
    }
    servers
}

/// The members `names` of one new cluster, each with its flags (`--name`, `--initial-cluster`,
/// then `extra`), not started.
pub fn new_cluster(root: &Path, names: &[&str], extra: &[&str]) -> Vec<Server> {
    new_cluster_over(root, names, extra, "http", "http")
}

/// `new_cluster` with these schemes for the client and the peer URLs (`https` for TLS).
pub fn new_cluster_over(
    root: &Path,
    names: &[&str],
    extra: &[&str],
    client_scheme: &'static str,
    peer_scheme: &'static str,
) -> Vec<Server> {
    let mut servers: Vec<Server> = names
        .iter()
        .map(|name| {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).expect("dir");
            let mut server = Server::new(&dir, &[]);
            server.client_scheme = client_scheme;
            server.peer_scheme = peer_scheme;
            server
        })
        .collect();
    let initial_cluster = names
        .iter()
        .zip(&servers)
        .map(|(name, s)| format!("{name}={}", s.peer_url()))
        .collect::<Vec<_>>()
        .join(",");
    for (name, server) in names.iter().zip(servers.iter_mut()) {
        server.extra_args = vec![
            "--name".into(),
            name.to_string(),
            "--initial-cluster".into(),
            initial_cluster.clone(),
        ];
        server
            .extra_args
            .extend(extra.iter().map(|s| s.to_string()));
    }
    servers
}

/// `POST path` with `body` (and `token` in `Authorization`, if not empty) over HTTP/1.1 on
/// `port`: the status and the JSON answer (`Null` if it is not JSON).
pub fn http_post(port: u16, path: &str, body: &str, token: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let auth = if token.is_empty() {
        String::new()
    } else {
        format!("Authorization: {token}\r\n")
    };
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status: u16 = response[9..12].parse().expect("status");
    let (head, body) = response.split_once("\r\n\r\n").expect("head");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// A chunked HTTP/1.1 body's data (its trailers left out).
fn dechunk(mut body: &str) -> String {
    let mut data = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        data.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    data
}

/// `GET path` over HTTP/1.1 on `port`: the status and the body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let response = http_get_raw(port, path);
    let status: u16 = response[9..12].parse().expect("status");
    let body = response.split_once("\r\n\r\n").expect("head").1.to_string();
    (status, body)
}

/// `GET path` over HTTP/1.1 on `port`: the whole answer, head and body.
pub fn http_get_raw(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

/// The index of the member that says it leads, from `etcdctl endpoint status`.
pub fn leader(servers: &[Server]) -> Option<usize> {
    servers
        .iter()
        .position(|s| s.child.is_some() && is_leader(s))
}

/// Does the member say it leads (`etcdctl endpoint status`)?
pub fn is_leader(server: &Server) -> bool {
    let out = etcdctl(&server.endpoint(), &["endpoint", "status"]);
    // endpoint, id, version, db size, is leader, ...
    String::from_utf8_lossy(&out.stdout)
        .split(", ")
        .nth(4)
        .is_some_and(|is_leader| is_leader.trim() == "true")
}

/// Makes sure `servers[off]` does not lead: if it does, leadership moves to `servers[to]`.
pub fn lead_elsewhere(servers: &[Server], off: usize, to: usize) {
    if is_leader(&servers[off]) {
        let member = servers[to].member_id();
        ok(etcdctl(&servers[off].endpoint(), &["move-leader", &member]));
        wait_until("another member leads", Duration::from_secs(10), || {
            !is_leader(&servers[off])
        });
    }
}

/// Polls `done` every 100 ms until it holds (returns how long that took), or panics naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// The value of `key` by a linearizable `etcdctl get`; panics when etcdctl fails.
pub fn value_of(endpoint: &str, key: &str) -> String {
    ok(etcdctl(endpoint, &["get", key, "--print-value-only"]))
        .trim()
        .to_string()
}

/// `etcdctl lease grant TTL` → the lease id (hex, as etcdctl prints it).
pub fn grant(endpoint: &str, ttl: u64) -> String {
    let out = ok(etcdctl(endpoint, &["lease", "grant", &ttl.to_string()]));
    // "lease 694d7d6ba8f4b90c granted with TTL(5s)"
    out.split_whitespace().nth(1).expect("lease id").to_string()
}

/// A running `etcdctl lease keep-alive LEASE`.
pub fn keep_alive(endpoint: &str, lease: &str) -> Child {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "lease", "keep-alive", lease])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl")
}

/// `method path` over HTTP/1.1 on `port` with a form-encoded `form` body (none if empty): the
/// status, the headers (names in lower case) and the body.
pub fn http_form(
    port: u16,
    method: &str,
    path: &str,
    form: &str,
) -> (u16, Vec<(String, String)>, String) {
    let content_type = (!form.is_empty()).then_some("application/x-www-form-urlencoded");
    http_request(port, method, path, content_type, form)
}

/// One HTTP/1.1 request with a body of `content_type` (none: no body headers), on a
/// connection of its own: the status, the headers (names in lower case) and the body.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let body_head = match content_type {
        None => String::new(),
        Some(content_type) => format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        ),
    };
    // One write: a server that answers before reading the body (a 415) and closes must find
    // it read already, or the close resets the connection before the answer is read.
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{body_head}Connection: close\r\n\r\n{body}"
    );
    stream.write_all(request.as_bytes()).expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status: u16 = response[9..12].parse().expect("status");
    let (head, body) = response.split_once("\r\n\r\n").expect("head");
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, headers, body)
}

/// The environment variable `name` parsed, or `default` when it is unset or does not parse
/// (the seeds and lengths of the differential runs).
pub fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
