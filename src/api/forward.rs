//! Forwarding a request this member cannot answer (it is not the leader) to the leader's
//! client URL, once: a forwarded request carries a mark and is never forwarded again.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::server::KvServer;
use crate::tls::ClientTls;

/// The TLS to reach the leader's `https://` client URLs with (the member's client-port
/// settings, as etcd's), set once at start.
static FORWARDING_TLS: OnceLock<Option<Arc<ClientTls>>> = OnceLock::new();

pub fn set_forwarding_tls(tls: Option<Arc<ClientTls>>) {
    let _ = FORWARDING_TLS.set(tls);
}

/// A channel to `url`: over TLS for `https://`.
async fn connect(endpoint: Endpoint, url: &str) -> Result<Channel, String> {
    if !crate::tls::is_https(url) {
        return endpoint.connect().await.map_err(|e| e.to_string());
    }
    let Some(tls) = FORWARDING_TLS.get().cloned().flatten() else {
        return Err("the leader's client URL is https:// and this member has no client TLS".into());
    };
    crate::tls::connect_channel(endpoint, tls).await
}

/// Marks a request a follower forwarded: the receiver does not forward it again.
const FORWARDED: &str = "x-quorumkv-forwarded";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Channels to the leader, the last one kept (keep-alives are forwarded every few seconds).
#[derive(Clone)]
pub struct ToLeader {
    server: KvServer,
    cached: Arc<Mutex<Option<(String, Channel)>>>,
}

impl ToLeader {
    pub fn new(server: KvServer) -> Self {
        ToLeader {
            server,
            cached: Arc::default(),
        }
    }

    /// A channel to the leader, for a request this member cannot answer; refused when the
    /// request was itself forwarded (the leader changed meanwhile).
    pub async fn channel<T>(&self, request: &Request<T>) -> Result<Channel, Status> {
        if request.metadata().contains_key(FORWARDED) {
            return Err(Status::unavailable("etcdserver: leader changed"));
        }
        let Some((leader, urls)) = self.server.leader_client_urls() else {
            return Err(Status::unavailable("etcdserver: no leader"));
        };
        if let Some((url, channel)) = self.lock().as_ref() {
            if urls.contains(url) {
                return Ok(channel.clone());
            }
        }
        for url in &urls {
            let Ok(endpoint) = Endpoint::from_shared(url.clone()) else {
                continue;
            };
            match connect(endpoint.connect_timeout(CONNECT_TIMEOUT), url).await {
                Ok(channel) => {
                    *self.lock() = Some((url.clone(), channel.clone()));
                    return Ok(channel);
                }
                Err(e) => {
                    tracing::warn!(leader = format!("{leader:x}"), url, error = %e, "cannot reach the leader to forward a request")
                }
            }
        }
        Err(Status::unavailable("etcdserver: leader changed"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(String, Channel)>> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `message` as a request marked forwarded, with the token `from` carried (if any): the
/// leader checks it too.
pub fn forwarded<T, F>(message: T, from: &Request<F>) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    for name in [super::auth::TOKEN_METADATA, super::auth::AUTHORIZATION] {
        if let Some(token) = from.metadata().get(name) {
            request.metadata_mut().insert(name, token.clone());
        }
    }
    request
}
