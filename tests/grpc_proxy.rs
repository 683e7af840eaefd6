//! `quorumkv grpc-proxy start` in front of real quorumkv members, driven by etcdctl 3.4 and by
//! tonic's generated clients: every service through it; watchers of one key coalesced into one
//! watcher on the member (its `/metrics`); progress requests answered; a slow client parked
//! and caught up without a gap; the serializable-read cache; registration as etcd 3.4's proxy
//! lists it; and failover with the member in use killed, every watcher resuming with no event
//! lost or repeated.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{etcdctl, free_port, ok, start_cluster, wait_until, Server};
use quorumkv::proto::etcdserverpb::kv_client::KvClient;
use quorumkv::proto::etcdserverpb::lease_client::LeaseClient;
use quorumkv::proto::etcdserverpb::watch_client::WatchClient;
use quorumkv::proto::etcdserverpb::watch_request::RequestUnion;
use quorumkv::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest, RangeRequest, WatchCreateRequest,
    WatchProgressRequest, WatchRequest, WatchResponse,
};
use quorumkv::proto::v3electionpb::election_client::ElectionClient;
use quorumkv::proto::v3electionpb::LeaderRequest;
use quorumkv::proto::v3lockpb::lock_client::LockClient;
use quorumkv::proto::v3lockpb::LockRequest;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

struct Proxy {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
}

impl Proxy {
    /// `quorumkv grpc-proxy start` (or `etcd grpc-proxy start` with `etcd`) in front of
    /// `endpoints`, with `extra` flags; waits until it serves.
    fn start_as(kind: &str, endpoints: &str, dir: &Path, extra: &[&str]) -> Proxy {
        let port = free_port();
        let log = dir.join(format!("{kind}-grpc-proxy-{port}.log"));
        let file = std::fs::File::create(&log).expect("log");
        let program = if kind == "etcd" {
            "etcd".to_string()
        } else {
            env!("CARGO_BIN_EXE_quorumkv").to_string()
        };
        let child = Command::new(program)
            .args([
                "grpc-proxy",
                "start",
                &format!("--endpoints={endpoints}"),
                &format!("--listen-addr=127.0.0.1:{port}"),
                &format!("--advertise-client-url=127.0.0.1:{port}"),
                &format!("--data-dir={}", dir.join(format!("{kind}.proxy")).display()),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn the proxy");
        let proxy = Proxy {
            child: Some(child),
            port,
            log,
        };
        wait_until("the proxy listens", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        proxy
    }

    fn start(endpoints: &str, dir: &Path, extra: &[&str]) -> Proxy {
        Proxy::start_as("quorumkv", endpoints, dir, extra)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A metric of the proxy's `/metrics`.
    fn metric(&self, name: &str) -> f64 {
        metric(self.port, name)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A sample's value from the `/metrics` of the server on `port` (0 when absent).
fn metric(port: u16, name: &str) -> f64 {
    let text = common::http_get_raw(port, "/metrics");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn channel(endpoint: &str) -> Channel {
    Channel::from_shared(endpoint.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

/// One watch stream with one watcher: its created answer is read before this returns.
struct OneWatch {
    rx: tonic::Streaming<WatchResponse>,
    tx: mpsc::Sender<WatchRequest>,
    watch_id: i64,
    /// Progress answers met between events (their revisions).
    progress_seen: Vec<i64>,
}

impl OneWatch {
    async fn open(channel: Channel, key: &[u8], start_revision: i64) -> OneWatch {
        let (tx, requests) = mpsc::channel(16);
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: key.to_vec(),
                start_revision,
                ..Default::default()
            })),
        })
        .await
        .expect("send");
        // As etcd's clients: no limit on an answer's size (a catch-up batch may pass 4 MiB).
        let mut rx = WatchClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .watch(ReceiverStream::new(requests))
            .await
            .expect("watch")
            .into_inner();
        let created = rx.message().await.expect("created").expect("an answer");
        assert!(created.created && !created.canceled, "{created:?}");
        OneWatch {
            rx,
            tx,
            watch_id: created.watch_id,
            progress_seen: Vec::new(),
        }
    }

    async fn ask_progress(&self) {
        self.tx
            .send(WatchRequest {
                request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
            })
            .await
            .expect("send");
    }

    /// The next answer, which must be a progress answer (no events, watch id -1): its revision.
    async fn progress(&mut self) -> i64 {
        let progress = tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("a progress answer")
            .expect("stream")
            .expect("an answer");
        assert_eq!(progress.watch_id, -1, "{progress:?}");
        assert!(progress.events.is_empty(), "{progress:?}");
        progress.header.expect("header").revision
    }

    /// The mod revisions of the next `n` events.
    async fn revisions(&mut self, n: usize) -> Vec<i64> {
        let mut got = Vec::new();
        while got.len() < n {
            let answer = tokio::time::timeout(Duration::from_secs(20), self.rx.message())
                .await
                .unwrap_or_else(|_| panic!("no event after {} of {n}: {got:?}", got.len()))
                .expect("stream")
                .expect("an answer");
            if answer.watch_id == -1 && answer.events.is_empty() {
                // A progress answer between events: it vouches only for what came before it.
                let revision = answer.header.expect("header").revision;
                assert!(
                    got.last().is_none_or(|last| revision >= *last),
                    "progress {revision} after event {got:?}"
                );
                self.progress_seen.push(revision);
                continue;
            }
            assert_eq!(answer.watch_id, self.watch_id, "{answer:?}");
            assert!(!answer.canceled, "{answer:?}");
            got.extend(
                answer
                    .events
                    .iter()
                    .map(|e| e.kv.as_ref().expect("kv").mod_revision),
            );
        }
        got
    }
}

async fn put(channel: Channel, key: &[u8], value: &[u8]) -> i64 {
    KvClient::new(channel)
        .put(PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            ..Default::default()
        })
        .await
        .expect("put")
        .into_inner()
        .header
        .expect("header")
        .revision
}

/// A put, made again while the cluster answers that it is electing a leader.
async fn put_retrying(channel: Channel, key: &[u8], value: &[u8]) -> i64 {
    for _ in 0..100 {
        let answer = KvClient::new(channel.clone())
            .put(PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
                ..Default::default()
            })
            .await;
        match answer {
            Ok(answer) => return answer.into_inner().header.expect("header").revision,
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(status) => panic!("put: {status:?}"),
        }
    }
    panic!("the cluster took no write for 20 s")
}

/// The mod revisions of every change of `key` (never deleted), from its first.
async fn history(channel: Channel, key: &[u8]) -> Vec<i64> {
    let version = KvClient::new(channel.clone())
        .range(RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner()
        .kvs[0]
        .version;
    OneWatch::open(channel, key, 1)
        .await
        .revisions(version as usize)
        .await
}

#[test]
fn every_service_answers_through_the_proxy_as_from_the_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--name", "m1"]);
    let proxy = Proxy::start(&server.endpoint(), dir.path(), &[]);
    let (p, m) = (proxy.endpoint(), server.endpoint());

    // KV.
    assert_eq!(ok(etcdctl(&p, &["put", "k1", "v1"])).trim(), "OK");
    assert_eq!(ok(etcdctl(&p, &["get", "k1"])), "k1\nv1\n");
    assert_eq!(ok(etcdctl(&m, &["get", "k1"])), "k1\nv1\n");
    let txn = "value(\"k1\") = \"v1\"\n\nput k2 v2\nput k3 v3\n\n\n";
    assert!(ok(common::etcdctl_stdin(&p, &["txn"], txn)).starts_with("SUCCESS"));
    assert_eq!(
        ok(etcdctl(&p, &["get", "k", "--prefix", "--keys-only"])),
        "k1\n\nk2\n\nk3\n\n"
    );
    assert_eq!(ok(etcdctl(&p, &["del", "k2"])).trim(), "1");
    // The same answer, byte for byte, as the member's (JSON: header, revisions, values).
    assert_eq!(
        ok(etcdctl(&p, &["get", "k", "--prefix", "-w", "json"])),
        ok(etcdctl(&m, &["get", "k", "--prefix", "-w", "json"]))
    );
    // A member's error comes through with its code and message.
    let refused = common::fails(etcdctl(&p, &["get", "k1", "--rev", "1000"]));
    assert!(
        refused.contains("etcdserver: mvcc: required revision is a future revision"),
        "{refused}"
    );
    // A write's error too (writes pass through as bytes: the member's status and trailers).
    let no_lease = ["put", "k9", "v9", "--lease", "1234"];
    let error_line = |out: String| {
        out.lines()
            .filter(|l| l.starts_with("Error:"))
            .collect::<String>()
    };
    let through = error_line(common::fails(etcdctl(&p, &no_lease)));
    assert_eq!(through, "Error: etcdserver: requested lease not found");
    assert_eq!(through, error_line(common::fails(etcdctl(&m, &no_lease))));
    // A write's answer as the member gives it: its header names the revision it made.
    let put: serde_json::Value =
        serde_json::from_str(&ok(etcdctl(&p, &["put", "k1", "v1", "-w", "json"]))).expect("json");
    let got: serde_json::Value =
        serde_json::from_str(&ok(etcdctl(&m, &["get", "k1", "-w", "json"]))).expect("json");
    assert_eq!(put["header"]["revision"], got["kvs"][0]["mod_revision"]);
    assert_eq!(put["header"]["cluster_id"], got["header"]["cluster_id"]);
    let revision = ok(etcdctl(&p, &["get", "k1", "-w", "json"]));
    let revision: serde_json::Value = serde_json::from_str(&revision).expect("json");
    let revision = revision["header"]["revision"].as_i64().expect("revision");
    assert!(ok(etcdctl(&p, &["compact", &revision.to_string()])).contains("compacted revision"));

    // Lease.
    let granted = ok(etcdctl(&p, &["lease", "grant", "60"]));
    let lease = granted
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    assert!(
        ok(etcdctl(&p, &["lease", "keep-alive", "--once", &lease])).contains("keepalived with TTL")
    );
    assert!(ok(etcdctl(&p, &["lease", "timetolive", &lease])).contains("granted with TTL(60s)"));
    assert!(ok(etcdctl(&p, &["lease", "list"])).contains(&lease));
    assert!(ok(etcdctl(&p, &["lease", "revoke", &lease])).contains("revoked"));

    // Cluster (no --resolver-prefix: the cluster's own members) and Maintenance.
    assert_eq!(
        ok(etcdctl(&p, &["member", "list"])),
        ok(etcdctl(&m, &["member", "list"]))
    );
    assert!(ok(etcdctl(&p, &["endpoint", "status"])).contains("3.5.0+quorumkv"));
    assert_eq!(ok(etcdctl(&p, &["alarm", "list"])), "");
    assert!(ok(etcdctl(&p, &["defrag"])).contains("Finished defragmenting"));
    let snapshot = dir.path().join("through-proxy.db");
    ok(etcdctl(
        &p,
        &["snapshot", "save", &snapshot.display().to_string()],
    ));
    assert!(std::fs::metadata(&snapshot).expect("snapshot").len() > 0);

    // Lock and Election.
    let locked = ok(etcdctl(&p, &["lock", "mylock", "echo", "held"]));
    assert!(locked.contains("held"), "{locked}");
    let mut campaign = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &p, "elect", "myelection", "p1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl elect");
    // Its leadership, seen through the proxy: by Leader, and by Observe's first answer.
    runtime().block_on(async {
        let to_proxy = channel(&p).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let leader = loop {
            let answer = ElectionClient::new(to_proxy.clone())
                .leader(LeaderRequest {
                    name: b"myelection".to_vec(),
                })
                .await;
            if let Ok(answer) = answer {
                break answer.into_inner().kv.expect("kv");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no leader: {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(leader.value, b"p1");
        let mut observed = ElectionClient::new(to_proxy)
            .observe(LeaderRequest {
                name: b"myelection".to_vec(),
            })
            .await
            .expect("observe")
            .into_inner();
        let first = observed
            .message()
            .await
            .expect("stream")
            .expect("an answer");
        assert_eq!(first.kv.expect("kv"), leader);
    });
    let _ = campaign.kill();
    let _ = campaign.wait();

    // Auth: users and roles through the proxy, then a token carried through it.
    ok(etcdctl(&p, &["user", "add", "root:rootpw"]));
    ok(etcdctl(&p, &["role", "add", "reader"]));
    ok(etcdctl(
        &p,
        &["role", "grant-permission", "reader", "read", "k1"],
    ));
    ok(etcdctl(&p, &["user", "add", "alice:alicepw"]));
    ok(etcdctl(&p, &["user", "grant-role", "alice", "reader"]));
    ok(etcdctl(&p, &["auth", "enable"]));
    assert_eq!(
        ok(etcdctl(&p, &["--user", "alice:alicepw", "get", "k1"])),
        "k1\nv1\n"
    );
    let denied = common::fails(etcdctl(&p, &["--user", "alice:alicepw", "put", "k1", "x"]));
    assert!(denied.contains("etcdserver: permission denied"), "{denied}");
    // A watcher of a range the user may not read is refused, as by the member.
    let denied = common::fails(etcdctl(&p, &["--user", "alice:alicepw", "watch", "secret"]));
    assert!(denied.contains("permission denied"), "{denied}");
    ok(etcdctl(&p, &["--user", "root:rootpw", "auth", "disable"]));
    assert!(
        proxy.log().contains("grpc-proxy serving"),
        "{}",
        proxy.log()
    );
}

#[test]
fn watchers_of_one_key_are_one_watcher_on_the_member_and_progress_passes_through() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let proxy = Proxy::start(&server.endpoint(), dir.path(), &[]);
    runtime().block_on(async {
        let connections = [
            channel(&proxy.endpoint()).await,
            channel(&proxy.endpoint()).await,
        ];
        let mut watches = Vec::new();
        for i in 0..200 {
            watches.push(OneWatch::open(connections[i % 2].clone(), b"shared", 0).await);
        }
        // The member holds one watcher for them (and one for the proxy's read cache).
        let member_watchers = metric(server.client_port, "etcd_debugging_mvcc_watcher_total");
        assert!(
            member_watchers <= 2.0,
            "the member holds {member_watchers} watchers"
        );
        assert_eq!(
            proxy.metric("etcd_grpc_proxy_watchers_coalescing_total"),
            199.0
        );
        let direct = channel(&server.endpoint()).await;
        let mut revisions = Vec::new();
        for i in 0..50 {
            revisions.push(put(direct.clone(), b"shared", format!("v{i}").as_bytes()).await);
        }
        for watch in &mut watches {
            assert_eq!(watch.revisions(50).await, revisions);
        }
        assert!(proxy.metric("etcd_grpc_proxy_events_coalescing_total") >= 199.0 * 50.0);

        // A watcher from an old revision catches up on its own, then joins the others.
        let mut late = OneWatch::open(connections[0].clone(), b"shared", revisions[10]).await;
        assert_eq!(late.revisions(40).await, revisions[10..].to_vec());
        wait_until("the late watcher joins", Duration::from_secs(10), || {
            proxy.metric("quorumkv_grpc_proxy_upstream_watchers") == 1.0
        });
        let next = put(direct.clone(), b"shared", b"after").await;
        assert_eq!(late.revisions(1).await, vec![next]);
        assert_eq!(watches[0].revisions(1).await, vec![next]);

        // RequestProgress through the proxy: a revision no older than everything delivered.
        late.ask_progress().await;
        assert!(late.progress().await >= next);

        // Closing the client streams closes the upstream watcher.
        drop(watches);
        drop(late);
        wait_until(
            "the upstream watcher is gone",
            Duration::from_secs(10),
            || proxy.metric("quorumkv_grpc_proxy_upstream_watchers") == 0.0,
        );
    });
}

#[test]
fn watchers_of_distinct_keys_under_one_prefix_are_a_few_watchers_on_the_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let proxy = Proxy::start(&server.endpoint(), dir.path(), &[]);
    runtime().block_on(async {
        let connections = [
            channel(&proxy.endpoint()).await,
            channel(&proxy.endpoint()).await,
            channel(&proxy.endpoint()).await,
        ];
        let pods = 300;
        let key = |i: usize| format!("/registry/pods/default/pod-{i:05}").into_bytes();
        let mut watches = Vec::new();
        for i in 0..pods {
            watches.push(OneWatch::open(connections[i % 3].clone(), &key(i), 0).await);
        }
        // The first keys have an upstream watcher each; the rest share one of the prefix
        // (and the read cache has its own).
        let member_watchers = metric(server.client_port, "etcd_debugging_mvcc_watcher_total");
        assert!(
            member_watchers <= 16.0,
            "the member holds {member_watchers} watchers"
        );
        // Every pod is written twice, in a shuffled order: each watcher gets its own key's two
        // events, and nothing of the others'.
        let direct = channel(&server.endpoint()).await;
        let mut expected = vec![Vec::new(); pods];
        for round in 0..2 {
            for step in 0..pods {
                let i = (step * 7 + round * 13) % pods;
                expected[i].push(put(direct.clone(), &key(i), b"running").await);
            }
        }
        for (i, watch) in watches.iter_mut().enumerate() {
            assert_eq!(watch.revisions(2).await, expected[i], "pod {i}");
        }
        // Nothing more is queued for any of them: a last write to pod 0 is the next event of
        // pod 0's watcher, and pod 1's next is its own.
        let last = put(direct.clone(), &key(0), b"done").await;
        assert_eq!(watches[0].revisions(1).await, vec![last]);
        let last1 = put(direct.clone(), &key(1), b"done").await;
        assert_eq!(watches[1].revisions(1).await, vec![last1]);
    });
}

#[test]
fn a_client_that_stops_reading_is_parked_and_later_gets_every_event_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let proxy = Proxy::start(&server.endpoint(), dir.path(), &[]);
    runtime().block_on(async {
        let to_proxy = channel(&proxy.endpoint()).await;
        let mut reader = OneWatch::open(to_proxy.clone(), b"busy", 0).await;
        let mut slow = OneWatch::open(channel(&proxy.endpoint()).await, b"busy", 0).await;
        let direct = channel(&server.endpoint()).await;
        // 8 KiB values: the slow client's HTTP/2 window and its queue fill long before the end.
        let value = vec![b'x'; 8 << 10];
        let count = 2_500;
        let mut revisions = Vec::new();
        let reading = tokio::spawn(async move { reader.revisions(count).await });
        for _ in 0..count {
            revisions.push(put(direct.clone(), b"busy", &value).await);
        }
        // The reading client got everything while the other did not read.
        assert_eq!(reading.await.expect("reader"), revisions);
        assert!(
            proxy.metric("quorumkv_grpc_proxy_slow_watchers_total") >= 1.0,
            "the slow watcher was never parked"
        );
        // It asks for progress before reading: the answer comes after every event up to its
        // revision (`revisions` checks one met between events).
        slow.ask_progress().await;
        // The slow one, read now, gets every event once, in order.
        assert_eq!(slow.revisions(count).await, revisions);
        if slow.progress_seen.is_empty() {
            let last = *revisions.last().expect("revisions");
            assert!(slow.progress().await >= last);
        }
    });
}

#[test]
fn serializable_reads_come_from_the_cache_and_never_go_back_in_revision() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let proxy = Proxy::start(&server.endpoint(), dir.path(), &[]);
    runtime().block_on(async {
        let to_proxy = channel(&proxy.endpoint()).await;
        let direct = channel(&server.endpoint()).await;
        put(direct.clone(), b"cfg", b"one").await;
        let get = |channel: Channel| async move {
            KvClient::new(channel)
                .range(RangeRequest {
                    key: b"cfg".to_vec(),
                    serializable: true,
                    ..Default::default()
                })
                .await
                .expect("range")
                .into_inner()
        };
        // Wait until the cache follows the cluster, then read again: a hit.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while proxy.metric("etcd_grpc_proxy_cache_hits_total") < 1.0 {
            assert!(tokio::time::Instant::now() < deadline, "no cache hit");
            get(to_proxy.clone()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let first = get(to_proxy.clone()).await;
        assert_eq!(first.kvs[0].value, b"one");
        // A write elsewhere: the cache drops the answer, and a read soon has the new value.
        let written = put(direct.clone(), b"cfg", b"two").await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while get(to_proxy.clone()).await.kvs[0].value != b"two" {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the old value stays"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A write through the proxy: the very next read has it (its revision was seen).
        let mut last_revision = 0;
        for i in 0..200 {
            let value = format!("v{i}");
            let revision = put(to_proxy.clone(), b"cfg", value.as_bytes()).await;
            let read = get(to_proxy.clone()).await;
            assert_eq!(read.kvs[0].value, value.as_bytes());
            let seen = read.header.expect("header").revision;
            assert!(seen >= revision && seen >= last_revision && seen > written);
            last_revision = seen;
        }
    });
}

#[test]
fn registered_proxies_are_listed_as_etcd_3_4_lists_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let prefix = [
        "--resolver-prefix=___grpc_proxy_endpoint",
        "--resolver-ttl=60",
    ];
    let ours = Proxy::start(&server.endpoint(), dir.path(), &prefix);
    let key_of = |proxy: &Proxy| format!("___grpc_proxy_endpoint/127.0.0.1:{}", proxy.port);
    wait_until("the proxy registers", Duration::from_secs(10), || {
        ok(etcdctl(
            &server.endpoint(),
            &["get", &key_of(&ours), "--print-value-only"],
        ))
        .contains("Addr")
    });
    let value = ok(etcdctl(
        &server.endpoint(),
        &["get", &key_of(&ours), "--print-value-only"],
    ));
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert_eq!(
        value.trim(),
        format!(
            r#"{{"Op":0,"Addr":"127.0.0.1:{}","Metadata":"{{\"name\":\"{}\"}}"}}"#,
            ours.port,
            hostname.trim()
        )
    );
    let listed = ok(etcdctl(&ours.endpoint(), &["member", "list", "-w", "json"]));
    assert_eq!(
        listed.trim(),
        format!(
            r#"{{"members":[{{"name":"{}","clientURLs":["127.0.0.1:{}"]}}]}}"#,
            hostname.trim(),
            ours.port
        )
    );
    // etcd 3.4's proxy, registered beside ours on the same cluster: its answer has the same
    // shape (no header, no ID), listing both.
    if Command::new("etcd").arg("--version").output().is_ok() {
        let theirs = Proxy::start_as("etcd", &server.endpoint(), dir.path(), &prefix);
        wait_until("both are listed", Duration::from_secs(15), || {
            let a = ok(etcdctl(&ours.endpoint(), &["member", "list", "-w", "json"]));
            let b = ok(etcdctl(
                &theirs.endpoint(),
                &["member", "list", "-w", "json"],
            ));
            let a: serde_json::Value = serde_json::from_str(&a).expect("json");
            let b: serde_json::Value = serde_json::from_str(&b).expect("json");
            a["members"].as_array().is_some_and(|m| m.len() == 2) && a == b
        });
    }
}

#[test]
fn failover_moves_every_watch_to_the_next_member_with_no_event_lost_or_repeated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers = start_cluster(dir.path(), &["a", "b", "c"], &[]);
    let endpoints: Vec<String> = servers.iter().map(|s| s.endpoint()).collect();
    // The member the proxy uses (the first) must not lead: its death then costs the cluster no
    // election, and the time the watchers take to resume is the proxy's alone.
    common::lead_elsewhere(&servers, 0, 1);
    let proxy = Proxy::start(&endpoints.join(","), dir.path(), &[]);
    runtime().block_on(async {
        // 1,000 watchers, one stream each, over 4 connections.
        let mut connections = Vec::new();
        for _ in 0..4 {
            connections.push(channel(&proxy.endpoint()).await);
        }
        let key_of = |i: usize| if i.is_multiple_of(2) { &b"even"[..] } else { &b"odd"[..] };
        let mut watches = Vec::new();
        for i in 0..1000 {
            let to_proxy = connections[i % connections.len()].clone();
            let watch = OneWatch::open(to_proxy, key_of(i), 0).await;
            watches.push((key_of(i), watch, Vec::new()));
        }
        // Writes go straight to the second member, before and after the first one dies (a
        // write the election interrupts is made again).
        let writer = channel(&endpoints[1]).await;
        for i in 0..=40 {
            put_retrying(writer.clone(), key_of(i), format!("{i}").as_bytes()).await;
        }
        for (key, watch, got) in &mut watches {
            let n = if *key == b"even" { 21 } else { 20 };
            got.extend(watch.revisions(n).await);
        }
        // Every watcher is current and idle. The proxy's endpoint in use (the first) dies:
        // the next write of each key must reach all 1,000 within 2 s of the kill.
        let killed = Instant::now();
        servers[0].kill9();
        let even = put_retrying(writer.clone(), b"even", b"after the kill").await;
        let odd = put_retrying(writer.clone(), b"odd", b"after the kill").await;
        let committed = killed.elapsed();
        for (key, watch, got) in &mut watches {
            let next = watch.revisions(1).await;
            assert_eq!(next, vec![if *key == b"even" { even } else { odd }]);
            got.extend(next);
        }
        let delivered = killed.elapsed();
        eprintln!(
            "failover under 1000 watchers: the writes after the kill committed {committed:?} after it, and reached every watcher {delivered:?} after it"
        );
        assert!(
            delivered < Duration::from_secs(2),
            "watchers resumed {delivered:?} after the kill (the writes were committed at {committed:?})"
        );
        for i in 41..100 {
            put_retrying(writer.clone(), key_of(i), format!("{i}").as_bytes()).await;
        }
        // The truth: each key's whole history, read from a surviving member.
        for key in [&b"even"[..], &b"odd"[..]] {
            let expected = history(writer.clone(), key).await;
            assert!(expected.len() >= 50, "{expected:?}");
            for (k, watch, got) in watches.iter_mut().filter(|(k, _, _)| *k == key) {
                let more = expected.len().saturating_sub(got.len());
                got.extend(watch.revisions(more).await);
                assert_eq!(
                    *got,
                    expected,
                    "a watcher of {:?}",
                    String::from_utf8_lossy(k)
                );
            }
        }
    });
    assert!(
        proxy
            .log()
            .contains("an endpoint failed; moving to the next"),
        "{}",
        proxy.log()
    );
    assert!(proxy.metric("quorumkv_grpc_proxy_watch_reconnects_total") >= 1.0);
}

#[test]
fn many_keep_alive_streams_of_one_lease_are_answered_through_one_upstream_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let proxy = Proxy::start(&server.endpoint(), dir.path(), &[]);
    runtime().block_on(async {
        let to_proxy = channel(&proxy.endpoint()).await;
        let lease = LeaseClient::new(to_proxy.clone())
            .lease_grant(LeaseGrantRequest { ttl: 30, id: 0 })
            .await
            .expect("grant")
            .into_inner()
            .id;
        let mut streams = Vec::new();
        for _ in 0..50 {
            let (tx, rx) = mpsc::channel(4);
            let answers = LeaseClient::new(to_proxy.clone())
                .lease_keep_alive(ReceiverStream::new(rx))
                .await
                .expect("keep-alive stream")
                .into_inner();
            streams.push((tx, answers));
        }
        for _ in 0..3 {
            for (tx, _) in &streams {
                tx.send(LeaseKeepAliveRequest { id: lease })
                    .await
                    .expect("send");
            }
            for (_, answers) in &mut streams {
                let answer = answers.message().await.expect("stream").expect("an answer");
                assert_eq!(answer.id, lease);
                assert!(answer.ttl > 0 && answer.ttl <= 30, "{answer:?}");
            }
        }
        // 150 keep-alives sent at once, 50 at a time: most of them shared an upstream one.
        assert!(
            proxy.metric("quorumkv_grpc_proxy_keepalives_coalesced_total") >= 1.0,
            "no keep-alive was coalesced"
        );
        // An unknown lease gets the member's own answer.
        let unknown = |channel: Channel| async move {
            let (tx, rx) = mpsc::channel(1);
            tx.send(LeaseKeepAliveRequest { id: 12345 })
                .await
                .expect("send");
            let mut answers = LeaseClient::new(channel)
                .lease_keep_alive(ReceiverStream::new(rx))
                .await
                .expect("stream")
                .into_inner();
            answers
                .message()
                .await
                .map(|a| a.map(|a| (a.id, a.ttl)))
                .map_err(|s| (s.code(), s.message().to_string()))
        };
        let direct = unknown(channel(&server.endpoint()).await).await;
        assert_eq!(unknown(to_proxy).await, direct);
    });
}

/// The same etcdctl session through a proxy with `--namespace`: what it prints.
fn namespaced_session(proxy: &Proxy) -> Vec<String> {
    let p = proxy.endpoint();
    let mut out = Vec::new();
    let mut run = |args: &[&str]| out.push(ok(etcdctl(&p, args)));
    run(&["put", "a", "1"]);
    run(&["put", "b", "2"]);
    run(&["put", "c/x", "3", "--prev-kv"]);
    run(&["put", "c/x", "4", "--prev-kv"]);
    run(&["get", "", "--from-key"]);
    run(&["get", "c", "--prefix"]);
    run(&["get", "a", "c"]);
    run(&["del", "b", "--prev-kv"]);
    run(&["get", "", "--prefix", "--keys-only"]);
    let mut out_txn = ok(common::etcdctl_stdin(
        &p,
        &["txn"],
        "value(\"a\") = \"1\"\n\nput d 5\nget a\n\nput e 6\n\n",
    ));
    out_txn.push_str(&ok(etcdctl(&p, &["get", "d"])));
    out.push(out_txn);
    let granted = ok(etcdctl(&p, &["lease", "grant", "100"]));
    let lease = granted
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    out.push(ok(etcdctl(&p, &["put", "leased", "v", "--lease", &lease])));
    let ttl = ok(etcdctl(&p, &["lease", "timetolive", &lease, "--keys"]));
    out.push(ttl.split("attached keys").nth(1).unwrap_or("").to_string());
    // A watch of a prefix in the namespace sees its events with the namespace taken off.
    let mut watch = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([&format!("--endpoints={p}"), "watch", "w", "--prefix"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl watch");
    std::thread::sleep(Duration::from_millis(500));
    run_put(&p, "w1", "x");
    std::thread::sleep(Duration::from_millis(500));
    let _ = watch.kill();
    let watched = watch.wait_with_output().expect("watch output");
    out.push(String::from_utf8_lossy(&watched.stdout).into_owned());
    // The Lock RPC: the key it answers, its lease id taken off (the name, then a '/').
    let lease_id = i64::from_str_radix(&lease, 16).expect("hex lease id");
    let key = runtime().block_on(async {
        let mut lock = LockClient::new(channel(&p).await);
        let answer = lock
            .lock(LockRequest {
                name: b"L".to_vec(),
                lease: lease_id,
            })
            .await
            .expect("lock")
            .into_inner();
        answer.key
    });
    let key = String::from_utf8_lossy(&key).into_owned();
    out.push(
        key.rsplit_once('/')
            .map_or(key.clone(), |(name, _)| name.to_string()),
    );
    // Lets the lock go (the other proxy's session takes the same lock: Lock is not namespaced).
    ok(etcdctl(&p, &["lease", "revoke", &lease]));
    out
}

fn run_put(endpoint: &str, key: &str, value: &str) {
    ok(etcdctl(endpoint, &["put", key, value]));
}

#[test]
fn a_namespace_shows_clients_one_part_of_the_key_space_as_etcd_3_4_proxy_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let m = server.endpoint();
    run_put(&m, "outside", "o");
    let ours = Proxy::start(&server.endpoint(), dir.path(), &["--namespace=ours/"]);
    let got = namespaced_session(&ours);
    assert_eq!(got[4], "a\n1\nb\n2\nc/x\n4\n", "{got:?}");
    assert_eq!(got[3], "OK\nc/x\n3\n", "{got:?}");
    assert!(got[7].contains("b\n2"), "{got:?}");
    assert!(got[12].contains("PUT\nw1\nx"), "{got:?}");
    assert_eq!(got[11], "([leased])\n", "{got:?}");
    // As etcd 3.4's proxy: the Lock RPC's name is not put in the namespace.
    assert_eq!(got[13], "L", "{got:?}");
    // On the member, the keys are under the namespace; the key outside it was never shown.
    let held = ok(etcdctl(&m, &["get", "ours/", "--prefix", "--keys-only"]));
    assert!(
        held.contains("ours/a") && held.contains("ours/c/x"),
        "{held}"
    );
    assert!(!got.concat().contains("outside"), "{got:?}");
    // etcd 3.4's own proxy, with its own namespace on the same member, prints the same.
    if Command::new("etcd").arg("--version").output().is_ok() {
        let etcds = Proxy::start_as(
            "etcd",
            &server.endpoint(),
            dir.path(),
            &["--namespace=etcd/"],
        );
        let reference = namespaced_session(&etcds);
        assert_eq!(got, reference);
    } else {
        eprintln!("etcd is not installed (Debian's etcd-server): the comparison with etcd 3.4's proxy is skipped");
    }
}
