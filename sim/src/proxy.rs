//! The gRPC proxy in the path (`--proxies N`). The proxy's watch coalescing and read cache
//! (`quorumkv::proxy::{broker, cache}`, the code `quorumkv grpc-proxy` runs) reach the
//! simulated members through a port that plays the network between them: a member that crashes
//! breaks the proxy's streams (the proxy moves to another member and watches again from where
//! each watcher was), a member that stops answering reads is left for another. Each proxy runs
//! on its own simulated machine; proxies crash and start again during the safety phase.
//!
//! Watchers through the proxies (`proxy_watch_client`) are judged by the watch checker, their
//! progress answers too; serializable reads through them (`proxy_reader`) by
//! `check::proxy_reads`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use madsim::rand::Rng;
use madsim::runtime::{Handle, NodeHandle};
use quorumkv::proto::etcdserverpb::watch_request::RequestUnion;
use quorumkv::proto::etcdserverpb::{
    RangeRequest, RangeResponse, WatchCreateRequest, WatchProgressRequest, WatchRequest,
};
use quorumkv::proxy::broker::Broker;
use quorumkv::proxy::cache::RangeCache;
use quorumkv::proxy::metrics::ProxyMetrics;
use quorumkv::proxy::port::{ClusterPort, Opened, PortFuture};
use quorumkv::server::KvServer;
use quorumkv::watch::WatchOut;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codegen::tokio_stream::StreamExt;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::cluster::Cluster;
use crate::trace::EventKind;
use crate::watches::{Change, Session, WatchLog, WATCHED_END, WATCHED_START};
use crate::workload::{key_name, CLIENT_TIMEOUT};

/// Watch sessions through proxy `p` name node `PROXY_NODE + p` (members are 1..=9).
pub const PROXY_NODE: u64 = 100;
/// How often a proxy's stream checks that its member is still there (a gRPC keepalive).
const KEEPALIVE: Duration = Duration::from_millis(100);

/// The proxy's way to the simulated members: the member in use, until it fails.
struct SimPort {
    cluster: Cluster,
    current: Mutex<Current>,
}

#[derive(Default)]
struct Current {
    generation: u64,
    node: Option<u64>,
}

impl SimPort {
    fn lock(&self) -> MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The member in use (another running one, when it is down): its link generation, id and
    /// request interface.
    fn member(&self) -> Option<(u64, u64, KvServer)> {
        let mut current = self.lock();
        if let Some(node) = current.node {
            if let Some(kv) = self.cluster.kv(node) {
                return Some((current.generation, node, kv));
            }
        }
        let up = self.cluster.up_ids();
        let node = *up.get(madsim::rand::thread_rng().gen_range(0..up.len().max(1)))?;
        let kv = self.cluster.kv(node)?;
        current.generation += 1;
        current.node = Some(node);
        Some((current.generation, node, kv))
    }

    fn failed(&self, generation: u64) {
        let mut current = self.lock();
        if current.generation == generation {
            current.generation += 1;
            current.node = None;
        }
    }
}

impl ClusterPort for SimPort {
    fn open_watch(
        &self,
        _token: &[u8],
        mut requests: mpsc::UnboundedReceiver<WatchRequest>,
    ) -> PortFuture<'_, Result<Opened, Status>> {
        Box::pin(async move {
            let (generation, node, kv) = self
                .member()
                .ok_or_else(|| Status::unavailable("transport: no member is up"))?;
            let hub = kv.watches().clone();
            let (stream, tx, mut rx) = hub.open_stream();
            let (out, answers) = mpsc::unbounded_channel();
            let requests_hub = hub.clone();
            tokio::spawn(async move {
                while let Some(request) = requests.recv().await {
                    if !requests_hub.answer(stream, &tx, request, |_| Ok(())).await {
                        break;
                    }
                }
                requests_hub.close_stream(stream);
            });
            let cluster = self.cluster.clone();
            tokio::spawn(async move {
                // One timer for the stream's life (a timer made per answer would pile up).
                let mut keepalive = tokio::time::interval(KEEPALIVE);
                loop {
                    tokio::select! {
                        answer = rx.recv() => match answer {
                            Some(answer) => {
                                if out.send(Ok(answer)).is_err() {
                                    break;
                                }
                            }
                            None => break,
                        },
                        _ = keepalive.tick() => {
                            if out.is_closed() {
                                break;
                            }
                            let same = cluster.kv(node).is_some_and(|kv| kv.watches().same_as(&hub));
                            if !same {
                                let _ = out.send(Err(Status::unavailable(
                                    "transport: the member went away",
                                )));
                                break;
                            }
                        }
                    }
                }
            });
            Ok(Opened {
                answers: Box::pin(UnboundedReceiverStream::new(answers)),
                generation,
            })
        })
    }

    fn range(
        &self,
        request: RangeRequest,
        _credentials: &MetadataMap,
    ) -> PortFuture<'_, Result<RangeResponse, Status>> {
        Box::pin(async move {
            let (generation, _, kv) = self
                .member()
                .ok_or_else(|| Status::unavailable("transport: no member is up"))?;
            match tokio::time::timeout(CLIENT_TIMEOUT, kv.range(request)).await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(e)) => Err(Status::unavailable(e.to_string())),
                Err(_) => {
                    // A member that does not answer is left, as a gRPC keepalive would.
                    self.failed(generation);
                    Err(Status::unavailable("transport: the member does not answer"))
                }
            }
        })
    }

    fn broke(&self, generation: u64, status: Option<&Status>) {
        if status.is_none_or(|s| s.message().starts_with("transport")) {
            self.failed(generation);
        }
    }

    fn endpoint(&self) -> String {
        match self.lock().node {
            Some(node) => format!("n{node}"),
            None => "none".into(),
        }
    }
}

/// One running proxy.
#[derive(Clone)]
pub struct SimProxy {
    pub id: u64,
    /// Starts so far (a client's read revisions must not go back within one incarnation).
    pub incarnation: u64,
    node: NodeHandle,
    broker: Arc<Broker>,
    cache: Arc<RangeCache>,
    alive: Arc<AtomicBool>,
}

impl SimProxy {
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
pub struct Proxies {
    cluster: Cluster,
    running: Arc<Mutex<Vec<Option<SimProxy>>>>,
    starts: Arc<Mutex<u64>>,
    /// Every incarnation's metrics, for the run's summary.
    metrics: Arc<Mutex<Vec<Arc<ProxyMetrics>>>>,
}

impl Proxies {
    pub async fn start_all(cluster: &Cluster, count: usize) -> Proxies {
        let proxies = Proxies {
            cluster: cluster.clone(),
            running: Arc::new(Mutex::new(vec![None; count])),
            starts: Arc::default(),
            metrics: Arc::default(),
        };
        for id in 1..=count as u64 {
            proxies.start(id).await;
        }
        proxies
    }

    fn running(&self) -> MutexGuard<'_, Vec<Option<SimProxy>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts proxy `id` (1-based) on a fresh simulated machine, with an empty cache.
    pub async fn start(&self, id: u64) {
        let incarnation = {
            let mut starts = self.starts.lock().unwrap_or_else(|p| p.into_inner());
            *starts += 1;
            *starts
        };
        let node = Handle::current()
            .create_node()
            .name(format!("proxy{id}"))
            .build();
        let port: Arc<dyn ClusterPort> = Arc::new(SimPort {
            cluster: self.cluster.clone(),
            current: Mutex::default(),
        });
        let metrics = Arc::new(ProxyMetrics::new());
        let queue = madsim::rand::thread_rng().gen_range(4..=64);
        self.metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(metrics.clone());
        let built = node
            .spawn(async move {
                let seen = Arc::new(std::sync::atomic::AtomicI64::new(0));
                // Small queues: slow watchers are parked and watch again often.
                let broker =
                    Broker::with_client_queue(port.clone(), seen.clone(), metrics.clone(), queue);
                let cache = RangeCache::new(port, seen, metrics);
                (broker, cache)
            })
            .await;
        let Ok((broker, cache)) = built else {
            return;
        };
        if let Some(slot) = self.running().get_mut(id as usize - 1) {
            *slot = Some(SimProxy {
                id,
                incarnation,
                node,
                broker,
                cache,
                alive: Arc::new(AtomicBool::new(true)),
            });
        }
        self.cluster.recorder.event(EventKind::Fault {
            description: format!("proxy p{id} started"),
        });
    }

    /// Kills proxy `id`: its tasks vanish, its clients' streams break.
    pub fn crash(&self, id: u64) {
        let Some(proxy) = self
            .running()
            .get_mut(id as usize - 1)
            .and_then(Option::take)
        else {
            return;
        };
        proxy.alive.store(false, Ordering::Relaxed);
        Handle::current().kill(proxy.node.id());
        self.cluster.recorder.event(EventKind::Fault {
            description: format!("crash proxy p{id}"),
        });
    }

    /// A running proxy, at random.
    pub fn pick(&self) -> Option<SimProxy> {
        let running: Vec<SimProxy> = self.running().iter().flatten().cloned().collect();
        let at = madsim::rand::thread_rng().gen_range(0..running.len().max(1));
        running.get(at).cloned()
    }

    pub fn count(&self) -> usize {
        self.running().len()
    }

    /// What the proxies did, over every incarnation (the run's stats line).
    pub fn summary(&self) -> String {
        let all = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        let sum = |f: &dyn Fn(&ProxyMetrics) -> u64| all.iter().map(|m| f(m)).sum::<u64>();
        format!(
            "proxies: {} started; cache {} hits, {} misses; {} watchers joined a shared one, {} parked, {} upstream watch reconnects",
            all.len(),
            sum(&|m| m.cache_hits.get() as u64),
            sum(&|m| m.cache_misses.get() as u64),
            sum(&|m| m.watchers_coalesced.get()),
            sum(&|m| m.slow_watchers.get()),
            sum(&|m| m.upstream_reconnects.get()),
        )
    }
}

/// Crashes a proxy now and then until `until` (simulated time since the start), and starts it
/// again a moment later.
pub async fn chaos(proxies: Proxies, until: Duration) {
    let started = tokio::time::Instant::now();
    loop {
        let (pause, id, down) = {
            let mut rng = madsim::rand::thread_rng();
            (
                Duration::from_millis(rng.gen_range(500..=3000)),
                rng.gen_range(1..=proxies.count() as u64),
                Duration::from_millis(rng.gen_range(0..=800)),
            )
        };
        tokio::time::sleep(pause).await;
        if started.elapsed() >= until {
            return;
        }
        proxies.crash(id);
        tokio::time::sleep(down).await;
        proxies.start(id).await;
    }
}

/// A watcher of the KV key space through the proxies: watches through one for a while,
/// sometimes reading slowly (its proxy parks it), sometimes asking for progress; then (or when
/// its proxy crashes) through another, from the revision after the last one it saw.
pub async fn proxy_watch_client(
    proxies: Proxies,
    log: WatchLog,
    watcher: u64,
    stop: Arc<AtomicBool>,
) {
    let mut next_rev = 1;
    while !stop.load(Ordering::Relaxed) {
        let Some(proxy) = proxies.pick() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (stay, slow, ask_progress, prev_kv) = {
            let mut rng = madsim::rand::thread_rng();
            (
                Duration::from_millis(rng.gen_range(500..=4000)),
                rng.gen_bool(0.2),
                rng.gen_bool(0.7),
                rng.gen_bool(0.5),
            )
        };
        let (requests, inbound) = mpsc::unbounded_channel::<Result<WatchRequest, Status>>();
        let broker = proxy.broker.clone();
        let opened = proxy
            .node
            .spawn(async move {
                broker.serve(MetadataMap::new(), UnboundedReceiverStream::new(inbound))
            })
            .await;
        let Ok(mut answers) = opened else {
            continue;
        };
        let create = WatchCreateRequest {
            key: WATCHED_START.to_vec(),
            range_end: WATCHED_END.to_vec(),
            start_revision: next_rev,
            prev_kv,
            ..Default::default()
        };
        let _ = requests.send(Ok(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(create)),
        }));
        let mut session = Session {
            watcher,
            node: PROXY_NODE + proxy.id,
            start_rev: next_rev,
            start_us: proxies.cluster.recorder.now_us(),
            responses: Vec::new(),
            progress: Vec::new(),
        };
        let until = tokio::time::sleep(stay);
        tokio::pin!(until);
        let mut tick = tokio::time::interval(Duration::from_millis(150));
        // Canceled (the proxy could not reach a member to check the create), or the proxy
        // went away: wait a moment before the next try.
        let mut cut_short = false;
        loop {
            tokio::select! {
                // Answers in shared encoded parts decoded, as the client's gRPC would.
                answer = answers.next() => match answer.map(|a| a.map(WatchOut::into_response)) {
                    Some(Ok(answer)) if !answer.canceled => {
                        if answer.created {
                            continue;
                        }
                        if answer.events.is_empty() {
                            if answer.watch_id == -1 {
                                let revision = answer.header.map_or(0, |h| h.revision);
                                session.progress.push((session.responses.len(), revision));
                            }
                            continue;
                        }
                        let changes: Vec<Change> = answer.events.iter().map(Change::of).collect();
                        if let Some(last) = changes.last() {
                            next_rev = next_rev.max(last.revision + 1);
                        }
                        session.responses.push(changes);
                        if slow {
                            let nap = madsim::rand::thread_rng().gen_range(1..=30);
                            tokio::time::sleep(Duration::from_millis(nap)).await;
                        }
                    }
                    _ => {
                        cut_short = true;
                        break;
                    }
                },
                _ = tick.tick() => {
                    if !proxy.alive() {
                        cut_short = true;
                        break;
                    }
                    if ask_progress {
                        let _ = requests.send(Ok(WatchRequest {
                            request_union: Some(RequestUnion::ProgressRequest(
                                WatchProgressRequest {},
                            )),
                        }));
                    }
                }
                _ = &mut until => break,
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        drop(requests);
        log.push(session);
        if cut_short {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One serializable read through a proxy, as its client saw it.
#[derive(Clone, Debug)]
pub struct ProxyRead {
    pub client: u64,
    pub proxy: u64,
    pub incarnation: u64,
    pub key: String,
    pub revision: i64,
    /// The value and its mod revision; `None`: the key was absent.
    pub found: Option<(String, i64)>,
    pub at_us: u64,
}

#[derive(Clone, Default)]
pub struct ReadLog {
    reads: Arc<Mutex<Vec<ProxyRead>>>,
}

impl ReadLog {
    pub fn reads(&self) -> Vec<ProxyRead> {
        self.reads.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Serializable reads of the workload's keys through the proxies (from the cache when it can).
pub async fn proxy_reader(
    proxies: Proxies,
    log: ReadLog,
    client: u64,
    keys: usize,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let (key, think) = {
            let mut rng = madsim::rand::thread_rng();
            (
                key_name(rng.gen_range(0..keys)),
                Duration::from_millis(rng.gen_range(1..=20)),
            )
        };
        tokio::time::sleep(think).await;
        let Some(proxy) = proxies.pick() else {
            continue;
        };
        let cache = proxy.cache.clone();
        let request = RangeRequest {
            key: key.clone().into_bytes(),
            serializable: true,
            ..Default::default()
        };
        let read = proxy
            .node
            .spawn(async move { cache.range(request, &MetadataMap::new()).await });
        let Ok(Ok(Ok(response))) = tokio::time::timeout(CLIENT_TIMEOUT, read).await else {
            continue;
        };
        if !proxy.alive() {
            continue;
        }
        let found = response.kvs.first().map(|kv| {
            (
                String::from_utf8_lossy(&kv.value).into_owned(),
                kv.mod_revision,
            )
        });
        log.reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ProxyRead {
                client,
                proxy: proxy.id,
                incarnation: proxy.incarnation,
                key,
                revision: response.header.map_or(0, |h| h.revision),
                found,
                at_us: proxies.cluster.recorder.now_us(),
            });
    }
}
