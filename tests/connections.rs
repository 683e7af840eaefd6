//! What a member takes of clients' connections, as etcd does: any number of streams on one
//! connection (`--max-concurrent-streams`, no limit by default), a listen backlog as deep as the
//! kernel allows, and the soft limit on open files raised to the hard one.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, wait_until, Server};
use quorumkv::proto::etcdserverpb::watch_client::WatchClient;
use quorumkv::proto::etcdserverpb::watch_request::RequestUnion;
use quorumkv::proto::etcdserverpb::{WatchCreateRequest, WatchRequest};
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

/// 600 watch streams on one HTTP/2 connection (hyper's default allowed 200 at a time; the
/// etcd-client crate opens each watch as a stream of one connection), each created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_watch_streams_share_one_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let channel = tonic::transport::Channel::from_shared(server.endpoint())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut streams = Vec::new();
    for i in 0..600 {
        let mut client = WatchClient::new(channel.clone());
        let (tx, rx) = mpsc::channel(1);
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: format!("key{i}").into_bytes(),
                ..Default::default()
            })),
        })
        .await
        .expect("send");
        streams.push(tokio::spawn(async move {
            let mut responses = client
                .watch(ReceiverStream::new(rx))
                .await
                .expect("watch")
                .into_inner();
            let created = responses.message().await.expect("ok").expect("a response");
            assert!(created.created, "{created:?}");
            (tx, responses)
        }));
    }
    let mut open = Vec::new();
    for stream in streams {
        open.push(
            tokio::time::timeout(Duration::from_secs(30), stream)
                .await
                .expect("created in time")
                .expect("stream task"),
        );
    }
    assert_eq!(open.len(), 600);
}

/// The client port's listen backlog (`ss` shows it as a listener's Send-Q) is the kernel's
/// ceiling, not tokio's 1024; and the soft limit on open files is the hard one.
#[test]
fn the_listen_backlog_and_the_open_files_limit_are_as_high_as_the_host_allows() {
    let has_ss = Command::new("ss").arg("-V").output().is_ok();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let data = dir.path().join("data");
    let peer = free_port();
    // Started with a soft limit of 256, under a higher hard limit.
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {} --data-dir {} --listen-client-urls http://127.0.0.1:{port} \
             --advertise-client-urls http://127.0.0.1:{port} --listen-peer-urls http://127.0.0.1:{peer} \
             --initial-advertise-peer-urls http://127.0.0.1:{peer} --initial-cluster default=http://127.0.0.1:{peer}",
            env!("CARGO_BIN_EXE_quorumkv"),
            data.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // Killed however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Killed(child);
    wait_until("the member listens", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.0.id())).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers[0], numbers[1], "soft limit not raised: {line}");
    assert_ne!(numbers[0], "256", "{line}");
    if has_ss {
        let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .expect("somaxconn")
            .trim()
            .parse()
            .expect("a number");
        let ss = Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .expect("ss");
        let ss = String::from_utf8_lossy(&ss.stdout).to_string();
        let backlog: u64 = ss
            .split_whitespace()
            .nth(2)
            .and_then(|b| b.parse().ok())
            .unwrap_or_else(|| panic!("no listener in {ss:?}"));
        assert_eq!(backlog, somaxconn.min(65_535), "{ss}");
    }
    drop(child);
}
