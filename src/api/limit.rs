//! The gRPC message size limit, answered as etcd answers it.
//!
//! A request message larger than the limit (`--max-request-bytes` plus gRPC's allowance) is
//! refused with `RESOURCE_EXHAUSTED` and grpc-go's words, `grpc: received message larger than
//! max (N vs. M)`, before any of it is buffered. tonic's own check says `OUT_OF_RANGE` and
//! other words, so the limit is applied here, to the request body of every gRPC call on the
//! client port: the body reads the length prefix of each message as it passes and fails at
//! the first one over the limit. The call then ends with that status, whichever service (or
//! the unary short path) reads the body.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::Status;

/// Bytes before each gRPC message: a compression flag and a big-endian length.
const PREFIX_BYTES: usize = 5;

/// `req` with its body limited to messages of at most `limit` bytes when it is a gRPC call.
pub fn limit_grpc(req: http::Request<Body>, limit: usize) -> http::Request<Body> {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        return req;
    }
    req.map(|inner| {
        Body::new(Limited {
            inner,
            limit,
            prefix: [0; PREFIX_BYTES],
            prefix_read: 0,
            message_left: 0,
            failed: false,
        })
    })
}

/// grpc-go's status for a received message over the limit.
pub fn too_large(len: u64, limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "grpc: received message larger than max ({len} vs. {limit})"
    ))
}

struct Limited {
    inner: Body,
    limit: usize,
    /// The length prefix being read, and how much of it was.
    prefix: [u8; PREFIX_BYTES],
    prefix_read: usize,
    /// Bytes of the current message still to pass.
    message_left: u64,
    failed: bool,
}

impl Limited {
    /// Follows the messages through `data`; the status when one is over the limit.
    fn check(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.message_left > 0 {
                let n = (data.len() as u64).min(self.message_left);
                self.message_left -= n;
                data = &data[n as usize..];
                continue;
            }
            let n = (PREFIX_BYTES - self.prefix_read).min(data.len());
            self.prefix[self.prefix_read..self.prefix_read + n].copy_from_slice(&data[..n]);
            self.prefix_read += n;
            data = &data[n..];
            if self.prefix_read == PREFIX_BYTES {
                self.prefix_read = 0;
                let [_, a, b, c, d] = self.prefix;
                let len = u64::from(u32::from_be_bytes([a, b, c, d]));
                if len > self.limit as u64 {
                    return Err(too_large(len, self.limit));
                }
                self.message_left = len;
            }
        }
        Ok(())
    }
}

impl HttpBody for Limited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            let data = data.clone();
            if let Err(status) = self.check(&data) {
                self.failed = true;
                return Poll::Ready(Some(Err(status)));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    fn limited(limit: usize) -> Limited {
        Limited {
            inner: Body::empty(),
            limit,
            prefix: [0; PREFIX_BYTES],
            prefix_read: 0,
            message_left: 0,
            failed: false,
        }
    }

    #[test]
    fn messages_up_to_the_limit_pass_in_pieces_of_any_size() {
        let mut stream = message(10);
        stream.extend(message(0));
        stream.extend(message(10));
        for piece in 1..stream.len() {
            let mut body = limited(10);
            for chunk in stream.chunks(piece) {
                body.check(chunk).expect("within the limit");
            }
            assert_eq!((body.prefix_read, body.message_left), (0, 0));
        }
    }

    #[test]
    fn the_first_message_over_the_limit_fails_with_grpc_gos_status() {
        let mut stream = message(10);
        stream.extend(message(11));
        for piece in 1..stream.len() {
            let mut body = limited(10);
            let failed = stream.chunks(piece).find_map(|c| body.check(c).err());
            let status = failed.expect("over the limit");
            assert_eq!(status.code(), tonic::Code::ResourceExhausted);
            assert_eq!(
                status.message(),
                "grpc: received message larger than max (11 vs. 10)"
            );
        }
    }
}
