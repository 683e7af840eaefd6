//! Watches with etcdctl 3.4 and a gRPC client against a real quorumkv process: history replay,
//! live events, prev_kv, prefixes, filters, cancel, progress, compaction, catch-up of a long
//! history, and a lease's expiry seen by a watcher (service discovery).

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{etcdctl, grant, keep_alive, ok, wait_until, Server};
use quorumkv::proto::etcdserverpb::watch_client::WatchClient;
use quorumkv::proto::etcdserverpb::watch_create_request::FilterType;
use quorumkv::proto::etcdserverpb::watch_request::RequestUnion;
use quorumkv::proto::etcdserverpb::{
    WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

/// A running `etcdctl watch ...`, its output read when it is stopped.
struct Watcher {
    child: Child,
}

impl Watcher {
    fn start(endpoint: &str, args: &[&str]) -> Watcher {
        let child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", endpoint, "watch"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("etcdctl");
        // etcdctl prints nothing once the watch is created: give it a moment.
        std::thread::sleep(Duration::from_millis(500));
        Watcher { child }
    }

    fn output(mut self) -> String {
        std::thread::sleep(Duration::from_millis(500));
        let _ = self.child.kill();
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read");
        let _ = self.child.wait();
        out
    }
}

#[test]
fn etcdctl_watch_replays_history_then_follows_with_prev_kv_and_prefixes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    ok(etcdctl(&ep, &["put", "a", "1"]));
    ok(etcdctl(&ep, &["put", "a", "2"]));
    let history = Watcher::start(&ep, &["a", "--rev=1", "--prev-kv"]);
    let prefix = Watcher::start(&ep, &["--prefix", "s/"]);
    ok(etcdctl(&ep, &["put", "s/x", "9"]));
    ok(etcdctl(&ep, &["del", "a"]));
    ok(etcdctl(&ep, &["put", "s/y", "10"]));
    ok(etcdctl(&ep, &["put", "other", "0"]));
    assert_eq!(
        history.output(),
        "PUT\na\n1\nPUT\na\n1\na\n2\nDELETE\na\n2\na\n\n",
        "as etcd 3.4.23 prints it"
    );
    assert_eq!(prefix.output(), "PUT\ns/x\n9\nPUT\ns/y\n10\n");
}

#[test]
fn sigterm_with_a_watch_stream_open_exits_cleanly_within_seconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    ok(etcdctl(&ep, &["put", "a", "1"]));
    // A watch stream never ends by itself: the shutdown must not wait for it forever.
    let watcher = Watcher::start(&ep, &["a"]);
    let (exited, exit) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = exited.send(server.terminate());
    });
    let status = exit
        .recv_timeout(Duration::from_secs(10))
        .expect("the server exits within 10 s of SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        std::net::TcpStream::connect(ep.trim_start_matches("http://")).is_err(),
        "the client port is closed"
    );
    drop(watcher.output());
}

#[test]
fn a_watch_from_a_compacted_revision_is_canceled_with_the_compact_revision() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    for v in ["1", "2", "3"] {
        ok(etcdctl(&ep, &["put", "a", v]));
    }
    ok(etcdctl(&ep, &["compaction", "3"]));
    let out = etcdctl(&ep, &["watch", "a", "--rev=2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("watch was canceled (etcdserver: mvcc: required revision has been compacted)"),
        "{err}"
    );
    // From the compact revision itself, history is there.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let (tx, mut rx) = open(&ep).await;
        tx.send(create("a", "", 1, |_| {})).await.expect("send");
        let canceled = next(&mut rx).await;
        assert!(canceled.created && !canceled.canceled, "created first");
        let canceled = next(&mut rx).await;
        assert!(canceled.canceled);
        assert_eq!(canceled.compact_revision, 3);
        tx.send(create("a", "", 3, |_| {})).await.expect("send");
        assert!(next(&mut rx).await.created);
        let events = next(&mut rx).await;
        let values: Vec<&[u8]> = events
            .events
            .iter()
            .map(|e| e.kv.as_ref().expect("kv").value.as_slice())
            .collect();
        assert_eq!(values, vec![&b"2"[..], b"3"], "revisions 3 and 4");
    });
}

#[test]
fn a_long_history_reaches_a_watcher_complete_and_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    // More revisions than one catch-up step and more responses than a stream queues.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut kv = server.client().await;
        for i in 0..3000 {
            kv.put(quorumkv::proto::etcdserverpb::PutRequest {
                key: format!("k{}", i % 7).into_bytes(),
                value: format!("v{i}").into_bytes(),
                ..Default::default()
            })
            .await
            .expect("put");
        }
        let (tx, mut rx) = open(&ep).await;
        tx.send(create("k", "l", 1, |_| {})).await.expect("send");
        assert!(next(&mut rx).await.created);
        // Read slowly at first, so the stream's queue fills.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut seen = Vec::new();
        while seen.len() < 3000 {
            let resp = next(&mut rx).await;
            for event in resp.events {
                seen.push(event.kv.expect("kv").mod_revision);
            }
        }
        let expected: Vec<i64> = (2..3002).collect();
        assert_eq!(seen, expected, "every revision once, in order");
    });
}

#[test]
fn filters_cancel_progress_and_several_watches_on_one_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let (tx, mut rx) = open(&ep).await;
        tx.send(create("f", "", 0, |c| {
            c.filters = vec![FilterType::Noput as i32];
            c.watch_id = 7;
        }))
        .await
        .expect("send");
        let created = next(&mut rx).await;
        assert_eq!((created.created, created.watch_id), (true, 7));
        tx.send(create("f", "", 0, |c| c.watch_id = 7))
            .await
            .expect("send");
        let duplicate = next(&mut rx).await;
        assert!(duplicate.canceled);
        assert_eq!(
            duplicate.cancel_reason,
            "mvcc: duplicate watch ID provided on the WatchStream"
        );
        tx.send(create("g", "", 0, |_| {})).await.expect("send");
        let second = next(&mut rx).await;
        assert!(second.created);
        ok(etcdctl(&ep, &["put", "f", "1"]));
        ok(etcdctl(&ep, &["put", "g", "1"]));
        ok(etcdctl(&ep, &["del", "f"]));
        let mut got = Vec::new();
        for _ in 0..2 {
            let resp = next(&mut rx).await;
            got.push((resp.watch_id, resp.events.len(), resp.events[0].r#type));
        }
        got.sort();
        assert_eq!(
            got,
            vec![(second.watch_id, 1, 0), (7, 1, 1)],
            "the NOPUT watch sees only the delete"
        );
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest {
                watch_id: 7,
            })),
        })
        .await
        .expect("send");
        let canceled = next(&mut rx).await;
        assert_eq!((canceled.watch_id, canceled.canceled), (7, true));
        ok(etcdctl(&ep, &["put", "f", "after cancel"]));
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
        })
        .await
        .expect("send");
        let progress = next(&mut rx).await;
        assert_eq!(progress.watch_id, -1);
        assert!(progress.events.is_empty(), "nothing for the canceled watch");
        assert_eq!(progress.header.expect("header").revision, 5);
    });
}

#[test]
fn service_discovery_a_registrants_key_disappears_from_the_watch_when_it_dies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    let lease = grant(&ep, 2);
    let watcher = Watcher::start(&ep, &["--prefix", "services/"]);
    ok(etcdctl(
        &ep,
        &["put", "--lease", &lease, "services/api/1", "10.0.0.5:8080"],
    ));
    let mut registrant = keep_alive(&ep, &lease);
    std::thread::sleep(Duration::from_secs(3));
    let _ = registrant.kill(); // The registrant dies.
    let _ = registrant.wait();
    wait_until(
        "the key expires with its lease",
        Duration::from_secs(5),
        || {
            ok(etcdctl(
                &ep,
                &["get", "services/", "--prefix", "--keys-only"],
            ))
            .is_empty()
        },
    );
    assert_eq!(
        watcher.output(),
        "PUT\nservices/api/1\n10.0.0.5:8080\nDELETE\nservices/api/1\n\n"
    );
}

/// The Watch service's own answers, seen on a bare HTTP/2 connection: a request compressed in
/// a way it does not take is refused as tonic refuses one (Unimplemented, in the headers); a
/// plain stream answers `application/grpc`, sends its messages, and once the client ends its
/// side ends with `grpc-status: 0` in the trailers.
#[test]
fn a_watch_stream_refuses_compression_and_ends_with_status_ok_in_trailers() {
    use prost::Message;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    let addr = ep.trim_start_matches("http://").to_string();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let (h2, connection) = h2::client::handshake(tcp).await.expect("handshake");
        tokio::spawn(connection);
        let request = |encoding: Option<&str>| {
            let mut builder = http::Request::builder()
                .method("POST")
                .uri(format!("{ep}/etcdserverpb.Watch/Watch"))
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            if let Some(encoding) = encoding {
                builder = builder.header("grpc-encoding", encoding);
            }
            builder.body(()).expect("request")
        };

        let mut h2 = h2.ready().await.expect("ready");
        let (refused, _send) = h2.send_request(request(Some("gzip")), false).expect("send");
        let refused = refused.await.expect("response");
        assert_eq!(refused.headers()["grpc-status"], "12", "{refused:?}");
        let message = refused.headers()["grpc-message"].to_str().expect("ascii");
        assert!(message.contains("gzip"), "{message}");

        let mut h2 = h2.ready().await.expect("ready");
        let (response, mut send) = h2.send_request(request(None), false).expect("send");
        let mut framed = vec![0u8; 5];
        create("a", "", 0, |_| {})
            .encode(&mut framed)
            .expect("encode");
        let len = u32::try_from(framed.len() - 5).expect("small");
        framed[1..5].copy_from_slice(&len.to_be_bytes());
        send.send_data(framed.into(), false).expect("data");
        let response = response.await.expect("response");
        assert_eq!(response.headers()["content-type"], "application/grpc");
        assert!(response.headers().get("grpc-status").is_none());
        let mut body = response.into_body();
        let first = tokio::time::timeout(Duration::from_secs(10), body.data())
            .await
            .expect("created in time")
            .expect("a frame")
            .expect("data");
        let len = u32::from_be_bytes([first[1], first[2], first[3], first[4]]) as usize;
        let created = WatchResponse::decode(&first[5..5 + len]).expect("a response");
        assert!(created.created, "{created:?}");
        send.send_data(Default::default(), true).expect("end");
        while let Some(chunk) = body.data().await {
            chunk.expect("data");
        }
        let trailers = body.trailers().await.expect("trailers").expect("some");
        assert_eq!(trailers["grpc-status"], "0");
    });
}

async fn open(endpoint: &str) -> (mpsc::Sender<WatchRequest>, tonic::Streaming<WatchResponse>) {
    let mut client = WatchClient::connect(endpoint.to_string())
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(16);
    let responses = client
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    (tx, responses)
}

fn create(
    key: &str,
    end: &str,
    start_revision: i64,
    edit: impl FnOnce(&mut WatchCreateRequest),
) -> WatchRequest {
    let mut create = WatchCreateRequest {
        key: key.into(),
        range_end: end.into(),
        start_revision,
        ..Default::default()
    };
    edit(&mut create);
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(create)),
    }
}

async fn next(rx: &mut tonic::Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("a response in time")
        .expect("stream ok")
        .expect("stream open")
}
