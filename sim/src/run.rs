//! One seed, start to finish: build the cluster, run the workload under faults (the safety
//! phase), heal and demand progress (the liveness phase), then check the history. Everything
//! is drawn from the seed; each seed runs on a fresh thread so that every source of randomness
//! (raft-rs's election timeouts, std's hash maps) is reseeded by madsim.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use madsim::rand::Rng;
use madsim::runtime::Handle;
use quorumkv::hooks::{self, Bug};
use quorumkv::proto::etcdserverpb::RangeRequest;

use crate::check::{self, durability, Verdict};
use crate::cluster::{Cluster, MemberSettings};
use crate::faults::{self, Swarm};
use crate::history::Op;
use crate::recorder::Recorder;
use crate::scenario::Scenario;
use crate::schedule::{self, NetworkPlan, Schedule};
use crate::trace::{Event, EventKind, Fnv};
use crate::workload::{self, History, WorkloadShape};

/// How long the cluster has to converge once faults are healed.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct RunOptions {
    pub seed: u64,
    pub nodes: usize,
    pub scenario: Option<&'static Scenario>,
    pub bug: Option<Bug>,
    /// Length of the safety phase (random faults), simulated.
    pub safety: Duration,
    /// Faults from a fuzzed schedule instead of the seed (`seed` is the schedule's).
    pub schedule: Option<Arc<Schedule>>,
    /// gRPC proxies in the path (`sim/src/proxy.rs`); 0: none. A proxy bug planted puts 2 there.
    pub proxies: usize,
}

impl RunOptions {
    /// Proxies in the path: as asked, or 2 for a planted proxy bug.
    pub fn proxies_in_path(&self) -> usize {
        match self.bug {
            Some(bug) if bug.in_proxy() => self.proxies.max(2),
            _ => self.proxies,
        }
    }

    /// The command that reruns exactly this.
    pub fn repro(&self) -> String {
        if self.schedule.is_some() {
            return "ci/sim schedule FILE (the input the schedule was read from)".to_string();
        }
        let mut command = format!("ci/sim run --seed {}", self.seed);
        match self.scenario {
            Some(scenario) => command.push_str(&format!(" --scenario {}", scenario.name)),
            None => command.push_str(&format!(" --nodes {}", self.nodes)),
        }
        if self.proxies > 0 {
            command.push_str(&format!(" --proxies {}", self.proxies));
        }
        if let Some(bug) = self.bug {
            command.push_str(&format!(" --inject-bug {}", bug.name()));
        }
        command
    }
}

pub struct RunReport {
    pub options: RunOptions,
    pub passed: bool,
    pub trace_hash: u64,
    pub verdicts: Vec<Verdict>,
    pub events: Vec<Event>,
    pub ops: Vec<Op>,
    pub nodes: Vec<u64>,
    pub end_us: u64,
    pub faults: String,
    pub stats: String,
    /// Snapshot images received whole, and transfers resumed from an offset.
    pub images_received: u64,
    pub image_resends: u64,
    /// The run itself broke (a panic in node code counts as a failure).
    pub panic: Option<String>,
}

impl RunReport {
    pub fn last_line(&self) -> String {
        let hash = format!("trace={:016x}", self.trace_hash);
        let what = match self.options.scenario {
            Some(s) => format!("scenario={}", s.name),
            None => format!("nodes={}", self.options.nodes),
        };
        let bug = self
            .options
            .bug
            .map_or(String::new(), |b| format!(" bug={}", b.name()));
        if self.passed {
            format!(
                "PASS seed={} {what}{bug} ops={} sim={:.1}s images={} resends={} {hash}",
                self.options.seed,
                self.ops.len(),
                self.end_us as f64 / 1e6,
                self.images_received,
                self.image_resends,
            )
        } else {
            let failed: Vec<&str> = self
                .verdicts
                .iter()
                .filter(|v| !v.ok)
                .map(|v| v.name)
                .collect();
            let failed = if self.panic.is_some() {
                "panic".to_string()
            } else {
                failed.join(",")
            };
            format!(
                "FAIL seed={} {what}{bug} failed={failed} sim={:.1}s {hash} repro: {}",
                self.options.seed,
                self.end_us as f64 / 1e6,
                self.options.repro()
            )
        }
    }
}

struct Simulated {
    events: Vec<Event>,
    ops: Vec<Op>,
    verdicts: Vec<Verdict>,
    nodes: Vec<u64>,
    end_us: u64,
    faults: String,
    stats: String,
    images_received: u64,
    image_resends: u64,
}

/// Some dependencies keep process-wide random state that they fill on first use (ahash's
/// seeds, for one), drawing from the running seed's generator. The first seed of a process
/// would then see a different random stream than the same seed later in a sweep; so before
/// any seed, a throwaway run fills them.
fn warm_up() {
    static WARM_UP: std::sync::Once = std::sync::Once::new();
    WARM_UP.call_once(|| {
        let options = RunOptions {
            seed: 0,
            nodes: 3,
            scenario: None,
            bug: None,
            safety: Duration::from_secs(2),
            schedule: None,
            proxies: 0,
        };
        let _ = std::thread::spawn(move || run_here(options)).join();
    });
}

/// Runs one seed on a fresh thread.
pub fn run(options: &RunOptions) -> RunReport {
    warm_up();
    let thread_options = options.clone();
    let joined = std::thread::Builder::new()
        .name(format!("seed-{}", options.seed))
        .stack_size(64 << 20)
        .spawn(move || run_here(thread_options));
    let outcome = match joined {
        Ok(thread) => thread
            .join()
            .unwrap_or_else(|panic| Err((panic_message(&panic), vec![], vec![]))),
        Err(e) => Err((
            format!("cannot start the seed's thread: {e}"),
            vec![],
            vec![],
        )),
    };
    match outcome {
        Ok(simulated) => {
            let mut verdicts = simulated.verdicts;
            let lin = check::linearizability::check(&simulated.ops);
            verdicts.push(lin_verdict(&lin));
            let passed = verdicts.iter().all(|v| v.ok);
            RunReport {
                options: options.clone(),
                passed,
                trace_hash: trace_hash(&simulated.events, &simulated.ops),
                verdicts,
                events: simulated.events,
                ops: simulated.ops,
                nodes: simulated.nodes,
                end_us: simulated.end_us,
                faults: simulated.faults,
                stats: simulated.stats,
                images_received: simulated.images_received,
                image_resends: simulated.image_resends,
                panic: None,
            }
        }
        Err((panic, events, ops)) => RunReport {
            options: options.clone(),
            passed: false,
            trace_hash: trace_hash(&events, &ops),
            verdicts: vec![Verdict {
                name: "no-panic",
                ok: false,
                detail: panic.clone(),
            }],
            end_us: events.last().map_or(0, |e| e.at_us),
            nodes: node_ids(&events),
            events,
            ops,
            faults: String::new(),
            stats: String::new(),
            images_received: 0,
            image_resends: 0,
            panic: Some(panic),
        },
    }
}

fn lin_verdict(report: &check::linearizability::LinReport) -> Verdict {
    match &report.failure {
        Some(failure) => Verdict {
            name: "linearizability",
            ok: false,
            detail: format!(
                "key {} is not linearizable; smallest failing sub-history:\n{}\n{}",
                failure.key,
                failure
                    .ops
                    .iter()
                    .map(|op| format!("  {}", op.describe()))
                    .collect::<Vec<_>>()
                    .join("\n"),
                failure.explanation
            ),
        },
        None => Verdict {
            name: "linearizability",
            ok: true,
            detail: format!(
                "{} keys, {} operations{}",
                report.keys_checked,
                report.ops_checked,
                if report.inconclusive.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; search budget exhausted (not judged) for keys {:?}",
                        report.inconclusive
                    )
                }
            ),
        },
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<String>() {
        format!("panic: {s}")
    } else if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else {
        "panic".to_string()
    }
}

/// A run that panicked: the message, and what was recorded up to the panic.
type Panicked = (String, Vec<Event>, Vec<Op>);

fn run_here(options: RunOptions) -> Result<Simulated, Panicked> {
    hooks::plant(options.bug);
    let runtime =
        madsim::runtime::Runtime::with_seed_and_config(options.seed, madsim::Config::default());
    let recorder = runtime.block_on(async { Recorder::new() });
    let history = History::default();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(simulate(options, recorder.clone(), history.clone()))
    }));
    hooks::set_observer(None);
    hooks::plant(None);
    result.map_err(|panic| {
        let events = recorder.lock().events.clone();
        (panic_message(&panic), events, history.ops())
    })
}

async fn simulate(options: RunOptions, recorder: Recorder, history: History) -> Simulated {
    {
        let recorder = recorder.clone();
        hooks::set_observer(Some(Rc::new(move |o: &hooks::Observation| {
            recorder.observe(o)
        })));
    }
    let mut rng = madsim::rand::thread_rng();
    let swarm = match (options.scenario, &options.schedule) {
        (None, None) => Swarm::draw(&mut rng),
        _ => Swarm::calm(),
    };
    let node_count = match (options.scenario, &options.schedule) {
        (Some(scenario), _) => scenario.nodes,
        (None, Some(schedule)) => schedule.nodes,
        (None, None) => options.nodes,
    };
    let settings = MemberSettings {
        heartbeat_interval: Duration::from_millis(100),
        election_timeout: Duration::from_millis(1000),
        snapshot_count: rng.gen_range(30..=300),
        catch_up_entries: [0, 10, 100, 5000][rng.gen_range(0..4)],
        snapshot_chunk_bytes: 0,
        segment_bytes: rng.gen_range(8..=128) * 1024,
        max_skew_ppm: swarm.max_skew_ppm,
        torn_writes: swarm.torn_writes,
    };
    // From a draw already made (a new draw would change every recorded seed's run): 64 bytes
    // to 2 KiB.
    let settings = MemberSettings {
        snapshot_chunk_bytes: 64 << (settings.snapshot_count % 6),
        ..settings
    };
    let shape = WorkloadShape {
        clients: rng.gen_range(3..=8),
        keys: rng.gen_range(2..=6),
        think_max: Duration::from_millis(rng.gen_range(1..=40)),
    };
    let cluster = Cluster::new(settings.clone(), recorder.clone());
    cluster.network.set_faults(swarm.link.clone());
    let initial: Vec<u64> = (1..=node_count as u64).collect();
    for id in &initial {
        cluster.add(*id, initial.clone());
    }
    for id in &initial {
        cluster.start(*id).await;
    }
    recorder.event(EventKind::Phase {
        name: "safety".into(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let clients_node = Handle::current().create_node().name("clients").build();
    let mut clients = Vec::new();
    for client in 1..=shape.clients {
        clients.push(clients_node.spawn(workload::client(
            cluster.clone(),
            history.clone(),
            shape.clone(),
            client,
            stop.clone(),
        )));
    }
    let lease_log = crate::leases::LeaseLog::default();
    let lease_clients = rng.gen_range(1..=2u64);
    for client in 1..=lease_clients {
        clients.push(clients_node.spawn(crate::leases::lease_client(
            cluster.clone(),
            lease_log.clone(),
            shape.clients + client,
            stop.clone(),
        )));
    }
    let watch_log = crate::watches::WatchLog::default();
    let watchers = rng.gen_range(1..=3u64);
    for watcher in 1..=watchers {
        clients.push(clients_node.spawn(crate::watches::watch_client(
            cluster.clone(),
            watch_log.clone(),
            watcher,
            stop.clone(),
        )));
    }
    let proxies = match options.proxies_in_path() {
        0 => None,
        count => Some(crate::proxy::Proxies::start_all(&cluster, count).await),
    };
    let proxy_reads = crate::proxy::ReadLog::default();
    if let Some(proxies) = &proxies {
        let (watchers, readers) = (rng.gen_range(1..=3u64), rng.gen_range(1..=2u64));
        for watcher in 1..=watchers {
            clients.push(clients_node.spawn(crate::proxy::proxy_watch_client(
                proxies.clone(),
                watch_log.clone(),
                crate::proxy::PROXY_NODE + watcher,
                stop.clone(),
            )));
        }
        for reader in 1..=readers {
            clients.push(clients_node.spawn(crate::proxy::proxy_reader(
                proxies.clone(),
                proxy_reads.clone(),
                crate::proxy::PROXY_NODE + reader,
                shape.keys,
                stop.clone(),
            )));
        }
    }
    let lock_log = crate::locks::LockLog::default();
    let lockers = rng.gen_range(2..=3u64);
    for locker in 1..=lockers {
        clients.push(clients_node.spawn(crate::locks::lock_client(
            cluster.clone(),
            lock_log.clone(),
            100 + locker,
            stop.clone(),
        )));
    }
    let v2_log = crate::v2::V2Log::default();
    for client in 1..=2u64 {
        clients.push(clients_node.spawn(crate::v2::v2_writer(
            cluster.clone(),
            v2_log.clone(),
            200 + client,
            stop.clone(),
        )));
    }
    clients.push(clients_node.spawn(crate::v2::v2_waiter(
        cluster.clone(),
        v2_log.clone(),
        300,
        stop.clone(),
    )));
    let auth_log = crate::auth::AuthLog::default();
    clients.push(clients_node.spawn(crate::auth::admin(cluster.clone(), stop.clone())));
    clients.push(clients_node.spawn(crate::auth::probe(
        cluster.clone(),
        auth_log.clone(),
        stop.clone(),
    )));
    let faults_node = Handle::current().create_node().name("operator").build();
    let mut backup = None;
    match (options.scenario, options.schedule.clone()) {
        (Some(scenario), _) => {
            let script = (scenario.script)(cluster.clone(), initial.clone());
            let _ = faults_node.spawn(script).await;
        }
        (None, Some(steps)) => {
            cluster
                .network
                .set_plan(Some(NetworkPlan::new(steps.network.clone())));
            let _ = faults_node
                .spawn(schedule::play(cluster.clone(), steps, initial.clone()))
                .await;
        }
        (None, None) => {
            let until = options.safety;
            if swarm.crash_after_vote > 0.0 {
                let (crashes, mut voters) = tokio::sync::mpsc::unbounded_channel();
                cluster
                    .network
                    .crash_after_vote(swarm.crash_after_vote, crashes);
                let cluster = cluster.clone();
                faults_node.spawn(async move {
                    while let Some(id) = voters.recv().await {
                        if Duration::from_micros(cluster.recorder.now_us()) >= until {
                            continue;
                        }
                        cluster.recorder.event(EventKind::Fault {
                            description: format!("crash n{id} right after it voted"),
                        });
                        cluster.crash(id);
                        let down_us = madsim::rand::thread_rng().gen_range(0..=20_000);
                        tokio::time::sleep(Duration::from_micros(down_us)).await;
                        cluster.start(id).await;
                    }
                });
            }
            let injector = faults_node.spawn(faults::inject(cluster.clone(), swarm.clone(), until));
            let operator = faults_node.spawn(crate::operator::operate(
                cluster.clone(),
                initial.clone(),
                swarm.membership,
                swarm.transfers,
                until,
            ));
            let backup_task = faults_node.spawn(crate::backup::take(cluster.clone(), until));
            let proxy_chaos = proxies
                .clone()
                .map(|proxies| faults_node.spawn(crate::proxy::chaos(proxies, until)));
            tokio::time::sleep(until).await;
            let _ = injector.await;
            let _ = operator.await;
            backup = backup_task.await.ok().flatten();
            if let Some(chaos) = proxy_chaos {
                let _ = chaos.await;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    recorder.event(EventKind::Phase {
        name: "liveness".into(),
    });
    check::liveness::heal_everything(&cluster, &initial).await;
    let liveness = check::liveness::converge(&cluster, &initial, &history, LIVENESS_BOUND).await;
    for client in clients {
        let _ = client.await;
    }
    recorder.event(EventKind::Phase {
        name: "check".into(),
    });
    let ops = history.ops();
    let mut verdicts = vec![liveness.clone()];
    verdicts.push(check::raft_safety::check(&recorder.lock()));
    verdicts.push(final_durability(&cluster, &ops).await);
    verdicts.push(crate::backup::verify(&cluster, backup).await);
    verdicts.push(check::leases::check(
        &lease_log.ops(),
        settings.max_skew_ppm,
    ));
    verdicts.push(final_watches(&cluster, &watch_log.sessions()));
    if proxies.is_some() {
        verdicts.push(final_proxy_reads(&cluster, &proxy_reads.reads()));
    }
    verdicts.push(final_locks(&cluster, &lock_log.acquired()));
    verdicts.push(final_v2(&cluster, &v2_log).await);
    verdicts.push(check::auth::check(
        &recorder.lock().auth_entries,
        &auth_log.succeeded(),
    ));
    for verdict in &verdicts {
        recorder.event(EventKind::Check {
            name: verdict.name.to_string(),
            ok: verdict.ok,
            detail: verdict.detail.lines().next().unwrap_or("").to_string(),
        });
    }
    let stats = {
        let net = cluster.network.stats();
        let facts = recorder.lock();
        format!(
            "clients={} keys={} snapshot-count={} segment={}KiB image-chunk={}B; network: {} batches sent, {} delivered, {} dropped, {} duplicated; {} entries applied; snapshot images: {} sent, {} received, {} resends",
            shape.clients,
            shape.keys,
            settings.snapshot_count,
            settings.segment_bytes / 1024,
            settings.snapshot_chunk_bytes,
            net.sent,
            net.delivered,
            net.dropped,
            net.duplicated,
            facts.entries_applied,
            facts.images_started,
            facts.images_received,
            facts.image_resends,
        )
    };
    let stats = match &proxies {
        Some(proxies) => format!("{stats}; {}", proxies.summary()),
        None => stats,
    };
    let (images_received, image_resends) = {
        let facts = recorder.lock();
        (facts.images_received, facts.image_resends)
    };
    let events = recorder.lock().events.clone();
    let end_us = recorder.now_us();
    cluster.kill_all();
    Handle::current().kill(clients_node.id());
    Handle::current().kill(faults_node.id());
    // The killed tasks are dropped when the executor next runs them.
    tokio::time::sleep(Duration::from_millis(1)).await;
    Simulated {
        events,
        ops,
        verdicts,
        nodes: cluster.ids(),
        end_us,
        faults: swarm.describe(),
        stats,
        images_received,
        image_resends,
    }
}

/// Reads what the durability check needs from a converged member.
async fn final_durability(cluster: &Cluster, ops: &[Op]) -> Verdict {
    let Some(reader) = cluster
        .leader()
        .or_else(|| cluster.up_ids().first().copied())
        .and_then(|id| cluster.kv(id))
    else {
        return Verdict {
            name: "durability",
            ok: false,
            detail: "no member up to read the final history from".into(),
        };
    };
    let mut reads = durability::FinalReads::new();
    let final_revision = reader.status().revision;
    for (key, revision) in durability::needed_reads(ops) {
        if revision <= 0 || revision > final_revision {
            continue;
        }
        let response = reader
            .range(RangeRequest {
                key: key.clone().into_bytes(),
                revision,
                serializable: true,
                ..Default::default()
            })
            .await;
        if let Ok(response) = response {
            let kv = response.kvs.first().map(|kv| crate::history::ReadKv {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                value: String::from_utf8_lossy(&kv.value).into_owned(),
                mod_revision: kv.mod_revision,
            });
            reads.insert((key, revision), kv);
        }
    }
    durability::check(ops, &reads, final_revision)
}

/// Judges the lock holders against the history of a converged member.
/// The v2 stores of every member up at the end, once all are at one index (or 10 s on).
async fn final_v2(cluster: &Cluster, log: &crate::v2::V2Log) -> Verdict {
    let mut dumps = Vec::new();
    for _ in 0..100 {
        dumps = cluster
            .up_ids()
            .into_iter()
            .filter_map(|id| cluster.kv(id).map(|kv| (id, kv.v2_dump())))
            .collect::<Vec<(u64, quorumkv::v2::store::V2Dump)>>();
        if dumps.windows(2).all(|w| w[0].1.index == w[1].1.index) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check::v2::check(&dumps, &log.ops(), &log.waits())
}

fn final_locks(cluster: &Cluster, acquired: &[crate::locks::Acquired]) -> Verdict {
    let mut prefix = crate::locks::LOCK_NAME.to_vec();
    prefix.push(b'/');
    let end = quorumkv::server::prefix_end(&prefix);
    let history = cluster
        .leader()
        .or_else(|| cluster.up_ids().first().copied())
        .and_then(|id| cluster.kv(id))
        .map(|kv| kv.history(1, &prefix, &end));
    match history {
        Some(Ok(events)) => {
            let changes: Vec<_> = events
                .iter()
                .filter_map(|e| {
                    let kv = e.kv.as_ref()?;
                    Some((kv.mod_revision, kv.key.clone(), e.r#type == 0))
                })
                .collect();
            check::locks::check(acquired, &changes)
        }
        _ => Verdict {
            name: "locks",
            ok: false,
            detail: "the final history is unreadable".into(),
        },
    }
}

/// The changes of the watched key space, as a converged member's history has them.
fn final_history(cluster: &Cluster) -> Result<Vec<crate::watches::Change>, String> {
    let reader = cluster
        .leader()
        .or_else(|| cluster.up_ids().first().copied())
        .and_then(|id| cluster.kv(id))
        .ok_or("no member up to read the final history from")?;
    let events = reader
        .history(
            1,
            crate::watches::WATCHED_START,
            crate::watches::WATCHED_END,
        )
        .map_err(|e| format!("the final history is unreadable: {e}"))?;
    Ok(events.iter().map(crate::watches::Change::of).collect())
}

/// Judges the serializable reads through the proxies against the final history.
fn final_proxy_reads(cluster: &Cluster, reads: &[crate::proxy::ProxyRead]) -> Verdict {
    match final_history(cluster) {
        Ok(changes) => check::proxy_reads::check(reads, &changes),
        Err(detail) => Verdict {
            name: "proxy-reads",
            ok: false,
            detail,
        },
    }
}

/// Judges what the watchers saw against the history of a converged member.
fn final_watches(cluster: &Cluster, sessions: &[crate::watches::Session]) -> Verdict {
    match final_history(cluster) {
        Ok(changes) => check::watches::check(sessions, &changes),
        Err(detail) => Verdict {
            name: "watches",
            ok: false,
            detail,
        },
    }
}

/// The members named in a run's events, for the picture of a run that panicked.
fn node_ids(events: &[Event]) -> Vec<u64> {
    let mut ids = std::collections::BTreeSet::new();
    for event in events {
        match &event.kind {
            EventKind::Role { node, .. }
            | EventKind::Crash { node, .. }
            | EventKind::Restart { node }
            | EventKind::Pause { node }
            | EventKind::Resume { node } => {
                ids.insert(*node);
            }
            _ => {}
        }
    }
    ids.into_iter().collect()
}

/// The run's fingerprint: every cluster event and every operation with its result.
fn trace_hash(events: &[Event], ops: &[Op]) -> u64 {
    let mut hash = Fnv::default();
    for event in events {
        hash.write(format!("{event:?}").as_bytes());
    }
    for op in ops {
        hash.write(op.describe().as_bytes());
    }
    hash.finish()
}
