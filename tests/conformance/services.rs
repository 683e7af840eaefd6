//! The harness's second sequence: seeded random requests of the Auth, Cluster, Maintenance,
//! Lock and Election services (and KV requests made as a user once auth is on), sent to etcd
//! 3.4 and to quorumkv alike and compared field by field, as `differences` compares the KV ones.
//!
//! What each server names for itself is mapped before comparing: its IDs (as in the KV
//! sequence), its peer and client URLs, the tokens it hands out (each server's own token for a
//! user goes with that user's requests to it), and the IDs it gives members added here. What
//! two correct servers answer differently is left out: a hash's value, the version string,
//! sizes and raft indexes in `Status`.

use std::collections::HashMap;
use std::time::Duration;

use quorumkv::proto::authpb::{Permission, UserAddOptions};
use quorumkv::proto::etcdserverpb::alarm_request::AlarmAction;
use quorumkv::proto::etcdserverpb::auth_client::AuthClient;
use quorumkv::proto::etcdserverpb::cluster_client::ClusterClient;
use quorumkv::proto::etcdserverpb::kv_client::KvClient;
use quorumkv::proto::etcdserverpb::lease_client::LeaseClient;
use quorumkv::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use quorumkv::proto::etcdserverpb::*;
use quorumkv::proto::v3electionpb::election_client::ElectionClient;
use quorumkv::proto::v3electionpb::{
    CampaignRequest, LeaderKey, LeaderRequest, ProclaimRequest, ResignRequest,
};
use quorumkv::proto::v3lockpb::lock_client::LockClient;
use quorumkv::proto::v3lockpb::{LockRequest, UnlockRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use super::{Answer, Generator, Ids};

const USERS: &[&str] = &["root", "alice", "bob"];
const ROLES: &[&str] = &["root", "reader", "writer"];
const PASSWORDS: &[&str] = &["pw1", "pw2"];
/// Leases for locks and elections, granted (or not) by the sequence itself.
const SERVICE_LEASES: &[i64] = &[0x200, 0x201, 0x202];
/// Their TTL: a day, so that none expires within a run. Expiry is decided by each server's
/// own clock, so the two would expire a lease a little apart, and the requests sent in between
/// would see different revisions (seed 7 did, 60 s into a 3,000-request run).
const SERVICE_LEASE_TTL: i64 = 86_400;
const LOCKS: &[&[u8]] = &[b"lock1", b"lock2"];
const ELECTIONS: &[&[u8]] = &[b"elect1", b"elect2"];
/// How long a lock or a campaign that waits for another holder is given before it is dropped.
const BLOCKED: Duration = Duration::from_millis(700);

/// A member named in a request: the server itself, the n-th one added by the sequence (each
/// server gave it an ID of its own), or an ID no member has.
#[derive(Clone, Copy, Debug)]
enum MemberRef {
    Own,
    Added(usize),
    Unknown,
}

/// A lock's key or an election's leader key: the last one this server handed out, or one it
/// never did.
#[derive(Clone, Copy, Debug)]
enum Held {
    Last,
    Bogus,
}

#[derive(Clone, Debug)]
enum Request {
    UserAdd(AuthUserAddRequest),
    UserDelete(AuthUserDeleteRequest),
    UserGet(AuthUserGetRequest),
    UserList,
    UserChangePassword(AuthUserChangePasswordRequest),
    UserGrantRole(AuthUserGrantRoleRequest),
    UserRevokeRole(AuthUserRevokeRoleRequest),
    RoleAdd(AuthRoleAddRequest),
    RoleDelete(AuthRoleDeleteRequest),
    RoleGet(AuthRoleGetRequest),
    RoleList,
    RoleGrantPermission(AuthRoleGrantPermissionRequest),
    RoleRevokePermission(AuthRoleRevokePermissionRequest),
    AuthEnable,
    AuthDisable,
    Authenticate(AuthenticateRequest),
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Grant(LeaseGrantRequest),
    Revoke(LeaseRevokeRequest),
    Status,
    Alarm(AlarmAction, AlarmType, MemberRef),
    HashKv(HashKvRequest),
    Hash,
    Defragment,
    MemberList,
    MemberAdd(MemberAddRequest),
    MemberRemove(MemberRef),
    MemberUpdate(MemberRef, Vec<String>),
    MemberPromote(MemberRef),
    Lock(LockRequest),
    Unlock(Held),
    Campaign(CampaignRequest),
    Proclaim(Held, Vec<u8>),
    Leader(LeaderRequest),
    Resign(Held),
    Observe(LeaderRequest),
}

/// Who a request is sent as.
#[derive(Clone, Copy, Debug)]
enum As {
    /// No token.
    Nobody,
    /// The token this server gave the user (none if it gave none).
    User(&'static str),
    /// A token no server gave.
    BadToken,
}

/// One server's clients and what it handed out.
pub(super) struct Server {
    channel: Channel,
    ids: Ids,
    /// Its peer and client URLs, as the other server's are named in a comparison.
    peer_url: String,
    client_url: String,
    tokens: HashMap<&'static str, String>,
    added: Vec<u64>,
    lock_key: Option<Vec<u8>>,
    leader_key: Option<LeaderKey>,
}

impl Server {
    pub(super) fn new(channel: Channel, ids: Ids, client_port: u16, peer_port: u16) -> Server {
        Server {
            channel,
            ids,
            peer_url: format!("http://127.0.0.1:{peer_port}"),
            client_url: format!("http://127.0.0.1:{client_port}"),
            tokens: HashMap::new(),
            added: Vec::new(),
            lock_key: None,
            leader_key: None,
        }
    }

    fn member(&self, member: MemberRef) -> u64 {
        match member {
            MemberRef::Own => self.ids.member_id,
            MemberRef::Added(n) => self.added.get(n).copied().unwrap_or(0x0bad),
            MemberRef::Unknown => 0x0bad,
        }
    }

    fn with_token<T>(&self, message: T, who: As) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let token = match who {
            As::Nobody => None,
            As::User(user) => self.tokens.get(user).cloned(),
            As::BadToken => Some("not-a-token.1".to_string()),
        };
        if let Some(token) = token {
            if let Ok(value) = token.parse() {
                request.metadata_mut().insert("token", value);
            }
        }
        request
    }

    /// A member list with this server's own ID, name and URLs as "own", the members the
    /// sequence added by their order, and the list sorted.
    fn members(&self, members: &mut Vec<Member>) -> String {
        let mut named: Vec<String> = members
            .drain(..)
            .map(|m| {
                let id = if m.id == self.ids.member_id {
                    "own".to_string()
                } else {
                    match self.added.iter().position(|a| *a == m.id) {
                        Some(n) => format!("added{n}"),
                        None => format!("{:#x}", m.id),
                    }
                };
                let urls = |urls: &[String]| -> Vec<String> {
                    urls.iter()
                        .map(|u| {
                            if *u == self.peer_url {
                                "own peer".to_string()
                            } else if *u == self.client_url {
                                "own client".to_string()
                            } else {
                                u.clone()
                            }
                        })
                        .collect()
                };
                format!(
                    "{id} name={:?} peers={:?} clients={:?} learner={}",
                    m.name,
                    urls(&m.peer_ur_ls),
                    urls(&m.client_ur_ls),
                    m.is_learner
                )
            })
            .collect();
        named.sort();
        format!("{named:?}")
    }

    async fn send(&mut self, request: &Request, who: As) -> Answer {
        let status = |s: tonic::Status| (s.code(), s.message().to_string());
        let ids = self.ids;
        let channel = self.channel.clone();
        macro_rules! call {
            ($client:ident, $method:ident, $message:expr, |$a:ident| $fix:expr) => {{
                let message = self.with_token($message, who);
                $client::new(channel.clone())
                    .$method(message)
                    .await
                    .map_err(status)
                    .map(|a| {
                        #[allow(unused_mut)]
                        let mut $a = a.into_inner();
                        $fix
                    })
            }};
            ($client:ident, $method:ident, $message:expr) => {
                call!($client, $method, $message, |a| {
                    ids.map(&mut a.header);
                    format!("{a:?}")
                })
            };
        }
        match request.clone() {
            Request::UserAdd(r) => call!(AuthClient, user_add, r),
            Request::UserDelete(r) => call!(AuthClient, user_delete, r),
            Request::UserGet(r) => call!(AuthClient, user_get, r),
            Request::UserList => call!(AuthClient, user_list, AuthUserListRequest {}),
            Request::UserChangePassword(r) => call!(AuthClient, user_change_password, r),
            Request::UserGrantRole(r) => call!(AuthClient, user_grant_role, r),
            Request::UserRevokeRole(r) => call!(AuthClient, user_revoke_role, r),
            Request::RoleAdd(r) => call!(AuthClient, role_add, r),
            Request::RoleDelete(r) => call!(AuthClient, role_delete, r),
            Request::RoleGet(r) => call!(AuthClient, role_get, r),
            Request::RoleList => call!(AuthClient, role_list, AuthRoleListRequest {}),
            Request::RoleGrantPermission(r) => call!(AuthClient, role_grant_permission, r),
            Request::RoleRevokePermission(r) => call!(AuthClient, role_revoke_permission, r),
            Request::AuthEnable => call!(AuthClient, auth_enable, AuthEnableRequest {}),
            Request::AuthDisable => call!(AuthClient, auth_disable, AuthDisableRequest {}),
            Request::Authenticate(r) => {
                let name = USERS.iter().copied().find(|u| *u == r.name);
                let answer = call!(AuthClient, authenticate, r, |a| {
                    ids.map(&mut a.header);
                    let token = std::mem::take(&mut a.token);
                    (format!("{a:?} token_given={}", !token.is_empty()), token)
                });
                match answer {
                    Ok((answer, token)) => {
                        if let Some(name) = name {
                            self.tokens.insert(name, token);
                        }
                        Ok(answer)
                    }
                    Err(e) => Err(e),
                }
            }
            Request::Range(r) => call!(KvClient, range, r),
            Request::Put(r) => call!(KvClient, put, r),
            Request::DeleteRange(r) => call!(KvClient, delete_range, r),
            Request::Grant(r) => call!(LeaseClient, lease_grant, r),
            Request::Revoke(r) => call!(LeaseClient, lease_revoke, r),
            Request::Status => {
                let added = self.added.clone();
                call!(MaintenanceClient, status, StatusRequest {}, |a| {
                    ids.map(&mut a.header);
                    let leader = if a.leader == ids.member_id {
                        "own"
                    } else {
                        "other"
                    };
                    // Alarms name members: the added ones by their order.
                    let mut errors: Vec<String> = a
                        .errors
                        .iter()
                        .map(|e| {
                            let mut e = e.replace(&ids.member_id.to_string(), "own");
                            for (n, id) in added.iter().enumerate() {
                                e = e.replace(&id.to_string(), &format!("added{n}"));
                            }
                            e
                        })
                        .collect();
                    // etcd lists its alarms in no particular order (a Go map's).
                    errors.sort();
                    // What two correct servers answer differently is left out.
                    format!(
                        "header={:?} leader={leader} learner={} errors={errors:?}",
                        a.header, a.is_learner
                    )
                })
            }
            Request::Alarm(action, alarm, member) => {
                let member_id = self.member(member);
                let added = self.added.clone();
                call!(
                    MaintenanceClient,
                    alarm,
                    AlarmRequest {
                        action: action as i32,
                        member_id,
                        alarm: alarm as i32,
                    },
                    |a| {
                        ids.map(&mut a.header);
                        for m in &mut a.alarms {
                            // Its own ID as 1, the n-th added member's as 100 + n.
                            if m.member_id == ids.member_id {
                                m.member_id = 1;
                            } else if let Some(n) = added.iter().position(|a| *a == m.member_id) {
                                m.member_id = 100 + n as u64;
                            }
                        }
                        a.alarms.sort_by_key(|m| (m.member_id, m.alarm));
                        format!("{a:?}")
                    }
                )
            }
            Request::HashKv(r) => call!(MaintenanceClient, hash_kv, r, |a| {
                ids.map(&mut a.header);
                a.hash = 0;
                // etcd 3.5's field, which quorumkv fills and 3.4 does not have.
                a.hash_revision = 0;
                format!("{a:?}")
            }),
            Request::Hash => call!(MaintenanceClient, hash, HashRequest {}, |a| {
                ids.map(&mut a.header);
                a.hash = 0;
                format!("{a:?}")
            }),
            Request::Defragment => call!(MaintenanceClient, defragment, DefragmentRequest {}),
            Request::MemberList => {
                let answer = call!(
                    ClusterClient,
                    member_list,
                    MemberListRequest::default(),
                    |a| {
                        ids.map(&mut a.header);
                        a
                    }
                );
                answer
                    .map(|mut a| format!("header={:?} {}", a.header, self.members(&mut a.members)))
            }
            Request::MemberAdd(r) => {
                let answer = call!(ClusterClient, member_add, r, |a| {
                    ids.map(&mut a.header);
                    a
                });
                answer.map(|mut a| {
                    if let Some(m) = &a.member {
                        self.added.push(m.id);
                    }
                    let mut added: Vec<Member> = a.member.take().into_iter().collect();
                    format!(
                        "header={:?} member={} members={}",
                        a.header,
                        self.members(&mut added),
                        self.members(&mut a.members)
                    )
                })
            }
            Request::MemberRemove(m) => {
                let id = self.member(m);
                let answer = call!(
                    ClusterClient,
                    member_remove,
                    MemberRemoveRequest { id },
                    |a| {
                        ids.map(&mut a.header);
                        a
                    }
                );
                answer
                    .map(|mut a| format!("header={:?} {}", a.header, self.members(&mut a.members)))
            }
            Request::MemberUpdate(m, peer_ur_ls) => {
                let id = self.member(m);
                let answer = call!(
                    ClusterClient,
                    member_update,
                    MemberUpdateRequest { id, peer_ur_ls },
                    |a| {
                        ids.map(&mut a.header);
                        a
                    }
                );
                answer
                    .map(|mut a| format!("header={:?} {}", a.header, self.members(&mut a.members)))
            }
            Request::MemberPromote(m) => {
                let id = self.member(m);
                let answer = call!(
                    ClusterClient,
                    member_promote,
                    MemberPromoteRequest { id },
                    |a| {
                        ids.map(&mut a.header);
                        a
                    }
                );
                answer
                    .map(|mut a| format!("header={:?} {}", a.header, self.members(&mut a.members)))
            }
            Request::Lock(r) => {
                let message = self.with_token(r, who);
                let mut client = LockClient::new(channel);
                match tokio::time::timeout(BLOCKED, client.lock(message)).await {
                    Err(_) => Ok("still waiting for the lock".into()),
                    Ok(Err(e)) => Err(status(e)),
                    Ok(Ok(a)) => {
                        let mut a = a.into_inner();
                        ids.map(&mut a.header);
                        self.lock_key = Some(a.key.clone());
                        Ok(format!("{a:?}"))
                    }
                }
            }
            Request::Unlock(held) => {
                let key = match held {
                    Held::Last => self.lock_key.clone().unwrap_or_default(),
                    Held::Bogus => b"lock1/bogus".to_vec(),
                };
                call!(LockClient, unlock, UnlockRequest { key })
            }
            Request::Campaign(r) => {
                let message = self.with_token(r, who);
                let mut client = ElectionClient::new(channel);
                match tokio::time::timeout(BLOCKED, client.campaign(message)).await {
                    Err(_) => Ok("still campaigning".into()),
                    Ok(Err(e)) => Err(status(e)),
                    Ok(Ok(a)) => {
                        let mut a = a.into_inner();
                        ids.map(&mut a.header);
                        self.leader_key = a.leader.clone();
                        Ok(format!("{a:?}"))
                    }
                }
            }
            Request::Proclaim(held, value) => {
                let leader = Some(self.leader_key(held));
                call!(ElectionClient, proclaim, ProclaimRequest { leader, value })
            }
            Request::Resign(held) => {
                let leader = Some(self.leader_key(held));
                call!(ElectionClient, resign, ResignRequest { leader })
            }
            Request::Leader(r) => call!(ElectionClient, leader, r),
            Request::Observe(r) => {
                let message = self.with_token(r, who);
                let mut client = ElectionClient::new(channel);
                let first = async {
                    let mut answers = client.observe(message).await?.into_inner();
                    answers.message().await
                };
                match tokio::time::timeout(BLOCKED, first).await {
                    Err(_) => Ok("no leader observed".into()),
                    Ok(Err(e)) => Err(status(e)),
                    Ok(Ok(None)) => Ok("the stream ended".into()),
                    Ok(Ok(Some(mut a))) => {
                        ids.map(&mut a.header);
                        Ok(format!("{a:?}"))
                    }
                }
            }
        }
    }

    fn leader_key(&self, held: Held) -> LeaderKey {
        match (held, &self.leader_key) {
            (Held::Last, Some(key)) => key.clone(),
            _ => LeaderKey {
                name: b"elect1".to_vec(),
                key: b"elect1/bogus".to_vec(),
                rev: 1,
                lease: SERVICE_LEASES[0],
            },
        }
    }
}

/// Random requests of the services, as some user.
pub(super) struct ServiceGenerator {
    rng: StdRng,
    kv: Generator,
}

impl ServiceGenerator {
    pub(super) fn new(seed: u64) -> ServiceGenerator {
        ServiceGenerator {
            rng: StdRng::seed_from_u64(seed ^ 0x5345_5256_4943_4553),
            kv: Generator {
                rng: StdRng::seed_from_u64(seed ^ 0x4b56_4153_5553_4552),
                revision: 1,
                compacted: 0,
                physical: true,
            },
        }
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.gen_range(0..from.len())]
    }

    fn user(&mut self) -> String {
        if self.rng.gen_bool(0.05) {
            String::new()
        } else {
            self.pick(USERS).to_string()
        }
    }

    fn role(&mut self) -> String {
        if self.rng.gen_bool(0.05) {
            String::new()
        } else {
            self.pick(ROLES).to_string()
        }
    }

    fn member(&mut self, added: usize) -> MemberRef {
        match self.rng.gen_range(0..10) {
            0..=1 => MemberRef::Own,
            2 => MemberRef::Unknown,
            _ if added > 0 => MemberRef::Added(self.rng.gen_range(0..added)),
            _ => MemberRef::Unknown,
        }
    }

    fn peer_urls(&mut self) -> Vec<String> {
        match self.rng.gen_range(0..8) {
            0 => Vec::new(),
            1 => vec!["not a url".into()],
            2 => vec!["http://127.0.0.1".into()],
            _ => vec![format!(
                "http://127.0.0.1:{}",
                self.rng.gen_range(31001..31004)
            )],
        }
    }

    /// The next request and who sends it; `revision` is etcd's revision now, `added` how many
    /// members the sequence added.
    fn next(&mut self, revision: i64, added: usize) -> (Request, As) {
        self.kv.revision = revision;
        let who = match self.rng.gen_range(0..20) {
            0..=9 => As::User("root"),
            10..=13 => As::User("alice"),
            14..=16 => As::User("bob"),
            17..=18 => As::Nobody,
            _ => As::BadToken,
        };
        let roll = self.rng.gen_range(0..100);
        // Alarms as root: etcd 3.4 lets anyone raise or clear one once auth is on, where
        // quorumkv asks for root (see `documented`), and a difference in the alarms would
        // follow every later Status.
        let who = if (60..=61).contains(&roll) {
            As::User("root")
        } else {
            who
        };
        let request = match roll {
            0..=3 => Request::UserAdd(AuthUserAddRequest {
                name: self.user(),
                password: self.pick(PASSWORDS).to_string(),
                options: self
                    .rng
                    .gen_bool(0.1)
                    .then_some(UserAddOptions { no_password: true }),
                hashed_password: String::new(),
            }),
            4 => Request::UserDelete(AuthUserDeleteRequest { name: self.user() }),
            5..=6 => Request::UserGet(AuthUserGetRequest { name: self.user() }),
            7 => Request::UserList,
            8 => Request::UserChangePassword(AuthUserChangePasswordRequest {
                name: self.user(),
                password: self.pick(PASSWORDS).to_string(),
                hashed_password: String::new(),
            }),
            // Root's root role half the time, so that auth can be turned on.
            9..=12 if self.rng.gen_bool(0.5) => Request::UserGrantRole(AuthUserGrantRoleRequest {
                user: "root".into(),
                role: "root".into(),
            }),
            9..=12 => Request::UserGrantRole(AuthUserGrantRoleRequest {
                user: self.user(),
                role: self.role(),
            }),
            13 => Request::UserRevokeRole(AuthUserRevokeRoleRequest {
                name: self.user(),
                role: self.role(),
            }),
            14..=16 => Request::RoleAdd(AuthRoleAddRequest { name: self.role() }),
            17 => Request::RoleDelete(AuthRoleDeleteRequest { role: self.role() }),
            18..=19 => Request::RoleGet(AuthRoleGetRequest { role: self.role() }),
            20 => Request::RoleList,
            21..=24 => {
                let key = self.kv.key();
                let range_end = self.kv.range_end(&key);
                Request::RoleGrantPermission(AuthRoleGrantPermissionRequest {
                    name: self.role(),
                    perm: Some(Permission {
                        perm_type: self.rng.gen_range(0..=2),
                        key: if self.rng.gen_bool(0.05) {
                            Vec::new()
                        } else {
                            key
                        },
                        range_end,
                    }),
                })
            }
            25 => {
                let key = self.kv.key();
                let range_end = self.kv.range_end(&key);
                Request::RoleRevokePermission(AuthRoleRevokePermissionRequest {
                    role: self.role(),
                    key,
                    range_end,
                })
            }
            26..=28 => Request::AuthEnable,
            29 => Request::AuthDisable,
            30..=35 => Request::Authenticate(AuthenticateRequest {
                name: self.user(),
                password: self.pick(PASSWORDS).to_string(),
            }),
            36..=43 => Request::Range(self.kv.range()),
            44..=51 => Request::Put(self.kv.put()),
            52..=53 => Request::DeleteRange(self.kv.delete()),
            54..=56 => Request::Grant(LeaseGrantRequest {
                id: self.pick(SERVICE_LEASES),
                ttl: SERVICE_LEASE_TTL,
            }),
            57 => Request::Revoke(LeaseRevokeRequest {
                id: self.pick(SERVICE_LEASES),
            }),
            58..=59 => Request::Status,
            60..=61 => Request::Alarm(
                self.pick(&[
                    AlarmAction::Get,
                    AlarmAction::Activate,
                    AlarmAction::Deactivate,
                ]),
                self.pick(&[AlarmType::Nospace, AlarmType::Corrupt, AlarmType::None]),
                self.member(added),
            ),
            62 => Request::HashKv(HashKvRequest {
                revision: self.kv.rng.gen_range(0..=revision + 2),
            }),
            63 => Request::Hash,
            64 => Request::Defragment,
            65..=66 => Request::MemberList,
            67..=68 => {
                let peer_ur_ls = self.peer_urls();
                // A voter that never starts would take the single member's quorum (etcd
                // accepts a second voter into a cluster of one): voters only with URLs refused.
                let valid = peer_ur_ls.len() == 1 && peer_ur_ls[0].contains(":310");
                Request::MemberAdd(MemberAddRequest {
                    is_learner: valid || self.rng.gen_bool(0.5),
                    peer_ur_ls,
                })
            }
            69 => Request::MemberRemove(self.member(added)),
            // Not of an added learner: etcd 3.4 makes it a voter (quorumkv keeps it a learner),
            // see the README's compatibility section. Not with no URLs: etcd 3.4 crashes on
            // that. Not the server's own with URLs quorumkv refuses (etcd takes them).
            70 => {
                let member = self.member(0);
                let mut urls = self.peer_urls();
                if urls.is_empty() || matches!(member, MemberRef::Own) {
                    urls = vec!["http://127.0.0.1:31009".into()];
                }
                Request::MemberUpdate(member, urls)
            }
            71 => Request::MemberPromote(self.member(added)),
            72..=76 => Request::Lock(LockRequest {
                name: self.pick(LOCKS).to_vec(),
                lease: if self.rng.gen_bool(0.1) {
                    0x2ff
                } else {
                    self.pick(SERVICE_LEASES)
                },
            }),
            77..=79 => Request::Unlock(if self.rng.gen_bool(0.8) {
                Held::Last
            } else {
                Held::Bogus
            }),
            80..=84 => Request::Campaign(CampaignRequest {
                name: self.pick(ELECTIONS).to_vec(),
                lease: if self.rng.gen_bool(0.1) {
                    0x2ff
                } else {
                    self.pick(SERVICE_LEASES)
                },
                value: self.kv.value(),
            }),
            85..=87 => Request::Proclaim(
                if self.rng.gen_bool(0.8) {
                    Held::Last
                } else {
                    Held::Bogus
                },
                self.kv.value(),
            ),
            88..=91 => Request::Leader(LeaderRequest {
                name: self.pick(ELECTIONS).to_vec(),
            }),
            92..=94 => Request::Resign(if self.rng.gen_bool(0.8) {
                Held::Last
            } else {
                Held::Bogus
            }),
            _ => Request::Observe(LeaderRequest {
                name: self.pick(ELECTIONS).to_vec(),
            }),
        };
        (request, who)
    }
}

/// Why a difference between the two answers is one the README's compatibility section names
/// (quorumkv answers so on purpose), if it is.
fn documented(
    request: &Request,
    auth: bool,
    expected: &Answer,
    got: &Answer,
) -> Option<&'static str> {
    let refused_for_auth = |answer: &Answer| {
        let answer = format!("{answer:?}");
        answer.contains("user name is empty") || answer.contains("permission denied")
    };
    match (request, expected, got) {
        // GHSA-q8m4-xhhv-38mg again: etcd 3.4.23 raises and clears alarms for anyone, and
        // revokes a lease without keys for anyone (the caller undoes it in etcd).
        (Request::Alarm(..), _, _)
            if auth && refused_for_auth(got) && !refused_for_auth(expected) =>
        {
            Some("Alarm needs root once auth is on")
        }
        (Request::Revoke(_), _, Err(_)) if auth && refused_for_auth(got) => {
            Some("LeaseRevoke needs a user once auth is on")
        }
        // GHSA-q8m4-xhhv-38mg: etcd 3.4 lists the members to anyone, token or not.
        (Request::MemberList, Ok(_), Err(_)) if auth => {
            Some("MemberList needs a user once auth is on")
        }
        // etcd 3.4 grants a lease to anyone (the caller revokes it from etcd again).
        (Request::Grant(_), _, Err((_, ours)))
            if auth
                && (ours.contains("user name is empty") || ours.contains("invalid auth token")) =>
        {
            Some("LeaseGrant needs a user once auth is on")
        }
        // etcd names a new member by its URLs and the second it was added in: a second add
        // of the same URLs in the same second meets the first one's ID.
        (Request::MemberAdd(_), Err((_, theirs)), Err((_, ours)))
            if theirs == "etcdserver: member ID already exist"
                && ours == "etcdserver: Peer URLs already exists" =>
        {
            Some("an added member's ID does not come from its URLs and the time")
        }
        _ => None,
    }
}

/// Sends `requests` of the services' sequence of `seed` to both (`theirs` is etcd); the
/// differences, and what was covered by kind and outcome.
pub(super) async fn service_differences(
    seed: u64,
    requests: usize,
    theirs: &mut Server,
    mine: &mut Server,
) -> (
    Vec<String>,
    std::collections::BTreeMap<(String, String), usize>,
) {
    let mut generator = ServiceGenerator::new(seed);
    let mut found = Vec::new();
    let mut tally = std::collections::BTreeMap::new();
    let mut revision = 1;
    // Whether auth is on, as etcd's answers to AuthEnable and AuthDisable say.
    let mut auth = false;
    // Every request and both answers, to follow a difference back to where the two parted.
    let trace = std::env::var_os("CONFORMANCE_TRACE").is_some();
    let started = std::time::Instant::now();
    for sent in 1..=requests {
        let (request, who) = generator.next(revision, theirs.added.len().min(mine.added.len()));
        // NOSPACE and CORRUPT are raised for the next requests only: while either is active,
        // etcd 3.4 applies requests without asking auth (it puts its alarm's applier in front
        // of the base one, not of the auth one), which quorumkv does not copy. So a raised
        // alarm is seen by a put and a status, and cleared.
        let steps = match &request {
            Request::Alarm(AlarmAction::Activate, alarm, member) if *alarm != AlarmType::None => {
                vec![
                    request.clone(),
                    Request::Put(generator.kv.put()),
                    Request::Status,
                    Request::Alarm(AlarmAction::Deactivate, *alarm, *member),
                ]
            }
            _ => vec![request.clone()],
        };
        let (mut expected, mut got) = (Vec::new(), Vec::new());
        for step in &steps {
            expected.push(theirs.send(step, who).await);
            got.push(mine.send(step, who).await);
        }
        let (expected, got) = if steps.len() == 1 {
            (expected.remove(0), got.remove(0))
        } else {
            (Ok(format!("{expected:?}")), Ok(format!("{got:?}")))
        };
        let kind = format!("{request:?}");
        let kind = kind.split('(').next().unwrap_or_default().to_string();
        let outcome = match &expected {
            Ok(answer) if answer.starts_with("still") || answer.starts_with("no leader") => {
                answer.clone()
            }
            Ok(_) => "ok".to_string(),
            Err((code, message)) => format!("{code:?}: {message}"),
        };
        *tally.entry((kind, outcome)).or_insert(0usize) += 1;
        let auth_before = auth;
        if trace {
            eprintln!(
                "{sent} as {who:?} at {:.1} s: {request:?}\n  etcd 3.4: {expected:?}\n  quorumkv: {got:?}",
                started.elapsed().as_secs_f64()
            );
        }
        match (&request, &expected) {
            (Request::AuthEnable, Ok(_)) => auth = true,
            (Request::AuthDisable, Ok(_)) => auth = false,
            _ => {}
        }
        // etcd's revision now (as root once auth is on: `Status` needs no permission).
        if let Ok(a) = MaintenanceClient::new(theirs.channel.clone())
            .status(StatusRequest {})
            .await
        {
            revision = a.into_inner().header.map_or(revision, |h| h.revision);
        }
        if expected != got {
            if let Some(reason) = documented(&request, auth_before, &expected, &got) {
                *tally
                    .entry(("documented".to_string(), reason.to_string()))
                    .or_insert(0usize) += 1;
                // A lease only etcd granted goes again (anyone may revoke a lease with no
                // keys), so that the two stay alike.
                let undo = match (&request, &expected) {
                    (Request::Grant(grant), Ok(_)) => {
                        Some(Request::Revoke(LeaseRevokeRequest { id: grant.id }))
                    }
                    (Request::Revoke(revoke), Ok(_)) => Some(Request::Grant(LeaseGrantRequest {
                        id: revoke.id,
                        ttl: SERVICE_LEASE_TTL,
                    })),
                    // A raised NOSPACE or CORRUPT was cleared by its own sequence.
                    (Request::Alarm(AlarmAction::Activate, AlarmType::None, member), _) => Some(
                        Request::Alarm(AlarmAction::Deactivate, AlarmType::None, *member),
                    ),
                    // Raised again only if etcd cleared one (it answers with what it cleared).
                    (Request::Alarm(AlarmAction::Deactivate, AlarmType::None, member), Ok(a))
                        if a.contains("AlarmMember") =>
                    {
                        Some(Request::Alarm(
                            AlarmAction::Activate,
                            AlarmType::None,
                            *member,
                        ))
                    }
                    _ => None,
                };
                if let Some(undo) = undo {
                    let answer = theirs.send(&undo, As::Nobody).await;
                    if trace {
                        eprintln!("  undone in etcd 3.4: {undo:?}: {answer:?}");
                    }
                }
                continue;
            }
            found.push(format!(
                "service request {sent} (seed {seed}, auth {}) as {who:?}: {request:?}\n  etcd 3.4: {expected:?}\n  quorumkv: {got:?}",
                if auth_before { "on" } else { "off" }
            ));
            if found.len() >= 20 {
                break;
            }
        }
    }
    (found, tally)
}

/// Both servers' `Server`s, connected.
pub(super) async fn connect(endpoint: String, client_port: u16, peer_port: u16) -> Server {
    let channel = Channel::from_shared(endpoint)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let ids = super::ids_of(&mut KvClient::new(channel.clone())).await;
    Server::new(channel, ids, client_port, peer_port)
}
