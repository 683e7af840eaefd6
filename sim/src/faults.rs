//! Faults, swarm style: which faults a run uses, and how hard, is itself drawn from the seed,
//! so that some seeds hammer one fault and others mix them all. The scheduler then injects
//! them at random times during the safety phase.

use std::time::Duration;

use madsim::rand::seq::SliceRandom;
use madsim::rand::Rng;

use crate::cluster::Cluster;
use crate::disk::{FaultError, FaultOp};
use crate::network::LinkFaults;
use crate::trace::EventKind;

#[derive(Debug, Clone, Default)]
pub struct Swarm {
    pub partitions: bool,
    pub one_way_partitions: bool,
    pub isolate_leader: bool,
    pub bridge: bool,
    pub link: LinkFaults,
    pub crashes: bool,
    /// Crash a majority (or all) at once: a power loss.
    pub power_loss: bool,
    pub torn_writes: bool,
    pub pauses: bool,
    /// Probability that a node granting a vote crashes right after (and restarts at once).
    pub crash_after_vote: f64,
    pub max_skew_ppm: u64,
    pub membership: bool,
    pub transfers: bool,
    /// A node's WAL or snapshot files fail to write, sync or rename (ENOSPC or EIO).
    pub disk_errors: bool,
    /// Mean time between two fault actions.
    pub fault_interval: Duration,
}

impl Swarm {
    pub fn draw(rng: &mut impl Rng) -> Swarm {
        let mut swarm = Swarm {
            partitions: rng.gen_bool(0.5),
            one_way_partitions: rng.gen_bool(0.4),
            isolate_leader: rng.gen_bool(0.5),
            bridge: rng.gen_bool(0.3),
            link: LinkFaults::default(),
            crashes: rng.gen_bool(0.5),
            power_loss: rng.gen_bool(0.3),
            torn_writes: rng.gen_bool(0.7),
            pauses: rng.gen_bool(0.4),
            crash_after_vote: if rng.gen_bool(0.4) {
                rng.gen_range(0.1..0.6)
            } else {
                0.0
            },
            max_skew_ppm: if rng.gen_bool(0.5) {
                rng.gen_range(1_000..=100_000)
            } else {
                0
            },
            membership: rng.gen_bool(0.4),
            transfers: rng.gen_bool(0.4),
            disk_errors: false,
            fault_interval: Duration::from_millis(rng.gen_range(300..=2_000)),
        };
        // From a draw already made (a new draw would change every recorded seed's run): a
        // third of the seeds.
        swarm.disk_errors = swarm.fault_interval.as_millis().is_multiple_of(3);
        if rng.gen_bool(0.5) {
            swarm.link.drop_probability = rng.gen_range(0.0..0.15);
        }
        if rng.gen_bool(0.4) {
            swarm.link.duplicate_probability = rng.gen_range(0.0..0.1);
        }
        if rng.gen_bool(0.6) {
            swarm.link.delay_min = Duration::from_micros(rng.gen_range(50..=1_000));
            swarm.link.delay_max =
                swarm.link.delay_min + Duration::from_millis(rng.gen_range(0..=60));
            swarm.link.reorder = rng.gen_bool(0.5);
        } else {
            swarm.link.delay_min = Duration::from_micros(100);
            swarm.link.delay_max = Duration::from_micros(300);
        }
        swarm
    }

    /// No faults at all (named scenarios script their own).
    pub fn calm() -> Swarm {
        Swarm {
            link: LinkFaults {
                delay_min: Duration::from_micros(100),
                delay_max: Duration::from_micros(300),
                ..LinkFaults::default()
            },
            fault_interval: Duration::from_secs(3600),
            ..Swarm::default()
        }
    }

    pub fn describe(&self) -> String {
        let mut on = Vec::new();
        let flags = [
            (self.partitions, "partitions"),
            (self.one_way_partitions, "one-way partitions"),
            (self.isolate_leader, "leader isolation"),
            (self.bridge, "bridge"),
            (self.crashes, "crashes"),
            (self.power_loss, "power loss"),
            (self.torn_writes, "torn writes"),
            (self.pauses, "pauses"),
            (self.membership, "membership changes"),
            (self.transfers, "leader transfers"),
            (self.disk_errors, "disk errors"),
        ];
        for (enabled, name) in flags {
            if enabled {
                on.push(name.to_string());
            }
        }
        if self.crash_after_vote > 0.0 {
            on.push(format!(
                "crash after voting {:.0}%",
                self.crash_after_vote * 100.0
            ));
        }
        if self.max_skew_ppm > 0 {
            on.push(format!("clock skew ±{}ppm", self.max_skew_ppm));
        }
        let link = &self.link;
        if link.drop_probability > 0.0 {
            on.push(format!("drop {:.1}%", link.drop_probability * 100.0));
        }
        if link.duplicate_probability > 0.0 {
            on.push(format!(
                "duplicate {:.1}%",
                link.duplicate_probability * 100.0
            ));
        }
        on.push(format!(
            "delay {}..{}µs{}",
            link.delay_min.as_micros(),
            link.delay_max.as_micros(),
            if link.reorder { " reordering" } else { "" }
        ));
        on.join(", ")
    }
}

/// Blocks both directions between every node of `a` and every node of `b`.
pub fn cut(a: &[u64], b: &[u64]) -> Vec<(u64, u64)> {
    let mut links = Vec::new();
    for x in a {
        for y in b {
            links.push((*x, *y));
            links.push((*y, *x));
        }
    }
    links
}

pub fn partition(cluster: &Cluster, description: String, links: Vec<(u64, u64)>) {
    cluster.network.heal();
    cluster.network.block(links.clone());
    cluster.recorder.event(EventKind::Partition {
        description,
        blocked: links,
    });
}

pub fn heal(cluster: &Cluster) {
    if cluster.network.blocked().is_empty() {
        return;
    }
    cluster.network.heal();
    cluster.recorder.event(EventKind::Partition {
        description: "healed".into(),
        blocked: vec![],
    });
}

/// Restarts `id` after `after`, unless it was removed meanwhile.
fn restart_later(cluster: &Cluster, id: u64, after: Duration) {
    let cluster = cluster.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        cluster.start(id).await;
    });
}

fn resume_later(cluster: &Cluster, id: u64, after: Duration) {
    let cluster = cluster.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        cluster.resume(id);
    });
}

/// How long a node has to stop once its disk failed it.
const STOP_AFTER_DISK_ERROR: Duration = Duration::from_secs(10);

/// Makes `op` fail with `error` on node `id`'s durable log. Once it fails, the node must stop
/// (its process exits): it is then crashed, its disk mended, and restarted after `down_for`. A
/// node that goes on after a failed write or sync is a violation: it may answer success for
/// what is not durable. A fault that never fires (the node wrote nothing meanwhile) is
/// withdrawn.
fn disk_error(cluster: &Cluster, id: u64, op: FaultOp, error: FaultError, down_for: Duration) {
    let Some(disk) = cluster.disk_of(id) else {
        return;
    };
    if !disk.arm_fault(op, error) {
        return;
    }
    cluster.recorder.event(EventKind::Fault {
        description: format!("disk of {id}: {op:?} fails with {error:?}"),
    });
    let cluster = cluster.clone();
    tokio::spawn(async move {
        let step = Duration::from_millis(100);
        let mut waited_since_fired = Duration::ZERO;
        let mut waited = Duration::ZERO;
        loop {
            tokio::time::sleep(step).await;
            waited += step;
            if let Some(stopped) = disk.stopped() {
                cluster.crash(id);
                disk.clear_fault();
                cluster.recorder.event(EventKind::Fault {
                    description: format!(
                        "node {id} stopped on its disk error ({stopped}); disk mended"
                    ),
                });
                restart_later(&cluster, id, down_for);
                return;
            }
            match disk.fault_fired() {
                Some(what) => {
                    waited_since_fired += step;
                    if waited_since_fired >= STOP_AFTER_DISK_ERROR {
                        cluster.recorder.lock().violations.push(format!(
                            "node {id} went on for {STOP_AFTER_DISK_ERROR:?} after a failed {what}"
                        ));
                        disk.clear_fault();
                        return;
                    }
                }
                None if waited >= STOP_AFTER_DISK_ERROR => {
                    disk.clear_fault();
                    return;
                }
                None => {}
            }
        }
    });
}

/// Injects faults until `until` (simulated time since the start).
pub async fn inject(cluster: Cluster, swarm: Swarm, until: Duration) {
    let mut kinds: Vec<&str> = Vec::new();
    for (enabled, kind) in [
        (swarm.partitions, "partition"),
        (swarm.one_way_partitions, "one-way"),
        (swarm.isolate_leader, "isolate-leader"),
        (swarm.bridge, "bridge"),
        (swarm.crashes, "crash"),
        (swarm.power_loss, "power-loss"),
        (swarm.pauses, "pause"),
        (swarm.disk_errors, "disk-error"),
    ] {
        if enabled {
            kinds.push(kind);
        }
    }
    if kinds.is_empty() {
        return;
    }
    loop {
        let wait = {
            let mut rng = madsim::rand::thread_rng();
            let mean = swarm.fault_interval.as_micros() as u64;
            Duration::from_micros(rng.gen_range(mean / 2..=mean * 3 / 2))
        };
        tokio::time::sleep(wait).await;
        if Duration::from_micros(cluster.recorder.now_us()) >= until {
            return;
        }
        let mut rng = madsim::rand::thread_rng();
        // Partitions heal half the time, so that the cluster also gets to make progress.
        if !cluster.network.blocked().is_empty() && rng.gen_bool(0.5) {
            heal(&cluster);
            continue;
        }
        let Some(kind) = kinds.choose(&mut rng).copied() else {
            return;
        };
        let mut members = cluster.active_ids();
        members.shuffle(&mut rng);
        let n = members.len();
        if n < 2 {
            continue;
        }
        let down_for = Duration::from_millis(rng.gen_range(100..=4_000));
        match kind {
            "partition" => {
                let size = rng.gen_range(1..=n / 2);
                let (a, b) = members.split_at(size);
                partition(&cluster, format!("{a:?} | {b:?}"), cut(a, b));
            }
            "one-way" => {
                let size = rng.gen_range(1..=n / 2);
                let (a, b) = members.split_at(size);
                let links: Vec<(u64, u64)> = a
                    .iter()
                    .flat_map(|x| b.iter().map(move |y| (*x, *y)))
                    .collect();
                partition(&cluster, format!("{a:?} -/-> {b:?} (one way)"), links);
            }
            "isolate-leader" => {
                let Some(leader) = cluster.leader() else {
                    continue;
                };
                let rest: Vec<u64> = members.iter().copied().filter(|m| *m != leader).collect();
                partition(
                    &cluster,
                    format!("leader {leader} isolated"),
                    cut(&[leader], &rest),
                );
            }
            "bridge" => {
                if n < 3 {
                    continue;
                }
                let bridge = members[0];
                let half = (n - 1) / 2;
                let (a, b) = members[1..].split_at(half.max(1));
                partition(
                    &cluster,
                    format!("{a:?} | {b:?} bridged by {bridge}"),
                    cut(a, b),
                );
            }
            "crash" => {
                let up = cluster.up_ids();
                if let Some(id) = up.choose(&mut rng).copied() {
                    cluster.crash(id);
                    restart_later(&cluster, id, down_for);
                }
            }
            "power-loss" => {
                let up = cluster.up_ids();
                let count = if rng.gen_bool(0.5) {
                    up.len()
                } else {
                    up.len() / 2 + 1
                };
                let victims: Vec<u64> = up.choose_multiple(&mut rng, count).copied().collect();
                cluster.recorder.event(EventKind::Fault {
                    description: format!("power loss on {victims:?}"),
                });
                for id in victims {
                    cluster.crash(id);
                    restart_later(&cluster, id, down_for);
                }
            }
            "pause" => {
                let up = cluster.up_ids();
                if let Some(id) = up.choose(&mut rng).copied() {
                    cluster.pause(id);
                    resume_later(&cluster, id, down_for);
                }
            }
            "disk-error" => {
                let up = cluster.up_ids();
                let Some(id) = up.choose(&mut rng).copied() else {
                    continue;
                };
                let op = [FaultOp::Write, FaultOp::Sync, FaultOp::Rename][rng.gen_range(0..3)];
                let error = if rng.gen_bool(0.5) {
                    FaultError::NoSpace
                } else {
                    FaultError::Io
                };
                disk_error(&cluster, id, op, error, down_for);
            }
            _ => {}
        }
    }
}
