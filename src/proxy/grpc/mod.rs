//! `quorumkv grpc-proxy start`: etcd's gRPC proxy. A stateless member-side endpoint that
//! serves every v3 service and takes watch, lease and read load off the cluster: watchers of a
//! range share one upstream watcher, lease keep-alives one upstream stream, serializable reads
//! are answered from a cache kept current by a watch; everything else is passed through to the
//! endpoint in use, moving to the next one when it fails.

pub mod forward;
pub mod kv;
pub mod lease;
pub mod namespace;
pub mod register;
pub mod unary;
pub mod upstream;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use clap::Subcommand;
use tonic::codegen::http::StatusCode;

use crate::proto::etcdserverpb::auth_server::AuthServer;
use crate::proto::etcdserverpb::cluster_server::ClusterServer;
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::kv_server::KvServer;
use crate::proto::etcdserverpb::lease_server::LeaseServer;
use crate::proto::etcdserverpb::maintenance_server::MaintenanceServer;
use crate::proto::etcdserverpb::RangeRequest;
use crate::proto::v3electionpb::election_server::ElectionServer;
use crate::proto::v3lockpb::lock_server::LockServer;
use crate::tls::{ClientTls, ServerTls, TlsOptions};

/// `quorumkv grpc-proxy <verb>`, with etcd's flags.
#[derive(Subcommand, Debug)]
pub enum GrpcProxyVerb {
    /// Starts the gRPC proxy.
    Start(Box<GrpcProxyFlags>),
}

#[derive(clap::Args, Debug, Clone)]
pub struct GrpcProxyFlags {
    /// Comma separated etcd cluster endpoints.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:23790")]
    pub listen_addr: String,
    /// Advertise address to register (must be reachable by client).
    #[arg(long, default_value = "127.0.0.1:23790")]
    pub advertise_client_url: String,
    /// Prefix to use for registering proxy (must be shared with other grpc-proxy members).
    #[arg(long, default_value = "")]
    pub resolver_prefix: String,
    /// Specify TTL, in seconds, when registering proxy endpoints.
    #[arg(long, default_value_t = 0)]
    pub resolver_ttl: i64,
    /// String to prefix to all keys for namespacing requests (KV, Watch and Lease; as etcd's,
    /// not Lock and Election).
    #[arg(long, default_value = "")]
    pub namespace: String,
    /// Listen for endpoint /metrics requests on an additional interface.
    #[arg(long, default_value = "")]
    pub metrics_addr: String,
    /// Data directory for persistent data (the certificates of --auto-tls).
    #[arg(long, default_value = "default.proxy")]
    pub data_dir: PathBuf,
    /// Message send limits in bytes.
    #[arg(long, default_value_t = 1572864)]
    pub max_send_bytes: usize,
    /// Message receive limits in bytes.
    #[arg(long, default_value_t = 2147483647)]
    pub max_recv_bytes: usize,
    /// Maximum concurrent streams that each client can open at a time.
    #[arg(long, default_value_t = u32::MAX)]
    pub max_concurrent_streams: u32,
    /// Identify secure connections with etcd servers using this TLS certificate file.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Identify secure connections with etcd servers using this TLS key file.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Verify certificates of TLS-enabled secure etcd servers using this CA bundle.
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Skip authentication of etcd server TLS certificates.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, default_value = "false")]
    pub insecure_skip_tls_verify: bool,
    /// Identify secure connections to the proxy using this TLS certificate file.
    #[arg(long)]
    pub cert_file: Option<PathBuf>,
    /// Identify secure connections to the proxy using this TLS key file.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Verify certificates of TLS-enabled secure proxy using this CA bundle.
    #[arg(long)]
    pub trusted_ca_file: Option<PathBuf>,
    /// Proxy TLS using generated certificates.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, default_value = "false")]
    pub auto_tls: bool,
    /// Comma-separated list of supported TLS cipher suites between client/proxy.
    #[arg(long, value_delimiter = ',')]
    pub listen_cipher_suites: Vec<String>,
    /// Proxy client certificate revocation list file (not built: refused).
    #[arg(long)]
    pub client_crl_file: Option<PathBuf>,
    /// Leasing metadata prefix for disconnected linearized reads (not built: refused).
    #[arg(long, default_value = "")]
    pub experimental_leasing_prefix: String,
    /// Ensure serializable reads have monotonically increasing store revisions (always so).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, default_value = "false")]
    pub experimental_serializable_ordering: bool,
    /// Domain name to query for SRV records describing cluster endpoints (not built: refused).
    #[arg(long)]
    pub discovery_srv: Option<String>,
    /// Service name to query when using DNS discovery (not built: refused).
    #[arg(long)]
    pub discovery_srv_name: Option<String>,
    /// Accept insecure SRV records.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, default_value = "false")]
    pub insecure_discovery: bool,
    /// Enable debug-level logging for grpc-proxy.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, default_value = "false")]
    pub debug: bool,
    /// Enable runtime profiling data via HTTP server (not built: ignored).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, default_value = "false")]
    pub enable_pprof: bool,
}

pub use crate::server::prefix_end;

/// Everything a proxy serves with, shared by its services.
pub struct Proxy {
    pub up: Arc<upstream::Upstream>,
    pub metrics: Arc<crate::proxy::metrics::ProxyMetrics>,
    pub broker: Arc<crate::proxy::broker::Broker>,
    pub cache: Arc<crate::proxy::cache::RangeCache>,
    pub keep_alives: Arc<lease::KeepAlives>,
    pub registration: Option<Arc<register::Registration>>,
    pub seen: Arc<AtomicI64>,
    pub ns: namespace::Namespace,
}

/// Refuses the flags of etcd's proxy that quorumkv's does not build, naming each.
fn refuse_unbuilt(flags: &GrpcProxyFlags) -> Result<(), String> {
    let unbuilt = [
        (
            "--experimental-leasing-prefix",
            !flags.experimental_leasing_prefix.is_empty(),
        ),
        ("--discovery-srv", flags.discovery_srv.is_some()),
        ("--discovery-srv-name", flags.discovery_srv_name.is_some()),
        ("--client-crl-file", flags.client_crl_file.is_some()),
    ];
    for (flag, given) in unbuilt {
        if given {
            return Err(format!(
                "{flag} is not built in quorumkv's grpc-proxy yet (see the README's Proxy section)"
            ));
        }
    }
    if flags.insecure_skip_tls_verify {
        return Err(
            "--insecure-skip-tls-verify is not built in quorumkv's grpc-proxy: give --cacert"
                .into(),
        );
    }
    if !flags.resolver_prefix.is_empty() && flags.resolver_ttl <= 0 {
        return Err("invalid resolver-ttl 0".into());
    }
    Ok(())
}

impl Proxy {
    /// Starts the proxy's background work (the upstream watch, the cache, the registration);
    /// must run inside a Tokio runtime.
    pub fn start(flags: &GrpcProxyFlags) -> Result<Arc<Proxy>, String> {
        refuse_unbuilt(flags)?;
        let upstream_tls = if flags.cacert.is_some() || flags.cert.is_some() {
            let options = TlsOptions {
                cert_file: flags.cert.clone(),
                key_file: flags.key.clone(),
                trusted_ca_file: flags.cacert.clone(),
                ..Default::default()
            };
            Some(ClientTls::new(options, &[b"h2"])?)
        } else {
            None
        };
        let up = upstream::Upstream::new(
            &flags.endpoints,
            upstream_tls,
            flags.max_send_bytes,
            flags.max_recv_bytes,
        )?;
        let metrics = Arc::new(crate::proxy::metrics::ProxyMetrics::new());
        let seen = Arc::new(AtomicI64::new(0));
        let broker = crate::proxy::broker::Broker::new(up.clone(), seen.clone(), metrics.clone());
        let cache = crate::proxy::cache::RangeCache::new(up.clone(), seen.clone(), metrics.clone());
        let keep_alives = lease::KeepAlives::new(up.clone(), metrics.clone());
        let registration = (!flags.resolver_prefix.is_empty()).then(|| {
            register::Registration::new(
                up.clone(),
                flags.resolver_prefix.clone(),
                flags.advertise_client_url.clone(),
                flags.resolver_ttl,
            )
        });
        if let Some(registration) = &registration {
            tokio::spawn(registration.clone().run());
        }
        Ok(Arc::new(Proxy {
            up,
            metrics,
            broker,
            cache,
            keep_alives,
            registration,
            seen,
            ns: namespace::Namespace::new(&flags.namespace),
        }))
    }

    /// The KV service.
    pub fn kv(&self) -> kv::ProxyKv {
        kv::ProxyKv {
            up: self.up.clone(),
            cache: self.cache.clone(),
            seen: self.seen.clone(),
            ns: self.ns.clone(),
        }
    }

    /// The gRPC services and `/health`, `/metrics`, on one router (HTTP/2 and HTTP/1.1).
    pub fn router(self: &Arc<Self>, max_decode: usize) -> Router {
        let forward = forward::Passthrough {
            up: self.up.clone(),
            seen: self.seen.clone(),
        };
        let kv = KvServer::new(self.kv())
            .max_decoding_message_size(max_decode)
            .max_encoding_message_size(usize::MAX);
        let watch = watch::ProxyWatch {
            broker: self.broker.clone(),
            ns: self.ns.clone(),
            max_decoding_message_size: max_decode,
        };
        let lease = LeaseServer::new(lease::ProxyLease {
            up: self.up.clone(),
            seen: self.seen.clone(),
            keep_alives: self.keep_alives.clone(),
            ns: self.ns.clone(),
        })
        .max_decoding_message_size(max_decode)
        .max_encoding_message_size(usize::MAX);
        let cluster = ClusterServer::new(forward::ProxyCluster {
            up: self.up.clone(),
            seen: self.seen.clone(),
            registry: self.registration.clone(),
        })
        .max_decoding_message_size(max_decode)
        .max_encoding_message_size(usize::MAX);
        let maintenance = MaintenanceServer::new(forward.clone())
            .max_decoding_message_size(max_decode)
            .max_encoding_message_size(usize::MAX);
        let auth = AuthServer::new(forward.clone())
            .max_decoding_message_size(max_decode)
            .max_encoding_message_size(usize::MAX);
        let lock = LockServer::new(forward.clone())
            .max_decoding_message_size(max_decode)
            .max_encoding_message_size(usize::MAX);
        let election = ElectionServer::new(forward)
            .max_decoding_message_size(max_decode)
            .max_encoding_message_size(usize::MAX);
        tonic::service::Routes::new(kv)
            .add_service(watch)
            .add_service(lease)
            .add_service(cluster)
            .add_service(maintenance)
            .add_service(auth)
            .add_service(lock)
            .add_service(election)
            .into_axum_router()
            .merge(self.probe_routes())
    }

    /// `/health` and `/metrics`, as etcd's proxy serves them.
    pub fn probe_routes(self: &Arc<Self>) -> Router {
        let for_health = self.clone();
        let for_metrics = self.clone();
        Router::new()
            .route(
                "/health",
                get(move || {
                    let proxy = for_health.clone();
                    async move { proxy.health().await }
                }),
            )
            .route(
                "/metrics",
                get(move || {
                    let proxy = for_metrics.clone();
                    async move {
                        let (upstream, coalescing) = proxy.broker.counts();
                        proxy.metrics.upstream_watchers.set(upstream as i64);
                        proxy.metrics.watchers_coalescing.set(coalescing as i64);
                        (
                            [("content-type", "text/plain; version=0.0.4")],
                            proxy.metrics.encode(),
                        )
                    }
                }),
            )
    }

    /// Healthy when the cluster answers a linearizable read through the proxy within a second.
    async fn health(&self) -> axum::response::Response {
        let probe = async {
            let link = self.up.link().await?;
            KvClient::new(link.channel)
                .range(RangeRequest {
                    key: b"health".to_vec(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
        };
        let healthy = matches!(
            tokio::time::timeout(Duration::from_secs(1), probe).await,
            Ok(Ok(()))
        );
        // A permission error still means the cluster answered (etcd counts it healthy too).
        let (status, body) = if healthy {
            (StatusCode::OK, r#"{"health":"true"}"#)
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, r#"{"health":"false"}"#)
        };
        (status, [("content-type", "application/json")], body).into_response()
    }
}

/// Runs `quorumkv grpc-proxy <verb>` until the process is stopped; an error is the reason it
/// could not start.
pub fn run(verb: GrpcProxyVerb) -> Result<(), String> {
    let GrpcProxyVerb::Start(flags) = verb;
    refuse_unbuilt(&flags)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(serve(*flags))
}

async fn serve(flags: GrpcProxyFlags) -> Result<(), String> {
    let client_tls = client_tls(&flags)?;
    let proxy = Proxy::start(&flags)?;
    let addr: SocketAddr = super::listen_address(&flags.listen_addr).await?;
    let listener = crate::io::tcp::listen(addr)
        .map_err(|e| format!("listen tcp {}: {e}", flags.listen_addr))?;
    tracing::info!(%addr, endpoints = ?proxy.up.endpoints(), tls = client_tls.is_some(), "grpc-proxy serving client requests");
    let max_decode = flags.max_send_bytes + crate::api::GRPC_OVERHEAD_BYTES;
    // KV calls take the short path; the rest go to the routed services.
    let service = tower_layer::Layer::layer(
        &unary::ProxyUnaryLayer::new(proxy.kv(), max_decode),
        tonic::service::Routes::from(proxy.router(max_decode)).prepare(),
    );
    let max_streams = Some(flags.max_concurrent_streams)
        .filter(|n| *n > 0)
        .unwrap_or(u32::MAX);
    let mut servers = vec![tokio::spawn(crate::api::serve(
        listener,
        service,
        client_tls,
        max_streams,
        std::future::pending(),
    ))];
    if !flags.metrics_addr.is_empty() {
        let url = flags.metrics_addr.clone();
        let host = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or(&url);
        let addr = super::listen_address(host).await?;
        let listener = crate::io::tcp::listen(addr)
            .map_err(|e| format!("listen tcp {url} (--metrics-addr): {e}"))?;
        tracing::info!(%addr, "grpc-proxy serving /metrics and /health");
        let service = tonic::service::Routes::from(proxy.probe_routes()).prepare();
        servers.push(tokio::spawn(crate::api::serve(
            listener,
            service,
            None,
            max_streams,
            std::future::pending(),
        )));
    }
    tokio::select! {
        _ = crate::io::stop::signal() => {
            tracing::info!("grpc-proxy stopping");
            Ok(())
        }
        _ = servers.remove(0) => Err("the grpc-proxy's listener stopped".into()),
    }
}

/// The TLS of the proxy's own port (`--cert-file`, `--key-file`, `--trusted-ca-file`,
/// `--auto-tls`).
fn client_tls(flags: &GrpcProxyFlags) -> Result<Option<Arc<ServerTls>>, String> {
    let options = TlsOptions {
        cert_file: flags.cert_file.clone(),
        key_file: flags.key_file.clone(),
        trusted_ca_file: flags.trusted_ca_file.clone(),
        client_cert_auth: flags.trusted_ca_file.is_some(),
        auto_tls: flags.auto_tls,
        cipher_suites: flags.listen_cipher_suites.clone(),
        ..Default::default()
    };
    if !options.is_set() {
        return Ok(None);
    }
    let hosts = vec![flags
        .listen_addr
        .rsplit_once(':')
        .map(|(h, _)| h.to_string())
        .unwrap_or_else(|| "127.0.0.1".into())];
    let options = options.resolve_auto(&flags.data_dir.join("fixtures").join("proxy"), &hosts)?;
    ServerTls::new(options, &[b"h2", b"http/1.1"], "client").map(Some)
}
