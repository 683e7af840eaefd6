//! The v2 keys API under live conditions: many waits at once, streams, etcdctl's watches, a
//! restart, and three members that must expire TTL keys at the same index across a leader
//! change.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{http_form, wait_until, Server};
use serde_json::Value;

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

fn put(port: u16, path: &str, form: &str) -> Value {
    let (status, _, body) = http_form(port, "PUT", path, form);
    assert!(status == 200 || status == 201, "{path}: {status} {body}");
    json_of(&body)
}

/// Opens a `GET` on `path` and reads its head: the wait is registered once the head is back.
fn open_wait(port: u16, path: &str) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    assert!(line.starts_with("HTTP/1.1 200"), "{path}: {line}");
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header");
        if line == "\r\n" {
            return reader;
        }
    }
}

/// The next event of a chunked wait answer (one JSON line per chunk), `None` at its end.
fn next_event(reader: &mut BufReader<TcpStream>) -> Option<Value> {
    let mut size = String::new();
    reader.read_line(&mut size).ok()?;
    let size = usize::from_str_radix(size.trim(), 16).ok()?;
    if size == 0 {
        return None;
    }
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk).ok()?;
    Some(json_of(String::from_utf8_lossy(&chunk[..size]).trim()))
}

fn watchers(port: u16) -> u64 {
    let (_, _, body) = http_form(port, "GET", "/v2/stats/store", "");
    json_of(&body)["watchers"].as_u64().expect("watchers")
}

#[test]
fn a_thousand_waits_on_one_directory_all_see_the_next_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--enable-v2"]);
    let port = server.client_port;
    put(port, "/v2/keys/jobs/first", "value=1");
    let mut waits: Vec<_> = (0..1000)
        .map(|_| open_wait(port, "/v2/keys/jobs?wait=true&recursive=true"))
        .collect();
    assert_eq!(watchers(port), 1000);
    let set = put(port, "/v2/keys/jobs/next", "value=2");
    let index = set["node"]["modifiedIndex"].clone();
    for wait in &mut waits {
        let event = next_event(wait).expect("an event");
        assert_eq!(event["node"]["key"], "/jobs/next");
        assert_eq!(event["node"]["modifiedIndex"], index);
        assert!(next_event(wait).is_none(), "a wait ends with its event");
    }
    assert_eq!(watchers(port), 0);
}

#[test]
fn a_stream_sees_every_change_in_order_and_a_closed_one_is_forgotten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--enable-v2"]);
    let port = server.client_port;
    let first = put(port, "/v2/keys/s/a", "value=0");
    let since = first["node"]["modifiedIndex"].as_u64().expect("index");
    // From the history (the first put), then live.
    let mut stream = open_wait(
        port,
        &format!("/v2/keys/s?wait=true&recursive=true&stream=true&waitIndex={since}"),
    );
    assert_eq!(
        next_event(&mut stream).expect("from history")["node"]["value"],
        "0"
    );
    for i in 1..=5 {
        put(port, "/v2/keys/s/a", &format!("value={i}"));
    }
    // Hidden keys are not shown to a watcher above them.
    put(port, "/v2/keys/s/_hidden", "value=x");
    let (status, _, _) = http_form(port, "DELETE", "/v2/keys/s?recursive=true", "");
    assert_eq!(status, 200);
    for i in 1..=5 {
        let event = next_event(&mut stream).expect("an event");
        assert_eq!(event["action"], "set");
        assert_eq!(event["node"]["value"], i.to_string());
        assert_eq!(
            event["node"]["modifiedIndex"].as_u64(),
            Some(since + i as u64)
        );
    }
    let deleted = next_event(&mut stream).expect("the delete");
    assert_eq!(deleted["action"], "delete");
    assert_eq!(deleted["node"]["key"], "/s");
    assert_eq!(watchers(port), 1);
    drop(stream);
    // The member notices the client is gone once it writes to it, or at once.
    put(port, "/v2/keys/s/b", "value=1");
    wait_until(
        "the closed stream is forgotten",
        Duration::from_secs(10),
        || watchers(port) == 0,
    );
}

fn etcdctl_v2(port: u16) -> Command {
    let mut command = Command::new("etcdctl");
    command
        .env("ETCDCTL_API", "2")
        .arg("--endpoints")
        .arg(format!("http://127.0.0.1:{port}"));
    command
}

#[test]
fn etcdctl_v2_watch_forever_and_exec_watch_see_each_change() {
    if !common::etcdctl_available() {
        eprintln!("skipped: etcdctl is not installed (ci/test installs it)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--enable-v2"]);
    let port = server.client_port;
    put(port, "/v2/keys/conf/seed", "value=0");
    let mut watch = etcdctl_v2(port)
        .args(["watch", "--forever", "--recursive", "/conf"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl watch");
    let mut exec = etcdctl_v2(port)
        .args(["exec-watch", "--recursive", "/conf", "--"])
        .args([
            "sh",
            "-c",
            "echo \"$ETCD_WATCH_ACTION $ETCD_WATCH_KEY $ETCD_WATCH_VALUE\"",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl exec-watch");
    // Both are waiting once the member counts them.
    wait_until("both watches wait", Duration::from_secs(10), || {
        watchers(port) == 2
    });
    let mut watched = BufReader::new(watch.stdout.take().expect("stdout"));
    let mut executed = BufReader::new(exec.stdout.take().expect("stdout"));
    for i in 1..=3 {
        put(port, "/v2/keys/conf/k", &format!("value=v{i}"));
        let mut line = String::new();
        watched.read_line(&mut line).expect("watch output");
        assert_eq!(line.trim(), format!("[set] /conf/k"));
        line.clear();
        watched.read_line(&mut line).expect("watch output");
        assert_eq!(line.trim(), format!("v{i}"));
        line.clear();
        executed.read_line(&mut line).expect("exec-watch output");
        assert_eq!(line.trim(), format!("set /conf/k v{i}"));
    }
    let _ = watch.kill();
    let _ = exec.kill();
    let _ = watch.wait();
    let _ = exec.wait();
}

#[test]
fn the_tree_and_its_history_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &["--enable-v2"]);
    let port = server.client_port;
    for i in 0..1100 {
        put(port, "/v2/keys/r/k", &format!("value={i}"));
    }
    put(port, "/v2/keys/r/ttl?ttl=600", "value=t");
    server.terminate();
    server.spawn();
    server.wait_ready();
    let (status, headers, body) = http_form(port, "GET", "/v2/keys/r?recursive=true", "");
    assert_eq!(status, 200, "{body}");
    let index = headers
        .iter()
        .find(|(k, _)| k == "x-etcd-index")
        .map(|(_, v)| v.clone());
    assert_eq!(index.as_deref(), Some("1101"));
    let listing = json_of(&body);
    let nodes = listing["node"]["nodes"].as_array().expect("nodes");
    assert_eq!(nodes[0]["value"], "1099");
    assert!(nodes[1]["ttl"].as_i64().is_some_and(|ttl| ttl > 590));
    // The last 1,000 events are still there for waits; older ones are cleared.
    let (status, _, body) = http_form(port, "GET", "/v2/keys/r/k?wait=true&waitIndex=500", "");
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["node"]["value"], "499");
    let (status, _, body) = http_form(port, "GET", "/v2/keys/r/k?wait=true&waitIndex=50", "");
    assert_eq!(status, 400);
    assert_eq!(json_of(&body)["errorCode"], 401);
}

/// More than `CHECKPOINT_MIN_BYTES` of sets: the journal is folded into a checkpoint on the
/// way, more sets journal after it, and a member killed with SIGKILL comes back with every
/// acknowledged set, its index and its history.
#[test]
fn the_tree_survives_a_crash_after_a_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &["--enable-v2"]);
    let port = server.client_port;
    let value = |i: usize| format!("{i:05}").repeat((64 << 10) / 5);
    // 200 sets of 64 KiB: 12.5 MiB of journal, a checkpoint at 8 MiB.
    for i in 0..200 {
        put(
            port,
            &format!("/v2/keys/c/k{}", i % 150),
            &format!("value={}", value(i)),
        );
    }
    for i in 0..20 {
        put(port, "/v2/keys/c/small", &format!("value={i}"));
    }
    let (_, _, before) = http_form(port, "GET", "/v2/keys/c?recursive=true", "");
    server.kill9();
    server.spawn();
    server.wait_ready();
    let (status, headers, after) = http_form(port, "GET", "/v2/keys/c?recursive=true", "");
    assert_eq!(status, 200);
    assert_eq!(
        headers
            .iter()
            .find(|(k, _)| k == "x-etcd-index")
            .map(|(_, v)| v.as_str()),
        Some("220")
    );
    assert!(before == after, "the tree differs after the crash");
    let listing = json_of(&after);
    let nodes = listing["node"]["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 151);
    assert_eq!(nodes[0]["value"].as_str(), Some(value(150).as_str()));
    // The history from before the checkpoint is still there.
    let (status, _, body) = http_form(port, "GET", "/v2/keys/c/k3?wait=true&waitIndex=2", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json_of(&body)["node"]["value"].as_str(),
        Some(value(3).as_str())
    );
}

/// The index every member reports for `path`'s expiry, once each has applied it.
fn expiry_index(servers: &[Server], path: &str, since: u64) -> Vec<u64> {
    servers
        .iter()
        .map(|s| {
            let (status, _, body) = http_form(
                s.client_port,
                "GET",
                &format!("/v2/keys{path}?wait=true&waitIndex={since}"),
                "",
            );
            assert_eq!(status, 200, "{body}");
            let event = json_of(&body);
            assert_eq!(event["action"], "expire", "{event}");
            event["node"]["modifiedIndex"].as_u64().expect("index")
        })
        .collect()
}

#[test]
fn three_members_expire_ttl_keys_at_the_same_index_across_a_leader_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = common::start_cluster(dir.path(), &["a", "b", "c"], &["--enable-v2"]);
    wait_until("a leader", Duration::from_secs(10), || {
        common::leader(&servers).is_some()
    });
    let leader = common::leader(&servers).expect("a leader");
    let follower = (leader + 1) % 3;
    // A write to a follower is forwarded; a quorum read on another sees it.
    let set = put(
        servers[follower].client_port,
        "/v2/keys/svc/one?ttl=3",
        "value=a",
    );
    assert!(set["node"]["ttl"].as_i64().is_some());
    let (status, _, body) = http_form(
        servers[(leader + 2) % 3].client_port,
        "GET",
        "/v2/keys/svc/one?quorum=true",
        "",
    );
    assert_eq!(status, 200, "{body}");
    let set_at = Instant::now();
    let two = put(
        servers[leader].client_port,
        "/v2/keys/svc/two?ttl=6",
        "value=b",
    );
    let since = two["node"]["modifiedIndex"].as_u64().expect("index") + 1;
    // The leader changes before either key is due.
    common::lead_elsewhere(&servers, leader, follower);
    let first = expiry_index(&servers, "/svc/one", since);
    assert!(first.iter().all(|i| *i == first[0]), "{first:?}");
    let second = expiry_index(&servers, "/svc/two", since);
    assert!(second.iter().all(|i| *i == second[0]), "{second:?}");
    assert!(second[0] > first[0]);
    // Not early: the second was due 6 s after it was set.
    assert!(
        set_at.elapsed() >= Duration::from_millis(5_900),
        "{:?}",
        set_at.elapsed()
    );
    for server in &servers {
        let (status, _, _) = http_form(server.client_port, "GET", "/v2/keys/svc/two", "");
        assert_eq!(status, 404);
    }
}

/// The members of `/v2/members` on `port`: (id, name, peer URLs).
fn v2_members(port: u16) -> Vec<(String, String, Vec<String>)> {
    let (status, _, body) = http_form(port, "GET", "/v2/members", "");
    assert_eq!(status, 200, "{body}");
    json_of(&body)["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            let urls = m["peerURLs"].as_array().expect("peerURLs");
            (
                m["id"].as_str().expect("id").to_string(),
                m["name"].as_str().expect("name").to_string(),
                urls.iter()
                    .map(|u| u.as_str().expect("url").to_string())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn three_members_add_update_and_remove_a_member_through_v2_members_and_etcdctl_v2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = common::start_cluster(dir.path(), &["a", "b", "c"], &["--enable-v2"]);
    wait_until("a leader", Duration::from_secs(10), || {
        common::leader(&servers).is_some()
    });
    let leader = common::leader(&servers).expect("a leader");
    let follower = servers[(leader + 1) % 3].client_port;
    // As etcd, a member is only added once the members there have started (published their
    // client URLs) and the leader hears from them: wait for that, as an operator would.
    wait_until("every member started", Duration::from_secs(10), || {
        let (status, _, body) = http_form(follower, "GET", "/v2/members", "");
        status == 200
            && json_of(&body)["members"].as_array().is_some_and(|members| {
                members.len() == 3
                    && members
                        .iter()
                        .all(|m| m["clientURLs"].as_array().is_some_and(|u| !u.is_empty()))
            })
    });
    let json = Some("application/json");
    // Added through a follower: forwarded to the leader, as etcd proposes it from any member.
    let (status, _, body) = common::http_request(
        follower,
        "POST",
        "/v2/members",
        json,
        r#"{"peerURLs":["http://127.0.0.9:2380"]}"#,
    );
    assert_eq!(status, 201, "{body}");
    let added = json_of(&body);
    let id = added["id"].as_str().expect("id").to_string();
    assert_eq!(added["name"], "");
    assert_eq!(added["clientURLs"], serde_json::json!([]));
    for server in &servers {
        wait_until("the added member listed", Duration::from_secs(5), || {
            v2_members(server.client_port)
                .iter()
                .any(|(m, _, urls)| *m == id && urls == &["http://127.0.0.9:2380".to_string()])
        });
    }
    // Its URLs changed through another follower, then the same URLs again: refused as taken.
    let other = servers[(leader + 2) % 3].client_port;
    let (status, _, body) = common::http_request(
        other,
        "PUT",
        &format!("/v2/members/{id}"),
        json,
        r#"{"peerURLs":["http://127.0.0.9:2381","http://127.0.0.8:2381"]}"#,
    );
    assert_eq!(status, 204, "{body}");
    wait_until("the new URLs, sorted", Duration::from_secs(5), || {
        v2_members(other).iter().any(|(m, _, urls)| {
            *m == id
                && urls
                    == &[
                        "http://127.0.0.8:2381".to_string(),
                        "http://127.0.0.9:2381".to_string(),
                    ]
        })
    });
    let (status, _, body) = common::http_request(
        follower,
        "POST",
        "/v2/members",
        json,
        r#"{"peerURLs":["http://127.0.0.8:2381"]}"#,
    );
    assert_eq!(
        (status, body.as_str()),
        (409, r#"{"message":"membership: peerURL exists"}"#)
    );
    // Removed through a follower; then it is no member.
    let (status, _, body) =
        common::http_request(follower, "DELETE", &format!("/v2/members/{id}"), None, "");
    assert_eq!(status, 204, "{body}");
    for server in &servers {
        wait_until("the member gone", Duration::from_secs(5), || {
            v2_members(server.client_port).len() == 3
        });
    }
    let (status, _, body) =
        common::http_request(follower, "DELETE", &format!("/v2/members/{id}"), None, "");
    assert_eq!(status, 404, "{body}");
    // The same through etcdctl v2, unchanged.
    if !common::etcdctl_available() {
        eprintln!("skipped the etcdctl part: etcdctl is not installed (ci/test installs it)");
        return;
    }
    let out = etcdctl_v2(follower)
        .args(["member", "add", "d", "http://127.0.0.7:2380"])
        .output()
        .expect("etcdctl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("Added member named d with ID "), "{text}");
    assert!(
        text.contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""),
        "{text}"
    );
    let id = text
        .trim_start_matches("Added member named d with ID ")
        .split_whitespace()
        .next()
        .expect("an ID")
        .to_string();
    let out = etcdctl_v2(follower)
        .args(["member", "update", &id, "http://127.0.0.7:2381"])
        .output()
        .expect("etcdctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = etcdctl_v2(follower)
        .args(["member", "list"])
        .output()
        .expect("etcdctl");
    let list = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        list.contains(&format!("{id}[unstarted]: peerURLs=http://127.0.0.7:2381")),
        "{list}"
    );
    let out = etcdctl_v2(follower)
        .args(["member", "remove", &id])
        .output()
        .expect("etcdctl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(text.trim(), format!("Removed member {id} from cluster"));
    assert_eq!(v2_members(follower).len(), 3);
}
