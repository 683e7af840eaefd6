//! Proxies that stand between clients and a cluster. `tcp`: etcd's L4 gateway
//! (`quorumkv gateway start`).

pub mod tcp;

use std::time::Duration;

use clap::Subcommand;

/// `quorumkv gateway <verb>`, with etcd's flags.
#[derive(Subcommand, Debug)]
pub enum GatewayVerb {
    /// Starts the gateway: a TCP proxy in front of the cluster's client URLs, taking them in
    /// turn and skipping those that refuse connections.
    Start {
        /// Comma separated etcd cluster endpoints (host:port; a scheme is dropped).
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
        endpoints: Vec<String>,
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:23790")]
        listen_addr: String,
        /// Duration of delay before retrying failed endpoints.
        #[arg(long, default_value = "1m0s", value_parser = crate::config::parse_duration)]
        retry_delay: Duration,
        /// DNS domain used to bootstrap initial cluster (not built: refused).
        #[arg(long)]
        discovery_srv: Option<String>,
        /// Service name to query when using DNS discovery (not built: refused).
        #[arg(long)]
        discovery_srv_name: Option<String>,
        /// Accept insecure SRV records (DNS discovery is not built: refused).
        #[arg(long)]
        insecure_discovery: bool,
        /// CA file for the discovered endpoints (DNS discovery is not built: refused).
        #[arg(long)]
        trusted_ca_file: Option<String>,
    },
}

/// Runs `quorumkv gateway <verb>` until the process is stopped; an error is the reason it
/// could not start.
pub fn run_gateway(verb: GatewayVerb) -> Result<(), String> {
    let GatewayVerb::Start {
        endpoints,
        listen_addr,
        retry_delay,
        discovery_srv,
        discovery_srv_name,
        insecure_discovery,
        trusted_ca_file,
    } = verb;
    for (flag, given) in [
        ("--discovery-srv", discovery_srv.is_some()),
        ("--discovery-srv-name", discovery_srv_name.is_some()),
        ("--insecure-discovery", insecure_discovery),
        ("--trusted-ca-file", trusted_ca_file.is_some()),
    ] {
        if given {
            return Err(format!(
                "{flag}: DNS discovery is not built in quorumkv; name the endpoints with --endpoints"
            ));
        }
    }
    let endpoints = tcp::parse_endpoints(&endpoints)?;
    if retry_delay.is_zero() {
        return Err("--retry-delay must be more than 0".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let addr = tokio::net::lookup_host(&listen_addr)
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| format!("listen tcp {listen_addr}: not a host:port this host has"))?;
        let listener =
            crate::io::tcp::listen(addr).map_err(|e| format!("listen tcp {listen_addr}: {e}"))?;
        tcp::Gateway::new(endpoints, retry_delay)
            .serve(listener)
            .await;
        Ok(())
    })
}
