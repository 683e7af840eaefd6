//! The v2 API on the client port (`--enable-v2`): `/v2/keys/...` with etcd's form fields,
//! headers, status codes and error bodies, and `/v2/members`, `/v2/machines`,
//! `/v2/stats/{self,leader,store}`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

use super::event::rfc3339_nanos;
use super::{clean_path, Event, V2Error};
use super::{
    INDEX_NAN, INVALID_FIELD, PREV_VALUE_REQUIRED, RAFT_INTERNAL, REFRESH_TTL_REQUIRED,
    REFRESH_VALUE, TTL_NAN,
};
use crate::proto::quorumkvpb::V2Request;
use crate::server::KvServer;

/// How long a `wait=true` request is held open at most (etcd's default watch timeout).
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(5 * 60);

const KEYS_PREFIX: &str = "/v2/keys";

/// When the v2 routes were made: this member's start time in `/v2/stats/self`.
static STARTED: OnceLock<(SystemTime, std::time::Instant)> = OnceLock::new();

pub fn routes(server: KvServer) -> Router {
    STARTED.get_or_init(|| (SystemTime::now(), std::time::Instant::now()));
    Router::new()
        .route("/v2/keys", any(keys))
        .route("/v2/keys/", any(keys))
        .route("/v2/keys/{*path}", any(keys))
        .route("/v2/members", any(super::members::root))
        .route("/v2/members/", any(super::members::root))
        .route("/v2/members/{id}", any(super::members::one))
        .route("/v2/machines", get(machines))
        .route("/v2/stats/self", get(stats_self))
        .route("/v2/stats/leader", get(stats_leader))
        .route("/v2/stats/store", get(stats_store))
        .with_state(server)
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The names of the headers etcd puts on keys answers, made once.
const X_ETCD_CLUSTER_ID: HeaderName = HeaderName::from_static("x-etcd-cluster-id");
const X_ETCD_INDEX: HeaderName = HeaderName::from_static("x-etcd-index");
const X_RAFT_INDEX: HeaderName = HeaderName::from_static("x-raft-index");
const X_RAFT_TERM: HeaderName = HeaderName::from_static("x-raft-term");

/// Headers an answer to a keys request carries, about: room made at once rather than by
/// growing the map header by header.
const ANSWER_HEADERS: usize = 12;

/// The headers etcd puts on every keys answer it reads.
pub(super) fn common_headers(server: &KvServer, headers: &mut HeaderMap) {
    headers.reserve(ANSWER_HEADERS);
    cors_headers(headers);
    if let Ok(id) = HeaderValue::from_str(&format!("{:x}", server.config().cluster_id)) {
        headers.insert(X_ETCD_CLUSTER_ID, id);
    }
}

/// The headers etcd puts on every keys answer.
pub(super) fn cors_headers(headers: &mut HeaderMap) {
    for (name, value) in [
        (
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            "accept, content-type, authorization",
        ),
        (
            header::ACCESS_CONTROL_ALLOW_METHODS,
            "POST, GET, OPTIONS, PUT, DELETE",
        ),
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

/// Go's `cleanPath` for a request path: cleaned, keeping a trailing slash.
fn go_clean(path: &str) -> String {
    let mut clean = clean_path(path);
    if path.ends_with('/') && clean != "/" {
        clean.push('/');
    }
    clean
}

/// The answer of Go's request router to a path that is not clean: a permanent redirect to the
/// clean one (with a small HTML body for GET and HEAD only).
fn redirect(method: &Method, uri: &Uri, clean: &str) -> Response {
    let location = match uri.query() {
        Some(query) => format!("{clean}?{query}"),
        None => clean.to_string(),
    };
    let mut response = if method == Method::GET || method == Method::HEAD {
        (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            format!("<a href=\"{location}\">Moved Permanently</a>.\n\n"),
        )
            .into_response()
    } else {
        Response::new(Body::empty())
    };
    *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

fn raft_headers(server: &KvServer, headers: &mut HeaderMap, etcd_index: u64) {
    let status = server.node().status();
    for (name, value) in [
        (X_ETCD_INDEX, etcd_index),
        (X_RAFT_INDEX, status.commit.load(Ordering::Relaxed)),
        (X_RAFT_TERM, status.term.load(Ordering::Relaxed)),
    ] {
        headers.insert(name, HeaderValue::from(value));
    }
}

fn error_response(server: &KvServer, error: &V2Error) -> Response {
    let mut response = Response::new(Body::from(error.to_json()));
    *response.status_mut() =
        StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    let headers = response.headers_mut();
    common_headers(server, headers);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(X_ETCD_INDEX, HeaderValue::from(error.index));
    response
}

fn event_response(server: &KvServer, event: &Event, no_value: bool) -> Response {
    let mut response = Response::new(Body::from(event.to_json(now_ns(), no_value)));
    if event.created() {
        *response.status_mut() = StatusCode::CREATED;
    }
    let headers = response.headers_mut();
    common_headers(server, headers);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    raft_headers(server, headers, event.etcd_index);
    response
}

/// A request's form: the body's fields (for PUT and POST, when form-encoded) before the
/// query's, as Go's `ParseForm` orders them.
struct Form(HashMap<String, Vec<String>>);

impl Form {
    fn parse(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Self {
        let mut fields: HashMap<String, Vec<String>> = HashMap::new();
        let form_body = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct.split(';')
                    .next()
                    .is_some_and(|t| t.trim() == "application/x-www-form-urlencoded")
            });
        if form_body && (method == Method::PUT || method == Method::POST) {
            for (k, v) in url::form_urlencoded::parse(body) {
                fields
                    .entry(k.into_owned())
                    .or_default()
                    .push(v.into_owned());
            }
        }
        if let Some(query) = uri.query() {
            for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
                fields
                    .entry(k.into_owned())
                    .or_default()
                    .push(v.into_owned());
            }
        }
        Form(fields)
    }

    fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// The field's first value ("" when absent).
    fn value(&self, key: &str) -> &str {
        self.0
            .get(key)
            .and_then(|v| v.first())
            .map(String::as_str)
            .unwrap_or("")
    }

    fn uint(&self, key: &str) -> Result<u64, ()> {
        match self.0.get(key).and_then(|v| v.first()) {
            None => Ok(0),
            Some(v) => go_uint(v),
        }
    }

    /// Go's `strconv.ParseBool`, false when absent.
    fn boolean(&self, key: &str) -> Result<bool, ()> {
        match self.0.get(key).and_then(|v| v.first()).map(String::as_str) {
            None => Ok(false),
            Some("1" | "t" | "T" | "TRUE" | "true" | "True") => Ok(true),
            Some("0" | "f" | "F" | "FALSE" | "false" | "False") => Ok(false),
            Some(_) => Err(()),
        }
    }
}

/// Go's `strconv.ParseUint(v, 10, 64)`: digits only (no sign).
fn go_uint(v: &str) -> Result<u64, ()> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    v.parse().map_err(drop)
}

/// A parsed keys request (etcd's `parseKeyRequest`).
struct KeyRequest {
    req: V2Request,
    wait: bool,
    since: u64,
    quorum: bool,
    stream: bool,
    no_value: bool,
}

fn bad(code: u32, cause: &str) -> V2Error {
    V2Error::new(code, cause, 0)
}

fn parse_key_request(method: &Method, path: &str, form: &Form) -> Result<KeyRequest, V2Error> {
    let prev_index = form
        .uint("prevIndex")
        .map_err(|()| bad(INDEX_NAN, r#"invalid value for "prevIndex""#))?;
    let since = form
        .uint("waitIndex")
        .map_err(|()| bad(INDEX_NAN, r#"invalid value for "waitIndex""#))?;
    let flag = |name: &str| {
        form.boolean(name)
            .map_err(|()| bad(INVALID_FIELD, &format!(r#"invalid value for "{name}""#)))
    };
    let recursive = flag("recursive")?;
    // Checked as etcd checks it; answers are always sorted.
    flag("sorted")?;
    let wait = flag("wait")?;
    let dir = flag("dir")?;
    let quorum = flag("quorum")?;
    let stream = flag("stream")?;
    if wait && method != Method::GET {
        return Err(bad(
            INVALID_FIELD,
            r#""wait" can only be used with GET requests"#,
        ));
    }
    let prev_value = form.value("prevValue");
    if form.has("prevValue") && prev_value.is_empty() {
        return Err(bad(PREV_VALUE_REQUIRED, r#""prevValue" cannot be empty"#));
    }
    let no_value = flag("noValueOnSuccess")?;
    let ttl = match form.value("ttl") {
        "" => None,
        ttl => Some(go_uint(ttl).map_err(|()| bad(TTL_NAN, r#"invalid value for "ttl""#))?),
    };
    let prev_exist = if form.has("prevExist") {
        Some(
            form.boolean("prevExist")
                .map_err(|()| bad(INVALID_FIELD, "invalid value for prevExist"))?,
        )
    } else {
        None
    };
    let mut refresh = false;
    if form.has("refresh") {
        refresh = form
            .boolean("refresh")
            .map_err(|()| bad(INVALID_FIELD, "invalid value for refresh"))?;
        if refresh {
            if form.has("value") && !form.value("value").is_empty() {
                return Err(bad(REFRESH_VALUE, "A value was provided on a refresh"));
            }
            if ttl.is_none() {
                return Err(bad(REFRESH_TTL_REQUIRED, "No TTL value set"));
            }
        }
    }
    let expiration = ttl
        .map(|ttl| {
            now_ns()
                .saturating_add((ttl.min(i64::MAX as u64 / 1_000_000_000) as i64) * 1_000_000_000)
        })
        .unwrap_or(0);
    Ok(KeyRequest {
        req: V2Request {
            method: method.as_str().to_string(),
            path: clean_path(path),
            val: form.value("value").to_string(),
            dir,
            prev_value: prev_value.to_string(),
            prev_index,
            prev_exist,
            expiration,
            recursive,
            refresh,
            time: 0,
        },
        wait,
        since,
        quorum,
        stream,
        no_value,
    })
}

/// The path as the URL names it, percent-decoded (Go's `URL.Path`).
fn decoded_path(uri: &Uri) -> String {
    let raw = uri.path().as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match raw[i] {
            b'%' if i + 2 < raw.len() => match (hex(raw[i + 1]), hex(raw[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn keys(
    State(server): State<KvServer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw_path = uri.path();
    let clean = go_clean(raw_path);
    if clean != raw_path {
        return redirect(&method, &uri, &clean);
    }
    if ![
        Method::HEAD,
        Method::GET,
        Method::PUT,
        Method::POST,
        Method::DELETE,
    ]
    .contains(&method)
    {
        let mut response = (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "Method Not Allowed\n",
        )
            .into_response();
        cors_headers(response.headers_mut());
        response.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("HEAD,GET,PUT,POST,DELETE"),
        );
        return response;
    }
    let path = decoded_path(&uri);
    let path = path.get(KEYS_PREFIX.len()..).unwrap_or_default();
    let form = Form::parse(&method, &uri, &headers, &body);
    let request = match parse_key_request(&method, path, &form) {
        Ok(request) => request,
        Err(e) => return error_response(&server, &e),
    };
    let answer = if method == Method::GET || method == Method::HEAD {
        if request.wait {
            return wait(server, request).await;
        }
        let req = &request.req;
        server
            .v2_get(&req.path, req.recursive, request.quorum)
            .await
    } else {
        server.v2_write(request.req).await
    };
    match answer {
        Ok(Ok(event)) => event_response(&server, &event, request.no_value),
        Ok(Err(e)) => error_response(&server, &e),
        Err(e) => error_response(&server, &V2Error::new(RAFT_INTERNAL, e.to_string(), 0)),
    }
}

/// A `wait=true` GET: the headers at once, then the event (every event with `stream=true`),
/// one JSON line each, until `WAIT_TIMEOUT` or the client goes.
async fn wait(server: KvServer, request: KeyRequest) -> Response {
    let req = &request.req;
    let wait = match server.v2_wait(&req.path, req.recursive, request.stream, request.since) {
        Ok(wait) => wait,
        Err(e) => return error_response(&server, &e),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(4);
    let stream = request.stream;
    tokio::spawn(async move {
        let mut delivered = false;
        for event in wait.past {
            if tx
                .send(Ok(event.to_json(now_ns(), false).into()))
                .await
                .is_err()
            {
                return;
            }
            delivered = true;
        }
        let Some(mut waiting) = wait.waiting.filter(|_| stream || !delivered) else {
            return;
        };
        let deadline = tokio::time::sleep(WAIT_TIMEOUT);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                event = waiting.events.recv() => {
                    let Some(event) = event else { return };
                    if tx.send(Ok(event.to_json(now_ns(), false).into())).await.is_err() || !stream {
                        return;
                    }
                }
                _ = tx.closed() => return,
                _ = &mut deadline => return,
            }
        }
    });
    let mut response = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    let headers = response.headers_mut();
    common_headers(&server, headers);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    raft_headers(&server, headers, wait.start_index);
    response
}

fn json(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn machines(State(server): State<KvServer>) -> Response {
    let mut members = server.members();
    members.sort_by_key(|m| m.id);
    let urls: Vec<String> = members
        .iter()
        .flat_map(|m| m.client_ur_ls.iter().cloned())
        .collect();
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        urls.join(", "),
    )
        .into_response()
}

/// A duration as Go prints one (`3m12.487549411s`).
fn go_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&s.to_string());
    if nanos > 0 {
        out.push('.');
        out.push_str(format!("{nanos:09}").trim_end_matches('0'));
    }
    out.push('s');
    out
}

async fn stats_self(State(server): State<KvServer>) -> Response {
    let (started, since) = *STARTED.get_or_init(|| (SystemTime::now(), std::time::Instant::now()));
    let started_ns = started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let id = server.member_id();
    let leader = server.node().status().leader.load(Ordering::Relaxed);
    let name = server
        .members()
        .into_iter()
        .find(|m| m.id == id)
        .map(|m| m.name)
        .unwrap_or_default();
    let body = serde_json::json!({
        "name": name,
        "id": format!("{id:x}"),
        "state": if leader == id { "StateLeader" } else { "StateFollower" },
        "startTime": rfc3339_nanos(started_ns),
        "leaderInfo": {
            "leader": format!("{leader:x}"),
            "uptime": go_duration(since.elapsed()),
            "startTime": rfc3339_nanos(started_ns),
        },
        "recvAppendRequestCnt": 0,
        "sendAppendRequestCnt": 0,
    });
    json(body.to_string())
}

async fn stats_leader(State(server): State<KvServer>) -> Response {
    let id = server.member_id();
    if server.node().status().leader.load(Ordering::Relaxed) != id {
        return (
            StatusCode::FORBIDDEN,
            [(header::CONTENT_TYPE, "application/json")],
            "{\"message\":\"not current leader\"}",
        )
            .into_response();
    }
    let followers: serde_json::Map<String, serde_json::Value> = server
        .members()
        .iter()
        .filter(|m| m.id != id)
        .map(|m| (format!("{:x}", m.id), serde_json::json!({})))
        .collect();
    json(serde_json::json!({ "leader": format!("{id:x}"), "followers": followers }).to_string())
}

async fn stats_store(State(server): State<KvServer>) -> Response {
    json(server.v2_stats_json())
}
