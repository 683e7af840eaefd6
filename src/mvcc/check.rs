//! Checks on requests that need no state, done before proposing so that a bad request never
//! enters the log. (Checks that need state run at apply: `MvccStore::check_path`.)

use std::collections::HashSet;

use super::error::MvccError;
use crate::proto::etcdserverpb::{
    request_op, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

pub fn check_range(req: &RangeRequest) -> Result<(), MvccError> {
    if req.key.is_empty() {
        return Err(MvccError::EmptyKey);
    }
    Ok(())
}

pub fn check_put(req: &PutRequest) -> Result<(), MvccError> {
    if req.key.is_empty() {
        return Err(MvccError::EmptyKey);
    }
    if req.ignore_value && !req.value.is_empty() {
        return Err(MvccError::ValueProvided);
    }
    if req.ignore_lease && req.lease != 0 {
        return Err(MvccError::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(req: &DeleteRangeRequest) -> Result<(), MvccError> {
    if req.key.is_empty() {
        return Err(MvccError::EmptyKey);
    }
    Ok(())
}

/// Op counts, keys, and no key written twice in one branch (puts, and puts inside deleted
/// ranges), nested transactions included.
pub fn check_txn(req: &TxnRequest, max_txn_ops: usize) -> Result<(), MvccError> {
    check_txn_ops(req, max_txn_ops)?;
    check_branch(&req.success)?;
    check_branch(&req.failure)?;
    Ok(())
}

fn check_txn_ops(req: &TxnRequest, max_txn_ops: usize) -> Result<(), MvccError> {
    if req.compare.len() > max_txn_ops
        || req.success.len() > max_txn_ops
        || req.failure.len() > max_txn_ops
    {
        return Err(MvccError::TooManyOps);
    }
    for compare in &req.compare {
        if compare.key.is_empty() {
            return Err(MvccError::EmptyKey);
        }
    }
    for op in req.success.iter().chain(&req.failure) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => check_range(r)?,
            Some(request_op::Request::RequestPut(r)) => check_put(r)?,
            Some(request_op::Request::RequestDeleteRange(r)) => check_delete(r)?,
            Some(request_op::Request::RequestTxn(r)) => check_txn_ops(r, max_txn_ops)?,
            None => {}
        }
    }
    Ok(())
}

/// An interval of deleted keys, as etcd 3.4 checks a transaction's keys: `end` empty = the single
/// key; otherwise the keys from `start` up to `end`, compared as they are (so a delete "from
/// the key on", `end` = `\0`, holds no key here, and etcd lets a put of any key go with it).
struct Deleted {
    start: Vec<u8>,
    end: Vec<u8>,
}

impl Deleted {
    fn contains(&self, key: &[u8]) -> bool {
        if self.end.is_empty() {
            return key == self.start.as_slice();
        }
        key >= self.start.as_slice() && key < self.end.as_slice()
    }
}

/// Returns the (deletes, puts) of a branch, failing on a key written twice within it, in
/// etcd 3.4's order: this level's deletes; then each nested transaction's puts against the puts
/// and deletes known so far (its two branches may put the same key: one of them runs), its
/// deletes joining them after; then this level's puts against all of those.
fn check_branch(ops: &[RequestOp]) -> Result<(Vec<Deleted>, HashSet<Vec<u8>>), MvccError> {
    let mut deletes: Vec<Deleted> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(request_op::Request::RequestDeleteRange(del)) => Some(Deleted {
                start: del.key.clone(),
                end: del.range_end.clone(),
            }),
            _ => None,
        })
        .collect();
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    let clashes = |deletes: &[Deleted], key: &[u8]| deletes.iter().any(|d| d.contains(key));
    for op in ops {
        let Some(request_op::Request::RequestTxn(txn)) = &op.request else {
            continue;
        };
        let (then_deletes, then_puts) = check_branch(&txn.success)?;
        let (else_deletes, else_puts) = check_branch(&txn.failure)?;
        for key in &then_puts {
            if puts.contains(key) || clashes(&deletes, key) {
                return Err(MvccError::DuplicateKey);
            }
        }
        puts.extend(then_puts.iter().cloned());
        for key in &else_puts {
            if puts.contains(key) && !then_puts.contains(key) || clashes(&deletes, key) {
                return Err(MvccError::DuplicateKey);
            }
        }
        puts.extend(else_puts);
        deletes.extend(then_deletes);
        deletes.extend(else_deletes);
    }
    for op in ops {
        let Some(request_op::Request::RequestPut(put)) = &op.request else {
            continue;
        };
        if puts.contains(&put.key) || clashes(&deletes, &put.key) {
            return Err(MvccError::DuplicateKey);
        }
        puts.insert(put.key.clone());
    }
    Ok((deletes, puts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.into(),
                ..Default::default()
            })),
        }
    }

    fn del(key: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: key.into(),
                    range_end: end.into(),
                    ..Default::default()
                },
            )),
        }
    }

    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            compare: vec![],
            success,
            failure,
        }
    }

    #[test]
    fn two_puts_of_one_key_in_a_branch_are_refused() {
        let req = txn(vec![put("a"), put("a")], vec![]);
        assert!(matches!(check_txn(&req, 128), Err(MvccError::DuplicateKey)));
    }

    #[test]
    fn same_key_in_then_and_else_is_fine() {
        let req = txn(vec![put("a")], vec![put("a")]);
        assert!(check_txn(&req, 128).is_ok());
    }

    #[test]
    fn put_inside_a_deleted_range_is_refused() {
        let req = txn(vec![del("a", "c"), put("b")], vec![]);
        assert!(matches!(check_txn(&req, 128), Err(MvccError::DuplicateKey)));
        let req = txn(vec![del("a", "c"), put("c")], vec![]);
        assert!(check_txn(&req, 128).is_ok(), "range end is exclusive");
    }

    #[test]
    fn nested_put_clashing_with_parent_put_is_refused() {
        let nested = RequestOp {
            request: Some(request_op::Request::RequestTxn(txn(vec![put("a")], vec![]))),
        };
        let req = txn(vec![put("a"), nested], vec![]);
        assert!(matches!(check_txn(&req, 128), Err(MvccError::DuplicateKey)));
    }

    #[test]
    fn nested_put_inside_a_range_deleted_by_the_parent_is_refused() {
        let nested = RequestOp {
            request: Some(request_op::Request::RequestTxn(txn(vec![put("b")], vec![]))),
        };
        let req = txn(vec![del("a", "z"), nested], vec![]);
        assert!(matches!(check_txn(&req, 128), Err(MvccError::DuplicateKey)));
    }

    fn nested(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestTxn(txn(success, failure))),
        }
    }

    // Each case below was sent to etcd 3.4.23 through its JSON gateway; the comments say what
    // it answered.
    #[test]
    fn a_put_after_a_nested_put_of_its_key_is_refused() {
        // Refused: duplicate key.
        let req = txn(vec![nested(vec![put("k")], vec![]), put("k")], vec![]);
        assert!(matches!(check_txn(&req, 128), Err(MvccError::DuplicateKey)));
    }

    #[test]
    fn a_delete_from_a_key_on_or_an_inverted_range_holds_no_key_for_the_check() {
        // Both accepted: etcd compares range ends as they are.
        assert!(check_txn(&txn(vec![del("a", "\0"), put("k")], vec![]), 128).is_ok());
        assert!(check_txn(&txn(vec![del("z", "a"), put("k")], vec![]), 128).is_ok());
    }

    #[test]
    fn nested_transactions_are_checked_in_order() {
        // A nested put into an earlier nested delete's range: refused.
        let req = txn(
            vec![
                nested(vec![del("a", "z")], vec![]),
                nested(vec![put("k")], vec![]),
            ],
            vec![],
        );
        assert!(matches!(check_txn(&req, 128), Err(MvccError::DuplicateKey)));
        // A nested delete over an earlier nested put: accepted.
        let req = txn(
            vec![
                nested(vec![put("k")], vec![]),
                nested(vec![del("a", "z")], vec![]),
            ],
            vec![],
        );
        assert!(check_txn(&req, 128).is_ok());
    }

    #[test]
    fn too_many_ops_are_refused() {
        let ops: Vec<_> = (0..5).map(|i| put(&i.to_string())).collect();
        assert!(matches!(
            check_txn(&txn(ops.clone(), vec![]), 4),
            Err(MvccError::TooManyOps)
        ));
        assert!(check_txn(&txn(ops, vec![]), 5).is_ok());
    }

    #[test]
    fn empty_keys_are_refused_everywhere() {
        assert!(matches!(
            check_txn(&txn(vec![put("")], vec![]), 8),
            Err(MvccError::EmptyKey)
        ));
        assert!(matches!(
            check_put(&PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                ignore_value: true,
                ..Default::default()
            }),
            Err(MvccError::ValueProvided)
        ));
    }
}
