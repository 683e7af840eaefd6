//! etcd's lock (`v3lockpb.Lock`) and election (`v3electionpb.Election`) services, on the
//! recipes in `server::concurrency`. A waiting Lock or Campaign ends when its client goes away.

use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::auth::caller;
use crate::auth::Access;
use crate::proto::v3electionpb::election_server::Election;
use crate::proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use crate::proto::v3lockpb::lock_server::Lock;
use crate::proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use crate::server::{holder_key, prefix, prefix_end};
use crate::server::{KvServer, ServerError};

/// What a lock or an election needs of `who`, as the client operations etcd's recipes make
/// would: reading every key of `name` (the holders, in line), and, with `write`, writing
/// `key` (its own holder key). Any other access is refused with etcd's message.
fn authorize<T>(
    server: &KvServer,
    request: &Request<T>,
    name: &[u8],
    write: Option<&[u8]>,
) -> Result<(), Status> {
    let who = caller(server, request).map_err(unknown)?;
    let prefix = prefix(name);
    server
        .authorize_range(&who, &prefix, &prefix_end(&prefix), Access::Read)
        .map_err(to_status)?;
    if let Some(key) = write {
        server
            .authorize_range(&who, key, &[], Access::Write)
            .map_err(to_status)?;
    }
    Ok(())
}

/// etcd serves these two services through a client of its own, and their refusals lose their
/// codes on the way: each comes back as `Unknown` with etcd's message.
fn unknown(status: Status) -> Status {
    Status::unknown(status.message().to_string())
}

fn to_status(error: ServerError) -> Status {
    unknown(super::to_status(error))
}

/// Leader changes queued for one Observe stream, at most.
const OBSERVE_QUEUE: usize = 16;

pub struct LockService {
    server: KvServer,
}

impl LockService {
    pub fn new(server: KvServer) -> Self {
        LockService { server }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let key = holder_key(&request.get_ref().name, request.get_ref().lease);
        authorize(&self.server, &request, &request.get_ref().name, Some(&key))?;
        let req = request.into_inner();
        let (header, key) = self
            .server
            .lock(&req.name, req.lease)
            .await
            .map_err(to_status)?;
        Ok(Response::new(LockResponse {
            header: Some(header),
            key,
        }))
    }

    async fn unlock(
        &self,
        request: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        // The key is looked at before who asks, as etcd 3.4's does.
        if request.get_ref().key.is_empty() {
            return Err(to_status(ServerError::Mvcc(
                crate::mvcc::MvccError::EmptyKey,
            )));
        }
        let who = caller(&self.server, &request).map_err(unknown)?;
        self.server
            .authorize_range(&who, &request.get_ref().key, &[], Access::Write)
            .map_err(to_status)?;
        let header = self
            .server
            .unlock(&request.into_inner().key)
            .await
            .map_err(to_status)?;
        Ok(Response::new(UnlockResponse {
            header: Some(header),
        }))
    }
}

pub struct ElectionService {
    server: KvServer,
}

impl ElectionService {
    pub fn new(server: KvServer) -> Self {
        ElectionService { server }
    }
}

fn leader_key(leader: Option<LeaderKey>) -> Result<LeaderKey, Status> {
    leader.ok_or_else(|| to_status(ServerError::MissingLeaderKey))
}

/// Sends the leader of election `name` each time it (or its value) changes, until the client
/// goes away.
async fn observe(
    server: KvServer,
    name: Vec<u8>,
    tx: mpsc::Sender<Result<LeaderResponse, Status>>,
) {
    let mut last: Option<(Vec<u8>, i64)> = None;
    loop {
        let from_rev = match server.election_leader(&name).await {
            Ok((header, kv)) => {
                let seen = Some((kv.key.clone(), kv.mod_revision));
                let revision = header.revision;
                if seen != last {
                    last = seen;
                    let response = LeaderResponse {
                        header: Some(header),
                        kv: Some(kv),
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
                revision + 1
            }
            Err(ServerError::ElectionNoLeader) => server.status().revision + 1,
            // As etcd 3.4's: a failed read ends the stream, without an error.
            Err(e) => {
                tracing::debug!(error = %e, "an election's observer stops");
                return;
            }
        };
        tokio::select! {
            changed = server.election_changed(&name, from_rev) => {
                if let Err(e) = changed {
                    tracing::debug!(error = %e, "an election's observer stops");
                    return;
                }
            }
            _ = tx.closed() => return,
        }
    }
}

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let key = holder_key(&request.get_ref().name, request.get_ref().lease);
        authorize(&self.server, &request, &request.get_ref().name, Some(&key))?;
        let req = request.into_inner();
        let (header, leader) = self
            .server
            .campaign(&req.name, req.lease, &req.value)
            .await
            .map_err(to_status)?;
        Ok(Response::new(CampaignResponse {
            header: Some(header),
            leader: Some(leader),
        }))
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let leader = leader_key(request.get_ref().leader.clone())?;
        authorize(&self.server, &request, &leader.name, Some(&leader.key))?;
        let req = request.into_inner();
        let header = self
            .server
            .proclaim(&leader, &req.value)
            .await
            .map_err(to_status)?;
        Ok(Response::new(ProclaimResponse {
            header: Some(header),
        }))
    }

    async fn leader(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        authorize(&self.server, &request, &request.get_ref().name, None)?;
        let (header, kv) = self
            .server
            .election_leader(&request.into_inner().name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(LeaderResponse {
            header: Some(header),
            kv: Some(kv),
        }))
    }

    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<BoxStream<LeaderResponse>>, Status> {
        let (tx, rx) = mpsc::channel(OBSERVE_QUEUE);
        // etcd 3.4 observes through a client of its own, whose refusals end the stream
        // without an error: a caller who may not read the election gets an empty stream.
        if authorize(&self.server, &request, &request.get_ref().name, None).is_ok() {
            tokio::spawn(observe(self.server.clone(), request.into_inner().name, tx));
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resign(
        &self,
        request: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let leader = leader_key(request.get_ref().leader.clone())?;
        authorize(&self.server, &request, &leader.name, Some(&leader.key))?;
        let header = self.server.resign(&leader).await.map_err(to_status)?;
        Ok(Response::new(ResignResponse {
            header: Some(header),
        }))
    }
}
