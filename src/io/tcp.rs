//! The production `Transport`: raft message batches to peers over TCP, one long-lived
//! connection per peer, as etcd's peer streams are.
//!
//! Each peer has a bounded queue and a task that connects (retrying with backoff), says who it
//! is, and writes frames; a batch that cannot be written is dropped, and raft retransmits. The
//! listener checks each connection's cluster id (a member of another cluster is refused) and
//! hands decoded batches to the node's inbox.
//!
//! Connection preamble: `QKVPEER1`, cluster id, sender member id (u64 LE each). Then frames:
//! `[payload length u32 LE][CRC32C of payload u32 LE][payload]`, where the payload is a batch
//! (`transport::encode_batch`). A batch larger
//! than one frame (a snapshot) is split into chunks: a chunk frame's length has the top bit set
//! when more chunks follow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use raft::eraftpb::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::transport::{decode_batch, encode_batch, Transport};
use crate::tls::{is_https, ClientTls, ServerTls};

/// A peer connection, over TLS or not.
pub trait PeerIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> PeerIo for T {}
type PeerStream = Box<dyn PeerIo>;

/// The TLS of the peer port: to accept with, and to dial peers with (`https://` peer URLs).
#[derive(Clone, Default)]
pub struct PeerTls {
    pub server: Option<Arc<ServerTls>>,
    pub client: Option<Arc<ClientTls>>,
}

impl PeerTls {
    /// A connection to the peer at `url`'s `address`: TLS for an `https://` URL.
    async fn dial(&self, address: &str, https: bool) -> std::io::Result<PeerStream> {
        if !https {
            let stream = TcpStream::connect(address).await?;
            let _ = stream.set_nodelay(true);
            return Ok(Box::new(stream));
        }
        let Some(client) = &self.client else {
            return Err(std::io::Error::other(
                "the peer URL is https:// but no peer TLS is configured (--peer-cert-file or --peer-auto-tls)",
            ));
        };
        Ok(Box::new(client.connect(address).await?))
    }
}

const MAGIC: &[u8; 8] = b"QKVPEER1";
/// A member joining a running cluster asks a peer for the cluster's members: it sends this,
/// and gets one frame back (the directory, encoded by the caller) before the peer closes.
const DIRECTORY_MAGIC: &[u8; 8] = b"QKVMEMB1";
/// A member measuring its round trip to a peer sends this, then 8-byte pings that the peer
/// echoes, one at a time, on the same connection.
const PROBE_MAGIC: &[u8; 8] = b"QKVPING1";
/// How often a member measures the round trip to each peer (etcd's prober: every few seconds).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a probe may wait for its echo.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long asking a peer for the directory may take.
pub const DIRECTORY_TIMEOUT: Duration = Duration::from_secs(5);
/// Batches queued to one peer, at most; more are dropped (raft retransmits).
pub const PEER_QUEUE_BATCHES: usize = 4096;
/// Read buffer per inbound peer stream.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Largest frame payload; bigger batches go in chunks.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Largest batch accepted from a peer, bytes (a snapshot's image travels apart, in chunks:
/// `raft::transfer`; this bounds a batch of raft's appends).
pub const MAX_BATCH_BYTES: usize = 1 << 31;
const MORE_CHUNKS: u32 = 1 << 31;
/// Reconnect backoff, first and largest.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Splits an encoded batch into frames.
fn frames(payload: &[u8]) -> Vec<Vec<u8>> {
    let chunks: Vec<&[u8]> = if payload.is_empty() {
        vec![payload]
    } else {
        payload.chunks(CHUNK_BYTES).collect()
    };
    let last = chunks.len() - 1;
    chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut len = chunk.len() as u32;
            if i < last {
                len |= MORE_CHUNKS;
            }
            let mut frame = Vec::with_capacity(chunk.len() + 8);
            frame.extend_from_slice(&len.to_le_bytes());
            frame.extend_from_slice(&crc32c::crc32c(chunk).to_le_bytes());
            frame.extend_from_slice(chunk);
            frame
        })
        .collect()
}

fn bad_data(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// The next batch (all its chunks) and its payload's size in bytes; `Ok(None)` at a clean end
/// of stream.
async fn read_batch(
    stream: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<Option<(Vec<Message>, usize)>> {
    let Some(payload) = read_payload(stream).await? else {
        return Ok(None);
    };
    decode_batch(&payload)
        .map(|batch| Some((batch, payload.len())))
        .ok_or_else(|| bad_data("peer frame is not a message batch"))
}

/// Echoes a prober's pings until it goes away.
async fn echo_pings(stream: &mut (impl AsyncRead + AsyncWrite + Unpin)) {
    let mut ping = [0u8; 8];
    while stream.read_exact(&mut ping).await.is_ok() {
        if stream.write_all(&ping).await.is_err() || stream.flush().await.is_err() {
            return;
        }
    }
}

/// Listen backlog asked for the ports' listeners; the kernel caps it at
/// `net.core.somaxconn` (4096 on recent kernels), as Go's listeners (etcd's) ask for. tokio's
/// `TcpListener::bind` asks for 1024: ten thousand clients connecting at once overflowed it
/// (the kernel's ListenOverflows), their connections retried and timed out.
pub const LISTEN_BACKLOG: u32 = 65_535;

/// A listener on `addr` (address reuse on, as `TcpListener::bind`) with `LISTEN_BACKLOG`.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Asks the peer at `url` for its directory (see `DIRECTORY_MAGIC`).
pub async fn fetch_directory(url: &str, tls: &PeerTls) -> std::io::Result<Vec<u8>> {
    let address = peer_address(url).ok_or_else(|| bad_data("peer URL has no host and port"))?;
    tokio::time::timeout(DIRECTORY_TIMEOUT, async {
        let mut stream = tls.dial(&address, is_https(url)).await?;
        stream.write_all(DIRECTORY_MAGIC).await?;
        stream.flush().await?;
        read_payload(&mut stream)
            .await?
            .ok_or_else(|| bad_data("peer closed without an answer"))
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "peer did not answer"))?
}

/// Reads one payload (all its chunks); `Ok(None)` at a clean end of stream.
async fn read_payload(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Vec<u8>>> {
    let bad = bad_data;
    let mut payload = Vec::new();
    loop {
        let mut header = [0u8; 8];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && payload.is_empty() => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
        let word = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let len = (word & !MORE_CHUNKS) as usize;
        if len > CHUNK_BYTES || payload.len() + len > MAX_BATCH_BYTES {
            return Err(bad("peer frame too large"));
        }
        let start = payload.len();
        payload.resize(start + len, 0);
        stream.read_exact(&mut payload[start..]).await?;
        if crc32c::crc32c(&payload[start..]) != crc {
            return Err(bad("peer frame checksum mismatch"));
        }
        if word & MORE_CHUNKS == 0 {
            break;
        }
    }
    Ok(Some(payload))
}

/// Answers a joining (or a removed) member's question: who is in the cluster, encoded.
pub type Directory = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// Serves peer connections on `listener`: batches from members of cluster `cluster_id` go to
/// `inbox`; a joining member asking for the directory gets `directory`'s current value.
/// Runs until the listener fails.
pub async fn serve_peers(
    listener: TcpListener,
    cluster_id: u64,
    inbox: mpsc::Sender<Vec<Message>>,
    directory: Directory,
    tls: Option<Arc<ServerTls>>,
) -> std::io::Result<()> {
    // What anyone who can reach the port can make us say is rate-limited.
    let refusals = Arc::new(crate::tls::RateLimitedLog::default());
    let breaks = Arc::new(crate::tls::RateLimitedLog::default());
    loop {
        let (stream, from_addr) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let inbox = inbox.clone();
        let directory = directory.clone();
        let tls = tls.clone();
        let (refusals, breaks) = (refusals.clone(), breaks.clone());
        tokio::spawn(async move {
            let mut stream: PeerStream = match tls {
                // A peer without a certificate from the trusted CA (or with another common
                // name than --peer-cert-allowed-cn) is refused here, with the reason logged.
                Some(tls) => match tls.accept(stream).await {
                    Some((stream, _)) => Box::new(stream),
                    None => return,
                },
                None => Box::new(stream),
            };
            let mut preamble = [0u8; 24];
            if stream.read_exact(&mut preamble[..8]).await.is_err() {
                return;
            }
            if &preamble[..8] == DIRECTORY_MAGIC {
                let answer = directory();
                let mut out = Vec::new();
                for frame in frames(&answer) {
                    out.extend_from_slice(&frame);
                }
                let _ = stream.write_all(&out).await;
                let _ = stream.shutdown().await;
                return;
            }
            if &preamble[..8] == PROBE_MAGIC {
                echo_pings(&mut stream).await;
                return;
            }
            if &preamble[..8] != MAGIC || stream.read_exact(&mut preamble[8..]).await.is_err() {
                if let Some(left_out) = refusals.allow() {
                    tracing::warn!(peer = %from_addr, earlier_refusals_not_logged = left_out,
                        "refused a peer connection without our preamble");
                }
                return;
            }
            let their_cluster = u64::from_le_bytes(preamble[8..16].try_into().unwrap_or_default());
            let member = u64::from_le_bytes(preamble[16..24].try_into().unwrap_or_default());
            if their_cluster != cluster_id {
                if let Some(left_out) = refusals.allow() {
                    tracing::warn!(peer = %from_addr, member = format!("{member:x}"),
                        local_cluster = format!("{cluster_id:x}"), remote_cluster = format!("{their_cluster:x}"),
                        earlier_refusals_not_logged = left_out,
                        "refused a peer of another cluster (cluster ID mismatch)");
                }
                return;
            }
            // Buffered: a burst of small frames costs one read, not two per frame.
            let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
            let received = crate::metrics::METRICS
                .peer_received_bytes
                .with_label_values(&[&crate::metrics::peer_label(member)]);
            loop {
                match read_batch(&mut reader).await {
                    Ok(Some((batch, bytes))) => {
                        received.inc_by(bytes as u64);
                        // A full inbox drops the batch; raft retransmits.
                        if inbox.try_send(batch).is_err() && inbox.is_closed() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        if let Some(left_out) = breaks.allow() {
                            tracing::warn!(peer = %from_addr, error = %e,
                                earlier_breaks_not_logged = left_out, "peer stream broken");
                        }
                        return;
                    }
                }
            }
        });
    }
}

/// `host:port` of a peer URL such as `http://10.0.0.2:2380`.
pub fn peer_address(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    Some(format!(
        "{}:{}",
        parsed.host_str()?,
        parsed.port_or_known_default()?
    ))
}

struct Peer {
    url: String,
    queue: mpsc::Sender<Vec<Message>>,
}

/// The sending side: one queue and one connection task per peer.
#[derive(Clone)]
pub struct TcpTransport {
    cluster_id: u64,
    member_id: u64,
    peers: Arc<Mutex<HashMap<u64, Peer>>>,
    tls: PeerTls,
}

impl TcpTransport {
    pub fn new(cluster_id: u64, member_id: u64) -> Self {
        TcpTransport {
            cluster_id,
            member_id,
            peers: Arc::default(),
            tls: PeerTls::default(),
        }
    }

    /// Dials `https://` peers with `tls`.
    pub fn with_tls(mut self, tls: PeerTls) -> Self {
        self.tls = tls;
        self
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Peer>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds peer `id` at `url` (or moves it there). Call inside the runtime.
    pub fn set_peer(&self, id: u64, url: &str) {
        let Some(address) = peer_address(url) else {
            tracing::warn!(
                peer = id,
                url,
                "peer URL has no host and port; not reachable"
            );
            return;
        };
        let mut peers = self.lock();
        if peers.get(&id).is_some_and(|p| p.url == url) {
            return;
        }
        let (queue, batches) = mpsc::channel(PEER_QUEUE_BATCHES);
        let dialer = Dialer {
            address,
            https: is_https(url),
            tls: self.tls.clone(),
        };
        tokio::spawn(stream_to_peer(
            dialer.clone(),
            (self.cluster_id, self.member_id, id),
            batches,
        ));
        tokio::spawn(probe_peer(dialer, id, queue.downgrade()));
        // Replacing the entry closes the old queue, which ends the old task.
        peers.insert(
            id,
            Peer {
                url: url.to_string(),
                queue,
            },
        );
    }

    pub fn remove_peer(&self, id: u64) {
        self.lock().remove(&id);
    }
}

impl Transport for TcpTransport {
    fn send(&self, to: u64, batch: Vec<Message>) {
        if let Some(peer) = self.lock().get(&to) {
            // A full queue drops the batch; raft retransmits.
            let _ = peer.queue.try_send(batch);
        }
    }
}

/// How to reach one peer.
#[derive(Clone)]
struct Dialer {
    address: String,
    https: bool,
    tls: PeerTls,
}

impl Dialer {
    async fn dial(&self) -> std::io::Result<PeerStream> {
        self.tls.dial(&self.address, self.https).await
    }
}

/// Measures the round trip to peer `to` every `PROBE_INTERVAL` into
/// `etcd_network_peer_round_trip_time_seconds`, until the peer's queue is gone.
async fn probe_peer(dialer: Dialer, to: u64, alive: mpsc::WeakSender<Vec<Message>>) {
    let round_trip = crate::metrics::METRICS
        .peer_round_trip_seconds
        .with_label_values(&[&crate::metrics::peer_label(to)]);
    let mut connection: Option<PeerStream> = None;
    let mut ping = 0u64;
    while alive.upgrade().is_some() {
        tokio::time::sleep(PROBE_INTERVAL).await;
        if connection.is_none() {
            connection = async {
                let mut stream = dialer.dial().await.ok()?;
                stream.write_all(PROBE_MAGIC).await.ok()?;
                stream.flush().await.ok()?;
                Some(stream)
            }
            .await;
        }
        let Some(stream) = connection.as_mut() else {
            continue;
        };
        ping += 1;
        let sent = std::time::Instant::now();
        let echoed = tokio::time::timeout(PROBE_TIMEOUT, async {
            stream.write_all(&ping.to_le_bytes()).await?;
            stream.flush().await?;
            let mut echo = [0u8; 8];
            stream.read_exact(&mut echo).await?;
            Ok::<_, std::io::Error>(u64::from_le_bytes(echo) == ping)
        })
        .await;
        match echoed {
            Ok(Ok(true)) => round_trip.observe(sent.elapsed().as_secs_f64()),
            _ => connection = None,
        }
    }
}

/// Keeps a connection to one peer and writes its batches, until the queue closes. `ids`: the
/// cluster's, this member's and the peer's.
async fn stream_to_peer(
    dialer: Dialer,
    ids: (u64, u64, u64),
    mut batches: mpsc::Receiver<Vec<Message>>,
) {
    let address = dialer.address.clone();
    let (cluster_id, member_id, to) = ids;
    let sent = crate::metrics::METRICS
        .peer_sent_bytes
        .with_label_values(&[&crate::metrics::peer_label(to)]);
    let mut backoff = BACKOFF_MIN;
    let mut connection: Option<BufWriter<PeerStream>> = None;
    while let Some(batch) = batches.recv().await {
        if connection.is_none() {
            match connect(&dialer, cluster_id, member_id).await {
                Ok(stream) => {
                    backoff = BACKOFF_MIN;
                    connection = Some(stream);
                }
                Err(e) => {
                    tracing::debug!(peer = %address, error = %e, "cannot reach peer");
                    // Batches queued meanwhile are stale: raft will send again.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    while batches.try_recv().is_ok() {}
                    continue;
                }
            }
        }
        let Some(stream) = connection.as_mut() else {
            continue;
        };
        let mut result = write_batch(stream, &batch).await;
        // Pipelining: write whatever else is queued before flushing once.
        while let Ok(bytes) = result {
            sent.inc_by(bytes);
            match batches.try_recv() {
                Ok(more) => result = write_batch(stream, &more).await,
                Err(_) => break,
            }
        }
        let result = match result {
            Ok(_) => stream.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::debug!(peer = %address, error = %e, "peer stream broken; reconnecting");
            connection = None;
        }
    }
}

async fn connect(
    dialer: &Dialer,
    cluster_id: u64,
    member_id: u64,
) -> std::io::Result<BufWriter<PeerStream>> {
    let stream = dialer.dial().await?;
    let mut stream = BufWriter::with_capacity(64 * 1024, stream);
    let mut preamble = MAGIC.to_vec();
    preamble.extend_from_slice(&cluster_id.to_le_bytes());
    preamble.extend_from_slice(&member_id.to_le_bytes());
    stream.write_all(&preamble).await?;
    Ok(stream)
}

/// Writes one batch's frames; returns the bytes written.
async fn write_batch(
    stream: &mut BufWriter<PeerStream>,
    batch: &[Message],
) -> std::io::Result<u64> {
    let mut bytes = 0;
    for frame in frames(&encode_batch(batch)) {
        stream.write_all(&frame).await?;
        bytes += frame.len() as u64;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{MessageType, Snapshot};

    async fn listener() -> (TcpListener, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        (listener, url)
    }

    /// Serves peers of cluster 7 on `listener`, with directory `b"members"`.
    fn serve(listener: TcpListener) -> mpsc::Receiver<Vec<Message>> {
        let (tx, inbox) = mpsc::channel(16);
        tokio::spawn(serve_peers(
            listener,
            7,
            tx,
            Arc::new(|| b"members".to_vec()),
            None,
        ));
        inbox
    }

    /// A member of cluster 7 listening for peers: its URL and inbox.
    async fn listening_peer() -> (String, mpsc::Receiver<Vec<Message>>) {
        let (listener, url) = listener().await;
        (url, serve(listener))
    }

    #[tokio::test]
    async fn a_joining_member_gets_the_directory() {
        let (url, _inbox) = listening_peer().await;
        let directory = fetch_directory(&url, &PeerTls::default())
            .await
            .expect("directory");
        assert_eq!(directory, b"members");
        let (listener, silent) = listener().await;
        drop(listener);
        assert!(fetch_directory(&silent, &PeerTls::default()).await.is_err());
    }

    #[tokio::test]
    async fn tcp_transport_passes_conformance() {
        let (url, mut inbox) = listening_peer().await;
        let transport = TcpTransport::new(7, 1);
        transport.set_peer(2, &url);
        crate::io::transport::conformance::run_all(&transport, &mut inbox).await;
    }

    #[tokio::test]
    async fn a_snapshot_larger_than_a_frame_arrives_whole() {
        let (url, mut inbox) = listening_peer().await;
        let transport = TcpTransport::new(7, 1);
        transport.set_peer(2, &url);
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgSnapshot);
        let mut snapshot = Snapshot::default();
        let data: Vec<u8> = (0..3 * CHUNK_BYTES + 17).map(|i| (i % 251) as u8).collect();
        snapshot.data = data.clone().into();
        msg.set_snapshot(snapshot);
        transport.send(2, vec![msg]);
        let batch = inbox.recv().await.expect("batch");
        assert_eq!(batch[0].get_snapshot().data.as_ref(), &data[..]);
    }

    #[tokio::test]
    async fn a_peer_of_another_cluster_is_refused() {
        let (url, mut inbox) = listening_peer().await;
        let stranger = TcpTransport::new(8, 1);
        stranger.set_peer(2, &url);
        stranger.send(2, vec![Message::default()]);
        let got = tokio::time::timeout(Duration::from_millis(300), inbox.recv()).await;
        assert!(got.is_err(), "a batch from another cluster was delivered");
    }

    #[tokio::test]
    async fn the_sender_reconnects_after_the_peer_restarts() {
        let (listener, url) = listener().await;
        let address = peer_address(&url).expect("address");
        let transport = TcpTransport::new(7, 1);
        transport.set_peer(2, &url);
        // No one listens for a while: batches are dropped, the sender backs off.
        drop(listener);
        transport.send(2, vec![Message::default()]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let listener = TcpListener::bind(&address).await.expect("rebind");
        let mut inbox = serve(listener);
        let mut delivered = false;
        for i in 0..40u64 {
            transport.send(
                2,
                vec![Message {
                    index: i,
                    ..Default::default()
                }],
            );
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(100), inbox.recv()).await
            {
                delivered = true;
                break;
            }
        }
        assert!(delivered, "no batch arrived after the peer came back");
    }

    #[test]
    fn a_corrupt_batch_does_not_decode() {
        let mut bytes = encode_batch(&[Message::default(), Message::default()]);
        assert_eq!(decode_batch(&bytes).map(|b| b.len()), Some(2));
        bytes.pop();
        assert!(decode_batch(&bytes).is_none());
    }
}
