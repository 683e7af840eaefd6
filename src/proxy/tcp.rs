//! etcd's L4 gateway (`etcd gateway start`): a TCP proxy on a stable local address in front of
//! a cluster's client URLs. Each client connection goes to the next endpoint in turn; an
//! endpoint that refuses a connection is set aside (the connection tries the next one) and
//! tried again every `--retry-delay` until it accepts. It reads nothing of what it carries:
//! gRPC, the JSON gateway and TLS pass through as they are.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// How long a connection to an endpoint may take before the endpoint counts as failed (etcd
/// waits for the system's own timeout, minutes for an address that drops packets; long enough
/// here that a member dropping SYNs in a burst of connections, retried by the kernel at 1 s and
/// 3 s, is not set aside for a whole retry delay).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keep-alive on both sides of each carried connection, as Go sets by default for etcd's
/// gateway: a client gone without closing (powered off, dropped by a NAT) is found and its
/// connection to the member closed.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

fn keep_alive(stream: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE)
        .with_interval(KEEPALIVE);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
    let _ = stream.set_nodelay(true);
}

/// The endpoints as `host:port`: a scheme (`http://`, `https://`) and a trailing `/` are
/// dropped, as etcd's gateway does.
pub fn parse_endpoints(given: &[String]) -> Result<Vec<String>, String> {
    let mut endpoints = Vec::new();
    for endpoint in given.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let bare = endpoint
            .strip_prefix("http://")
            .or_else(|| endpoint.strip_prefix("https://"))
            .unwrap_or(endpoint)
            .trim_end_matches('/');
        let valid = bare
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid {
            return Err(format!(
                "--endpoints: invalid endpoint {endpoint:?} (want host:port)"
            ));
        }
        endpoints.push(bare.to_string());
    }
    if endpoints.is_empty() {
        return Err("--endpoints: no endpoint given".into());
    }
    Ok(endpoints)
}

struct Remote {
    addr: String,
    active: AtomicBool,
}

struct Inner {
    remotes: Vec<Remote>,
    next: AtomicUsize,
    retry_delay: Duration,
    /// Clients turned away while no endpoint accepts: one line each would let any client
    /// flood the log.
    turned_away: crate::tls::RateLimitedLog,
}

/// The gateway: its endpoints, which of them are in use, and whose turn is next.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl Gateway {
    pub fn new(endpoints: Vec<String>, retry_delay: Duration) -> Gateway {
        let remotes = endpoints
            .into_iter()
            .map(|addr| Remote {
                addr,
                active: AtomicBool::new(true),
            })
            .collect();
        Gateway {
            inner: Arc::new(Inner {
                remotes,
                next: AtomicUsize::new(0),
                retry_delay,
                turned_away: crate::tls::RateLimitedLog::default(),
            }),
        }
    }

    /// Proxies every connection `listener` accepts, until the process ends.
    pub async fn serve(self, listener: TcpListener) {
        let endpoints: Vec<&str> = self.inner.remotes.iter().map(|r| r.addr.as_str()).collect();
        let listen = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(?endpoints, %listen, "ready to proxy client requests");
        tokio::spawn(self.clone().monitor());
        loop {
            match listener.accept().await {
                Ok((client, _)) => {
                    let gateway = self.clone();
                    tokio::spawn(async move { gateway.proxy(client).await });
                }
                // Out of file descriptors, say: the listener stays; try again shortly.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// The next active endpoint in turn, if any. The turn moves past every endpoint looked at
    /// (as etcd's): with one of three set aside, the other two share its turns evenly.
    fn pick(&self) -> Option<&Remote> {
        let remotes = &self.inner.remotes;
        (0..remotes.len())
            .map(|_| &remotes[self.inner.next.fetch_add(1, Ordering::Relaxed) % remotes.len()])
            .find(|r| r.active.load(Ordering::Acquire))
    }

    /// Carries `client`'s connection to an endpoint and back until either side closes; with
    /// no endpoint accepting, closes it.
    async fn proxy(&self, mut client: TcpStream) {
        loop {
            let Some(remote) = self.pick() else {
                if let Some(left_out) = self.inner.turned_away.allow() {
                    tracing::warn!(
                        earlier_not_logged = left_out,
                        "no endpoint accepts connections: closing a client's connection"
                    );
                }
                return;
            };
            match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&remote.addr)).await {
                Ok(Ok(mut upstream)) => {
                    keep_alive(&client);
                    keep_alive(&upstream);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    return;
                }
                Ok(Err(e)) => self.deactivate(remote, &e.to_string()),
                Err(_) => self.deactivate(remote, "connection timed out"),
            }
        }
    }

    fn deactivate(&self, remote: &Remote, error: &str) {
        if remote.active.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                address = %remote.addr,
                interval = ?self.inner.retry_delay,
                error,
                "deactivated endpoint"
            );
        }
    }

    /// Every `retry_delay`, tries the endpoints set aside, and takes back those that accept.
    async fn monitor(self) {
        loop {
            tokio::time::sleep(self.inner.retry_delay).await;
            for remote in self.inner.remotes.iter() {
                if remote.active.load(Ordering::Acquire) {
                    continue;
                }
                match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&remote.addr)).await {
                    Ok(Ok(_)) => {
                        remote.active.store(true, Ordering::Release);
                        tracing::info!(address = %remote.addr, "activated");
                    }
                    failed => {
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "connection timed out".to_string(),
                        };
                        tracing::warn!(
                            address = %remote.addr,
                            interval = ?self.inner.retry_delay,
                            error,
                            "failed to activate endpoint (stay inactive for another interval)"
                        );
                    }
                }
            }
        }
    }

    /// Whether the endpoint at `addr` is in use (for tests).
    pub fn is_active(&self, addr: &str) -> bool {
        self.inner
            .remotes
            .iter()
            .any(|r| r.addr == addr && r.active.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An endpoint that writes its name to each connection and closes it.
    async fn named(listener: TcpListener, name: &'static str) {
        while let Ok((mut conn, _)) = listener.accept().await {
            let _ = conn.write_all(name.as_bytes()).await;
        }
    }

    async fn read_through(gateway: std::net::SocketAddr) -> String {
        let mut conn = TcpStream::connect(gateway)
            .await
            .expect("connect to the gateway");
        let mut got = String::new();
        conn.read_to_string(&mut got).await.expect("read");
        got
    }

    #[tokio::test]
    async fn connections_take_endpoints_in_turn_skip_a_refusing_one_and_take_it_back() {
        let a = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let b = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (a_addr, b_addr) = (a.local_addr().expect("a"), b.local_addr().expect("b"));
        let a_task = tokio::spawn(named(a, "a"));
        tokio::spawn(named(b, "b"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let at = listener.local_addr().expect("gateway");
        let gateway = Gateway::new(
            vec![a_addr.to_string(), b_addr.to_string()],
            Duration::from_millis(200),
        );
        tokio::spawn(gateway.clone().serve(listener));

        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(read_through(at).await);
        }
        assert_eq!(seen, ["a", "b", "a", "b"]);

        // a stops listening: its turn goes to b, and it is set aside.
        a_task.abort();
        let _ = a_task.await;
        for _ in 0..4 {
            assert_eq!(read_through(at).await, "b");
        }
        assert!(!gateway.is_active(&a_addr.to_string()));
        assert!(gateway.is_active(&b_addr.to_string()));

        // a listens again: within a retry delay or two it takes its turns again.
        let a = TcpListener::bind(a_addr).await.expect("bind a again");
        tokio::spawn(named(a, "a"));
        let start = std::time::Instant::now();
        while !gateway.is_active(&a_addr.to_string()) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "a never taken back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(read_through(at).await);
        }
        assert_eq!(seen.iter().filter(|s| *s == "a").count(), 2, "{seen:?}");
    }

    #[tokio::test]
    async fn the_endpoints_left_share_a_dead_ones_turns_evenly() {
        let mut addrs = Vec::new();
        for name in ["a", "b", "c"] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addrs.push(listener.local_addr().expect("addr").to_string());
            if name != "b" {
                tokio::spawn(named(listener, name));
            }
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let at = listener.local_addr().expect("gateway");
        tokio::spawn(Gateway::new(addrs, Duration::from_secs(60)).serve(listener));
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(read_through(at).await);
        }
        let a = seen.iter().filter(|s| *s == "a").count();
        assert_eq!((a, seen.len() - a), (4, 4), "{seen:?}");
    }

    #[tokio::test]
    async fn with_no_endpoint_accepting_a_connection_is_closed() {
        let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dead_addr = dead.local_addr().expect("addr");
        drop(dead);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let at = listener.local_addr().expect("gateway");
        let gateway = Gateway::new(vec![dead_addr.to_string()], Duration::from_secs(60));
        tokio::spawn(gateway.clone().serve(listener));
        assert_eq!(read_through(at).await, "", "closed without a byte");
        assert!(!gateway.is_active(&dead_addr.to_string()));
        assert_eq!(read_through(at).await, "");
    }

    #[test]
    fn endpoints_are_host_and_port_with_schemes_dropped() {
        let given = |list: &[&str]| {
            parse_endpoints(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(
            given(&["http://127.0.0.1:2379", "https://h:2379/", "10.0.0.1:22379"]).expect("ok"),
            ["127.0.0.1:2379", "h:2379", "10.0.0.1:22379"]
        );
        assert!(given(&["127.0.0.1"])
            .expect_err("no port")
            .contains("invalid endpoint"));
        assert!(given(&[":2379"]).is_err());
        assert!(given(&["h:port"]).is_err());
        assert!(given(&[""]).expect_err("none").contains("no endpoint"));
    }
}
