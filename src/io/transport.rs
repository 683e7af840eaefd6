//! The `Transport` port: raft message batches to peers.
//!
//! Inbound messages reach a node through the channel it was built with; the transport only
//! moves batches there. The TCP adapter for real clusters lives with the peer server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;

/// Contract: `send` never blocks and never fails loudly; a batch may be dropped (a full queue,
/// an unreachable peer), which raft tolerates by retrying. Batches to one peer that do arrive,
/// arrive in the order they were sent, each whole.
pub trait Transport: Send + Sync {
    fn send(&self, to: u64, batch: Vec<Message>);
}

/// Inbound queue depth per node, in batches.
pub const INBOX_BATCHES: usize = 4096;

pub type Inbox = mpsc::Receiver<Vec<Message>>;

/// Encodes a batch as peers exchange it: `[message count u32 LE]`, then per message
/// `[length u32 LE][protobuf bytes]` (the TCP transport frames this).
pub fn encode_batch(batch: &[Message]) -> Vec<u8> {
    // Encoding a proto3 message does not fail; one that did would be left out (raft resends).
    let encoded: Vec<Vec<u8>> = batch
        .iter()
        .filter_map(|msg| msg.write_to_bytes().ok())
        .collect();
    let mut out = (encoded.len() as u32).to_le_bytes().to_vec();
    for bytes in encoded {
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

/// Decodes a batch from a peer; `None` when the bytes are not one. Whatever it returns is still
/// untrusted: the node checks each message before raft sees it (`RaftCore::step_from_peer`).
pub fn decode_batch(mut data: &[u8]) -> Option<Vec<Message>> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if data.len() < n {
            return None;
        }
        let (head, rest) = data.split_at(n);
        *data = rest;
        Some(head)
    }
    let count = u32::from_le_bytes(take(&mut data, 4)?.try_into().ok()?) as usize;
    let mut batch = Vec::with_capacity(count.min(4096));
    for _ in 0..count {
        let len = u32::from_le_bytes(take(&mut data, 4)?.try_into().ok()?) as usize;
        batch.push(Message::parse_from_bytes(take(&mut data, len)?).ok()?);
    }
    data.is_empty().then_some(batch)
}

/// An in-process transport: every node of one process registers an inbox.
#[derive(Clone, Default)]
pub struct LocalTransport {
    inboxes: Arc<Mutex<HashMap<u64, mpsc::Sender<Vec<Message>>>>>,
    /// Nodes cut off from everyone: batches to or from them are dropped.
    isolated: Arc<Mutex<std::collections::HashSet<u64>>>,
}

impl LocalTransport {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) the inbox of node `id`.
    pub fn register(&self, id: u64) -> Inbox {
        let (tx, rx) = mpsc::channel(INBOX_BATCHES);
        self.lock().insert(id, tx);
        rx
    }

    pub fn unregister(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Cuts node `id` off (`true`) or reconnects it (`false`).
    pub fn set_isolated(&self, id: u64, isolated: bool) {
        let mut set = self.isolated.lock().unwrap_or_else(|p| p.into_inner());
        if isolated {
            set.insert(id);
        } else {
            set.remove(&id);
        }
    }

    fn is_cut(&self, to: u64, batch: &[Message]) -> bool {
        let set = self.isolated.lock().unwrap_or_else(|p| p.into_inner());
        !set.is_empty() && (set.contains(&to) || batch.iter().any(|m| set.contains(&m.from)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::Sender<Vec<Message>>>> {
        self.inboxes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Transport for LocalTransport {
    fn send(&self, to: u64, batch: Vec<Message>) {
        if self.is_cut(to, &batch) {
            return;
        }
        let sender = self.lock().get(&to).cloned();
        if let Some(sender) = sender {
            // A full inbox drops the batch; raft retransmits.
            let _ = sender.try_send(batch);
        }
    }
}

#[doc(hidden)]
pub mod conformance {
    use super::*;

    /// `inbox_of_2` receives what `transport.send(2, ..)` sends.
    pub async fn run_all(transport: &dyn Transport, inbox_of_2: &mut Inbox) {
        for i in 0..10u64 {
            let msg = Message {
                index: i,
                ..Default::default()
            };
            transport.send(2, vec![msg.clone(), msg]);
        }
        for i in 0..10u64 {
            let batch = inbox_of_2
                .recv()
                .await
                .expect("transport conformance: batch lost");
            assert_eq!(batch.len(), 2, "transport conformance: batch split");
            assert_eq!(
                batch[0].index, i,
                "transport conformance: batches reordered"
            );
        }
        transport.send(99, vec![Message::default()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_transport_passes_conformance() {
        let transport = LocalTransport::new();
        let mut inbox = transport.register(2);
        conformance::run_all(&transport, &mut inbox).await;
    }
}
