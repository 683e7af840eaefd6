//! The request path's side of auth: who a request runs as, what it may do, and the Auth
//! service's requests (changes go through the log; reads wait for a linearizable barrier).

use std::sync::Arc;
use std::time::Duration;

use super::error::ServerError;
use super::kv::KvServer;
use crate::auth::{self, AuthApplied, AuthError, AuthInfo, AuthView};
use crate::mvcc::ApplyOutcome;
use crate::proto::authpb::Permission;
use crate::proto::etcdserverpb::RangeRequest;
use crate::proto::quorumkvpb::auth_change::Change;
use crate::proto::quorumkvpb::raft_request::Request;
use crate::proto::quorumkvpb::{AuthChange, SimpleToken};

/// Auth settings of a member (etcd's `--bcrypt-cost`, `--auth-token`, `--auth-token-ttl`).
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub bcrypt_cost: u32,
    /// Simple tokens' TTL.
    pub token_ttl: Duration,
    /// JWT tokens instead of simple ones.
    #[cfg(not(madsim))]
    pub jwt: Option<Arc<auth::JwtTokens>>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            bcrypt_cost: auth::DEFAULT_BCRYPT_COST,
            token_ttl: auth::DEFAULT_TOKEN_TTL,
            #[cfg(not(madsim))]
            jwt: None,
        }
    }
}

/// A user as UserGet reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserInfo {
    pub roles: Vec<String>,
}

impl KvServer {
    pub fn auth_view(&self) -> &Arc<AuthView> {
        &self.auth
    }

    /// Who a request carrying `token` (if any) runs as. With auth off: nobody, but a token is
    /// still checked, as etcd 3.4 checks it (its simple tokens all go when auth is disabled,
    /// so a client that kept one is refused until it drops it). With it on: the token's user,
    /// `InvalidToken` for a token this member does not know (or that expired); a request
    /// without one runs as `common_name` (the client certificate's, with `--client-cert-auth`)
    /// or as nobody, refused wherever a user is needed.
    pub fn auth_info(
        &self,
        token: Option<&str>,
        common_name: Option<&str>,
    ) -> Result<AuthInfo, ServerError> {
        let revision = self.auth.revision();
        if !self.auth.enabled() {
            if let Some(token) = token {
                #[cfg(not(madsim))]
                let known = match &self.config().auth.jwt {
                    Some(jwt) => jwt.check(token).is_some(),
                    None => self.tokens.user(token, self.now_ms()).is_some(),
                };
                #[cfg(madsim)]
                let known = self.tokens.user(token, self.now_ms()).is_some();
                if !known {
                    return Err(auth_error(AuthError::InvalidToken));
                }
            }
            return Ok(AuthInfo {
                user: String::new(),
                revision,
            });
        }
        #[cfg(not(madsim))]
        if let (Some(jwt), Some(token)) = (&self.config().auth.jwt, token) {
            // As etcd's: the token's own revision, so a token older than an auth change is
            // refused as old (and the client authenticates again).
            let (user, revision) = jwt
                .check(token)
                .ok_or(AuthError::InvalidToken)
                .map_err(auth_error)?;
            return Ok(AuthInfo { user, revision });
        }
        let user = match token {
            Some(token) => {
                let user = self
                    .tokens
                    .user(token, self.now_ms())
                    .ok_or(AuthError::InvalidToken)
                    .map_err(auth_error)?;
                // A token outlives its user only in a member that learned of the deletion
                // from a snapshot: refused all the same.
                if self.auth.current().user(&user).is_none() {
                    return Err(auth_error(AuthError::InvalidToken));
                }
                user
            }
            None => common_name.unwrap_or_default().to_string(),
        };
        Ok(AuthInfo { user, revision })
    }

    /// May `who` make `request`? (Checked again at apply, with the leases.)
    pub(super) fn authorize(&self, who: &AuthInfo, request: &Request) -> Result<(), ServerError> {
        if who.is_internal() || !self.auth.enabled() {
            return Ok(());
        }
        match auth::check_request(&self.auth.current(), who, request, None) {
            Ok(()) => Ok(()),
            // What an active alarm refuses is refused with the alarm's error at apply, before
            // auth is asked, as in etcd 3.4. Looked at only for a refusal, so an allowed write
            // does not take the store's lock here.
            Err(_) if self.read_store().alarms().refusal(request).is_some() => Ok(()),
            Err(e) => Err(auth_error(e)),
        }
    }

    pub(super) fn authorize_read(
        &self,
        who: &AuthInfo,
        req: &RangeRequest,
    ) -> Result<(), ServerError> {
        self.authorize_range(who, &req.key, &req.range_end, auth::Access::Read)
    }

    /// May `who` have `access` to `[key, range_end)` (a watch reads; a lock writes)?
    pub fn authorize_range(
        &self,
        who: &AuthInfo,
        key: &[u8],
        range_end: &[u8],
        access: auth::Access,
    ) -> Result<(), ServerError> {
        if who.is_internal() || !self.auth.enabled() {
            return Ok(());
        }
        let state = self.auth.current();
        match access {
            auth::Access::Read => auth::check_read(&state, who, key, range_end),
            auth::Access::Write => auth::check_write(&state, who, key, range_end),
        }
        .map_err(auth_error)
    }

    /// Is `who` a user (auth on), or is auth off? For what any user may do (leases, the
    /// member list, compaction).
    pub fn require_user(&self, who: &AuthInfo) -> Result<(), ServerError> {
        if who.is_internal() || !self.auth.enabled() {
            return Ok(());
        }
        self.auth
            .current()
            .check_user(&who.user, who.revision)
            .map_err(auth_error)
    }

    /// Is `who` root (or auth off)? `denied` answers a user who is not.
    pub fn require_root(&self, who: &AuthInfo, denied: AuthError) -> Result<(), ServerError> {
        if who.is_internal() || !self.auth.enabled() {
            return Ok(());
        }
        self.auth
            .current()
            .check_admin(&who.user, who.revision, denied)
            .map_err(auth_error)
    }

    /// May `who` read every key attached to `lease` (LeaseTimeToLive listing its keys)?
    pub fn authorize_lease_keys_read(&self, who: &AuthInfo, lease: i64) -> Result<(), ServerError> {
        if who.is_internal() || !self.auth.enabled() {
            return Ok(());
        }
        let state = self.auth.current();
        let store = self.read_store();
        let Some(lease) = store.leases().get(lease) else {
            return Ok(());
        };
        for key in &lease.keys {
            auth::check_read(&state, who, key, &[]).map_err(auth_error)?;
        }
        Ok(())
    }

    /// Authenticate: the password checked here (bcrypt, on a blocking thread), then a token
    /// issued through the log so that every member knows it. Failures are logged without the
    /// password. A token the request carries (`presented`) must be valid too, checked after
    /// the password, as etcd 3.4 does: a client that kept a stale token is refused until it
    /// drops it.
    pub async fn authenticate(
        &self,
        name: &str,
        password: &str,
        presented: Option<&str>,
    ) -> Result<String, ServerError> {
        self.refuse_learner()?;
        let state = self.auth.current();
        if !state.enabled() {
            return Err(auth_error(AuthError::NotEnabled));
        }
        let no_password_user = state
            .user(name)
            .is_some_and(|u| u.options.as_ref().is_some_and(|o| o.no_password));
        let hash = state
            .user(name)
            .filter(|u| !u.options.as_ref().is_some_and(|o| o.no_password))
            .map(|u| String::from_utf8_lossy(&u.password).into_owned());
        let verified = match hash {
            Some(hash) if !password.is_empty() => {
                let password = password.to_string();
                // Under the simulator this is an ordinary task (madsim marks it deprecated).
                #[allow(deprecated)]
                let checked =
                    tokio::task::spawn_blocking(move || auth::verify_password(&password, &hash))
                        .await;
                checked.unwrap_or(false)
            }
            _ => false,
        };
        if !verified {
            tracing::warn!(
                user = name,
                "authentication failed: invalid user ID or password"
            );
            return Err(auth_error(if no_password_user {
                AuthError::NoPasswordUser
            } else {
                AuthError::AuthFailed
            }));
        }
        if presented.is_some() {
            self.auth_info(presented, None)?;
        }
        #[cfg(not(madsim))]
        if let Some(jwt) = &self.config().auth.jwt {
            return jwt
                .sign(name, state.revision())
                .map_err(ServerError::Internal);
        }
        let token = auth::new_simple_token(self.status().raft_index);
        let change = Change::SimpleToken(SimpleToken {
            name: name.to_string(),
            token: token.clone(),
        });
        self.auth_change(&AuthInfo::INTERNAL, change).await?;
        Ok(token)
    }

    /// Applies an Auth service change for `who` (root, once auth is on). Passwords are hashed
    /// here and travel only as hashes.
    pub async fn auth_change(
        &self,
        who: &AuthInfo,
        mut change: Change,
    ) -> Result<AuthApplied, ServerError> {
        // Who asks is checked first, as etcd 3.4 checks it (at apply) before the request.
        self.authorize(
            who,
            &Request::Auth(AuthChange {
                change: Some(change.clone()),
            }),
        )?;
        match &mut change {
            Change::UserAdd(req) => {
                let no_password = req.options.as_ref().is_some_and(|o| o.no_password);
                if !no_password {
                    if req.name.is_empty() {
                        return Err(auth_error(AuthError::UserEmpty));
                    }
                    if req.password.is_empty() && req.hashed_password.is_empty() {
                        return Err(auth_error(AuthError::PasswordEmpty));
                    }
                }
                self.hash_into(&mut req.password, &mut req.hashed_password)
                    .await?;
            }
            Change::UserChangePassword(req) => {
                if req.password.is_empty() && req.hashed_password.is_empty() {
                    return Err(auth_error(AuthError::PasswordEmpty));
                }
                self.hash_into(&mut req.password, &mut req.hashed_password)
                    .await?;
            }
            _ => {}
        }
        let request = Request::Auth(AuthChange {
            change: Some(change),
        });
        match self.propose_as(who, request).await? {
            (ApplyOutcome::Auth(applied), _) => Ok(applied),
            _ => unreachable!("an auth change applies as one"),
        }
    }

    /// Replaces a password in the clear with its bcrypt hash (a hash given is kept as is).
    async fn hash_into(
        &self,
        password: &mut String,
        hashed: &mut String,
    ) -> Result<(), ServerError> {
        let clear = std::mem::take(password);
        if clear.is_empty() {
            return Ok(());
        }
        let cost = self.config().auth.bcrypt_cost;
        // Under the simulator this is an ordinary task (madsim marks it deprecated).
        #[allow(deprecated)]
        let hash = tokio::task::spawn_blocking(move || auth::hash_password(&clear, cost))
            .await
            .map_err(|e| ServerError::Internal(format!("password hashing failed: {e}")))?
            .map_err(ServerError::Internal)?;
        *hashed = hash;
        Ok(())
    }

    /// For the Auth service's reads: root (once auth is on), after a linearizable barrier.
    async fn auth_read(&self, who: &AuthInfo) -> Result<Arc<auth::AuthState>, ServerError> {
        self.require_root(who, AuthError::PermissionDenied)?;
        self.linearizable_barrier().await?;
        Ok(self.auth.current())
    }

    pub async fn auth_status(&self) -> Result<(bool, u64), ServerError> {
        self.linearizable_barrier().await?;
        let state = self.auth.current();
        Ok((state.enabled(), state.revision()))
    }

    /// Root, or (as etcd 3.4 lets them) the user asking about itself: a caller without a
    /// user is "itself" to the user named "", which is then not found.
    pub async fn user_get(&self, who: &AuthInfo, name: &str) -> Result<UserInfo, ServerError> {
        if let Err(e) = self.require_root(who, AuthError::PermissionDenied) {
            if name != who.user {
                return Err(e);
            }
        }
        self.linearizable_barrier().await?;
        let state = self.auth.current();
        let user = state
            .user(name)
            .ok_or(AuthError::UserNotFound)
            .map_err(auth_error)?;
        Ok(UserInfo {
            roles: user.roles.clone(),
        })
    }

    pub async fn user_list(&self, who: &AuthInfo) -> Result<Vec<String>, ServerError> {
        Ok(self.auth_read(who).await?.user_names())
    }

    pub async fn role_get(
        &self,
        who: &AuthInfo,
        role: &str,
    ) -> Result<Vec<Permission>, ServerError> {
        // Root, or (as etcd 3.4 lets them) a user asking about a role it has.
        if let Err(e) = self.require_root(who, AuthError::PermissionDenied) {
            let has_role = self
                .auth
                .current()
                .user(&who.user)
                .is_some_and(|u| u.roles.iter().any(|r| r == role));
            if !has_role {
                return Err(e);
            }
        }
        self.linearizable_barrier().await?;
        let state = self.auth.current();
        state
            .permissions(role)
            .ok_or(AuthError::RoleNotFound)
            .map_err(auth_error)
    }

    pub async fn role_list(&self, who: &AuthInfo) -> Result<Vec<String>, ServerError> {
        Ok(self.auth_read(who).await?.role_names())
    }
}

pub fn auth_error(error: AuthError) -> ServerError {
    ServerError::Mvcc(crate::mvcc::MvccError::Auth(error))
}
