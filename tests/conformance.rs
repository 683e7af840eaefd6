//! The differential conformance harness (issue 25, part A): the same seeded, randomized KV and
//! lease requests to etcd 3.4 (Debian's `etcd-server`) and to quorumkv, each a fresh single
//! member, and their answers compared field by field — the headers too (cluster and member IDs
//! mapped to "this server's", raft_term left out), and for errors the gRPC code and message. A
//! quarter of them go through each one's JSON gateway, where the HTTP status and the JSON answer
//! are compared.
//!
//! `ci/conformance [--seed N] [--requests N] [--minutes N]` runs it at other seeds or for longer
//! (through `CONFORMANCE_SEED`, `CONFORMANCE_REQUESTS`, `CONFORMANCE_MINUTES`). Where etcd is
//! not installed the comparison is skipped, and says so.

mod common;
#[path = "conformance/progress.rs"]
mod progress;
#[path = "conformance/services.rs"]
mod services;

use std::time::{Duration, Instant};

use quorumkv::proto::etcdserverpb::compare::{CompareTarget, TargetUnion};
use quorumkv::proto::etcdserverpb::kv_client::KvClient;
use quorumkv::proto::etcdserverpb::lease_client::LeaseClient;
use quorumkv::proto::etcdserverpb::request_op::Request as Op;
use quorumkv::proto::etcdserverpb::response_op::Response as OpAnswer;
use quorumkv::proto::etcdserverpb::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use common::Etcd;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// One request of the KV service.
#[derive(Clone, Debug)]
enum Request {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
    Grant(LeaseGrantRequest),
    Revoke(LeaseRevokeRequest),
    TimeToLive(LeaseTimeToLiveRequest),
    Leases,
}

/// An answer: the response, normalized, or the status's code and message.
type Answer = Result<String, (tonic::Code, String)>;

/// The IDs a server names itself by, mapped to one name for both servers.
#[derive(Default, Clone, Copy)]
struct Ids {
    cluster_id: u64,
    member_id: u64,
}

impl Ids {
    fn map(&self, header: &mut Option<ResponseHeader>) {
        if let Some(h) = header {
            // The server's own IDs as 1, none as 0, any other as itself.
            if h.cluster_id == self.cluster_id {
                h.cluster_id = 1;
            }
            if h.member_id == self.member_id {
                h.member_id = 1;
            }
            h.raft_term = 0;
        }
    }

    fn txn(&self, txn: &mut TxnResponse) {
        self.map(&mut txn.header);
        for op in &mut txn.responses {
            match &mut op.response {
                Some(OpAnswer::ResponseRange(r)) => self.map(&mut r.header),
                Some(OpAnswer::ResponsePut(r)) => self.map(&mut r.header),
                Some(OpAnswer::ResponseDeleteRange(r)) => self.map(&mut r.header),
                Some(OpAnswer::ResponseTxn(t)) => self.txn(t),
                None => {}
            }
        }
    }
}

/// One server's clients.
struct Clients {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    channel: Channel,
    ids: Ids,
}

/// One keep-alive on a stream of its own, and its one answer (the TTL granted; 0 for a lease
/// that does not exist).
async fn keep_alive(to: &mut Clients, id: i64) -> Answer {
    let status = |s: tonic::Status| (s.code(), s.message().to_string());
    let (requests, inbound) = tokio::sync::mpsc::unbounded_channel();
    let _ = requests.send(LeaseKeepAliveRequest { id });
    let mut answers = to
        .lease
        .lease_keep_alive(tokio_stream_of(inbound))
        .await
        .map_err(status)?
        .into_inner();
    match tokio::time::timeout(Duration::from_secs(3), answers.message()).await {
        Err(_) => Ok("no answer within 3 s".into()),
        Ok(Err(e)) => Err(status(e)),
        Ok(Ok(None)) => Ok("the stream ended".into()),
        Ok(Ok(Some(mut answer))) => {
            to.ids.map(&mut answer.header);
            Ok(format!("{answer:?}"))
        }
    }
}

/// A watch on its own stream: its created (or canceled) answer, the events it is sent from its
/// start revision (answers' boundaries left out), and its answer to a `RequestProgress` sent
/// once it has caught up.
async fn watch(to: &Clients, create: WatchCreateRequest) -> Answer {
    use quorumkv::proto::etcdserverpb::watch_client::WatchClient;
    use quorumkv::proto::etcdserverpb::watch_request::RequestUnion;
    let status = |s: tonic::Status| (s.code(), s.message().to_string());
    let (requests, inbound) = tokio::sync::mpsc::unbounded_channel();
    let _ = requests.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(create)),
    });
    let mut answers = WatchClient::new(to.channel.clone())
        .watch(tokio_stream_of(inbound))
        .await
        .map_err(status)?
        .into_inner();
    let mut seen = Vec::new();
    let mut events = Vec::new();
    loop {
        let answer = match tokio::time::timeout(Duration::from_secs(3), answers.message()).await {
            Err(_) => {
                seen.push("no answer within 3 s".to_string());
                break;
            }
            Ok(Err(e)) => return Err(status(e)),
            Ok(Ok(None)) => {
                seen.push("the stream ended".to_string());
                break;
            }
            Ok(Ok(Some(answer))) => answer,
        };
        let mut header = answer.header;
        to.ids.map(&mut header);
        let revision = header.map_or(0, |h| h.revision);
        let had_events = !answer.events.is_empty();
        events.extend(answer.events);
        if answer.created || answer.canceled || answer.compact_revision != 0 {
            seen.push(format!(
                "id={} created={} canceled={} compact_revision={} reason={:?} revision={revision}",
                answer.watch_id,
                answer.created,
                answer.canceled,
                answer.compact_revision,
                answer.cancel_reason
            ));
            if answer.canceled {
                break;
            }
            if answer.created {
                // etcd 3.4 answers a progress request only once its watchers have caught up.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = requests.send(WatchRequest {
                    request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
                });
            }
        } else if !had_events {
            seen.push(format!(
                "progress id={} revision={revision}",
                answer.watch_id
            ));
            break;
        }
    }
    Ok(format!("{seen:?} events={events:?}"))
}

async fn send(to: &mut Clients, request: &Request) -> Answer {
    let status = |s: tonic::Status| (s.code(), s.message().to_string());
    let ids = to.ids;
    macro_rules! call {
        ($client:ident, $method:ident, $request:expr, |$a:ident| $fix:expr) => {
            to.$client.$method($request).await.map_err(status).map(|a| {
                let mut $a = a.into_inner();
                $fix;
                format!("{:?}", $a)
            })
        };
    }
    match request.clone() {
        Request::Range(r) => call!(kv, range, r, |a| ids.map(&mut a.header)),
        Request::Put(r) => call!(kv, put, r, |a| ids.map(&mut a.header)),
        Request::DeleteRange(r) => call!(kv, delete_range, r, |a| ids.map(&mut a.header)),
        Request::Txn(r) => call!(kv, txn, r, |a| ids.txn(&mut a)),
        Request::Compact(r) => call!(kv, compact, r, |a| ids.map(&mut a.header)),
        Request::Grant(r) => call!(lease, lease_grant, r, |a| ids.map(&mut a.header)),
        Request::Revoke(r) => call!(lease, lease_revoke, r, |a| ids.map(&mut a.header)),
        Request::TimeToLive(r) => call!(lease, lease_time_to_live, r, |a| {
            ids.map(&mut a.header);
            // The time left depends on when it was asked: only whether the lease is alive.
            a.ttl = a.ttl.clamp(-1, 0);
            // etcd lists a lease's keys in no particular order.
            a.keys.sort();
        }),
        Request::Leases => call!(lease, lease_leases, LeaseLeasesRequest {}, |a| {
            ids.map(&mut a.header);
            a.leases.sort_by_key(|l| l.id);
        }),
    }
}

/// `request` through the JSON gateway (`POST /v3/...`, proto3 JSON): the HTTP status and the
/// answer, normalized as `send` normalizes (IDs in headers mapped, raft_term left out, the time
/// left of a lease only alive or not, unordered lists sorted).
fn send_json(port: u16, ids: Ids, request: &Request) -> Answer {
    let json = |r: &dyn erased::Json| r.json();
    let (path, body) = match request {
        Request::Range(r) => ("/v3/kv/range", json(r)),
        Request::Put(r) => ("/v3/kv/put", json(r)),
        Request::DeleteRange(r) => ("/v3/kv/deleterange", json(r)),
        Request::Txn(r) => ("/v3/kv/txn", json(r)),
        Request::Compact(r) => ("/v3/kv/compaction", json(r)),
        Request::Grant(r) => ("/v3/lease/grant", json(r)),
        Request::Revoke(r) => ("/v3/lease/revoke", json(r)),
        Request::TimeToLive(r) => ("/v3/lease/timetolive", json(r)),
        Request::Leases => ("/v3/lease/leases", "{}".to_string()),
    };
    let (status, mut answer) = common::http_post(port, path, &body, "");
    assert!(
        !answer.is_null(),
        "{path} on port {port}: HTTP {status}, not JSON"
    );
    normalize_json(&mut answer, ids);
    if let Some(ttl) = answer.get_mut("TTL") {
        let alive = ttl
            .as_str()
            .and_then(|t| t.parse::<i64>().ok())
            .unwrap_or(0)
            >= 0;
        *ttl = serde_json::Value::from(if alive { "alive" } else { "-1" });
    }
    for list in ["keys", "leases"] {
        if let Some(serde_json::Value::Array(items)) = answer.get_mut(list) {
            items.sort_by_key(|v| v.to_string());
        }
    }
    Ok(format!("HTTP {status} {answer}"))
}

/// Every header in `value`: the server's own IDs as "own", raft_term left out.
fn normalize_json(value: &mut serde_json::Value, ids: Ids) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Object(header)) = map.get_mut("header") {
                for (name, own) in [("cluster_id", ids.cluster_id), ("member_id", ids.member_id)] {
                    if header.get(name).and_then(|v| v.as_str()) == Some(&own.to_string()) {
                        header.insert(name.into(), "own".into());
                    }
                }
                header.remove("raft_term");
            }
            for item in map.values_mut() {
                normalize_json(item, ids);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                normalize_json(item, ids);
            }
        }
        _ => {}
    }
}

/// Requests as proto3 JSON, as the gateway reads them.
mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }

    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).expect("a request serializes")
        }
    }
}

/// The server's own cluster and member IDs (from an answer's header).
async fn ids_of(client: &mut KvClient<Channel>) -> Ids {
    let header = client
        .range(RangeRequest {
            key: b"-".to_vec(),
            ..Default::default()
        })
        .await
        .expect("a first range")
        .into_inner()
        .header
        .expect("a header");
    Ids {
        cluster_id: header.cluster_id,
        member_id: header.member_id,
    }
}

/// Random requests over a small key space (so that ranges, compares and deletes meet keys that
/// exist), with every option of each.
struct Generator {
    rng: StdRng,
    /// The newest revision seen (from etcd's answers).
    revision: i64,
    /// The newest compaction asked for...
    compacted: i64,
    /// ...and whether it was physical (etcd answered once its backend had dropped the
    /// revisions), or not (etcd drops them in the background after answering).
    physical: bool,
}

const LEASES: &[i64] = &[0x100, 0x101, 0x102, 0x103, 12345];

const KEYS: &[&[u8]] = &[
    b"a", b"a/1", b"a/2", b"a/3", b"b", b"b/x", b"c", b"k1", b"k2", b"z",
];

impl Generator {
    fn key(&mut self) -> Vec<u8> {
        KEYS[self.rng.gen_range(0..KEYS.len())].to_vec()
    }

    fn range_end(&mut self, key: &[u8]) -> Vec<u8> {
        match self.rng.gen_range(0..10) {
            0..=4 => Vec::new(),
            5..=6 => quorumkv::server::prefix_end(key),
            7 => vec![0],
            _ => self.key(),
        }
    }

    fn revision_or_zero(&mut self) -> i64 {
        if self.rng.gen_bool(0.8) {
            0
        } else {
            self.rng.gen_range(0..=self.revision + 2)
        }
    }

    fn value(&mut self) -> Vec<u8> {
        let n = self.rng.gen_range(0..6);
        (0..n).map(|_| self.rng.gen_range(b'a'..=b'e')).collect()
    }

    /// A lease ID of the pool (granted or not, revoked or not, on both alike); IDs are given
    /// in the grants, as etcd picks its own at random.
    fn lease(&mut self) -> i64 {
        LEASES[self.rng.gen_range(0..LEASES.len())]
    }

    fn range(&mut self) -> RangeRequest {
        let key = self.key();
        let small = |g: &mut Self| {
            if g.rng.gen_bool(0.85) {
                0
            } else {
                g.rng.gen_range(0..=g.revision + 1)
            }
        };
        RangeRequest {
            range_end: self.range_end(&key),
            key,
            limit: [0, 0, 0, 1, 2, 5][self.rng.gen_range(0..6)],
            revision: self.revision_or_zero(),
            sort_order: self.rng.gen_range(0..=2),
            sort_target: self.rng.gen_range(0..=4),
            serializable: self.rng.gen_bool(0.2),
            keys_only: self.rng.gen_bool(0.2),
            count_only: self.rng.gen_bool(0.1),
            min_mod_revision: small(self),
            max_mod_revision: small(self),
            min_create_revision: small(self),
            max_create_revision: small(self),
        }
    }

    fn put(&mut self) -> PutRequest {
        let ignore_value = self.rng.gen_bool(0.1);
        PutRequest {
            key: if self.rng.gen_bool(0.02) {
                Vec::new()
            } else {
                self.key()
            },
            value: if ignore_value && self.rng.gen_bool(0.7) {
                Vec::new()
            } else {
                self.value()
            },
            lease: if self.rng.gen_bool(0.15) {
                self.lease()
            } else {
                0
            },
            prev_kv: self.rng.gen_bool(0.4),
            ignore_value,
            ignore_lease: self.rng.gen_bool(0.1),
        }
    }

    fn delete(&mut self) -> DeleteRangeRequest {
        let key = self.key();
        DeleteRangeRequest {
            range_end: self.range_end(&key),
            key,
            prev_kv: self.rng.gen_bool(0.5),
        }
    }

    fn compare(&mut self) -> Compare {
        let key = self.key();
        let target = self.rng.gen_range(0..=4);
        let near = |g: &mut Self| g.rng.gen_range(0..=g.revision + 1);
        let target_union = match target {
            t if t == CompareTarget::Version as i32 => {
                TargetUnion::Version(self.rng.gen_range(0..4))
            }
            t if t == CompareTarget::Create as i32 => TargetUnion::CreateRevision(near(self)),
            t if t == CompareTarget::Mod as i32 => TargetUnion::ModRevision(near(self)),
            t if t == CompareTarget::Value as i32 => TargetUnion::Value(self.value()),
            _ => TargetUnion::Lease(if self.rng.gen_bool(0.6) {
                0
            } else {
                self.lease()
            }),
        };
        Compare {
            result: self.rng.gen_range(0..=3),
            target,
            range_end: if self.rng.gen_bool(0.2) {
                self.range_end(&key)
            } else {
                Vec::new()
            },
            key,
            target_union: Some(target_union),
        }
    }

    fn op(&mut self, depth: u32) -> RequestOp {
        let request = match self.rng.gen_range(0..10) {
            0..=2 => Op::RequestRange(self.range()),
            3..=6 => Op::RequestPut(self.put()),
            7..=8 => Op::RequestDeleteRange(self.delete()),
            _ if depth == 0 => Op::RequestTxn(self.txn(1)),
            _ => Op::RequestPut(self.put()),
        };
        RequestOp {
            request: Some(request),
        }
    }

    fn txn(&mut self, depth: u32) -> TxnRequest {
        let compares = self.rng.gen_range(0..=3);
        let (success, failure) = (self.rng.gen_range(0..=3), self.rng.gen_range(0..=2));
        let mut txn = TxnRequest {
            compare: (0..compares).map(|_| self.compare()).collect(),
            success: (0..success).map(|_| self.op(depth)).collect(),
            failure: (0..failure).map(|_| self.op(depth)).collect(),
        };
        if depth == 0 && deletes(&txn) {
            // A put that keeps the value or lease of a key the same transaction deleted
            // crashes etcd 3.4.23 (its check passes before the delete, the put then fails
            // mid-transaction and the member panics): not sent (README, Compatibility).
            unkeep(&mut txn);
        }
        txn
    }

    /// A watch with every option: a key or a range, from now or from a revision (compacted
    /// ones too), filters, previous values, progress notification, fragments.
    fn watch_create(&mut self) -> WatchCreateRequest {
        let key = self.key();
        let range_end = self.range_end(&key);
        let mut start_revision = match self.rng.gen_range(0..4) {
            0 => 0,
            1 => self.rng.gen_range(0..=self.compacted.max(1)),
            _ => self
                .rng
                .gen_range(self.compacted.max(1)..=self.revision + 1),
        };
        // A watch from the compacted revision itself, right after a compaction that was not
        // physical, gets from etcd the tombstones of that revision or not, by whether its
        // background deletion got to them first (seed 7 saw both). The next revision is
        // watched instead.
        if !self.physical && self.compacted > 0 && start_revision == self.compacted {
            start_revision += 1;
        }
        let filters = match self.rng.gen_range(0..4) {
            0 => vec![0],
            1 => vec![1],
            _ => vec![],
        };
        WatchCreateRequest {
            key,
            range_end,
            start_revision,
            progress_notify: self.rng.gen_bool(0.3),
            filters,
            prev_kv: self.rng.gen_bool(0.5),
            watch_id: 0,
            fragment: self.rng.gen_bool(0.3),
        }
    }

    fn next(&mut self) -> Request {
        match self.rng.gen_range(0..100) {
            0..=29 => Request::Range(self.range()),
            30..=59 => Request::Put(self.put()),
            60..=71 => Request::DeleteRange(self.delete()),
            72..=89 => Request::Txn(self.txn(0)),
            90..=92 => Request::Grant(LeaseGrantRequest {
                // Long enough not to expire within a run, even a long one (each server expires
                // a lease by its own clock, so they would not expire it between the same two
                // requests); the last is beyond etcd's largest TTL.
                ttl: [86_400, 172_800, 604_800, 9_000_000_001][self.rng.gen_range(0..4)],
                id: self.lease(),
            }),
            93..=94 => Request::Revoke(LeaseRevokeRequest { id: self.lease() }),
            95..=96 => Request::TimeToLive(LeaseTimeToLiveRequest {
                id: self.lease(),
                keys: self.rng.gen_bool(0.5),
            }),
            97..=98 => Request::Leases,
            _ => {
                let revision = self
                    .rng
                    .gen_range(self.compacted.max(1)..=self.revision + 1);
                Request::Compact(CompactionRequest {
                    revision,
                    physical: self.rng.gen_bool(0.5),
                })
            }
        }
    }
}

/// Does a branch of `txn` (or of a transaction in it) delete?
fn deletes(txn: &TxnRequest) -> bool {
    txn.success
        .iter()
        .chain(&txn.failure)
        .any(|op| match &op.request {
            Some(Op::RequestDeleteRange(_)) => true,
            Some(Op::RequestTxn(inner)) => deletes(inner),
            _ => false,
        })
}

/// Its puts, and its transactions' puts, keep no value or lease of before.
fn unkeep(txn: &mut TxnRequest) {
    for op in txn.success.iter_mut().chain(txn.failure.iter_mut()) {
        match &mut op.request {
            Some(Op::RequestPut(put)) => {
                put.ignore_value = false;
                put.ignore_lease = false;
            }
            Some(Op::RequestTxn(inner)) => unkeep(inner),
            _ => {}
        }
    }
}

/// etcd 3.4 and quorumkv, each a fresh single member started with `args` (and quorumkv named
/// as etcd names its member), in one temporary directory; `None`, said, where etcd is not
/// installed.
fn side_by_side(args: &[&str]) -> Option<(tempfile::TempDir, Etcd, common::Server)> {
    if !Etcd::available() {
        eprintln!("SKIPPED: etcd (Debian's etcd-server) is not installed; nothing to compare with");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start_with(dir.path(), args);
    let ours = common::Server::start(dir.path(), &[&["--name", "default"], args].concat());
    Some((dir, etcd, ours))
}

/// Sends `requests` random requests (or for `minutes`) of `seed` to both; the differences
/// (`None` where etcd is not installed).
fn differences(seed: u64, requests: usize, minutes: f64) -> Option<Vec<String>> {
    let (_dir, etcd, ours) = side_by_side(&[])?;
    let mut found = Vec::new();
    runtime().block_on(async {
        let connect = |endpoint: String| async move {
            let channel = Channel::from_shared(endpoint)
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
            let mut kv = KvClient::new(channel.clone());
            let ids = ids_of(&mut kv).await;
            Clients {
                kv,
                lease: LeaseClient::new(channel.clone()),
                channel,
                ids,
            }
        };
        let mut theirs = connect(etcd.endpoint()).await;
        let mut mine = connect(ours.endpoint()).await;
        let mut generator = Generator {
            rng: StdRng::seed_from_u64(seed),
            revision: 1,
            compacted: 0,
            physical: true,
        };
        // Watches come from a generator of their own, so that the KV and lease requests of a
        // seed stay what they were.
        let mut watches = Generator {
            rng: StdRng::seed_from_u64(seed ^ 0x5741_5443_4845_5321),
            revision: 1,
            compacted: 0,
            physical: true,
        };
        let deadline = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
        let mut sent = 0;
        // Every request and both answers, to follow a difference back to where the two parted.
        let trace = std::env::var_os("CONFORMANCE_TRACE").is_some();
        // What was sent and what etcd answered, by kind: what the run covered.
        let mut tally = std::collections::BTreeMap::new();
        while sent < requests || Instant::now() < deadline {
            if watches.rng.gen_bool(0.03) {
                watches.revision = generator.revision;
                watches.compacted = generator.compacted;
                watches.physical = generator.physical;
                let create = watches.watch_create();
                let expected = watch(&theirs, create.clone()).await;
                let got = watch(&mine, create.clone()).await;
                let outcome = match &expected {
                    Ok(answer) if answer.contains("canceled=true") => "canceled",
                    Ok(answer) if answer.contains("events=[]") => "no events",
                    Ok(_) => "events",
                    Err(_) => "error",
                };
                *tally
                    .entry(("Watch".to_string(), outcome.to_string()))
                    .or_insert(0usize) += 1;
                if trace {
                    eprintln!("watch: {create:?}\n  etcd 3.4: {expected:?}\n  quorumkv: {got:?}");
                }
                if expected != got {
                    found.push(format!(
                        "watch (seed {seed}): {create:?}\n  etcd 3.4: {expected:?}\n  quorumkv: {got:?}"
                    ));
                }
            }
            if watches.rng.gen_bool(0.02) {
                let id = watches.lease();
                let expected = keep_alive(&mut theirs, id).await;
                let got = keep_alive(&mut mine, id).await;
                let outcome = match &expected {
                    Ok(answer) if answer.contains("ttl: 0") => "unknown lease",
                    Ok(_) => "renewed",
                    Err(_) => "error",
                };
                *tally
                    .entry(("KeepAlive".to_string(), outcome.to_string()))
                    .or_insert(0usize) += 1;
                if trace {
                    eprintln!("keep-alive of {id:#x}\n  etcd 3.4: {expected:?}\n  quorumkv: {got:?}");
                }
                if expected != got {
                    found.push(format!(
                        "keep-alive of {id:#x} (seed {seed})\n  etcd 3.4: {expected:?}\n  quorumkv: {got:?}"
                    ));
                }
            }
            let request = generator.next();
            // A quarter of them through each one's JSON gateway.
            let json = generator.rng.gen_bool(0.25);
            let (expected, got) = if json {
                (
                    send_json(etcd.port, theirs.ids, &request),
                    send_json(ours.client_port, mine.ids, &request),
                )
            } else {
                (send(&mut theirs, &request).await, send(&mut mine, &request).await)
            };
            sent += 1;
            let kind = format!("{request:?}");
            let kind = kind.split('(').next().unwrap_or_default().to_string()
                + if json { " json" } else { "" };
            let outcome = match &expected {
                Ok(answer) if json => answer.chars().take(8).collect(),
                Ok(_) => "ok".to_string(),
                Err((code, message)) => format!("{code:?}: {message}"),
            };
            *tally.entry((kind, outcome)).or_insert(0usize) += 1;
            if trace {
                eprintln!(
                    "{sent}: {request:?}\n  etcd 3.4: {expected:?}\n  quorumkv: {got:?}"
                );
            }
            if let Request::Compact(c) = &request {
                if expected.is_ok() {
                    generator.compacted = c.revision;
                    generator.physical = c.physical;
                }
            }
            // The revision now, from etcd.
            if let Ok(a) = theirs.kv.range(RangeRequest { key: b"-".to_vec(), ..Default::default() }).await {
                generator.revision = a.into_inner().header.map_or(1, |h| h.revision);
            }
            if expected != got {
                found.push(format!(
                    "request {sent} (seed {seed}): {request:?}\n  etcd 3.4: {expected:?}\n  quorumkv: {got:?}"
                ));
                if found.len() >= 20 {
                    break;
                }
            }
        }
        eprintln!("conformance: seed {seed}: {sent} requests, {} differences", found.len());
        for ((kind, outcome), n) in &tally {
            eprintln!("  {kind:<16} {n:>6}  {outcome}");
        }
    });
    Some(found)
}

#[test]
fn kv_answers_match_etcd_3_4_field_by_field() {
    let seed = common::setting("CONFORMANCE_SEED", 1u64);
    let requests = common::setting("CONFORMANCE_REQUESTS", 3_000usize);
    let minutes = common::setting("CONFORMANCE_MINUTES", 0.0f64);
    let Some(found) = differences(seed, requests, minutes) else {
        return;
    };
    assert!(
        found.is_empty(),
        "{} differences from etcd 3.4 (the first ones):\n{}",
        found.len(),
        found.join("\n")
    );
}

/// The Auth, Cluster, Maintenance, Lock and Election services (`services.rs`): the same random
/// sequence to both, as users with and without tokens, answers compared field by field.
#[test]
fn service_answers_match_etcd_3_4_field_by_field() {
    let seed = common::setting("CONFORMANCE_SEED", 1u64);
    let requests = common::setting("CONFORMANCE_SERVICE_REQUESTS", 600usize);
    let Some((_dir, etcd, ours)) = side_by_side(&[]) else {
        return;
    };
    let found = runtime().block_on(async {
        let mut theirs = services::connect(etcd.endpoint(), etcd.port, etcd.peer_port).await;
        let mut mine = services::connect(ours.endpoint(), ours.client_port, ours.peer_port).await;
        let (found, tally) =
            services::service_differences(seed, requests, &mut theirs, &mut mine).await;
        eprintln!(
            "conformance: services, seed {seed}: {requests} requests, {} differences",
            found.len()
        );
        for ((kind, outcome), n) in &tally {
            eprintln!("  {kind:<20} {n:>6}  {outcome}");
        }
        found
    });
    assert!(
        found.is_empty(),
        "{} differences from etcd 3.4 (the first ones):\n{}",
        found.len(),
        found.join("\n")
    );
}

/// Periodic progress notifications (`progress.rs`): the same streams and writes on both, with
/// a 1 s interval; what each stream was sent is compared.
#[test]
fn progress_notifications_match_etcd_3_4() {
    let interval = [
        "--experimental-watch-progress-notify-interval",
        progress::INTERVAL,
    ];
    let Some((_dir, etcd, ours)) = side_by_side(&interval) else {
        return;
    };
    let (expected, got) = runtime().block_on(async {
        (
            progress::scenario(etcd.endpoint()).await,
            progress::scenario(ours.endpoint()).await,
        )
    });
    for (i, (e, g)) in expected.iter().zip(&got).enumerate() {
        eprintln!("stream {i}:\n  etcd 3.4: {e:?}\n  quorumkv: {g:?}");
    }
    assert_eq!(got, expected);
}

/// The case a client library's tests met: a watch from the revision a put in a transaction
/// names must see that put. etcd names the revision in the nested `ResponsePut`'s header;
/// quorumkv left the header out, so the client watched from revision 0.
#[test]
fn a_put_nested_in_a_txn_names_its_revision_and_a_watch_from_it_sees_the_put() {
    use quorumkv::proto::etcdserverpb::watch_client::WatchClient;
    use quorumkv::proto::etcdserverpb::watch_request::RequestUnion;
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = common::Server::start(dir.path(), &[]);
    runtime().block_on(async {
        let mut kv = ours.client().await;
        kv.put(PutRequest {
            key: b"before".to_vec(),
            value: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .expect("put");
        let answer = kv
            .txn(TxnRequest {
                success: vec![RequestOp {
                    request: Some(Op::RequestPut(PutRequest {
                        key: b"job".to_vec(),
                        value: b"1".to_vec(),
                        ..Default::default()
                    })),
                }],
                ..Default::default()
            })
            .await
            .expect("txn")
            .into_inner();
        let txn_revision = answer.header.expect("header").revision;
        let Some(OpAnswer::ResponsePut(put)) = &answer.responses[0].response else {
            panic!("a put's answer: {answer:?}");
        };
        let put_revision = put.header.as_ref().map_or(0, |h| h.revision);
        assert_eq!(put_revision, txn_revision, "{answer:?}");
        let (requests, inbound) = tokio::sync::mpsc::unbounded_channel();
        requests
            .send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: b"job".to_vec(),
                    start_revision: put_revision,
                    ..Default::default()
                })),
            })
            .expect("send");
        let channel = Channel::from_shared(ours.endpoint())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut answers = WatchClient::new(channel)
            .watch(tokio_stream_of(inbound))
            .await
            .expect("watch")
            .into_inner();
        let event = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let answer = answers.message().await.expect("stream").expect("an answer");
                if let Some(event) = answer.events.into_iter().next() {
                    break event;
                }
            }
        })
        .await
        .expect("the put's event within 10 s");
        let kv = event.kv.expect("kv");
        assert_eq!(
            (kv.key.as_slice(), kv.mod_revision),
            (&b"job"[..], put_revision)
        );
    });
}

fn tokio_stream_of<T: Send + 'static>(
    rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream<T> {
    tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
}
