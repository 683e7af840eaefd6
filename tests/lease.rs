//! Leases with etcdctl 3.4 against real quorumkv processes: grant, attach, time-to-live, list,
//! keep-alive, revoke, expiry through the log, and keep-alives across a leader change.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::{
    etcdctl, fails, grant, keep_alive, leader, ok, start_cluster, value_of, wait_until, Server,
};
use quorumkv::proto::etcdserverpb::lease_client::LeaseClient;
use quorumkv::proto::etcdserverpb::{LeaseGrantRequest, LeaseTimeToLiveRequest};

/// The store revision, from a `get -w json` header.
fn revision(endpoint: &str) -> u64 {
    let out = ok(etcdctl(endpoint, &["get", "none", "-w", "json"]));
    let start = out.find("\"revision\":").expect("revision") + "\"revision\":".len();
    out[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .expect("number")
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn etcdctl_lease_grant_attach_timetolive_list_and_revoke() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    let lease = grant(&ep, 60);
    let other = grant(&ep, 30);
    ok(etcdctl(
        &ep,
        &["put", "--lease", &lease, "svc/a", "10.0.0.1"],
    ));
    ok(etcdctl(
        &ep,
        &["put", "--lease", &lease, "svc/b", "10.0.0.2"],
    ));
    ok(etcdctl(&ep, &["put", "plain", "x"]));
    let ttl = ok(etcdctl(&ep, &["lease", "timetolive", &lease, "--keys"]));
    assert!(
        ttl.starts_with(&format!("lease {lease} granted with TTL(60s), remaining(5"))
            && ttl.trim_end().ends_with("attached keys([svc/a svc/b])"),
        "{ttl}"
    );
    let list = ok(etcdctl(&ep, &["lease", "list"]));
    assert!(list.starts_with("found 2 leases\n"), "{list}");
    assert!(list.contains(&lease) && list.contains(&other), "{list}");
    // The keys name their lease (etcdctl prints it in decimal in JSON).
    let json = ok(etcdctl(&ep, &["get", "svc/a", "-w", "json"]));
    let decimal = i64::from_str_radix(&lease, 16).expect("hex id");
    assert!(json.contains(&format!("\"lease\":{decimal}")), "{json}");

    // Revoke deletes the attached keys, all at one revision, and nothing else.
    let before = revision(&ep);
    assert_eq!(
        ok(etcdctl(&ep, &["lease", "revoke", &lease])),
        format!("lease {lease} revoked\n")
    );
    assert_eq!(
        revision(&ep),
        before + 1,
        "both keys deleted at one revision"
    );
    assert_eq!(ok(etcdctl(&ep, &["get", "svc/", "--prefix"])), "");
    assert_eq!(value_of(&ep, "plain"), "x");
    assert_eq!(
        ok(etcdctl(&ep, &["lease", "timetolive", &lease])),
        format!("lease {lease} already expired\n")
    );
    // A key moved to another lease (or to none) leaves its old one.
    ok(etcdctl(&ep, &["put", "--lease", &other, "moved", "1"]));
    ok(etcdctl(&ep, &["put", "moved", "2"]));
    let ttl = ok(etcdctl(&ep, &["lease", "timetolive", &other, "--keys"]));
    assert!(ttl.trim_end().ends_with("attached keys([])"), "{ttl}");
}

#[test]
fn bad_lease_input_gets_etcds_codes_and_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    let err = fails(etcdctl(&ep, &["put", "--lease", "1234", "k", "v"]));
    assert!(
        err.contains("etcdserver: requested lease not found"),
        "{err}"
    );
    let err = fails(etcdctl(&ep, &["lease", "revoke", "1234"]));
    assert!(
        err.contains("etcdserver: requested lease not found"),
        "{err}"
    );
    let err = fails(etcdctl(&ep, &["lease", "grant", "9000000001"]));
    assert!(err.contains("etcdserver: too large lease TTL"), "{err}");
    assert_eq!(value_of(&ep, "k"), "", "nothing was written");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = LeaseClient::connect(ep.clone()).await.expect("connect");
        let granted = client
            .lease_grant(LeaseGrantRequest { ttl: 1, id: 77 })
            .await
            .expect("grant")
            .into_inner();
        assert_eq!(
            (granted.id, granted.ttl),
            (77, 2),
            "raised to the minimum TTL"
        );
        let taken = client
            .lease_grant(LeaseGrantRequest { ttl: 10, id: 77 })
            .await
            .expect_err("id taken");
        assert_eq!(taken.code(), tonic::Code::FailedPrecondition);
        assert_eq!(taken.message(), "etcdserver: lease already exists");
        let too_large = client
            .lease_grant(LeaseGrantRequest {
                ttl: 9_000_000_001,
                id: 0,
            })
            .await
            .expect_err("too large");
        assert_eq!(too_large.code(), tonic::Code::OutOfRange);
        let unknown = client
            .lease_time_to_live(LeaseTimeToLiveRequest { id: 5, keys: true })
            .await
            .expect("ttl of an unknown lease")
            .into_inner();
        assert_eq!(
            unknown.ttl, -1,
            "etcd answers -1 for a lease it does not know"
        );
    });
}

#[test]
fn an_expired_lease_takes_its_keys_with_it_and_a_kept_alive_one_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ep = server.endpoint();
    let lease = grant(&ep, 2);
    ok(etcdctl(&ep, &["put", "--lease", &lease, "eph/1", "a"]));
    ok(etcdctl(&ep, &["put", "--lease", &lease, "eph/2", "b"]));
    let kept = grant(&ep, 2);
    ok(etcdctl(&ep, &["put", "--lease", &kept, "kept", "c"]));
    let keeper = keep_alive(&ep, &kept);
    let granted = Instant::now();
    let before = revision(&ep);
    let took = wait_until(
        "the expired lease's keys are gone",
        Duration::from_secs(6),
        || ok(etcdctl(&ep, &["get", "eph/", "--prefix", "--keys-only"])).is_empty(),
    );
    assert!(
        granted.elapsed() >= Duration::from_millis(1500),
        "expired early: {took:?}"
    );
    assert_eq!(revision(&ep), before + 1, "expiry deletes in one revision");
    // The kept-alive lease outlives its TTL several times over.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(value_of(&ep, "kept"), "c");
    stop(keeper);
    wait_until(
        "the lease expires once keep-alives stop",
        Duration::from_secs(6),
        || value_of(&ep, "kept").is_empty(),
    );
}

#[test]
fn a_lease_outlives_a_leader_crash_with_keep_alives_sent_to_a_follower() {
    if !common::etcdctl_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers = start_cluster(dir.path(), &["a", "b", "c"], &[]);
    let old = wait_until_leader(&servers);
    let follower = (old + 1) % 3;
    let ep = servers[follower].endpoint();
    // Granted, attached and kept alive through a follower: it forwards keep-alives.
    let lease = grant(&ep, 4);
    ok(etcdctl(
        &ep,
        &["put", "--lease", &lease, "svc/leader-test", "up"],
    ));
    let keeper = keep_alive(&ep, &lease);
    let ttl = ok(etcdctl(&ep, &["lease", "timetolive", &lease]));
    assert!(ttl.contains("granted with TTL(4s)"), "{ttl}");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(value_of(&ep, "svc/leader-test"), "up");

    servers[old].kill9();
    wait_until("a new leader", Duration::from_secs(10), || {
        leader(&servers).is_some_and(|l| l != old)
    });
    // Through the election and after it, the kept-alive lease lives on.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(value_of(&ep, "svc/leader-test"), "up");
    stop(keeper);
    wait_until(
        "the lease expires on the new leader",
        Duration::from_secs(10),
        || value_of(&ep, "svc/leader-test").is_empty(),
    );
}

fn wait_until_leader(servers: &[Server]) -> usize {
    let mut found = None;
    wait_until("a leader", Duration::from_secs(10), || {
        found = leader(servers);
        found.is_some()
    });
    found.expect("leader")
}
