//! `/metrics` in Prometheus' text format, read by a Prometheus text parser, with etcd's names,
//! types and labels, on the client port and on `--listen-metrics-urls`.

mod common;

use std::time::Duration;

use common::{etcdctl, etcdctl_available, free_port, http_get, ok, start_cluster};
use prometheus_parse::{Sample, Scrape, Value};

fn scrape(port: u16) -> Scrape {
    let response = common::http_get_raw(port, "/metrics");
    assert!(
        response.contains("content-type: text/plain; version=0.0.4"),
        "Prometheus' content type: {}",
        &response[..response.len().min(200)]
    );
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

fn samples<'a>(scrape: &'a Scrape, name: &str) -> Vec<&'a Sample> {
    scrape.samples.iter().filter(|s| s.metric == name).collect()
}

fn value(scrape: &Scrape, name: &str) -> f64 {
    let found = samples(scrape, name);
    assert_eq!(found.len(), 1, "{name}: {} samples", found.len());
    number(name, found[0])
}

/// A counter's or a gauge's value.
fn number(name: &str, sample: &Sample) -> f64 {
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{name} is {other:?}"),
    }
}

#[test]
fn metrics_have_etcds_names_types_and_labels_and_follow_the_cluster() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = start_cluster(dir.path(), &["a", "b", "c"], &[]);
    let endpoint = servers[0].endpoint();
    for i in 0..20 {
        ok(etcdctl(&endpoint, &["put", &format!("k{i}"), "v"]));
    }
    ok(etcdctl(&endpoint, &["get", "k", "--prefix"]));
    let lease = common::grant(&endpoint, 60);
    ok(etcdctl(&endpoint, &["lease", "revoke", &lease]));
    let _ = etcdctl(&endpoint, &["get", "k1", "--rev", "1000"]);

    let scraped = scrape(servers[0].client_port);
    for (name, kind) in [
        ("etcd_server_has_leader", "gauge"),
        ("etcd_server_is_leader", "gauge"),
        ("etcd_server_leader_changes_seen_total", "counter"),
        ("etcd_server_proposals_committed_total", "gauge"),
        ("etcd_server_proposals_applied_total", "gauge"),
        ("etcd_server_proposals_pending", "gauge"),
        ("etcd_server_proposals_failed_total", "counter"),
        ("etcd_server_quota_backend_bytes", "gauge"),
        ("etcd_mvcc_db_total_size_in_bytes", "gauge"),
        ("etcd_mvcc_db_total_size_in_use_in_bytes", "gauge"),
        ("etcd_mvcc_put_total", "counter"),
        ("etcd_mvcc_range_total", "counter"),
        ("etcd_mvcc_delete_total", "counter"),
        ("etcd_mvcc_txn_total", "counter"),
        ("etcd_debugging_mvcc_keys_total", "gauge"),
        ("etcd_debugging_mvcc_watcher_total", "gauge"),
        ("etcd_debugging_lease_granted_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_cpu_seconds_total", "counter"),
    ] {
        let found = samples(&scraped, name);
        assert!(!found.is_empty(), "{name} missing");
        let expected_counter = kind == "counter";
        assert_eq!(
            matches!(found[0].value, Value::Counter(_)),
            expected_counter,
            "{name} should be a {kind}: {:?}",
            found[0].value
        );
    }
    assert_eq!(value(&scraped, "etcd_server_has_leader"), 1.0);
    assert_eq!(value(&scraped, "etcd_mvcc_put_total"), 20.0);
    assert_eq!(value(&scraped, "etcd_debugging_mvcc_keys_total"), 20.0);
    assert_eq!(
        value(&scraped, "etcd_server_quota_backend_bytes"),
        2147483648.0
    );
    assert!(value(&scraped, "etcd_server_leader_changes_seen_total") >= 1.0);
    let applied = value(&scraped, "etcd_server_proposals_applied_total");
    assert!(applied >= 23.0, "applied {applied}");
    let id = samples(&scraped, "etcd_server_id");
    assert_eq!(id.len(), 1);
    assert_eq!(
        id[0].labels.get("server_id"),
        Some(servers[0].member_id().as_str())
    );
    for histogram in [
        "etcd_disk_wal_fsync_duration_seconds",
        "etcd_disk_backend_commit_duration_seconds",
    ] {
        let found = samples(&scraped, histogram);
        let Value::Histogram(buckets) = &found[0].value else {
            panic!("{histogram} is not a histogram")
        };
        let bounds: Vec<f64> = buckets.iter().map(|b| b.less_than).collect();
        assert_eq!(bounds.len(), 15, "{histogram}: 14 buckets and +Inf");
        assert_eq!((bounds[0], bounds[13]), (0.001, 8.192));
        assert!(buckets[14].count > 0.0, "{histogram} observed nothing");
    }
    let handled = samples(&scraped, "grpc_server_handled_total");
    let count = |method: &str, code: &str| -> f64 {
        handled
            .iter()
            .filter(|s| {
                s.labels.get("grpc_method") == Some(method)
                    && s.labels.get("grpc_code") == Some(code)
                    && s.labels.get("grpc_service") == Some("etcdserverpb.KV")
                    && s.labels.get("grpc_type") == Some("unary")
            })
            .map(|s| match s.value {
                Value::Counter(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(count("Put", "OK"), 20.0);
    let started_puts: f64 = samples(&scraped, "grpc_server_started_total")
        .iter()
        .filter(|s| s.labels.get("grpc_method") == Some("Put"))
        .map(|s| match s.value {
            Value::Counter(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(
        started_puts, 20.0,
        "each put started once, and none is in flight"
    );
    assert!(
        count("Range", "OutOfRange") >= 1.0,
        "a future revision's read"
    );
    let sent = samples(&scraped, "etcd_network_peer_sent_bytes_total");
    assert_eq!(sent.len(), 2, "one per peer");
    assert!(sent.iter().all(|s| s.labels.get("To").is_some()));
    let received = samples(&scraped, "etcd_network_peer_received_bytes_total");
    assert!(received.iter().all(|s| s.labels.get("From").is_some()));
    // The round trip is probed every 5 s.
    common::wait_until("peer round trips", Duration::from_secs(15), || {
        let scraped = scrape(servers[0].client_port);
        samples(&scraped, "etcd_network_peer_round_trip_time_seconds")
            .iter()
            .any(|s| matches!(&s.value, Value::Histogram(b) if b.last().is_some_and(|b| b.count > 0.0)))
    });
    // The other members count the writes they applied, not the calls they served.
    let follower = scrape(servers[1].client_port);
    assert_eq!(value(&follower, "etcd_debugging_mvcc_keys_total"), 20.0);
    assert_eq!(value(&follower, "etcd_server_has_leader"), 1.0);
}

#[test]
fn listen_metrics_urls_serves_metrics_and_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = common::Server::start(
        dir.path(),
        &["--listen-metrics-urls", &format!("http://127.0.0.1:{port}")],
    );
    let scraped = scrape(port);
    assert_eq!(value(&scraped, "etcd_server_is_leader"), 1.0);
    assert_eq!(
        http_get(port, "/health"),
        (200, r#"{"health":"true","reason":""}"#.to_string())
    );
    drop(server);
}

/// One part's gauge: `quorumkv_memory_bytes` or `quorumkv_memory_limit_bytes`.
fn memory_part(scrape: &Scrape, name: &str, part: &str) -> f64 {
    let found: Vec<&Sample> = samples(scrape, name)
        .into_iter()
        .filter(|s| s.labels.get("part") == Some(part))
        .collect();
    assert_eq!(found.len(), 1, "{name}{{part={part}}}");
    number(name, found[0])
}

#[test]
fn metrics_report_each_memory_part_and_its_bound() {
    if !etcdctl_available() {
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = common::Server::start(dir.path(), &["--backend-cache-bytes", "67108864"]);
    let endpoint = server.endpoint();
    let before = scrape(server.client_port);
    let index_before = memory_part(&before, "quorumkv_memory_bytes", "key_index");
    for i in 0..200 {
        ok(etcdctl(
            &endpoint,
            &["put", &format!("key-{i:04}"), "value"],
        ));
    }
    let after = scrape(server.client_port);
    for part in [
        "backend_cache",
        "raft_log",
        "key_index",
        "watch_queues",
        "snapshot_transfer",
    ] {
        memory_part(&after, "quorumkv_memory_bytes", part);
        memory_part(&after, "quorumkv_memory_limit_bytes", part);
    }
    assert_eq!(
        memory_part(&after, "quorumkv_memory_limit_bytes", "backend_cache"),
        64.0 * 1024.0 * 1024.0,
        "--backend-cache-bytes is the backend cache's bound"
    );
    let index_after = memory_part(&after, "quorumkv_memory_bytes", "key_index");
    assert!(
        index_after - index_before >= 200.0 * 8.0,
        "200 new keys grow the key index: {index_before} -> {index_after}"
    );
    assert!(
        memory_part(&after, "quorumkv_memory_bytes", "raft_log") >= 200.0 * 8.0,
        "the raft log holds the 200 entries (no snapshot yet)"
    );
    assert!(
        memory_part(&after, "quorumkv_memory_limit_bytes", "raft_log") > 0.0,
        "the raft log has a bound"
    );
}

/// The v2 tree (`--enable-v2`) is a memory part of its own, and its records count in the
/// backend's size in use as they are written.
#[test]
fn v2_writes_show_in_their_memory_part_and_in_the_size_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = common::Server::start(dir.path(), &["--enable-v2"]);
    let gauge = |scrape: &Scrape, name: &str| {
        number(name, samples(scrape, name).first().expect("the gauge"))
    };
    let before = scrape(server.client_port);
    let v2_before = memory_part(&before, "quorumkv_memory_bytes", "v2");
    let in_use_before = gauge(&before, "etcd_mvcc_db_total_size_in_use_in_bytes");
    let value = "v".repeat(1000);
    for i in 0..100 {
        let (status, _, body) = common::http_form(
            server.client_port,
            "PUT",
            &format!("/v2/keys/dir/k{i}"),
            &format!("value={value}"),
        );
        assert_eq!(status, 201, "{body}");
    }
    // The journal reaches the backend with the next batch, within `BACKEND_BATCH_INTERVAL`.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let (after, in_use_after) = loop {
        let after = scrape(server.client_port);
        let in_use = gauge(&after, "etcd_mvcc_db_total_size_in_use_in_bytes");
        if in_use - in_use_before >= 100.0 * 1000.0 || std::time::Instant::now() > deadline {
            break (after, in_use);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let v2_after = memory_part(&after, "quorumkv_memory_bytes", "v2");
    // In memory, each set is a node and an event, both holding the value; in the backend, a
    // request in the journal, holding it once.
    assert!(
        v2_after - v2_before >= 100.0 * 2000.0,
        "{v2_before} -> {v2_after}"
    );
    assert!(
        in_use_after - in_use_before >= 100.0 * 1000.0,
        "{in_use_before} -> {in_use_after}"
    );
    assert_eq!(
        memory_part(&after, "quorumkv_memory_limit_bytes", "v2"),
        0.0
    );
}
