//! The `etcdserverpb.Lease` service. Keep-alive and time-to-live are answered by the leader
//! (it holds the leases' deadlines); a follower forwards them, as etcd's do.

use tokio::sync::mpsc;
use tonic::codegen::tokio_stream;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::caller;
use super::forward::{forwarded, ToLeader};
use super::to_status;
use crate::proto::etcdserverpb::lease_client::LeaseClient;
use crate::proto::etcdserverpb::lease_server::Lease;
use crate::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use crate::server::{KvServer, ServerError};

/// Keep-alive answers queued for one stream, at most.
const KEEP_ALIVE_QUEUE: usize = 16;

pub struct LeaseService {
    server: KvServer,
    to_leader: ToLeader,
}

impl LeaseService {
    pub fn new(server: KvServer) -> Self {
        LeaseService {
            to_leader: ToLeader::new(server.clone()),
            server,
        }
    }

    /// One keep-alive outside a gRPC stream (the JSON gateway's), for the caller of `from`.
    pub async fn keep_alive_once(
        &self,
        id: i64,
        from: &Request<()>,
    ) -> Result<LeaseKeepAliveResponse, Status> {
        let who = caller(&self.server, from)?;
        self.server.require_user(&who).map_err(to_status)?;
        keep_alive(&self.server, &self.to_leader, from, id).await
    }
}

/// One keep-alive: renewed here on the leader, else by the leader.
async fn keep_alive<T>(
    server: &KvServer,
    to_leader: &ToLeader,
    stream: &Request<T>,
    id: i64,
) -> Result<LeaseKeepAliveResponse, Status> {
    match server.lease_keep_alive(id).await {
        Ok(ttl) => Ok(LeaseKeepAliveResponse {
            header: Some(server.header(server.status().revision)),
            id,
            ttl,
        }),
        Err(ServerError::NotLeader) => {
            let channel = to_leader.channel(stream).await?;
            let request = forwarded(tokio_stream::once(LeaseKeepAliveRequest { id }), stream);
            let mut answers = LeaseClient::new(channel)
                .lease_keep_alive(request)
                .await?
                .into_inner();
            answers
                .message()
                .await?
                .ok_or_else(|| Status::unavailable("etcdserver: leader changed"))
        }
        Err(e) => Err(to_status(e)),
    }
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let who = caller(&self.server, &request)?;
        self.server
            .lease_grant_as(&who, request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let who = caller(&self.server, &request)?;
        self.server
            .lease_revoke_as(&who, request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<BoxStream<LeaseKeepAliveResponse>>, Status> {
        let who = caller(&self.server, &request)?;
        self.server.require_user(&who).map_err(to_status)?;
        let (tx, rx) = mpsc::channel(KEEP_ALIVE_QUEUE);
        let server = self.server.clone();
        let to_leader = self.to_leader.clone();
        let (metadata, extensions, mut inbound) = request.into_parts();
        let marks = Request::from_parts(metadata, extensions, ());
        tokio::spawn(async move {
            loop {
                let id = match inbound.message().await {
                    Ok(Some(req)) => req.id,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let answer = keep_alive(&server, &to_leader, &marks, id).await;
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let req = *request.get_ref();
        let who = caller(&self.server, &request)?;
        self.server.require_user(&who).map_err(to_status)?;
        if req.keys {
            // CVE-2023-32082: the keys are listed only to whom may read them all.
            self.server
                .authorize_lease_keys_read(&who, req.id)
                .map_err(to_status)?;
        }
        match self.server.lease_time_to_live(req).await {
            Ok(resp) => Ok(Response::new(resp)),
            Err(ServerError::NotLeader) => {
                let channel = self.to_leader.channel(&request).await?;
                LeaseClient::new(channel)
                    .lease_time_to_live(forwarded(req, &request))
                    .await
            }
            Err(e) => Err(to_status(e)),
        }
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let who = caller(&self.server, &request)?;
        self.server.require_user(&who).map_err(to_status)?;
        self.server
            .lease_leases()
            .await
            .map(Response::new)
            .map_err(to_status)
    }
}
