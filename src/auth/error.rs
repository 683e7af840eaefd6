//! The auth store's refusals, each with etcd's gRPC code and message.

use tonic::Code;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExists,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExists,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    /// A password given for a user added with `--no-password` (etcd's auth package words it,
    /// gRPC `Unknown`).
    #[error("auth: authentication failed, password was given for no password user")]
    NoPasswordUser,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    /// What etcd's Maintenance service answers a user who is not root (gRPC `Unknown`).
    #[error("auth: permission denied")]
    MaintenanceDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    #[error("etcdserver: authentication is not enabled")]
    NotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidToken,
    #[error("etcdserver: invalid auth management")]
    InvalidManagement,
    #[error("etcdserver: revision of auth store is old")]
    OldRevision,
    #[error("etcdserver: root user does not exist")]
    RootUserMissing,
    #[error("etcdserver: root user does not have root role")]
    RootRoleMissing,
    /// Refused where etcd 3.4 accepts it (CVE-2020-15115): a user without a password is made
    /// with `--no-password`.
    #[error("etcdserver: password is empty (add the user with --no-password for certificate-only access)")]
    PasswordEmpty,
}

impl AuthError {
    /// etcd's gRPC code for this refusal.
    pub fn code(self) -> Code {
        match self {
            AuthError::UserEmpty
            | AuthError::RoleEmpty
            | AuthError::AuthFailed
            | AuthError::InvalidManagement
            | AuthError::OldRevision
            | AuthError::PermissionNotGiven
            | AuthError::PasswordEmpty => Code::InvalidArgument,
            AuthError::PermissionDenied => Code::PermissionDenied,
            AuthError::MaintenanceDenied | AuthError::NoPasswordUser => Code::Unknown,
            AuthError::InvalidToken => Code::Unauthenticated,
            AuthError::UserAlreadyExists
            | AuthError::UserNotFound
            | AuthError::RoleAlreadyExists
            | AuthError::RoleNotFound
            | AuthError::RoleNotGranted
            | AuthError::PermissionNotGranted
            | AuthError::NotEnabled
            | AuthError::RootUserMissing
            | AuthError::RootRoleMissing => Code::FailedPrecondition,
        }
    }
}
