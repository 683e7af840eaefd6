//! Permissions changing while a client works: an administrator turns on auth with a user
//! `probe` whose role may write `perm/...`, then keeps revoking and granting that permission;
//! the probe keeps writing `perm/x` (each value unique), each write checked at the member it
//! reaches as a client's is at the API. Every write answered as a success is recorded for
//! `check::auth`, which holds it to the permissions in force where it was applied in the log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::rand::Rng;
use prost::Message as _;
use quorumkv::auth::AuthInfo;
use quorumkv::proto::authpb::permission::Type as PermType;
use quorumkv::proto::authpb::Permission;
use quorumkv::proto::etcdserverpb::{
    AuthEnableRequest, AuthRoleAddRequest, AuthRoleGrantPermissionRequest,
    AuthRoleRevokePermissionRequest, AuthUserAddRequest, AuthUserGrantRoleRequest, PutRequest,
};
use quorumkv::proto::quorumkvpb::auth_change::Change;
use quorumkv::proto::quorumkvpb::raft_request::Request;
use quorumkv::proto::quorumkvpb::RaftRequest;

use crate::cluster::Cluster;
use crate::workload::CLIENT_TIMEOUT;

/// The user whose writes are checked.
pub const PROBE_USER: &str = "probe";
const ROLE: &str = "writer";
/// The prefix the role's permission covers (granted and revoked in turn).
const PREFIX: &[u8] = b"perm/";
const PREFIX_END: &[u8] = b"perm0";
const KEY: &[u8] = b"perm/x";

/// The values of the probe's writes answered as successes.
#[derive(Clone, Default)]
pub struct AuthLog {
    succeeded: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AuthLog {
    pub fn succeeded(&self) -> Vec<Vec<u8>> {
        self.succeeded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The request of a normal entry if `check::auth` needs it: an auth change, or a request
/// checked for a user.
pub fn auth_relevant(data: &[u8]) -> Option<RaftRequest> {
    let request = RaftRequest::decode(data).ok()?;
    let relevant =
        matches!(request.request, Some(Request::Auth(_))) || !request.username.is_empty();
    relevant.then_some(request)
}

fn permission() -> Permission {
    Permission {
        perm_type: PermType::Write as i32,
        key: PREFIX.to_vec(),
        range_end: PREFIX_END.to_vec(),
    }
}

/// A member that is up, chosen at random.
fn some_member(cluster: &Cluster) -> Option<quorumkv::server::KvServer> {
    let up = cluster.up_ids();
    let node = {
        let mut rng = madsim::rand::thread_rng();
        up.get(rng.gen_range(0..up.len().max(1))).copied()
    };
    node.and_then(|n| cluster.kv(n))
}

/// Applies `change` through some member, retrying until it is applied or refused for a
/// reason (already done, say); `false` once stopped.
async fn apply(cluster: &Cluster, stop: &AtomicBool, change: Change) -> bool {
    while !stop.load(Ordering::Relaxed) {
        let Some(kv) = some_member(cluster) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        match tokio::time::timeout(
            CLIENT_TIMEOUT,
            kv.auth_change(&AuthInfo::INTERNAL, change.clone()),
        )
        .await
        {
            Ok(Ok(_))
            | Ok(Err(quorumkv::server::ServerError::Mvcc(quorumkv::mvcc::MvccError::Auth(_)))) => {
                return true
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    false
}

/// Sets auth up, then revokes and grants the probe's permission in turn until stopped.
pub async fn admin(cluster: Cluster, stop: Arc<AtomicBool>) {
    // Hashes given as such: nobody authenticates here (the probe's writes carry its name).
    let user = |name: &str| {
        Change::UserAdd(AuthUserAddRequest {
            name: name.into(),
            hashed_password: "$2b$04$notusedxxxxxxxxxxxxxxuxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx".into(),
            ..Default::default()
        })
    };
    let setup = [
        user("root"),
        Change::UserGrantRole(AuthUserGrantRoleRequest {
            user: "root".into(),
            role: "root".into(),
        }),
        user(PROBE_USER),
        Change::RoleAdd(AuthRoleAddRequest { name: ROLE.into() }),
        Change::UserGrantRole(AuthUserGrantRoleRequest {
            user: PROBE_USER.into(),
            role: ROLE.into(),
        }),
        Change::RoleGrantPermission(AuthRoleGrantPermissionRequest {
            name: ROLE.into(),
            perm: Some(permission()),
        }),
        Change::Enable(AuthEnableRequest {}),
    ];
    for change in setup {
        if !apply(&cluster, &stop, change).await {
            return;
        }
    }
    let mut granted = true;
    while !stop.load(Ordering::Relaxed) {
        let pause = madsim::rand::thread_rng().gen_range(5..=80);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let change = if granted {
            Change::RoleRevokePermission(AuthRoleRevokePermissionRequest {
                role: ROLE.into(),
                key: PREFIX.to_vec(),
                range_end: PREFIX_END.to_vec(),
            })
        } else {
            Change::RoleGrantPermission(AuthRoleGrantPermissionRequest {
                name: ROLE.into(),
                perm: Some(permission()),
            })
        };
        if !apply(&cluster, &stop, change).await {
            return;
        }
        granted = !granted;
    }
}

/// Writes `perm/x` as the probe, checked at the member it reaches, until stopped.
pub async fn probe(cluster: Cluster, log: AuthLog, stop: Arc<AtomicBool>) {
    let mut sequence = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(kv) = some_member(&cluster) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        sequence += 1;
        let value = format!("probe-{sequence}").into_bytes();
        // As the API resolves a token: the user, at the auth revision the member has now.
        let who = AuthInfo {
            user: PROBE_USER.into(),
            revision: kv.auth_view().revision(),
        };
        let put = PutRequest {
            key: KEY.to_vec(),
            value: value.clone(),
            ..Default::default()
        };
        match tokio::time::timeout(CLIENT_TIMEOUT, kv.put_as(&who, put)).await {
            Ok(Ok(_)) => log
                .succeeded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(value),
            _ => {
                let pause = madsim::rand::thread_rng().gen_range(1..=10);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }
}
