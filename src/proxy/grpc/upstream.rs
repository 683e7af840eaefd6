//! The proxy's way to the cluster: its `--endpoints` in order, one connection at a time. A
//! call that finds the endpoint gone marks it failed; the next call connects to the next one
//! that answers, so every service (and every watch, resumed from where it was) moves together.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::forward::upstream_call;
use crate::api::{AUTHORIZATION, TOKEN_METADATA};
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::watch_client::WatchClient;
use crate::proto::etcdserverpb::{RangeRequest, RangeResponse, WatchRequest};
use crate::proxy::port::{ClusterPort, Opened, PortFuture};
use crate::tls::ClientTls;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection to an endpoint is checked this often while idle (HTTP/2 pings), so a member
/// that went away without closing its socket is noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections kept to the endpoint in use: calls are spread over them (one HTTP/2 connection
/// serializes its frames through one task on each side).
pub const CONNECTIONS: usize = 4;

/// The channel in use and the count of failovers so far (a failure reported for an older
/// channel does not move the proxy again).
struct Current {
    generation: u64,
    index: usize,
    /// Connections to the endpoint in use (empty: none yet), taken in turn.
    channels: Vec<Channel>,
    next: usize,
}

pub struct Upstream {
    endpoints: Vec<String>,
    tls: Option<Arc<ClientTls>>,
    current: Mutex<Current>,
    /// One connect at a time: callers that find no channel wait for the one connecting.
    connecting: tokio::sync::Mutex<()>,
    pub max_send_bytes: usize,
    pub max_recv_bytes: usize,
}

/// A channel and the generation it belongs to (for `Upstream::failed`).
#[derive(Clone)]
pub struct Link {
    pub channel: Channel,
    pub generation: u64,
}

impl Upstream {
    /// `endpoints`: URLs (`http://host:port`, `https://...`) or `host:port` (http, or https
    /// when `tls` is given, as etcd's client reads them).
    pub fn new(
        endpoints: &[String],
        tls: Option<Arc<ClientTls>>,
        max_send_bytes: usize,
        max_recv_bytes: usize,
    ) -> Result<Arc<Upstream>, String> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e.contains("://") {
                    e.to_string()
                } else {
                    format!("{scheme}://{e}")
                }
            })
            .collect();
        if endpoints.is_empty() {
            return Err("--endpoints: no endpoint given".into());
        }
        for e in &endpoints {
            if crate::tls::is_https(e) && tls.is_none() {
                return Err(format!(
                    "--endpoints: {e} is https:// and no --cacert (or --cert and --key) is given"
                ));
            }
            Endpoint::from_shared(e.clone()).map_err(|err| format!("--endpoints: {e}: {err}"))?;
        }
        Ok(Arc::new(Upstream {
            endpoints,
            tls,
            current: Mutex::new(Current {
                generation: 0,
                index: 0,
                channels: Vec::new(),
                next: 0,
            }),
            connecting: tokio::sync::Mutex::new(()),
            max_send_bytes,
            max_recv_bytes,
        }))
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoint in use now (for the log and the metrics).
    pub fn endpoint(&self) -> String {
        let current = self.lock();
        self.endpoints[current.index].clone()
    }

    /// The channel in use, connecting (from the endpoint in use onwards, round the list once)
    /// when there is none.
    pub async fn link(&self) -> Result<Link, Status> {
        if let Some(link) = self.current_link() {
            return Ok(link);
        }
        let _one = self.connecting.lock().await;
        if let Some(link) = self.current_link() {
            return Ok(link);
        }
        let start = self.lock().index;
        let mut last_error = String::new();
        for step in 0..self.endpoints.len() {
            let index = (start + step) % self.endpoints.len();
            let url = &self.endpoints[index];
            match self.connect(url).await {
                Ok(channel) => {
                    let mut channels = vec![channel.clone()];
                    for _ in 1..CONNECTIONS {
                        match self.connect(url).await {
                            Ok(more) => channels.push(more),
                            Err(_) => break,
                        }
                    }
                    let mut current = self.lock();
                    current.index = index;
                    current.channels = channels;
                    if step > 0 {
                        tracing::warn!(endpoint = %url, "the proxy moved to another endpoint");
                    }
                    return Ok(Link {
                        channel,
                        generation: current.generation,
                    });
                }
                Err(e) => {
                    tracing::warn!(endpoint = %url, error = %e, "cannot reach an endpoint");
                    last_error = format!("{url}: {e}");
                }
            }
        }
        Err(Status::unavailable(format!(
            "grpc-proxy: no endpoint answers (last: {last_error})"
        )))
    }

    fn current_link(&self) -> Option<Link> {
        let mut current = self.lock();
        if current.channels.is_empty() {
            return None;
        }
        current.next = current.next.wrapping_add(1);
        let channel = current.channels[current.next % current.channels.len()].clone();
        Some(Link {
            channel,
            generation: current.generation,
        })
    }

    /// The channel of `generation` failed: the next call connects to the next endpoint.
    pub fn failed(&self, generation: u64) {
        let mut current = self.lock();
        if current.generation != generation || current.channels.is_empty() {
            return;
        }
        tracing::warn!(endpoint = %self.endpoints[current.index], "an endpoint failed; moving to the next");
        current.generation += 1;
        current.channels.clear();
        current.index = (current.index + 1) % self.endpoints.len();
    }

    async fn connect(&self, url: &str) -> Result<Channel, String> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| e.to_string())?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let connecting = async {
            if !crate::tls::is_https(url) {
                return endpoint.connect().await.map_err(|e| e.to_string());
            }
            let Some(tls) = self.tls.clone() else {
                return Err("https:// endpoint and no TLS settings".to_string());
            };
            crate::tls::connect_channel(endpoint, tls).await
        };
        tokio::time::timeout(CONNECT_TIMEOUT * 2, connecting)
            .await
            .map_err(|_| "connect timed out".to_string())?
    }
}

impl ClusterPort for Upstream {
    fn open_watch(
        &self,
        token: &[u8],
        requests: tokio::sync::mpsc::UnboundedReceiver<WatchRequest>,
    ) -> PortFuture<'_, Result<Opened, Status>> {
        let token = token.to_vec();
        Box::pin(async move {
            let link = self.link().await?;
            let mut request = Request::new(UnboundedReceiverStream::new(requests));
            if !token.is_empty() {
                if let Ok(value) = MetadataValue::try_from(token.as_slice()) {
                    request.metadata_mut().insert(TOKEN_METADATA, value);
                }
            }
            let mut client = WatchClient::new(link.channel)
                .max_decoding_message_size(self.max_recv_bytes)
                .max_encoding_message_size(self.max_send_bytes);
            match client.watch(request).await {
                Ok(answers) => Ok(Opened {
                    answers: Box::pin(answers.into_inner()),
                    generation: link.generation,
                }),
                Err(status) => {
                    if endpoint_gone(&status) {
                        self.failed(link.generation);
                    }
                    Err(status)
                }
            }
        })
    }

    fn range(
        &self,
        request: RangeRequest,
        credentials: &MetadataMap,
    ) -> PortFuture<'_, Result<RangeResponse, Status>> {
        let mut call = Request::new(request);
        for name in [TOKEN_METADATA, AUTHORIZATION] {
            if let Some(value) = credentials.get(name) {
                call.metadata_mut().insert(name, value.clone());
            }
        }
        Box::pin(async move {
            let answer: Result<Response<RangeResponse>, Status> =
                upstream_call!(*self, call, KvClient, range, true);
            answer.map(Response::into_inner)
        })
    }

    fn broke(&self, generation: u64, status: Option<&Status>) {
        if status.is_none_or(endpoint_gone) {
            self.failed(generation);
        }
    }

    fn endpoint(&self) -> String {
        Upstream::endpoint(self)
    }
}

/// Does `status` say the endpoint itself is gone (not that it refused the request)?
pub fn endpoint_gone(status: &Status) -> bool {
    use std::error::Error as _;
    if status.code() != tonic::Code::Unavailable && status.code() != tonic::Code::Unknown {
        return false;
    }
    // A transport error (connection refused or reset, the stream broken) has a source; the
    // member's own answers (`etcdserver: no leader`) do not.
    status.source().is_some()
        || status.message().contains("transport")
        || status.message().contains("connection")
        || status.message().contains("h2 protocol error")
}

/// `message` as a request upstream, carrying the caller's token (as etcd's proxy passes it on).
pub fn carry<T, F>(message: T, from: &Request<F>) -> Request<T> {
    let mut request = Request::new(message);
    for name in [TOKEN_METADATA, AUTHORIZATION] {
        if let Some(value) = from.metadata().get(name) {
            request.metadata_mut().insert(name, value.clone());
        }
    }
    request
}
