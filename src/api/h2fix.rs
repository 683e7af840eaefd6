//! Rewrites the `:authority` that etcd 3.4's etcdctl sends, the whole endpoint URL
//! (`http://127.0.0.1:2379`, which Go takes and h2 resets as malformed), to the host after `://`.
//!
//! A gRPC channel keeps one authority for all its requests, so the connection's first header
//! block decides: a host authority there and the rest of the connection passes byte for byte,
//! untouched and undecoded (the hot path of every ordinary client). A URL authority there and
//! every block of the connection is decoded (one HPACK decoder per connection: its state spans
//! blocks) and re-encoded, the first opening with table size updates that empty the server's
//! dynamic table to match our encoder's. Input we can't handle (bad HPACK, an oversized block, a protocol violation)
//! then passes unchanged so that h2 reports it, or, once re-encoding began, fails the read.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use loona_hpack::{encoder::encode_integer_into, Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const CLIENT_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_BYTES: usize = 9;
const FRAME_TYPE_HEADERS: u8 = 0x1;
const FRAME_TYPE_CONTINUATION: u8 = 0x9;
/// HEADERS, CONTINUATION and PUSH_PROMISE: the frames that carry a header block.
const BLOCK_FRAME_TYPES: [u8; 3] = [0x1, 0x9, 0x5];
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
const PRIORITY_BYTES: usize = 5;
/// Largest frame payload we emit: the default SETTINGS_MAX_FRAME_SIZE, which servers accept.
const MAX_EMITTED_FRAME_PAYLOAD_BYTES: usize = 16_384;
/// h2's default SETTINGS_HEADER_TABLE_SIZE (tonic keeps it), also our encoder's table size.
const SERVER_HEADER_TABLE_BYTES: usize = 4096;
/// Raw bytes of one header block (its frames, with their headers) we are willing to hold.
const MAX_HEADER_BLOCK_BYTES: usize = 1 << 20;
/// Decoded names and values of one header block we are willing to hold.
const MAX_DECODED_HEADER_BYTES: usize = 4 << 20;

/// The server side of an accepted connection, with client header blocks fixed on the way in.
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        let rewriter = Rewriter::new();
        Self { inner, rewriter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Self { inner, rewriter } = self.get_mut();
        loop {
            if rewriter.failed {
                let message = "h2fix: cannot re-encode a client header block";
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, message)));
            }
            if rewriter.drain_output(buf) {
                return Poll::Ready(Ok(()));
            }
            // Fast path: the prefix that needs no change stays in the caller's buffer, uncopied.
            let before = buf.filled().len();
            ready!(Pin::new(&mut *inner).poll_read(cx, buf))?;
            let fresh = &buf.filled()[before..];
            if fresh.is_empty() && !rewriter.held.is_empty() {
                // The client closed mid-block: release what we hold as it came.
                rewriter.output.append(&mut rewriter.held);
                continue;
            }
            let passed = rewriter.passthrough_prefix(fresh);
            if passed == fresh.len() {
                return Poll::Ready(Ok(()));
            }
            rewriter.held.extend_from_slice(&fresh[passed..]);
            buf.set_filled(before + passed);
            rewriter.failed = rewriter.release().is_err();
            if passed > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// `http://host:port/path` → `host:port`; `None` when there is no scheme or no host.
fn authority_host(value: &[u8]) -> Option<&[u8]> {
    let start = value.windows(3).position(|w| w == b"://")? + 3;
    let rest = &value[start..];
    let end = rest.iter().position(|b| b"/?#".contains(b));
    Some(&rest[..end.unwrap_or(rest.len())]).filter(|host| !host.is_empty())
}

fn frame_payload_len(header: &[u8]) -> usize {
    usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2])
}

/// The sans-IO core: client bytes in, bytes for the server out.
#[derive(Default)]
struct Rewriter {
    /// Read, not released yet; it starts at a frame that may need rewriting.
    held: Vec<u8>,
    /// Released, not yet handed to the reader, from `output_at`.
    output: Vec<u8>,
    output_at: usize,
    failed: bool,
    preface_matched: usize,
    /// Everything passes unchanged for the rest of the connection.
    raw: bool,
    /// Payload bytes left of a frame being passed through.
    payload_left: usize,
    /// Bytes of the complete frames of the block being scanned; 0 between blocks.
    block_scanned: usize,
    /// The frame header of the HEADERS frame that opened that block, and its priority.
    opening: [u8; FRAME_HEADER_BYTES],
    priority: Option<[u8; PRIORITY_BYTES]>,
    fragment: Vec<u8>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    reencoding: bool,
    encoded: Vec<u8>,
}

impl Rewriter {
    fn new() -> Self {
        let (mut rewriter, table_limit) = (Self::default(), SERVER_HEADER_TABLE_BYTES);
        rewriter.decoder.set_max_allowed_table_size(table_limit);
        rewriter
    }

    /// Moves pending output into `buf`; false when there was none and `buf` has room.
    fn drain_output(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let pending = &self.output[self.output_at..];
        let n = pending.len().min(buf.remaining());
        buf.put_slice(&pending[..n]);
        self.output_at += n;
        if self.output_at == self.output.len() {
            self.output.clear();
            self.output_at = 0;
        }
        n > 0 || buf.remaining() == 0
    }

    /// Consumes the longest prefix of `input` that passes unchanged and returns its length:
    /// none while earlier bytes are held, as they are while a block is being scanned.
    fn passthrough_prefix(&mut self, input: &[u8]) -> usize {
        if !self.held.is_empty() {
            return 0;
        }
        debug_assert_eq!(self.block_scanned, 0);
        if self.raw {
            return input.len();
        }
        let mut at = 0;
        if self.preface_matched < CLIENT_PREFACE.len() {
            let expected = &CLIENT_PREFACE[self.preface_matched..];
            at = expected.len().min(input.len());
            if input[..at] != expected[..at] {
                self.raw = true;
                return input.len();
            }
            self.preface_matched += at;
        }
        loop {
            let n = self.payload_left.min(input.len() - at);
            self.payload_left -= n;
            at += n;
            let Some(header) = input.get(at..at + FRAME_HEADER_BYTES) else {
                return at;
            };
            if BLOCK_FRAME_TYPES.contains(&header[3]) {
                return at;
            }
            self.payload_left = frame_payload_len(header);
            at += FRAME_HEADER_BYTES;
        }
    }

    /// Moves from `held` to `output` everything that can go; what stays needs more input.
    fn release(&mut self) -> io::Result<()> {
        let (held, mut at) = (std::mem::take(&mut self.held), 0);
        let mut output = std::mem::take(&mut self.output);
        let result = loop {
            if self.block_scanned == 0 {
                let passed = self.passthrough_prefix(&held[at..]);
                output.extend_from_slice(&held[at..at + passed]);
                at += passed;
                if at == held.len() {
                    break Ok(());
                }
            }
            match self.scan_block(&held[at..], &mut output) {
                Ok(Some(block_len)) => at += block_len,
                needs_more_or_failed => break needs_more_or_failed.map(drop),
            }
        };
        (self.held, self.output) = (held, output);
        self.held.drain(..at);
        result
    }

    /// Scans the header block `input` starts with; once it is complete, writes it (or its
    /// rewrite) to `out` and returns its length. `None` means it needs more input.
    fn scan_block(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<Option<usize>> {
        loop {
            let frame_start = self.block_scanned;
            let Some(header) = input.get(frame_start..frame_start + FRAME_HEADER_BYTES) else {
                return Ok(None);
            };
            let frame_end = frame_start + FRAME_HEADER_BYTES + frame_payload_len(header);
            let (opens, frame_type, flags) = (frame_start == 0, header[3], header[4]);
            let continues =
                frame_type == FRAME_TYPE_CONTINUATION && header[5..] == self.opening[5..];
            let in_order = (opens && frame_type == FRAME_TYPE_HEADERS) || (!opens && continues);
            if !in_order || frame_end > MAX_HEADER_BLOCK_BYTES {
                return self.give_up(input, out).map(Some);
            }
            let Some(mut fragment) = input.get(frame_start + FRAME_HEADER_BYTES..frame_end) else {
                return Ok(None);
            };
            if opens {
                let Some((rest, priority)) = headers_fragment(fragment, flags) else {
                    return self.give_up(input, out).map(Some);
                };
                self.opening.copy_from_slice(header);
                (self.priority, fragment) = (priority, rest);
            }
            self.fragment.extend_from_slice(fragment);
            self.block_scanned = frame_end;
            if flags & FLAG_END_HEADERS != 0 {
                self.block_scanned = 0;
                self.rewrite_block(&input[..frame_end], out)?;
                return Ok(Some(frame_end));
            }
        }
    }

    /// `frames` is a complete header block whose fragments are in `self.fragment`.
    fn rewrite_block(&mut self, frames: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let (mut fields, mut decoded_bytes, mut needs_fix) = (Vec::new(), 0usize, false);
        let decoding = self.decoder.decode_with_cb(&self.fragment, |name, value| {
            decoded_bytes = decoded_bytes.saturating_add(name.len() + value.len());
            if decoded_bytes <= MAX_DECODED_HEADER_BYTES {
                needs_fix |= &name[..] == b":authority" && authority_host(&value).is_some();
                fields.push((name.into_owned(), value.into_owned()));
            }
        });
        self.fragment.clear();
        if decoding.is_err() || decoded_bytes > MAX_DECODED_HEADER_BYTES {
            return self.give_up(frames, out).map(drop);
        }
        if !needs_fix && !self.reencoding {
            // The first request's authority is fine: so is this connection's.
            out.extend_from_slice(frames);
            self.raw = true;
            return Ok(());
        }
        self.encoded.clear();
        self.encoded.extend(self.priority.iter().flatten());
        if !self.reencoding {
            self.reencoding = true;
            for table_bytes in [0, SERVER_HEADER_TABLE_BYTES] {
                encode_integer_into(table_bytes, 5, 0x20, &mut self.encoded)?;
            }
        }
        for (name, value) in &fields {
            let mut value = &value[..];
            if name == b":authority" {
                value = authority_host(value).unwrap_or(value);
            }
            self.encoder
                .encode_header_into((name, value), &mut self.encoded)?;
        }
        write_header_frames(out, &self.opening, &self.encoded);
        Ok(())
    }

    /// Releases `input` unchanged and passes everything from now on, unless the server's
    /// HPACK state is already ours. Returns how much was released.
    fn give_up(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<usize> {
        if self.reencoding {
            return Err(io::ErrorKind::InvalidData.into());
        }
        out.extend_from_slice(input);
        (self.raw, self.block_scanned) = (true, 0);
        self.fragment.clear();
        Ok(input.len())
    }
}

/// A HEADERS payload's block fragment and priority fields; `None` if they don't fit.
fn headers_fragment(payload: &[u8], flags: u8) -> Option<(&[u8], Option<[u8; PRIORITY_BYTES]>)> {
    let mut fragment = payload;
    if flags & FLAG_PADDED != 0 {
        let (&pad_len, rest) = fragment.split_first()?;
        fragment = rest.get(..rest.len().checked_sub(usize::from(pad_len))?)?;
    }
    if flags & FLAG_PRIORITY == 0 {
        return Some((fragment, None));
    }
    let (priority, rest) = fragment.split_first_chunk::<PRIORITY_BYTES>()?;
    Some((rest, Some(*priority)))
}

/// `payload` (priority fields, then the block) as one HEADERS frame with the stream,
/// END_STREAM and PRIORITY of `opening` and no padding, then CONTINUATION frames.
fn write_header_frames(out: &mut Vec<u8>, opening: &[u8], payload: &[u8]) {
    let (mut frame_type, mut rest) = (FRAME_TYPE_HEADERS, payload);
    let mut flags = opening[4] & (FLAG_END_STREAM | FLAG_PRIORITY);
    loop {
        let (chunk, after) = rest.split_at(rest.len().min(MAX_EMITTED_FRAME_PAYLOAD_BYTES));
        if after.is_empty() {
            flags |= FLAG_END_HEADERS;
        }
        out.extend_from_slice(&(chunk.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[frame_type, flags]);
        out.extend_from_slice(&opening[5..]);
        out.extend_from_slice(chunk);
        if after.is_empty() {
            return;
        }
        (frame_type, flags, rest) = (FRAME_TYPE_CONTINUATION, 0, after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    const PATH: &str = "/etcdserverpb.Maintenance/Status";
    const URL: &str = "http://127.0.0.1:2379";
    const HOST: &str = "127.0.0.1:2379";
    const SETTINGS: [u8; 15] = [0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100];
    const END_HEADERS: u8 = FLAG_END_HEADERS;

    /// Feeds `input` through a pipe that holds `chunk` bytes, reading `read_len` at a time.
    async fn read_through(input: &[u8], chunk: usize, read_len: usize) -> io::Result<Vec<u8>> {
        let ((mut client, server), input) = (tokio::io::duplex(chunk), input.to_vec());
        tokio::spawn(async move { client.write_all(&input).await });
        let (mut fix, mut out) = (AuthorityFix::new(server), Vec::new());
        let mut buf = vec![0; read_len];
        loop {
            match fix.read(&mut buf).await? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Reads `input` split at many granularities, down to single bytes; all must agree.
    async fn read_all_ways(input: &[u8]) -> Vec<u8> {
        let whole = read_through(input, 1 << 20, 1 << 16).await.unwrap();
        for (chunk, read_len) in [(1, 1), (1, 65536), (2, 9), (9, 1), (1000, 9)] {
            let out = read_through(input, chunk, read_len).await.unwrap();
            assert!(out == whole, "chunk {chunk}, read_len {read_len}");
        }
        whole
    }

    /// A frame on stream 1.
    fn frame(frame_type: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        [&len[1..], &[frame_type, flags, 0, 0, 0, 1], payload].concat()
    }

    fn connection(frames: &[Vec<u8>]) -> Vec<u8> {
        [&CLIENT_PREFACE[..], &frames.concat()].concat()
    }

    /// (type, flags, payload) of each frame after the preface.
    fn parse_frames(bytes: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
        let (mut rest, mut frames) = (bytes.strip_prefix(CLIENT_PREFACE).unwrap(), Vec::new());
        while !rest.is_empty() {
            let (header, after) = rest.split_at(FRAME_HEADER_BYTES);
            let (payload, after) = after.split_at(frame_payload_len(header));
            frames.push((header[3], header[4], payload.to_vec()));
            rest = after;
        }
        frames
    }

    /// Each header block in `bytes` as the server decodes it, one `name=value` line a field.
    fn decode_blocks(bytes: &[u8]) -> Vec<String> {
        let (mut decoder, mut block, mut blocks) = (Decoder::new(), Vec::new(), Vec::new());
        for (frame_type, flags, payload) in parse_frames(bytes) {
            assert!(payload.len() <= MAX_EMITTED_FRAME_PAYLOAD_BYTES);
            match frame_type {
                FRAME_TYPE_HEADERS => block.extend(headers_fragment(&payload, flags).unwrap().0),
                FRAME_TYPE_CONTINUATION => block.extend(payload),
                _ => continue,
            }
            if flags & FLAG_END_HEADERS != 0 {
                let fields = decoder.decode(&block).unwrap().into_iter();
                let lines = fields.map(|(n, v)| [n, b"=".to_vec(), v, b"\n".to_vec()].concat());
                blocks.push(String::from_utf8(lines.collect::<Vec<_>>().concat()).unwrap());
                block.clear();
            }
        }
        blocks
    }

    fn request(authority: &str) -> String {
        let fields = format!(":method=POST\n:scheme=http\n:path={PATH}\n:authority={authority}\n");
        fields + "content-type=application/grpc\n"
    }

    /// A literal with incremental indexing whose name is static-table entry `name_index`.
    fn indexed_literal(name_index: u8, value: &str) -> Vec<u8> {
        let mut literal = vec![0x40 | name_index, value.len() as u8];
        literal.extend_from_slice(value.as_bytes());
        literal
    }

    /// `request(authority)`, leaving content-type, authority, path at indices 62, 63, 64.
    fn request_block(authority: &str) -> Vec<u8> {
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
        for (name_index, value) in [(4, PATH), (1, authority), (31, "application/grpc")] {
            block.extend(indexed_literal(name_index, value));
        }
        block
    }

    #[tokio::test]
    async fn url_authority_is_rewritten_and_other_frames_pass_unchanged() {
        let data = frame(0, FLAG_END_STREAM, b"\0\0\0\0\x05hello");
        let headers = frame(1, END_HEADERS, &request_block(URL));
        let out = read_all_ways(&connection(&[SETTINGS.to_vec(), headers, data.clone()])).await;
        assert!(out.starts_with(&connection(&[SETTINGS.to_vec()])) && out.ends_with(&data));
        assert_eq!(parse_frames(&out).len(), 3);
        assert_eq!(decode_blocks(&out), [request(HOST)]);
    }

    #[tokio::test]
    async fn padded_prioritized_continued_block_is_rewritten_within_frame_limit() {
        let big = "v".repeat(20_000);
        let mut block = [request_block(URL), b"\x00\x05x-big".to_vec()].concat();
        encode_integer_into(big.len(), 7, 0, &mut block).unwrap();
        block.extend_from_slice(big.as_bytes());
        let priority = [0x80, 0, 0, 3, 15];
        let first = [&[3][..], &priority, &block[..10_000], &[0; 3]].concat();
        let out = read_all_ways(&connection(&[
            frame(1, FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM, &first),
            frame(9, 0, &block[10_000..15_000]),
            frame(9, END_HEADERS, &block[15_000..]),
        ]))
        .await;
        let frames = parse_frames(&out);
        let shape: Vec<_> = frames.iter().map(|(t, f, p)| (*t, *f, p.len())).collect();
        let limit = MAX_EMITTED_FRAME_PAYLOAD_BYTES;
        let first = (1, FLAG_PRIORITY | FLAG_END_STREAM, limit);
        assert_eq!(shape, [first, (9, END_HEADERS, shape[1].2)]);
        assert_eq!(frames[0].2[..PRIORITY_BYTES], priority);
        let expected = request(HOST) + "x-big=" + &big + "\n";
        assert_eq!(decode_blocks(&out), [expected]);
    }

    /// RFC 7541 C.4.1-3 (Huffman strings, dynamic table) open the connection with a host
    /// authority: all of it passes byte for byte, later blocks included.
    #[tokio::test]
    async fn a_host_authority_first_passes_the_whole_connection_byte_for_byte() {
        let rfc_blocks: [&[u8]; 3] = [
            b"\x82\x86\x84\x41\x8c\xf1\xe3\xc2\xe5\xf2\x3a\x6b\xa0\xab\x90\xf4\xff",
            b"\x82\x86\x84\xbe\x58\x86\xa8\xeb\x10\x64\x9c\xbf",
            b"\x82\x87\x85\xbf\x40\x88\x25\xa8\x49\xe9\x5b\xa9\x7d\x7f\x89\x25\xa8\x49\xe9\x5b\
              \xb8\xe8\xb4\xbf",
        ];
        let mut frames = rfc_blocks.map(|b| frame(1, END_HEADERS, b)).to_vec();
        let verbatim = connection(&frames);
        let url = indexed_literal(1, "https://www.example.com/x");
        frames.push(frame(1, END_HEADERS, &[&[0xbe][..], &url].concat())); // 62: custom-key
        let input = connection(&frames);
        let out = read_all_ways(&input).await;
        assert!(out.starts_with(&verbatim));
        assert_eq!(
            out, input,
            "the first block decided: no rewriting on this connection"
        );
    }

    /// Block 1 shrinks the client's table to 0 and is rewritten; block 2 grows it back and
    /// is rewritten; block 3 refers to its path, authority, content-type and x-a (65..=62).
    #[tokio::test]
    async fn dynamic_table_references_decode_after_rewriting() {
        let shrink = [vec![0x20], request_block(URL)].concat();
        let mut grow = [vec![0x3f, 0xe1, 0x1f], request_block(URL)].concat(); // size 4096
        grow.extend_from_slice(b"\x40\x03x-a\x01b"); // x-a: b, indexed
        let out = read_all_ways(&connection(&[
            frame(1, END_HEADERS, &shrink),
            frame(1, END_HEADERS, &grow),
            frame(1, END_HEADERS, &[0x83, 0x86, 0xc1, 0xc0, 0xbf, 0xbe]),
        ]))
        .await;
        let x_a = request(HOST) + "x-a=b\n";
        assert_eq!(decode_blocks(&out), [request(HOST), x_a.clone(), x_a]);
    }

    #[tokio::test]
    async fn unhandled_input_passes_unchanged_until_a_rewrite_then_fails_the_read() {
        let http1 = b"GET /v3/kv/range HTTP/1.1\r\nHost: http://127.0.0.1:2379\r\n\r\n".to_vec();
        let fixable = frame(1, END_HEADERS, &request_block(URL));
        let bad_index = frame(1, END_HEADERS, &[0x83, 0xbe]); // the dynamic table is empty
        let bad_index = connection(&[bad_index, fixable.clone()]);
        let stray = connection(&[frame(9, END_HEADERS, &request_block(URL)), fixable.clone()]);
        let truncated = [&CLIENT_PREFACE[..], &fixable[..16]].concat(); // ends mid-block
        let bad_preface = [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\r"[..], &fixable].concat();
        for input in [http1, bad_preface, bad_index, stray, truncated] {
            assert_eq!(read_all_ways(&input).await, input);
        }
        // Table size updates decode to nothing; 0x83 decodes to 11 bytes.
        let updates = [0x20; MAX_EMITTED_FRAME_PAYLOAD_BYTES];
        let mut too_long = vec![frame(9, 0, &updates); MAX_HEADER_BLOCK_BYTES / updates.len()];
        too_long[0] = frame(1, 0, &updates);
        too_long.push(frame(9, END_HEADERS, &indexed_literal(1, URL)));
        let mut too_wide = indexed_literal(1, URL);
        too_wide.resize(too_wide.len() + MAX_DECODED_HEADER_BYTES / 11 + 1, 0x83);
        let too_wide = frame(1, END_HEADERS, &too_wide);
        for input in [connection(&too_long), connection(&[too_wide])] {
            assert_eq!(read_through(&input, 4096, 1 << 16).await.unwrap(), input);
        }
        let past_table = frame(1, END_HEADERS, &[0x83, 0xc5]); // index 69, after 62..=64
        let read = read_through(&connection(&[fixable, past_table]), 7, 9).await;
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn authority_host_drops_scheme_and_path() {
        let host = |value: &str| authority_host(value.as_bytes()).map(|h| h.to_vec());
        assert_eq!(host(URL), Some(HOST.into()));
        assert_eq!(host("https://[::1]:2379/v3?x#y"), Some("[::1]:2379".into()));
        let unchanged = [host(HOST), host("http://"), host("http:///p")];
        assert_eq!(unchanged, [None, None, None]);
    }

    /// The stream and URI of the first request h2 yields when stream 1 has a URL authority
    /// and stream 3 a host authority.
    async fn first_h2_request<T>(server: T, mut client: DuplexStream) -> (u32, http::Uri)
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let flags = END_HEADERS | FLAG_END_STREAM;
        let mut on_stream_3 = frame(1, flags, &request_block(HOST));
        on_stream_3[8] = 3;
        let on_stream_1 = frame(1, flags, &request_block(URL));
        let input = connection(&[SETTINGS.to_vec(), on_stream_1, on_stream_3]);
        client.write_all(&input).await.unwrap();
        let accept = async {
            let mut connection = h2::server::handshake(server).await.unwrap();
            let (request, respond) = connection.accept().await.unwrap().unwrap();
            (respond.stream_id().into(), request.uri().clone())
        };
        let limit = std::time::Duration::from_secs(10);
        tokio::time::timeout(limit, accept).await.unwrap()
    }

    #[tokio::test]
    async fn h2_accepts_url_authority_only_through_the_fix() {
        let (client, server) = tokio::io::duplex(1 << 16);
        assert_eq!(first_h2_request(server, client).await.0, 3); // stream 1 was reset
        let (client, server) = tokio::io::duplex(1 << 16);
        let (stream, uri) = first_h2_request(AuthorityFix::new(server), client).await;
        assert_eq!(stream, 1);
        assert_eq!(uri.to_string(), format!("http://{HOST}{PATH}"));
    }
}
