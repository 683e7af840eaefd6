//! The proxy's `/metrics`: etcd's grpc-proxy names (and types) first, then quorumkv's own.

use prometheus::{Encoder, IntCounter, IntGauge, Registry, TextEncoder};

pub struct ProxyMetrics {
    registry: Registry,
    pub watchers_coalescing: IntGauge,
    pub events_coalescing: IntCounter,
    pub cache_keys: IntGauge,
    pub cache_hits: IntGauge,
    pub cache_misses: IntGauge,
    pub upstream_watchers: IntGauge,
    pub watchers_coalesced: IntCounter,
    pub slow_watchers: IntCounter,
    pub upstream_reconnects: IntCounter,
    pub keepalives_coalesced: IntCounter,
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let gauge = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(gauge.clone()))
        .expect("metric registered once");
    gauge
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let counter = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(counter.clone()))
        .expect("metric registered once");
    counter
}

impl ProxyMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        ProxyMetrics {
            watchers_coalescing: gauge(&r, "etcd_grpc_proxy_watchers_coalescing_total", "Total number of current watchers coalescing"),
            events_coalescing: counter(&r, "etcd_grpc_proxy_events_coalescing_total", "Total number of events coalescing"),
            cache_keys: gauge(&r, "etcd_grpc_proxy_cache_keys_total", "Total number of keys/ranges cached"),
            cache_hits: gauge(&r, "etcd_grpc_proxy_cache_hits_total", "Total number of cache hits"),
            cache_misses: gauge(&r, "etcd_grpc_proxy_cache_misses_total", "Total number of cache misses"),
            upstream_watchers: gauge(&r, "quorumkv_grpc_proxy_upstream_watchers", "Watchers the proxy holds on the cluster for its clients' watchers (one per coalesced range)."),
            watchers_coalesced: counter(&r, "quorumkv_grpc_proxy_watchers_joined_total", "Client watchers that joined an upstream watcher already open."),
            slow_watchers: counter(&r, "quorumkv_grpc_proxy_slow_watchers_total", "Client watchers taken off their upstream watcher because their stream's queue was full (they watch again from the revision they missed)."),
            upstream_reconnects: counter(&r, "quorumkv_grpc_proxy_watch_reconnects_total", "Times the upstream watch stream was opened again after it broke."),
            keepalives_coalesced: counter(&r, "quorumkv_grpc_proxy_keepalives_coalesced_total", "Lease keep-alives answered by one already in flight upstream."),
            registry: r,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}
