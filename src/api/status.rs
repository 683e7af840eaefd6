//! Errors to gRPC statuses, with etcd's codes and messages.

use tonic::{Code, Status};

use crate::mvcc::MvccError;
use crate::raft::NodeError;
use crate::server::ServerError;

pub fn to_status(error: ServerError) -> Status {
    let (code, message): (Code, String) = match &error {
        ServerError::Mvcc(e) => match e {
            MvccError::Compacted => (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted".into(),
            ),
            MvccError::FutureRev => (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision".into(),
            ),
            MvccError::LeaseNotFound => (Code::NotFound, e.to_string()),
            MvccError::LeaseExists => (Code::FailedPrecondition, e.to_string()),
            MvccError::LeaseTtlTooLarge => (Code::OutOfRange, e.to_string()),
            MvccError::KeyNotFound
            | MvccError::DuplicateKey
            | MvccError::TooManyOps
            | MvccError::EmptyKey
            | MvccError::ValueProvided
            | MvccError::LeaseProvided => (Code::InvalidArgument, e.to_string()),
            MvccError::NotKeyValue => (Code::Internal, e.to_string()),
            MvccError::LeaderChanged => (Code::Unavailable, e.to_string()),
            MvccError::NoSpace => (
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded".into(),
            ),
            MvccError::CorruptCluster => (Code::DataLoss, e.to_string()),
            MvccError::Corrupt { .. } => (Code::DataLoss, format!("etcdserver: {e}")),
            MvccError::Backend(_) => (Code::Internal, format!("etcdserver: {e}")),
            MvccError::Auth(auth) => (auth.code(), auth.to_string()),
        },
        ServerError::RequestTooLarge => (Code::InvalidArgument, error.to_string()),
        ServerError::Timeout
        | ServerError::Stopped
        | ServerError::LeaderTransferTimeout
        | ServerError::NotSupportedForLearner => (Code::Unavailable, error.to_string()),
        ServerError::MemberNotFound => (Code::NotFound, error.to_string()),
        // etcd answers these as plain errors (gRPC Unknown).
        ServerError::ElectionNotLeader | ServerError::ElectionNoLeader => {
            (Code::Unknown, error.to_string())
        }
        ServerError::MissingLeaderKey => (Code::InvalidArgument, error.to_string()),
        ServerError::Internal(_) => (Code::Internal, error.to_string()),
        ServerError::BadMemberUrls => (Code::InvalidArgument, error.to_string()),
        ServerError::NotLeader
        | ServerError::MemberNotLearner
        | ServerError::LearnerNotReady
        | ServerError::TooManyLearners
        | ServerError::PeerUrlExists
        | ServerError::Unhealthy
        | ServerError::BadLeaderTransferee => (Code::FailedPrecondition, error.to_string()),
        // etcd 3.4 has no gRPC code for it.
        ServerError::NotEnoughStartedMembers => (Code::Unknown, error.to_string()),
        ServerError::Node(e) => match e {
            NodeError::NoLeader | NodeError::Stopped => (Code::Unavailable, e.to_string()),
            NodeError::Raft(_) => (Code::Internal, e.to_string()),
        },
    };
    Status::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacted_and_future_revisions_map_to_out_of_range_with_etcd_messages() {
        let status = to_status(ServerError::Mvcc(MvccError::Compacted));
        assert_eq!(status.code(), Code::OutOfRange);
        assert_eq!(
            status.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        let status = to_status(ServerError::Mvcc(MvccError::FutureRev));
        assert_eq!(
            status.message(),
            "etcdserver: mvcc: required revision is a future revision"
        );
    }

    #[test]
    fn input_errors_are_invalid_argument() {
        for (error, message) in [
            (
                ServerError::RequestTooLarge,
                "etcdserver: request is too large",
            ),
            (
                ServerError::Mvcc(MvccError::EmptyKey),
                "etcdserver: key is not provided",
            ),
            (
                ServerError::Mvcc(MvccError::TooManyOps),
                "etcdserver: too many operations in txn request",
            ),
            (
                ServerError::Mvcc(MvccError::DuplicateKey),
                "etcdserver: duplicate key given in txn request",
            ),
        ] {
            let status = to_status(error);
            assert_eq!(
                (status.code(), status.message()),
                (Code::InvalidArgument, message)
            );
        }
        assert_eq!(
            to_status(ServerError::Mvcc(MvccError::LeaseNotFound)).code(),
            Code::NotFound
        );
    }
}
