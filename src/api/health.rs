//! The HTTP/1.1 probes on the client port (and `--listen-metrics-urls`), as etcd serves them:
//! `/metrics` (Prometheus' text format), `/health` (etcd's JSON, 503
//! when unhealthy, `?exclude=` and `?serializable=`), `/livez` and `/readyz` (etcd 3.6's plain
//! text checks), `/version` (etcd's JSON), and the answer to any other path: gRPC
//! `Unimplemented` for a gRPC call, a JSON 404 otherwise (never a 200).

use axum::extract::Request;
use axum::http::Uri;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::ETCD_API_VERSION;
use crate::server::{KvServer, Unhealthy};

/// The query of `/health`: `exclude` (an alarm name; may repeat) and `serializable`.
fn probe_options(uri: &Uri) -> (bool, Vec<String>) {
    let query: Vec<(String, String)> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let serializable = query
        .iter()
        .any(|(k, v)| k == "serializable" && v.eq_ignore_ascii_case("true"));
    let exclude = query
        .iter()
        .filter(|(k, _)| k == "exclude")
        .map(|(_, v)| v.clone())
        .collect();
    (serializable, exclude)
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn health(server: KvServer, uri: Uri) -> Response {
    let (serializable, exclude) = probe_options(&uri);
    match server.health(serializable, &exclude).await {
        Ok(()) => json(
            StatusCode::OK,
            serde_json::json!({"health": "true", "reason": ""}),
        ),
        Err(why) => {
            tracing::warn!(reason = %why, "serving /health: unhealthy");
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"health": "false", "reason": why.to_string()}),
            )
        }
    }
}

/// etcd 3.6's probe format: `ok`, or one `[-]<check> failed: <reason>` line and a verdict.
fn check_answer(probe: &str, check: &str, outcome: Result<(), Unhealthy>) -> Response {
    match outcome {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("[-]{check} failed: {why}\n{probe} check failed"),
        )
            .into_response(),
    }
}

/// `/metrics`: every metric in Prometheus' text format, the member's state read just now.
async fn metrics(server: KvServer) -> Response {
    server.refresh_metrics();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, crate::metrics::TEXT_CONTENT_TYPE)],
        crate::metrics::METRICS.encode(),
    )
        .into_response()
}

fn version() -> Response {
    json(
        StatusCode::OK,
        serde_json::json!({
            "etcdserver": ETCD_API_VERSION,
            "etcdcluster": ETCD_API_VERSION,
            "quorumkv": env!("CARGO_PKG_VERSION"),
        }),
    )
}

/// Any path no route takes: a gRPC call gets `Unimplemented` (as from etcd), anything else a
/// 404. Set on the client port's whole router, after every merge.
pub async fn fallback(request: Request) -> Response {
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented("").into_http();
    }
    json(
        StatusCode::NOT_FOUND,
        serde_json::json!({
            "error": "Not Found",
            "code": tonic::Code::NotFound as i32,
            "message": format!("no handler for {} {}", request.method(), request.uri().path()),
        }),
    )
}

/// The probe routes, for the client port.
pub fn routes(server: KvServer) -> Router {
    let for_health = server.clone();
    let for_livez = server.clone();
    let for_readyz = server.clone();
    let for_metrics = server;
    Router::new()
        .route(
            "/health",
            get(move |uri: Uri| health(for_health.clone(), uri)),
        )
        .route(
            "/livez",
            get(move || {
                let server = for_livez.clone();
                async move {
                    // Alive while it can read its own state, leader or not.
                    let outcome = server.probe_read(true).await;
                    check_answer("livez", "serializable_read", outcome)
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let server = for_readyz.clone();
                async move {
                    let outcome = server.health(false, &["NOSPACE".into()]).await;
                    let check = match &outcome {
                        Err(Unhealthy::Alarm(_)) => "data_corruption",
                        Err(Unhealthy::NoLeader) => "leader",
                        _ => "linearizable_read",
                    };
                    check_answer("readyz", check, outcome)
                }
            }),
        )
        .route("/version", get(|| async { version() }))
        .route("/metrics", get(move || metrics(for_metrics.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_options_read_exclude_and_serializable_as_kubeadm_sends_them() {
        let uri: Uri = "/health?exclude=NOSPACE&serializable=true&exclude=CORRUPT"
            .parse()
            .expect("uri");
        assert_eq!(
            probe_options(&uri),
            (true, vec!["NOSPACE".to_string(), "CORRUPT".to_string()])
        );
        let plain: Uri = "/health".parse().expect("uri");
        assert_eq!(probe_options(&plain), (false, vec![]));
    }
}
