//! The proxy's Watch service: each client stream is served by the watch broker
//! (`proxy::broker`), which coalesces its watchers with every other client's.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::forward::Passed;
use crate::proto::etcdserverpb::watch_server::Watch;
use crate::proto::etcdserverpb::{WatchRequest, WatchResponse};
use crate::proxy::broker::Broker;

#[derive(Clone)]
pub struct ProxyWatch {
    pub broker: Arc<Broker>,
}

#[tonic::async_trait]
impl Watch for ProxyWatch {
    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Passed<WatchResponse>>, Status> {
        let (credentials, _, inbound) = request.into_parts();
        Ok(Response::new(self.broker.serve(credentials, inbound)))
    }
}
