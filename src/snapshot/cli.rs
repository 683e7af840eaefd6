//! `quorumkv snapshot save|status|restore`: the verbs' flags (etcdutl's names) and output.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum SnapshotVerb {
    /// Stores a snapshot of a running member's backend in FILE (etcdctl's `snapshot save`).
    Save {
        file: PathBuf,
        /// The member's client URL.
        #[arg(long, default_value = "127.0.0.1:2379")]
        endpoints: String,
    },
    /// Checks a snapshot file and prints its hash, revision, total keys and size.
    Status {
        file: PathBuf,
        /// Output format: simple, table or json.
        #[arg(short = 'w', long = "write-out", default_value = "simple", value_parser = ["simple", "table", "json"])]
        write_out: String,
    },
    /// Builds the data dir of a member of a new cluster from a snapshot file.
    Restore {
        file: PathBuf,
        /// Path to the data directory (default: <name>.quorumkv); must not exist.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Human-readable name for this member.
        #[arg(long, default_value = "default")]
        name: String,
        /// Initial cluster configuration for restore bootstrap: name=peer-url,...
        #[arg(long)]
        initial_cluster: Option<String>,
        /// Initial cluster token for the cluster during restore bootstrap.
        #[arg(long, default_value = "etcd-cluster")]
        initial_cluster_token: String,
        /// This member's peer URLs to advertise.
        #[arg(long, default_value = "http://localhost:2380")]
        initial_advertise_peer_urls: String,
        /// Accepted for etcdutl's sake: the restored member's hash is always checked.
        #[arg(long, default_value_t = false)]
        skip_hash_check: bool,
    },
}

/// Runs one verb; `Err` is the one line to print.
pub fn run(verb: SnapshotVerb) -> Result<(), String> {
    match verb {
        SnapshotVerb::Save { file, endpoints } => {
            let endpoint = endpoints.split(',').next().unwrap_or_default().to_string();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))?;
            let bytes = runtime.block_on(super::save(&endpoint, &file))?;
            println!("Snapshot saved at {} ({bytes} bytes)", file.display());
            Ok(())
        }
        SnapshotVerb::Status { file, write_out } => {
            let status = super::status(&file)?;
            match write_out.as_str() {
                "json" => println!(
                    "{}",
                    serde_json::json!({
                        "hash": status.hash,
                        "revision": status.revision,
                        "totalKey": status.total_keys,
                        "totalSize": status.total_size,
                    })
                ),
                "table" => {
                    let row = [
                        format!("{:x}", status.hash),
                        status.revision.to_string(),
                        status.total_keys.to_string(),
                        human_bytes(status.total_size),
                    ];
                    let head = ["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"];
                    let widths: Vec<usize> = head
                        .iter()
                        .zip(&row)
                        .map(|(h, r)| h.len().max(r.len()))
                        .collect();
                    let line = widths
                        .iter()
                        .map(|w| "-".repeat(w + 2))
                        .collect::<Vec<_>>()
                        .join("+");
                    let cells = |cells: Vec<String>| {
                        cells
                            .iter()
                            .zip(&widths)
                            .map(|(c, w)| format!(" {c:>w$} "))
                            .collect::<Vec<_>>()
                            .join("|")
                    };
                    println!("+{line}+");
                    println!("|{}|", cells(head.iter().map(|h| h.to_string()).collect()));
                    println!("+{line}+");
                    println!("|{}|", cells(row.to_vec()));
                    println!("+{line}+");
                }
                _ => println!(
                    "{:x}, {}, {}, {}",
                    status.hash,
                    status.revision,
                    status.total_keys,
                    human_bytes(status.total_size)
                ),
            }
            Ok(())
        }
        SnapshotVerb::Restore {
            file,
            data_dir,
            name,
            initial_cluster,
            initial_cluster_token,
            initial_advertise_peer_urls,
            skip_hash_check: _,
        } => {
            let initial_cluster =
                initial_cluster.unwrap_or_else(|| format!("{name}={initial_advertise_peer_urls}"));
            let members = crate::cluster::parse_initial_cluster(&initial_cluster, &name)?;
            let data_dir = data_dir.unwrap_or_else(|| PathBuf::from(format!("{name}.quorumkv")));
            let restored =
                super::restore(&file, &data_dir, &name, &members, &initial_cluster_token)?;
            println!(
                "restored snapshot {} into {}: member {:x} of cluster {:x}, revision {}",
                file.display(),
                data_dir.display(),
                restored.member_id,
                restored.cluster_id,
                restored.revision
            );
            Ok(())
        }
    }
}

/// Bytes as etcd prints them (SI units: 2.1 MB).
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
