//! `grpc_server_started_total` and `grpc_server_handled_total`, as go-grpc-prometheus counts
//! them for etcd: a layer in front of the routed gRPC services. A call is handled once its
//! status is known: from the headers of a trailers-only answer, from the trailers, or as
//! `Canceled` when the client goes away first. The KV short path (`unary`), in front of this
//! layer, counts the calls it answers itself (`kv_method`), without wrapping their bodies; a
//! call it passes on carries `StartCounted` so that it is not counted as started twice.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, OnceLock};
use std::task::{Context, Poll};

use http_body::{Body as HttpBody, Frame};
use prometheus::IntCounter;
use tonic::body::Body;
use tonic::codegen::http::{self, HeaderMap};
use tonic::codegen::Service;

use super::GRPC_STATUS;
use crate::metrics::METRICS;

/// Every method of etcd's services: (service, methods).
const METHODS: &[(&str, &[&str])] = &[
    (
        "etcdserverpb.KV",
        &["Range", "Put", "DeleteRange", "Txn", "Compact"],
    ),
    ("etcdserverpb.Watch", &["Watch"]),
    (
        "etcdserverpb.Lease",
        &[
            "LeaseGrant",
            "LeaseRevoke",
            "LeaseKeepAlive",
            "LeaseTimeToLive",
            "LeaseLeases",
        ],
    ),
    (
        "etcdserverpb.Cluster",
        &[
            "MemberAdd",
            "MemberRemove",
            "MemberUpdate",
            "MemberList",
            "MemberPromote",
        ],
    ),
    (
        "etcdserverpb.Maintenance",
        &[
            "Alarm",
            "Status",
            "Defragment",
            "Hash",
            "HashKV",
            "Snapshot",
            "MoveLeader",
            "Downgrade",
        ],
    ),
    (
        "etcdserverpb.Auth",
        &[
            "AuthEnable",
            "AuthDisable",
            "AuthStatus",
            "Authenticate",
            "UserAdd",
            "UserGet",
            "UserList",
            "UserDelete",
            "UserChangePassword",
            "UserGrantRole",
            "UserRevokeRole",
            "RoleAdd",
            "RoleGet",
            "RoleList",
            "RoleDelete",
            "RoleGrantPermission",
            "RoleRevokePermission",
        ],
    ),
    ("v3lockpb.Lock", &["Lock", "Unlock"]),
    (
        "v3electionpb.Election",
        &["Campaign", "Proclaim", "Leader", "Observe", "Resign"],
    ),
];

/// grpc-go's names of the status codes, by number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const CANCELED: usize = 1;
const UNKNOWN: usize = 2;

fn grpc_type(service: &str, method: &str) -> &'static str {
    match (service, method) {
        ("etcdserverpb.Watch", "Watch") | ("etcdserverpb.Lease", "LeaseKeepAlive") => "bidi_stream",
        ("etcdserverpb.Maintenance", "Snapshot") | ("v3electionpb.Election", "Observe") => {
            "server_stream"
        }
        _ => "unary",
    }
}

/// One method's counters, the handled ones made on first use.
pub(super) struct MethodMetrics {
    labels: [&'static str; 3],
    pub(super) started: IntCounter,
    handled: [OnceLock<IntCounter>; 17],
}

/// A request extension: its call was counted as started already.
#[derive(Clone, Copy)]
pub(super) struct StartCounted;

/// The counters of `etcdserverpb.KV/<method>`.
pub(super) fn kv_method(method: &str) -> Option<&'static MethodMetrics> {
    BY_PATH
        .get(&format!("/etcdserverpb.KV/{method}"))
        .map(|m| &**m)
}

impl MethodMetrics {
    pub(super) fn handled(&self, code: usize) {
        let code = code.min(CODE_NAMES.len() - 1);
        self.handled[code]
            .get_or_init(|| {
                let [kind, service, method] = self.labels;
                METRICS
                    .grpc_handled
                    .with_label_values(&[kind, service, method, CODE_NAMES[code]])
            })
            .inc();
    }

    /// Counts the call by the `grpc-status` in `headers`, if there is one.
    pub(super) fn handled_by(&self, headers: &HeaderMap) -> bool {
        let Some(status) = headers.get(GRPC_STATUS) else {
            return false;
        };
        let code = status
            .to_str()
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(UNKNOWN);
        self.handled(code);
        true
    }
}

/// By request path (`/etcdserverpb.KV/Put`).
static BY_PATH: LazyLock<HashMap<String, Arc<MethodMetrics>>> = LazyLock::new(|| {
    let mut by_path = HashMap::new();
    for (service, methods) in METHODS {
        for method in *methods {
            let kind = grpc_type(service, method);
            let started = METRICS
                .grpc_started
                .with_label_values(&[kind, service, method]);
            by_path.insert(
                format!("/{service}/{method}"),
                Arc::new(MethodMetrics {
                    labels: [kind, service, method],
                    started,
                    handled: Default::default(),
                }),
            );
        }
    }
    by_path
});

/// The layer's service.
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S> GrpcMetrics<S> {
    pub fn new(inner: S) -> Self {
        // The labels of every method exist from the start, as go-grpc-prometheus makes them.
        LazyLock::force(&BY_PATH);
        GrpcMetrics { inner }
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> Service<http::Request<Body>> for GrpcMetrics<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> ResponseFuture {
        let method = BY_PATH.get(request.uri().path()).cloned();
        if let Some(method) = &method {
            if request.extensions().get::<StartCounted>().is_none() {
                method.started.inc();
            }
        }
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            let Some(method) = method else {
                return Ok(response);
            };
            if method.handled_by(response.headers()) {
                return Ok(response); // trailers-only
            }
            Ok(response.map(|body| {
                Body::new(CountedBody {
                    inner: body,
                    method: Some(method),
                })
            }))
        })
    }
}

/// A response body that counts its call once its trailers (or its end) arrive.
struct CountedBody {
    inner: Body,
    /// `None` once counted.
    method: Option<Arc<MethodMetrics>>,
}

impl HttpBody for CountedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(method) = self.method.take() {
                        if !method.handled_by(trailers) {
                            method.handled(UNKNOWN);
                        }
                    }
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                if let Some(method) = self.method.take() {
                    method.handled(UNKNOWN);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        // The client went away before the status was sent.
        if let Some(method) = self.method.take() {
            method.handled(CANCELED);
        }
    }
}
