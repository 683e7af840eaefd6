//! The `etcdserverpb.Maintenance` service: `Status` and `MoveLeader` so far; the other methods
//! answer `Unimplemented` (the generated defaults).

use tonic::{Request, Response, Status};

use super::to_status;
use super::ETCD_API_VERSION;
use crate::proto::etcdserverpb::maintenance_server::Maintenance;
use crate::proto::etcdserverpb::{
    MoveLeaderRequest, MoveLeaderResponse, StatusRequest, StatusResponse,
};
use crate::server::KvServer;

pub struct MaintenanceService {
    server: KvServer,
}

impl MaintenanceService {
    pub fn new(server: KvServer) -> Self {
        MaintenanceService { server }
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let report = self.server.status();
        Ok(Response::new(StatusResponse {
            header: Some(self.server.header(report.revision)),
            version: ETCD_API_VERSION.to_string(),
            db_size: report.db_size,
            leader: report.leader,
            raft_index: report.raft_index,
            raft_term: report.raft_term,
            raft_applied_index: report.raft_applied_index,
            errors: vec![],
            db_size_in_use: report.db_size,
            is_learner: self.server.is_learner(),
        }))
    }

    /// Must be sent to the leader (etcdctl finds it), as with etcd.
    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        self.server
            .move_leader(request.get_ref().target_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(MoveLeaderResponse {
            header: Some(self.server.header(self.server.status().revision)),
        }))
    }
}
