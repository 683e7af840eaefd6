//! The JSON gateway on the client port, over plain HTTP/1.1 as curl speaks it: KV, txn, leases,
//! watch (streamed JSON lines), locks, and etcd's error bodies; gRPC keeps working on the same
//! port.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{etcdctl, ok, value_of, Server};
use serde_json::Value;

/// `POST path` with `body` over HTTP/1.1: the status and the JSON answer.
fn post(server: &Server, path: &str, body: &str) -> (u16, Value) {
    common::http_post(server.client_port, path, body, "")
}

fn b64(s: &str) -> String {
    const TABLE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | *b as u32) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn curl_style_json_put_range_txn_delete_and_compaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let (status, put) = post(
        &server,
        "/v3/kv/put",
        &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("foo"), b64("bar")),
    );
    assert_eq!(status, 200);
    assert_eq!(
        put["header"]["revision"], "2",
        "int64 as a string, as etcd's gateway"
    );
    assert_eq!(
        value_of(&server.endpoint(), "foo"),
        "bar",
        "gRPC on the same port sees it"
    );
    let (_, range) = post(
        &server,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}"}}"#, b64("foo")),
    );
    assert_eq!(range["kvs"][0]["value"], b64("bar"));
    assert_eq!(range["count"], "1");
    let txn = format!(
        r#"{{"compare":[{{"key":"{k}","target":"VALUE","result":"EQUAL","value":"{v}"}}],
            "success":[{{"request_put":{{"key":"{k}","value":"{n}"}}}}]}}"#,
        k = b64("foo"),
        v = b64("bar"),
        n = b64("baz")
    );
    let (_, txn) = post(&server, "/v3/kv/txn", &txn);
    assert_eq!(txn["succeeded"], true);
    assert_eq!(value_of(&server.endpoint(), "foo"), "baz");
    let (_, deleted) = post(
        &server,
        "/v3/kv/deleterange",
        &format!(r#"{{"key":"{}","prev_kv":true}}"#, b64("foo")),
    );
    assert_eq!(deleted["deleted"], "1");
    assert_eq!(deleted["prev_kvs"][0]["value"], b64("baz"));
    let (status, _) = post(&server, "/v3/kv/compaction", r#"{"revision":"3"}"#);
    assert_eq!(status, 200);
    let (status, compacted) = post(
        &server,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}","revision":"2"}}"#, b64("foo")),
    );
    assert_eq!(status, 400);
    assert_eq!(compacted["code"], 11);
    assert_eq!(
        compacted["error"],
        "etcdserver: mvcc: required revision has been compacted"
    );
}

#[test]
fn bad_json_is_a_400_with_a_json_error_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let (status, err) = post(&server, "/v3/kv/put", r#"{"key":"#);
    assert_eq!(status, 400);
    assert_eq!(err["code"], 3);
    assert!(err["error"]
        .as_str()
        .is_some_and(|e| e.starts_with("malformed JSON request")));
    let (status, _) = post(&server, "/v3/kv/put", r#"{"key":"not base64!"}"#);
    assert_eq!(status, 400);
    let (status, err) = post(&server, "/v3/lease/revoke", r#"{"ID":"123"}"#);
    assert_eq!((status, err["code"].clone()), (404, Value::from(5)));
    assert_eq!(err["error"], "etcdserver: requested lease not found");
    assert_eq!(
        ok(etcdctl(&server.endpoint(), &["get", "", "--from-key"])),
        ""
    );
}

#[test]
fn json_leases_and_locks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let (_, granted) = post(&server, "/v3/lease/grant", r#"{"TTL":"60"}"#);
    let id = granted["ID"].as_str().expect("ID").to_string();
    assert_eq!(granted["TTL"], "60");
    let (_, ttl) = post(
        &server,
        "/v3/lease/timetolive",
        &format!(r#"{{"ID":"{id}"}}"#),
    );
    assert_eq!(ttl["grantedTTL"], "60");
    let (_, leases) = post(&server, "/v3/lease/leases", "{}");
    assert_eq!(leases["leases"][0]["ID"], Value::from(id.clone()));
    let (_, locked) = post(
        &server,
        "/v3/lock/lock",
        &format!(r#"{{"name":"{}","lease":"{id}"}}"#, b64("jobs")),
    );
    let key = locked["key"].as_str().expect("key").to_string();
    let (status, _) = post(&server, "/v3/lock/unlock", &format!(r#"{{"key":"{key}"}}"#));
    assert_eq!(status, 200);
    let (status, _) = post(&server, "/v3/lease/revoke", &format!(r#"{{"ID":"{id}"}}"#));
    assert_eq!(status, 200);
    let (_, gone) = post(
        &server,
        "/v3/lease/timetolive",
        &format!(r#"{{"ID":"{id}"}}"#),
    );
    assert_eq!(gone["TTL"], "-1");
}

#[test]
fn json_watch_streams_the_created_answer_then_events_as_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut stream = TcpStream::connect(("127.0.0.1", server.client_port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let body = format!(r#"{{"create_request":{{"key":"{}"}}}}"#, b64("w"));
    write!(
        stream,
        "POST /v3/watch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut reader = BufReader::new(stream);
    let mut json_lines = Vec::new();
    let mut put_done = false;
    while json_lines.len() < 2 {
        let mut line = String::new();
        reader.read_line(&mut line).expect("read");
        if let Some(json) = line
            .trim()
            .strip_prefix('{')
            .map(|rest| format!("{{{rest}"))
        {
            json_lines.push(serde_json::from_str::<Value>(&json).expect("json line"));
            if !put_done {
                ok(etcdctl(&server.endpoint(), &["put", "w", "1"]));
                put_done = true;
            }
        }
    }
    assert_eq!(json_lines[0]["result"]["created"], true);
    let event = &json_lines[1]["result"]["events"][0];
    assert_eq!(event["kv"]["key"], b64("w"));
    assert_eq!(event["kv"]["value"], b64("1"));
}
