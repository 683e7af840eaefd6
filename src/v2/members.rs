//! `/v2/members` (`--enable-v2`): the member list, and member changes as etcd 3.4's v2 API
//! makes them: POST adds a voting member, PUT `/v2/members/<id>` sets a member's peer URLs,
//! DELETE `/v2/members/<id>` removes one. The bodies are JSON (`{"peerURLs": [...]}`); the
//! answers, status codes and messages are etcd's (`tests/v2.rs` compares them with answers
//! recorded from etcd 3.4).

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::http::{common_headers, cors_headers};
use crate::proto::etcdserverpb::Member;
use crate::server::{KvServer, ServerError};

fn member_json(m: &Member) -> serde_json::Value {
    serde_json::json!({
        "id": format!("{:x}", m.id),
        "name": m.name,
        "peerURLs": m.peer_ur_ls,
        "clientURLs": m.client_ur_ls,
    })
}

/// An answer with etcd's headers: CORS and the cluster ID. A JSON body ends with a newline,
/// as Go's JSON encoder writes it.
fn answer(server: &KvServer, status: StatusCode, body: Option<String>) -> Response {
    let mut response = match body {
        Some(body) => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body + "\n",
        )
            .into_response(),
        None => status.into_response(),
    };
    common_headers(server, response.headers_mut());
    response
}

/// etcd's error body: `{"message": ...}`, without the newline.
fn error(server: &KvServer, status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "message": message }).to_string();
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    common_headers(server, response.headers_mut());
    response
}

/// Go's `http.Error(w, "Method Not Allowed", 405)`, with `Allow` when etcd names it.
fn not_allowed(server: Option<&KvServer>, allow: bool) -> Response {
    let mut response = (
        StatusCode::METHOD_NOT_ALLOWED,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        "Method Not Allowed\n",
    )
        .into_response();
    let headers = response.headers_mut();
    match server {
        Some(server) => common_headers(server, headers),
        None => cors_headers(headers),
    }
    if allow {
        headers.insert(
            header::ALLOW,
            HeaderValue::from_static("GET,POST,DELETE,PUT"),
        );
    }
    response
}

/// A server error as etcd's v2 API answers it: what it names, or 500.
fn server_error(server: &KvServer, e: ServerError, id: &str) -> Response {
    match e {
        ServerError::PeerUrlExists => {
            error(server, StatusCode::CONFLICT, "membership: peerURL exists")
        }
        ServerError::MemberNotFound => error(
            server,
            StatusCode::NOT_FOUND,
            &format!("No such member: {id}"),
        ),
        // etcd takes unix and unixs peer URLs too; quorumkv's peers speak TCP only.
        ServerError::BadMemberUrls => error(
            server,
            StatusCode::BAD_REQUEST,
            "quorumkv's peers take http and https URLs only",
        ),
        e => {
            // Remote input can cause it at will: not a warning.
            tracing::debug!(error = %e, "v2 member change failed");
            error(
                server,
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal Server Error",
            )
        }
    }
}

pub async fn list(State(server): State<KvServer>) -> Response {
    let mut members = server.members();
    members.sort_by_key(|m| m.id);
    let list: Vec<_> = members.iter().map(member_json).collect();
    answer(
        &server,
        StatusCode::OK,
        Some(serde_json::json!({ "members": list }).to_string()),
    )
}

/// The leader as a member (`etcdctl member list` marks it).
fn leader(server: &KvServer) -> Response {
    let leader = server.node().status().leader.load(Ordering::Relaxed);
    match server
        .members()
        .iter()
        .find(|m| m.id == leader && leader != 0)
    {
        Some(member) => answer(
            server,
            StatusCode::OK,
            Some(member_json(member).to_string()),
        ),
        None => error(server, StatusCode::SERVICE_UNAVAILABLE, "During election"),
    }
}

/// `/v2/members` and `/v2/members/`.
pub async fn root(
    State(server): State<KvServer>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match method {
        Method::GET | Method::HEAD => list(State(server)).await,
        Method::POST => add(&server, &headers, &body).await,
        // A change with no member named: etcd answers 405 without `Allow`.
        Method::PUT | Method::DELETE => not_allowed(Some(&server), false),
        _ => not_allowed(None, true),
    }
}

/// `/v2/members/<id>` (and `/v2/members/leader`).
pub async fn one(
    State(server): State<KvServer>,
    Path(id): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match method {
        Method::GET | Method::HEAD if id == "leader" => leader(&server),
        Method::GET | Method::HEAD => error(&server, StatusCode::NOT_FOUND, "Not found"),
        // etcd adds a member whatever follows `/v2/members/`.
        Method::POST => add(&server, &headers, &body).await,
        Method::DELETE => match u64::from_str_radix(&id, 16) {
            Ok(member) => match change(&server, Change::Remove(member)).await {
                Ok(_) => answer(&server, StatusCode::NO_CONTENT, None),
                Err(e) => server_error(&server, e, &format!("{member:x}")),
            },
            Err(_) => not_found(&server, &id),
        },
        Method::PUT => {
            let Ok(member) = u64::from_str_radix(&id, 16) else {
                return not_found(&server, &id);
            };
            let urls = match peer_urls(&headers, &body) {
                Ok(urls) => urls,
                Err((status, message)) => return error(&server, status, &message),
            };
            match change(&server, Change::Update(member, urls)).await {
                Ok(_) => answer(&server, StatusCode::NO_CONTENT, None),
                Err(e) => server_error(&server, e, &format!("{member:x}")),
            }
        }
        _ => not_allowed(None, true),
    }
}

fn not_found(server: &KvServer, id: &str) -> Response {
    error(
        server,
        StatusCode::NOT_FOUND,
        &format!("No such member: {id}"),
    )
}

async fn add(server: &KvServer, headers: &HeaderMap, body: &[u8]) -> Response {
    let urls = match peer_urls(headers, body) {
        Ok(urls) => urls,
        Err((status, message)) => return error(server, status, &message),
    };
    match change(server, Change::Add(urls)).await {
        Ok(Some(member)) => answer(
            server,
            StatusCode::CREATED,
            Some(member_json(&member).to_string()),
        ),
        Ok(None) => error(
            server,
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal Server Error",
        ),
        Err(e) => server_error(server, e, ""),
    }
}

/// A member change, as the v2 API asks for one.
enum Change {
    Add(Vec<String>),
    Remove(u64),
    Update(u64, Vec<String>),
}

/// Makes the change here if this member leads, or through the leader's Cluster service (as
/// the v3 API forwards it): the added member, if one was added.
async fn change(server: &KvServer, change: Change) -> Result<Option<Member>, ServerError> {
    // With auth on, a member change needs root, and the v2 API carries no v3 user: etcd 3.4
    // refuses every one (500), whatever credentials come with it.
    if server.auth_view().enabled() {
        return Err(crate::server::auth_error(
            crate::auth::AuthError::PermissionDenied,
        ));
    }
    let local = match &change {
        Change::Add(urls) => server
            .member_add(urls.clone(), false)
            .await
            .map(|(member, _)| Some(member)),
        Change::Remove(id) => server.member_remove(*id).await.map(|_| None),
        Change::Update(id, urls) => server.member_update(*id, urls.clone()).await.map(|_| None),
    };
    match local {
        Err(ServerError::NotLeader) => {
            tokio::time::timeout(server.config().request_timeout, on_leader(server, change))
                .await
                .unwrap_or(Err(ServerError::Timeout))
        }
        other => other,
    }
}

async fn on_leader(server: &KvServer, change: Change) -> Result<Option<Member>, ServerError> {
    use crate::api::forward::{forwarded, ToLeader};
    use crate::proto::etcdserverpb::cluster_client::ClusterClient;
    use crate::proto::etcdserverpb::{MemberAddRequest, MemberRemoveRequest, MemberUpdateRequest};
    let here = tonic::Request::new(());
    let channel = ToLeader::new(server.clone())
        .channel(&here)
        .await
        .map_err(|_| ServerError::NotLeader)?;
    let mut leader = ClusterClient::new(channel);
    let answer = match change {
        Change::Add(peer_ur_ls) => leader
            .member_add(forwarded(
                MemberAddRequest {
                    peer_ur_ls,
                    is_learner: false,
                },
                &here,
            ))
            .await
            .map(|a| a.into_inner().member),
        Change::Remove(id) => leader
            .member_remove(forwarded(MemberRemoveRequest { id }, &here))
            .await
            .map(|_| None),
        Change::Update(id, peer_ur_ls) => leader
            .member_update(forwarded(MemberUpdateRequest { id, peer_ur_ls }, &here))
            .await
            .map(|_| None),
    };
    // The leader's refusal, back as the error it was made from (the rest answer 500).
    answer.map_err(|status| {
        [
            ServerError::PeerUrlExists,
            ServerError::MemberNotFound,
            ServerError::BadMemberUrls,
        ]
        .into_iter()
        .find(|e| e.to_string() == status.message())
        .unwrap_or(ServerError::NotLeader)
    })
}

/// The peer URLs of a POST or PUT body, checked as etcd checks them (sorted, as etcd keeps
/// them), or the status and message etcd refuses the body with.
fn peer_urls(headers: &HeaderMap, body: &[u8]) -> Result<Vec<String>, (StatusCode, String)> {
    let given = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media = match given.split_once(';') {
        Some((media, _)) => media.trim().to_ascii_lowercase(),
        None => given.to_string(),
    };
    if media != "application/json" {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Bad Content-Type {media}, accept application/json"),
        ));
    }
    let bad = |message: String| (StatusCode::BAD_REQUEST, message);
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(json_error(body, &e)))?;
    let field_type = "Go struct field .peerURLs of type";
    // Go matches a field's name without regard to case; other fields are ignored.
    let field = value
        .as_object()
        .and_then(|fields| {
            fields
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("peerURLs"))
        })
        .map(|(_, v)| v);
    let mut urls = Vec::new();
    match (&value, field) {
        (serde_json::Value::Object(_), None | Some(serde_json::Value::Null)) => {}
        (serde_json::Value::Object(_), Some(serde_json::Value::Array(items))) => {
            for item in items {
                match item {
                    serde_json::Value::String(url) => urls.push(url.clone()),
                    serde_json::Value::Null => urls.push(String::new()),
                    other => {
                        return Err(bad(format!(
                            "json: cannot unmarshal {} into {field_type} string",
                            go_type(other)
                        )))
                    }
                }
            }
        }
        (serde_json::Value::Object(_), Some(other)) => {
            return Err(bad(format!(
                "json: cannot unmarshal {} into {field_type} []string",
                go_type(other)
            )))
        }
        // `null` decodes to nothing; anything else is not the struct.
        (serde_json::Value::Null, _) => {}
        (other, _) => {
            return Err(bad(format!(
                "json: cannot unmarshal {} into Go value of type struct {{ PeerURLs []string \"json:\\\"peerURLs\\\"\" }}",
                go_type(other)
            )))
        }
    }
    if urls.is_empty() {
        return Err(bad("no valid URLs given".into()));
    }
    let mut urls = urls
        .iter()
        .map(|url| check_url(url))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    urls.sort();
    Ok(urls)
}

/// The name Go's JSON decoder gives a value's type in its errors.
fn go_type(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "bool",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// A syntax error in Go's words, for the two cases clients meet: no body, and a body that is
/// not JSON from where the error is.
fn json_error(body: &[u8], e: &serde_json::Error) -> String {
    if e.is_eof() {
        return "unexpected end of JSON input".into();
    }
    // serde names the line and column of the byte it stopped at.
    let offset: usize = body
        .split(|&b| b == b'\n')
        .take(e.line().saturating_sub(1))
        .map(|line| line.len() + 1)
        .sum::<usize>()
        + e.column().saturating_sub(1);
    match body.get(offset) {
        Some(&c) => format!(
            "invalid character '{}' looking for beginning of value",
            char::from(c)
        ),
        None => "unexpected end of JSON input".into(),
    }
}

/// etcd's URL check for a member's peer URLs: a scheme of http, https, unix or unixs (in
/// any case), an address of the form host:port, and no path. The URL as etcd keeps it: without
/// surrounding spaces, its scheme in lower case.
fn check_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None => (String::new(), url),
    };
    if !matches!(scheme.as_str(), "http" | "https" | "unix" | "unixs") {
        return Err(format!(
            "URL scheme must be http, https, unix, or unixs: {url}"
        ));
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    // Whatever comes before an `@` is user information, not the address.
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host_port = match host.strip_prefix('[') {
        Some(v6) => v6
            .split_once(']')
            .is_some_and(|(_, port)| port.starts_with(':')),
        None => host.matches(':').count() == 1,
    };
    if !host_port {
        return Err(format!(
            "URL address does not have the form \"host:port\": {url}"
        ));
    }
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if !path.is_empty() {
        return Err(format!("URL must not contain a path: {url}"));
    }
    Ok(format!("{scheme}://{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_headers(content_type: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(content_type).expect("header"),
        );
        headers
    }

    #[test]
    fn peer_urls_are_checked_and_refused_in_etcds_words() {
        let json = json_headers("application/json");
        let refused = |headers: &HeaderMap, body: &str| {
            peer_urls(headers, body.as_bytes()).expect_err("refused")
        };
        assert_eq!(
            peer_urls(&json, br#"{"peerURLs":["http://b:2","http://a:1"]}"#),
            Ok(vec!["http://a:1".to_string(), "http://b:2".to_string()])
        );
        assert_eq!(
            peer_urls(
                &json_headers("Application/JSON; charset=utf-8"),
                br#"{"PEERURLS":["http://a:1"]}"#
            ),
            Ok(vec!["http://a:1".to_string()])
        );
        assert_eq!(
            refused(&json_headers("text/plain"), "{}"),
            (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Bad Content-Type text/plain, accept application/json".to_string()
            )
        );
        for (body, message) in [
            ("x", "invalid character 'x' looking for beginning of value"),
            ("", "unexpected end of JSON input"),
            ("{}", "no valid URLs given"),
            (r#"{"peerURLs":null}"#, "no valid URLs given"),
            (
                r#"{"peerURLs":"x"}"#,
                "json: cannot unmarshal string into Go struct field .peerURLs of type []string",
            ),
            (
                r#"{"peerURLs":["http://a:1",2]}"#,
                "json: cannot unmarshal number into Go struct field .peerURLs of type string",
            ),
            (
                r#"{"peerURLs":["foo"]}"#,
                "URL scheme must be http, https, unix, or unixs: foo",
            ),
            (
                r#"{"peerURLs":["http://a"]}"#,
                "URL address does not have the form \"host:port\": http://a",
            ),
            (
                r#"{"peerURLs":["http://a:1/x"]}"#,
                "URL must not contain a path: http://a:1/x",
            ),
        ] {
            assert_eq!(
                refused(&json, body),
                (StatusCode::BAD_REQUEST, message.to_string()),
                "{body}"
            );
        }
        assert_eq!(
            peer_urls(&json, br#"{"peerURLs":["https://[::1]:2380"]}"#),
            Ok(vec!["https://[::1]:2380".to_string()])
        );
        // As Go's URL parser reads them: spaces around, a scheme in capitals, user information.
        assert_eq!(
            peer_urls(&json, br#"{"peerURLs":[" HTTP://a:1 ","http://u:p@b:2"]}"#),
            Ok(vec!["http://a:1".to_string(), "http://u:p@b:2".to_string()])
        );
    }
}
