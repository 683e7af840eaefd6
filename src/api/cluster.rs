//! The `etcdserverpb.Cluster` service. Membership changes are decided by the leader (it knows
//! how far each member's log is); a follower forwards them to the leader's client URL once.

use std::time::Duration;

use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

use super::to_status;
use crate::proto::etcdserverpb::cluster_client::ClusterClient;
use crate::proto::etcdserverpb::cluster_server::Cluster;
use crate::proto::etcdserverpb::{
    MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse,
};
use crate::server::{KvServer, ServerError};

/// Marks a request a follower forwarded: the receiver does not forward it again.
const FORWARDED: &str = "x-quorumkv-forwarded";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct ClusterService {
    server: KvServer,
}

impl ClusterService {
    pub fn new(server: KvServer) -> Self {
        ClusterService { server }
    }

    /// A client of the leader, for a request this member cannot decide; `None` when the
    /// request was itself forwarded (the leader changed meanwhile).
    async fn leader<T>(
        &self,
        request: &Request<T>,
    ) -> Result<ClusterClient<tonic::transport::Channel>, Status> {
        if request.metadata().contains_key(FORWARDED) {
            return Err(Status::unavailable("etcdserver: leader changed"));
        }
        let Some((leader, urls)) = self.server.leader_client_urls() else {
            return Err(Status::unavailable("etcdserver: no leader"));
        };
        for url in &urls {
            let Ok(endpoint) = Endpoint::from_shared(url.clone()) else {
                continue;
            };
            match endpoint.connect_timeout(CONNECT_TIMEOUT).connect().await {
                Ok(channel) => return Ok(ClusterClient::new(channel)),
                Err(e) => {
                    tracing::warn!(leader = format!("{leader:x}"), url, error = %e, "cannot reach the leader to forward a membership change")
                }
            }
        }
        Err(Status::unavailable("etcdserver: leader changed"))
    }

    fn members_response_header(&self) -> crate::proto::etcdserverpb::ResponseHeader {
        self.server.header(self.server.status().revision)
    }
}

fn forwarded<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    request
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let req = request.get_ref().clone();
        match self
            .server
            .member_add(req.peer_ur_ls.clone(), req.is_learner)
            .await
        {
            Ok((member, members)) => Ok(Response::new(MemberAddResponse {
                header: Some(self.members_response_header()),
                member: Some(member),
                members,
            })),
            Err(ServerError::NotLeader) => {
                self.leader(&request)
                    .await?
                    .member_add(forwarded(req))
                    .await
            }
            Err(e) => Err(to_status(e)),
        }
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let req = *request.get_ref();
        match self.server.member_remove(req.id).await {
            Ok(members) => Ok(Response::new(MemberRemoveResponse {
                header: Some(self.members_response_header()),
                members,
            })),
            Err(ServerError::NotLeader) => {
                self.leader(&request)
                    .await?
                    .member_remove(forwarded(req))
                    .await
            }
            Err(e) => Err(to_status(e)),
        }
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let req = request.get_ref().clone();
        match self
            .server
            .member_update(req.id, req.peer_ur_ls.clone())
            .await
        {
            Ok(members) => Ok(Response::new(MemberUpdateResponse {
                header: Some(self.members_response_header()),
                members,
            })),
            Err(ServerError::NotLeader) => {
                self.leader(&request)
                    .await?
                    .member_update(forwarded(req))
                    .await
            }
            Err(e) => Err(to_status(e)),
        }
    }

    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let members = self
            .server
            .member_list(request.get_ref().linearizable)
            .await
            .map_err(to_status)?;
        Ok(Response::new(MemberListResponse {
            header: Some(self.members_response_header()),
            members,
        }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let req = *request.get_ref();
        match self.server.member_promote(req.id).await {
            Ok(members) => Ok(Response::new(MemberPromoteResponse {
                header: Some(self.members_response_header()),
                members,
            })),
            Err(ServerError::NotLeader) => {
                self.leader(&request)
                    .await?
                    .member_promote(forwarded(req))
                    .await
            }
            Err(e) => Err(to_status(e)),
        }
    }
}
