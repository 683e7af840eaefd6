//! The v2 keys API (`--enable-v2`), checked against etcd 3.4's answers to the same requests.
//!
//! The answers etcd 3.4.23 gave are recorded in `tests/fixtures/v2_keys_etcd_3.4.json`. To
//! record them again (Debian's `etcd-server` installed): `V2_RECORD_FIXTURES=1 cargo test
//! --release --test v2 v2_keys_answer_as_etcd_3_4_answered`.
//!
//! etcd's store index starts after its own membership writes (3 on one member) and quorumkv's
//! at 0, so indexes are compared from the index each store had before the first request.

mod common;

use std::time::Duration;

use common::{http_form, Etcd, Server};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const FIXTURES: &str = "tests/fixtures/v2_keys_etcd_3.4.json";

/// A request: method, path and query (`{i+N}`: the first index plus N), form body; then a
/// pause before the next.
struct Step(&'static str, &'static str, &'static str, u64);

const STEPS: &[Step] = &[
    Step("GET", "/v2/keys/", "", 0),
    // The seeds' first examples.
    Step("PUT", "/v2/keys/message", "value=Hello%20world", 0),
    Step("GET", "/v2/keys/message", "", 0),
    Step("PUT", "/v2/keys/message", "value=Hello%20etcd", 0),
    Step("DELETE", "/v2/keys/message", "", 0),
    Step("GET", "/v2/keys/message", "", 0),
    // TTLs: set, cleared with `ttl=`, refreshed.
    Step("PUT", "/v2/keys/foo?ttl=50", "value=bar", 0),
    Step("PUT", "/v2/keys/foo", "value=bar&ttl=", 0),
    Step(
        "PUT",
        "/v2/keys/foo?ttl=20&refresh=true&prevExist=true",
        "",
        0,
    ),
    Step("PUT", "/v2/keys/foo?ttl=20&refresh=true", "value=x", 0),
    Step("PUT", "/v2/keys/foo?refresh=true", "", 0),
    // Conditions.
    Step("PUT", "/v2/keys/foo?prevExist=false", "value=three", 0),
    Step("PUT", "/v2/keys/foo?prevValue=two", "value=three", 0),
    Step("PUT", "/v2/keys/foo?prevValue=bar", "value=three", 0),
    Step("PUT", "/v2/keys/foo?prevIndex={i+7}", "value=four", 0),
    Step("PUT", "/v2/keys/foo?prevIndex=1", "value=five", 0),
    Step(
        "PUT",
        "/v2/keys/foo?prevIndex=1&prevValue=nope",
        "value=five",
        0,
    ),
    Step("PUT", "/v2/keys/nokey?prevExist=true", "value=five", 0),
    Step("DELETE", "/v2/keys/foo?prevValue=wrong", "", 0),
    Step("DELETE", "/v2/keys/foo?prevIndex={i+8}", "", 0),
    // Directories, in-order keys, hidden keys.
    Step("PUT", "/v2/keys/dir?dir=true", "", 0),
    Step("PUT", "/v2/keys/dir?dir=true", "", 0),
    Step("POST", "/v2/keys/queue", "value=Job1", 0),
    Step("POST", "/v2/keys/queue", "value=Job2", 0),
    Step("GET", "/v2/keys/queue?recursive=true&sorted=true", "", 0),
    Step("PUT", "/v2/keys/dir/_hidden", "value=secret", 0),
    Step("PUT", "/v2/keys/dir/shown", "value=1", 0),
    Step("PUT", "/v2/keys/dir/sub/deep", "value=2", 0),
    Step("GET", "/v2/keys/dir", "", 0),
    Step("GET", "/v2/keys/dir?recursive=true", "", 0),
    Step("GET", "/v2/keys/dir/_hidden", "", 0),
    Step("DELETE", "/v2/keys/dir", "", 0),
    Step("DELETE", "/v2/keys/dir?dir=true", "", 0),
    Step("DELETE", "/v2/keys/dir?recursive=true", "", 0),
    Step("GET", "/v2/keys/dir", "", 0),
    Step("PUT", "/v2/keys/empty?dir=true", "", 0),
    Step("DELETE", "/v2/keys/empty?dir=true", "", 0),
    // What is in the way.
    Step("PUT", "/v2/keys/a/b", "value=1", 0),
    Step("PUT", "/v2/keys/a/b/c", "value=1", 0),
    Step("POST", "/v2/keys/a/b/c", "value=1", 0),
    Step("GET", "/v2/keys/a/b/c", "", 0),
    Step("PUT", "/v2/keys/a", "value=1", 0),
    Step("PUT", "/v2/keys/", "value=1", 0),
    Step("DELETE", "/v2/keys/", "", 0),
    // Directory updates and TTLs.
    Step("PUT", "/v2/keys/tdir?dir=true&ttl=100", "", 0),
    Step("PUT", "/v2/keys/tdir?dir=true&prevExist=true", "", 0),
    Step("PUT", "/v2/keys/tdir?prevExist=true", "value=x", 0),
    // Bad requests.
    Step("GET", "/v2/keys/a?recursive=maybe", "", 0),
    Step("PUT", "/v2/keys/a/b?ttl=abc", "value=1", 0),
    Step("PUT", "/v2/keys/a/b?prevIndex=x", "value=1", 0),
    Step("PUT", "/v2/keys/a/b?prevValue=", "value=1", 0),
    Step("GET", "/v2/keys/a/b?wait=true&waitIndex=x", "", 0),
    Step("PUT", "/v2/keys/a/b?wait=true", "value=1", 0),
    Step("PUT", "/v2/keys/a/b?prevExist=maybe", "value=1", 0),
    Step("PATCH", "/v2/keys/a/b", "value=1", 0),
    // Options.
    Step("PUT", "/v2/keys/nv?noValueOnSuccess=true", "value=1", 0),
    Step("GET", "/v2/keys/a/b?quorum=true", "", 0),
    Step("GET", "/v2/keys/a?recursive=true&quorum=true", "", 0),
    Step("HEAD", "/v2/keys/a/b", "", 0),
    Step("GET", "/v2/keys/a/b?wait=true&waitIndex={i+1}", "", 0),
    Step(
        "GET",
        "/v2/keys/a?wait=true&recursive=true&waitIndex={i+19}",
        "",
        0,
    ),
    Step(
        "GET",
        "/v2/keys/?wait=true&recursive=true&waitIndex=1",
        "",
        0,
    ),
    // A key that expires, and the wait that finds its expiry.
    Step("PUT", "/v2/keys/short?ttl=1", "value=x", 2_500),
    Step("GET", "/v2/keys/short", "", 0),
    Step("GET", "/v2/keys/short?wait=true&waitIndex={i+24}", "", 0),
    Step("GET", "/v2/keys/?recursive=true", "", 0),
    Step("PUT", "/v2/keys/a/../a/./b", "value=2", 0),
];

/// The answers to `STEPS` from the member on `port`.
fn answers(port: u16) -> Vec<Value> {
    let base = first_index(port);
    STEPS
        .iter()
        .map(|Step(method, template, form, pause_ms)| {
            let answer = ask(port, base, method, template, form);
            std::thread::sleep(Duration::from_millis(*pause_ms));
            answer
        })
        .collect()
}

/// `template` with each `{i+N}` replaced by the index `base + N`.
fn fill(template: &str, base: u64) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(at) = rest.find("{i+") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 3..];
        let end = after.find('}').expect("a closed {i+N}");
        let n: u64 = after[..end].parse().expect("{i+N} names a number");
        out.push_str(&(base + n).to_string());
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The store's index before the first request (`X-Etcd-Index` of a read of the root).
fn first_index(port: u16) -> u64 {
    let (_, headers, _) = http_form(port, "GET", "/v2/keys/", "");
    header(&headers, "x-etcd-index")
        .and_then(|v| v.parse().ok())
        .expect("X-Etcd-Index")
}

/// One request (`{i+N}` in `template` named as the index `base + N`) and its answer, with
/// indexes counted from `base` and what depends on the clock or the server left out.
fn ask(port: u16, base: u64, method: &str, template: &str, form: &str) -> Value {
    let (status, headers, body) = http_form(port, method, &fill(template, base), form);
    let mut answer = serde_json::json!({
        "request": format!("{method} {template} {form}"),
        "status": status,
        "content-type": header(&headers, "content-type"),
        "x-etcd-index": header(&headers, "x-etcd-index")
            .and_then(|v| v.parse::<u64>().ok())
            .map(|i| i.saturating_sub(base)),
        "x-raft-index": header(&headers, "x-raft-index").is_some(),
        "x-raft-term": header(&headers, "x-raft-term").is_some(),
        "x-etcd-cluster-id": header(&headers, "x-etcd-cluster-id").is_some(),
        "allow": header(&headers, "allow"),
        "body": serde_json::from_str::<Value>(&body).unwrap_or(Value::String(body)),
    });
    normalize(&mut answer["body"], base);
    answer
}

fn header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// Indexes counted from `base`; expiry times and TTLs that depend on the clock reduced to
/// whether they are there; listings in key order (etcd's unsorted order is any order).
fn normalize(value: &mut Value, base: u64) {
    let shift = |n: u64| n.saturating_sub(base);
    match value {
        Value::Object(fields) => {
            for (name, field) in fields.iter_mut() {
                match (name.as_str(), &field) {
                    ("modifiedIndex" | "createdIndex", Value::Number(n)) => {
                        *field = shift(n.as_u64().unwrap_or(0)).into()
                    }
                    ("index", Value::Number(n)) if n.as_u64() != Some(0) => {
                        *field = shift(n.as_u64().unwrap_or(0)).into()
                    }
                    ("expiration", _) => *field = "<time>".into(),
                    ("ttl", Value::Number(n)) => {
                        assert!(n.as_i64().unwrap_or(0) > 0, "a TTL left: {n}");
                        *field = "<ttl>".into();
                    }
                    ("key", Value::String(key)) => *field = in_order_key(key, base).into(),
                    ("cause", Value::String(cause)) => *field = indexes_in(cause, base).into(),
                    _ => normalize(field, base),
                }
            }
        }
        Value::Array(items) => {
            for item in items.iter_mut() {
                normalize(item, base);
            }
            items.sort_by_key(|item| item["key"].as_str().unwrap_or_default().to_string());
        }
        _ => {}
    }
}

/// An in-order key's name (20 digits: its created index) counted from `base`.
fn in_order_key(key: &str, base: u64) -> String {
    match key.rsplit_once('/') {
        Some((dir, name)) if name.len() == 20 && name.bytes().all(|b| b.is_ascii_digit()) => {
            let index: u64 = name.parse().unwrap_or(0);
            format!("{dir}/{:020}", index.saturating_sub(base))
        }
        _ => key.to_string(),
    }
}

/// The indexes in a cause (`[3 != 1011]`, `[12/2]`) counted from `base`; values compared
/// as strings are not numbers in these steps.
fn indexes_in(cause: &str, base: u64) -> String {
    let mut out = String::new();
    let mut number = String::new();
    for c in cause.chars().chain(std::iter::once('\0')) {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        if !number.is_empty() {
            let n: u64 = number.parse().unwrap_or(0);
            out.push_str(&if n > base { n - base } else { n }.to_string());
            number.clear();
        }
        if c != '\0' {
            out.push(c);
        }
    }
    out
}

/// With `V2_RECORD_FIXTURES` set, records what etcd 3.4 (`--enable-v2`) answers into
/// `fixtures`; otherwise compares quorumkv's answers with the recorded ones, one by one.
/// `answers` is given the member's client and peer ports.
fn compare_with_recorded(fixtures: &str, answers: impl Fn(u16, u16) -> Vec<Value>) {
    let dir = tempfile::tempdir().expect("tempdir");
    if std::env::var("V2_RECORD_FIXTURES").is_ok() {
        assert!(
            Etcd::available(),
            "recording needs etcd 3.4 (Debian's etcd-server)"
        );
        let etcd = Etcd::start_with(dir.path(), &["--enable-v2"]);
        let recorded = answers(etcd.port, etcd.peer_port);
        let text = serde_json::to_string_pretty(&recorded).expect("json") + "\n";
        std::fs::write(fixtures, text).expect("write the fixtures");
        return;
    }
    let text = std::fs::read_to_string(fixtures).expect("the recorded fixtures");
    let expected: Vec<Value> = serde_json::from_str(&text).expect("fixtures are JSON");
    let server = Server::start(dir.path(), &["--enable-v2"]);
    let ours = answers(server.client_port, server.peer_port);
    assert_eq!(
        expected.len(),
        ours.len(),
        "fixtures recorded for other steps"
    );
    let mut differences = Vec::new();
    for (theirs, ours) in expected.iter().zip(&ours) {
        for name in ["request", "command"] {
            assert_eq!(
                theirs[name], ours[name],
                "fixtures recorded for other steps: record them again"
            );
        }
        if theirs != ours {
            differences.push(format!("etcd:     {theirs}\nquorumkv: {ours}"));
        }
    }
    assert!(
        differences.is_empty(),
        "{} of {} answers differ from etcd 3.4's:\n{}",
        differences.len(),
        expected.len(),
        differences.join("\n")
    );
}

#[test]
fn v2_keys_answer_as_etcd_3_4_answered() {
    compare_with_recorded(FIXTURES, |port, _| answers(port));
}

/// The paths of the random requests: a small tree, so that they meet (a file where a directory
/// is wanted, a directory with children, a hidden name, the root).
const RANDOM_PATHS: &[&str] = &["/", "/a", "/a/b", "/a/b/c", "/a/_h", "/d", "/d/e", "/q"];
const RANDOM_VALUES: &[&str] = &["x", "y", "hello%20world", ""];

/// A random keys request: method, path and query (indexes as `{i+N}`), form body. `current`
/// is the store's index before it, counted from the first.
fn random_request(rng: &mut StdRng, current: u64) -> (&'static str, String, String) {
    let mut path = RANDOM_PATHS[rng.gen_range(0..RANDOM_PATHS.len())];
    let (mut query, mut form): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
    let index = |rng: &mut StdRng| format!("{{i+{}}}", rng.gen_range(1..=current.max(1)));
    let value = |rng: &mut StdRng| RANDOM_VALUES[rng.gen_range(0..RANDOM_VALUES.len())];
    let method = match rng.gen_range(0..100) {
        0..=39 => "PUT",
        40..=64 => "GET",
        65..=84 => "DELETE",
        _ => "POST",
    };
    match method {
        "PUT" | "POST" => {
            if rng.gen_bool(0.8) {
                form.push(format!("value={}", value(rng)));
            }
            if method == "PUT" && rng.gen_bool(0.15) {
                form.push("dir=true".into());
            }
            // Long enough not to expire within a run; `ttl=` clears one.
            match rng.gen_range(0..20) {
                0..=3 => form.push("ttl=1000".into()),
                4 => form.push("ttl=".into()),
                5 => form.push("ttl=abc".into()),
                _ => {}
            }
            if method == "PUT" {
                match rng.gen_range(0..12) {
                    0 => form.push("prevExist=true".into()),
                    1 => form.push("prevExist=false".into()),
                    2 => form.push(format!("prevValue={}", value(rng))),
                    3 => query.push(format!("prevIndex={}", index(rng))),
                    4 => {
                        form.push(format!("prevValue={}", value(rng)));
                        query.push(format!("prevIndex={}", index(rng)));
                    }
                    5 => {
                        form.push("refresh=true".into());
                        form.push("prevExist=true".into());
                    }
                    _ => {}
                }
            }
        }
        "GET" => {
            for (field, p) in [("recursive", 0.4), ("sorted", 0.3), ("quorum", 0.2)] {
                if rng.gen_bool(p) {
                    query.push(format!("{field}=true"));
                }
            }
            // A wait from an index the store has passed answers at once, from the history:
            // the root watched recursively has an event at every index.
            if current > 0 && rng.gen_bool(0.15) {
                path = "/";
                query = vec![
                    "wait=true".into(),
                    "recursive=true".into(),
                    format!("waitIndex={}", index(rng)),
                ];
            }
        }
        _ => {
            for (field, p) in [("dir", 0.3), ("recursive", 0.3)] {
                if rng.gen_bool(p) {
                    query.push(format!("{field}=true"));
                }
            }
            match rng.gen_range(0..8) {
                0 => query.push(format!("prevValue={}", value(rng))),
                1 => query.push(format!("prevIndex={}", index(rng))),
                _ => {}
            }
        }
    }
    let path = if query.is_empty() {
        format!("/v2/keys{path}")
    } else {
        format!("/v2/keys{path}?{}", query.join("&"))
    };
    (method, path, form.join("&"))
}

/// Random keys requests, the same ones to etcd 3.4 (`--enable-v2`) and to quorumkv, both
/// live, each answer compared as the recorded ones are (status, content type, the store's
/// index, the body). `V2_CONFORMANCE_SEED` and `V2_CONFORMANCE_REQUESTS` (1 and 1,500 by
/// default) explore further.
#[test]
fn v2_random_requests_answer_as_etcd_3_4() {
    if !Etcd::available() {
        eprintln!("SKIPPED: etcd 3.4 (Debian's etcd-server) is needed");
        return;
    }
    let seed = common::setting("V2_CONFORMANCE_SEED", 1u64);
    let requests = common::setting("V2_CONFORMANCE_REQUESTS", 1500u64);
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start_with(dir.path(), &["--enable-v2"]);
    let server = Server::start(dir.path(), &["--enable-v2"]);
    let (their_base, our_base) = (first_index(etcd.port), first_index(server.client_port));
    let mut rng = StdRng::seed_from_u64(seed);
    let mut current = 0;
    let mut differences = Vec::new();
    let mut tally = std::collections::BTreeMap::new();
    for sent in 1..=requests {
        let (method, template, form) = random_request(&mut rng, current);
        let theirs = ask(etcd.port, their_base, method, &template, &form);
        let ours = ask(server.client_port, our_base, method, &template, &form);
        if let Some(index) = theirs["x-etcd-index"].as_u64() {
            current = current.max(index);
        }
        let status = theirs["status"].as_u64().unwrap_or(0);
        *tally.entry((method, status)).or_insert(0usize) += 1;
        if theirs != ours {
            differences.push(format!(
                "request {sent} (seed {seed}):\netcd:     {theirs}\nquorumkv: {ours}"
            ));
            if differences.len() >= 20 {
                break;
            }
        }
    }
    eprintln!(
        "v2 conformance: seed {seed}: {requests} requests, store index {current}, {} differences",
        differences.len()
    );
    for ((method, status), n) in &tally {
        eprintln!("  {method:<7} {status}  {n:>5}");
    }
    assert!(
        differences.is_empty(),
        "{} answers differ from etcd 3.4's:\n{}",
        differences.len(),
        differences.join("\n")
    );
}

const ETCDCTL_FIXTURES: &str = "tests/fixtures/v2_etcdctl_etcd_3.4.json";

/// etcdctl v2 commands, as the seeds' examples run them.
const COMMANDS: &[&[&str]] = &[
    &["set", "/dir/key", "Hello world"],
    &["get", "/dir/key"],
    &["set", "/dir/key2", "v", "--ttl", "60"],
    &["set", "/dir/key", "new", "--swap-with-value", "Hello world"],
    &["set", "/dir/key", "x", "--swap-with-value", "nope"],
    &["set", "/dir/key", "x", "--swap-with-index", "1"],
    &["update", "/dir/key", "upd"],
    &["update", "/nokey", "x"],
    &["mk", "/dir/mk", "v"],
    &["mk", "/dir/mk", "v"],
    &["mk", "--in-order", "/queue", "job1"],
    &["mkdir", "/newdir"],
    &["mkdir", "/newdir"],
    &["setdir", "/sd"],
    &["updatedir", "/sd", "--ttl", "100"],
    &["ls"],
    &["ls", "--recursive", "--sort", "/"],
    &["ls", "-p", "/dir"],
    &["get", "/nope"],
    &["get", "/dir"],
    &["rm", "/dir/mk"],
    &["rm", "/dir"],
    &["rm", "/dir", "--recursive"],
    &["rmdir", "/newdir"],
    &["rm", "--dir", "/sd"],
    &["set", "/x", "1"],
    &["rm", "/x", "--with-value", "2"],
    &["rm", "/x", "--with-index", "1"],
    &["rm", "/x", "--with-value", "1"],
    &["-o", "json", "set", "/j", "v"],
    &["-o", "extended", "get", "/j"],
    &["watch", "/dir/key", "--after-index", "{i+1}"],
    &["member", "list"],
    &["cluster-health"],
];

fn etcdctl_v2(endpoint: &str, args: &[String]) -> std::process::Output {
    std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "2")
        .arg("--endpoints")
        .arg(endpoint)
        .args(args)
        .output()
        .expect("etcdctl is needed: apt-get install etcd-client (ci/test does)")
}

/// Each command's exit code and output, the member's id, URLs and indexes normalized.
fn etcdctl_answers(port: u16, member_id: &str) -> Vec<Value> {
    let (_, headers, _) = http_form(port, "GET", "/v2/keys/", "");
    let base: u64 = header(&headers, "x-etcd-index")
        .and_then(|v| v.parse().ok())
        .expect("X-Etcd-Index");
    let endpoint = format!("http://127.0.0.1:{port}");
    COMMANDS
        .iter()
        .map(|command| {
            let args: Vec<String> = command
                .iter()
                .map(|a| a.replace("{i+1}", &(base + 1).to_string()))
                .collect();
            let out = etcdctl_v2(&endpoint, &args);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let mut lines: Vec<String> = text
                .lines()
                .map(|line| normalize_line(line, base, port, member_id))
                .collect();
            if command[0] == "ls" {
                lines.sort(); // etcd lists in no order without --sort
            }
            serde_json::json!({
                "command": command.join(" "),
                "code": out.status.code(),
                "output": lines,
            })
        })
        .collect()
}

/// A line of etcdctl's output with the member's id, its URLs' ports, indexes (from `base`)
/// and expiry times made comparable.
fn normalize_line(line: &str, base: u64, port: u16, member_id: &str) -> String {
    let mut line = line.replace(member_id, "<id>");
    line = line.replace(&port.to_string(), "<port>");
    // Peer ports differ too.
    while let Some(at) = line.find("127.0.0.1:").filter(|at| {
        line[at + 10..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    }) {
        let rest: String = line[at + 10..]
            .chars()
            .skip_while(char::is_ascii_digit)
            .collect();
        line = format!("{}127.0.0.1:<peer>{rest}", &line[..at]);
    }
    if let Ok(mut value) = serde_json::from_str::<Value>(&line) {
        normalize(&mut value, base);
        return value.to_string();
    }
    for field in ["Created-Index: ", "Modified-Index: ", "Index: "] {
        if let Some(n) = line.strip_prefix(field).and_then(|n| n.parse::<u64>().ok()) {
            return format!("{field}{}", n.saturating_sub(base));
        }
    }
    if line.starts_with("TTL: ") {
        return "TTL: <ttl>".into();
    }
    // `Error:  101: Compare failed ([1 != 1011]) [1011]`: the cause's and the index's numbers.
    if let Some((head, tail)) = line.split_once(" (").filter(|_| line.starts_with("Error:")) {
        return format!("{head} ({}", indexes_in(tail, base));
    }
    line.split(' ')
        .map(|word| in_order_key(word, base))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The member id `/v2/members` names first.
fn first_member_id(port: u16) -> String {
    let (_, _, body) = http_form(port, "GET", "/v2/members", "");
    let members: Value = serde_json::from_str(&body).expect("members JSON");
    members["members"][0]["id"]
        .as_str()
        .expect("an id")
        .to_string()
}

#[test]
fn etcdctl_v2_commands_answer_as_with_etcd_3_4() {
    if !common::etcdctl_available() {
        eprintln!("skipped: etcdctl is not installed (ci/test installs it)");
        return;
    }
    compare_with_recorded(ETCDCTL_FIXTURES, |port, _| {
        etcdctl_answers(port, &first_member_id(port))
    });
}

const MEMBER_FIXTURES: &str = "tests/fixtures/v2_members_etcd_3.4.json";

/// Member requests on one member: method, path (`{self}`: its ID), content type, body
/// (`{peer}`: its peer URL). The add comes last: a second voter that never starts leaves the
/// member without a quorum, as it leaves etcd.
const MEMBER_STEPS: &[(&str, &str, &str, &str)] = &[
    ("GET", "/v2/members", "", ""),
    ("GET", "/v2/members/", "", ""),
    ("GET", "/v2/members/{self}", "", ""),
    ("GET", "/v2/members/leader", "", ""),
    (
        "POST",
        "/v2/members",
        "application/x-www-form-urlencoded",
        "x",
    ),
    ("POST", "/v2/members", "application/json", "x"),
    ("POST", "/v2/members", "application/json", ""),
    (
        "POST",
        "/v2/members",
        "application/json",
        r#"{"peerURLs":["foo"]}"#,
    ),
    (
        "POST",
        "/v2/members",
        "application/json",
        r#"{"peerURLs":["http://127.0.0.1"]}"#,
    ),
    (
        "POST",
        "/v2/members",
        "application/json",
        r#"{"peerURLs":["http://127.0.0.1:1/x"]}"#,
    ),
    ("POST", "/v2/members", "application/json", "{}"),
    (
        "POST",
        "/v2/members",
        "application/json",
        r#"{"peerURLs":[]}"#,
    ),
    (
        "POST",
        "/v2/members",
        "application/json",
        r#"{"peerURLs":"x"}"#,
    ),
    (
        "POST",
        "/v2/members",
        "application/json",
        r#"{"peerURLs":["http://127.0.0.1:1",2]}"#,
    ),
    (
        "POST",
        "/v2/members",
        "application/json; charset=utf-8",
        r#"{"peerURLs":["foo"]}"#,
    ),
    (
        "POST",
        "/v2/members",
        "text/plain",
        r#"{"peerURLs":["foo"]}"#,
    ),
    (
        "POST",
        "/v2/members",
        "application/json",
        r#"{"peerURLs":["{peer}"]}"#,
    ),
    (
        "PUT",
        "/v2/members/1234",
        "application/json",
        r#"{"peerURLs":["http://127.0.0.1:2"]}"#,
    ),
    (
        "PUT",
        "/v2/members/zz",
        "application/json",
        r#"{"peerURLs":["http://127.0.0.1:2"]}"#,
    ),
    ("PUT", "/v2/members/{self}", "application/json", "x"),
    (
        "PUT",
        "/v2/members/{self}",
        "application/x-www-form-urlencoded",
        "{}",
    ),
    (
        "PUT",
        "/v2/members/{self}",
        "application/json",
        r#"{"peerURLs":["foo"]}"#,
    ),
    (
        "PUT",
        "/v2/members/{self}",
        "application/json",
        r#"{"peerURLs":["http://127.0.0.2:2","{peer}"]}"#,
    ),
    ("GET", "/v2/members", "", ""),
    (
        "PUT",
        "/v2/members/{self}",
        "application/json",
        r#"{"peerURLs":["{peer}"]}"#,
    ),
    ("GET", "/v2/members", "", ""),
    (
        "PUT",
        "/v2/members",
        "application/json",
        r#"{"peerURLs":["{peer}"]}"#,
    ),
    ("DELETE", "/v2/members", "", ""),
    ("PATCH", "/v2/members", "", ""),
    ("DELETE", "/v2/members/1234", "", ""),
    ("DELETE", "/v2/members/zz", "", ""),
    ("DELETE", "/v2/members/{self}", "", ""),
    (
        "POST",
        "/v2/members",
        "application/json",
        r#"{"peerURLs":["http://127.0.0.1:3"]}"#,
    ),
    ("GET", "/v2/members", "", ""),
];

/// The answers to `MEMBER_STEPS` from the member with client port `port` and peer port
/// `peer_port`: its own ID, ports and the added member's ID written as names, member lists in
/// ID order after that.
fn member_answers(port: u16, peer_port: u16) -> Vec<Value> {
    let own = first_member_id(port);
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut added: Option<String> = None;
    MEMBER_STEPS
        .iter()
        .map(|(method, template, content_type, body)| {
            let path = template.replace("{self}", &own);
            let sent = body.replace("{peer}", &peer);
            let content_type = (!content_type.is_empty()).then_some(*content_type);
            let (status, headers, text) =
                common::http_request(port, method, &path, content_type, &sent);
            if status == 201 {
                let member: Value = serde_json::from_str(&text).expect("the added member");
                added = member["id"].as_str().map(str::to_string);
            }
            let mut named = text
                .replace(&own, "<self>")
                .replace(&peer, "<peer>")
                .replace(&format!(":{port}"), ":<client>");
            if let Some(added) = &added {
                named = named.replace(added.as_str(), "<added>");
            }
            let mut parsed =
                serde_json::from_str::<Value>(&named).unwrap_or(Value::String(named.clone()));
            if let Some(members) = parsed.get_mut("members").and_then(Value::as_array_mut) {
                members.sort_by_key(|m| m["id"].as_str().unwrap_or_default().to_string());
            }
            serde_json::json!({
                "request": format!("{method} {template} {content_type:?} {body}"),
                "status": status,
                "content-type": header(&headers, "content-type"),
                "allow": header(&headers, "allow"),
                "x-content-type-options": header(&headers, "x-content-type-options"),
                "x-etcd-cluster-id": header(&headers, "x-etcd-cluster-id").is_some(),
                "access-control-allow-origin": header(&headers, "access-control-allow-origin"),
                "body": parsed,
                "ends-with-newline": named.ends_with('\n'),
            })
        })
        .collect()
}

#[test]
fn v2_member_changes_answer_as_etcd_3_4_answered() {
    compare_with_recorded(MEMBER_FIXTURES, member_answers);
}

/// With v3 auth on, etcd 3.4 refuses every member change through the v2 API (it carries no
/// v3 user): the same requests to both, with auth enabled through etcdctl, answer alike.
#[test]
fn v2_member_changes_with_auth_on_answer_as_etcd_3_4() {
    if !Etcd::available() || !common::etcdctl_available() {
        eprintln!("SKIPPED: etcd and etcdctl (Debian's etcd-server and etcd-client) are needed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start_with(dir.path(), &["--enable-v2"]);
    let server = Server::start(dir.path(), &["--enable-v2"]);
    let json = Some("application/json");
    let steps: &[(&str, &str, Option<&str>, &str)] = &[
        ("GET", "/v2/members", None, ""),
        (
            "POST",
            "/v2/members",
            json,
            r#"{"peerURLs":["http://127.0.0.1:3"]}"#,
        ),
        ("POST", "/v2/members", json, r#"{"peerURLs":["foo"]}"#),
        (
            "PUT",
            "/v2/members/1234",
            json,
            r#"{"peerURLs":["http://127.0.0.1:3"]}"#,
        ),
        ("DELETE", "/v2/members/1234", None, ""),
    ];
    let answers = |port: u16| -> Vec<(u16, String)> {
        let endpoint = format!("http://127.0.0.1:{port}");
        for args in [&["user", "add", "root:pw"][..], &["auth", "enable"]] {
            let out = common::etcdctl(&endpoint, args);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        steps
            .iter()
            .map(|(method, path, content_type, body)| {
                let (status, _, text) =
                    common::http_request(port, method, path, *content_type, body);
                let text = if *method == "GET" {
                    String::new()
                } else {
                    text
                };
                (status, text)
            })
            .collect()
    };
    assert_eq!(answers(server.client_port), answers(etcd.port));
}
