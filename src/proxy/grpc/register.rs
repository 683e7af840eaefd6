//! `--resolver-prefix`: the proxy registers itself under `<prefix>/<advertise-client-url>`, held
//! by a lease of `--resolver-ttl` seconds that it keeps alive; `MemberList` through a proxy that
//! registers lists the registered proxies (as etcd's grpc-proxy does: name and client URL, no ID,
//! no header).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::{Request, Status};

use super::upstream::{carry, Upstream};
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::lease_client::LeaseClient;
use crate::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, Member, PutRequest, RangeRequest,
};

/// The value under a registered key: gRPC's naming update, as etcd writes it.
#[derive(Serialize, Deserialize)]
struct NamingUpdate {
    #[serde(rename = "Op")]
    op: u32,
    #[serde(rename = "Addr")]
    addr: String,
    #[serde(rename = "Metadata", default)]
    metadata: String,
}

#[derive(Serialize, Deserialize, Default)]
struct Metadata {
    #[serde(default)]
    name: String,
}

pub struct Registration {
    up: Arc<Upstream>,
    prefix: String,
    addr: String,
    ttl: i64,
}

/// This machine's name, as the registration's metadata names the proxy.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Registration {
    pub fn new(up: Arc<Upstream>, prefix: String, addr: String, ttl: i64) -> Arc<Registration> {
        Arc::new(Registration {
            up,
            prefix,
            addr,
            ttl: ttl.max(1),
        })
    }

    fn key(&self) -> String {
        format!("{}/{}", self.prefix, self.addr)
    }

    /// Registers and keeps the registration alive until the process ends; a lost lease (the
    /// cluster unreachable past the TTL) is granted and written again.
    pub async fn run(self: Arc<Self>) {
        loop {
            if let Err(e) = self.register_once().await {
                tracing::warn!(key = %self.key(), error = %e, "cannot keep the proxy registered; retrying");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn register_once(&self) -> Result<(), String> {
        let link = self.up.link().await.map_err(|s| s.message().to_string())?;
        let mut lease = LeaseClient::new(link.channel.clone());
        let granted = lease
            .lease_grant(LeaseGrantRequest {
                ttl: self.ttl,
                id: 0,
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        if !granted.error.is_empty() {
            return Err(granted.error);
        }
        let value = NamingUpdate {
            op: 0,
            addr: self.addr.clone(),
            metadata: serde_json::to_string(&Metadata { name: hostname() })
                .map_err(|e| e.to_string())?,
        };
        KvClient::new(link.channel.clone())
            .put(PutRequest {
                key: self.key().into_bytes(),
                value: serde_json::to_vec(&value).map_err(|e| e.to_string())?,
                lease: granted.id,
                ..Default::default()
            })
            .await
            .map_err(|s| s.message().to_string())?;
        tracing::info!(key = %self.key(), lease = granted.id, ttl = self.ttl, "registered the proxy");
        let id = granted.id;
        let every = Duration::from_millis((self.ttl as u64 * 1000 / 3).max(500));
        let requests = async_stream(id, every);
        let mut answers = lease
            .lease_keep_alive(requests)
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        loop {
            match answers.message().await {
                Ok(Some(answer)) if answer.ttl > 0 => {}
                Ok(Some(_)) => return Err("the registration's lease expired".into()),
                Ok(None) => return Err("the keep-alive stream ended".into()),
                Err(status) => {
                    if super::upstream::endpoint_gone(&status) {
                        self.up.failed(link.generation);
                    }
                    return Err(status.message().to_string());
                }
            }
        }
    }

    /// The registered proxies, as `MemberList` answers through a registering proxy.
    pub async fn members<T>(&self, from: &Request<T>) -> Result<Vec<Member>, Status> {
        let prefix = format!("{}/", self.prefix).into_bytes();
        let request = carry(
            RangeRequest {
                range_end: super::prefix_end(&prefix),
                key: prefix,
                ..Default::default()
            },
            from,
        );
        let link = self.up.link().await?;
        let found = KvClient::new(link.channel)
            .range(request)
            .await?
            .into_inner();
        Ok(found
            .kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<NamingUpdate>(&kv.value).ok())
            .map(|update| {
                let meta: Metadata = serde_json::from_str(&update.metadata).unwrap_or_default();
                Member {
                    name: meta.name,
                    client_ur_ls: vec![update.addr],
                    ..Default::default()
                }
            })
            .collect())
    }
}

/// A keep-alive for lease `id` every `every`, for as long as the stream is read.
fn async_stream(
    id: i64,
    every: Duration,
) -> impl tonic::codegen::tokio_stream::Stream<Item = LeaseKeepAliveRequest> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_is_written_as_etcd_writes_it() {
        let value = NamingUpdate {
            op: 0,
            addr: "127.0.0.1:23790".into(),
            metadata: serde_json::to_string(&Metadata { name: "vm".into() }).expect("json"),
        };
        assert_eq!(
            serde_json::to_string(&value).expect("json"),
            r#"{"Op":0,"Addr":"127.0.0.1:23790","Metadata":"{\"name\":\"vm\"}"}"#
        );
    }
}
