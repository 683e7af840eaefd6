//! Fault schedules read from bytes, for coverage-guided fuzzing (`fuzz/`'s `replication`
//! target) and for replaying what the fuzzer found (`ci/sim schedule FILE`).
//!
//! A random-fault run draws its faults from the seed; here they come from the input instead,
//! step by step: waits, partitions (both ways or one way), heals, crashes and restarts, pauses,
//! a power loss, leader transfers and membership changes. The network consults the input too:
//! each batch sent takes one byte that says deliver (after how long: different delays reorder),
//! drop or duplicate. The workload, the liveness phase and every checker are those of a normal
//! run; the Raft safety facts are also checked after every step, so a schedule stops at the
//! first violation.
//!
//! Layout: `[members][seed u64 LE][step count]`, two bytes per step (kind, argument), then the
//! network's bytes. Short inputs decode too: missing bytes read as zeros.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft::eraftpb::ConfChangeType;

use crate::cluster::Cluster;
use crate::faults::{cut, heal, partition};
use crate::operator;
use crate::trace::EventKind;

/// Most steps one schedule has.
pub const MAX_STEPS: usize = 48;
/// Longest the stepped (safety) phase may last, simulated.
pub const MAX_SAFETY: Duration = Duration::from_secs(20);
/// Members a schedule may grow the cluster to.
const MAX_MEMBERS: usize = 6;

/// One action of a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Wait(Duration),
    /// Cut both ways between the members in the mask and the rest.
    Partition(u8),
    /// Cut from the members in the mask to the rest only.
    OneWay(u8),
    Heal,
    Crash(u64),
    Restart(u64),
    Pause(u64),
    Resume(u64),
    PowerLoss,
    Transfer(u64),
    AddLearner,
    Promote,
    Remove(u64),
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub nodes: usize,
    pub seed: u64,
    pub steps: Vec<Step>,
    /// One byte per batch sent during the stepped phase; when used up, batches are delivered.
    pub network: Vec<u8>,
}

fn byte(data: &[u8], at: usize) -> u8 {
    data.get(at).copied().unwrap_or(0)
}

impl Schedule {
    pub fn decode(data: &[u8]) -> Schedule {
        let nodes = if byte(data, 0) % 4 == 3 { 5 } else { 3 };
        let mut seed = [0u8; 8];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = byte(data, 1 + i);
        }
        let count = (byte(data, 9) as usize).min(MAX_STEPS);
        let mut steps = Vec::with_capacity(count);
        for i in 0..count {
            let (kind, arg) = (byte(data, 10 + 2 * i), byte(data, 11 + 2 * i));
            let member = u64::from(arg) % MAX_MEMBERS as u64 + 1;
            steps.push(match kind % 16 {
                0..=3 => Step::Wait(Duration::from_millis(20 * (u64::from(arg) + 1))),
                4 => Step::Partition(arg),
                5 => Step::OneWay(arg),
                6 | 7 => Step::Heal,
                8 => Step::Crash(member),
                9 => Step::Restart(member),
                10 => Step::Pause(member),
                11 => Step::Resume(member),
                12 => Step::PowerLoss,
                13 => Step::Transfer(member),
                14 => {
                    if arg % 2 == 0 {
                        Step::AddLearner
                    } else {
                        Step::Promote
                    }
                }
                _ => Step::Remove(member),
            });
        }
        let network = data.get(10 + 2 * count..).unwrap_or(&[]).to_vec();
        Schedule {
            nodes,
            seed: u64::from_le_bytes(seed),
            steps,
            network,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "schedule of {} steps, {} network bytes",
            self.steps.len(),
            self.network.len()
        )
    }
}

/// What the network does with one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Deliver after this delay (batches on one link may overtake each other).
    After(Duration),
    Drop,
    /// Deliver twice, the second copy later.
    Twice(Duration, Duration),
}

/// The network's share of a schedule, consumed one byte per batch.
#[derive(Clone, Default)]
pub struct NetworkPlan {
    bytes: Arc<Mutex<(Vec<u8>, usize)>>,
}

impl NetworkPlan {
    pub fn new(bytes: Vec<u8>) -> Self {
        NetworkPlan {
            bytes: Arc::new(Mutex::new((bytes, 0))),
        }
    }

    /// The next batch's fate; `None` once the bytes are used up.
    pub fn next(&self) -> Option<Delivery> {
        let mut guard = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let (bytes, at) = &mut *guard;
        let b = *bytes.get(*at)?;
        *at += 1;
        let delay = Duration::from_micros(100 + 500 * u64::from(b >> 3));
        Some(match b & 7 {
            0..=4 => Delivery::After(delay),
            5 => Delivery::Drop,
            6 => Delivery::Twice(delay, delay * 2 + Duration::from_millis(1)),
            _ => Delivery::After(Duration::from_micros(100)),
        })
    }
}

fn members_in(mask: u8, members: &[u64]) -> (Vec<u64>, Vec<u64>) {
    members
        .iter()
        .copied()
        .partition(|id| mask & (1 << ((id - 1) % 8)) != 0)
}

/// Plays the steps; returns early once the Raft safety facts hold a violation.
pub async fn play(cluster: Cluster, schedule: Arc<Schedule>, initial: Vec<u64>) {
    let start = tokio::time::Instant::now();
    for step in &schedule.steps {
        if start.elapsed() >= MAX_SAFETY || !cluster.recorder.lock().violations.is_empty() {
            return;
        }
        let members = cluster.active_ids();
        let note = |description: String| cluster.recorder.event(EventKind::Fault { description });
        match step {
            Step::Wait(d) => tokio::time::sleep(*d).await,
            Step::Partition(mask) => {
                let (a, b) = members_in(*mask, &members);
                if !a.is_empty() && !b.is_empty() {
                    partition(&cluster, format!("{a:?} | {b:?}"), cut(&a, &b));
                }
            }
            Step::OneWay(mask) => {
                let (a, b) = members_in(*mask, &members);
                let links: Vec<(u64, u64)> = a
                    .iter()
                    .flat_map(|x| b.iter().map(move |y| (*x, *y)))
                    .collect();
                if !links.is_empty() {
                    partition(&cluster, format!("{a:?} -/-> {b:?} (one way)"), links);
                }
            }
            Step::Heal => heal(&cluster),
            Step::Crash(id) => {
                if cluster.up_ids().contains(id) {
                    cluster.crash(*id);
                }
            }
            Step::Restart(id) => {
                if cluster.down_ids().contains(id) {
                    cluster.start(*id).await;
                }
            }
            Step::Pause(id) => {
                if cluster.up_ids().contains(id) {
                    cluster.pause(*id);
                }
            }
            Step::Resume(id) => {
                if cluster.paused_ids().contains(id) {
                    cluster.resume(*id);
                }
            }
            Step::PowerLoss => {
                let up = cluster.up_ids();
                note(format!("power loss on {up:?}"));
                for id in up {
                    cluster.crash(id);
                }
            }
            Step::Transfer(to) => {
                let cluster = cluster.clone();
                let to = *to;
                tokio::spawn(async move { operator::transfer_leader(&cluster, to).await });
            }
            Step::AddLearner => {
                if members.len() < MAX_MEMBERS {
                    let id = cluster.ids().into_iter().max().unwrap_or(0) + 1;
                    // The id is taken here, before the next step: an AddLearner right after
                    // this one adds the member after it (found by fuzzing: two processes both
                    // started as member 6, and the cluster never settled).
                    if cluster.add(id, vec![]) {
                        let cluster = cluster.clone();
                        tokio::spawn(async move { operator::join_as_learner(&cluster, id).await });
                    }
                }
            }
            Step::Promote => {
                let (_, learners) = cluster.configuration(&initial);
                if let Some(learner) = learners.first().copied() {
                    let cluster = cluster.clone();
                    tokio::spawn(async move {
                        operator::change(&cluster, learner, ConfChangeType::AddNode).await
                    });
                }
            }
            Step::Remove(id) => {
                let (voters, _) = cluster.configuration(&initial);
                if voters.len() > 3 && voters.contains(id) {
                    let cluster = cluster.clone();
                    let id = *id;
                    tokio::spawn(async move { operator::remove(&cluster, id).await });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a fuzz input's schedule as the `replication` target does.
    fn run_input(input: &[u8]) -> crate::run::RunReport {
        let schedule = Schedule::decode(input);
        crate::run::run(&crate::run::RunOptions {
            seed: schedule.seed,
            nodes: schedule.nodes,
            scenario: None,
            bug: None,
            safety: MAX_SAFETY,
            schedule: Some(Arc::new(schedule)),
            proxies: 0,
        })
    }

    /// Found by the `replication` fuzzer: two AddLearner steps in a row both took id 6 (the
    /// first had not made its host yet), so two processes ran as member 6 and the cluster
    /// never settled on a leader. Each now adds its own member.
    #[test]
    fn back_to_back_learner_additions_add_two_members() {
        let input = [
            0x0b, 0xad, 0x00, 0x00, 0x63, 0x30, 0x2e, 0x6b, 0x31, 0x6b, 0x31, 0x34, 0xee, 0x34,
            0xee,
        ];
        assert!(matches!(
            Schedule::decode(&input).steps[..3],
            [Step::Wait(_), Step::AddLearner, Step::AddLearner]
        ));
        let report = run_input(&input);
        assert!(report.passed, "{}", report.last_line());
    }

    /// Found by the `replication` fuzzer (a 60 s timeout): members agreed on a leader that
    /// refused the liveness checker's probe write at once for 0.6 simulated seconds, and the
    /// checker asked again in the same instant, millions of times.
    #[test]
    fn a_refused_liveness_probe_is_retried_after_a_pause() {
        let input = [
            0x6b, 0x31, 0x3f, 0x0d, 0x05, 0x7a, 0x33, 0x31, 0x3f, 0x0d, 0x05, 0x7a, 0xe0, 0x8c,
            0xd5, 0x82, 0xbd, 0xfa, 0xfe, 0xff, 0x00,
        ];
        let report = run_input(&input);
        assert!(report.passed, "{}", report.last_line());
        assert!(
            report.ops.len() < 100_000,
            "{} operations",
            report.ops.len()
        );
    }

    /// Found by the `replication` fuzzer: a Restart of member 4 ran while the AddLearner step
    /// just before it was still starting member 4, so two processes ran as member 4 and it
    /// never joined. A member being started is now started once.
    #[test]
    fn a_restart_while_a_learner_is_starting_makes_no_second_process() {
        let input = [
            0xc4, 0xb4, 0xd2, 0x35, 0x0a, 0x0a, 0x00, 0x7c, 0x00, 0x0d, 0x01, 0x5e, 0x5e, 0x7c,
            0xc9, 0xff,
        ];
        assert!(matches!(
            Schedule::decode(&input).steps[..3],
            [Step::Wait(_), Step::AddLearner, Step::Restart(4)]
        ));
        let report = run_input(&input);
        assert!(report.passed, "{}", report.last_line());
    }

    #[test]
    fn any_bytes_decode_within_bounds() {
        let schedule = Schedule::decode(&[]);
        assert_eq!((schedule.nodes, schedule.steps.len()), (3, 0));
        let data: Vec<u8> = (0..=255u8).cycle().take(400).collect();
        let schedule = Schedule::decode(&data);
        assert!(schedule.steps.len() <= MAX_STEPS);
        assert_eq!(schedule.network.len(), 400 - 10 - 2 * schedule.steps.len());
    }

    #[test]
    fn the_network_plan_runs_out_into_plain_delivery() {
        let plan = NetworkPlan::new(vec![5, 6, 0]);
        assert_eq!(plan.next(), Some(Delivery::Drop));
        assert!(matches!(plan.next(), Some(Delivery::Twice(..))));
        assert!(matches!(plan.next(), Some(Delivery::After(_))));
        assert_eq!(plan.next(), None);
    }
}
