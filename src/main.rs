//! The `quorumkv` server: etcd's flags (each also from `QUORUMKV_<FLAG>`), etcd's ports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use mimalloc::MiMalloc;
use prost::Message as _;
use quorumkv::api::{
    fallback, gateway_routes, probe_routes, serve, AuthService, ClusterService, ElectionService,
    GrpcMetrics, KvService, LeaseService, LockService, MaintenanceService, UnaryKvLayer,
    WatchService, GRPC_OVERHEAD_BYTES,
};
use quorumkv::cluster::Members;
use quorumkv::io::tcp::{fetch_directory, serve_peers, Directory, PeerTls};
use quorumkv::io::transport::INBOX_BATCHES;
use quorumkv::io::{os_seed, SledBackend, StdDisk, TcpTransport, TokioClock};
use quorumkv::mvcc::MvccError;
use quorumkv::proto::etcdserverpb::auth_server::AuthServer as AuthGrpc;
use quorumkv::proto::etcdserverpb::cluster_server::ClusterServer as ClusterGrpc;
use quorumkv::proto::etcdserverpb::kv_server::KvServer as KvGrpc;
use quorumkv::proto::etcdserverpb::lease_server::LeaseServer as LeaseGrpc;
use quorumkv::proto::etcdserverpb::maintenance_server::MaintenanceServer as MaintenanceGrpc;
use quorumkv::proto::etcdserverpb::Member;
use quorumkv::proto::quorumkvpb::ClusterMembers;
use quorumkv::proto::v3electionpb::election_server::ElectionServer as ElectionGrpc;
use quorumkv::proto::v3lockpb::lock_server::LockServer as LockGrpc;
use quorumkv::server::StartError;
use quorumkv::server::{start_member, AutoCompaction, KvServer, MemberConfig};
use quorumkv::tls::{is_https, ClientTls, ServerTls, TlsOptions};
use quorumkv::wal::{WalError, WalOptions};
use tower_layer::Layer as _;

/// How long a member waits before announcing its name and client URLs again.
const PUBLISH_RETRY: Duration = Duration::from_millis(500);

/// What an operator does about a member whose data on disk is damaged.
const DAMAGED_DATA: &str = "the member's data is damaged: restore its data dir from a snapshot (`quorumkv snapshot restore`), or remove the member (`etcdctl member remove`) and add it back with an empty data dir";

/// The key index a clean stop saves, in the member's directory.
const SAVED_INDEX_FILE: &str = "index";

/// How long a clean shutdown waits for the node, then the apply loop, to finish.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(4);

/// How often the leader looks for learners to promote (`--auto-promote-learners`).
const AUTO_PROMOTE_INTERVAL: Duration = Duration::from_secs(1);

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
    #[command(subcommand)]
    command: Option<Tool>,
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
    /// Maximum concurrent streams that each client can open at a time (HTTP/2's
    /// SETTINGS_MAX_CONCURRENT_STREAMS on the client port; etcd's default: no limit).
    #[arg(long, env = "QUORUMKV_MAX_CONCURRENT_STREAMS", default_value_t = u32::MAX)]
    max_concurrent_streams: u32,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "QUORUMKV_MAX_TXN_OPS", default_value_t = 128)]
    max_txn_ops: usize,
    /// Raise alarms when backend size exceeds the given quota (0 defaults to etcd's 2 GiB).
    #[arg(long, env = "QUORUMKV_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    quota_backend_bytes: u64,
    /// The backend's page cache, at most, in bytes (quorumkv's own flag: etcd's bolt backend
    /// leaves caching to the kernel).
    #[arg(long, env = "QUORUMKV_BACKEND_CACHE_BYTES", default_value_t = quorumkv::metrics::memory::DEFAULT_BACKEND_CACHE_BYTES)]
    backend_cache_bytes: u64,
    /// Log entries kept behind a snapshot for slow followers (etcd 3.5's experimental flag).
    #[arg(
        long,
        env = "QUORUMKV_EXPERIMENTAL_SNAPSHOT_CATCHUP_ENTRIES",
        default_value_t = quorumkv::server::SNAPSHOT_CATCH_UP_ENTRIES
    )]
    experimental_snapshot_catchup_entries: u64,
    /// Reject reconfiguration requests that would cause quorum loss.
    #[arg(long, env = "QUORUMKV_STRICT_RECONFIG_CHECK", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    strict_reconfig_check: bool,
    /// Promote a learner to a voting member as soon as it has caught up with the leader
    /// (not in etcd).
    #[arg(long, env = "QUORUMKV_AUTO_PROMOTE_LEARNERS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    auto_promote_learners: bool,
    /// Serve etcd's v2 keys API (`/v2/keys`, `/v2/members`, `/v2/stats`) on the client port.
    #[arg(long, env = "QUORUMKV_ENABLE_V2", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    enable_v2: bool,
    /// Path to etcd's YAML configuration file; when given, it alone configures the member
    /// (other flags and environment variables are ignored), as with etcd.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// More URLs to serve /metrics and /health on (plain HTTP).
    #[arg(long, env = "QUORUMKV_LISTEN_METRICS_URLS")]
    listen_metrics_urls: Option<String>,
    /// Compare this member's HashKV with its peers' before serving clients; a mismatch stops it.
    #[arg(long, env = "QUORUMKV_EXPERIMENTAL_INITIAL_CORRUPT_CHECK", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    experimental_initial_corrupt_check: bool,
    /// How often the leader compares every member's HashKV at one revision (0: never).
    #[arg(long, env = "QUORUMKV_EXPERIMENTAL_CORRUPT_CHECK_TIME", default_value = "0s", value_parser = quorumkv::config::parse_duration)]
    experimental_corrupt_check_time: Duration,
    /// After each compaction, the leader compares the members' hashes at the compacted revision
    /// (etcd 3.6's compaction hash check).
    #[arg(long, env = "QUORUMKV_EXPERIMENTAL_COMPACT_HASH_CHECK_ENABLED", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    experimental_compact_hash_check_enabled: bool,
    /// How often the leader looks for a compaction to check the hashes of.
    #[arg(long, env = "QUORUMKV_EXPERIMENTAL_COMPACT_HASH_CHECK_TIME", default_value = "1m", value_parser = quorumkv::config::parse_duration)]
    experimental_compact_hash_check_time: Duration,
    /// How often watchers that asked for progress notifications get one.
    #[arg(long, env = "QUORUMKV_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value = "10m", value_parser = quorumkv::config::parse_duration)]
    experimental_watch_progress_notify_interval: Duration,
    /// Interpret --auto-compaction-retention as a time span ('periodic') or a number of
    /// revisions ('revision').
    #[arg(long, env = "QUORUMKV_AUTO_COMPACTION_MODE", default_value = "periodic", value_parser = ["periodic", "revision"])]
    auto_compaction_mode: String,
    /// Auto compaction retention: a duration ('1h', '30m'; a bare number is hours) in periodic
    /// mode, a number of revisions in revision mode; 0 turns it off.
    #[arg(long, env = "QUORUMKV_AUTO_COMPACTION_RETENTION", default_value = "0")]
    auto_compaction_retention: String,
    /// Token type: 'simple' (random tokens issued through the log, known to every member), or
    /// 'jwt,pub-key=PATH,priv-key=PATH,sign-method=RS256|ES256|EdDSA|...[,ttl=5m]'.
    #[arg(long, env = "QUORUMKV_AUTH_TOKEN", default_value = "simple")]
    auth_token: String,
    /// Seconds a simple token stays valid without use.
    #[arg(long, env = "QUORUMKV_AUTH_TOKEN_TTL", default_value_t = 300)]
    auth_token_ttl: u64,
    /// Cost of the bcrypt hashes of user passwords (4 to 31).
    #[arg(long, env = "QUORUMKV_BCRYPT_COST", default_value_t = quorumkv::auth::DEFAULT_BCRYPT_COST)]
    bcrypt_cost: u32,
    /// Path to the client server TLS cert file.
    #[arg(long, env = "QUORUMKV_CERT_FILE")]
    cert_file: Option<PathBuf>,
    /// Path to the client server TLS key file.
    #[arg(long, env = "QUORUMKV_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Enable client cert authentication (a certificate signed by --trusted-ca-file is required).
    #[arg(long, env = "QUORUMKV_CLIENT_CERT_AUTH", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    client_cert_auth: bool,
    /// Path to the client server TLS trusted CA cert file.
    #[arg(long, env = "QUORUMKV_TRUSTED_CA_FILE")]
    trusted_ca_file: Option<PathBuf>,
    /// Client TLS using generated certificates.
    #[arg(long, env = "QUORUMKV_AUTO_TLS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    auto_tls: bool,
    /// Path to the peer server TLS cert file.
    #[arg(long, env = "QUORUMKV_PEER_CERT_FILE")]
    peer_cert_file: Option<PathBuf>,
    /// Path to the peer server TLS key file.
    #[arg(long, env = "QUORUMKV_PEER_KEY_FILE")]
    peer_key_file: Option<PathBuf>,
    /// Enable peer client cert authentication.
    #[arg(long, env = "QUORUMKV_PEER_CLIENT_CERT_AUTH", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    peer_client_cert_auth: bool,
    /// Path to the peer server TLS trusted CA file.
    #[arg(long, env = "QUORUMKV_PEER_TRUSTED_CA_FILE")]
    peer_trusted_ca_file: Option<PathBuf>,
    /// Peer TLS using generated certificates.
    #[arg(long, env = "QUORUMKV_PEER_AUTO_TLS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    peer_auto_tls: bool,
    /// Allowed CN for inter peer authentication.
    #[arg(long, env = "QUORUMKV_PEER_CERT_ALLOWED_CN")]
    peer_cert_allowed_cn: Option<String>,
    /// Comma-separated list of supported TLS cipher suites between client/server and peers
    /// (empty: rustls' defaults).
    #[arg(long, env = "QUORUMKV_CIPHER_SUITES", default_value = "")]
    cipher_suites: String,
    /// Minimum TLS version supported: TLS1.2 or TLS1.3.
    #[arg(long, env = "QUORUMKV_TLS_MIN_VERSION")]
    tls_min_version: Option<String>,
    /// Maximum TLS version supported: TLS1.2 or TLS1.3.
    #[arg(long, env = "QUORUMKV_TLS_MAX_VERSION")]
    tls_max_version: Option<String>,
    /// Log level: debug, info, warn, error.
    #[arg(long, env = "QUORUMKV_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log format: text or json.
    #[arg(long, env = "QUORUMKV_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// The offline tools, as `quorumkv <tool> <verb>`.
#[derive(clap::Subcommand, Debug)]
enum Tool {
    /// Snapshot files: save one from a running member, check one, restore one into a new
    /// data dir (etcdutl's verbs).
    Snapshot {
        #[command(subcommand)]
        verb: quorumkv::snapshot::SnapshotVerb,
    },
    /// etcd's L4 gateway: a TCP proxy in front of the cluster's client URLs (`gateway start`).
    Gateway {
        #[command(subcommand)]
        verb: quorumkv::proxy::GatewayVerb,
    },
    /// etcd's gRPC proxy: every v3 service, with watches, keep-alives and serializable reads
    /// coalesced (`grpc-proxy start`).
    GrpcProxy {
        #[command(subcommand)]
        verb: quorumkv::proxy::grpc::GrpcProxyVerb,
    },
}

fn init_logging(flags: &Flags) -> Result<(), String> {
    // sled's own log lines (about its files) are left out: quorumkv reports what they mean,
    // once, naming the file. `--log-level sled=debug` brings them back.
    let directives = if flags.log_level.contains("sled") {
        flags.log_level.clone()
    } else {
        format!("{},sled=off", flags.log_level)
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .map_err(|e| format!("invalid --log-level {:?}: {e}", flags.log_level))?;
    // Colours only for a person at a terminal: a log file or a collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if flags.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}

/// `http://host:port` (or `https://`) → a socket address to bind.
fn parse_listen_url(url: &str) -> Result<SocketAddr, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    if parsed.scheme() != "http" && parsed.scheme() != "https" {
        return Err(format!(
            "URL {url:?}: only http:// and https:// are supported"
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

/// The other members this member starts talking to: id and peer URLs.
type Peers = Vec<(u64, Vec<String>)>;

/// `--initial-cluster` as (name, peer URLs), in the order given.
fn initial_cluster(flags: &Flags) -> Result<Vec<(String, Vec<String>)>, String> {
    let initial_cluster = flags
        .initial_cluster
        .clone()
        .unwrap_or_else(|| format!("{}={}", flags.name, flags.initial_advertise_peer_urls));
    quorumkv::cluster::parse_initial_cluster(&initial_cluster, &flags.name)
}

/// Who this member is: its id, its cluster's id, and (for a brand-new cluster) the initial
/// members.
struct Identity {
    member_id: u64,
    cluster_id: u64,
    initial_members: Vec<Member>,
    peers: Peers,
    /// Not kept in the data dir yet: written once the member has started, so that a start
    /// that fails (a bad flag, a port in use) leaves nothing that a corrected retry would obey.
    unsaved: bool,
}

/// A new cluster: every member derives the same ids from --initial-cluster and the token.
fn new_cluster(flags: &Flags, members: &[(String, Vec<String>)]) -> Identity {
    let (cluster_id, initial_members) =
        quorumkv::cluster::new_cluster_members(members, &flags.initial_cluster_token);
    let member_id = initial_members
        .iter()
        .find(|m| m.name == flags.name)
        .map_or(0, |m| m.id);
    Identity {
        member_id,
        cluster_id,
        peers: peers_of(&initial_members, member_id),
        initial_members,
        unsaved: true,
    }
}

fn peers_of(members: &[Member], member_id: u64) -> Peers {
    members
        .iter()
        .filter(|m| m.id != member_id && !m.peer_ur_ls.is_empty())
        .map(|m| (m.id, m.peer_ur_ls.clone()))
        .collect()
}

/// Joining a running cluster (--initial-cluster-state existing): ask the other members listed
/// in --initial-cluster who is in the cluster; this member must have been added already
/// (`etcdctl member add`), under its --initial-advertise-peer-urls.
async fn join_cluster(
    flags: &Flags,
    members: &[(String, Vec<String>)],
) -> Result<Identity, String> {
    let mut own_urls = split_urls(&flags.initial_advertise_peer_urls);
    own_urls.sort();
    let mut errors = Vec::new();
    for (_, urls) in members.iter().filter(|(name, _)| *name != flags.name) {
        for url in urls {
            let answer = match fetch_directory(url, &peer_tls()).await {
                Ok(answer) => answer,
                Err(e) => {
                    errors.push(format!("{url}: {e}"));
                    continue;
                }
            };
            let directory = ClusterMembers::decode(answer.as_slice())
                .map_err(|e| format!("peer {url} sent an unreadable member list: {e}"))?;
            let me = directory.members.iter().find(|m| {
                let mut urls = m.peer_ur_ls.clone();
                urls.sort();
                urls == own_urls
            });
            let Some(me) = me else {
                return Err(format!(
                    "this member (peer URLs {}) is not a member of the cluster at {url}: add it first with `etcdctl member add {} --peer-urls={}`",
                    own_urls.join(","),
                    flags.name,
                    own_urls.join(",")
                ));
            };
            if !me.name.is_empty() {
                return Err(format!(
                    "member {:x} (peer URLs {}) has already been bootstrapped as {:?}; start it from its own data dir",
                    me.id,
                    own_urls.join(","),
                    me.name
                ));
            }
            return Ok(Identity {
                member_id: me.id,
                cluster_id: directory.cluster_id,
                initial_members: vec![],
                peers: peers_of(&directory.members, me.id),
                unsaved: true,
            });
        }
    }
    Err(format!(
        "cannot join the cluster: no member listed in --initial-cluster answered ({})",
        errors.join("; ")
    ))
}

/// The identity a member keeps in its data dir (`member/identity`): restarts use it and
/// ignore the --initial-* flags, as etcd does.
fn read_identity(path: &Path) -> Result<Option<(u64, u64)>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .ok_or_else(|| format!("{} has no valid {name}", path.display()))
    };
    Ok(Some((field("member-id=")?, field("cluster-id=")?)))
}

fn write_identity(path: &Path, member_id: u64, cluster_id: u64) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let tmp = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&tmp).map_err(fail)?;
        std::io::Write::write_all(
            &mut file,
            format!("member-id={member_id:x}\ncluster-id={cluster_id:x}\n").as_bytes(),
        )
        .map_err(fail)?;
        file.sync_all().map_err(fail)?;
    }
    std::fs::rename(&tmp, path).map_err(fail)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(fail)?;
    }
    Ok(())
}

async fn identity(flags: &Flags, member_dir: &Path) -> Result<Identity, String> {
    if flags.initial_cluster_state != "new" && flags.initial_cluster_state != "existing" {
        return Err(format!(
            "invalid --initial-cluster-state {:?} (want 'new' or 'existing')",
            flags.initial_cluster_state
        ));
    }
    let path = member_dir.join("identity");
    if let Some((member_id, cluster_id)) = read_identity(&path)? {
        tracing::info!(
            member_id = format!("{member_id:x}"),
            "restarting from the data dir; --initial-cluster flags are ignored"
        );
        return Ok(Identity {
            member_id,
            cluster_id,
            initial_members: vec![],
            peers: vec![], // from the membership kept in the data dir
            unsaved: false,
        });
    }
    let members = initial_cluster(flags)?;
    let has_wal = std::fs::read_dir(member_dir.join("wal"))
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false);
    match (flags.initial_cluster_state.as_str(), has_wal) {
        ("existing", false) => join_cluster(flags, &members).await,
        ("existing", true) => Err(format!(
            "{} has a WAL but no identity file: this member stopped while joining; remove the data dir and start it again to join",
            member_dir.display()
        )),
        // A new cluster's ids follow from the flags, the same on every start.
        _ => Ok(new_cluster(flags, &members)),
    }
}

fn member_config(
    flags: &Flags,
    identity: &Identity,
    data_dir: &Path,
) -> Result<MemberConfig, String> {
    if flags.heartbeat_interval == 0 || flags.election_timeout < 5 * flags.heartbeat_interval {
        return Err("--election-timeout should be at least 5 times --heartbeat-interval".into());
    }
    let jwt = match flags.auth_token.split_once(',') {
        _ if flags.auth_token.eq_ignore_ascii_case("simple") => None,
        Some((kind, options)) if kind.eq_ignore_ascii_case("jwt") => Some(Arc::new(
            quorumkv::auth::JwtTokens::from_options(options)?,
        )),
        _ => {
            return Err(format!(
                "--auth-token {:?}: expected 'simple' or 'jwt,pub-key=...,priv-key=...,sign-method=...'",
                flags.auth_token
            ))
        }
    };
    if !(4..=31).contains(&flags.bcrypt_cost) {
        return Err(format!(
            "--bcrypt-cost {} is out of range: it must be between 4 and 31",
            flags.bcrypt_cost
        ));
    }
    if flags.auth_token_ttl == 0 {
        return Err("--auth-token-ttl must be at least 1 second".into());
    }
    Ok(MemberConfig {
        auth: quorumkv::server::AuthConfig {
            bcrypt_cost: flags.bcrypt_cost,
            token_ttl: Duration::from_secs(flags.auth_token_ttl),
            jwt,
        },
        watch_progress_notify_interval: flags.experimental_watch_progress_notify_interval,
        quota_backend_bytes: flags.quota_backend_bytes,
        member_id: identity.member_id,
        cluster_id: identity.cluster_id,
        initial_voters: identity.initial_members.iter().map(|m| m.id).collect(),
        member_dir: data_dir.join("member"),
        heartbeat_interval: Duration::from_millis(flags.heartbeat_interval),
        election_timeout: Duration::from_millis(flags.election_timeout),
        snapshot_count: flags.snapshot_count,
        max_request_bytes: flags.max_request_bytes,
        max_txn_ops: flags.max_txn_ops,
        strict_reconfig_check: flags.strict_reconfig_check,
        wal: WalOptions::default(),
        id_seed: os_seed(),
        snapshot_catch_up_entries: flags.experimental_snapshot_catchup_entries,
        snapshot_chunk_bytes: quorumkv::raft::SNAPSHOT_CHUNK_BYTES,
        initial_members: identity.initial_members.clone(),
        saved_index: Some(data_dir.join("member").join(SAVED_INDEX_FILE)),
    })
}

/// What this member answers a peer asking who is in the cluster.
fn directory_of(kv: &KvServer, cluster_id: u64) -> ClusterMembers {
    ClusterMembers {
        cluster_id,
        members: kv.members(),
        applied_index: kv.status().raft_applied_index,
    }
}

/// A member removed while it could not hear about it (the leader stops sending to it) finds
/// out from its peers: when one has applied more of the log than this member and no longer
/// lists it, it was removed in between. It then stops, as etcd's removed members do.
async fn notice_removal(
    kv: KvServer,
    cluster_id: u64,
    election_timeout: Duration,
    removed: tokio::sync::oneshot::Sender<()>,
) {
    let mut leaderless = Duration::ZERO;
    let step = election_timeout.max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(step).await;
        if kv.status().leader != 0 {
            leaderless = Duration::ZERO;
            continue;
        }
        leaderless += step;
        if leaderless < 3 * step {
            continue;
        }
        let me = kv.member_id();
        let applied = kv.status().raft_applied_index;
        let members = kv.members();
        if !members.iter().any(|m| m.id == me) {
            continue; // not joined yet
        }
        for peer in members.iter().filter(|m| m.id != me) {
            for url in &peer.peer_ur_ls {
                let Ok(answer) = fetch_directory(url, &peer_tls()).await else {
                    continue;
                };
                let Ok(directory) = ClusterMembers::decode(answer.as_slice()) else {
                    continue;
                };
                if directory.cluster_id == cluster_id
                    && directory.applied_index > applied
                    && !directory.members.iter().any(|m| m.id == me)
                {
                    let _ = removed.send(());
                    return;
                }
            }
        }
    }
}

/// Keeps the peer transport in step with the membership the apply loop keeps.
async fn follow_members(
    mut members: tokio::sync::watch::Receiver<Members>,
    transport: TcpTransport,
    member_id: u64,
) {
    let mut known: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    loop {
        let list = members.borrow_and_update().list();
        let now: std::collections::BTreeSet<u64> = list.iter().map(|m| m.id).collect();
        for member in list.iter().filter(|m| m.id != member_id) {
            if let Some(url) = member.peer_ur_ls.first() {
                transport.set_peer(member.id, url);
            }
        }
        for gone in known.difference(&now) {
            transport.remove_peer(*gone);
        }
        known = now;
        if members.changed().await.is_err() {
            return;
        }
    }
}

/// Announces this member's name and client URLs until they are in the membership.
async fn publish(kv: KvServer, name: String, client_urls: Vec<String>) {
    while !kv.published(&name, &client_urls) {
        match kv.publish(&name, &client_urls).await {
            Ok(()) if kv.published(&name, &client_urls) => {
                tracing::info!(
                    name,
                    ?client_urls,
                    "published this member's name and client URLs"
                )
            }
            // Applied, but this member is not (or no longer) in the membership.
            Ok(()) => tokio::time::sleep(PUBLISH_RETRY).await,
            Err(e) => {
                tracing::debug!(error = %e, "cannot publish this member's attributes yet");
                tokio::time::sleep(PUBLISH_RETRY).await;
            }
        }
    }
}

/// `--auto-promote-learners`: the leader promotes each learner once it has caught up.
async fn auto_promote(kv: KvServer) {
    let mut every = tokio::time::interval(AUTO_PROMOTE_INTERVAL);
    loop {
        every.tick().await;
        kv.promote_ready_learners().await;
    }
}

/// What the raft node's task ending says about the member.
fn node_outcome(ended: Result<Result<(), WalError>, tokio::task::JoinError>) -> Result<(), String> {
    match ended {
        // The node stops by itself only when it applied its own removal.
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("fatal storage error: {e}")),
        Err(e) => Err(format!("raft node crashed: {e}")),
    }
}

/// etcd's check of an existing data dir: others must not be able to read it.
fn warn_if_open_to_others(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(dir) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %dir.display(),
                    permission = format!("{mode:o}"),
                    recommended = "700",
                    "the data dir can be read by other users: `chmod 700` it to keep its keys and values private"
                );
            }
        }
    }
}

/// The peer port's TLS, set once at start (joining and removal checks dial peers too).
static PEER_TLS: std::sync::OnceLock<PeerTls> = std::sync::OnceLock::new();

fn peer_tls() -> PeerTls {
    PEER_TLS.get().cloned().unwrap_or_default()
}

/// The hosts of `urls`, for a self-signed certificate (`--auto-tls`).
fn hosts_of(urls: &str) -> Vec<String> {
    let mut hosts: Vec<String> = split_urls(urls)
        .iter()
        .filter_map(|u| url::Url::parse(u).ok()?.host_str().map(str::to_string))
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

/// The client and peer ports' TLS, from the flags (as etcd: https:// URLs need a certificate
/// or auto TLS).
struct Security {
    client: Option<Arc<ServerTls>>,
    /// For requests forwarded to the leader's client URL.
    client_dial: Option<Arc<ClientTls>>,
    peer: PeerTls,
}

fn security(flags: &Flags, data_dir: &Path) -> Result<Security, String> {
    let suites: Vec<String> = split_urls(&flags.cipher_suites);
    // An empty file name (`cert-file: ''` in etcd's YAML) is no file.
    let file = |f: &Option<PathBuf>| f.clone().filter(|p| !p.as_os_str().is_empty());
    let text = |t: &Option<String>| t.clone().filter(|t| !t.trim().is_empty());
    let client = TlsOptions {
        cert_file: file(&flags.cert_file),
        key_file: file(&flags.key_file),
        trusted_ca_file: file(&flags.trusted_ca_file),
        client_cert_auth: flags.client_cert_auth,
        auto_tls: flags.auto_tls,
        allowed_cn: None,
        cipher_suites: suites.clone(),
        min_version: text(&flags.tls_min_version),
        max_version: text(&flags.tls_max_version),
    };
    let peer = TlsOptions {
        cert_file: file(&flags.peer_cert_file),
        key_file: file(&flags.peer_key_file),
        trusted_ca_file: file(&flags.peer_trusted_ca_file),
        client_cert_auth: flags.peer_client_cert_auth,
        auto_tls: flags.peer_auto_tls,
        allowed_cn: flags
            .peer_cert_allowed_cn
            .clone()
            .filter(|cn| !cn.is_empty()),
        cipher_suites: suites,
        min_version: text(&flags.tls_min_version),
        max_version: text(&flags.tls_max_version),
    };
    let fixtures = data_dir.join("fixtures");
    let client = client.resolve_auto(
        &fixtures.join("client"),
        &hosts_of(&format!(
            "{},{}",
            flags.listen_client_urls, flags.advertise_client_urls
        )),
    )?;
    let peer = peer.resolve_auto(
        &fixtures.join("peer"),
        &hosts_of(&format!(
            "{},{}",
            flags.listen_peer_urls, flags.initial_advertise_peer_urls
        )),
    )?;
    for url in split_urls(&flags.listen_client_urls) {
        if is_https(&url) && !client.is_set() {
            return Err(format!("TLS key/cert (--cert-file, --key-file) must be provided for client url {url} with HTTPS scheme"));
        }
    }
    for url in split_urls(&flags.listen_peer_urls) {
        if is_https(&url) && !peer.is_set() {
            return Err(format!("TLS key/cert (--peer-cert-file, --peer-key-file) must be provided for peer url {url} with HTTPS scheme"));
        }
    }
    const H2: &[u8] = b"h2";
    const HTTP1: &[u8] = b"http/1.1";
    let (client_tls, client_dial) = if client.is_set() {
        (
            Some(
                ServerTls::new(client.clone(), &[H2, HTTP1], "client")
                    .map_err(|e| format!("client TLS: {e}"))?,
            ),
            ClientTls::new(client, &[H2]).ok(),
        )
    } else {
        (None, None)
    };
    let peer_tls = if peer.is_set() {
        PeerTls {
            server: Some(
                ServerTls::new(peer.clone(), &[], "peer").map_err(|e| format!("peer TLS: {e}"))?,
            ),
            client: Some(ClientTls::new(peer, &[]).map_err(|e| format!("peer TLS: {e}"))?),
        }
    } else {
        PeerTls::default()
    };
    Ok(Security {
        client: client_tls,
        client_dial,
        peer: peer_tls,
    })
}

async fn run(flags: Flags) -> Result<(), String> {
    let data_dir = flags
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.quorumkv", flags.name)));
    let member_dir = data_dir.join("member");
    // Everything the member writes (the data dir, the WAL, the backend, its identity) is
    // readable by its own user only, as etcd's (0700 directories, 0600 files; CVE-2020-15113).
    #[cfg(unix)]
    // SAFETY: umask only sets the process's file mode creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    std::fs::create_dir_all(&member_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", member_dir.display()))?;
    warn_if_open_to_others(&data_dir);
    let security = security(&flags, &data_dir)?;
    let _ = PEER_TLS.set(security.peer.clone());
    quorumkv::api::set_forwarding_tls(security.client_dial.clone());
    let auto_compaction = AutoCompaction::from_flags(
        &flags.auto_compaction_mode,
        &flags.auto_compaction_retention,
    )?;
    let identity = identity(&flags, &member_dir).await?;
    quorumkv::api::remove_stale_images(&member_dir);
    let config = member_config(&flags, &identity, &data_dir)?;
    let index_path = config.saved_index.clone();
    // Each listen address, and whether it takes TLS (an https:// URL).
    let peer_addrs = split_urls(&flags.listen_peer_urls)
        .iter()
        .map(|u| parse_listen_url(u).map(|a| (a, is_https(u))))
        .collect::<Result<Vec<_>, _>>()?;
    let client_addrs = split_urls(&flags.listen_client_urls)
        .iter()
        .map(|u| parse_listen_url(u).map(|a| (a, is_https(u))))
        .collect::<Result<Vec<_>, _>>()?;
    let metrics_addrs = split_urls(flags.listen_metrics_urls.as_deref().unwrap_or(""))
        .iter()
        .map(|u| parse_listen_url(u))
        .collect::<Result<Vec<_>, _>>()?;
    let disk = StdDisk::shared();
    quorumkv::metrics::memory::BACKEND_CACHE_BYTES.store(
        flags.backend_cache_bytes.max(1 << 20),
        std::sync::atomic::Ordering::Relaxed,
    );
    let backend = Arc::new(
        SledBackend::open(&config.db_path())
            .map_err(|e| format!("cannot open the backend: {e}; {DAMAGED_DATA}"))?,
    );
    // Peers: batches from members of this cluster reach the node's inbox.
    let (inbox_tx, inbox) = tokio::sync::mpsc::channel(INBOX_BATCHES);
    // Filled in once the member runs; until then a peer asking gets an empty answer.
    let running: Arc<std::sync::OnceLock<KvServer>> = Arc::default();
    let directory: Directory = {
        let running = running.clone();
        let cluster_id = config.cluster_id;
        Arc::new(move || {
            running
                .get()
                .map(|kv| directory_of(kv, cluster_id).encode_to_vec())
                .unwrap_or_default()
        })
    };
    for (addr, https) in peer_addrs {
        let listener = quorumkv::io::tcp::listen(addr)
            .map_err(|e| format!("cannot listen for peers on {addr}: {e}"))?;
        tracing::info!(%addr, "serving peers");
        let inbox_tx = inbox_tx.clone();
        let cluster_id = config.cluster_id;
        let directory = directory.clone();
        let tls = security.peer.server.clone().filter(|_| https);
        tokio::spawn(async move {
            if let Err(e) = serve_peers(listener, cluster_id, inbox_tx, directory, tls).await {
                tracing::error!(%addr, error = %e, "peer listener failed");
            }
        });
    }
    drop(inbox_tx);
    let transport =
        TcpTransport::new(config.cluster_id, config.member_id).with_tls(security.peer.clone());
    for (id, urls) in &identity.peers {
        if let Some(url) = urls.first() {
            transport.set_peer(*id, url);
        }
    }
    let member = start_member(
        &config,
        disk,
        backend.clone(),
        Arc::new(transport.clone()),
        inbox,
        Arc::new(TokioClock::new()),
    )
    .map_err(|e| match e {
        StartError::Wal(
            WalError::Corrupt { .. } | WalError::Gap { .. } | WalError::Behind { .. },
        )
        | StartError::Mvcc(MvccError::Corrupt { .. }) => format!("{e}; {DAMAGED_DATA}"),
        StartError::Mvcc(MvccError::Backend(_)) => {
            format!("{e} (in {}); {DAMAGED_DATA}", config.db_path().display())
        }
        other => other.to_string(),
    })?;
    tracing::info!(name = %flags.name, member_id = format!("{:x}", config.member_id),
        cluster_id = format!("{:x}", config.cluster_id), data_dir = %config.member_dir.display(), "member started");
    if identity.unsaved {
        write_identity(
            &member_dir.join("identity"),
            config.member_id,
            config.cluster_id,
        )?;
    }
    let _ = running.set(member.kv.clone());
    tokio::spawn(follow_members(
        member.kv.members_watch(),
        transport,
        config.member_id,
    ));
    let (removed_tx, mut removed) = tokio::sync::oneshot::channel();
    tokio::spawn(notice_removal(
        member.kv.clone(),
        config.cluster_id,
        Duration::from_millis(flags.election_timeout),
        removed_tx,
    ));
    tokio::spawn(publish(
        member.kv.clone(),
        flags.name.clone(),
        split_urls(&flags.advertise_client_urls),
    ));
    if flags.auto_promote_learners {
        tokio::spawn(auto_promote(member.kv.clone()));
    }
    if let Some(policy) = auto_compaction {
        tokio::spawn(member.kv.clone().run_auto_compaction(policy));
    }

    if flags.experimental_initial_corrupt_check {
        quorumkv::api::corruption::initial_check(&member.kv).await?;
    }
    let period = Some(flags.experimental_corrupt_check_time).filter(|p| !p.is_zero());
    let compaction_period = Some(flags.experimental_compact_hash_check_time)
        .filter(|p| flags.experimental_compact_hash_check_enabled && !p.is_zero());
    if period.is_some() || compaction_period.is_some() {
        tokio::spawn(quorumkv::api::corruption::run_checks(
            member.kv.clone(),
            period,
            compaction_period,
        ));
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    // 0 is no limit (grpc-go's reading of it), not a port that refuses every call.
    let max_concurrent_streams = Some(flags.max_concurrent_streams)
        .filter(|n| *n > 0)
        .unwrap_or(u32::MAX);
    for (addr, https) in client_addrs {
        let listener =
            quorumkv::io::tcp::listen(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        tracing::info!(%addr, "serving client requests");
        let max_decode = config.max_request_bytes + GRPC_OVERHEAD_BYTES;
        let kv = KvGrpc::new(KvService::new(member.kv.clone()))
            .max_decoding_message_size(max_decode)
            .max_encoding_message_size(usize::MAX);
        let maintenance = MaintenanceGrpc::new(MaintenanceService::new(member.kv.clone()))
            .max_decoding_message_size(max_decode)
            .max_encoding_message_size(usize::MAX);
        let cluster = ClusterGrpc::new(ClusterService::new(member.kv.clone()))
            .max_decoding_message_size(max_decode)
            .max_encoding_message_size(usize::MAX);
        let lease = LeaseGrpc::new(LeaseService::new(member.kv.clone()))
            .max_decoding_message_size(max_decode)
            .max_encoding_message_size(usize::MAX);
        let watch = WatchService::new(member.kv.clone(), max_decode);
        let lock = LockGrpc::new(LockService::new(member.kv.clone()))
            .max_decoding_message_size(max_decode)
            .max_encoding_message_size(usize::MAX);
        let election = ElectionGrpc::new(ElectionService::new(member.kv.clone()))
            .max_decoding_message_size(max_decode)
            .max_encoding_message_size(usize::MAX);
        let auth = AuthGrpc::new(AuthService::new(member.kv.clone()))
            .max_decoding_message_size(max_decode)
            .max_encoding_message_size(usize::MAX);
        let mut stop = stop_rx.clone();
        // gRPC and the JSON gateway share the port (HTTP/2 and HTTP/1.1), as in etcd.
        let grpc = tonic::service::Routes::new(kv)
            .add_service(auth)
            .add_service(maintenance)
            .add_service(cluster)
            .add_service(lease)
            .add_service(watch)
            .add_service(lock)
            .add_service(election);
        let mut routes = grpc
            .into_axum_router()
            .merge(gateway_routes(member.kv.clone()))
            .merge(probe_routes(member.kv.clone()));
        if flags.enable_v2 {
            routes = routes.merge(quorumkv::v2::http::routes(member.kv.clone()));
        }
        let routes = routes.fallback(fallback);
        // The KV short path counts the calls it answers; the metrics layer the rest.
        let service = UnaryKvLayer::new(member.kv.clone(), max_decode).layer(GrpcMetrics::new(
            tonic::service::Routes::from(routes).prepare(),
        ));
        let tls = security.client.clone().filter(|_| https);
        servers.push(tokio::spawn(serve(
            listener,
            service,
            tls,
            max_concurrent_streams,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )));
    }
    for addr in metrics_addrs {
        let listener = quorumkv::io::tcp::listen(addr)
            .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
        tracing::info!(%addr, "serving /metrics and /health");
        let service =
            tonic::service::Routes::from(probe_routes(member.kv.clone()).fallback(fallback))
                .prepare();
        let mut stop = stop_rx.clone();
        servers.push(tokio::spawn(serve(
            listener,
            service,
            None,
            max_concurrent_streams,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )));
    }

    let mut node_task = member.node_task;
    let mut apply_task = member.apply_task;
    let (mut node_ended, mut apply_ended) = (false, false);
    let outcome = tokio::select! {
        _ = quorumkv::io::stop::signal() => Ok(()),
        Ok(()) = &mut removed => {
            tracing::warn!("this member was removed from the cluster; stopping");
            Ok(())
        }
        ended = &mut apply_task => {
            apply_ended = true;
            match ended {
                // The apply loop ends by itself when the node that feeds it ended: the cause
                // is the node's.
                Ok(Ok(())) => {
                    node_ended = true;
                    match tokio::time::timeout(SHUTDOWN_WAIT, &mut node_task).await {
                        Ok(ended) => node_outcome(ended)
                            .and(Err("the apply loop stopped".to_string())),
                        Err(_) => Err("the apply loop stopped; the raft node did not".to_string()),
                    }
                }
                Ok(Err(e)) => Err(format!("fatal backend error: {e}")),
                Err(e) => Err(format!("apply loop crashed: {e}")),
            }
        }
        ended = &mut node_task => {
            node_ended = true;
            node_outcome(ended)
        }
    };
    // Every stop (a signal, this member's removal, a fatal error) ends within the deadline,
    // even if a disk blocks the steps below. A fatal error is said once, now.
    if let Err(e) = &outcome {
        tracing::error!("{e}; stopping");
    }
    quorumkv::io::stop::arm_deadline("the stop");
    let _ = stop_tx.send(true);
    for server in servers {
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    // A clean stop: the node syncs its WAL and ends; the apply loop applies what it was handed
    // and writes it all to the backend, so that the backend holds every applied entry.
    if !node_ended {
        let stopped = tokio::time::timeout(SHUTDOWN_WAIT, async {
            member.kv.node().stop().await;
            let _ = (&mut node_task).await;
        })
        .await;
        if stopped.is_err() {
            tracing::warn!("the raft node did not stop in time");
        }
    }
    let mut apply_stopped_cleanly = false;
    if !apply_ended {
        match tokio::time::timeout(SHUTDOWN_WAIT, &mut apply_task).await {
            Ok(Ok(Ok(()))) => apply_stopped_cleanly = true,
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "the apply loop failed while stopping"),
            Ok(Err(e)) => tracing::error!(error = %e, "the apply loop crashed while stopping"),
            Err(_) => tracing::warn!("the apply loop did not stop in time"),
        }
    }
    // The flush runs on a thread of its own: on a failed disk it may never return (the
    // deadline armed above then ends the process).
    let flushing = backend.clone();
    let flushed =
        tokio::task::spawn_blocking(move || quorumkv::io::Backend::flush(flushing.as_ref()))
            .await
            .unwrap_or_else(|e| {
                Err(quorumkv::io::BackendError::Store(format!(
                    "the flush crashed: {e}"
                )))
            });
    match flushed {
        Ok(()) => {
            // The backend holds every applied entry: the key index can be saved beside it,
            // and the next start loads it instead of reading every revision.
            if let (true, Some(path)) = (apply_stopped_cleanly, index_path.as_deref()) {
                let started = std::time::Instant::now();
                match member.kv.save_index(path) {
                    Ok(bytes) => {
                        tracing::info!(bytes, took = ?started.elapsed(), "key index saved")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot save the key index; the next start scans the backend")
                    }
                }
            }
            tracing::info!(
                applied_index = member.kv.status().raft_applied_index,
                "backend flushed; stopped"
            )
        }
        // After a fatal error this is its echo: the error itself was logged.
        Err(e) if outcome.is_err() => {
            tracing::debug!(error = %e, "backend flush at shutdown failed")
        }
        Err(e) => tracing::error!(error = %e, "backend flush at shutdown failed"),
    }
    // A fatal error was logged when it happened: an empty error tells `main` so.
    outcome.map_err(|_| String::new())
}

/// Raises the soft limit on open files to the hard one, as Go's runtime does for etcd: a member
/// or a gateway with thousands of clients needs a descriptor for each connection, and the
/// usual soft limit is 1024.
fn raise_open_files_limit() {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit read and write only the struct they are given.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0
                && limit.rlim_cur < limit.rlim_max
            {
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}

fn main() -> ExitCode {
    raise_open_files_limit();
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let env: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    let command = <Flags as clap::CommandFactory>::command();
    let known = |flag: &str| command.get_arguments().any(|a| a.get_long() == Some(flag));
    let read_file = |path: &str| {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read --config-file {path}: {e}"))
    };
    let resolved = match quorumkv::config::resolve(&args, &env, &known, &read_file) {
        Ok(resolved) => resolved,
        Err(e) => {
            eprintln!("quorumkv: {e}");
            return ExitCode::from(2);
        }
    };
    for (name, value) in &resolved.env {
        // Still one thread: nothing else reads the environment meanwhile.
        std::env::set_var(name, value);
    }
    let mut flags = Flags::parse_from(&resolved.args);
    match flags.command.take() {
        Some(Tool::Snapshot { verb }) => {
            return match quorumkv::snapshot::run_cli(verb) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("Error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Tool::Gateway { verb }) => {
            if let Err(e) = init_logging(&flags) {
                eprintln!("quorumkv: {e}");
                return ExitCode::from(2);
            }
            return match quorumkv::proxy::run_gateway(verb) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Tool::GrpcProxy { verb }) => {
            if let Err(e) = init_logging(&flags) {
                eprintln!("quorumkv: {e}");
                return ExitCode::from(2);
            }
            return match quorumkv::proxy::grpc::run(verb) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            };
        }
        None => {}
    }
    if let Err(e) = init_logging(&flags) {
        eprintln!("quorumkv: {e}");
        return ExitCode::from(2);
    }
    for note in &resolved.notes {
        tracing::info!("{note}");
    }
    if flags.quota_backend_bytes > quorumkv::server::MAX_SUGGESTED_QUOTA_BACKEND_BYTES {
        tracing::warn!(
            quota_bytes = flags.quota_backend_bytes,
            suggested_max_bytes = quorumkv::server::MAX_SUGGESTED_QUOTA_BACKEND_BYTES,
            "--quota-backend-bytes exceeds the maximum suggested quota"
        );
    }
    // Before the runtime's threads start, so that they inherit the mask.
    if !quorumkv::io::stop::take_signals() {
        tracing::warn!("cannot take signals on a thread of their own; using the runtime's");
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
        Err(e) if e.is_empty() => ExitCode::FAILURE,
        // One line, in the log's format (the log is on stderr).
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
