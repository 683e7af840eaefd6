//! Leases: (1) no lease expires early — once a grant or keep-alive called at `c` was
//! acknowledged with TTL `t`, no linearizable read may find the lease's key gone before
//! `c + t` (shortened by the fastest clock's skew), unless a revoke was called; (2) a key
//! gone with its lease stays gone — no linearizable read that starts after one found it
//! absent finds it present.

use std::collections::BTreeMap;

use super::Verdict;
use crate::leases::{LeaseCall, LeaseOp, LeaseOutcome};

const NAME: &str = "leases";

/// `max_skew_ppm`: how much faster than real time any member's clock may run.
pub fn check(ops: &[LeaseOp], max_skew_ppm: u64) -> Verdict {
    let mut by_lease: BTreeMap<i64, Vec<&LeaseOp>> = BTreeMap::new();
    for op in ops {
        by_lease.entry(op.lease).or_default().push(op);
    }
    let (mut leases, mut renewals, mut expiries) = (0, 0, 0);
    let mut failures = Vec::new();
    for (lease, ops) in &by_lease {
        let Some(attached) = ops.iter().find(|op| {
            matches!(op.call, LeaseCall::Attach { .. }) && op.outcome == LeaseOutcome::Done
        }) else {
            continue;
        };
        leases += 1;
        let revoke_call_us = ops
            .iter()
            .filter(|op| op.call == LeaseCall::Revoke)
            .map(|op| op.call_us)
            .min()
            .unwrap_or(u64::MAX);
        // Grants and keep-alives acknowledged, each with the earliest time it allows expiry.
        let lives_until: Vec<(u64, &LeaseOp)> = ops
            .iter()
            .filter_map(|op| match op.outcome {
                LeaseOutcome::Renewed { ttl } => {
                    let ttl_us = ttl as u64 * 1_000_000;
                    Some((
                        op.call_us + ttl_us * 1_000_000 / (1_000_000 + max_skew_ppm),
                        *op,
                    ))
                }
                _ => None,
            })
            .collect();
        renewals += lives_until.len();
        let reads = ops.iter().filter(|op| {
            matches!(op.call, LeaseCall::Read { .. }) && op.call_us > attached.return_us
        });
        let first_absent = reads
            .clone()
            .filter(|op| op.outcome == LeaseOutcome::Absent)
            .min_by_key(|op| op.return_us);
        let Some(absent) = first_absent else {
            continue;
        };
        expiries += 1;
        if absent.return_us < revoke_call_us {
            if let Some((until, renewal)) = lives_until
                .iter()
                .filter(|(until, _)| absent.return_us < *until)
                .max_by_key(|(until, _)| *until)
            {
                failures.push(format!(
                    "lease {lease:x} expired early: its key was gone {:.3}s before the TTL acknowledged by\n  {}\n  ran out; found gone by\n  {}",
                    (*until - absent.return_us) as f64 / 1e6,
                    renewal.describe(),
                    absent.describe()
                ));
            }
        }
        if let Some(again) = reads
            .clone()
            .find(|op| op.outcome == LeaseOutcome::Present && op.call_us > absent.return_us)
        {
            failures.push(format!(
                "lease {lease:x}: its key came back after it was gone:\n  {}\n  then\n  {}",
                absent.describe(),
                again.describe()
            ));
        }
    }
    let summary = format!(
        "{leases} leases with a key, {renewals} grants and keep-alives acknowledged, {expiries} seen expired or revoked"
    );
    Verdict::from_failures(NAME, failures, summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: LeaseCall, call_s: f64, return_s: f64, outcome: LeaseOutcome) -> LeaseOp {
        LeaseOp {
            client: 1,
            node: 1,
            lease: 7,
            call,
            call_us: (call_s * 1e6) as u64,
            return_us: (return_s * 1e6) as u64,
            outcome,
        }
    }

    fn read(call_s: f64, return_s: f64, outcome: LeaseOutcome) -> LeaseOp {
        op(
            LeaseCall::Read {
                key: "lease/1.1".into(),
            },
            call_s,
            return_s,
            outcome,
        )
    }

    fn life(keep_alive_at: f64, absent_at: f64) -> Vec<LeaseOp> {
        vec![
            op(
                LeaseCall::Grant { ttl: 2 },
                0.0,
                0.1,
                LeaseOutcome::Renewed { ttl: 2 },
            ),
            op(
                LeaseCall::Attach {
                    key: "lease/1.1".into(),
                },
                0.1,
                0.2,
                LeaseOutcome::Done,
            ),
            read(0.3, 0.4, LeaseOutcome::Present),
            op(
                LeaseCall::KeepAlive,
                keep_alive_at,
                keep_alive_at + 0.1,
                LeaseOutcome::Renewed { ttl: 2 },
            ),
            read(absent_at - 0.1, absent_at, LeaseOutcome::Absent),
        ]
    }

    #[test]
    fn an_expiry_after_the_last_acknowledged_ttl_passes() {
        let verdict = check(&life(1.0, 3.5), 0);
        assert!(verdict.ok, "{}", verdict.detail);
        assert!(verdict.detail.starts_with("1 leases"), "{}", verdict.detail);
    }

    #[test]
    fn an_expiry_while_a_keep_alive_holds_fails() {
        let verdict = check(&life(1.0, 2.5), 0);
        assert!(!verdict.ok);
        assert!(
            verdict.detail.contains("expired early"),
            "{}",
            verdict.detail
        );
    }

    #[test]
    fn clock_skew_allows_a_proportionally_earlier_expiry_and_a_revoke_any() {
        // TTL 2 s from 1.0 s on a clock 10% fast: expiry from 2.818 s on is allowed.
        assert!(check(&life(1.0, 2.9), 100_000).ok);
        let mut ops = life(1.0, 2.0);
        ops.push(op(LeaseCall::Revoke, 1.5, 1.6, LeaseOutcome::Done));
        assert!(check(&ops, 0).ok);
    }

    #[test]
    fn a_key_seen_again_after_its_lease_went_fails() {
        let mut ops = life(1.0, 3.5);
        ops.push(read(3.6, 3.7, LeaseOutcome::Present));
        let verdict = check(&ops, 0);
        assert!(!verdict.ok);
        assert!(verdict.detail.contains("came back"), "{}", verdict.detail);
    }
}
