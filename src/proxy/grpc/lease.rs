//! Leases through the proxy: grant, revoke, time-to-live and the list are passed through;
//! keep-alives are coalesced. Every client keep-alive stream of the proxy shares one upstream
//! keep-alive stream, and a lease's keep-alive is sent upstream once however many clients ask
//! for it at the same time: each of them gets the one answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tonic::codegen::tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::forward::{pass, upstream_call, Passed};
use super::upstream::{carry, endpoint_gone, Upstream};
use crate::proto::etcdserverpb::lease_client::LeaseClient;
use crate::proto::etcdserverpb::lease_server::Lease;
use crate::proto::etcdserverpb::*;
use crate::proxy::metrics::ProxyMetrics;
use tonic::codegen::tokio_stream::StreamExt;

/// Keep-alive answers queued to one client stream, at most.
const CLIENT_QUEUE: usize = 64;
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

type ClientTx = mpsc::Sender<Result<LeaseKeepAliveResponse, Status>>;

#[derive(Default)]
struct State {
    upstream: Option<mpsc::UnboundedSender<LeaseKeepAliveRequest>>,
    /// Clients waiting for the answer of each lease's keep-alive in flight.
    waiting: HashMap<i64, Vec<ClientTx>>,
}

pub struct KeepAlives {
    up: Arc<Upstream>,
    state: Mutex<State>,
    wake: Notify,
    metrics: Arc<ProxyMetrics>,
}

impl KeepAlives {
    pub fn new(up: Arc<Upstream>, metrics: Arc<ProxyMetrics>) -> Arc<Self> {
        let keep_alives = Arc::new(KeepAlives {
            up,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            metrics,
        });
        tokio::spawn(keep_alives.clone().upstream_loop());
        keep_alives
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A client's keep-alive of lease `id`: sent upstream unless one is in flight already.
    fn ask(&self, id: i64, tx: ClientTx) {
        let mut state = self.lock();
        let waiting = state.waiting.entry(id).or_default();
        waiting.push(tx);
        if waiting.len() > 1 {
            self.metrics.keepalives_coalesced.inc();
            return;
        }
        match &state.upstream {
            Some(up) => {
                let _ = up.send(LeaseKeepAliveRequest { id });
            }
            // Sent by the upstream task once the stream is open.
            None => self.wake.notify_one(),
        }
    }

    fn answer(&self, response: LeaseKeepAliveResponse) {
        let waiting = self.lock().waiting.remove(&response.id).unwrap_or_default();
        for tx in waiting {
            // A client that does not read its answers misses them (as a slow keep-alive
            // client does from a member); the others are not held up.
            let _ = tx.try_send(Ok(response));
        }
    }

    async fn upstream_loop(self: Arc<Self>) {
        loop {
            if self.lock().waiting.is_empty() {
                self.wake.notified().await;
                continue;
            }
            let link = match self.up.link().await {
                Ok(link) => link,
                Err(status) => {
                    // Nobody can be answered: every waiting client gets the error.
                    let waiting = std::mem::take(&mut self.lock().waiting);
                    for tx in waiting.into_values().flatten() {
                        let _ = tx.try_send(Err(status.clone()));
                    }
                    tokio::time::sleep(RECONNECT_PAUSE * 10).await;
                    continue;
                }
            };
            let (tx, rx) = mpsc::unbounded_channel();
            {
                let mut state = self.lock();
                for id in state.waiting.keys() {
                    let _ = tx.send(LeaseKeepAliveRequest { id: *id });
                }
                state.upstream = Some(tx);
            }
            let mut client = LeaseClient::new(link.channel);
            let ended = match client
                .lease_keep_alive(UnboundedReceiverStream::new(rx))
                .await
            {
                Ok(answers) => self.read_upstream(answers.into_inner()).await,
                Err(status) => Err(status),
            };
            self.lock().upstream = None;
            match ended {
                Err(status) if endpoint_gone(&status) => self.up.failed(link.generation),
                Err(status) => {
                    // The member refused the stream (e.g. no leader): every waiting client
                    // gets its answer.
                    let waiting = std::mem::take(&mut self.lock().waiting);
                    for tx in waiting.into_values().flatten() {
                        let _ = tx.try_send(Err(status.clone()));
                    }
                }
                Ok(()) => {}
            }
            tokio::time::sleep(RECONNECT_PAUSE).await;
        }
    }

    async fn read_upstream(
        &self,
        mut answers: Streaming<LeaseKeepAliveResponse>,
    ) -> Result<(), Status> {
        loop {
            match answers.message().await? {
                Some(response) => self.answer(response),
                None => return Ok(()),
            }
            if self.lock().waiting.is_empty() {
                // Idle: the stream is closed, and opened again by the next keep-alive.
                return Ok(());
            }
        }
    }
}

/// The Lease service of the proxy.
#[derive(Clone)]
pub struct ProxyLease {
    pub up: Arc<Upstream>,
    pub seen: Arc<std::sync::atomic::AtomicI64>,
    pub keep_alives: Arc<KeepAlives>,
    pub ns: super::namespace::Namespace,
}

pass! { Lease, ProxyLease, LeaseClient;
    [
        lease_grant(LeaseGrantRequest) -> LeaseGrantResponse, false;
        lease_revoke(LeaseRevokeRequest) -> LeaseRevokeResponse, false;
        lease_leases(LeaseLeasesRequest) -> LeaseLeasesResponse, true;
    ]

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let answer: Result<Response<LeaseTimeToLiveResponse>, Status> =
            upstream_call!(self.up, request, LeaseClient, lease_time_to_live, true);
        let mut answer = answer?;
        if !self.ns.is_empty() {
            super::namespace::Namespaced::leave(answer.get_mut(), &self.ns);
        }
        Ok(answer)
    }


    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Passed<LeaseKeepAliveResponse>>, Status> {
        let identity = carry((), &request);
        if !identity.metadata().is_empty() {
            // With a token, the member checks the caller when the stream opens: the stream is
            // the caller's own, passed through.
            let up = self.up.clone();
            let inbound = request.into_inner();
            let forwarded = carry(inbound.filter_map(|ask| ask.ok()), &identity);
            let link = up.link().await?;
            let answers = LeaseClient::new(link.channel)
                .lease_keep_alive(forwarded)
                .await
                .inspect_err(|status| {
                    if endpoint_gone(status) {
                        up.failed(link.generation);
                    }
                })?;
            return Ok(Response::new(Box::pin(answers.into_inner())));
        }
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let keep_alives = self.keep_alives.clone();
        let mut inbound = request.into_inner();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(ask)) => keep_alives.ask(ask.id, tx.clone()),
                    Ok(None) => return,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
