//! The proxy's short path for the `etcdserverpb.KV` calls, as the member has one
//! (`api::unary`): one request message in, one response message out, without the generated
//! services' codecs on the way.
//!
//! - A write (Put, DeleteRange, Txn, Compact) goes upstream as the bytes it came as, on the
//!   connection in use, and its answer (message, status and trailers) comes back as the bytes
//!   the member sent; only its header's revision is read, as the revision the proxy has shown.
//!   Not retried elsewhere when the endpoint is gone (it may have been applied).
//! - A Range is decoded and answered by the read cache, its answer encoded once.
//!
//! Anything else (another path, a compressed or oversized or malformed request, a proxy with a
//! `--namespace`, whose keys are rewritten) goes on to the routed services as it came.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::Body as HttpBody;
use prost::Message;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::metadata::MetadataMap;
use tonic::Status;
use tower::ServiceExt;

use super::kv::ProxyKv;
use super::upstream::endpoint_gone;
use crate::api::unary::{
    framed, read_message, takes, OneMessage, Prefixed, Read, GRPC_HEADER_BYTES,
};
use crate::proto::etcdserverpb::{RangeRequest, ResponseHeader};

/// The calls this path takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Range,
    Write,
}

fn call_of(path: &str) -> Option<Call> {
    match path.strip_prefix("/etcdserverpb.KV/")? {
        "Range" => Some(Call::Range),
        "Put" | "DeleteRange" | "Txn" | "Compact" => Some(Call::Write),
        _ => None,
    }
}

/// Puts [`ProxyUnary`] in front of the proxy's routed services.
#[derive(Clone)]
pub struct ProxyUnaryLayer {
    kv: Arc<ProxyKv>,
    max_decoding_message_size: usize,
}

impl ProxyUnaryLayer {
    /// `max_decoding_message_size`: the largest request message this path takes; larger ones
    /// go on to the routed services, which refuse them.
    pub fn new(kv: ProxyKv, max_decoding_message_size: usize) -> Self {
        ProxyUnaryLayer {
            kv: Arc::new(kv),
            max_decoding_message_size,
        }
    }
}

impl<S> tower_layer::Layer<S> for ProxyUnaryLayer {
    type Service = ProxyUnary<S>;

    fn layer(&self, inner: S) -> ProxyUnary<S> {
        ProxyUnary {
            inner,
            kv: self.kv.clone(),
            max_decoding_message_size: self.max_decoding_message_size,
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct ProxyUnary<S> {
    inner: S,
    kv: Arc<ProxyKv>,
    max_decoding_message_size: usize,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for ProxyUnary<S>
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
        // The routed services were made ready by `poll_ready`: the request that goes on to them
        // takes that one, and the layer keeps a fresh clone.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let call =
            call_of(req.uri().path()).filter(|_| self.kv.ns.is_empty() && takes(req.headers()));
        let Some(call) = call else {
            return Box::pin(inner.call(req));
        };
        let kv = self.kv.clone();
        let limit = self.max_decoding_message_size;
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let passed_on = match read_message(body, limit).await {
                Read::Message(message) => match call {
                    Call::Write => return Ok(write(&kv, parts, message).await),
                    Call::Range => match range(&kv, &parts, &message).await {
                        Some(response) => return Ok(response),
                        None => Prefixed {
                            head: Some(message),
                            held: None,
                            rest: None,
                        },
                    },
                },
                Read::Other { head, held, rest } => Prefixed {
                    head: (!head.is_empty()).then_some(head),
                    held,
                    rest: Some(rest),
                },
            };
            inner
                .call(http::Request::from_parts(parts, Body::new(passed_on)))
                .await
        })
    }
}

/// A Range through the read cache; `None` when the request does not decode.
async fn range(
    kv: &ProxyKv,
    parts: &http::request::Parts,
    message: &Bytes,
) -> Option<http::Response<Body>> {
    let request = RangeRequest::decode(message.slice(GRPC_HEADER_BYTES..)).ok()?;
    let credentials = MetadataMap::from_headers(parts.headers.clone());
    Some(match kv.cache.range(request, &credentials).await {
        Ok(answer) => framed(&answer),
        Err(status) => status.into_http(),
    })
}

/// Only the header of a KV write's response (field 1 in each of them): the rest is skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct HeaderOnly {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
}

/// A write passed upstream as bytes, its answer passed back as bytes.
async fn write(kv: &ProxyKv, parts: http::request::Parts, message: Bytes) -> http::Response<Body> {
    let link = match kv.up.link().await {
        Ok(link) => link,
        Err(status) => return status.into_http(),
    };
    // The path and the caller's headers (its token, its deadline); the channel sets the
    // scheme and authority of the endpoint.
    let mut request = http::Request::new(Body::new(OneMessage {
        message: Some(message),
        trailers: None,
    }));
    *request.method_mut() = http::Method::POST;
    if let Some(path) = parts.uri.path_and_query() {
        if let Ok(uri) = http::Uri::try_from(path.as_str()) {
            *request.uri_mut() = uri;
        }
    }
    *request.headers_mut() = parts.headers;
    // Headers of the client's connection, not of the call: HTTP/2 refuses them on another.
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "host",
    ] {
        request.headers_mut().remove(name);
    }
    let failed = |status: Status| {
        if endpoint_gone(&status) {
            kv.up.failed(link.generation);
        }
        status.into_http()
    };
    let response = match link.channel.clone().oneshot(request).await {
        Ok(response) => response,
        Err(e) => return failed(Status::from_error(Box::new(e))),
    };
    let (head, mut body) = response.into_parts();
    // The answer, read whole (one message and the trailers) and held to `--max-recv-bytes`.
    let mut data = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(status) => return failed(status),
        };
        match frame.into_data() {
            Ok(bytes) => {
                data.extend_from_slice(&bytes);
                if data.len() > kv.up.max_recv_bytes.saturating_add(GRPC_HEADER_BYTES) {
                    return Status::out_of_range(format!(
                        "Error, decoded message length too large: found {} bytes, the limit is: {} bytes",
                        data.len() - GRPC_HEADER_BYTES,
                        kv.up.max_recv_bytes
                    ))
                    .into_http();
                }
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    let data = data.freeze();
    if data.len() > GRPC_HEADER_BYTES && data[0] == 0 {
        if let Ok(HeaderOnly {
            header: Some(header),
        }) = HeaderOnly::decode(data.slice(GRPC_HEADER_BYTES..))
        {
            kv.seen.fetch_max(header.revision, Ordering::Relaxed);
        }
    }
    http::Response::from_parts(
        head,
        Body::new(OneMessage {
            message: (!data.is_empty()).then_some(data),
            trailers,
        }),
    )
}
