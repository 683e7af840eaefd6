//! The `quorumkv` server: etcd's flags (each also from `QUORUMKV_<FLAG>`), etcd's ports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use mimalloc::MiMalloc;
use quorumkv::api::{AuthorityFix, KvService, MaintenanceService, GRPC_OVERHEAD_BYTES};
use quorumkv::io::tcp::serve_peers;
use quorumkv::io::transport::INBOX_BATCHES;
use quorumkv::io::{os_seed, SledBackend, StdDisk, TcpTransport, TokioClock};
use quorumkv::proto::etcdserverpb::kv_server::KvServer as KvGrpc;
use quorumkv::proto::etcdserverpb::maintenance_server::MaintenanceServer as MaintenanceGrpc;
use quorumkv::server::{start_member, MemberConfig};
use quorumkv::wal::WalOptions;
use tonic::codegen::tokio_stream::{wrappers::TcpListenerStream, StreamExt};

/// The request path allocates per request on many threads; glibc's malloc contends there.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "quorumkv",
    version,
    about = "A Raft key/value store that speaks etcd's v3 API"
)]
struct Flags {
    /// Human-readable name for this member.
    #[arg(long, env = "QUORUMKV_NAME", default_value = "default")]
    name: String,
    /// Path to the data directory (default: <name>.quorumkv).
    #[arg(long, env = "QUORUMKV_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// URLs to listen on for client traffic.
    #[arg(
        long,
        env = "QUORUMKV_LISTEN_CLIENT_URLS",
        default_value = "http://127.0.0.1:2379"
    )]
    listen_client_urls: String,
    /// Client URLs of this member to advertise.
    #[arg(
        long,
        env = "QUORUMKV_ADVERTISE_CLIENT_URLS",
        default_value = "http://127.0.0.1:2379"
    )]
    advertise_client_urls: String,
    /// URLs to listen on for peer traffic.
    #[arg(
        long,
        env = "QUORUMKV_LISTEN_PEER_URLS",
        default_value = "http://127.0.0.1:2380"
    )]
    listen_peer_urls: String,
    /// Peer URLs of this member to advertise.
    #[arg(
        long,
        env = "QUORUMKV_INITIAL_ADVERTISE_PEER_URLS",
        default_value = "http://127.0.0.1:2380"
    )]
    initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping: name=peer-url,...
    #[arg(long, env = "QUORUMKV_INITIAL_CLUSTER")]
    initial_cluster: Option<String>,
    /// Initial cluster state ('new' or 'existing').
    #[arg(long, env = "QUORUMKV_INITIAL_CLUSTER_STATE", default_value = "new")]
    initial_cluster_state: String,
    /// Initial cluster token, for the cluster during bootstrap.
    #[arg(
        long,
        env = "QUORUMKV_INITIAL_CLUSTER_TOKEN",
        default_value = "etcd-cluster"
    )]
    initial_cluster_token: String,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "QUORUMKV_HEARTBEAT_INTERVAL", default_value_t = 100)]
    heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "QUORUMKV_ELECTION_TIMEOUT", default_value_t = 1000)]
    election_timeout: u64,
    /// Number of committed transactions to trigger a snapshot to disk.
    #[arg(long, env = "QUORUMKV_SNAPSHOT_COUNT", default_value_t = 100_000)]
    snapshot_count: u64,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "QUORUMKV_MAX_REQUEST_BYTES", default_value_t = 1_572_864)]
    max_request_bytes: usize,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "QUORUMKV_MAX_TXN_OPS", default_value_t = 128)]
    max_txn_ops: usize,
    /// Raise alarms when backend size exceeds the given quota (0 defaults to low space quota).
    /// Accepted for compatibility; the quota is not enforced yet.
    #[arg(long, env = "QUORUMKV_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    quota_backend_bytes: u64,
    /// Log level: debug, info, warn, error.
    #[arg(long, env = "QUORUMKV_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log format: text or json.
    #[arg(long, env = "QUORUMKV_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn init_logging(flags: &Flags) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&flags.log_level)
        .map_err(|e| format!("invalid --log-level {:?}: {e}", flags.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if flags.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}

/// `http://host:port` → a socket address to bind.
fn parse_listen_url(url: &str) -> Result<SocketAddr, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    if parsed.scheme() != "http" {
        return Err(format!(
            "URL {url:?}: only http:// is supported (TLS is not built yet)"
        ));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("URL {url:?} has no host"))?;
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| format!("URL {url:?} has no port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{port}").parse::<SocketAddr>().or_else(|_| {
        std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| format!("URL {url:?}: cannot resolve host {host:?}"))
    })
}

fn split_urls(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

/// FNV-1a: stable member and cluster ids derived from names, URLs and the cluster token.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash.max(1)
}

/// The other members of a new cluster: id and peer URLs.
type Peers = Vec<(u64, Vec<String>)>;

fn member_config(flags: &Flags) -> Result<(MemberConfig, Peers), String> {
    if flags.initial_cluster_state != "new" && flags.initial_cluster_state != "existing" {
        return Err(format!(
            "invalid --initial-cluster-state {:?} (want 'new' or 'existing')",
            flags.initial_cluster_state
        ));
    }
    let initial_cluster = flags
        .initial_cluster
        .clone()
        .unwrap_or_else(|| format!("{}={}", flags.name, flags.initial_advertise_peer_urls));
    let mut members: Vec<(String, Vec<String>)> = Vec::new();
    for item in initial_cluster
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (name, url) = item
            .split_once('=')
            .ok_or_else(|| format!("invalid --initial-cluster entry {item:?} (want name=url)"))?;
        match members.iter_mut().find(|(n, _)| n == name) {
            Some((_, urls)) => urls.push(url.to_string()),
            None => members.push((name.to_string(), vec![url.to_string()])),
        }
    }
    if !members.iter().any(|(n, _)| *n == flags.name) {
        return Err(format!(
            "couldn't find local name {:?} in the initial cluster configuration",
            flags.name
        ));
    }
    if members.len() > 1 && flags.initial_cluster_state == "existing" {
        return Err("joining a running cluster (--initial-cluster-state existing) is not supported yet: it needs the Cluster service (MemberAdd)".into());
    }
    let ids: Vec<u64> = members
        .iter()
        .map(|(_, urls)| {
            let mut urls = urls.clone();
            urls.sort();
            let joined = urls.join(",");
            fnv1a(&[&joined, &flags.initial_cluster_token])
        })
        .collect();
    let member_id = ids[members
        .iter()
        .position(|(n, _)| *n == flags.name)
        .unwrap_or(0)];
    let mut sorted_ids = ids.clone();
    sorted_ids.sort_unstable();
    let id_strings: Vec<String> = sorted_ids.iter().map(|id| format!("{id:x}")).collect();
    let id_refs: Vec<&str> = id_strings.iter().map(String::as_str).collect();
    let cluster_id = fnv1a(&id_refs);
    if flags.heartbeat_interval == 0 || flags.election_timeout < 5 * flags.heartbeat_interval {
        return Err("--election-timeout should be at least 5 times --heartbeat-interval".into());
    }
    let data_dir = flags
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.quorumkv", flags.name)));
    let peers: Peers = ids
        .iter()
        .zip(&members)
        .filter(|(id, _)| **id != member_id)
        .map(|(id, (_, urls))| (*id, urls.clone()))
        .collect();
    let config = MemberConfig {
        member_id,
        cluster_id,
        initial_voters: ids,
        member_dir: data_dir.join("member"),
        heartbeat_interval: Duration::from_millis(flags.heartbeat_interval),
        election_timeout: Duration::from_millis(flags.election_timeout),
        snapshot_count: flags.snapshot_count,
        max_request_bytes: flags.max_request_bytes,
        max_txn_ops: flags.max_txn_ops,
        wal: WalOptions::default(),
        id_seed: os_seed(),
        snapshot_catch_up_entries: quorumkv::server::SNAPSHOT_CATCH_UP_ENTRIES,
    };
    Ok((config, peers))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("received SIGTERM, shutting down"),
                    _ = int.recv() => tracing::info!("received SIGINT, shutting down"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(flags: Flags) -> Result<(), String> {
    let (config, peers) = member_config(&flags)?;
    let peer_addrs = split_urls(&flags.listen_peer_urls)
        .iter()
        .map(|u| parse_listen_url(u))
        .collect::<Result<Vec<_>, _>>()?;
    let client_addrs = split_urls(&flags.listen_client_urls)
        .iter()
        .map(|u| parse_listen_url(u))
        .collect::<Result<Vec<_>, _>>()?;
    let disk = StdDisk::shared();
    disk.create_dir_all(&config.member_dir).map_err(|e| {
        format!(
            "cannot create data dir {}: {e}",
            config.member_dir.display()
        )
    })?;
    let backend = Arc::new(
        SledBackend::open(&config.db_path())
            .map_err(|e| format!("cannot open backend {}: {e}", config.db_path().display()))?,
    );
    // Peers: batches from members of this cluster reach the node's inbox.
    let (inbox_tx, inbox) = tokio::sync::mpsc::channel(INBOX_BATCHES);
    for addr in peer_addrs {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen for peers on {addr}: {e}"))?;
        tracing::info!(%addr, "serving peers");
        let inbox_tx = inbox_tx.clone();
        let cluster_id = config.cluster_id;
        tokio::spawn(async move {
            if let Err(e) = serve_peers(listener, cluster_id, inbox_tx).await {
                tracing::error!(%addr, error = %e, "peer listener failed");
            }
        });
    }
    drop(inbox_tx);
    let transport = TcpTransport::new(config.cluster_id, config.member_id);
    for (id, urls) in &peers {
        if let Some(url) = urls.first() {
            transport.set_peer(*id, url);
        }
    }
    let member = start_member(
        &config,
        disk,
        backend.clone(),
        Arc::new(transport),
        inbox,
        Arc::new(TokioClock::new()),
    )
    .map_err(|e| e.to_string())?;
    tracing::info!(name = %flags.name, member_id = format!("{:x}", config.member_id),
        cluster_id = format!("{:x}", config.cluster_id), data_dir = %config.member_dir.display(), "member started");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for addr in client_addrs {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        tracing::info!(%addr, "serving client requests");
        let max_decode = config.max_request_bytes + GRPC_OVERHEAD_BYTES;
        let kv = KvGrpc::new(KvService::new(member.kv.clone()))
            .max_decoding_message_size(max_decode)
            .max_encoding_message_size(usize::MAX);
        let maintenance = MaintenanceGrpc::new(MaintenanceService::new(member.kv.clone()))
            .max_decoding_message_size(max_decode)
            .max_encoding_message_size(usize::MAX);
        let mut stop = stop_rx.clone();
        // etcdctl's `endpoint status` sends the endpoint URL as :authority, which h2 refuses.
        let incoming = TcpListenerStream::new(listener).map(|accepted| {
            let stream = accepted?;
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(AuthorityFix::new(stream))
        });
        servers.push(tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(kv)
                .add_service(maintenance)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                }),
        ));
    }

    let mut node_task = member.node_task;
    let mut apply_task = member.apply_task;
    let outcome = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        ended = &mut apply_task => match ended {
            Ok(Ok(())) => Err("apply loop stopped".to_string()),
            Ok(Err(e)) => Err(format!("fatal backend error: {e}")),
            Err(e) => Err(format!("apply loop crashed: {e}")),
        },
        ended = &mut node_task => match ended {
            Ok(Ok(())) => Err("raft node stopped".to_string()),
            Ok(Err(e)) => Err(format!("fatal storage error: {e}")),
            Err(e) => Err(format!("raft node crashed: {e}")),
        },
    };
    let _ = stop_tx.send(true);
    for server in servers {
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    if let Err(e) = quorumkv::io::Backend::flush(backend.as_ref()) {
        tracing::error!(error = %e, "backend flush at shutdown failed");
    }
    outcome
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    if let Err(e) = init_logging(&flags) {
        eprintln!("quorumkv: {e}");
        return ExitCode::from(2);
    }
    if flags.quota_backend_bytes != 0 {
        tracing::warn!("--quota-backend-bytes is accepted but not enforced yet");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("quorumkv: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(flags)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("quorumkv: {e}");
            ExitCode::FAILURE
        }
    }
}
