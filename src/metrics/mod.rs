//! Prometheus metrics with etcd's names, types, labels and histogram buckets, so that etcd's
//! dashboards and alerts work unchanged. Counters on hot paths are plain atomics bumped where
//! the thing happens; gauges of state (leader, sizes, indexes, watchers) are read from the
//! member when `/metrics` is scraped (`refresh`), so they cost nothing in between.

pub mod memory;

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Every metric of this process.
pub struct Metrics {
    pub registry: Registry,
    pub has_leader: IntGauge,
    pub is_leader: IntGauge,
    pub leader_changes_seen: IntCounter,
    pub server_id: GaugeVec,
    pub server_version: GaugeVec,
    pub proposals_committed: IntGauge,
    pub proposals_applied: IntGauge,
    pub proposals_pending: IntGauge,
    pub proposals_failed: IntCounter,
    pub quota_backend_bytes: IntGauge,
    pub slow_apply: IntCounter,
    pub wal_fsync_seconds: Histogram,
    pub backend_commit_seconds: Histogram,
    pub db_total_size_bytes: IntGauge,
    pub db_total_size_in_use_bytes: IntGauge,
    pub mvcc_put: IntCounter,
    pub mvcc_range: IntCounter,
    pub mvcc_delete: IntCounter,
    pub mvcc_txn: IntCounter,
    pub keys_total: IntGauge,
    pub current_revision: IntGauge,
    pub compact_revision: IntGauge,
    pub watchers: IntGauge,
    pub watch_streams: IntGauge,
    pub lease_granted: IntCounter,
    pub lease_revoked: IntCounter,
    pub lease_renewed: IntCounter,
    pub peer_round_trip_seconds: HistogramVec,
    pub peer_sent_bytes: IntCounterVec,
    pub peer_received_bytes: IntCounterVec,
    pub grpc_started: IntCounterVec,
    pub grpc_handled: IntCounterVec,
    /// Bytes each part of the member holds in memory (`memory`), and its bound.
    pub memory_bytes: GaugeVec,
    pub memory_limit_bytes: GaugeVec,
}

/// `metric`, registered in `registry`.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    registered(registry, IntCounter::new(name, help).expect("valid metric"))
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    registered(registry, IntGauge::new(name, help).expect("valid metric"))
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registered(registry, metric)
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let metric = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registered(registry, metric)
}

/// etcd's disk histograms: 1 ms doubling to about 8 s.
fn disk_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 14).expect("valid buckets")
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let metric =
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid");
    registered(registry, metric)
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        #[cfg(all(target_os = "linux", not(madsim)))]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            r.register(Box::new(process))
                .expect("process metrics registered once");
        }
        let peer_round_trip_seconds = registered(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "etcd_network_peer_round_trip_time_seconds",
                    "Round-Trip-Time histogram between peers",
                )
                .buckets(exponential_buckets(0.0001, 2.0, 16).expect("valid buckets")),
                &["To"],
            )
            .expect("valid metric"),
        );
        Metrics {
            has_leader: gauge(&r, "etcd_server_has_leader", "Whether or not a leader exists. 1 is existence, 0 is not."),
            is_leader: gauge(&r, "etcd_server_is_leader", "Whether or not this member is a leader. 1 if is, 0 otherwise."),
            leader_changes_seen: counter(&r, "etcd_server_leader_changes_seen_total", "The number of leader changes seen."),
            server_id: gauge_vec(&r, "etcd_server_id", "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.", &["server_id"]),
            server_version: gauge_vec(&r, "etcd_server_version", "Which version is running. 1 for 'server_version' label with current version.", &["server_version"]),
            proposals_committed: gauge(&r, "etcd_server_proposals_committed_total", "The total number of consensus proposals committed."),
            proposals_applied: gauge(&r, "etcd_server_proposals_applied_total", "The total number of consensus proposals applied."),
            proposals_pending: gauge(&r, "etcd_server_proposals_pending", "The current number of pending proposals to commit."),
            proposals_failed: counter(&r, "etcd_server_proposals_failed_total", "The total number of failed proposals seen."),
            quota_backend_bytes: gauge(&r, "etcd_server_quota_backend_bytes", "Current backend storage quota size in bytes."),
            slow_apply: counter(&r, "etcd_server_slow_apply_total", "The total number of slow apply requests (likely overloaded from slow disk)."),
            wal_fsync_seconds: histogram(&r, "etcd_disk_wal_fsync_duration_seconds", "The latency distributions of fsync called by WAL.", disk_buckets()),
            backend_commit_seconds: histogram(&r, "etcd_disk_backend_commit_duration_seconds", "The latency distributions of commit called by backend.", disk_buckets()),
            db_total_size_bytes: gauge(&r, "etcd_mvcc_db_total_size_in_bytes", "Total size of the underlying database physically allocated in bytes."),
            db_total_size_in_use_bytes: gauge(&r, "etcd_mvcc_db_total_size_in_use_in_bytes", "Total size of the underlying database logically in use in bytes."),
            mvcc_put: counter(&r, "etcd_mvcc_put_total", "Total number of puts seen by this member."),
            mvcc_range: counter(&r, "etcd_mvcc_range_total", "Total number of ranges seen by this member."),
            mvcc_delete: counter(&r, "etcd_mvcc_delete_total", "Total number of deletes seen by this member."),
            mvcc_txn: counter(&r, "etcd_mvcc_txn_total", "Total number of txns seen by this member."),
            keys_total: gauge(&r, "etcd_debugging_mvcc_keys_total", "Total number of keys."),
            current_revision: gauge(&r, "etcd_debugging_mvcc_current_revision", "The current revision of store."),
            compact_revision: gauge(&r, "etcd_debugging_mvcc_compact_revision", "The revision of the last compaction in store."),
            watchers: gauge(&r, "etcd_debugging_mvcc_watcher_total", "Total number of watchers."),
            watch_streams: gauge(&r, "etcd_debugging_mvcc_watch_stream_total", "Total number of watch streams."),
            lease_granted: counter(&r, "etcd_debugging_lease_granted_total", "The total number of granted leases."),
            lease_revoked: counter(&r, "etcd_debugging_lease_revoked_total", "The total number of revoked leases."),
            lease_renewed: counter(&r, "etcd_debugging_lease_renewed_total", "The number of renewed leases seen by the leader."),
            peer_round_trip_seconds,
            peer_sent_bytes: counter_vec(&r, "etcd_network_peer_sent_bytes_total", "The total number of bytes sent to peers.", &["To"]),
            peer_received_bytes: counter_vec(&r, "etcd_network_peer_received_bytes_total", "The total number of bytes received from peers.", &["From"]),
            grpc_started: counter_vec(&r, "grpc_server_started_total", "Total number of RPCs started on the server.", &["grpc_type", "grpc_service", "grpc_method"]),
            grpc_handled: counter_vec(&r, "grpc_server_handled_total", "Total number of RPCs completed on the server, regardless of success or failure.", &["grpc_type", "grpc_service", "grpc_method", "grpc_code"]),
            memory_bytes: gauge_vec(&r, "quorumkv_memory_bytes", "Bytes held in memory by each part of the member (key_index: an estimate; backend_cache: at most).", &["part"]),
            memory_limit_bytes: gauge_vec(&r, "quorumkv_memory_limit_bytes", "The bound on the bytes each part of the member holds in memory (0: bounded through another limit, see the README).", &["part"]),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        // Writing into a Vec fails only for a metric that does not encode: none here.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// This process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The content type of `Metrics::encode`'s text.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A peer's id as etcd's peer metrics label it.
pub fn peer_label(id: u64) -> String {
    format!("{id:x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_types_and_buckets_are_etcds() {
        METRICS.mvcc_put.inc();
        METRICS.wal_fsync_seconds.observe(0.003);
        METRICS
            .grpc_handled
            .with_label_values(&["unary", "etcdserverpb.KV", "Put", "OK"])
            .inc();
        let text = METRICS.encode();
        assert!(text.contains("# TYPE etcd_mvcc_put_total counter"));
        assert!(text.contains("# TYPE etcd_server_proposals_committed_total gauge"));
        assert!(text.contains("# TYPE etcd_disk_wal_fsync_duration_seconds histogram"));
        assert!(text.contains("etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.004\"} "));
        assert!(text.contains("etcd_disk_wal_fsync_duration_seconds_bucket{le=\"8.192\"} "));
        assert!(text.contains(
            "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}"
        ));
    }
}
