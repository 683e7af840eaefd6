//! Bad input gets etcd's status code and message, over real gRPC, and loses nothing.

mod common;

use common::Server;
use quorumkv::proto::etcdserverpb::{
    request_op, CompactionRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use tonic::Code;

fn put_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_etcds_codes_and_messages_and_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        dir.path(),
        &["--max-request-bytes", "4096", "--max-txn-ops", "4"],
    );
    let mut client = server.client().await;
    client
        .put(PutRequest {
            key: b"keep".to_vec(),
            value: b"me".to_vec(),
            ..Default::default()
        })
        .await
        .expect("put");

    let too_large = PutRequest {
        key: b"big".to_vec(),
        value: vec![b'x'; 4097],
        ..Default::default()
    };
    let status = client.put(too_large).await.expect_err("too large");
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "etcdserver: request is too large")
    );

    // Past the gRPC message limit (the request limit plus gRPC's allowance), the message is
    // refused before it is decoded, and the connection stays usable.
    let beyond_grpc_limit = PutRequest {
        key: b"huge".to_vec(),
        value: vec![b'x'; 4096 + 512 * 1024 + 1],
        ..Default::default()
    };
    let status = client
        .put(beyond_grpc_limit)
        .await
        .expect_err("over the gRPC limit");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("message length too large"),
        "{status:?}"
    );

    let status = client
        .put(PutRequest {
            key: vec![],
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("empty key");
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "etcdserver: key is not provided")
    );
    let status = client
        .range(RangeRequest::default())
        .await
        .expect_err("empty key");
    assert_eq!(status.code(), Code::InvalidArgument);

    let many = TxnRequest {
        compare: vec![],
        success: (0..5).map(|i| put_op(&format!("k{i}"))).collect(),
        failure: vec![],
    };
    let status = client.txn(many).await.expect_err("too many ops");
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request"
        )
    );

    let duplicate = TxnRequest {
        compare: vec![],
        success: vec![put_op("d"), put_op("d")],
        failure: vec![],
    };
    let status = client.txn(duplicate).await.expect_err("duplicate");
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::InvalidArgument,
            "etcdserver: duplicate key given in txn request"
        )
    );

    for i in 0..3 {
        client
            .put(PutRequest {
                key: b"keep".to_vec(),
                value: format!("me{i}").into_bytes(),
                ..Default::default()
            })
            .await
            .expect("put");
    }
    client
        .compact(CompactionRequest {
            revision: 3,
            physical: true,
        })
        .await
        .expect("compact");
    let status = client
        .range(RangeRequest {
            key: b"keep".to_vec(),
            revision: 2,
            ..Default::default()
        })
        .await
        .expect_err("compacted");
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted"
        )
    );
    let status = client
        .range(RangeRequest {
            key: b"keep".to_vec(),
            revision: 1000,
            ..Default::default()
        })
        .await
        .expect_err("future");
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision"
        )
    );

    let status = client
        .put(PutRequest {
            key: b"l".to_vec(),
            lease: 7,
            ..Default::default()
        })
        .await
        .expect_err("lease");
    assert_eq!(
        (status.code(), status.message()),
        (Code::NotFound, "etcdserver: requested lease not found")
    );

    // Nothing was lost and the server still serves.
    let resp = client
        .range(RangeRequest {
            key: b"keep".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    assert_eq!(resp.kvs[0].value, b"me2");
    let resp = client
        .range(RangeRequest {
            key: b"k".to_vec(),
            range_end: b"l".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    assert_eq!(resp.count, 1, "only 'keep': the refused txns wrote nothing");
}
