//! The load tool: concurrent clients sending Puts (or linearizable Ranges) over gRPC to any
//! etcd v3 endpoint — quorumkv or etcd itself — for side-by-side numbers. `--endpoint` takes
//! several URLs, comma-separated (a cluster): connections are spread over them.
//!
//! cargo bench --bench load -- --endpoint http://127.0.0.1:2379 --clients 64 --seconds 10
//!
//! Prints one line: `op=put clients=64 conns=8 ops=... secs=... ops_per_sec=... p50_ms=... p90_ms=... p99_ms=...`.
//!
//! `--op watch --watchers 1000 --watch-streams 10`: watch fan-out. The watchers all watch one
//! prefix (spread over the streams, each stream its own connection) while `--clients` writers
//! put keys under it for `--seconds`; then the tool waits (up to 10 s) for every watcher to get
//! every event. Prints `op=watch ... events=... events_per_sec=... complete=...`, the rate being
//! events delivered to all watchers over the time from the first put to the last event received,
//! and `p50_delivery_ms`/`p99_delivery_ms`: each event's time from its put being sent (stamped
//! in the value's first 8 bytes) to a watcher reading it, over every event every watcher got.
//! The watchers count each response's events off the wire (`summarize`) rather than build
//! every event, so that the tool, on the same cores as the server, takes as little as it can.
//!
//! `--op get --serializable`: serializable reads (a gRPC proxy may answer them from its cache).
//! `--op kubernetes` (or `--profile kubernetes`): kube-apiserver's requests (see
//! `KubeClient`), through tonic's client, with `--kube-watchers` watch streams on the objects'
//! prefix (from the current revision + 1, with `prev_kv` and progress notifications, as the
//! API server's watch cache opens them) and a compaction every `--compact-every` seconds (a Txn
//! on the compact key, then Compact to the revision recorded one round before, as the API
//! server does every 5 minutes). The line adds `watch_events=` and `compactions=`.
//!
//! `--profile large-values`: puts of values from 100 KiB to 1 MiB (drawn per request).
//!
//! `--op fill --objects N --prefix P`: puts keys `P00000000` .. `P{N-1}` once each (spread over
//! the clients), then ends: the objects a run then reads or lists.
//!
//! `--op list --prefix P`: each request lists every key under `P` a page of 500 at a time
//! (continuing after the last key, as Kubernetes' paginated lists do); a request's latency is
//! the whole list's, and `ops_per_sec` is whole lists a second.
//!
//! `--read-rate BYTES` with `--op watch`: each stream reads at most that many bytes a second
//! (a slow watcher); the run then reports what was put while the watchers lagged.
//!
//! `--distinct-keys` with `--op watch`: watcher `i` watches the one key `watched/<i>` instead
//! of the prefix (100,000 pods each watching its own key); with `--key-space` equal to
//! `--watchers`, each put is one event for one watcher.
//!
//! `--hold SECS` with `--op watch`: opens the watchers, prints `ready_secs=` once every watch
//! exists, holds them idle (nothing is put under them) for SECS and ends: idle watchers beside
//! a write benchmark (`ci/bench-idle-watchers`).
//!
//! `--cacert FILE [--cert FILE --key FILE]`: TLS to `https://` endpoints (as etcdctl's flags).
//! `--user NAME:PASSWORD`: authenticates once and sends the token with every call (auth on).
//!
//! `--client h2` (the default) speaks gRPC over a bare HTTP/2 connection per `--conns`: each
//! call's message framed by hand, its answer read to the trailers and failed unless
//! `grpc-status` is 0. `--client tonic` goes through tonic's generated client instead (several
//! times the CPU per call). `--threads` sets the tool's runtime threads: by default one for
//! put and get, leaving the other core to the server measured, and two for watch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::bytes::{Buf, Bytes};
use prost::Message;
use quorumkv::proto::etcdserverpb::kv_client::KvClient;
use quorumkv::proto::etcdserverpb::watch_request::RequestUnion;
use quorumkv::proto::etcdserverpb::{PutRequest, RangeRequest, WatchCreateRequest, WatchRequest};
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

/// The server's allocator: the tool's own CPU per call is part of what shares the cores with
/// the server measured (libc's malloc took about 5% of it).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    endpoint: String,
    clients: usize,
    conns: usize,
    seconds: f64,
    max_requests: u64,
    key_space: u64,
    value_size: usize,
    op: String,
    watchers: usize,
    watch_streams: usize,
    client: String,
    threads: usize,
    /// `--latency-log FILE`: each request's start (Unix time, µs) and latency (µs), a line each.
    latency_log: Option<String>,
    /// `--keep-going`: a failed request is counted (its time to fail is its latency) instead of
    /// ending the run.
    keep_going: bool,
    cacert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    user: Option<String>,
    /// `--read-rate BYTES`: each watch stream reads at most this many bytes a second (h2
    /// client; 0: as fast as it can). A slow reader, as in etcd #16839.
    read_rate: u64,
    /// `--hold SECS` with `--op watch`: only open the watchers, hold them idle this long, end.
    hold: f64,
    /// `--prefix`: the keys `fill` writes, `list` lists (default `list/`).
    prefix: String,
    /// `--objects`: how many keys `fill` writes.
    objects: u64,
    /// `--kube-watchers`: watch streams the kubernetes profile keeps open.
    kube_watchers: usize,
    /// `--compact-every SECS`: the kubernetes profile's compaction interval (0: none).
    compact_every: f64,
    /// `--profile large-values`: each put's value is 100 KiB to 1 MiB.
    large_values: bool,
    /// `--serializable`: `--op get` reads serializably (a proxy may answer from its cache).
    serializable: bool,
    /// `--distinct-keys`: each watcher watches its own key, not the prefix.
    distinct_keys: bool,
}

/// Events the kubernetes profile's watchers received, and its compactions.
static KUBE_WATCH_EVENTS: AtomicU64 = AtomicU64::new(0);
static KUBE_COMPACTIONS: AtomicU64 = AtomicU64::new(0);

/// TLS to `https://` endpoints (`--cacert`, `--cert`, `--key`), set once.
static TLS: std::sync::OnceLock<Arc<quorumkv::tls::ClientTls>> = std::sync::OnceLock::new();
/// The token every call carries (`--user`), set once.
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn tls_for(endpoint: &str) -> Result<Option<Arc<quorumkv::tls::ClientTls>>, String> {
    if !endpoint.starts_with("https://") {
        return Ok(None);
    }
    TLS.get()
        .cloned()
        .map(Some)
        .ok_or_else(|| format!("{endpoint} is https://: give --cacert"))
}

/// `message` as a tonic request with the token, if any.
fn with_token<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = TOKEN.get().and_then(|t| t.parse().ok()) {
        request.metadata_mut().insert("token", token);
    }
    request
}

/// Requests that failed under `--keep-going`.
static FAILED: AtomicU64 = AtomicU64::new(0);

/// The instant the tool's clocks count from: `--op watch` stamps each put's value with the
/// microseconds since it, and each watcher takes the event's delivery latency as now minus the
/// stamp (writers and watchers are in this one process: one clock).
static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn since_epoch_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Put-to-delivery latencies of every event every watcher received: 10 µs buckets below
/// 100 ms, then 1 ms buckets up to 100 s.
struct DeliveryHistogram {
    buckets: Vec<AtomicU64>,
}

const FINE_BUCKETS: u64 = 10_000;
const COARSE_BUCKETS: u64 = 100_000;

impl DeliveryHistogram {
    fn record(&self, us: u64) {
        let bucket = if us < FINE_BUCKETS * 10 {
            us / 10
        } else {
            FINE_BUCKETS + (us / 1000).min(COARSE_BUCKETS - 1)
        };
        self.buckets[bucket as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The `q` quantile, in ms (the bucket's upper edge).
    fn quantile_ms(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let i = i as u64;
                let upper_us = if i < FINE_BUCKETS {
                    (i + 1) * 10
                } else {
                    (i - FINE_BUCKETS + 1) * 1000
                };
                return upper_us as f64 / 1000.0;
            }
        }
        0.0
    }
}

static DELIVERY: std::sync::LazyLock<DeliveryHistogram> =
    std::sync::LazyLock::new(|| DeliveryHistogram {
        buckets: (0..FINE_BUCKETS + COARSE_BUCKETS)
            .map(|_| AtomicU64::new(0))
            .collect(),
    });

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        endpoint: "http://127.0.0.1:2379".into(),
        clients: 1,
        conns: 0,
        seconds: 5.0,
        max_requests: 10_000_000,
        key_space: 100_000,
        value_size: 256,
        op: "put".into(),
        watchers: 1000,
        watch_streams: 10,
        client: "h2".into(),
        threads: 0,
        latency_log: None,
        keep_going: false,
        cacert: None,
        cert: None,
        key: None,
        user: None,
        read_rate: 0,
        hold: 0.0,
        prefix: "list/".into(),
        objects: 10_000,
        kube_watchers: 4,
        compact_every: 60.0,
        large_values: false,
        serializable: false,
        distinct_keys: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue; // passed by `cargo bench`
        }
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--endpoint" => args.endpoint = value()?,
            "--clients" => {
                args.clients = value()?.parse().map_err(|e| format!("--clients: {e}"))?
            }
            "--conns" => args.conns = value()?.parse().map_err(|e| format!("--conns: {e}"))?,
            "--seconds" => {
                args.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?
            }
            "--max-requests" => {
                args.max_requests = value()?
                    .parse()
                    .map_err(|e| format!("--max-requests: {e}"))?
            }
            "--key-space" => {
                args.key_space = value()?.parse().map_err(|e| format!("--key-space: {e}"))?
            }
            "--value-size" => {
                args.value_size = value()?.parse().map_err(|e| format!("--value-size: {e}"))?
            }
            "--op" => args.op = value()?,
            "--watchers" => {
                args.watchers = value()?.parse().map_err(|e| format!("--watchers: {e}"))?
            }
            "--watch-streams" => {
                args.watch_streams = value()?
                    .parse()
                    .map_err(|e| format!("--watch-streams: {e}"))?
            }
            "--client" => args.client = value()?,
            "--latency-log" => args.latency_log = Some(value()?),
            "--keep-going" => args.keep_going = true,
            "--cacert" => args.cacert = Some(value()?),
            "--cert" => args.cert = Some(value()?),
            "--key" => args.key = Some(value()?),
            "--user" => args.user = Some(value()?),
            "--read-rate" => {
                args.read_rate = value()?.parse().map_err(|e| format!("--read-rate: {e}"))?
            }
            "--prefix" => args.prefix = value()?,
            "--hold" => args.hold = value()?.parse().map_err(|e| format!("--hold: {e}"))?,
            "--objects" => {
                args.objects = value()?.parse().map_err(|e| format!("--objects: {e}"))?
            }
            "--kube-watchers" => {
                args.kube_watchers = value()?
                    .parse()
                    .map_err(|e| format!("--kube-watchers: {e}"))?
            }
            "--compact-every" => {
                args.compact_every = value()?
                    .parse()
                    .map_err(|e| format!("--compact-every: {e}"))?
            }
            "--serializable" => args.serializable = true,
            "--distinct-keys" => args.distinct_keys = true,
            "--profile" => match value()?.as_str() {
                "kubernetes" => args.op = "kubernetes".into(),
                "large-values" => {
                    args.op = "put".into();
                    args.large_values = true;
                }
                other => {
                    return Err(format!(
                        "--profile is kubernetes or large-values, not {other}"
                    ))
                }
            },
            "--threads" => {
                args.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.threads == 0 {
        // One thread leaves the other core to the server; the watchers count events on two.
        args.threads = if args.op == "watch" { 2 } else { 1 };
    }
    if args.conns == 0 {
        args.conns = args.clients.clamp(1, 8);
    }
    if ![
        "put",
        "get",
        "watch",
        "kubernetes",
        "fill",
        "list",
        "v2-set",
    ]
    .contains(&args.op.as_str())
    {
        return Err("--op is put, get, watch, kubernetes, fill, list or v2-set".into());
    }
    if args.op == "kubernetes" || args.op == "list" {
        // It reads the answers (revisions, `more`): through tonic's client.
        args.client = "tonic".into();
    }
    if !["h2", "tonic"].contains(&args.client.as_str()) {
        return Err("--client is h2 or tonic".into());
    }
    Ok(args)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn client_loop(
    mut conn: Conn,
    args: Arc<Args>,
    id: usize,
    deadline: Instant,
    budget: u64,
) -> Result<(Vec<Duration>, Vec<Instant>), String> {
    let mut latencies = Vec::with_capacity(16 * 1024);
    let mut starts = Vec::new();
    let log_starts = args.latency_log.is_some();
    let value = vec![b'v'; args.value_size];
    let mut n = 0u64;
    let mut kube = KubeClient::new(id);
    // A cheap deterministic key sequence per client.
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64);
    let fill = args.op == "fill";
    let large_value =
        |state: u64| vec![b'v'; LARGE_VALUE_MIN + (state % LARGE_VALUE_SPREAD) as usize];
    while n < budget && Instant::now() < deadline {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let prefix = if args.op == "watch" {
            WATCH_PREFIX
        } else {
            "load/"
        };
        let key = if fill {
            let object = id as u64 + n * args.clients as u64;
            if object >= args.objects {
                break;
            }
            format!("{}{object:08}", args.prefix).into_bytes()
        } else {
            format!("{prefix}{:012}", state % args.key_space).into_bytes()
        };
        let start = Instant::now();
        let put = args.op != "get";
        let value = if args.large_values {
            std::borrow::Cow::Owned(large_value(state))
        } else {
            std::borrow::Cow::Borrowed(&value)
        };
        let value = if args.op == "watch" {
            // The value starts with when it was sent (watchers take the latency from it; a
            // value shorter than 8 bytes is made 8).
            let mut stamped = value.into_owned();
            stamped.resize(stamped.len().max(8), b'v');
            stamped[..8].copy_from_slice(&since_epoch_us().to_le_bytes());
            std::borrow::Cow::Owned(stamped)
        } else {
            value
        };
        let result = match &mut conn {
            Conn::Tonic(kv) if args.op == "kubernetes" => kube.step(kv, state, &value).await,
            Conn::Tonic(kv) if args.op == "list" => list_all(kv, &args.prefix).await,
            Conn::Tonic(kv) if put => kv
                .put(with_token(PutRequest {
                    key,
                    value: value.to_vec(),
                    ..Default::default()
                }))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Conn::Tonic(kv) => kv
                .range(with_token(RangeRequest {
                    key,
                    serializable: args.serializable,
                    ..Default::default()
                }))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Conn::H2(h2) if put => {
                let request = PutRequest {
                    key,
                    value: value.to_vec(),
                    ..Default::default()
                };
                let uri = h2.put_uri.clone();
                h2.unary(&uri, &request).await
            }
            Conn::H2(h2) => {
                let request = RangeRequest {
                    key,
                    serializable: args.serializable,
                    ..Default::default()
                };
                let uri = h2.range_uri.clone();
                h2.unary(&uri, &request).await
            }
        };
        match result {
            Ok(()) => {}
            Err(e) if args.keep_going => {
                if FAILED.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("load: first failed request: {e}");
                }
            }
            Err(e) => return Err(format!("request failed: {e}")),
        }
        latencies.push(start.elapsed());
        if log_starts {
            starts.push(start);
        }
        n += 1;
    }
    Ok((latencies, starts))
}

/// `--profile large-values`: values from this many bytes...
const LARGE_VALUE_MIN: usize = 100 << 10;
/// ...to this many more (1 MiB in all, at most).
const LARGE_VALUE_SPREAD: u64 = (1 << 20) - (100 << 10) + 1;
/// A list's page (Kubernetes' default `limit`).
const LIST_PAGE: i64 = 500;

/// The end of the range of keys under `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Lists every key under `prefix`, a page of `LIST_PAGE` at a time.
async fn list_all(kv: &mut KvClient<Channel>, prefix: &str) -> Result<(), String> {
    let end = prefix_end(prefix);
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    loop {
        let resp = kv
            .range(with_token(RangeRequest {
                key: from,
                range_end: end.clone(),
                limit: LIST_PAGE,
                // Every page at the first page's revision, as Kubernetes' continue tokens.
                revision,
                ..Default::default()
            }))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        if revision == 0 {
            revision = resp.header.as_ref().map_or(0, |h| h.revision);
        }
        match resp.kvs.last() {
            Some(last) if resp.more => {
                from = last.key.clone();
                from.push(0);
            }
            _ => return Ok(()),
        }
    }
}

/// The kubernetes profile's watchers: `count` streams on the objects' prefix from the current
/// revision + 1, with `prev_kv` and progress notifications, counting the events they get.
async fn kube_watchers(endpoint: &str, count: usize) -> Result<(), String> {
    use quorumkv::proto::etcdserverpb::watch_client::WatchClient;
    let mut kv = KvClient::new(connect(endpoint).await?);
    let revision = kv
        .range(with_token(RangeRequest {
            key: b"compact_rev_key".to_vec(),
            ..Default::default()
        }))
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .header
        .map_or(0, |h| h.revision);
    for _ in 0..count {
        let mut client =
            WatchClient::new(connect(endpoint).await?).max_decoding_message_size(usize::MAX);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: KUBE_PREFIX.as_bytes().to_vec(),
                range_end: prefix_end(KUBE_PREFIX),
                start_revision: revision + 1,
                prev_kv: true,
                progress_notify: true,
                ..Default::default()
            })),
        };
        tx.send(create).await.map_err(|e| e.to_string())?;
        let mut stream = client
            .watch(with_token(ReceiverStream::new(rx)))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        tokio::spawn(async move {
            let _keep_open = tx;
            while let Ok(Some(resp)) = stream.message().await {
                KUBE_WATCH_EVENTS.fetch_add(resp.events.len() as u64, Ordering::Relaxed);
            }
        });
    }
    Ok(())
}

/// The API server's compactor: every `every`, a Txn on `compact_rev_key` (its version as last
/// seen) records the current revision; when it succeeds, Compact to the revision recorded the
/// round before.
async fn kube_compactor(
    endpoint: String,
    every: Duration,
    deadline: Instant,
) -> Result<(), String> {
    use quorumkv::proto::etcdserverpb::{
        compare, request_op, CompactionRequest, Compare, RequestOp, TxnRequest,
    };
    let mut kv = KvClient::new(connect(&endpoint).await?);
    let key = b"compact_rev_key".to_vec();
    let (mut version, mut recorded) = (0i64, 0i64);
    loop {
        tokio::time::sleep(every).await;
        if Instant::now() >= deadline {
            return Ok(());
        }
        let resp = kv
            .txn(with_token(TxnRequest {
                compare: vec![Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Version as i32,
                    key: key.clone(),
                    target_union: Some(compare::TargetUnion::Version(version)),
                    ..Default::default()
                }],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key.clone(),
                        value: b"compact".to_vec(),
                        ..Default::default()
                    })),
                }],
                failure: vec![RequestOp {
                    request: Some(request_op::Request::RequestRange(RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    })),
                }],
            }))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let revision = resp.header.map_or(0, |h| h.revision);
        if !resp.succeeded {
            // Another API server compacted: take its version and wait a round.
            version = resp
                .responses
                .first()
                .and_then(|r| match &r.response {
                    Some(quorumkv::proto::etcdserverpb::response_op::Response::ResponseRange(
                        range,
                    )) => range.kvs.first().map(|kv| kv.version),
                    _ => None,
                })
                .unwrap_or(0);
            continue;
        }
        version += 1;
        if recorded > 0 {
            kv.compact(with_token(CompactionRequest {
                revision: recorded,
                physical: false,
            }))
            .await
            .map_err(|e| e.to_string())?;
            KUBE_COMPACTIONS.fetch_add(1, Ordering::Relaxed);
        }
        recorded = revision;
    }
}

/// kube-apiserver's requests to etcd, as etcd's robustness tests model them (`--op
/// kubernetes`, through tonic's client): objects under `registry/pods/`, each client its own;
/// creates as a Txn on `mod_revision == 0`, updates and deletes as a Txn on the
/// `mod_revision` last seen, gets, lists of the whole prefix a page of 500 at a time (continuing
/// from the last key), and count-only ranges. The watches and the compactions the API server
/// also makes run beside the clients (`kube_watchers`, `kube_compactor`).
struct KubeClient {
    prefix: String,
    /// This client's objects: number → mod revision last seen.
    objects: std::collections::BTreeMap<u64, i64>,
    next_object: u64,
    /// Where the next list page starts (empty: a new list).
    list_from: Vec<u8>,
}

const KUBE_PREFIX: &str = "registry/pods/";

impl KubeClient {
    fn new(id: usize) -> KubeClient {
        KubeClient {
            prefix: format!("{KUBE_PREFIX}c{id:03}/"),
            objects: Default::default(),
            next_object: 0,
            list_from: Vec::new(),
        }
    }

    fn key(&self, object: u64) -> Vec<u8> {
        format!("{}{object:08}", self.prefix).into_bytes()
    }

    /// One request, chosen by `dice`: 40% updates, 20% creates, 10% deletes, 20% gets, 7% list
    /// pages, 3% counts (an update, delete or get with no object yet creates one).
    async fn step(
        &mut self,
        kv: &mut KvClient<Channel>,
        dice: u64,
        value: &[u8],
    ) -> Result<(), String> {
        use quorumkv::proto::etcdserverpb::{compare, request_op, Compare, RequestOp, TxnRequest};
        let roll = dice % 100;
        let existing = (!self.objects.is_empty())
            .then(|| {
                let nth = (dice / 100) as usize % self.objects.len();
                self.objects.iter().nth(nth).map(|(o, r)| (*o, *r))
            })
            .flatten();
        let on_mod = |key: &[u8], rev: i64| Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Mod as i32,
            key: key.to_vec(),
            target_union: Some(compare::TargetUnion::ModRevision(rev)),
            ..Default::default()
        };
        let read_back = |key: &[u8]| RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: key.to_vec(),
                ..Default::default()
            })),
        };
        let err = |e: tonic::Status| e.to_string();
        match (roll, existing) {
            (0..40, Some((object, rev))) | (60..70, Some((object, rev))) => {
                let key = self.key(object);
                let op = if roll < 40 {
                    request_op::Request::RequestPut(PutRequest {
                        key: key.clone(),
                        value: value.to_vec(),
                        ..Default::default()
                    })
                } else {
                    request_op::Request::RequestDeleteRange(
                        quorumkv::proto::etcdserverpb::DeleteRangeRequest {
                            key: key.clone(),
                            ..Default::default()
                        },
                    )
                };
                let resp = kv
                    .txn(with_token(TxnRequest {
                        compare: vec![on_mod(&key, rev)],
                        success: vec![RequestOp { request: Some(op) }],
                        failure: vec![read_back(&key)],
                    }))
                    .await
                    .map_err(err)?
                    .into_inner();
                let revision = resp.header.map_or(0, |h| h.revision);
                match (resp.succeeded, roll < 40) {
                    (true, true) => {
                        self.objects.insert(object, revision);
                    }
                    (true, false) => {
                        self.objects.remove(&object);
                    }
                    // A conflict: the API server reads the object again (done in the txn).
                    (false, _) => {
                        self.objects.remove(&object);
                    }
                }
                Ok(())
            }
            (70..90, Some((object, _))) => kv
                .range(with_token(RangeRequest {
                    key: self.key(object),
                    ..Default::default()
                }))
                .await
                .map(drop)
                .map_err(err),
            (90..97, _) => {
                let start = if self.list_from.is_empty() {
                    KUBE_PREFIX.as_bytes().to_vec()
                } else {
                    std::mem::take(&mut self.list_from)
                };
                let resp = kv
                    .range(with_token(RangeRequest {
                        key: start,
                        range_end: b"registry/pods0".to_vec(),
                        limit: 500,
                        ..Default::default()
                    }))
                    .await
                    .map_err(err)?
                    .into_inner();
                if resp.more {
                    if let Some(last) = resp.kvs.last() {
                        let mut next = last.key.clone();
                        next.push(0);
                        self.list_from = next;
                    }
                }
                Ok(())
            }
            (97.., _) => kv
                .range(with_token(RangeRequest {
                    key: KUBE_PREFIX.as_bytes().to_vec(),
                    range_end: b"registry/pods0".to_vec(),
                    count_only: true,
                    ..Default::default()
                }))
                .await
                .map(drop)
                .map_err(err),
            _ => {
                let object = self.next_object;
                self.next_object += 1;
                let key = self.key(object);
                let resp = kv
                    .txn(with_token(TxnRequest {
                        compare: vec![on_mod(&key, 0)],
                        success: vec![RequestOp {
                            request: Some(request_op::Request::RequestPut(PutRequest {
                                key: key.clone(),
                                value: value.to_vec(),
                                ..Default::default()
                            })),
                        }],
                        failure: vec![read_back(&key)],
                    }))
                    .await
                    .map_err(err)?
                    .into_inner();
                if resp.succeeded {
                    let revision = resp.header.map_or(0, |h| h.revision);
                    self.objects.insert(object, revision);
                }
                Ok(())
            }
        }
    }
}

/// How a request loop reaches the server: through tonic's client, or over a bare HTTP/2
/// connection (`--client h2`, the default), which frames each gRPC call itself so that the
/// tool, on the same cores as the server it measures, spends as little CPU per call as it can.
enum Conn {
    Tonic(KvClient<Channel>),
    H2(H2Conn),
}

#[derive(Clone)]
struct H2Conn {
    send: h2::client::SendRequest<Bytes>,
    put_uri: http::Uri,
    range_uri: http::Uri,
    watch_uri: http::Uri,
}

impl H2Conn {
    async fn connect(endpoint: &str) -> Result<H2Conn, String> {
        let base: http::Uri = endpoint
            .parse()
            .map_err(|e| format!("endpoint {endpoint}: {e}"))?;
        let authority = base
            .authority()
            .ok_or_else(|| format!("endpoint {endpoint} has no host:port"))?
            .clone();
        // The windows hyper's client opens with (tonic's channel is a hyper client).
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(2 << 20)
            .initial_connection_window_size(5 << 20);
        let tls = tls_for(endpoint)?;
        let send = match &tls {
            Some(tls) => {
                let stream = tls
                    .connect(authority.as_str())
                    .await
                    .map_err(|e| format!("connect {endpoint}: {e}"))?;
                let (send, connection) = builder
                    .handshake(stream)
                    .await
                    .map_err(|e| format!("connect {endpoint}: {e}"))?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                send
            }
            None => {
                let tcp = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .map_err(|e| format!("connect {endpoint}: {e}"))?;
                tcp.set_nodelay(true)
                    .map_err(|e| format!("connect {endpoint}: {e}"))?;
                let (send, connection) = builder
                    .handshake(tcp)
                    .await
                    .map_err(|e| format!("connect {endpoint}: {e}"))?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                send
            }
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let uri = |path: &str| -> Result<http::Uri, String> {
            http::Uri::builder()
                .scheme(scheme)
                .authority(authority.clone())
                .path_and_query(path)
                .build()
                .map_err(|e| e.to_string())
        };
        Ok(H2Conn {
            send,
            put_uri: uri("/etcdserverpb.KV/Put")?,
            range_uri: uri("/etcdserverpb.KV/Range")?,
            watch_uri: uri("/etcdserverpb.Watch/Watch")?,
        })
    }

    /// One unary gRPC call: the message framed and sent, the answer read to its end, and the
    /// call failed unless its `grpc-status` is 0.
    async fn unary(&mut self, uri: &http::Uri, message: &impl Message) -> Result<(), String> {
        let mut body = Vec::new();
        frame(&mut body, message)?;
        let (response, _stream) = self.call(uri, body, true).await?;
        if grpc_status(response.headers()).is_some() {
            // A trailers-only answer: an error, or a status without a message.
            return grpc_ok(response.headers());
        }
        let mut body = response.into_body();
        let mut received = 0;
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            received += chunk.len();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        if received < 5 {
            return Err(format!("answer of {received} bytes holds no message"));
        }
        match body.trailers().await.map_err(|e| e.to_string())? {
            Some(trailers) => grpc_ok(&trailers),
            None => Err("answer without trailers".into()),
        }
    }
}

impl H2Conn {
    /// Starts a gRPC call: `body` (framed messages) sent, the stream ended if `end`; the
    /// answer's head, if its HTTP status is 200, and the stream to send more on.
    async fn call(
        &mut self,
        uri: &http::Uri,
        body: Vec<u8>,
        end: bool,
    ) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<Bytes>), String> {
        let mut request = http::Request::post(uri.clone())
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers");
        if let Some(token) = TOKEN.get() {
            request = request.header("token", token.as_str());
        }
        let request = request.body(()).map_err(|e| e.to_string())?;
        std::future::poll_fn(|cx| self.send.poll_ready(cx))
            .await
            .map_err(|e| e.to_string())?;
        let (response, mut stream) = self
            .send
            .send_request(request, false)
            .map_err(|e| e.to_string())?;
        stream
            .send_data(Bytes::from(body), end)
            .map_err(|e| e.to_string())?;
        let response = response.await.map_err(|e| e.to_string())?;
        if response.status() != http::StatusCode::OK {
            return Err(format!("HTTP status {}", response.status()));
        }
        Ok((response, stream))
    }
}

/// Appends `message` to `body` as one uncompressed gRPC message.
fn frame(body: &mut Vec<u8>, message: &impl Message) -> Result<(), String> {
    body.push(0);
    body.extend_from_slice(&(message.encoded_len() as u32).to_be_bytes());
    message.encode(body).map_err(|e| e.to_string())
}

fn grpc_status(headers: &http::HeaderMap) -> Option<&[u8]> {
    headers.get("grpc-status").map(|v| v.as_bytes())
}

fn grpc_ok(headers: &http::HeaderMap) -> Result<(), String> {
    match grpc_status(headers) {
        Some(b"0") => Ok(()),
        Some(code) => Err(format!(
            "grpc-status {} {}",
            String::from_utf8_lossy(code),
            headers
                .get("grpc-message")
                .map(|m| String::from_utf8_lossy(m.as_bytes()))
                .unwrap_or_default()
        )),
        None => Err("answer without grpc-status".into()),
    }
}

const WATCH_PREFIX: &str = "watched/";

/// Events received by all watchers, and when the last one came (µs after the start).
#[derive(Default)]
struct Received {
    events: AtomicU64,
    last_us: AtomicU64,
}

/// What the tool needs of a `WatchResponse`: is it a `created` answer, and how many events
/// does it carry.
#[derive(Default)]
struct WatchSummary {
    /// `created` answers (one, or none, for a single response; a sum for several).
    created: usize,
    events: u64,
}

/// Watch requests encoded by prost; responses summarized from their fields (3, `created`; 11,
/// `events`) without decoding the events.
struct EventCounter;

impl Codec for EventCounter {
    type Encode = WatchRequest;
    type Decode = WatchSummary;
    type Encoder = tonic_prost::ProstEncoder<WatchRequest>;
    type Decoder = EventCounter;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        EventCounter
    }
}

impl Decoder for EventCounter {
    type Item = WatchSummary;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<WatchSummary>, Status> {
        let message = buf.copy_to_bytes(buf.remaining());
        summarize(&message, since_epoch_us())
            .map(Some)
            .map_err(|e| Status::internal(format!("bad watch response: {e}")))
    }
}

/// Reads a `WatchResponse`'s `created` (field 3) and counts its `events` (field 11), skipping
/// everything else, straight off the bytes (a message per watcher per delivery: the tool's own
/// cost per event is part of what the benchmark measures, so it is kept small).
fn summarize(mut buf: &[u8], now_us: u64) -> Result<WatchSummary, String> {
    let mut summary = WatchSummary::default();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let (tag, wire_type) = (key >> 3, key & 7);
        let skip = match wire_type {
            0 => {
                let value = varint(&mut buf)?;
                if tag == 3 && value != 0 {
                    summary.created += 1;
                }
                0
            }
            1 => 8,
            2 => {
                let len = usize::try_from(varint(&mut buf)?).map_err(|_| "field too long")?;
                if tag == 11 {
                    summary.events += 1;
                    let event = buf.get(..len).ok_or("truncated event")?;
                    if let Some(stamp) = value_stamp(event)? {
                        DELIVERY.record(now_us.saturating_sub(stamp));
                    }
                }
                len
            }
            5 => 4,
            other => return Err(format!("wire type {other} in a watch response")),
        };
        buf = buf.get(skip..).ok_or("truncated field")?;
    }
    Ok(summary)
}

/// The first 8 bytes of an `Event`'s `kv.value` (field 2, then field 5), if it has 8.
fn value_stamp(event: &[u8]) -> Result<Option<u64>, String> {
    fn field(mut buf: &[u8], wanted: u64) -> Result<Option<&[u8]>, String> {
        while !buf.is_empty() {
            let key = varint(&mut buf)?;
            let skip = match key & 7 {
                0 => {
                    varint(&mut buf)?;
                    0
                }
                1 => 8,
                2 => {
                    let len = usize::try_from(varint(&mut buf)?).map_err(|_| "field too long")?;
                    if key >> 3 == wanted {
                        return Ok(Some(buf.get(..len).ok_or("truncated field")?));
                    }
                    len
                }
                5 => 4,
                other => return Err(format!("wire type {other} in an event")),
            };
            buf = buf.get(skip..).ok_or("truncated field")?;
        }
        Ok(None)
    }
    let Some(kv) = field(event, 2)? else {
        return Ok(None);
    };
    Ok(field(kv, 5)?
        .and_then(|value| value.get(..8))
        .map(|stamp| u64::from_le_bytes(stamp.try_into().unwrap_or_default())))
}

#[inline]
fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first().ok_or("truncated varint")?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(value);
        }
    }
    Err("varint too long".into())
}

/// Cuts the whole gRPC messages off the front of `data`, summing their summaries; returns the
/// sum and how many bytes they took (the rest is the start of a message still to come).
fn summarize_messages(data: &[u8]) -> Result<(WatchSummary, usize), String> {
    let mut sum = WatchSummary::default();
    let now_us = since_epoch_us();
    let mut at = 0;
    while let Some(prefix) = data.get(at..at + 5) {
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        let Some(message) = data.get(at + 5..at + 5 + len) else {
            break;
        };
        if prefix[0] != 0 {
            return Err("compressed watch response".into());
        }
        let one = summarize(message, now_us).map_err(|e| format!("bad watch response: {e}"))?;
        sum.created += one.created;
        sum.events += one.events;
        at += 5 + len;
    }
    Ok((sum, at))
}

/// Counts a watch stream's creates and events into `received` (signalling `ready` once all
/// `count` watches exist).
struct WatchTally {
    count: usize,
    /// With `--distinct-keys`: the first watcher's index (each watches its own key).
    distinct_from: Option<usize>,
    created: usize,
    start: Instant,
    received: Arc<Received>,
    ready: tokio::sync::mpsc::Sender<()>,
}

impl WatchTally {
    async fn add(&mut self, response: WatchSummary) {
        if response.created > 0 {
            let before = self.created;
            self.created += response.created;
            if before < self.count && self.created >= self.count {
                let _ = self.ready.send(()).await;
            }
        }
        if response.events > 0 {
            self.received
                .events
                .fetch_add(response.events, Ordering::Relaxed);
            self.received
                .last_us
                .fetch_max(self.start.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
    }
}

/// The create requests for `count` watches on the prefix; with `distinct` from watcher `first`
/// on, each of its own key (as the writers name keys).
fn watch_creates(count: usize, distinct: Option<usize>) -> Vec<WatchRequest> {
    let mut end = WATCH_PREFIX.as_bytes().to_vec();
    *end.last_mut().expect("prefix") += 1;
    (0..count)
        .map(|i| {
            let (key, range_end) = match distinct {
                Some(first) => (
                    format!("{WATCH_PREFIX}{:012}", first + i).into_bytes(),
                    Vec::new(),
                ),
                None => (WATCH_PREFIX.into(), end.clone()),
            };
            WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key,
                    range_end,
                    ..Default::default()
                })),
            }
        })
        .collect()
}

/// One watch stream over a bare HTTP/2 connection: the creates sent as gRPC messages, then
/// the answers' DATA read and cut into messages, each summarized in place.
async fn watch_stream_h2(
    endpoint: String,
    mut tally: WatchTally,
    read_rate: u64,
) -> Result<(), String> {
    let mut conn = H2Conn::connect(&endpoint).await?;
    let mut body = Vec::new();
    for create in watch_creates(tally.count, tally.distinct_from) {
        frame(&mut body, &create)?;
    }
    // The stream stays open (ending it would end the watches).
    let uri = conn.watch_uri.clone();
    let (response, stream) = conn
        .call(&uri, body, false)
        .await
        .map_err(|e| format!("watch: {e}"))?;
    if grpc_status(response.headers()).is_some() {
        return grpc_ok(response.headers()).and(Err("watch ended at once".into()));
    }
    let mut body = response.into_body();
    // Bytes of a message that began in an earlier chunk (whole messages are read in place).
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if read_rate > 0 {
            // Taking the bytes at `read_rate`: the window opens again only as fast.
            let secs = chunk.len() as f64 / read_rate as f64;
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        }
        let _ = body.flow_control().release_capacity(chunk.len());
        let summary = if pending.is_empty() {
            let (summary, used) = summarize_messages(&chunk)?;
            pending.extend_from_slice(&chunk[used..]);
            summary
        } else {
            pending.extend_from_slice(&chunk);
            let (summary, used) = summarize_messages(&pending)?;
            pending.drain(..used);
            summary
        };
        tally.add(summary).await;
    }
    drop(stream);
    Ok(())
}

/// One watch stream (through tonic's client) with `count` watches on the prefix.
async fn watch_stream(endpoint: String, mut tally: WatchTally) -> Result<(), String> {
    let channel = connect(&endpoint).await?;
    // The creates are queued before the call: a Go gRPC server sends its response headers
    // only with its first message, and the call returns only once they arrive.
    let (tx, rx) = tokio::sync::mpsc::channel(tally.count.max(1));
    for create in watch_creates(tally.count, tally.distinct_from) {
        tx.send(create)
            .await
            .map_err(|_| "watch stream closed".to_string())?;
    }
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(usize::MAX);
    grpc.ready().await.map_err(|e| format!("watch: {e}"))?;
    let mut responses = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            PathAndQuery::from_static("/etcdserverpb.Watch/Watch"),
            EventCounter,
        )
        .await
        .map_err(|e| format!("watch: {e}"))?
        .into_inner();
    while let Some(response) = responses.message().await.map_err(|e| e.to_string())? {
        tally.add(response).await;
    }
    drop(tx);
    Ok(())
}

/// Watch fan-out: writers put under the watched prefix; every watcher gets every event.
async fn run_watch(args: Arc<Args>, endpoints: &[&str]) -> Result<(), String> {
    let start = Instant::now();
    let received = Arc::new(Received::default());
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(args.watch_streams.max(1));
    let streams = args.watch_streams.clamp(1, args.watchers.max(1));
    let mut first = 0;
    for stream in 0..streams {
        let endpoint = endpoints[stream % endpoints.len()].to_string();
        let count = args.watchers / streams + usize::from(stream < args.watchers % streams);
        let tally = WatchTally {
            count,
            distinct_from: args.distinct_keys.then_some(first),
            created: 0,
            start,
            received: received.clone(),
            ready: ready_tx.clone(),
        };
        first += count;
        let tonic = args.client == "tonic";
        let read_rate = args.read_rate;
        tokio::spawn(async move {
            let result = if tonic {
                watch_stream(endpoint, tally).await
            } else {
                watch_stream_h2(endpoint, tally, read_rate).await
            };
            if let Err(e) = result {
                eprintln!("load: watch stream: {e}");
                std::process::exit(1);
            }
        });
    }
    for _ in 0..streams {
        ready_rx.recv().await.ok_or("a watch stream failed")?;
    }
    if args.hold > 0.0 {
        // Idle watchers, for a write benchmark run beside them: nothing is put under them.
        println!(
            "op=watch watchers={} streams={streams} ready_secs={:.2} holding={}",
            args.watchers,
            start.elapsed().as_secs_f64(),
            args.hold
        );
        tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
        let events = received.events.load(Ordering::Relaxed);
        println!("op=watch held watchers={} events={events}", args.watchers);
        return Ok(());
    }
    let (latencies, writers_start) = request_loops(&args, endpoints).await?;
    let puts = latencies.len();
    let writers_start_us = writers_start.duration_since(start).as_micros() as u64;
    // Every watcher gets every put; with distinct keys, a put's key is watched by one watcher
    // (by none when the key space is larger than the watchers).
    let expected = if args.distinct_keys {
        (puts as u64 * args.watchers.min(args.key_space as usize) as u64) / args.key_space.max(1)
    } else {
        puts as u64 * args.watchers as u64
    };
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    while received.events.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let events = received.events.load(Ordering::Relaxed);
    let span_secs = (received
        .last_us
        .load(Ordering::Relaxed)
        .saturating_sub(writers_start_us)) as f64
        / 1e6;
    println!(
        "op=watch watchers={} streams={} writers={} puts={} puts_per_sec={:.0} events={} secs={:.2} events_per_sec={:.0} complete={:.4} p50_delivery_ms={:.2} p99_delivery_ms={:.2}",
        args.watchers,
        streams,
        args.clients,
        puts,
        puts as f64 / args.seconds,
        events,
        span_secs,
        events as f64 / span_secs.max(1e-9),
        events as f64 / expected.max(1) as f64,
        DELIVERY.quantile_ms(0.5),
        DELIVERY.quantile_ms(0.99),
    );
    Ok(())
}

async fn connect(endpoint: &str) -> Result<Channel, String> {
    let channel = Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true);
    let Some(tls) = tls_for(endpoint)? else {
        return channel
            .connect()
            .await
            .map_err(|e| format!("connect {endpoint}: {e}"));
    };
    let connector = tower::service_fn(move |uri: http::Uri| {
        let tls = tls.clone();
        async move {
            let address = format!(
                "{}:{}",
                uri.host().unwrap_or("127.0.0.1"),
                uri.port_u16().unwrap_or(443)
            );
            let stream = tls.connect(&address).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    channel
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("connect {endpoint}: {e}"))
}

/// Sets up `--cacert`/`--cert`/`--key` and `--user` before any connection.
async fn set_up_security(args: &Args, endpoint: &str) -> Result<(), String> {
    if let Some(cacert) = &args.cacert {
        let options = quorumkv::tls::TlsOptions {
            trusted_ca_file: Some(cacert.into()),
            cert_file: args.cert.as_ref().map(Into::into),
            key_file: args.key.as_ref().map(Into::into),
            ..Default::default()
        };
        let tls = quorumkv::tls::ClientTls::new(options, &[b"h2"])?;
        let _ = TLS.set(tls);
    }
    if let Some(user) = &args.user {
        let (name, password) = user.split_once(':').ok_or("--user is NAME:PASSWORD")?;
        let mut auth =
            quorumkv::proto::etcdserverpb::auth_client::AuthClient::new(connect(endpoint).await?);
        let token = auth
            .authenticate(quorumkv::proto::etcdserverpb::AuthenticateRequest {
                name: name.into(),
                password: password.into(),
            })
            .await
            .map_err(|e| format!("authenticate: {e}"))?
            .into_inner()
            .token;
        let _ = TOKEN.set(token);
    }
    Ok(())
}

/// Connects, then runs the `--clients` request loops for `--seconds`: their latencies, and
/// when they started.
async fn request_loops(
    args: &Arc<Args>,
    endpoints: &[&str],
) -> Result<(Vec<Duration>, Instant), String> {
    let mut conns = Vec::new();
    // Several endpoints (comma-separated): connections go round-robin over them.
    for conn in 0..args.conns.max(endpoints.len()) {
        let endpoint = endpoints[conn % endpoints.len()];
        conns.push(if args.client == "tonic" {
            Conn::Tonic(
                KvClient::new(connect(endpoint).await?).max_decoding_message_size(usize::MAX),
            )
        } else {
            Conn::H2(H2Conn::connect(endpoint).await?)
        });
    }
    let budget = args.max_requests / args.clients as u64;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for id in 0..args.clients {
        let conn = match &conns[id % conns.len()] {
            Conn::Tonic(kv) => Conn::Tonic(kv.clone()),
            Conn::H2(h2) => Conn::H2(h2.clone()),
        };
        tasks.push(tokio::spawn(client_loop(
            conn,
            args.clone(),
            id,
            deadline,
            budget,
        )));
    }
    let mut latencies = Vec::new();
    let mut logged = Vec::new();
    for task in tasks {
        let (client_latencies, starts) = task.await.map_err(|e| e.to_string())??;
        logged.extend(starts.iter().copied().zip(client_latencies.iter().copied()));
        latencies.extend(client_latencies);
    }
    if let Some(path) = &args.latency_log {
        write_latency_log(path, &logged)?;
    }
    Ok((latencies, start))
}

/// `--op v2-set`: etcd's v2 `PUT /v2/keys/load/<key>` with a form body over HTTP/1.1, each
/// client on its own kept-alive connection (as many curl clients would hold).
async fn v2_set_loops(
    args: &Arc<Args>,
    endpoint: &str,
) -> Result<(Vec<Duration>, Instant), String> {
    let addr = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let budget = args.max_requests / args.clients as u64;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for id in 0..args.clients {
        let (addr, args) = (addr.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            v2_set_client(&addr, &args, id, deadline, budget).await
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.map_err(|e| e.to_string())??);
    }
    Ok((latencies, start))
}

async fn v2_set_client(
    addr: &str,
    args: &Args,
    id: usize,
    deadline: Instant,
    budget: u64,
) -> Result<Vec<Duration>, String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read);
    let body = format!("value={}", "v".repeat(args.value_size));
    let mut latencies = Vec::with_capacity(16 * 1024);
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64);
    let mut line = String::new();
    let mut n = 0;
    while n < budget && Instant::now() < deadline {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let request = format!(
            "PUT /v2/keys/load/k{} HTTP/1.1\r\nHost: {addr}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            state % args.key_space,
            body.len()
        );
        let sent = Instant::now();
        write
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        line.clear();
        read.read_line(&mut line).await.map_err(|e| e.to_string())?;
        let ok = line.starts_with("HTTP/1.1 200") || line.starts_with("HTTP/1.1 201");
        let mut length = 0;
        loop {
            line.clear();
            read.read_line(&mut line).await.map_err(|e| e.to_string())?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().map_err(|e| format!("{e}"))?;
                }
            }
        }
        let mut answer = vec![0; length];
        read.read_exact(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        if ok {
            latencies.push(sent.elapsed());
        } else {
            FAILED.fetch_add(1, Ordering::Relaxed);
        }
        n += 1;
    }
    Ok(latencies)
}

/// `start_us latency_us` per request, the start as Unix time in microseconds, sorted by start.
fn write_latency_log(path: &str, requests: &[(Instant, Duration)]) -> Result<(), String> {
    use std::io::Write;
    let now_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_micros() as u64;
    let now = Instant::now();
    let mut lines: Vec<(u64, u64)> = requests
        .iter()
        .map(|(start, latency)| {
            let ago = now.duration_since(*start).as_micros() as u64;
            (now_wall - ago, latency.as_micros() as u64)
        })
        .collect();
    lines.sort_unstable();
    let file = std::fs::File::create(path).map_err(|e| format!("{path}: {e}"))?;
    let mut out = std::io::BufWriter::new(file);
    for (start, latency) in lines {
        writeln!(out, "{start} {latency}").map_err(|e| format!("{path}: {e}"))?;
    }
    out.flush().map_err(|e| format!("{path}: {e}"))
}

async fn run(args: Args) -> Result<(), String> {
    let args = Arc::new(args);
    let endpoints: Vec<&str> = args.endpoint.split(',').map(str::trim).collect();
    set_up_security(&args, endpoints[0]).await?;
    if args.op == "watch" {
        return run_watch(args.clone(), &endpoints).await;
    }
    let kube = args.op == "kubernetes";
    if kube {
        kube_watchers(endpoints[0], args.kube_watchers).await?;
        if args.compact_every > 0.0 {
            let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
            let every = Duration::from_secs_f64(args.compact_every);
            let endpoint = endpoints[0].to_string();
            tokio::spawn(async move {
                if let Err(e) = kube_compactor(endpoint, every, deadline).await {
                    eprintln!("load: compactor: {e}");
                }
            });
        }
    }
    let (mut latencies, start) = if args.op == "v2-set" {
        v2_set_loops(&args, endpoints[0]).await?
    } else {
        request_loops(&args, &endpoints).await?
    };
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let kube_line = if kube {
        format!(
            " watch_events={} compactions={}",
            KUBE_WATCH_EVENTS.load(Ordering::Relaxed),
            KUBE_COMPACTIONS.load(Ordering::Relaxed)
        )
    } else {
        String::new()
    };
    println!(
        "op={} clients={} conns={} value_size={} ops={} secs={:.2} ops_per_sec={:.0} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} failed={}{kube_line}",
        args.op,
        args.clients,
        args.conns,
        if args.large_values { "102400-1048576".to_string() } else { args.value_size.to_string() },
        latencies.len(),
        elapsed,
        latencies.len() as f64 / elapsed,
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        FAILED.load(Ordering::Relaxed),
    );
    Ok(())
}

fn main() {
    EPOCH.get_or_init(Instant::now);
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("load: {e}");
            std::process::exit(2);
        }
    };
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("load: runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("load: {e}");
        std::process::exit(1);
    }
}
