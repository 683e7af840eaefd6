//! A snapshot's image, sent to a follower a chunk at a time beside raft's messages.
//!
//! When raft sends a follower a snapshot, its data names an image file (`image`). The shell
//! holds raft's message back and sends the image first: chunks of `chunk_bytes`, at most
//! `WINDOW_CHUNKS` ahead of what the follower acknowledged, read from the file as they go. The
//! follower writes each chunk to its part file in order and acknowledges how much it holds;
//! once it holds the whole image, checked against the length and CRC32C the leader named, it
//! says so, and the leader sends raft's message. Only then does the follower step it into raft.
//!
//! Chunks and acknowledgements travel through the `Transport` like raft's messages, so a
//! partition, a drop or a reorder hits them too: a chunk out of order is refused and the
//! follower names the offset it wants; a sender that hears nothing for `RESEND_TICKS` resends
//! from the last acknowledged offset, so a transfer cut by a partition resumes where it was.
//! A transfer the follower does not finish within raft's snapshot timeout (counted from the
//! last progress) is reported to raft as failed, and raft starts over with a fresh snapshot.
//! A member that restarts drops its part files: the transfer starts again from the beginning.
//!
//! On the wire a chunk is a `MsgUnreachable` and an acknowledgement a `MsgSnapStatus`, with the
//! payload in `context`: raft-rs only ever makes those types locally, so no peer's real raft
//! message is mistaken for one, and the shell takes them before raft could see them.

use std::collections::BTreeMap;
use std::sync::Arc;

use raft::eraftpb::{Message, MessageType};

use super::image::{ImageRef, ImageStore, ImageWriter};
use crate::hooks::{self, ImageEvent, Observation};
use crate::io::DiskFile;

const CHUNK_MAGIC: &[u8; 8] = b"QKVCHNK1";
const ACK_MAGIC: &[u8; 8] = b"QKVCACK1";
/// Chunk header: magic, index, image length, image CRC, offset.
const CHUNK_HEADER_BYTES: usize = 8 + 8 + 8 + 4 + 8;
const ACK_BYTES: usize = 8 + 8 + 8 + 1;
/// The chunk size in production: a peer frame each.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Chunks sent ahead of the follower's acknowledgement, at most: the bytes of an image in
/// memory (queued to the transport) on the leader are `WINDOW_CHUNKS * chunk_bytes`.
pub const WINDOW_CHUNKS: u64 = 8;
/// Image bytes sent to one follower and not yet acknowledged, at most (in production).
pub const TRANSFER_BYTES_PER_FOLLOWER: u64 = WINDOW_CHUNKS * CHUNK_BYTES as u64;
/// Ticks without an acknowledgement after which the sender resends from the last offset
/// acknowledged (a chunk or an acknowledgement was lost).
pub const RESEND_TICKS: usize = 5;

const ACK_COMPLETE: u8 = 1;
/// The follower got a chunk beyond what it holds: the sender goes back to `received`.
const ACK_GAP: u8 = 2;

/// One chunk of the image at `index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub index: u64,
    pub image: ImageRef,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The follower holds `received` bytes of the image at `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub index: u64,
    pub received: u64,
    flags: u8,
}

impl Ack {
    pub fn complete(&self) -> bool {
        self.flags & ACK_COMPLETE != 0
    }

    fn gap(&self) -> bool {
        self.flags & ACK_GAP != 0
    }
}

/// What a transfer message from a peer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum TransferMessage {
    Chunk(Chunk),
    Ack(Ack),
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
}

impl TransferMessage {
    /// A transfer message, if `msg` is one (`None` for raft's own messages). A message of a
    /// transfer's types whose payload is not well formed is `Some(Err)`: dropped.
    pub fn parse(msg: &Message) -> Option<Result<TransferMessage, String>> {
        let context: &[u8] = msg.context.as_ref();
        match msg.get_msg_type() {
            MessageType::MsgUnreachable => Some(Self::parse_chunk(context)),
            MessageType::MsgSnapStatus => Some(Self::parse_ack(context)),
            _ => None,
        }
    }

    fn parse_chunk(context: &[u8]) -> Result<TransferMessage, String> {
        if context.len() < CHUNK_HEADER_BYTES || !context.starts_with(CHUNK_MAGIC) {
            return Err("not a snapshot image chunk".into());
        }
        let malformed = || "a malformed snapshot image chunk".to_string();
        let index = u64_at(context, 8).ok_or_else(malformed)?;
        let len = u64_at(context, 16).ok_or_else(malformed)?;
        let crc = u32::from_le_bytes(context[24..28].try_into().map_err(|_| malformed())?);
        let offset = u64_at(context, 28).ok_or_else(malformed)?;
        let data = context[CHUNK_HEADER_BYTES..].to_vec();
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > len)
        {
            return Err(format!(
                "a snapshot image chunk at {offset} of {} bytes runs past the image's {len}",
                data.len()
            ));
        }
        Ok(TransferMessage::Chunk(Chunk {
            index,
            image: ImageRef { len, crc },
            offset,
            data,
        }))
    }

    fn parse_ack(context: &[u8]) -> Result<TransferMessage, String> {
        if context.len() != ACK_BYTES || !context.starts_with(ACK_MAGIC) {
            return Err("not a snapshot image acknowledgement".into());
        }
        let malformed = || "a malformed snapshot image acknowledgement".to_string();
        Ok(TransferMessage::Ack(Ack {
            index: u64_at(context, 8).ok_or_else(malformed)?,
            received: u64_at(context, 16).ok_or_else(malformed)?,
            flags: context[24],
        }))
    }
}

fn chunk_message(from: u64, to: u64, chunk: &Chunk) -> Message {
    let mut context = Vec::with_capacity(CHUNK_HEADER_BYTES + chunk.data.len());
    context.extend_from_slice(CHUNK_MAGIC);
    context.extend_from_slice(&chunk.index.to_le_bytes());
    context.extend_from_slice(&chunk.image.len.to_le_bytes());
    context.extend_from_slice(&chunk.image.crc.to_le_bytes());
    context.extend_from_slice(&chunk.offset.to_le_bytes());
    context.extend_from_slice(&chunk.data);
    let mut msg = Message {
        from,
        to,
        ..Default::default()
    };
    msg.set_msg_type(MessageType::MsgUnreachable);
    msg.context = context.into();
    msg
}

fn ack_message(from: u64, to: u64, ack: Ack) -> Message {
    let mut context = Vec::with_capacity(ACK_BYTES);
    context.extend_from_slice(ACK_MAGIC);
    context.extend_from_slice(&ack.index.to_le_bytes());
    context.extend_from_slice(&ack.received.to_le_bytes());
    context.push(ack.flags);
    let mut msg = Message {
        from,
        to,
        ..Default::default()
    };
    msg.set_msg_type(MessageType::MsgSnapStatus);
    msg.context = context.into();
    msg
}

/// An image on its way to one follower.
struct Outgoing {
    /// raft's message, sent once the follower holds the image.
    snapshot: Message,
    index: u64,
    image: ImageRef,
    file: Box<dyn DiskFile>,
    /// Bytes the follower acknowledged holding...
    acked: u64,
    /// ...and the offset of the next chunk to send.
    next: u64,
    ticks_without_progress: usize,
}

/// An image being received from the leader.
struct Incoming {
    from: u64,
    index: u64,
    image: ImageRef,
    writer: ImageWriter,
}

/// Counts, for the log and the simulator's report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TransferStats {
    pub chunks_sent: u64,
    pub resends: u64,
    pub images_sent: u64,
    pub images_received: u64,
}

/// The node's image transfers: at most one to each follower, and one from the leader.
pub struct Transfers {
    id: u64,
    images: Arc<ImageStore>,
    chunk_bytes: usize,
    outgoing: BTreeMap<u64, Outgoing>,
    incoming: Option<Incoming>,
    /// The last image received whole (index and what it is): raft's snapshot for it may go in.
    received: Option<(u64, ImageRef)>,
    pub stats: TransferStats,
}

impl Transfers {
    pub fn new(id: u64, images: Arc<ImageStore>, chunk_bytes: usize) -> Self {
        Transfers {
            id,
            images,
            chunk_bytes: chunk_bytes.max(1),
            outgoing: BTreeMap::new(),
            incoming: None,
            received: None,
            stats: TransferStats::default(),
        }
    }

    /// Does raft's outgoing `msg` need its image sent first?
    pub fn needs_image(msg: &Message) -> bool {
        msg.get_msg_type() == MessageType::MsgSnapshot
            && ImageRef::parse(&msg.get_snapshot().data).is_some()
    }

    /// raft sends `snapshot` (whose data names an image): starts sending the image, or goes on
    /// with the transfer of the same image already under way. Returns the chunks to send, or
    /// `Err` when the image cannot be read (the snapshot naming it must not be offered again;
    /// raft's snapshot timeout reports this one failed).
    pub fn start(&mut self, snapshot: Message) -> Result<Vec<Message>, ()> {
        let to = snapshot.to;
        let index = snapshot.get_snapshot().get_metadata().index;
        let Some(image) = ImageRef::parse(&snapshot.get_snapshot().data) else {
            return Ok(vec![snapshot]);
        };
        if let Some(out) = self.outgoing.get_mut(&to) {
            if out.index == index && out.image == image {
                out.snapshot = snapshot;
                return Ok(Vec::new());
            }
        }
        let file = match self.images.open_to_send(index) {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(to = format!("{to:x}"), index, error = %e, "cannot send a snapshot image");
                self.outgoing.remove(&to);
                return Err(());
            }
        };
        tracing::info!(
            to = format!("{to:x}"),
            index,
            bytes = image.len,
            "sending a snapshot image"
        );
        hooks::observe(|| Observation::ImageTransfer {
            node: self.id,
            event: ImageEvent::Started,
        });
        self.outgoing.insert(
            to,
            Outgoing {
                snapshot,
                index,
                image,
                file,
                acked: 0,
                next: 0,
                ticks_without_progress: 0,
            },
        );
        Ok(self.fill_window(to))
    }

    /// Reports the image bytes in flight (sent, not acknowledged) to `/metrics`.
    fn note_memory(&self) {
        let in_flight: u64 = self.outgoing.values().map(|o| o.next - o.acked).sum();
        let receiving = self.incoming.as_ref().map_or(0, |i| i.writer.buffered());
        crate::metrics::memory::MEMORY
            .snapshot_transfer
            .set(in_flight + receiving as u64);
    }

    /// Chunks from `next` up to the window's end.
    fn fill_window(&mut self, to: u64) -> Vec<Message> {
        let chunks = self.fill_window_unnoted(to);
        self.note_memory();
        chunks
    }

    fn fill_window_unnoted(&mut self, to: u64) -> Vec<Message> {
        let (id, chunk_bytes) = (self.id, self.chunk_bytes as u64);
        let Some(out) = self.outgoing.get_mut(&to) else {
            return Vec::new();
        };
        let mut chunks = Vec::new();
        let window_end = out
            .acked
            .saturating_add(WINDOW_CHUNKS * chunk_bytes)
            .min(out.image.len);
        // An empty image is still sent as one (empty) chunk, which the follower acknowledges.
        while out.next < window_end || (out.image.len == 0 && out.next == 0 && chunks.is_empty()) {
            let want = (window_end - out.next).min(chunk_bytes) as usize;
            let mut data = vec![0u8; want];
            match out.file.read_at(out.next, &mut data) {
                Ok(n) if n == want => {}
                Ok(_) | Err(_) => {
                    tracing::warn!(
                        to = format!("{to:x}"),
                        index = out.index,
                        "cannot read the snapshot image to send; the transfer stops"
                    );
                    self.outgoing.remove(&to);
                    return chunks;
                }
            }
            let chunk = Chunk {
                index: out.index,
                image: out.image,
                offset: out.next,
                data,
            };
            out.next += want as u64;
            self.stats.chunks_sent += 1;
            chunks.push(chunk_message(id, to, &chunk));
            if want == 0 {
                break;
            }
        }
        chunks
    }

    /// A follower's acknowledgement: more chunks, or raft's message once it holds the image.
    /// `true` in the second element when the transfer progressed.
    pub fn on_ack(&mut self, from: u64, ack: Ack) -> (Vec<Message>, bool) {
        let Some(out) = self.outgoing.get_mut(&from) else {
            return (Vec::new(), false);
        };
        if ack.index != out.index {
            return (Vec::new(), false);
        }
        if ack.complete() {
            let out = self.outgoing.remove(&from).expect("present");
            self.note_memory();
            self.stats.images_sent += 1;
            tracing::info!(
                to = format!("{from:x}"),
                index = out.index,
                bytes = out.image.len,
                "snapshot image sent"
            );
            return (vec![out.snapshot], true);
        }
        let progressed = ack.received > out.acked;
        if progressed {
            out.acked = ack.received.min(out.image.len);
            out.ticks_without_progress = 0;
        }
        if ack.gap() {
            // The follower holds less than the chunk it got (a chunk was lost, or it restarted
            // and lost what it held): go back to what it holds.
            out.acked = ack.received.min(out.image.len);
            out.next = out.acked;
        }
        out.next = out.next.max(out.acked);
        (self.fill_window(from), progressed)
    }

    /// A tick: transfers that heard nothing for `RESEND_TICKS` resend from the last offset
    /// acknowledged. `waiting(to)` says whether raft still waits on its snapshot to `to`;
    /// transfers it gave up on stop.
    pub fn tick(&mut self, waiting: impl Fn(u64) -> bool) -> Vec<Message> {
        self.outgoing.retain(|to, _| waiting(*to));
        self.note_memory();
        let mut resend = Vec::new();
        for (to, out) in self.outgoing.iter_mut() {
            out.ticks_without_progress += 1;
            if out.ticks_without_progress >= RESEND_TICKS {
                out.ticks_without_progress = 0;
                out.next = out.acked;
                resend.push(*to);
            }
        }
        let mut messages = Vec::new();
        for to in resend {
            self.stats.resends += 1;
            hooks::observe(|| Observation::ImageTransfer {
                node: self.id,
                event: ImageEvent::Resent,
            });
            messages.extend(self.fill_window(to));
        }
        messages
    }

    /// A chunk from the leader: written if it is the next one; the acknowledgement to send.
    pub fn on_chunk(&mut self, from: u64, chunk: Chunk) -> Option<Message> {
        let id = self.id;
        let ack = |index, received, flags| {
            Some(ack_message(
                id,
                from,
                Ack {
                    index,
                    received,
                    flags,
                },
            ))
        };
        if self.received == Some((chunk.index, chunk.image)) {
            // The sender missed the last acknowledgement.
            return ack(chunk.index, chunk.image.len, ACK_COMPLETE);
        }
        let same = self
            .incoming
            .as_ref()
            .is_some_and(|i| i.from == from && i.index == chunk.index && i.image == chunk.image);
        if !same {
            if chunk.offset != 0 {
                return ack(chunk.index, 0, ACK_GAP);
            }
            match self.images.receive(chunk.index) {
                Ok(writer) => {
                    tracing::info!(
                        from = format!("{from:x}"),
                        index = chunk.index,
                        bytes = chunk.image.len,
                        "receiving a snapshot image"
                    );
                    self.incoming = Some(Incoming {
                        from,
                        index: chunk.index,
                        image: chunk.image,
                        writer,
                    });
                }
                Err(e) => {
                    tracing::warn!(index = chunk.index, error = %e, "cannot receive a snapshot image");
                    return None;
                }
            }
        }
        let incoming = self.incoming.as_mut().expect("set above");
        let held = incoming.writer.len();
        if chunk.offset != held {
            let flags = if chunk.offset > held { ACK_GAP } else { 0 };
            return ack(chunk.index, held, flags);
        }
        if let Err(e) = std::io::Write::write_all(&mut incoming.writer, &chunk.data) {
            tracing::warn!(index = chunk.index, error = %e, "cannot write a snapshot image");
            self.incoming = None;
            return None;
        }
        let held = incoming.writer.len();
        if held < chunk.image.len {
            return ack(chunk.index, held, 0);
        }
        let incoming = self.incoming.take().expect("set above");
        match self
            .images
            .received(incoming.index, incoming.writer, incoming.image)
        {
            Ok(image) => {
                self.stats.images_received += 1;
                hooks::observe(|| Observation::ImageTransfer {
                    node: id,
                    event: ImageEvent::Received,
                });
                self.received = Some((incoming.index, image));
                tracing::info!(
                    index = incoming.index,
                    bytes = image.len,
                    "snapshot image received"
                );
                ack(incoming.index, image.len, ACK_COMPLETE)
            }
            Err(e) => {
                tracing::warn!(index = incoming.index, error = %e, "a received snapshot image is damaged; it is asked for again");
                ack(incoming.index, 0, ACK_GAP)
            }
        }
    }

    /// May raft's snapshot `msg` from a peer go into raft? Only once its image is here whole
    /// (a snapshot without an image always may).
    pub fn may_step(&self, msg: &Message) -> bool {
        if msg.get_msg_type() != MessageType::MsgSnapshot {
            return true;
        }
        let snapshot = msg.get_snapshot();
        match ImageRef::parse(&snapshot.data) {
            None => true,
            Some(image) => self.received == Some((snapshot.get_metadata().index, image)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::StdDisk;
    use raft::eraftpb::{Snapshot, SnapshotMetadata};
    use std::io::Read;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("qkv-transfer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    fn snapshot_message(index: u64, image: ImageRef) -> Message {
        let meta = SnapshotMetadata {
            index,
            term: 2,
            ..Default::default()
        };
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(meta);
        snapshot.data = image.descriptor().into();
        let mut msg = Message {
            from: 1,
            to: 2,
            term: 2,
            ..Default::default()
        };
        msg.set_msg_type(MessageType::MsgSnapshot);
        msg.set_snapshot(snapshot);
        msg
    }

    /// Moves messages between a leader's and a follower's transfers; `lose(n)` drops the n-th
    /// message on the way (counting both directions) and `swap` reorders each pair of chunks.
    fn run(
        leader: &mut Transfers,
        follower: &mut Transfers,
        first: Vec<Message>,
        lose: impl Fn(u64) -> bool,
        swap: bool,
    ) -> (Option<Message>, u64, u64) {
        let mut in_flight = first;
        let (mut sent, mut ticks, mut delivered) = (0u64, 0u64, 0u64);
        for _ in 0..100_000 {
            if in_flight.is_empty() {
                ticks += 1;
                in_flight = leader.tick(|_| true);
                continue;
            }
            if swap && in_flight.len() >= 2 {
                in_flight.swap(0, 1);
            }
            let mut next = Vec::new();
            for msg in in_flight.drain(..) {
                sent += 1;
                if lose(sent) {
                    continue;
                }
                match TransferMessage::parse(&msg) {
                    Some(Ok(TransferMessage::Chunk(chunk))) => {
                        delivered += 1;
                        next.extend(follower.on_chunk(msg.from, chunk));
                    }
                    Some(Ok(TransferMessage::Ack(ack))) => {
                        let (more, _) = leader.on_ack(msg.from, ack);
                        for m in more {
                            if m.get_msg_type() == MessageType::MsgSnapshot {
                                return (Some(m), ticks, delivered);
                            }
                            next.push(m);
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            in_flight = next;
        }
        (None, ticks, delivered)
    }

    fn setup(
        name: &str,
        len: usize,
        chunk_bytes: usize,
    ) -> (Transfers, Transfers, Message, Vec<u8>) {
        let leader_dir = temp_dir(&format!("{name}-leader"));
        let follower_dir = temp_dir(&format!("{name}-follower"));
        let leader_images = ImageStore::new(StdDisk::shared(), &leader_dir);
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
        let image = leader_images
            .write(40, |out| std::io::Write::write_all(out, &data))
            .expect("image");
        let leader = Transfers::new(1, leader_images, chunk_bytes);
        let follower = Transfers::new(
            2,
            ImageStore::new(StdDisk::shared(), &follower_dir),
            chunk_bytes,
        );
        (leader, follower, snapshot_message(40, image), data)
    }

    fn received_image(follower: &Transfers, msg: &Message) -> Vec<u8> {
        assert!(
            follower.may_step(msg),
            "the image is whole before raft's message goes in"
        );
        let image = ImageRef::parse(&msg.get_snapshot().data).expect("descriptor");
        let mut back = Vec::new();
        follower
            .images
            .open(40, image)
            .expect("open")
            .read_to_end(&mut back)
            .expect("read");
        back
    }

    #[test]
    fn an_image_many_windows_long_arrives_whole_before_raft_message() {
        // 40 windows of 8 chunks of 4 KiB, and a short last chunk.
        let (mut leader, mut follower, msg, data) = setup("whole", 40 * 8 * 4096 + 100, 4096);
        assert!(Transfers::needs_image(&msg));
        assert!(!follower.may_step(&msg), "no image yet");
        let first = leader.start(msg.clone()).expect("the image is there");
        assert_eq!(first.len() as u64, WINDOW_CHUNKS, "one window at first");
        let (snapshot, ticks, _) = run(&mut leader, &mut follower, first, |_| false, false);
        assert_eq!(
            snapshot.as_ref(),
            Some(&msg),
            "raft's message follows the image"
        );
        assert_eq!(ticks, 0, "nothing lost, nothing resent");
        assert!(received_image(&follower, &msg) == data);
        assert_eq!(leader.stats.chunks_sent, 40 * 8 + 1);
    }

    #[test]
    fn lost_and_reordered_chunks_and_acks_are_resent_from_the_last_acknowledged_offset() {
        let (mut leader, mut follower, msg, data) = setup("lossy", 300_000, 1000);
        let first = leader.start(msg.clone()).expect("the image is there");
        // Every 7th message lost (chunks and acknowledgements alike), chunks reordered.
        let (snapshot, ticks, _) = run(&mut leader, &mut follower, first, |n| n % 7 == 0, true);
        assert_eq!(snapshot.as_ref(), Some(&msg));
        assert!(
            ticks > 0 || leader.stats.chunks_sent > 300,
            "losses cost resends"
        );
        assert!(received_image(&follower, &msg) == data);
    }

    #[test]
    fn a_transfer_cut_off_resumes_where_it_stopped() {
        let (mut leader, mut follower, msg, data) = setup("cut", 200 * 1024, 1024);
        let first = leader.start(msg.clone()).expect("the image is there");
        // A partition: everything from the 50th message to the 400th is lost.
        let (snapshot, _, delivered) = run(
            &mut leader,
            &mut follower,
            first,
            |n| (150..500).contains(&n),
            false,
        );
        assert_eq!(snapshot.as_ref(), Some(&msg));
        assert!(received_image(&follower, &msg) == data);
        // Resumed, not restarted: the ~75 chunks that arrived before the cut are not sent
        // again (at most a window's worth or two is).
        assert!(leader.stats.resends > 0, "{:?}", leader.stats);
        assert!(
            delivered <= 200 + 2 * WINDOW_CHUNKS,
            "{delivered} chunks delivered"
        );
    }

    #[test]
    fn a_follower_that_restarts_mid_transfer_gets_the_image_from_the_start() {
        let (mut leader, mut follower, msg, data) = setup("restart", 64 * 1024, 1024);
        let mut in_flight = leader.start(msg.clone()).expect("the image is there");
        // Half the image arrives...
        for _ in 0..4 {
            let mut acks = Vec::new();
            for m in in_flight.drain(..) {
                if let Some(Ok(TransferMessage::Chunk(c))) = TransferMessage::parse(&m) {
                    acks.extend(follower.on_chunk(1, c));
                }
            }
            for a in acks {
                if let Some(Ok(TransferMessage::Ack(ack))) = TransferMessage::parse(&a) {
                    in_flight.extend(leader.on_ack(2, ack).0);
                }
            }
        }
        // ...then the follower restarts: a new process, its part files gone.
        let dir = follower.images.dir().to_path_buf();
        let images = ImageStore::new(StdDisk::shared(), &dir);
        images.remove_parts();
        let mut follower = Transfers::new(2, images, 1024);
        let (snapshot, _, _) = run(&mut leader, &mut follower, in_flight, |_| false, false);
        assert_eq!(snapshot.as_ref(), Some(&msg));
        assert!(received_image(&follower, &msg) == data);
    }

    #[test]
    fn a_snapshot_whose_image_is_gone_cannot_start() {
        let (mut leader, _, msg, _) = setup("gone", 4096, 1024);
        leader.images.remove_through(40);
        assert!(leader.start(msg).is_err(), "the snapshot is withdrawn");
        assert!(leader.outgoing.is_empty());
    }

    #[test]
    fn a_malformed_transfer_message_is_refused() {
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgUnreachable);
        msg.context = b"QKVCHNK1 short".to_vec().into();
        assert!(matches!(TransferMessage::parse(&msg), Some(Err(_))));
        let chunk = Chunk {
            index: 3,
            image: ImageRef { len: 10, crc: 0 },
            offset: 8,
            data: vec![0; 5],
        };
        let msg = chunk_message(1, 2, &chunk);
        let err = TransferMessage::parse(&msg)
            .expect("a transfer message")
            .err();
        assert!(err.is_some_and(|e| e.contains("runs past")));
        let mut plain = Message::default();
        plain.set_msg_type(MessageType::MsgAppend);
        assert!(TransferMessage::parse(&plain).is_none());
    }
}
