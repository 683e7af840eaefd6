//! A short path for the `etcdserverpb.KV` calls, the hot path of every client: one request
//! message in, one response message out. It sits in front of the routed services as a layer and
//! answers the common case itself — an uncompressed gRPC request whose single message decodes —
//! without the generated service's codec, streaming body and router on the way.
//!
//! Anything else (another path, a compressed or malformed or oversized request) goes on to the
//! routed services with its body as it came, so their answers, errors included, stay tonic's.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame};
use prost::Message;
use tonic::body::Body;
use tonic::codegen::http::{self, HeaderMap, HeaderValue};
use tonic::codegen::Service;

use super::auth::caller_of;
use super::grpc_metrics::{kv_method, MethodMetrics, StartCounted};
use super::status::to_status;
use super::{ok_trailers, GRPC_ENCODING};
use crate::server::{KvServer, Precheck, ServerError};

/// gRPC's length-prefixed message header: a compression flag and a big-endian length.
pub(crate) const GRPC_HEADER_BYTES: usize = 5;
const GRPC_CONTENT_TYPE: &str = "application/grpc";

/// The KV methods this path answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Range,
    Put,
    DeleteRange,
    Txn,
    Compact,
}

impl Method {
    /// Its counters, for the calls this path answers.
    fn metrics(self) -> &'static MethodMetrics {
        static KV: LazyLock<[&'static MethodMetrics; 5]> = LazyLock::new(|| {
            ["Range", "Put", "DeleteRange", "Txn", "Compact"]
                .map(|name| kv_method(name).expect("the KV methods are counted"))
        });
        KV[self as usize]
    }

    fn of(path: &str) -> Option<Method> {
        Some(match path.strip_prefix("/etcdserverpb.KV/")? {
            "Range" => Method::Range,
            "Put" => Method::Put,
            "DeleteRange" => Method::DeleteRange,
            "Txn" => Method::Txn,
            "Compact" => Method::Compact,
            _ => return None,
        })
    }
}

/// Puts [`UnaryKv`] in front of the routed services.
#[derive(Clone)]
pub struct UnaryKvLayer {
    server: Arc<KvServer>,
    max_decoding_message_size: usize,
}

impl UnaryKvLayer {
    /// `max_decoding_message_size`: the largest request message this path decodes; larger ones
    /// go on to the routed services, which refuse them.
    pub fn new(server: KvServer, max_decoding_message_size: usize) -> Self {
        UnaryKvLayer {
            server: Arc::new(server),
            max_decoding_message_size,
        }
    }
}

impl<S> tower_layer::Layer<S> for UnaryKvLayer {
    type Service = UnaryKv<S>;

    fn layer(&self, inner: S) -> UnaryKv<S> {
        UnaryKv {
            inner,
            server: self.server.clone(),
            max_decoding_message_size: self.max_decoding_message_size,
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct UnaryKv<S> {
    inner: S,
    /// Shared: cloned for every call.
    server: Arc<KvServer>,
    max_decoding_message_size: usize,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for UnaryKv<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // Every gRPC call on the port passes here: its messages are held to the limit.
        let req = super::limit::limit_grpc(req, self.max_decoding_message_size);
        // The routed services were made ready by `poll_ready`: the request that goes on to them
        // takes that one, and the layer keeps a fresh clone.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let Some(method) = Method::of(req.uri().path()).filter(|_| takes(req.headers())) else {
            return Box::pin(inner.call(req));
        };
        let server = self.server.clone();
        let limit = self.max_decoding_message_size;
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let metrics = method.metrics();
            metrics.started.inc();
            parts.extensions.insert(StartCounted);
            // Counted as cancelled if the client goes away before the answer.
            let mut pending = Unanswered(Some(metrics));
            let passed_on = match read_message(body, limit).await {
                Read::Message(message) => {
                    match answer(&server, method, &parts, message.clone()).await {
                        Some(response) => {
                            pending.0 = None;
                            // A success carries its status in the trailers, an error in the head.
                            if !metrics.handled_by(response.headers()) {
                                metrics.handled(0);
                            }
                            return Ok(response);
                        }
                        None => Body::new(Prefixed {
                            head: Some(message),
                            held: None,
                            rest: None,
                        }),
                    }
                }
                Read::Other { head, held, rest } => Body::new(Prefixed {
                    head: (!head.is_empty()).then_some(head),
                    held,
                    rest: Some(rest),
                }),
            };
            // The routed services' layer counts how it ends.
            pending.0 = None;
            inner
                .call(http::Request::from_parts(parts, passed_on))
                .await
        })
    }
}

/// A call this path counted as started and has not answered yet: dropped unanswered (the
/// client went away), it counts as cancelled.
struct Unanswered(Option<&'static MethodMetrics>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(metrics) = self.0.take() {
            metrics.handled(CANCELED_CODE);
        }
    }
}

/// gRPC's code for a call its client cancelled.
const CANCELED_CODE: usize = 1;

/// An uncompressed gRPC request: the ones this path decodes.
pub(crate) fn takes(headers: &HeaderMap) -> bool {
    // `application/grpc`, `application/grpc+proto` and the like; not `application/grpc-web`.
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix(GRPC_CONTENT_TYPE))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']));
    let identity = headers
        .get(GRPC_ENCODING)
        .is_none_or(|v| v.as_bytes() == b"identity");
    grpc && identity
}

pub(crate) enum Read {
    /// The whole body: exactly one uncompressed message of at most the limit, with its header.
    Message(Bytes),
    /// Anything else: `head` holds the data read, `held` a frame or error read after it (not
    /// data), and `rest` the remainder of the body.
    Other {
        head: Bytes,
        held: Option<Held>,
        rest: Body,
    },
}

pub(crate) type Held = Result<Frame<Bytes>, tonic::Status>;

/// Reads the body while it can still be a single uncompressed message within `limit`.
pub(crate) async fn read_message(mut body: Body, limit: usize) -> Read {
    let mut head = BytesMut::new();
    let mut first: Option<Bytes> = None;
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let data = match frame {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Trailers in a request: not the common case.
                Err(frame) => return other(first, head, Some(Ok(frame)), body),
            },
            Some(Err(e)) => return other(first, head, Some(Err(e)), body),
        };
        match first.take() {
            None if head.is_empty() => first = Some(data),
            Some(earlier) => {
                head.extend_from_slice(&earlier);
                head.extend_from_slice(&data);
            }
            None => head.extend_from_slice(&data),
        }
        let read = first.as_ref().map_or(head.len(), Bytes::len);
        if read > limit.saturating_add(GRPC_HEADER_BYTES) {
            return other(first, head, None, body);
        }
    }
    let whole = first.unwrap_or_else(|| head.freeze());
    let single = whole.len() >= GRPC_HEADER_BYTES
        && whole[0] == 0
        && u32::from_be_bytes([whole[1], whole[2], whole[3], whole[4]]) as usize
            == whole.len() - GRPC_HEADER_BYTES;
    if single {
        Read::Message(whole)
    } else {
        Read::Other {
            head: whole,
            held: None,
            rest: Body::empty(),
        }
    }
}

fn other(first: Option<Bytes>, head: BytesMut, held: Option<Held>, rest: Body) -> Read {
    Read::Other {
        head: first.unwrap_or_else(|| head.freeze()),
        held,
        rest,
    }
}

/// The response to `message` (with its gRPC header), or `None` when it does not decode.
async fn answer(
    server: &KvServer,
    method: Method,
    parts: &http::request::Parts,
    message: Bytes,
) -> Option<http::Response<Body>> {
    let payload = message.slice(GRPC_HEADER_BYTES..);
    // The message decoded, then who it runs as (resolved only for a message that decodes,
    // as tonic's would be), then the call.
    macro_rules! call {
        ($method:ident) => {{
            let req = Message::decode(payload).ok()?;
            if let Err(e) = Precheck::precheck(&req, server) {
                return Some(to_status(e).into_http());
            }
            match caller_of(server, &parts.headers, &parts.extensions) {
                Ok(who) => reply(server.$method(&who, req).await),
                Err(status) => status.into_http(),
            }
        }};
    }
    Some(match method {
        Method::Range => call!(range_checked),
        Method::Put => call!(put_checked),
        Method::DeleteRange => call!(delete_range_checked),
        Method::Txn => call!(txn_checked),
        Method::Compact => call!(compact_as),
    })
}

/// A successful answer as headers, one message and `grpc-status: 0`; an error as gRPC's
/// trailers-only response, as tonic sends it.
fn reply<M: Message>(result: Result<M, ServerError>) -> http::Response<Body> {
    match result {
        Ok(message) => framed(&message),
        Err(e) => to_status(e).into_http(),
    }
}

/// `message` as a successful call's response: headers, the message, `grpc-status: 0`.
pub(crate) fn framed<M: Message>(message: &M) -> http::Response<Body> {
    let len = message.encoded_len();
    let mut framed = BytesMut::with_capacity(GRPC_HEADER_BYTES + len);
    framed.put_u8(0);
    // A response over 4 GiB cannot be framed; gRPC refuses it as tonic's encoder would.
    let Ok(len) = u32::try_from(len) else {
        return tonic::Status::resource_exhausted("response message too large").into_http();
    };
    framed.put_u32(len);
    // Cannot fail: the buffer was sized for the message.
    if message.encode(&mut framed).is_err() {
        return tonic::Status::internal("response message did not encode").into_http();
    }
    let mut response = http::Response::new(Body::new(OneMessage {
        message: Some(framed.freeze()),
        trailers: Some(ok_trailers()),
    }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(GRPC_CONTENT_TYPE),
    );
    response
}

/// A body of one framed message (if any), then its trailers (if any): a successful call's
/// response, a unary request.
pub(crate) struct OneMessage {
    pub message: Option<Bytes>,
    pub trailers: Option<HeaderMap>,
}

impl HttpBody for OneMessage {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(message) = self.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.message.is_none() && self.trailers.is_none()
    }

    // No exact size hint: hyper would send it as `content-length`, which tonic's answers lack.
}

/// A request body handed on after part of it was read: the data read, the frame or error
/// read after it, then the rest.
pub(crate) struct Prefixed {
    pub head: Option<Bytes>,
    pub held: Option<Held>,
    pub rest: Option<Body>,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        if let Some(held) = self.held.take() {
            return Poll::Ready(Some(held));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none()
            && self.held.is_none()
            && self.rest.as_ref().is_none_or(HttpBody::is_end_stream)
    }
}

#[cfg(test)]
mod tests;
