//! The `etcdserverpb.Watch` service: one bidirectional stream carries many watches. Requests
//! (create, cancel, progress) are read in order; responses (created, events, canceled,
//! progress) come back on one bounded queue shared by the stream's watchers.
//!
//! The service is written out here rather than generated, for its codec: responses whose events
//! the hub encoded once for many watchers (`WatchOut::Shared`) go on the wire as they are.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::codegen::tokio_stream::StreamExt;
use tonic::codegen::{http, Body, BoxFuture, BoxStream, Service, StdError};
use tonic::{Request, Response, Status, Streaming};

use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::WatchRequest;
use crate::server::KvServer;
use crate::watch::{WatchHub, WatchOut, WatchSender};

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
        let method = WatchMethod(self.server.clone());
        let max_decode = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(WatchCodec)
                .apply_max_message_size_config(Some(max_decode), Some(usize::MAX));
            Ok(grpc.streaming(method, req).await)
        })
    }
}

struct WatchMethod(KvServer);

impl tonic::server::StreamingService<WatchRequest> for WatchMethod {
    type Response = WatchOut;
    type ResponseStream = BoxStream<WatchOut>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<WatchRequest>>) -> Self::Future {
        let server = self.0.clone();
        Box::pin(async move {
            server.refuse_learner().map_err(super::to_status)?;
            let hub = server.watches().clone();
            let (stream, tx, rx) = hub.open_stream();
            tokio::spawn(serve_stream(hub, stream, tx, request.into_inner()));
            let responses = rx.map(Ok);
            Ok(Response::new(Box::pin(responses) as Self::ResponseStream))
        })
    }
}

/// Requests decoded by prost; responses written by `WatchOut::encode`.
struct WatchCodec;

struct WatchEncoder;

impl Encoder for WatchEncoder {
    type Item = WatchOut;
    type Error = Status;

    fn encode(&mut self, item: WatchOut, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding a watch response: {e}")))
    }

    /// Responses queued together are written in one buffer of up to `WRITE_BUFFER` bytes,
    /// allocated at that size (tonic's default starts at 8 KiB and copies as it grows).
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(WRITE_BUFFER, WRITE_BUFFER)
    }
}

impl Codec for WatchCodec {
    type Encode = WatchOut;
    type Decode = WatchRequest;
    type Encoder = WatchEncoder;
    type Decoder = tonic_prost::ProstDecoder<WatchRequest>;

    fn encoder(&mut self) -> WatchEncoder {
        WatchEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// Reads the stream's requests until the client closes it, then drops its watchers.
async fn serve_stream(
    hub: WatchHub,
    stream: u64,
    tx: WatchSender,
    mut inbound: Streaming<WatchRequest>,
) {
    while let Ok(Some(request)) = inbound.message().await {
        let answered = match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => {
                let created = hub.create(stream, &tx, &create);
                let (watch_id, ok) = (created.watch_id, !created.canceled);
                let sent = tx.send(created.into()).await.is_ok();
                if ok {
                    hub.activate(stream, watch_id);
                }
                sent
            }
            // As etcd: a cancel of an unknown watch gets no answer.
            Some(RequestUnion::CancelRequest(cancel)) if hub.cancel(stream, cancel.watch_id) => {
                let mut canceled = hub.progress(stream);
                canceled.watch_id = cancel.watch_id;
                canceled.canceled = true;
                tx.send(canceled.into()).await.is_ok()
            }
            Some(RequestUnion::CancelRequest(_)) => true,
            Some(RequestUnion::ProgressRequest(_)) => {
                tx.send(hub.progress(stream).into()).await.is_ok()
            }
            None => true,
        };
        if !answered {
            break;
        }
    }
    hub.close_stream(stream);
}
