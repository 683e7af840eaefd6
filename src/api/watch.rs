//! The `etcdserverpb.Watch` service: one bidirectional stream carries many watches. Requests
//! (create, cancel, progress) are read in order; responses (created, events, canceled,
//! progress) come back on one bounded queue shared by the stream's watchers.

use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::tokio_stream::StreamExt;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::watch_server::Watch;
use crate::proto::etcdserverpb::{WatchRequest, WatchResponse};
use crate::server::KvServer;
use crate::watch::WatchHub;

pub struct WatchService {
    server: KvServer,
}

impl WatchService {
    pub fn new(server: KvServer) -> Self {
        WatchService { server }
    }
}

/// Reads the stream's requests until the client closes it, then drops its watchers.
async fn serve_stream(
    hub: WatchHub,
    stream: u64,
    tx: mpsc::Sender<WatchResponse>,
    mut inbound: Streaming<WatchRequest>,
) {
    while let Ok(Some(request)) = inbound.message().await {
        let answered = match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => {
                let created = hub.create(stream, &tx, &create);
                let (watch_id, ok) = (created.watch_id, !created.canceled);
                let sent = tx.send(created).await.is_ok();
                if ok {
                    hub.activate(stream, watch_id);
                }
                sent
            }
            // As etcd: a cancel of an unknown watch gets no answer.
            Some(RequestUnion::CancelRequest(cancel)) if hub.cancel(stream, cancel.watch_id) => {
                let mut canceled = hub.progress(stream);
                canceled.watch_id = cancel.watch_id;
                canceled.canceled = true;
                tx.send(canceled).await.is_ok()
            }
            Some(RequestUnion::CancelRequest(_)) => true,
            Some(RequestUnion::ProgressRequest(_)) => tx.send(hub.progress(stream)).await.is_ok(),
            None => true,
        };
        if !answered {
            break;
        }
    }
    hub.close_stream(stream);
}

#[tonic::async_trait]
impl Watch for WatchService {
    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<BoxStream<WatchResponse>>, Status> {
        self.server.refuse_learner().map_err(super::to_status)?;
        let hub = self.server.watches().clone();
        let (stream, tx, rx) = hub.open_stream();
        tokio::spawn(serve_stream(hub, stream, tx, request.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}
