//! The proxy's Watch service: each client stream is served by the watch broker
//! (`proxy::broker`), which coalesces its watchers with every other client's.

use std::sync::Arc;

use tonic::codegen::tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::forward::Passed;
use super::namespace::{Namespace, Namespaced};
use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::watch_server::Watch;
use crate::proto::etcdserverpb::{WatchRequest, WatchResponse};
use crate::proxy::broker::Broker;

#[derive(Clone)]
pub struct ProxyWatch {
    pub broker: Arc<Broker>,
    pub ns: Namespace,
}

#[tonic::async_trait]
impl Watch for ProxyWatch {
    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Passed<WatchResponse>>, Status> {
        let (credentials, _, inbound) = request.into_parts();
        if self.ns.is_empty() {
            return Ok(Response::new(self.broker.serve(credentials, inbound)));
        }
        let (into, out_of) = (self.ns.clone(), self.ns.clone());
        let inbound = inbound.map(move |request| {
            request.map(|mut request| {
                if let Some(RequestUnion::CreateRequest(create)) = &mut request.request_union {
                    create.enter(&into);
                }
                request
            })
        });
        let answers = self.broker.serve(credentials, inbound).map(move |answer| {
            answer.map(|mut answer| {
                answer.leave(&out_of);
                answer
            })
        });
        Ok(Response::new(Box::pin(answers)))
    }
}
