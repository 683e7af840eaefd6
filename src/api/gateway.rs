//! The JSON gateway on the client port, as etcd's grpc-gateway serves it: `POST /v3/<service>/
//! <method>` with the request as proto3 JSON (original field names, 64-bit integers as strings,
//! bytes as base64), the response likewise; streaming methods answer one JSON object per line,
//! each `{"result": ...}`. Errors answer the HTTP status for the gRPC code with a JSON body
//! `{"error": ..., "code": ..., "message": ...}`; malformed JSON is a 400.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Status};

use super::MaintenanceService;
use super::{ClusterService, ElectionService, KvService, LeaseService, LockService};
use crate::proto::etcdserverpb::cluster_server::Cluster;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::lease_server::Lease;
use crate::proto::etcdserverpb::maintenance_server::Maintenance;
use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::{LeaseKeepAliveRequest, WatchRequest, WatchResponse};
use crate::proto::v3electionpb::election_server::Election;
use crate::proto::v3lockpb::lock_server::Lock;
use crate::server::KvServer;
use crate::watch::{WatchHub, WatchOut};

/// The HTTP status grpc-gateway answers for a gRPC code.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

fn error(status: &Status) -> Response {
    let body = serde_json::json!({
        "error": status.message(),
        "code": status.code() as i32,
        "message": status.message(),
    });
    json_response(http_status(status.code()), body.to_string())
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The request in `body` (empty: all defaults); a 400 if it is not the message's JSON.
fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Box<Response>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error(&Status::invalid_argument(format!(
            "malformed JSON request: {e}"
        ))))
    })
}

async fn unary<Req, Resp, Fut>(body: Bytes, call: impl FnOnce(Req) -> Fut) -> Response
where
    Req: DeserializeOwned + Default,
    Resp: Serialize,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let request = match parse::<Req>(&body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    match call(request).await {
        Ok(response) => match serde_json::to_string(response.get_ref()) {
            Ok(json) => json_response(StatusCode::OK, json),
            Err(e) => error(&Status::internal(e.to_string())),
        },
        Err(status) => error(&status),
    }
}

/// A stream of messages as JSON lines, each `{"result": ...}` (or `{"error": ...}`).
fn lines<T: Serialize + Send + 'static>(
    messages: impl Stream<Item = Result<T, Status>> + Send + 'static,
) -> Response {
    let body = messages.map(|message| {
        let line = match message {
            Ok(message) => serde_json::json!({ "result": message }),
            Err(status) => serde_json::json!({
                "error": { "grpc_code": status.code() as i32, "message": status.message() }
            }),
        };
        Ok::<_, Infallible>(Bytes::from(format!("{line}\n")))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| error(&Status::internal(e.to_string())))
}

/// `/v3/watch`: one create request in the body; the created answer and the events follow as
/// lines until the client goes away.
fn watch(hub: WatchHub, body: &[u8]) -> Response {
    let request: WatchRequest = match parse(body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let Some(RequestUnion::CreateRequest(create)) = request.request_union else {
        return error(&Status::invalid_argument(
            "the JSON gateway's watch takes one create_request",
        ));
    };
    let (stream, tx, rx) = hub.open_stream();
    let created = hub.create(stream, &tx, &create);
    let (watch_id, ok) = (created.watch_id, !created.canceled);
    let closing = StreamGuard {
        hub: hub.clone(),
        stream,
    };
    let first = tonic::codegen::tokio_stream::once(created);
    let rest = rx.map(WatchOut::into_response);
    if ok {
        hub.activate(stream, watch_id);
    }
    let responses = first.chain(rest).map(move |response: WatchResponse| {
        let _alive = &closing; // Dropped (closing the watch stream) with the response body.
        Ok(response)
    });
    lines(responses)
}

struct StreamGuard {
    hub: WatchHub,
    stream: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.hub.close_stream(self.stream);
    }
}

/// `/v3/lease/keepalive`: each JSON object in the body is a keep-alive; one line answers each.
async fn keep_alive(lease: Arc<LeaseService>, body: Bytes) -> Response {
    let mut ids = Vec::new();
    for request in serde_json::Deserializer::from_slice(&body).into_iter::<LeaseKeepAliveRequest>()
    {
        match request {
            Ok(request) => ids.push(request.id),
            Err(e) => {
                return error(&Status::invalid_argument(format!(
                    "malformed JSON request: {e}"
                )))
            }
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(ids.len().max(1));
    tokio::spawn(async move {
        for id in ids {
            let answer = lease.keep_alive_once(id).await;
            let failed = answer.is_err();
            if tx.send(answer).await.is_err() || failed {
                return;
            }
        }
    });
    lines(ReceiverStream::new(rx))
}

/// `POST path` calling `method` of `service` with the JSON body's request.
macro_rules! unary_route {
    ($router:expr, $path:expr, $service:expr, $trait:ident :: $method:ident) => {{
        let service = $service.clone();
        $router.route(
            $path,
            post(move |body: Bytes| {
                let service = service.clone();
                async move {
                    unary(body, |request| async move {
                        $trait::$method(&*service, Request::new(request)).await
                    })
                    .await
                }
            }),
        )
    }};
}

/// Every gateway route, for the client port.
pub fn routes(server: KvServer) -> Router {
    let kv = Arc::new(KvService::new(server.clone()));
    let lease = Arc::new(LeaseService::new(server.clone()));
    let cluster = Arc::new(ClusterService::new(server.clone()));
    let maintenance = Arc::new(MaintenanceService::new(server.clone()));
    let lock = Arc::new(LockService::new(server.clone()));
    let election = Arc::new(ElectionService::new(server.clone()));
    let mut router = Router::new();
    router = unary_route!(router, "/v3/kv/range", kv, Kv::range);
    router = unary_route!(router, "/v3/kv/put", kv, Kv::put);
    router = unary_route!(router, "/v3/kv/deleterange", kv, Kv::delete_range);
    router = unary_route!(router, "/v3/kv/txn", kv, Kv::txn);
    router = unary_route!(router, "/v3/kv/compaction", kv, Kv::compact);
    router = unary_route!(router, "/v3/lease/grant", lease, Lease::lease_grant);
    for path in ["/v3/lease/revoke", "/v3/kv/lease/revoke"] {
        router = unary_route!(router, path, lease, Lease::lease_revoke);
    }
    for path in ["/v3/lease/timetolive", "/v3/kv/lease/timetolive"] {
        router = unary_route!(router, path, lease, Lease::lease_time_to_live);
    }
    for path in ["/v3/lease/leases", "/v3/kv/lease/leases"] {
        router = unary_route!(router, path, lease, Lease::lease_leases);
    }
    router = unary_route!(
        router,
        "/v3/cluster/member/add",
        cluster,
        Cluster::member_add
    );
    router = unary_route!(
        router,
        "/v3/cluster/member/remove",
        cluster,
        Cluster::member_remove
    );
    router = unary_route!(
        router,
        "/v3/cluster/member/update",
        cluster,
        Cluster::member_update
    );
    router = unary_route!(
        router,
        "/v3/cluster/member/list",
        cluster,
        Cluster::member_list
    );
    router = unary_route!(
        router,
        "/v3/cluster/member/promote",
        cluster,
        Cluster::member_promote
    );
    router = unary_route!(
        router,
        "/v3/maintenance/status",
        maintenance,
        Maintenance::status
    );
    router = unary_route!(
        router,
        "/v3/maintenance/alarm",
        maintenance,
        Maintenance::alarm
    );
    router = unary_route!(
        router,
        "/v3/maintenance/defragment",
        maintenance,
        Maintenance::defragment
    );
    // etcd's gateway maps Hash and HashKV to the same path; HashKV is the one it serves.
    router = unary_route!(
        router,
        "/v3/maintenance/hash",
        maintenance,
        Maintenance::hash_kv
    );
    let snapshots = maintenance.clone();
    router = router.route(
        "/v3/maintenance/snapshot",
        post(move |body: Bytes| {
            let maintenance = snapshots.clone();
            async move {
                let request = match parse(&body) {
                    Ok(request) => request,
                    Err(response) => return *response,
                };
                match Maintenance::snapshot(&*maintenance, Request::new(request)).await {
                    Ok(stream) => lines(stream.into_inner()),
                    Err(status) => error(&status),
                }
            }
        }),
    );
    router = unary_route!(
        router,
        "/v3/maintenance/transfer-leadership",
        maintenance,
        Maintenance::move_leader
    );
    router = unary_route!(router, "/v3/lock/lock", lock, Lock::lock);
    router = unary_route!(router, "/v3/lock/unlock", lock, Lock::unlock);
    router = unary_route!(
        router,
        "/v3/election/campaign",
        election,
        Election::campaign
    );
    router = unary_route!(
        router,
        "/v3/election/proclaim",
        election,
        Election::proclaim
    );
    router = unary_route!(router, "/v3/election/leader", election, Election::leader);
    router = unary_route!(router, "/v3/election/resign", election, Election::resign);
    let observing = election.clone();
    router = router.route(
        "/v3/election/observe",
        post(move |body: Bytes| {
            let election = observing.clone();
            async move {
                let request = match parse(&body) {
                    Ok(request) => request,
                    Err(response) => return *response,
                };
                match Election::observe(&*election, Request::new(request)).await {
                    Ok(stream) => lines(stream.into_inner()),
                    Err(status) => error(&status),
                }
            }
        }),
    );
    let hub = server.watches().clone();
    router = router.route(
        "/v3/watch",
        post(move |body: Bytes| {
            let hub = hub.clone();
            async move { watch(hub, &body) }
        }),
    );
    router.route(
        "/v3/lease/keepalive",
        post(move |body: Bytes| keep_alive(lease.clone(), body)),
    )
}
