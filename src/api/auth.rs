//! The `etcdserverpb.Auth` service, and who a request runs as: the token a client sends in the
//! `token` metadata (etcd's clients), or in `authorization` (the JSON gateway's header).

use tonic::codegen::http::HeaderMap;
use tonic::{Request, Response, Status};

use super::status::to_status;
use crate::auth::AuthInfo;
use crate::proto::etcdserverpb::auth_server::Auth;
use crate::proto::etcdserverpb::*;
use crate::proto::quorumkvpb::auth_change::Change;
use crate::server::KvServer;

pub use crate::auth::{AUTHORIZATION, TOKEN_METADATA};

/// The token in `headers`, if any (`token` first, then `authorization`).
pub fn token_of(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(TOKEN_METADATA)
        .or_else(|| headers.get(AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .map(|t| t.strip_prefix("Bearer ").unwrap_or(t))
        .filter(|t| !t.is_empty())
}

/// The common name of the client's certificate, when the connection has one.
pub fn common_name_of(extensions: &tonic::codegen::http::Extensions) -> Option<&str> {
    extensions.get::<PeerCommonName>().map(|cn| cn.0.as_str())
}

/// Put on each request of a TLS connection whose client showed a certificate (with
/// `--client-cert-auth`): the certificate's common name.
#[derive(Debug, Clone)]
pub struct PeerCommonName(pub String);

/// Who the request runs as (see `KvServer::auth_info`).
pub fn caller_of(
    server: &KvServer,
    headers: &HeaderMap,
    extensions: &tonic::codegen::http::Extensions,
) -> Result<AuthInfo, Status> {
    server
        .auth_info(token_of(headers), common_name_of(extensions))
        .map_err(to_status)
}

/// Who a tonic request runs as.
pub fn caller<T>(server: &KvServer, request: &Request<T>) -> Result<AuthInfo, Status> {
    caller_of(server, request.metadata().as_ref(), request.extensions())
}

pub struct AuthService {
    server: KvServer,
}

impl AuthService {
    pub fn new(server: KvServer) -> Self {
        AuthService { server }
    }

    fn header(&self) -> Option<ResponseHeader> {
        Some(self.server.header(self.server.status().revision))
    }

    /// Applies `change` for the caller of `request`.
    async fn change<T>(&self, request: &Request<T>, change: Change) -> Result<(), Status> {
        let who = caller(&self.server, request)?;
        self.server
            .auth_change(&who, change)
            .await
            .map(drop)
            .map_err(to_status)
    }
}

/// A response carrying only the header.
macro_rules! header_only {
    ($self:ident, $request:ident, $change:expr, $response:ident) => {{
        $self.change(&$request, $change).await?;
        Ok(Response::new($response {
            header: $self.header(),
        }))
    }};
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        request: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        let change = Change::Enable(*request.get_ref());
        header_only!(self, request, change, AuthEnableResponse)
    }

    async fn auth_disable(
        &self,
        request: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let change = Change::Disable(*request.get_ref());
        header_only!(self, request, change, AuthDisableResponse)
    }

    async fn auth_status(
        &self,
        _request: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        let (enabled, auth_revision) = self.server.auth_status().await.map_err(to_status)?;
        Ok(Response::new(AuthStatusResponse {
            header: self.header(),
            enabled,
            auth_revision,
        }))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let req = request.get_ref();
        let presented = token_of(request.metadata().as_ref());
        let token = self
            .server
            .authenticate(&req.name, &req.password, presented)
            .await
            .map_err(to_status)?;
        Ok(Response::new(AuthenticateResponse {
            header: self.header(),
            token,
        }))
    }

    async fn user_add(
        &self,
        request: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let change = Change::UserAdd(request.get_ref().clone());
        header_only!(self, request, change, AuthUserAddResponse)
    }

    async fn user_get(
        &self,
        request: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let who = caller(&self.server, &request)?;
        let user = self
            .server
            .user_get(&who, &request.get_ref().name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(AuthUserGetResponse {
            header: self.header(),
            roles: user.roles,
        }))
    }

    async fn user_list(
        &self,
        request: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        let who = caller(&self.server, &request)?;
        let users = self.server.user_list(&who).await.map_err(to_status)?;
        Ok(Response::new(AuthUserListResponse {
            header: self.header(),
            users,
        }))
    }

    async fn user_delete(
        &self,
        request: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let change = Change::UserDelete(request.get_ref().clone());
        header_only!(self, request, change, AuthUserDeleteResponse)
    }

    async fn user_change_password(
        &self,
        request: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let change = Change::UserChangePassword(request.get_ref().clone());
        header_only!(self, request, change, AuthUserChangePasswordResponse)
    }

    async fn user_grant_role(
        &self,
        request: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let change = Change::UserGrantRole(request.get_ref().clone());
        header_only!(self, request, change, AuthUserGrantRoleResponse)
    }

    async fn user_revoke_role(
        &self,
        request: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let change = Change::UserRevokeRole(request.get_ref().clone());
        header_only!(self, request, change, AuthUserRevokeRoleResponse)
    }

    async fn role_add(
        &self,
        request: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        let change = Change::RoleAdd(request.get_ref().clone());
        header_only!(self, request, change, AuthRoleAddResponse)
    }

    async fn role_get(
        &self,
        request: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let who = caller(&self.server, &request)?;
        let perm = self
            .server
            .role_get(&who, &request.get_ref().role)
            .await
            .map_err(to_status)?;
        Ok(Response::new(AuthRoleGetResponse {
            header: self.header(),
            perm,
        }))
    }

    async fn role_list(
        &self,
        request: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        let who = caller(&self.server, &request)?;
        let roles = self.server.role_list(&who).await.map_err(to_status)?;
        Ok(Response::new(AuthRoleListResponse {
            header: self.header(),
            roles,
        }))
    }

    async fn role_delete(
        &self,
        request: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let change = Change::RoleDelete(request.get_ref().clone());
        header_only!(self, request, change, AuthRoleDeleteResponse)
    }

    async fn role_grant_permission(
        &self,
        request: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let change = Change::RoleGrantPermission(request.get_ref().clone());
        header_only!(self, request, change, AuthRoleGrantPermissionResponse)
    }

    async fn role_revoke_permission(
        &self,
        request: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let change = Change::RoleRevokePermission(request.get_ref().clone());
        header_only!(self, request, change, AuthRoleRevokePermissionResponse)
    }
}
