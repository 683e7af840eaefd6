//! KV through the proxy. Writes and linearizable reads go upstream; serializable reads go
//! through the read cache (`proxy::cache`).

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::forward::{pass, upstream_call};
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
}

pass! { Kv, ProxyKv, KvClient;
    [
        put(PutRequest) -> PutResponse, false;
        delete_range(DeleteRangeRequest) -> DeleteRangeResponse, false;
        txn(TxnRequest) -> TxnResponse, false;
        compact(CompactionRequest) -> CompactionResponse, false;
    ]
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let (credentials, _, message) = request.into_parts();
        self.cache.range(message, &credentials).await.map(Response::new)
    }
}
