//! `quorumkv gateway start`: its flags and its start.

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
        /// Duration of delay before retrying failed endpoints (0: 5 minutes, as etcd).
        #[arg(long, default_value = "1m0s", value_parser = crate::config::parse_duration)]
        retry_delay: Duration,
        /// DNS domain used to bootstrap initial cluster (not built: refused).
        #[arg(long)]
        discovery_srv: Option<String>,
        /// Service name to query when using DNS discovery (not built: refused).
        #[arg(long)]
        discovery_srv_name: Option<String>,
        /// Accept insecure SRV records (only used with --discovery-srv).
        #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, default_value = "false")]
        insecure_discovery: bool,
        /// CA file for the discovered endpoints (only used with --discovery-srv).
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
    ] {
        if given {
            return Err(format!(
                "{flag}: DNS discovery is not built in quorumkv; name the endpoints with --endpoints"
            ));
        }
    }
    // etcd reads these only with --discovery-srv: alone they change nothing there either.
    if insecure_discovery || trusted_ca_file.is_some() {
        tracing::info!(
            "--insecure-discovery and --trusted-ca-file apply only to DNS discovery: ignored"
        );
    }
    let endpoints = super::tcp::parse_endpoints(&endpoints)?;
    let retry_delay = if retry_delay.is_zero() {
        Duration::from_secs(300)
    } else {
        retry_delay
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let addr = listen_address(&listen_addr).await?;
        let listener =
            crate::io::tcp::listen(addr).map_err(|e| format!("listen tcp {listen_addr}: {e}"))?;
        super::tcp::Gateway::new(endpoints, retry_delay)
            .serve(listener)
            .await;
        Ok(())
    })
}

/// `--listen-addr` as a socket address: an IP and port as they are; an empty host (`:23790`)
/// every IPv4 interface; a name (`localhost:23790`) its first IPv4 address if it has one (as
/// Go's listeners, and the member's `localhost`, take 127.0.0.1).
pub(crate) async fn listen_address(listen_addr: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = listen_addr.parse() {
        return Ok(addr);
    }
    let bad = |why: &str| format!("listen tcp {listen_addr}: {why}");
    let (host, port) = listen_addr
        .rsplit_once(':')
        .ok_or_else(|| bad("want host:port"))?;
    let port: u16 = port.parse().map_err(|_| bad("not a port"))?;
    if host.is_empty() {
        return Ok(std::net::SocketAddr::from(([0, 0, 0, 0], port)));
    }
    let found: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| bad(&e.to_string()))?
        .collect();
    found
        .iter()
        .find(|a| a.is_ipv4())
        .or(found.first())
        .copied()
        .ok_or_else(|| bad("no address for the host"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listen_addresses_are_read_as_etcd_reads_them() {
        let addr = |s: &'static str| listen_address(s);
        assert_eq!(
            addr("127.0.0.1:23790").await.expect("ip"),
            "127.0.0.1:23790".parse().expect("addr")
        );
        assert_eq!(
            addr(":23790").await.expect("all"),
            "0.0.0.0:23790".parse().expect("addr")
        );
        assert_eq!(
            addr("localhost:23790").await.expect("name"),
            "127.0.0.1:23790".parse().expect("addr")
        );
        assert!(addr("localhost")
            .await
            .expect_err("no port")
            .contains("want host:port"));
        assert!(addr("localhost:http")
            .await
            .expect_err("bad port")
            .contains("not a port"));
    }
}
