//! KV through the proxy. Writes and linearizable reads go upstream; serializable reads go
//! through the read cache (`proxy::cache`).

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::forward::{pass, shown_call};
use super::namespace::{Namespace, Namespaced};
use super::upstream::{carry, endpoint_gone, Upstream};
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::*;
use crate::proxy::cache::RangeCache;

/// The KV service of the proxy.
#[derive(Clone)]
pub struct ProxyKv {
    pub up: Arc<Upstream>,
    pub cache: Arc<RangeCache>,
    pub seen: Arc<AtomicI64>,
    pub ns: Namespace,
}

/// A KV write passed upstream (not retried elsewhere: it may have been applied), in and out of
/// the namespace; its revision is one the proxy has shown.
macro_rules! write_call {
    ($self:ident, $request:ident, $method:ident) => {{
        let mut request = $request;
        if !$self.ns.is_empty() {
            request.get_mut().enter(&$self.ns);
        }
        let answer: Result<Response<_>, Status> =
            shown_call!($self, request, KvClient, $method, false);
        let mut answer = answer?;
        if !$self.ns.is_empty() {
            answer.get_mut().leave(&$self.ns);
        }
        Ok(answer)
    }};
}

pass! { Kv, ProxyKv, KvClient;
    [
        compact(CompactionRequest) -> CompactionResponse, false;
    ]
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let (credentials, _, mut message) = request.into_parts();
        if self.ns.is_empty() {
            return self.cache.range(message, &credentials).await.map(Response::new);
        }
        message.enter(&self.ns);
        let mut answer = self.cache.range(message, &credentials).await?;
        answer.leave(&self.ns);
        Ok(Response::new(answer))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        write_call!(self, request, put)
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        write_call!(self, request, delete_range)
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        write_call!(self, request, txn)
    }
}
