//! The simulated network behind the `Transport` port, with the fault layer: partitions (any set
//! of blocked directed links), message drop, delay, reorder and duplication. Peers are reached
//! by URL, as in a real cluster: a member added with a wrong peer URL is simply unreachable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use madsim::rand::Rng;
use quorumkv::io::transport::{Inbox, INBOX_BATCHES};
use quorumkv::io::Transport;
use raft::eraftpb::{Message, MessageType};

use crate::recorder::Recorder;
use crate::schedule::{Delivery, NetworkPlan};
use tokio::sync::mpsc;

/// Link faults in force; all zero is a perfect network.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkFaults {
    pub drop_probability: f64,
    pub duplicate_probability: f64,
    pub delay_min: Duration,
    pub delay_max: Duration,
    /// Let batches on one link overtake each other.
    pub reorder: bool,
}

type Queued = (tokio::time::Instant, String, Vec<Message>);

#[derive(Default)]
struct Net {
    /// Who listens on each peer URL now.
    listeners: HashMap<String, mpsc::Sender<Vec<Message>>>,
    /// The cluster's idea of each member's peer URL.
    addresses: BTreeMap<u64, String>,
    blocked: BTreeSet<(u64, u64)>,
    faults: LinkFaults,
    /// Per directed link, the queue its in-order deliveries go through.
    links: HashMap<(u64, u64), mpsc::UnboundedSender<Queued>>,
    stats: NetStats,
    /// Votes granted are reported here (the raft-safety checker's one-vote-per-term rule).
    recorder: Option<Recorder>,
    /// With this probability a node that just granted a vote is named on the channel (the
    /// simulator crashes it at that critical moment).
    crash_after_vote: Option<(f64, mpsc::UnboundedSender<u64>)>,
    /// A fuzzed schedule's say over each batch, before the link faults.
    plan: Option<NetworkPlan>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct NetStats {
    pub sent: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub duplicated: u64,
}

#[derive(Clone, Default)]
pub struct SimNetwork {
    net: Arc<Mutex<Net>>,
}

impl SimNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Net> {
        self.net.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts listening on `url` (replacing an earlier listener: a restarted node).
    pub fn listen(&self, url: &str) -> Inbox {
        let (tx, rx) = mpsc::channel(INBOX_BATCHES);
        self.lock().listeners.insert(url.to_string(), tx);
        rx
    }

    pub fn stop_listening(&self, url: &str) {
        self.lock().listeners.remove(url);
    }

    /// Records the peer URL the cluster uses for `member`.
    pub fn set_address(&self, member: u64, url: &str) {
        self.lock().addresses.insert(member, url.to_string());
    }

    pub fn block(&self, links: impl IntoIterator<Item = (u64, u64)>) {
        self.lock().blocked.extend(links);
    }

    pub fn heal(&self) {
        self.lock().blocked.clear();
    }

    pub fn blocked(&self) -> Vec<(u64, u64)> {
        self.lock().blocked.iter().copied().collect()
    }

    pub fn set_faults(&self, faults: LinkFaults) {
        self.lock().faults = faults;
    }

    pub fn faults(&self) -> LinkFaults {
        self.lock().faults.clone()
    }

    pub fn set_recorder(&self, recorder: Recorder) {
        self.lock().recorder = Some(recorder);
    }

    pub fn crash_after_vote(&self, probability: f64, crashes: mpsc::UnboundedSender<u64>) {
        self.lock().crash_after_vote = Some((probability, crashes));
    }

    /// Lets a schedule decide each batch's fate (`None`: back to the link faults).
    pub fn set_plan(&self, plan: Option<NetworkPlan>) {
        self.lock().plan = plan;
    }

    pub fn has_plan(&self) -> bool {
        self.lock().plan.is_some()
    }

    pub fn stats(&self) -> NetStats {
        self.lock().stats
    }

    /// The transport member `from` sends through.
    pub fn transport(&self, from: u64) -> Arc<dyn Transport> {
        Arc::new(NodeTransport {
            from,
            network: self.clone(),
        })
    }

    fn send(&self, from: u64, to: u64, batch: Vec<Message>) {
        let mut rng = madsim::rand::thread_rng();
        let mut net = self.lock();
        net.stats.sent += 1;
        for msg in batch
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgRequestVoteResponse && !m.reject)
        {
            if let Some(recorder) = &net.recorder {
                recorder.vote(from, msg.term, to);
            }
            if let Some((probability, crashes)) = &net.crash_after_vote {
                if rng.gen_bool(*probability) {
                    let _ = crashes.send(from);
                }
            }
        }
        if net.blocked.contains(&(from, to)) || rng.gen_bool(net.faults.drop_probability) {
            net.stats.dropped += 1;
            return;
        }
        let Some(url) = net.addresses.get(&to).cloned() else {
            net.stats.dropped += 1;
            return;
        };
        if let Some(delivery) = net.plan.as_ref().and_then(|plan| plan.next()) {
            let delays = match delivery {
                Delivery::Drop => {
                    net.stats.dropped += 1;
                    return;
                }
                Delivery::After(delay) => vec![delay],
                Delivery::Twice(first, second) => {
                    net.stats.duplicated += 1;
                    vec![first, second]
                }
            };
            for delay in delays {
                let (network, url, batch) = (self.clone(), url.clone(), batch.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    network.deliver(from, to, &url, batch);
                });
            }
            return;
        }
        let copies = if rng.gen_bool(net.faults.duplicate_probability) {
            net.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let faults = &net.faults;
            let delay = if faults.delay_max > faults.delay_min {
                rng.gen_range(faults.delay_min..=faults.delay_max)
            } else {
                faults.delay_min
            };
            let at = tokio::time::Instant::now() + delay;
            let batch = batch.clone();
            if faults.reorder {
                let network = self.clone();
                let url = url.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    network.deliver(from, to, &url, batch);
                });
                continue;
            }
            // In order: one task per link delivers its batches one after another.
            let link = net
                .links
                .get(&(from, to))
                .filter(|l| !l.is_closed())
                .cloned();
            let link = match link {
                Some(link) => link,
                None => {
                    let (link, mut queued) = mpsc::unbounded_channel::<Queued>();
                    let network = self.clone();
                    tokio::spawn(async move {
                        while let Some((at, url, batch)) = queued.recv().await {
                            tokio::time::sleep_until(at).await;
                            network.deliver(from, to, &url, batch);
                        }
                    });
                    net.links.insert((from, to), link.clone());
                    link
                }
            };
            let _ = link.send((at, url.clone(), batch));
        }
    }

    fn deliver(&self, from: u64, to: u64, url: &str, batch: Vec<Message>) {
        let mut net = self.lock();
        // A partition that began while the batch was in flight drops it too.
        if net.blocked.contains(&(from, to)) {
            net.stats.dropped += 1;
            return;
        }
        let Some(listener) = net.listeners.get(url) else {
            net.stats.dropped += 1;
            return;
        };
        if listener.try_send(batch).is_ok() {
            net.stats.delivered += 1;
        } else {
            net.stats.dropped += 1;
        }
    }
}

struct NodeTransport {
    from: u64,
    network: SimNetwork,
}

impl Transport for NodeTransport {
    fn send(&self, to: u64, batch: Vec<Message>) {
        self.network.send(self.from, to, batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[madsim::test]
    async fn sim_network_passes_conformance() {
        let network = SimNetwork::new();
        network.set_address(2, "http://n2:2380");
        let mut inbox = network.listen("http://n2:2380");
        let transport = network.transport(1);
        quorumkv::io::transport::conformance::run_all(transport.as_ref(), &mut inbox).await;
    }

    #[madsim::test]
    async fn a_blocked_link_drops_one_way_only() {
        let network = SimNetwork::new();
        network.set_address(1, "http://n1:2380");
        network.set_address(2, "http://n2:2380");
        let mut inbox1 = network.listen("http://n1:2380");
        let mut inbox2 = network.listen("http://n2:2380");
        network.block([(1, 2)]);
        network.transport(1).send(2, vec![Message::default()]);
        network.transport(2).send(1, vec![Message::default()]);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(inbox2.try_recv().is_err(), "1 -> 2 is blocked");
        assert!(inbox1.try_recv().is_ok(), "2 -> 1 is open");
    }

    #[madsim::test]
    async fn a_wrong_address_reaches_nobody() {
        let network = SimNetwork::new();
        network.set_address(2, "http://10.0.0.99:2380");
        let mut inbox = network.listen("http://n2:2380");
        network.transport(1).send(2, vec![Message::default()]);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(inbox.try_recv().is_err());
        assert_eq!(network.stats().dropped, 1);
    }
}
