//! The load tool: concurrent clients sending Puts (or linearizable Ranges) over gRPC to any
//! etcd v3 endpoint — quorumkv or etcd itself — for side-by-side numbers. `--endpoint` takes
//! several URLs, comma-separated (a cluster): connections are spread over them.
//!
//! cargo bench --bench load -- --endpoint http://127.0.0.1:2379 --clients 64 --seconds 10
//!
//! Prints one line: `op=put clients=64 conns=8 ops=... secs=... ops_per_sec=... p50_ms=... p90_ms=... p99_ms=...`.

use std::time::{Duration, Instant};

use quorumkv::proto::etcdserverpb::kv_client::KvClient;
use quorumkv::proto::etcdserverpb::{PutRequest, RangeRequest};
use tonic::transport::{Channel, Endpoint};

struct Args {
    endpoint: String,
    clients: usize,
    conns: usize,
    seconds: f64,
    max_requests: u64,
    key_space: u64,
    value_size: usize,
    op: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        endpoint: "http://127.0.0.1:2379".into(),
        clients: 1,
        conns: 0,
        seconds: 5.0,
        max_requests: 10_000_000,
        key_space: 100_000,
        value_size: 256,
        op: "put".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue; // passed by `cargo bench`
        }
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--endpoint" => args.endpoint = value()?,
            "--clients" => {
                args.clients = value()?.parse().map_err(|e| format!("--clients: {e}"))?
            }
            "--conns" => args.conns = value()?.parse().map_err(|e| format!("--conns: {e}"))?,
            "--seconds" => {
                args.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?
            }
            "--max-requests" => {
                args.max_requests = value()?
                    .parse()
                    .map_err(|e| format!("--max-requests: {e}"))?
            }
            "--key-space" => {
                args.key_space = value()?.parse().map_err(|e| format!("--key-space: {e}"))?
            }
            "--value-size" => {
                args.value_size = value()?.parse().map_err(|e| format!("--value-size: {e}"))?
            }
            "--op" => args.op = value()?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.conns == 0 {
        args.conns = args.clients.clamp(1, 8);
    }
    if args.op != "put" && args.op != "get" {
        return Err("--op is put or get".into());
    }
    Ok(args)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn client_loop(
    mut kv: KvClient<Channel>,
    args: std::sync::Arc<Args>,
    id: usize,
    deadline: Instant,
    budget: u64,
) -> Result<Vec<Duration>, String> {
    let mut latencies = Vec::with_capacity(16 * 1024);
    let value = vec![b'v'; args.value_size];
    let mut n = 0u64;
    // A cheap deterministic key sequence per client.
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64);
    while n < budget && Instant::now() < deadline {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let key = format!("load/{:012}", state % args.key_space).into_bytes();
        let start = Instant::now();
        let result = if args.op == "put" {
            kv.put(PutRequest {
                key,
                value: value.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ())
        } else {
            kv.range(RangeRequest {
                key,
                ..Default::default()
            })
            .await
            .map(|_| ())
        };
        result.map_err(|e| format!("request failed: {e}"))?;
        latencies.push(start.elapsed());
        n += 1;
    }
    Ok(latencies)
}

async fn run(args: Args) -> Result<(), String> {
    let args = std::sync::Arc::new(args);
    let mut channels = Vec::new();
    // Several endpoints (comma-separated): connections go round-robin over them.
    let endpoints: Vec<&str> = args.endpoint.split(',').map(str::trim).collect();
    for conn in 0..args.conns.max(endpoints.len()) {
        let endpoint = endpoints[conn % endpoints.len()];
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| e.to_string())?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("connect {endpoint}: {e}"))?;
        channels.push(channel);
    }
    let budget = args.max_requests / args.clients as u64;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for id in 0..args.clients {
        let kv = KvClient::new(channels[id % channels.len()].clone())
            .max_decoding_message_size(usize::MAX);
        tasks.push(tokio::spawn(client_loop(
            kv,
            args.clone(),
            id,
            deadline,
            budget,
        )));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.map_err(|e| e.to_string())??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    println!(
        "op={} clients={} conns={} value_size={} ops={} secs={:.2} ops_per_sec={:.0} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3}",
        args.op,
        args.clients,
        args.conns,
        args.value_size,
        latencies.len(),
        elapsed,
        latencies.len() as f64 / elapsed,
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
    );
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("load: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("load: {e}");
        std::process::exit(1);
    }
}
