//! The `etcdserverpb.Cluster` service. Membership changes are decided by the leader (it knows
//! how far each member's log is); a follower forwards them to the leader's client URL once.

use tonic::{Request, Response, Status};

use super::auth::caller;
use super::forward::{forwarded, ToLeader};
use super::to_status;
use crate::auth::AuthError;
use crate::proto::etcdserverpb::cluster_client::ClusterClient;
use crate::proto::etcdserverpb::cluster_server::Cluster;
use crate::proto::etcdserverpb::{
    MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse,
};
use crate::server::{KvServer, ServerError};

pub struct ClusterService {
    server: KvServer,
    to_leader: ToLeader,
}

impl ClusterService {
    pub fn new(server: KvServer) -> Self {
        ClusterService {
            to_leader: ToLeader::new(server.clone()),
            server,
        }
    }

    async fn leader<T>(
        &self,
        request: &Request<T>,
    ) -> Result<ClusterClient<tonic::transport::Channel>, Status> {
        Ok(ClusterClient::new(self.to_leader.channel(request).await?))
    }

    /// Membership changes need root once auth is on.
    fn require_root<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let who = caller(&self.server, request)?;
        self.server
            .require_root(&who, AuthError::PermissionDenied)
            .map_err(to_status)
    }

    /// etcd's Cluster service names no revision in its headers.
    fn members_response_header(&self) -> crate::proto::etcdserverpb::ResponseHeader {
        self.server.header(0)
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        // etcd 3.4 checks the URLs before who asks.
        if !crate::server::valid_peer_urls(&request.get_ref().peer_ur_ls) {
            return Err(to_status(ServerError::BadMemberUrls));
        }
        self.require_root(&request)?;
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
                    .member_add(forwarded(req, &request))
                    .await
            }
            Err(e) => Err(to_status(e)),
        }
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.require_root(&request)?;
        let req = *request.get_ref();
        match self.server.member_remove(req.id).await {
            Ok(members) => Ok(Response::new(MemberRemoveResponse {
                header: Some(self.members_response_header()),
                members,
            })),
            Err(ServerError::NotLeader) => {
                self.leader(&request)
                    .await?
                    .member_remove(forwarded(req, &request))
                    .await
            }
            Err(e) => Err(to_status(e)),
        }
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        self.require_root(&request)?;
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
                    .member_update(forwarded(req, &request))
                    .await
            }
            Err(e) => Err(to_status(e)),
        }
    }

    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        // Any user (GHSA-q8m4-xhhv-38mg: not anyone, once auth is on). With auth off, the
        // token is not looked at, as etcd 3.4 never looks at it here.
        if self.server.auth_view().enabled() {
            let who = caller(&self.server, &request)?;
            self.server.require_user(&who).map_err(to_status)?;
        }
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
        self.require_root(&request)?;
        let req = *request.get_ref();
        match self.server.member_promote(req.id).await {
            Ok(members) => Ok(Response::new(MemberPromoteResponse {
                header: Some(self.members_response_header()),
                members,
            })),
            Err(ServerError::NotLeader) => {
                self.leader(&request)
                    .await?
                    .member_promote(forwarded(req, &request))
                    .await
            }
            Err(e) => Err(to_status(e)),
        }
    }
}
