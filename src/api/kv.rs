//! The `etcdserverpb.KV` service.

use tonic::{Request, Response, Status};

use super::auth::caller;
use super::status::to_status;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use crate::server::{KvServer, Precheck};

pub struct KvService {
    server: KvServer,
}

impl KvService {
    pub fn new(server: KvServer) -> Self {
        KvService { server }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        request
            .get_ref()
            .precheck(&self.server)
            .map_err(to_status)?;
        let who = caller(&self.server, &request)?;
        self.server
            .range_checked(&who, request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        request
            .get_ref()
            .precheck(&self.server)
            .map_err(to_status)?;
        let who = caller(&self.server, &request)?;
        self.server
            .put_checked(&who, request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        request
            .get_ref()
            .precheck(&self.server)
            .map_err(to_status)?;
        let who = caller(&self.server, &request)?;
        self.server
            .delete_range_checked(&who, request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        request
            .get_ref()
            .precheck(&self.server)
            .map_err(to_status)?;
        let who = caller(&self.server, &request)?;
        self.server
            .txn_checked(&who, request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        request
            .get_ref()
            .precheck(&self.server)
            .map_err(to_status)?;
        let who = caller(&self.server, &request)?;
        self.server
            .compact_as(&who, request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }
}
