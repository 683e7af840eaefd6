//! The `etcdserverpb.Watch` service: one bidirectional stream carries many watches. Requests
//! (create, cancel, progress) are read in order; responses (created, events, canceled,
//! progress) come back on one bounded queue shared by the stream's watchers.
//!
//! The service is written out here rather than generated, for its response body: responses whose
//! events the hub encoded once for many watchers go on the wire from those shared parts, a
//! fan-out entry's (`Queued::Fanout`) in one pass, without a message object per watcher.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::{Status, Streaming};

use crate::proto::etcdserverpb::WatchRequest;
use crate::server::KvServer;
use crate::watch::{WatchHub, WatchReceiver, WatchSender};

/// gRPC's full method name of `Watch.Watch`.
const WATCH_PATH: &str = "/etcdserverpb.Watch/Watch";
/// The most response bytes a stream hands to HTTP/2 at once.
const WRITE_BUFFER: usize = 128 * 1024;

/// `etcdserverpb.Watch` as a tower service, to be added to the server's routes.
#[derive(Clone)]
pub struct WatchService {
    server: KvServer,
    max_decoding_message_size: usize,
}

impl WatchService {
    /// `max_decoding_message_size`: the largest request accepted, in bytes.
    pub fn new(server: KvServer, max_decoding_message_size: usize) -> Self {
        WatchService {
            server,
            max_decoding_message_size,
        }
    }
}

impl tonic::server::NamedService for WatchService {
    const NAME: &'static str = "etcdserverpb.Watch";
}

impl<B> Service<http::Request<B>> for WatchService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != WATCH_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let server = self.server.clone();
        let max_decode = self.max_decoding_message_size;
        Box::pin(async move {
            if let Err(e) = server.refuse_learner() {
                return Ok(super::to_status(e).into_http());
            }
            if let Some(status) = refuse_compressed(req.headers()) {
                return Ok(status.into_http());
            }
            let (parts, body) = req.into_parts();
            let headers = parts.headers;
            let common_name = super::auth::common_name_of(&parts.extensions).map(str::to_string);
            let inbound = Streaming::new_request(
                tonic_prost::ProstDecoder::<WatchRequest>::default(),
                body,
                None,
                Some(max_decode),
            );
            // Who the stream's watches run as: resolved again at each create (a token expires,
            // a permission changes), from what the stream opened with.
            let token = super::auth::token_of(&headers).map(str::to_string);
            if let Err(status) = server.auth_info(token.as_deref(), common_name.as_deref()) {
                return Ok(super::to_status(status).into_http());
            }
            let identity = StreamIdentity {
                server: server.clone(),
                token,
                common_name,
            };
            let hub = server.watches().clone();
            let (stream, tx, rx) = hub.open_stream();
            let ended_with = Arc::new(Mutex::new(None));
            tokio::spawn(serve_stream(
                hub,
                identity,
                stream,
                tx,
                inbound,
                ended_with.clone(),
            ));
            Ok(WatchBody::response(MemberAnswers {
                queue: rx,
                ended_with,
            }))
        })
    }
}

/// A request compressed in a way the server does not take: refused as tonic refuses it.
pub(crate) fn refuse_compressed(headers: &http::HeaderMap) -> Option<Status> {
    let encoding = headers.get(super::GRPC_ENCODING)?;
    if encoding.as_bytes() == b"identity" {
        return None;
    }
    let name = String::from_utf8_lossy(encoding.as_bytes()).into_owned();
    Some(Status::unimplemented(format!(
        "Content is compressed with `{name}` which isn't supported"
    )))
}

/// Where a watch stream's answers come from.
pub(crate) trait AnswerSource: Send + Unpin + 'static {
    /// Writes the next answer into `buf` as a gRPC message: `Ready(Some(Ok(())))`. At the end:
    /// `Ready(None)`, or `Ready(Some(Err(status)))` to end the call with that status.
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<Option<Result<(), Status>>>;
}

/// A member's watch stream: what its queue holds, then the status its requests failed with
/// (a message over the size limit, say), if they did.
struct MemberAnswers {
    queue: WatchReceiver,
    ended_with: EndedWith,
}

/// The status a stream's requests failed with, if they did.
type EndedWith = Arc<Mutex<Option<Status>>>;

impl AnswerSource for MemberAnswers {
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<Option<Result<(), Status>>> {
        match self.queue.poll_queued(cx) {
            Poll::Ready(Some(queued)) => {
                queued.write_grpc(buf);
                Poll::Ready(Some(Ok(())))
            }
            Poll::Ready(None) => Poll::Ready(
                self.ended_with
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .map(Err),
            ),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A watch stream's response body: its answers as gRPC messages, as many as are ready (up to
/// `WRITE_BUFFER` bytes) in one DATA frame; then `grpc-status: 0` once they end, or the status
/// they ended with.
pub(crate) struct WatchBody<A> {
    answers: A,
    buf: BytesMut,
    /// The answers ended (`failed`: with this status).
    finished: bool,
    failed: Option<Status>,
    trailers_sent: bool,
}

impl<A: AnswerSource> WatchBody<A> {
    /// A watch call's response, its body these answers.
    pub(crate) fn response(answers: A) -> http::Response<tonic::body::Body> {
        let mut response = http::Response::new(tonic::body::Body::new(WatchBody {
            answers,
            buf: BytesMut::new(),
            finished: false,
            failed: None,
            trailers_sent: false,
        }));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        response
    }
}

impl<A: AnswerSource> Body for WatchBody<A> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.trailers_sent {
            return Poll::Ready(None);
        }
        while !this.finished && this.buf.len() < WRITE_BUFFER {
            match this.answers.poll_write(cx, &mut this.buf) {
                Poll::Ready(Some(Ok(()))) => {}
                Poll::Ready(end) => {
                    this.finished = true;
                    this.failed = end.and_then(Result::err);
                }
                Poll::Pending if this.buf.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        if !this.buf.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze()))));
        }
        this.trailers_sent = true;
        let trailers = match this.failed.take() {
            // Its grpc-status and grpc-message, as trailers.
            Some(status) => {
                let headers = status
                    .into_http::<tonic::body::Body>()
                    .into_parts()
                    .0
                    .headers;
                let mut trailers = http::HeaderMap::new();
                for (name, value) in &headers {
                    if name.as_str().starts_with("grpc-") {
                        trailers.insert(name.clone(), value.clone());
                    }
                }
                trailers
            }
            None => super::ok_trailers(),
        };
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.trailers_sent
    }
}

/// Who a watch stream's client is, to check each watch it creates.
struct StreamIdentity {
    server: KvServer,
    token: Option<String>,
    common_name: Option<String>,
}

impl StreamIdentity {
    /// May this client watch what `create` names? `Err`: etcd's reason.
    fn may_watch(
        &self,
        create: &crate::proto::etcdserverpb::WatchCreateRequest,
    ) -> Result<(), String> {
        self.server
            .auth_info(self.token.as_deref(), self.common_name.as_deref())
            .and_then(|who| {
                self.server.authorize_range(
                    &who,
                    &create.key,
                    &create.range_end,
                    crate::auth::Access::Read,
                )
            })
            .map_err(|e| super::to_status(e).message().to_string())
    }
}

/// Reads the stream's requests until the client closes it, then drops its watchers.
async fn serve_stream(
    hub: WatchHub,
    identity: StreamIdentity,
    stream: u64,
    tx: WatchSender,
    mut inbound: Streaming<WatchRequest>,
    ended_with: EndedWith,
) {
    loop {
        let request = match inbound.message().await {
            Ok(Some(request)) => request,
            Ok(None) => break,
            Err(status) => {
                *ended_with.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                break;
            }
        };
        let answered = hub
            .answer(stream, &tx, request, |create| identity.may_watch(create))
            .await;
        if !answered {
            break;
        }
    }
    hub.close_stream(stream);
}
