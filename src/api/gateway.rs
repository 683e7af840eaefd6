//! The JSON gateway on the client port, as etcd's grpc-gateway serves it: `POST /v3/<service>/
//! <method>` with the request as proto3 JSON (original field names, 64-bit integers as strings,
//! bytes as base64), the response likewise; streaming methods answer one JSON object per line,
//! each `{"result": ...}`. Errors answer the HTTP status for the gRPC code with a JSON body
//! `{"error": ..., "code": ..., "message": ...}`; malformed JSON is a 400.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Status};

use super::auth::{caller_of, AUTHORIZATION};
use super::{AuthService, MaintenanceService};
use super::{ClusterService, ElectionService, KvService, LeaseService, LockService};
use crate::auth::Access;
use crate::proto::etcdserverpb::auth_server::Auth;
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
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        // As etcd 3.4's gateway answers `lease already exists` (tests/conformance.rs).
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
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
fn watch(server: &KvServer, headers: &HeaderMap, body: &[u8]) -> Response {
    let hub = server.watches().clone();
    let request: WatchRequest = match parse(body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let Some(RequestUnion::CreateRequest(create)) = request.request_union else {
        return error(&Status::invalid_argument(
            "the JSON gateway's watch takes one create_request",
        ));
    };
    let allowed = caller_of(server, headers, &Default::default()).and_then(|who| {
        server
            .authorize_range(&who, &create.key, &create.range_end, Access::Read)
            .map_err(super::to_status)
    });
    if let Err(status) = allowed {
        return error(&status);
    }
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
async fn keep_alive(lease: Arc<LeaseService>, headers: HeaderMap, body: Bytes) -> Response {
    let from = with_token((), &headers);
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
            let answer = lease.keep_alive_once(id, &from).await;
            let failed = answer.is_err();
            if tx.send(answer).await.is_err() || failed {
                return;
            }
        }
    });
    lines(ReceiverStream::new(rx))
}

/// `message` as a gRPC request, with the token of the HTTP request's `Authorization` header
/// (as grpc-gateway passes it on).
fn with_token<T>(message: T, headers: &HeaderMap) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| tonic::metadata::MetadataValue::try_from(v.as_bytes()).ok())
    {
        request.metadata_mut().insert(AUTHORIZATION, token);
    }
    request
}

/// `POST path` calling `method` of `service` with the JSON body's request.
macro_rules! unary_route {
    ($router:expr, $path:expr, $service:expr, $trait:ident :: $method:ident) => {{
        let service = $service.clone();
        $router.route(
            $path,
            post(move |headers: HeaderMap, body: Bytes| {
                let service = service.clone();
                async move {
                    unary(body, |request| async move {
                        $trait::$method(&*service, with_token(request, &headers)).await
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
        post(move |headers: HeaderMap, body: Bytes| {
            let maintenance = snapshots.clone();
            async move {
                let request = match parse(&body) {
                    Ok(request) => request,
                    Err(response) => return *response,
                };
                match Maintenance::snapshot(&*maintenance, with_token(request, &headers)).await {
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
        post(move |headers: HeaderMap, body: Bytes| {
            let election = observing.clone();
            async move {
                let request = match parse(&body) {
                    Ok(request) => request,
                    Err(response) => return *response,
                };
                match Election::observe(&*election, with_token(request, &headers)).await {
                    Ok(stream) => lines(stream.into_inner()),
                    Err(status) => error(&status),
                }
            }
        }),
    );
    let watching = server.clone();
    router = router.route(
        "/v3/watch",
        post(move |headers: HeaderMap, body: Bytes| {
            let server = watching.clone();
            async move { watch(&server, &headers, &body) }
        }),
    );
    let auth = Arc::new(AuthService::new(server.clone()));
    for (path, route) in AUTH_ROUTES {
        router = route(router, path, auth.clone());
    }
    router.route(
        "/v3/lease/keepalive",
        post(move |headers: HeaderMap, body: Bytes| keep_alive(lease.clone(), headers, body)),
    )
}

type AuthRoute = fn(Router, &'static str, Arc<AuthService>) -> Router;

/// The Auth service's paths, as etcd's gateway maps them.
const AUTH_ROUTES: [(&str, AuthRoute); 17] = [
    ("/v3/auth/enable", |r, p, s| {
        unary_route!(r, p, s, Auth::auth_enable)
    }),
    ("/v3/auth/disable", |r, p, s| {
        unary_route!(r, p, s, Auth::auth_disable)
    }),
    ("/v3/auth/status", |r, p, s| {
        unary_route!(r, p, s, Auth::auth_status)
    }),
    ("/v3/auth/authenticate", |r, p, s| {
        unary_route!(r, p, s, Auth::authenticate)
    }),
    ("/v3/auth/user/add", |r, p, s| {
        unary_route!(r, p, s, Auth::user_add)
    }),
    ("/v3/auth/user/get", |r, p, s| {
        unary_route!(r, p, s, Auth::user_get)
    }),
    ("/v3/auth/user/list", |r, p, s| {
        unary_route!(r, p, s, Auth::user_list)
    }),
    ("/v3/auth/user/delete", |r, p, s| {
        unary_route!(r, p, s, Auth::user_delete)
    }),
    ("/v3/auth/user/changepw", |r, p, s| {
        unary_route!(r, p, s, Auth::user_change_password)
    }),
    ("/v3/auth/user/grant", |r, p, s| {
        unary_route!(r, p, s, Auth::user_grant_role)
    }),
    ("/v3/auth/user/revoke", |r, p, s| {
        unary_route!(r, p, s, Auth::user_revoke_role)
    }),
    ("/v3/auth/role/add", |r, p, s| {
        unary_route!(r, p, s, Auth::role_add)
    }),
    ("/v3/auth/role/get", |r, p, s| {
        unary_route!(r, p, s, Auth::role_get)
    }),
    ("/v3/auth/role/list", |r, p, s| {
        unary_route!(r, p, s, Auth::role_list)
    }),
    ("/v3/auth/role/delete", |r, p, s| {
        unary_route!(r, p, s, Auth::role_delete)
    }),
    ("/v3/auth/role/grant", |r, p, s| {
        unary_route!(r, p, s, Auth::role_grant_permission)
    }),
    ("/v3/auth/role/revoke", |r, p, s| {
        unary_route!(r, p, s, Auth::role_revoke_permission)
    }),
];
