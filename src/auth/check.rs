//! What each request needs, checked against an auth state: at the API when it arrives, and at
//! apply (with the leases, for what a lease's keys need) for the requests that go through the log.

use super::error::AuthError;
use super::perms::{Access, KeyRange};
use super::state::AuthState;
use super::AuthInfo;
use crate::lease::LeaseTable;
use crate::proto::etcdserverpb::{
    request_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use crate::proto::quorumkvpb::auth_change::Change;
use crate::proto::quorumkvpb::raft_request::Request;

/// May `who` make `request`? `leases`: the leases as of its apply, to check what a lease's
/// keys need (a put attaching a lease, a revoke); `None` at the API, where they are not read.
pub fn check_request(
    state: &AuthState,
    who: &AuthInfo,
    request: &Request,
    leases: Option<&LeaseTable>,
) -> Result<(), AuthError> {
    if who.is_internal() || !state.enabled() {
        return Ok(());
    }
    let (user, rev) = (who.user.as_str(), who.revision);
    match request {
        Request::Put(put) => check_put(state, who, put, leases),
        Request::DeleteRange(delete) => check_delete(state, who, delete),
        Request::Txn(txn) => check_txn(state, who, txn, leases),
        Request::Compaction(_) | Request::LeaseGrant(_) => state.check_user(user, rev),
        Request::LeaseRevoke(revoke) => {
            state.check_user(user, rev)?;
            check_lease_keys(state, who, revoke.id, leases)
        }
        Request::Auth(change) => match change.change {
            Some(Change::SimpleToken(_)) => Ok(()),
            _ => state.check_admin(user, rev, AuthError::PermissionDenied),
        },
        // Only members make these; a client never does.
        Request::Alarm(_)
        | Request::LeaseCheckpoint(_)
        | Request::MemberAttributes(_)
        | Request::MemberPeerUrls(_)
        // The v2 API has no v3 users: its requests are the member's own.
        | Request::V2(_) => state.check_admin(user, rev, AuthError::PermissionDenied),
    }
}

/// May `who` read what `range` names?
pub fn check_range(
    state: &AuthState,
    who: &AuthInfo,
    range: &RangeRequest,
) -> Result<(), AuthError> {
    check_read(state, who, &range.key, &range.range_end)
}

/// May `who` read `[key, range_end)` (a watch, a range)?
pub fn check_read(
    state: &AuthState,
    who: &AuthInfo,
    key: &[u8],
    range_end: &[u8],
) -> Result<(), AuthError> {
    check_access(state, who, key, range_end, Access::Read)
}

/// May `who` write `[key, range_end)`?
pub fn check_write(
    state: &AuthState,
    who: &AuthInfo,
    key: &[u8],
    range_end: &[u8],
) -> Result<(), AuthError> {
    check_access(state, who, key, range_end, Access::Write)
}

fn check_access(
    state: &AuthState,
    who: &AuthInfo,
    key: &[u8],
    range_end: &[u8],
    access: Access,
) -> Result<(), AuthError> {
    if who.is_internal() || !state.enabled() {
        return Ok(());
    }
    state.check(
        &who.user,
        who.revision,
        &KeyRange::of(key, range_end),
        access,
    )
}

fn check_put(
    state: &AuthState,
    who: &AuthInfo,
    put: &PutRequest,
    leases: Option<&LeaseTable>,
) -> Result<(), AuthError> {
    check_write(state, who, &put.key, &[])?;
    if put.prev_kv {
        check_read(state, who, &put.key, &[])?;
    }
    if put.lease != 0 {
        // Revoking the lease deletes its keys: whoever attaches a key to it must be allowed to
        // write every key already on it (etcd's checkLeasePuts).
        check_lease_keys(state, who, put.lease, leases)?;
    }
    Ok(())
}

fn check_delete(
    state: &AuthState,
    who: &AuthInfo,
    delete: &DeleteRangeRequest,
) -> Result<(), AuthError> {
    check_write(state, who, &delete.key, &delete.range_end)?;
    if delete.prev_kv {
        check_read(state, who, &delete.key, &delete.range_end)?;
    }
    Ok(())
}

/// Every compare is a read; every operation of both branches is checked, whichever runs.
fn check_txn(
    state: &AuthState,
    who: &AuthInfo,
    txn: &TxnRequest,
    leases: Option<&LeaseTable>,
) -> Result<(), AuthError> {
    for compare in &txn.compare {
        check_compare(state, who, compare)?;
    }
    for op in txn.success.iter().chain(&txn.failure) {
        check_op(state, who, op, leases)?;
    }
    Ok(())
}

fn check_compare(state: &AuthState, who: &AuthInfo, compare: &Compare) -> Result<(), AuthError> {
    check_read(state, who, &compare.key, &compare.range_end)
}

fn check_op(
    state: &AuthState,
    who: &AuthInfo,
    op: &RequestOp,
    leases: Option<&LeaseTable>,
) -> Result<(), AuthError> {
    match &op.request {
        Some(request_op::Request::RequestRange(range)) => check_range(state, who, range),
        Some(request_op::Request::RequestPut(put)) => check_put(state, who, put, leases),
        Some(request_op::Request::RequestDeleteRange(delete)) => check_delete(state, who, delete),
        Some(request_op::Request::RequestTxn(txn)) => check_txn(state, who, txn, leases),
        None => Ok(()),
    }
}

/// May `who` write every key attached to `lease`? (Nothing to check without the leases, or
/// for a lease that is not there: the request fails on that.)
pub fn check_lease_keys(
    state: &AuthState,
    who: &AuthInfo,
    lease: i64,
    leases: Option<&LeaseTable>,
) -> Result<(), AuthError> {
    let Some(lease) = leases.and_then(|l| l.get(lease)) else {
        return Ok(());
    };
    for key in &lease.keys {
        check_write(state, who, key, &[])?;
    }
    Ok(())
}
