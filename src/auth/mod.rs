//! Users, roles and permissions, as etcd keeps them (its `auth` package's behaviour, written
//! here): a replicated auth store that changes only by applying committed `AuthChange`s, a
//! permission check for every request, bcrypt password hashes and simple tokens.
//!
//! Every client request is checked twice: at the API, against the store in force when it
//! arrives, and again when its entry is applied, where a request checked at an older auth
//! revision is refused (`etcdserver: revision of auth store is old`). A permission revoked is
//! therefore never honoured for a request applied after the revocation.

mod check;
mod error;
#[cfg(not(madsim))]
mod jwt;
mod password;
mod perms;
mod state;
mod tokens;

/// The metadata etcd's clients send their token in.
pub const TOKEN_METADATA: &str = "token";
/// The gateway's header (grpc-gateway passes it on as metadata of this name).
pub const AUTHORIZATION: &str = "authorization";

pub use check::{check_lease_keys, check_range, check_read, check_request, check_write};
pub use error::AuthError;
#[cfg(not(madsim))]
pub use jwt::{JwtTokens, DEFAULT_JWT_TTL};
pub use password::{hash_password, verify_password, DEFAULT_BCRYPT_COST};
pub use perms::{Access, KeyRange};
pub use state::{AuthApplied, AuthState, AuthView, AUTH_RECORD_PREFIX, ROOT_ROLE, ROOT_USER};
pub use tokens::{new_simple_token, TokenTable, DEFAULT_TOKEN_TTL};

/// Who a request runs as, and the auth revision its permissions were checked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthInfo {
    /// Empty: no user (auth was off when the request arrived, or the member's own request).
    pub user: String,
    /// 0: the member's own request, never checked.
    pub revision: u64,
}

impl AuthInfo {
    /// The member's own requests (lease expiry, compaction it schedules, alarms it raises).
    pub const INTERNAL: AuthInfo = AuthInfo {
        user: String::new(),
        revision: 0,
    };

    pub fn is_internal(&self) -> bool {
        self.revision == 0
    }
}
