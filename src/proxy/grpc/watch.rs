//! The proxy's Watch service: each client stream is served by the watch broker
//! (`proxy::broker`), which coalesces its watchers with every other client's. Written out
//! rather than generated, as the member's (`api::watch`): an answer whose events other
//! watchers got alike goes on the wire from the parts the broker encoded once for all of them.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tonic::codegen::tokio_stream::{Stream, StreamExt};
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::metadata::MetadataMap;
use tonic::{Status, Streaming};

use super::namespace::{Namespace, Namespaced};
use crate::api::watch::{refuse_compressed, AnswerSource, WatchBody};
use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::WatchRequest;
use crate::proxy::broker::{Broker, ClientAnswers};
use crate::watch::{Queued, WatchOut};

/// gRPC's full method name of `Watch.Watch`.
const WATCH_PATH: &str = "/etcdserverpb.Watch/Watch";

#[derive(Clone)]
pub struct ProxyWatch {
    pub broker: Arc<Broker>,
    pub ns: Namespace,
    /// The largest request accepted, in bytes.
    pub max_decoding_message_size: usize,
}

impl tonic::server::NamedService for ProxyWatch {
    const NAME: &'static str = "etcdserverpb.Watch";
}

impl<B> Service<http::Request<B>> for ProxyWatch
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
        if let Some(status) = refuse_compressed(req.headers()) {
            return Box::pin(async { Ok(status.into_http()) });
        }
        let (parts, body) = req.into_parts();
        let credentials = MetadataMap::from_headers(parts.headers);
        let inbound = Streaming::new_request(
            tonic_prost::ProstDecoder::<WatchRequest>::default(),
            body,
            None,
            Some(self.max_decoding_message_size),
        );
        let answers = if self.ns.is_empty() {
            self.broker.serve(credentials, inbound)
        } else {
            namespaced(&self.broker, &self.ns, credentials, inbound)
        };
        Box::pin(async move { Ok(WatchBody::response(Answers(answers))) })
    }
}

/// A stream of a client in a namespace: its keys go in and come out of it.
fn namespaced(
    broker: &Arc<Broker>,
    ns: &Namespace,
    credentials: MetadataMap,
    inbound: Streaming<WatchRequest>,
) -> ClientAnswers {
    let (into, out_of) = (ns.clone(), ns.clone());
    let inbound = inbound.map(move |request| {
        request.map(|mut request| {
            if let Some(RequestUnion::CreateRequest(create)) = &mut request.request_union {
                create.enter(&into);
            }
            request
        })
    });
    let answers = broker.serve(credentials, inbound).map(move |answer| {
        answer.map(|answer| {
            let mut answer = answer.into_response();
            answer.leave(&out_of);
            WatchOut::Response(answer)
        })
    });
    Box::pin(answers)
}

/// A client stream's answers, written as gRPC messages.
struct Answers(ClientAnswers);

impl AnswerSource for Answers {
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<Option<Result<(), Status>>> {
        match std::pin::Pin::new(&mut self.0).poll_next(cx) {
            Poll::Ready(Some(Ok(answer))) => {
                Queued::One(answer).write_grpc(buf);
                Poll::Ready(Some(Ok(())))
            }
            Poll::Ready(Some(Err(status))) => Poll::Ready(Some(Err(status))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
