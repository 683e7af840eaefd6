//! The services the proxy passes through as they are: each call goes to the endpoint in use,
//! with the caller's token, and its answer (or its error, code and message unchanged) comes
//! back. A read that finds the endpoint gone is retried on the next one; a write is not (it
//! may have been applied), and its caller gets the error, as from a member that went away.

use std::pin::Pin;
use std::sync::Arc;

use tonic::codegen::tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::upstream::{carry, endpoint_gone, Upstream};
use crate::proto::etcdserverpb::auth_client::AuthClient;
use crate::proto::etcdserverpb::auth_server::Auth;
use crate::proto::etcdserverpb::cluster_client::ClusterClient;
use crate::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::proto::etcdserverpb::maintenance_server::Maintenance;
use crate::proto::etcdserverpb::*;
use crate::proto::v3electionpb::election_client::ElectionClient;
use crate::proto::v3electionpb::election_server::Election;
use crate::proto::v3electionpb::*;
use crate::proto::v3lockpb::lock_client::LockClient;
use crate::proto::v3lockpb::lock_server::Lock;
use crate::proto::v3lockpb::*;

/// A stream of answers from upstream, passed on.
pub type Passed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Calls `$method` of `$client` upstream with `$request`'s message; `$retry`: may the call be
/// made again on the next endpoint when the one in use is gone (reads only).
macro_rules! upstream_call {
    ($up:expr, $request:expr, $client:ident, $method:ident, $retry:expr) => {{
        let up: &$crate::proxy::grpc::upstream::Upstream = &$up;
        let request = $request;
        let mut attempts = 0;
        loop {
            let link = up.link().await?;
            let mut client = $client::new(link.channel)
                .max_encoding_message_size(up.max_send_bytes)
                .max_decoding_message_size(up.max_recv_bytes);
            let message = request.get_ref().clone();
            match client.$method(carry(message, &request)).await {
                Ok(answer) => break Ok(Response::new(answer.into_inner())),
                Err(status) if endpoint_gone(&status) => {
                    up.failed(link.generation);
                    attempts += 1;
                    if !$retry || attempts >= up.endpoints().len() {
                        break Err(status);
                    }
                }
                Err(status) => break Err(status),
            }
        }
    }};
}
pub(crate) use upstream_call;

/// `upstream_call!`, and the revision of its answer recorded as one the proxy has shown: a
/// write (a lease revoked, a lock released) moves it, and the read cache must not answer from
/// before it.
macro_rules! shown_call {
    ($self:ident, $request:expr, $client:ident, $method:ident, $retry:expr) => {{
        let answer: Result<Response<_>, Status> = $crate::proxy::grpc::forward::upstream_call!(
            $self.up, $request, $client, $method, $retry
        );
        answer.inspect(|answer| {
            if let Some(header) = &answer.get_ref().header {
                $self
                    .seen
                    .fetch_max(header.revision, std::sync::atomic::Ordering::Relaxed);
            }
        })
    }};
}
pub(crate) use shown_call;

/// `impl $trait for $ty`: the unary methods listed passed through (each with its retry rule),
/// then the items given as they are.
macro_rules! pass {
    ($trait:path, $ty:ty, $client:ident;
     [$($method:ident($req:ty) -> $resp:ty, $retry:expr;)*]
     $($extra:item)*) => {
        #[tonic::async_trait]
        impl $trait for $ty {
            $(
                async fn $method(&self, request: Request<$req>) -> Result<Response<$resp>, Status> {
                    $crate::proxy::grpc::forward::shown_call!(self, request, $client, $method, $retry)
                }
            )*
            $($extra)*
        }
    };
}
pub(crate) use pass;

/// Maintenance, Auth, Lock and Election, passed through.
#[derive(Clone)]
pub struct Passthrough {
    pub up: Arc<Upstream>,
    /// The newest revision the proxy has shown a client.
    pub seen: Arc<std::sync::atomic::AtomicI64>,
}

pass! { Maintenance, Passthrough, MaintenanceClient;
    [
        alarm(AlarmRequest) -> AlarmResponse, false;
        status(StatusRequest) -> StatusResponse, true;
        defragment(DefragmentRequest) -> DefragmentResponse, false;
        hash(HashRequest) -> HashResponse, true;
        hash_kv(HashKvRequest) -> HashKvResponse, true;
        move_leader(MoveLeaderRequest) -> MoveLeaderResponse, false;
        downgrade(DowngradeRequest) -> DowngradeResponse, false;
    ]


    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<Passed<SnapshotResponse>>, Status> {
        let stream = upstream_call!(self.up, request, MaintenanceClient, snapshot, true)?;
        Ok(Response::new(Box::pin(stream.into_inner())))
    }
}

pass! { Auth, Passthrough, AuthClient;
    [
        auth_enable(AuthEnableRequest) -> AuthEnableResponse, false;
        auth_disable(AuthDisableRequest) -> AuthDisableResponse, false;
        auth_status(AuthStatusRequest) -> AuthStatusResponse, true;
        authenticate(AuthenticateRequest) -> AuthenticateResponse, true;
        user_add(AuthUserAddRequest) -> AuthUserAddResponse, false;
        user_get(AuthUserGetRequest) -> AuthUserGetResponse, true;
        user_list(AuthUserListRequest) -> AuthUserListResponse, true;
        user_delete(AuthUserDeleteRequest) -> AuthUserDeleteResponse, false;
        user_change_password(AuthUserChangePasswordRequest) -> AuthUserChangePasswordResponse, false;
        user_grant_role(AuthUserGrantRoleRequest) -> AuthUserGrantRoleResponse, false;
        user_revoke_role(AuthUserRevokeRoleRequest) -> AuthUserRevokeRoleResponse, false;
        role_add(AuthRoleAddRequest) -> AuthRoleAddResponse, false;
        role_get(AuthRoleGetRequest) -> AuthRoleGetResponse, true;
        role_list(AuthRoleListRequest) -> AuthRoleListResponse, true;
        role_delete(AuthRoleDeleteRequest) -> AuthRoleDeleteResponse, false;
        role_grant_permission(AuthRoleGrantPermissionRequest) -> AuthRoleGrantPermissionResponse, false;
        role_revoke_permission(AuthRoleRevokePermissionRequest) -> AuthRoleRevokePermissionResponse, false;
    ]

}

pass! { Lock, Passthrough, LockClient;
    [
        lock(LockRequest) -> LockResponse, false;
        unlock(UnlockRequest) -> UnlockResponse, false;
    ]

}

pass! { Election, Passthrough, ElectionClient;
    [
        campaign(CampaignRequest) -> CampaignResponse, false;
        proclaim(ProclaimRequest) -> ProclaimResponse, false;
        leader(LeaderRequest) -> LeaderResponse, true;
        resign(ResignRequest) -> ResignResponse, false;
    ]


    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<Passed<LeaderResponse>>, Status> {
        // A stream cut by the endpoint's failure ends with its error; the client observes
        // again, and that call moves to the next endpoint.
        let stream = upstream_call!(self.up, request, ElectionClient, observe, true)?;
        Ok(Response::new(Box::pin(stream.into_inner())))
    }
}

/// Cluster: passed through, except `MemberList` when the proxy registers itself
/// (`--resolver-prefix`): then it lists the proxies registered under the prefix, as etcd's.
#[derive(Clone)]
pub struct ProxyCluster {
    pub up: Arc<Upstream>,
    pub seen: Arc<std::sync::atomic::AtomicI64>,
    pub registry: Option<Arc<super::register::Registration>>,
}

pass! { crate::proto::etcdserverpb::cluster_server::Cluster, ProxyCluster, ClusterClient;
    [
        member_add(MemberAddRequest) -> MemberAddResponse, false;
        member_remove(MemberRemoveRequest) -> MemberRemoveResponse, false;
        member_update(MemberUpdateRequest) -> MemberUpdateResponse, false;
        member_promote(MemberPromoteRequest) -> MemberPromoteResponse, false;
    ]

    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        match &self.registry {
            Some(registry) => Ok(Response::new(MemberListResponse {
                header: None,
                members: registry.members(&request).await?,
            })),
            None => upstream_call!(self.up, request, ClusterClient, member_list, true),
        }
    }
}
