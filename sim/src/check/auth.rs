//! Permissions: every write answered as a success was allowed by the auth store as it stood
//! where the write was applied in the log (every auth change before it applied, none after),
//! at the auth revision it was checked at. Replays the log's auth changes in index order.

use std::collections::{BTreeMap, HashSet};

use super::Verdict;
use quorumkv::auth::{check_request, AuthInfo, AuthState};
use quorumkv::proto::quorumkvpb::raft_request::Request;
use quorumkv::proto::quorumkvpb::RaftRequest;

/// `entries`: the applied entries that change the auth store or carry a user's request, by
/// index; `succeeded`: the values of the writes answered as successes.
pub fn check(entries: &BTreeMap<u64, RaftRequest>, succeeded: &[Vec<u8>]) -> Verdict {
    let succeeded: HashSet<&[u8]> = succeeded.iter().map(Vec::as_slice).collect();
    let mut state = match AuthState::from_records(&[]) {
        Ok(state) => state,
        Err(e) => {
            return Verdict {
                name: "auth",
                ok: false,
                detail: format!("no empty auth state: {e}"),
            }
        }
    };
    let mut failures = Vec::new();
    let (mut changes, mut checked) = (0, 0);
    for (index, request) in entries {
        let Some(body) = &request.request else {
            continue;
        };
        let who = AuthInfo {
            user: request.username.clone(),
            revision: request.auth_revision,
        };
        // A change refused at apply changes nothing; a permitted one applies.
        if let Request::Auth(change) = body {
            if check_request(&state, &who, body, None).is_ok() {
                let mut next = state.clone();
                if next.apply(change).is_ok() {
                    state = next;
                    changes += 1;
                }
            }
            continue;
        }
        let Request::Put(put) = body else { continue };
        if !succeeded.contains(put.value.as_slice()) {
            continue;
        }
        checked += 1;
        if let Err(e) = check_request(&state, &who, body, None) {
            failures.push(format!(
                "the write of {:?} by {:?} (checked at auth revision {}) was applied at index {index} and answered as a success, but the auth store there (revision {}) refuses it: {e}",
                String::from_utf8_lossy(&put.value),
                who.user,
                who.revision,
                state.revision()
            ));
        }
    }
    Verdict::from_failures(
        "auth",
        failures,
        format!("{checked} successful writes held to {changes} auth changes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorumkv::proto::etcdserverpb::{
        AuthEnableRequest, AuthUserAddRequest, AuthUserGrantRoleRequest, PutRequest,
    };
    use quorumkv::proto::quorumkvpb::auth_change::Change;
    use quorumkv::proto::quorumkvpb::AuthChange;

    fn change(c: Change) -> RaftRequest {
        RaftRequest {
            request: Some(Request::Auth(AuthChange { change: Some(c) })),
            ..Default::default()
        }
    }

    fn put(user: &str, revision: u64, value: &str) -> RaftRequest {
        RaftRequest {
            request: Some(Request::Put(PutRequest {
                key: b"perm/x".to_vec(),
                value: value.into(),
                ..Default::default()
            })),
            username: user.into(),
            auth_revision: revision,
            ..Default::default()
        }
    }

    #[test]
    fn a_write_after_auth_is_on_by_a_user_without_permission_fails() {
        let mut entries = BTreeMap::new();
        let user = |name: &str| {
            change(Change::UserAdd(AuthUserAddRequest {
                name: name.into(),
                hashed_password: "h".into(),
                ..Default::default()
            }))
        };
        entries.insert(1, user("root"));
        entries.insert(
            2,
            change(Change::UserGrantRole(AuthUserGrantRoleRequest {
                user: "root".into(),
                role: "root".into(),
            })),
        );
        entries.insert(3, user("probe"));
        // Before auth is on, anything goes (revision 4 after three changes).
        entries.insert(4, put("probe", 4, "before"));
        entries.insert(5, change(Change::Enable(AuthEnableRequest {})));
        entries.insert(6, put("probe", 5, "after"));
        let ok = check(&entries, &[b"before".to_vec()]);
        assert!(ok.ok, "{}", ok.detail);
        let broken = check(&entries, &[b"before".to_vec(), b"after".to_vec()]);
        assert!(!broken.ok);
        assert!(broken.detail.contains("\"after\""), "{}", broken.detail);
    }
}
