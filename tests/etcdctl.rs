//! etcdctl 3.4 (Debian's etcd-client) against a real quorumkv process: the commands operators
//! run, with their output asserted.

mod common;

use common::{etcdctl, etcdctl_stdin, fails, ok, Server};

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

#[test]
fn etcdctl_put_get_range_and_options() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    for (k, v) in [
        ("foo", "bar"),
        ("foo/a", "1"),
        ("foo/b", "22"),
        ("fop", "3"),
        ("zed", "last"),
    ] {
        assert_eq!(ok(etcdctl(&ep, &["put", k, v])), "OK\n");
    }
    assert_eq!(
        lines(&ok(etcdctl(&ep, &["get", "foo"]))),
        vec!["foo", "bar"]
    );
    assert_eq!(
        lines(&ok(etcdctl(&ep, &["get", "foo", "--prefix"]))),
        vec!["foo", "bar", "foo/a", "1", "foo/b", "22"]
    );
    // A range [key, range_end).
    assert_eq!(
        lines(&ok(etcdctl(&ep, &["get", "foo/", "fop"]))),
        vec!["foo/a", "1", "foo/b", "22"]
    );
    // --rev reads history: revision 2 is the first put.
    ok(etcdctl(&ep, &["put", "foo", "changed"]));
    assert_eq!(
        lines(&ok(etcdctl(&ep, &["get", "foo", "--rev=2"]))),
        vec!["foo", "bar"]
    );
    assert_eq!(
        lines(&ok(etcdctl(&ep, &["get", "foo"]))),
        vec!["foo", "changed"]
    );
    assert_eq!(
        lines(&ok(etcdctl(&ep, &["get", "f", "--prefix", "--limit=2"]))),
        vec!["foo", "changed", "foo/a", "1"]
    );
    assert_eq!(
        lines(&ok(etcdctl(
            &ep,
            &[
                "get",
                "foo/",
                "--prefix",
                "--sort-by=VALUE",
                "--order=DESCEND"
            ]
        ))),
        vec!["foo/b", "22", "foo/a", "1"]
    );
    assert_eq!(
        lines(&ok(etcdctl(&ep, &["get", "", "--from-key", "--keys-only"]))),
        vec!["foo", "", "foo/a", "", "foo/b", "", "fop", "", "zed", ""]
    );
    assert_eq!(
        lines(&ok(etcdctl(&ep, &["get", "foo", "--print-value-only"]))),
        vec!["changed"]
    );
}

#[test]
fn etcdctl_json_output_carries_header_counts_and_base64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    for k in ["a", "b", "c"] {
        ok(etcdctl(&ep, &["put", k, "v"]));
    }
    let out = ok(etcdctl(&ep, &["get", "a", "z", "--limit=1", "-w", "json"]));
    // {"header":{...,"revision":4,"raft_term":N},"kvs":[{"key":"YQ==",...}],"more":true,"count":3}
    assert!(out.contains("\"revision\":4"), "{out}");
    assert!(out.contains("\"key\":\"YQ==\""), "{out}");
    assert!(out.contains("\"value\":\"dg==\""), "{out}");
    assert!(
        out.contains("\"create_revision\":2,\"mod_revision\":2,\"version\":1"),
        "{out}"
    );
    assert!(out.contains("\"more\":true"), "{out}");
    assert!(out.contains("\"count\":3"), "{out}");
    assert!(
        out.contains("\"cluster_id\":")
            && out.contains("\"member_id\":")
            && out.contains("\"raft_term\":"),
        "{out}"
    );
}

#[test]
fn etcdctl_del_prefix_and_prev_kv() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    for (k, v) in [("dir/a", "1"), ("dir/b", "2"), ("dirt", "3"), ("one", "x")] {
        ok(etcdctl(&ep, &["put", k, v]));
    }
    assert_eq!(
        lines(&ok(etcdctl(&ep, &["del", "one", "--prev-kv"]))),
        vec!["1", "one", "x"]
    );
    assert_eq!(ok(etcdctl(&ep, &["del", "dir/", "--prefix"])), "2\n");
    assert_eq!(ok(etcdctl(&ep, &["del", "nothing"])), "0\n");
    assert_eq!(
        lines(&ok(etcdctl(&ep, &["get", "", "--from-key"]))),
        vec!["dirt", "3"]
    );
}

#[test]
fn etcdctl_txn_with_compares_takes_the_right_branch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    ok(etcdctl(&ep, &["put", "lock", "free"]));
    let script = "value(\"lock\") = \"free\"\n\nput lock taken\nget lock\n\nget lock\n\n";
    let out = ok(etcdctl_stdin(&ep, &["txn"], script));
    assert_eq!(lines(&out), vec!["SUCCESS", "", "OK", "", "lock", "taken"]);
    let out = ok(etcdctl_stdin(&ep, &["txn"], script));
    assert_eq!(lines(&out), vec!["FAILURE", "", "lock", "taken"]);
    // Compares on version, create and mod revisions.
    let script = "ver(\"lock\") = \"2\"\nmod(\"lock\") > \"2\"\ncreate(\"lock\") = \"2\"\n\nput done yes\n\n\n";
    assert_eq!(
        lines(&ok(etcdctl_stdin(&ep, &["txn"], script))),
        vec!["SUCCESS", "", "OK"]
    );
    let script = "create(\"missing\") = \"0\"\n\nput created 1\n\nput notcreated 1\n\n";
    assert_eq!(
        lines(&ok(etcdctl_stdin(&ep, &["txn"], script))),
        vec!["SUCCESS", "", "OK"]
    );
    assert_eq!(
        lines(&ok(etcdctl(&ep, &["get", "created"]))),
        vec!["created", "1"]
    );
    let err = fails(etcdctl_stdin(&ep, &["txn"], "\n\nput a 1\nput a 2\n\n"));
    assert!(
        err.contains("etcdserver: duplicate key given in txn request"),
        "{err}"
    );
}

#[test]
fn etcdctl_compaction_refuses_old_revisions_and_future_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    for v in ["1", "2", "3", "4"] {
        ok(etcdctl(&ep, &["put", "k", v]));
    }
    assert_eq!(
        ok(etcdctl(&ep, &["compaction", "4"])),
        "compacted revision 4\n"
    );
    let err = fails(etcdctl(&ep, &["get", "k", "--rev=3"]));
    assert!(
        err.contains("etcdserver: mvcc: required revision has been compacted"),
        "{err}"
    );
    assert_eq!(
        lines(&ok(etcdctl(&ep, &["get", "k", "--rev=4"]))),
        vec!["k", "3"]
    );
    let err = fails(etcdctl(&ep, &["get", "k", "--rev=99"]));
    assert!(
        err.contains("etcdserver: mvcc: required revision is a future revision"),
        "{err}"
    );
    let err = fails(etcdctl(&ep, &["compaction", "3"]));
    assert!(
        err.contains("etcdserver: mvcc: required revision has been compacted"),
        "{err}"
    );
    assert_eq!(
        ok(etcdctl(&ep, &["compaction", "--physical", "5"])),
        "compacted revision 5\n"
    );
    assert_eq!(lines(&ok(etcdctl(&ep, &["get", "k"]))), vec!["k", "4"]);
}

#[test]
fn etcdctl_endpoint_status_reports_leader_and_indexes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    ok(etcdctl(&ep, &["put", "a", "1"]));
    let out = ok(etcdctl(&ep, &["endpoint", "status", "-w", "json"]));
    assert!(out.contains(&format!("\"Endpoint\":\"{ep}\"")), "{out}");
    assert!(out.contains("\"revision\":2"), "{out}");
    assert!(out.contains("\"raftTerm\":"), "{out}");
    assert!(out.contains("\"raftAppliedIndex\":"), "{out}");
    // This member leads: leader == member_id.
    let member = out
        .split("\"member_id\":")
        .nth(1)
        .and_then(|s| s.split([',', '}']).next())
        .expect("member_id");
    assert!(out.contains(&format!("\"leader\":{member}")), "{out}");
    let table = ok(etcdctl(&ep, &["endpoint", "status"]));
    // ENDPOINT, ID, VERSION, DB SIZE, IS LEADER, IS LEARNER, RAFT TERM, RAFT INDEX, APPLIED INDEX, ERRORS
    let fields: Vec<&str> = table.trim().split(", ").collect();
    assert_eq!(fields[0], ep);
    assert_eq!((fields[4], fields[5]), ("true", "false"), "{table}");
    // etcdctl 3.4 prints the health line on stderr.
    let health = etcdctl(&ep, &["endpoint", "health"]);
    let said = String::from_utf8_lossy(&health.stderr);
    assert!(
        health.status.success() && said.contains("is healthy"),
        "{said}"
    );
}

#[test]
fn etcdctl_empty_key_is_refused_with_etcds_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let err = fails(etcdctl(&server.endpoint(), &["put", "", "v"]));
    assert!(err.contains("etcdserver: key is not provided"), "{err}");
}
