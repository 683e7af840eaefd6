//! The replicated auth store: whether auth is on, its revision, the users and the roles.
//!
//! It changes only by applying committed `AuthChange`s, so every member holds the same state at
//! the same index. It lives in the backend beside the key space as records (`m` + `auth/...`),
//! written in the same batch as the entry that changed it, so snapshots and restarts carry it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use prost::Message as _;

use super::error::AuthError;
use super::perms::{Access, Coverage, KeyRange};
use crate::proto::authpb::{Permission, Role, User, UserAddOptions};
use crate::proto::quorumkvpb::auth_change::Change;
use crate::proto::quorumkvpb::AuthChange;

/// Record names: `auth/enabled`, `auth/revision`, `auth/users/<name>`, `auth/roles/<name>`.
pub const AUTH_RECORD_PREFIX: &str = "auth/";
const ENABLED_RECORD: &str = "auth/enabled";
const REVISION_RECORD: &str = "auth/revision";
const USER_PREFIX: &str = "auth/users/";
const ROLE_PREFIX: &str = "auth/roles/";

/// The user that must exist, with the root role, before auth can be enabled.
pub const ROOT_USER: &str = "root";
/// The role that may do anything.
pub const ROOT_ROLE: &str = "root";

/// One record to write (`Some`) or delete (`None`).
pub type AuthRecordChange = (String, Option<Vec<u8>>);

/// What applying a change did, beyond the state itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthApplied {
    pub records: Vec<AuthRecordChange>,
    /// A token to learn: (token, user).
    pub token: Option<(String, String)>,
    /// A user whose tokens are no longer valid (deleted, or a new password).
    pub forget_user: Option<String>,
    /// Every token is void (auth disabled).
    pub forget_all: bool,
}

/// The state. Cheap to read through [`AuthView`]; a change makes a new one.
#[derive(Debug, Clone, Default)]
pub struct AuthState {
    enabled: bool,
    /// Raised by every change; a request checked at an older one is refused at apply.
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
    /// Per user, what their roles cover for reading and for writing (derived).
    coverage: HashMap<String, Arc<UserCoverage>>,
}

#[derive(Debug, Default)]
struct UserCoverage {
    root: bool,
    read: Coverage,
    write: Coverage,
}

fn name_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl AuthState {
    /// The state its records describe (`Err` names a record that does not decode).
    pub fn from_records(records: &[(String, Vec<u8>)]) -> Result<AuthState, String> {
        let mut state = AuthState {
            revision: 1,
            ..AuthState::default()
        };
        for (name, value) in records {
            if name == ENABLED_RECORD {
                state.enabled = value.as_slice() == b"1";
            } else if name == REVISION_RECORD {
                let bytes: [u8; 8] = value
                    .as_slice()
                    .try_into()
                    .map_err(|_| format!("auth record {name:?} is not a revision"))?;
                state.revision = u64::from_be_bytes(bytes);
            } else if let Some(user) = name.strip_prefix(USER_PREFIX) {
                let record = User::decode(value.as_slice())
                    .map_err(|e| format!("auth record {name:?}: {e}"))?;
                state.users.insert(user.to_string(), record);
            } else if let Some(role) = name.strip_prefix(ROLE_PREFIX) {
                let record = Role::decode(value.as_slice())
                    .map_err(|e| format!("auth record {name:?}: {e}"))?;
                state.roles.insert(role.to_string(), record);
            } else {
                return Err(format!("unknown auth record {name:?}"));
            }
        }
        state.derive();
        Ok(state)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    pub fn user_names(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    /// Is `user` one with the root role?
    pub fn is_root(&self, user: &str) -> bool {
        self.coverage.get(user).is_some_and(|c| c.root)
    }

    /// May `user`, checked at auth revision `revision`, have `access` to `range`? Always yes
    /// with auth off.
    pub fn check(
        &self,
        user: &str,
        revision: u64,
        range: &KeyRange,
        access: Access,
    ) -> Result<(), AuthError> {
        self.check_user(user, revision)?;
        let Some(coverage) = self.coverage.get(user) else {
            return Err(AuthError::PermissionDenied);
        };
        let granted = coverage.root
            || match access {
                Access::Read => coverage.read.covers(range),
                Access::Write => coverage.write.covers(range),
            };
        if granted {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    /// Is there a user, checked at the revision in force? (Not checked with auth off.)
    pub fn check_user(&self, user: &str, revision: u64) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        if revision < self.revision {
            return Err(AuthError::OldRevision);
        }
        Ok(())
    }

    /// Is `user` root (or auth off)? `denied` is the refusal for a user who is not.
    pub fn check_admin(
        &self,
        user: &str,
        revision: u64,
        denied: AuthError,
    ) -> Result<(), AuthError> {
        self.check_user(user, revision)?;
        if self.enabled && !self.is_root(user) {
            return Err(denied);
        }
        Ok(())
    }

    /// Applies a committed change: the records to write and what else follows, or the
    /// refusal (nothing changed).
    pub fn apply(&mut self, change: &AuthChange) -> Result<AuthApplied, AuthError> {
        let mut applied = AuthApplied::default();
        let Some(change) = &change.change else {
            return Ok(applied);
        };
        match change {
            Change::Enable(_) => {
                if self.enabled {
                    return Ok(applied);
                }
                let root = self
                    .users
                    .get(ROOT_USER)
                    .ok_or(AuthError::RootUserMissing)?;
                if !root.roles.iter().any(|r| r == ROOT_ROLE) {
                    return Err(AuthError::RootRoleMissing);
                }
                self.enabled = true;
                applied
                    .records
                    .push((ENABLED_RECORD.into(), Some(b"1".to_vec())));
            }
            Change::Disable(_) => {
                if !self.enabled {
                    return Ok(applied);
                }
                self.enabled = false;
                applied.records.push((ENABLED_RECORD.into(), None));
                applied.forget_all = true;
            }
            Change::UserAdd(req) => {
                if req.name.is_empty() {
                    return Err(AuthError::UserEmpty);
                }
                if self.users.contains_key(&req.name) {
                    return Err(AuthError::UserAlreadyExists);
                }
                let no_password = req.options.as_ref().is_some_and(|o| o.no_password);
                let user = User {
                    name: req.name.clone().into_bytes(),
                    password: if no_password {
                        Vec::new()
                    } else {
                        req.hashed_password.clone().into_bytes()
                    },
                    roles: Vec::new(),
                    options: Some(UserAddOptions { no_password }),
                };
                self.put_user(&mut applied, user);
            }
            Change::UserDelete(req) => {
                if self.enabled && req.name == ROOT_USER {
                    return Err(AuthError::InvalidManagement);
                }
                if self.users.remove(&req.name).is_none() {
                    return Err(AuthError::UserNotFound);
                }
                applied
                    .records
                    .push((format!("{USER_PREFIX}{}", req.name), None));
                applied.forget_user = Some(req.name.clone());
            }
            Change::UserChangePassword(req) => {
                let mut user = self
                    .users
                    .get(&req.name)
                    .cloned()
                    .ok_or(AuthError::UserNotFound)?;
                user.password = req.hashed_password.clone().into_bytes();
                self.put_user(&mut applied, user);
                applied.forget_user = Some(req.name.clone());
            }
            Change::UserGrantRole(req) => {
                let mut user = self
                    .users
                    .get(&req.user)
                    .cloned()
                    .ok_or(AuthError::UserNotFound)?;
                if req.role != ROOT_ROLE && !self.roles.contains_key(&req.role) {
                    return Err(AuthError::RoleNotFound);
                }
                if user.roles.contains(&req.role) {
                    return Ok(applied);
                }
                user.roles.push(req.role.clone());
                user.roles.sort();
                self.put_user(&mut applied, user);
            }
            Change::UserRevokeRole(req) => {
                if self.enabled && req.name == ROOT_USER && req.role == ROOT_ROLE {
                    return Err(AuthError::InvalidManagement);
                }
                let mut user = self
                    .users
                    .get(&req.name)
                    .cloned()
                    .ok_or(AuthError::UserNotFound)?;
                let before = user.roles.len();
                user.roles.retain(|r| *r != req.role);
                if user.roles.len() == before {
                    return Err(AuthError::RoleNotGranted);
                }
                self.put_user(&mut applied, user);
            }
            Change::RoleAdd(req) => {
                if req.name.is_empty() {
                    return Err(AuthError::RoleEmpty);
                }
                if self.roles.contains_key(&req.name) {
                    return Err(AuthError::RoleAlreadyExists);
                }
                let role = Role {
                    name: req.name.clone().into_bytes(),
                    key_permission: Vec::new(),
                };
                self.put_role(&mut applied, role);
            }
            Change::RoleDelete(req) => {
                if self.enabled && req.role == ROOT_ROLE {
                    return Err(AuthError::InvalidManagement);
                }
                if self.roles.remove(&req.role).is_none() {
                    return Err(AuthError::RoleNotFound);
                }
                applied
                    .records
                    .push((format!("{ROLE_PREFIX}{}", req.role), None));
                // Its users lose it.
                let holders: Vec<User> = self
                    .users
                    .values()
                    .filter(|u| u.roles.contains(&req.role))
                    .cloned()
                    .collect();
                for mut user in holders {
                    user.roles.retain(|r| *r != req.role);
                    self.put_user(&mut applied, user);
                }
            }
            Change::RoleGrantPermission(req) => {
                let perm = req.perm.clone().ok_or(AuthError::PermissionNotGiven)?;
                let mut role = self
                    .roles
                    .get(&req.name)
                    .cloned()
                    .ok_or(AuthError::RoleNotFound)?;
                // As etcd 3.4 keeps them: ordered by key only, a new one after those of its
                // key; granted again, the first of its key is updated if it has its range end
                // (so a key granted with two range ends can be listed twice, as in etcd).
                let at = role
                    .key_permission
                    .partition_point(|p| p.key.as_slice() < perm.key.as_slice());
                match role.key_permission.get_mut(at) {
                    Some(first) if first.key == perm.key && first.range_end == perm.range_end => {
                        first.perm_type = perm.perm_type
                    }
                    _ => {
                        role.key_permission.push(perm);
                        role.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
                    }
                }
                self.put_role(&mut applied, role);
            }
            Change::RoleRevokePermission(req) => {
                let mut role = self
                    .roles
                    .get(&req.role)
                    .cloned()
                    .ok_or(AuthError::RoleNotFound)?;
                let before = role.key_permission.len();
                role.key_permission
                    .retain(|p| !(p.key == req.key && p.range_end == req.range_end));
                if role.key_permission.len() == before {
                    return Err(AuthError::PermissionNotGranted);
                }
                self.put_role(&mut applied, role);
            }
            Change::SimpleToken(token) => {
                // The password was checked at the API; the user must still be there.
                if !self.enabled {
                    return Err(AuthError::NotEnabled);
                }
                if !self.users.contains_key(&token.name) {
                    return Err(AuthError::AuthFailed);
                }
                applied.token = Some((token.token.clone(), token.name.clone()));
                // A token changes nothing replicated: no new revision.
                return Ok(applied);
            }
        }
        self.revision += 1;
        applied.records.push((
            REVISION_RECORD.into(),
            Some(self.revision.to_be_bytes().to_vec()),
        ));
        self.derive();
        Ok(applied)
    }

    fn put_user(&mut self, applied: &mut AuthApplied, user: User) {
        let name = name_of(&user.name);
        applied
            .records
            .push((format!("{USER_PREFIX}{name}"), Some(user.encode_to_vec())));
        self.users.insert(name, user);
    }

    fn put_role(&mut self, applied: &mut AuthApplied, role: Role) {
        let name = name_of(&role.name);
        applied
            .records
            .push((format!("{ROLE_PREFIX}{name}"), Some(role.encode_to_vec())));
        self.roles.insert(name, role);
    }

    /// Recomputes each user's coverage from their roles.
    fn derive(&mut self) {
        let mut coverage = HashMap::with_capacity(self.users.len());
        for (name, user) in &self.users {
            let mut read = Vec::new();
            let mut write = Vec::new();
            let mut root = false;
            for role_name in &user.roles {
                if role_name == ROOT_ROLE {
                    root = true;
                }
                let Some(role) = self.roles.get(role_name) else {
                    continue;
                };
                for perm in &role.key_permission {
                    let range = KeyRange::of(&perm.key, &perm.range_end);
                    if Access::Read.granted_by(perm.perm_type) {
                        read.push(range.clone());
                    }
                    if Access::Write.granted_by(perm.perm_type) {
                        write.push(range);
                    }
                }
            }
            coverage.insert(
                name.clone(),
                Arc::new(UserCoverage {
                    root,
                    read: Coverage::new(read),
                    write: Coverage::new(write),
                }),
            );
        }
        self.coverage = coverage;
    }

    /// The permissions of `role`, for RoleGet.
    pub fn permissions(&self, role: &str) -> Option<Vec<Permission>> {
        self.roles.get(role).map(|r| r.key_permission.clone())
    }
}

/// The state as the request path reads it: shared by the store (which replaces it at every
/// change) and every request (which reads it without the store's lock).
#[derive(Debug, Default)]
pub struct AuthView {
    state: RwLock<Arc<AuthState>>,
    /// Copies of the state's, for the common case (auth off) without a lock.
    enabled: AtomicBool,
    revision: AtomicU64,
}

impl AuthView {
    pub fn new(state: AuthState) -> AuthView {
        let view = AuthView::default();
        view.publish(state);
        view
    }

    pub fn current(&self) -> Arc<AuthState> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn publish(&self, state: AuthState) {
        self.enabled.store(state.enabled, Ordering::Release);
        self.revision.store(state.revision, Ordering::Release);
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(state);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::authpb::permission::Type as PermType;
    use crate::proto::etcdserverpb::{
        AuthDisableRequest, AuthEnableRequest, AuthRoleAddRequest, AuthRoleDeleteRequest,
        AuthRoleGrantPermissionRequest, AuthRoleRevokePermissionRequest, AuthUserAddRequest,
        AuthUserDeleteRequest, AuthUserGrantRoleRequest, AuthUserRevokeRoleRequest,
    };

    fn change(change: Change) -> AuthChange {
        AuthChange {
            change: Some(change),
        }
    }

    fn add_user(state: &mut AuthState, name: &str) {
        state
            .apply(&change(Change::UserAdd(AuthUserAddRequest {
                name: name.into(),
                hashed_password: "$2b$04$hash".into(),
                ..Default::default()
            })))
            .expect("user add");
    }

    fn grant_role(state: &mut AuthState, user: &str, role: &str) -> Result<(), AuthError> {
        state
            .apply(&change(Change::UserGrantRole(AuthUserGrantRoleRequest {
                user: user.into(),
                role: role.into(),
            })))
            .map(drop)
    }

    fn grant(state: &mut AuthState, role: &str, perm: PermType, key: &str, end: &str) {
        state
            .apply(&change(Change::RoleGrantPermission(
                AuthRoleGrantPermissionRequest {
                    name: role.into(),
                    perm: Some(Permission {
                        perm_type: perm as i32,
                        key: key.into(),
                        range_end: end.into(),
                    }),
                },
            )))
            .expect("grant");
    }

    fn enabled_state() -> AuthState {
        let mut state = AuthState::from_records(&[]).expect("empty");
        assert_eq!(
            state.apply(&change(Change::Enable(AuthEnableRequest {}))),
            Err(AuthError::RootUserMissing)
        );
        add_user(&mut state, "root");
        assert_eq!(
            state.apply(&change(Change::Enable(AuthEnableRequest {}))),
            Err(AuthError::RootRoleMissing)
        );
        grant_role(&mut state, "root", "root").expect("root role needs no role record");
        state
            .apply(&change(Change::Enable(AuthEnableRequest {})))
            .expect("enable");
        assert!(state.enabled());
        state
    }

    #[test]
    fn permissions_follow_roles_and_root_may_do_anything() {
        let mut state = enabled_state();
        add_user(&mut state, "alice");
        state
            .apply(&change(Change::RoleAdd(AuthRoleAddRequest {
                name: "r1".into(),
            })))
            .expect("role add");
        grant(&mut state, "r1", PermType::Read, "foo", "");
        grant(&mut state, "r1", PermType::Readwrite, "pre/", "pre0");
        grant_role(&mut state, "alice", "r1").expect("grant");
        let rev = state.revision();
        let key = |k: &str| KeyRange::of(k.as_bytes(), b"");
        assert_eq!(state.check("alice", rev, &key("foo"), Access::Read), Ok(()));
        assert_eq!(
            state.check("alice", rev, &key("foo"), Access::Write),
            Err(AuthError::PermissionDenied)
        );
        assert_eq!(
            state.check("alice", rev, &key("pre/x"), Access::Write),
            Ok(())
        );
        assert_eq!(
            state.check("alice", rev, &key("other"), Access::Read),
            Err(AuthError::PermissionDenied)
        );
        assert_eq!(
            state.check("root", rev, &key("other"), Access::Write),
            Ok(())
        );
        assert_eq!(
            state.check("", rev, &key("foo"), Access::Read),
            Err(AuthError::UserEmpty)
        );
        assert_eq!(
            state.check("ghost", rev, &key("foo"), Access::Read),
            Err(AuthError::PermissionDenied)
        );
        // A check made before the latest change is refused.
        assert_eq!(
            state.check("alice", rev - 1, &key("foo"), Access::Read),
            Err(AuthError::OldRevision)
        );
        // Revoking takes effect at once.
        state
            .apply(&change(Change::RoleRevokePermission(
                AuthRoleRevokePermissionRequest {
                    role: "r1".into(),
                    key: "foo".into(),
                    range_end: Vec::new(),
                },
            )))
            .expect("revoke");
        assert_eq!(
            state.check("alice", state.revision(), &key("foo"), Access::Read),
            Err(AuthError::PermissionDenied)
        );
        // Deleting a role takes it from its users.
        state
            .apply(&change(Change::RoleDelete(AuthRoleDeleteRequest {
                role: "r1".into(),
            })))
            .expect("role delete");
        assert!(state.user("alice").expect("alice").roles.is_empty());
    }

    #[test]
    fn etcds_refusals() {
        let mut state = enabled_state();
        let refuse = |state: &mut AuthState, c: Change| state.apply(&change(c)).map(drop);
        assert_eq!(
            refuse(
                &mut state,
                Change::UserDelete(AuthUserDeleteRequest {
                    name: "root".into()
                })
            ),
            Err(AuthError::InvalidManagement)
        );
        assert_eq!(
            refuse(
                &mut state,
                Change::UserRevokeRole(AuthUserRevokeRoleRequest {
                    name: "root".into(),
                    role: "root".into()
                })
            ),
            Err(AuthError::InvalidManagement)
        );
        assert_eq!(
            refuse(
                &mut state,
                Change::UserRevokeRole(AuthUserRevokeRoleRequest {
                    name: "root".into(),
                    role: "r9".into()
                })
            ),
            Err(AuthError::RoleNotGranted)
        );
        assert_eq!(
            refuse(
                &mut state,
                Change::RoleAdd(AuthRoleAddRequest { name: "".into() })
            ),
            Err(AuthError::RoleEmpty)
        );
        assert_eq!(
            grant_role(&mut state, "root", "nosuch"),
            Err(AuthError::RoleNotFound)
        );
        assert_eq!(
            grant_role(&mut state, "nobody", "root"),
            Err(AuthError::UserNotFound)
        );
        assert_eq!(
            refuse(
                &mut state,
                Change::UserAdd(AuthUserAddRequest {
                    name: "root".into(),
                    ..Default::default()
                })
            ),
            Err(AuthError::UserAlreadyExists)
        );
        assert_eq!(
            refuse(
                &mut state,
                Change::RoleGrantPermission(AuthRoleGrantPermissionRequest {
                    name: "nosuch".into(),
                    perm: Some(Permission::default())
                })
            ),
            Err(AuthError::RoleNotFound)
        );
        let before = state.revision();
        refuse(&mut state, Change::Disable(AuthDisableRequest {})).expect("disable");
        assert!(!state.enabled());
        assert_eq!(state.revision(), before + 1);
    }

    #[test]
    fn the_records_rebuild_the_same_state() {
        let mut state = enabled_state();
        let mut records: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut keep = |applied: AuthApplied| {
            for (name, value) in applied.records {
                match value {
                    Some(v) => records.insert(name, v),
                    None => records.remove(&name),
                };
            }
        };
        // Replays the whole history into records.
        let mut replay = AuthState::from_records(&[]).expect("empty");
        for c in [
            Change::UserAdd(AuthUserAddRequest {
                name: "root".into(),
                hashed_password: "$2b$04$hash".into(),
                ..Default::default()
            }),
            Change::UserGrantRole(AuthUserGrantRoleRequest {
                user: "root".into(),
                role: "root".into(),
            }),
            Change::Enable(AuthEnableRequest {}),
            Change::RoleAdd(AuthRoleAddRequest { name: "r".into() }),
        ] {
            keep(replay.apply(&change(c)).expect("apply"));
        }
        state
            .apply(&change(Change::RoleAdd(AuthRoleAddRequest {
                name: "r".into(),
            })))
            .expect("role");
        let records: Vec<(String, Vec<u8>)> = records.into_iter().collect();
        let loaded = AuthState::from_records(&records).expect("load");
        assert!(loaded.enabled());
        assert_eq!(loaded.revision(), state.revision());
        assert_eq!(loaded.user_names(), state.user_names());
        assert_eq!(loaded.role_names(), vec!["r".to_string()]);
        assert!(loaded.is_root("root"));
    }
}
