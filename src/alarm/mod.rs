//! Alarms, as etcd keeps them: a set of (member, alarm type) raised when a member's backend
//! passes its space quota (NOSPACE) or its state diverged from its peers' (CORRUPT). They change
//! only by applying committed `AlarmRequest`s, so every member holds the same set at the same
//! index; they live in the backend beside the key space (`m` + `alarms/...`), so snapshots carry
//! them. While one is active the cluster refuses what etcd refuses: writes that add data under
//! NOSPACE, every write (and compaction) under CORRUPT; reads are served.

use std::collections::BTreeSet;

use crate::proto::etcdserverpb::alarm_request::AlarmAction;
use crate::proto::etcdserverpb::{request_op, AlarmMember, AlarmRequest, AlarmType, TxnRequest};
use crate::proto::quorumkvpb::raft_request::Request;

/// Record names: `alarms/<member id, 16 hex digits>/<alarm type number>`.
pub const ALARM_RECORD_PREFIX: &str = "alarms/";

/// The record of one active alarm.
pub fn record_name(member_id: u64, alarm: i32) -> String {
    format!("{ALARM_RECORD_PREFIX}{member_id:016x}/{alarm}")
}

/// The (member, alarm) a record name stands for; `None` if the name is not one.
pub fn parse_record_name(name: &str) -> Option<(u64, i32)> {
    let rest = name.strip_prefix(ALARM_RECORD_PREFIX)?;
    let (member, alarm) = rest.split_once('/')?;
    Some((u64::from_str_radix(member, 16).ok()?, alarm.parse().ok()?))
}

/// What an alarm stops while it is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `etcdserver: mvcc: database space exceeded`
    NoSpace,
    /// `etcdserver: corrupt cluster`
    Corrupt,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlarmTable {
    active: BTreeSet<(u64, i32)>,
}

/// One record to write (`Some`) or delete (`None`) after a change.
pub type AlarmRecordChange = (String, Option<Vec<u8>>);

impl AlarmTable {
    /// The table from its records' names (the values carry nothing).
    pub fn from_records<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut active = BTreeSet::new();
        for name in names {
            let parsed = parse_record_name(name)
                .ok_or_else(|| format!("alarm record {name:?} is not <member>/<type>"))?;
            active.insert(parsed);
        }
        Ok(AlarmTable { active })
    }

    pub fn is_active(&self, alarm: AlarmType) -> bool {
        self.active.iter().any(|(_, a)| *a == alarm as i32)
    }

    /// The active alarms of type `alarm` (`NONE`: every type), by member.
    pub fn list(&self, alarm: i32) -> Vec<AlarmMember> {
        self.active
            .iter()
            .filter(|(_, a)| alarm == AlarmType::None as i32 || *a == alarm)
            .map(|(member, a)| AlarmMember {
                member_id: *member,
                alarm: *a,
            })
            .collect()
    }

    /// Applies a committed alarm request: the alarms it answers with and the records to write
    /// (none when nothing changed). As etcd: GET lists the active alarms of a type; ACTIVATE
    /// answers with the alarm, active from now or already; DEACTIVATE with the alarm it
    /// cleared, or with nothing if it was not active.
    pub fn apply(&mut self, request: &AlarmRequest) -> (Vec<AlarmMember>, Vec<AlarmRecordChange>) {
        let key = (request.member_id, request.alarm);
        let changed = vec![AlarmMember {
            member_id: request.member_id,
            alarm: request.alarm,
        }];
        match AlarmAction::try_from(request.action) {
            // As etcd 3.4, NONE too: it is listed (and makes `/health` false), and stops nothing.
            Ok(AlarmAction::Activate) => {
                if self.active.insert(key) {
                    let record = (record_name(key.0, key.1), Some(Vec::new()));
                    return (changed, vec![record]);
                }
                (changed, vec![])
            }
            Ok(AlarmAction::Deactivate) => {
                if self.active.remove(&key) {
                    return (changed, vec![(record_name(key.0, key.1), None)]);
                }
                (vec![], vec![])
            }
            Ok(AlarmAction::Get) => (self.list(request.alarm), vec![]),
            // An unknown action or activating NONE changes nothing.
            _ => (vec![], vec![]),
        }
    }

    /// Whether the active alarms refuse `request` (applied or about to be proposed).
    pub fn refusal(&self, request: &Request) -> Option<Refusal> {
        if self.active.is_empty() {
            return None;
        }
        if self.is_active(AlarmType::Corrupt) {
            let writes = match request {
                Request::Put(_)
                | Request::DeleteRange(_)
                | Request::Compaction(_)
                | Request::LeaseGrant(_)
                | Request::LeaseRevoke(_) => true,
                Request::Txn(txn) => txn_writes(txn),
                Request::V2(v2) => v2.method != "SYNC",
                _ => false,
            };
            return writes.then_some(Refusal::Corrupt);
        }
        if self.is_active(AlarmType::Nospace) {
            let adds_data = match request {
                Request::Put(_) | Request::LeaseGrant(_) => true,
                Request::Txn(txn) => txn_puts(txn),
                Request::V2(v2) => v2.method == "PUT" || v2.method == "POST",
                _ => false,
            };
            return adds_data.then_some(Refusal::NoSpace);
        }
        None
    }
}

/// Does the transaction (either branch, nested ones included) put anything? As etcd's quota
/// counts a transaction: by its puts; deletes free space and pass under NOSPACE.
pub fn txn_puts(txn: &TxnRequest) -> bool {
    txn.success
        .iter()
        .chain(&txn.failure)
        .any(|op| match &op.request {
            Some(request_op::Request::RequestPut(_)) => true,
            Some(request_op::Request::RequestTxn(inner)) => txn_puts(inner),
            _ => false,
        })
}

/// Does the transaction (either branch, nested ones included) write anything?
pub fn txn_writes(txn: &TxnRequest) -> bool {
    txn.success
        .iter()
        .chain(&txn.failure)
        .any(|op| match &op.request {
            Some(request_op::Request::RequestPut(_))
            | Some(request_op::Request::RequestDeleteRange(_)) => true,
            Some(request_op::Request::RequestTxn(inner)) => txn_writes(inner),
            Some(request_op::Request::RequestRange(_)) | None => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::{PutRequest, RangeRequest, RequestOp};

    fn request(action: AlarmAction, member_id: u64, alarm: AlarmType) -> AlarmRequest {
        AlarmRequest {
            action: action as i32,
            member_id,
            alarm: alarm as i32,
        }
    }

    #[test]
    fn activate_and_deactivate_answer_the_change_once_and_write_records() {
        let mut table = AlarmTable::default();
        let (answer, records) = table.apply(&request(AlarmAction::Activate, 7, AlarmType::Nospace));
        assert_eq!(answer.len(), 1);
        assert_eq!(records, vec![(record_name(7, 1), Some(vec![]))]);
        let (again, records) = table.apply(&request(AlarmAction::Activate, 7, AlarmType::Nospace));
        assert_eq!(again.len(), 1, "already active: answered, as etcd does");
        assert!(records.is_empty(), "nothing changed");
        table.apply(&request(AlarmAction::Activate, 9, AlarmType::Corrupt));
        assert_eq!(table.list(AlarmType::None as i32).len(), 2);
        assert_eq!(table.list(AlarmType::Corrupt as i32)[0].member_id, 9);
        let (got, _) = table.apply(&request(AlarmAction::Get, 0, AlarmType::Nospace));
        assert_eq!(got.len(), 1);
        let (answer, records) =
            table.apply(&request(AlarmAction::Deactivate, 7, AlarmType::Nospace));
        assert_eq!(answer.len(), 1);
        assert_eq!(records, vec![(record_name(7, 1), None)]);
        let names: Vec<String> = vec![record_name(9, 2)];
        let loaded = AlarmTable::from_records(names.iter().map(String::as_str)).expect("load");
        assert_eq!(loaded, table, "the records hold the table");
        assert!(AlarmTable::from_records(["alarms/xyz"]).is_err());
    }

    #[test]
    fn nospace_refuses_only_what_adds_data_and_corrupt_refuses_every_write() {
        let mut table = AlarmTable::default();
        let put = Request::Put(PutRequest::default());
        let read_txn = Request::Txn(TxnRequest {
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest::default())),
            }],
            ..Default::default()
        });
        let nested_write = Request::Txn(TxnRequest {
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest {
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest::default())),
                    }],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        });
        let delete = Request::DeleteRange(Default::default());
        let delete_txn = Request::Txn(TxnRequest {
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(Default::default())),
            }],
            ..Default::default()
        });
        assert_eq!(table.refusal(&put), None);
        table.apply(&request(AlarmAction::Activate, 1, AlarmType::Nospace));
        assert_eq!(table.refusal(&put), Some(Refusal::NoSpace));
        assert_eq!(table.refusal(&nested_write), Some(Refusal::NoSpace));
        assert_eq!(table.refusal(&read_txn), None);
        assert_eq!(table.refusal(&delete), None, "deletes free space");
        assert_eq!(
            table.refusal(&delete_txn),
            None,
            "so do transactions that only delete"
        );
        table.apply(&request(AlarmAction::Activate, 1, AlarmType::Corrupt));
        assert_eq!(table.refusal(&delete), Some(Refusal::Corrupt));
        assert_eq!(table.refusal(&nested_write), Some(Refusal::Corrupt));
        assert_eq!(table.refusal(&delete_txn), Some(Refusal::Corrupt));
        assert_eq!(table.refusal(&read_txn), None, "reads are served");
    }
}
