//! Users, roles and permissions, as etcdctl 3.4 and gRPC clients use them, on real processes:
//! a permission matrix, etcd's published auth bugs (each must not reproduce), the JSON
//! gateway's auth paths, replication to every member and restarts, the data dir's modes.

mod common;

use std::time::Duration;

use common::{etcdctl, etcdctl_available, fails, ok, start_cluster, wait_until, Server};
use quorumkv::proto::etcdserverpb::auth_client::AuthClient;
use quorumkv::proto::etcdserverpb::cluster_client::ClusterClient;
use quorumkv::proto::etcdserverpb::kv_client::KvClient;
use quorumkv::proto::etcdserverpb::lease_client::LeaseClient;
use quorumkv::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use quorumkv::proto::etcdserverpb::watch_client::WatchClient;
use quorumkv::proto::etcdserverpb::{
    alarm_request::AlarmAction, request_op, watch_request::RequestUnion, AlarmRequest, AlarmType,
    AuthenticateRequest, DeleteRangeRequest, LeaseGrantRequest, LeaseLeasesRequest,
    LeaseRevokeRequest, LeaseTimeToLiveRequest, MemberListRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Fast hashes: the tests authenticate often.
const FAST_BCRYPT: [&str; 2] = ["--bcrypt-cost", "4"];

fn skip_without_etcdctl() -> bool {
    if etcdctl_available() {
        return false;
    }
    eprintln!("skipped: etcdctl is not installed (apt-get install etcd-client; ci/test does)");
    true
}

/// Runs `etcdctl args` as `user` (`name:password`; "" for nobody).
fn as_user(endpoint: &str, user: &str, args: &[&str]) -> std::process::Output {
    let mut all: Vec<&str> = Vec::new();
    let flag = format!("--user={user}");
    if !user.is_empty() {
        all.push(&flag);
    }
    all.extend_from_slice(args);
    etcdctl(endpoint, &all)
}

/// root (password `rootpw`) with the root role, then auth on.
fn enable_auth(endpoint: &str) {
    ok(etcdctl(endpoint, &["user", "add", "root:rootpw"]));
    // etcdctl grants root its role itself (after the server's "root user does not have
    // root role"), as with etcd.
    let out = ok(etcdctl(endpoint, &["auth", "enable"]));
    assert!(out.contains("Authentication Enabled"), "{out}");
}

const ROOT: &str = "root:rootpw";

fn root(endpoint: &str, args: &[&str]) -> String {
    ok(as_user(endpoint, ROOT, args))
}

async fn channel(server: &Server) -> Channel {
    Channel::from_shared(server.endpoint())
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

async fn token(channel: &Channel, name: &str, password: &str) -> String {
    AuthClient::new(channel.clone())
        .authenticate(AuthenticateRequest {
            name: name.into(),
            password: password.into(),
        })
        .await
        .expect("authenticate")
        .into_inner()
        .token
}

/// `message` as a request carrying `token` ("" for none).
fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    if !token.is_empty() {
        request
            .metadata_mut()
            .insert("token", token.parse().expect("ascii token"));
    }
    request
}

fn denied<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) {
    match result {
        Err(status) => {
            assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
            assert_eq!(status.message(), "etcdserver: permission denied", "{what}");
        }
        Ok(answer) => panic!("{what}: allowed ({answer:?})"),
    }
}

#[test]
fn a_permission_matrix_over_etcdctl() {
    if skip_without_etcdctl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &FAST_BCRYPT);
    let ep = server.endpoint();
    enable_auth(&ep);
    for key in ["foo", "pre/a", "b", "m", "zz", "zzz"] {
        root(&ep, &["put", key, "v"]);
    }
    root(&ep, &["user", "add", "alice:apw"]);
    root(&ep, &["user", "add", "bob:bpw"]);
    root(&ep, &["user", "add", "carol:cpw"]);
    root(&ep, &["role", "add", "r1"]);
    root(&ep, &["role", "add", "r2"]);
    root(&ep, &["role", "grant-permission", "r1", "read", "foo"]);
    root(
        &ep,
        &[
            "role",
            "grant-permission",
            "r1",
            "readwrite",
            "--prefix",
            "pre/",
        ],
    );
    root(&ep, &["role", "grant-permission", "r1", "write", "b", "e"]);
    root(
        &ep,
        &["role", "grant-permission", "r2", "read", "--from-key", "m"],
    );
    root(&ep, &["user", "grant-role", "alice", "r1"]);
    root(&ep, &["user", "grant-role", "bob", "r2"]);
    let alice = "alice:apw";
    let bob = "bob:bpw";
    let carol = "carol:cpw";
    // (user, command, allowed)
    let matrix: &[(&str, &[&str], bool)] = &[
        (alice, &["get", "foo"], true),
        (alice, &["put", "foo", "x"], false),
        (alice, &["del", "foo"], false),
        (alice, &["get", "fo", "--prefix"], false),
        (alice, &["get", "pre/", "--prefix"], true),
        (alice, &["get", "pre/a"], true),
        (alice, &["put", "pre/b", "x"], true),
        (alice, &["del", "pre/", "--prefix"], true),
        (alice, &["get", "p", "--prefix"], false),
        (alice, &["put", "b", "x"], true),
        (alice, &["get", "b"], false),
        (alice, &["del", "b", "e"], true),
        (alice, &["del", "b", "f"], false),
        (alice, &["del", "a", "e"], false),
        (alice, &["put", "m", "x"], false),
        (alice, &["get", "m"], false),
        (bob, &["get", "m"], true),
        (bob, &["get", "zzz"], true),
        (bob, &["get", "m", "--from-key"], true),
        (bob, &["get", "l", "--from-key"], false),
        (bob, &["get", "a", "z"], false),
        (bob, &["put", "m", "x"], false),
        (bob, &["get", "foo"], false),
        (carol, &["get", "foo"], false),
        (carol, &["put", "foo", "x"], false),
        (carol, &["get", "m"], false),
        (ROOT, &["get", "", "--prefix"], true),
        (ROOT, &["put", "anything", "x"], true),
        (alice, &["user", "list"], false),
        (alice, &["role", "add", "r3"], false),
        (alice, &["user", "grant-role", "alice", "root"], false),
        (alice, &["auth", "disable"], false),
        (alice, &["member", "list"], true),
        (alice, &["lease", "grant", "60"], true),
        (alice, &["compaction", "1"], true),
    ];
    for (user, args, allowed) in matrix {
        let out = as_user(&ep, user, args);
        if *allowed {
            assert!(out.status.success(), "{user} {args:?}: {out:?}");
        } else {
            assert!(!out.status.success(), "{user} {args:?} was allowed");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("etcdserver: permission denied"),
                "{user} {args:?}: {err}"
            );
        }
    }
    // A txn: its compares read, both branches are checked whichever runs.
    let txn = "value(\"foo\") = \"v\"\n\nput pre/t x\n\nput pre/u y\n\n";
    ok(common::etcdctl_stdin(&ep, &["--user", alice, "txn"], txn));
    let txn = "value(\"foo\") = \"v\"\n\nput pre/t x\n\nput zz y\n\n";
    let err = fails(common::etcdctl_stdin(&ep, &["--user", alice, "txn"], txn));
    assert!(err.contains("permission denied"), "{err}");
    let txn = "value(\"m\") = \"v\"\n\nput pre/t x\n\n\n";
    let err = fails(common::etcdctl_stdin(&ep, &["--user", alice, "txn"], txn));
    assert!(err.contains("permission denied"), "{err}");
    // A wrong password, an unknown user, no user at all: etcd's messages.
    let err = fails(as_user(&ep, "alice:nope", &["get", "foo"]));
    assert!(err.contains("etcdserver: authentication failed, invalid user ID or password"));
    let err = fails(as_user(&ep, "nobody:x", &["get", "foo"]));
    assert!(err.contains("etcdserver: authentication failed, invalid user ID or password"));
    let err = fails(as_user(&ep, "", &["get", "foo"]));
    assert!(err.contains("etcdserver: user name is empty"), "{err}");
    // Failed authentications are logged, without the password.
    let log = server.log();
    assert!(log.contains("authentication failed"), "{log}");
    assert!(!log.contains("nope"), "a password reached the log");
    // Revoking takes effect for the next request.
    root(&ep, &["role", "revoke-permission", "r1", "foo"]);
    let err = fails(as_user(&ep, alice, &["get", "foo"]));
    assert!(err.contains("permission denied"), "{err}");
    // Administration errors, as etcd words them.
    let err = fails(as_user(&ep, ROOT, &["role", "add", "r1"]));
    assert!(
        err.contains("etcdserver: role name already exists"),
        "{err}"
    );
    let err = fails(as_user(&ep, ROOT, &["user", "get", "nobody"]));
    assert!(err.contains("etcdserver: user name not found"), "{err}");
    let err = fails(as_user(&ep, ROOT, &["user", "delete", "root"]));
    assert!(err.contains("etcdserver: invalid auth management"), "{err}");
    let err = fails(as_user(&ep, ROOT, &["user", "revoke-role", "alice", "r9"]));
    assert!(
        err.contains("etcdserver: role is not granted to the user"),
        "{err}"
    );
    let err = fails(as_user(
        &ep,
        ROOT,
        &["role", "revoke-permission", "r1", "nokey"],
    ));
    assert!(err.contains("etcdserver: permission is not granted to the role"));
    // A new password replaces the old one, and the old tokens go with it.
    ok(common::etcdctl_stdin(
        &ep,
        &[
            "--user",
            ROOT,
            "user",
            "passwd",
            "alice",
            "--interactive=false",
        ],
        "newpw\n",
    ));
    fails(as_user(&ep, alice, &["get", "pre/a"]));
    ok(as_user(&ep, "alice:newpw", &["get", "pre/a"]));
    // Disabling needs root; then anyone may do anything again.
    root(&ep, &["auth", "disable"]);
    ok(etcdctl(&ep, &["put", "foo", "open"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcds_published_auth_bugs_do_not_reproduce() {
    if skip_without_etcdctl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &FAST_BCRYPT);
    let ep = server.endpoint();
    enable_auth(&ep);
    root(&ep, &["put", "secret", "s3cret"]);
    root(&ep, &["user", "add", "alice:apw"]);
    root(&ep, &["role", "add", "w"]);
    // alice may write (not read) w/..., and read [a, m).
    root(
        &ep,
        &["role", "grant-permission", "w", "write", "--prefix", "w/"],
    );
    root(&ep, &["role", "grant-permission", "w", "read", "a", "m"]);
    root(&ep, &["user", "grant-role", "alice", "w"]);
    root(&ep, &["put", "w/k", "old"]);
    let ch = channel(&server).await;
    let alice = token(&ch, "alice", "apw").await;
    let root_token = token(&ch, "root", "rootpw").await;
    let mut kv = KvClient::new(ch.clone());

    // etcd CVE-2026-44283: prev_kv on a Put or DeleteRange inside a Txn branch reads what
    // the user may not read.
    for prev in [
        request_op::Request::RequestPut(PutRequest {
            key: b"w/k".to_vec(),
            value: b"new".to_vec(),
            prev_kv: true,
            ..Default::default()
        }),
        request_op::Request::RequestDeleteRange(DeleteRangeRequest {
            key: b"w/k".to_vec(),
            prev_kv: true,
            ..Default::default()
        }),
    ] {
        let txn = TxnRequest {
            success: vec![RequestOp {
                request: Some(prev),
            }],
            ..Default::default()
        };
        denied(kv.txn(with_token(txn, &alice)).await, "prev_kv in a txn");
    }
    denied(
        kv.put(with_token(
            PutRequest {
                key: b"w/k".to_vec(),
                value: b"x".to_vec(),
                prev_kv: true,
                ..Default::default()
            },
            &alice,
        ))
        .await,
        "put with prev_kv",
    );
    // Without prev_kv the same write is allowed.
    kv.put(with_token(
        PutRequest {
            key: b"w/k".to_vec(),
            value: b"x".to_vec(),
            ..Default::default()
        },
        &alice,
    ))
    .await
    .expect("a plain put where alice may write");

    // A Put attaching a lease that holds a key the user may not write (revoking it would
    // delete that key); the revoke itself; LeaseTimeToLive listing keys (CVE-2023-32082).
    let mut leases = LeaseClient::new(ch.clone());
    let lease = leases
        .lease_grant(with_token(
            LeaseGrantRequest { ttl: 600, id: 0 },
            &root_token,
        ))
        .await
        .expect("grant")
        .into_inner()
        .id;
    kv.put(with_token(
        PutRequest {
            key: b"secret2".to_vec(),
            value: b"v".to_vec(),
            lease,
            ..Default::default()
        },
        &root_token,
    ))
    .await
    .expect("root attaches a key");
    denied(
        kv.put(with_token(
            PutRequest {
                key: b"w/leased".to_vec(),
                value: b"v".to_vec(),
                lease,
                ..Default::default()
            },
            &alice,
        ))
        .await,
        "a put attaching a lease with others' keys",
    );
    denied(
        leases
            .lease_revoke(with_token(LeaseRevokeRequest { id: lease }, &alice))
            .await,
        "revoking a lease with others' keys",
    );
    denied(
        leases
            .lease_time_to_live(with_token(
                LeaseTimeToLiveRequest {
                    id: lease,
                    keys: true,
                },
                &alice,
            ))
            .await,
        "LeaseTimeToLive listing others' keys",
    );
    leases
        .lease_time_to_live(with_token(
            LeaseTimeToLiveRequest {
                id: lease,
                keys: false,
            },
            &alice,
        ))
        .await
        .expect("the TTL alone is any user's");

    // GHSA-xg4h-6gfc-h4m8: a watch from a key to the end of the key space (range_end "\0")
    // past the user's range.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses = WatchClient::new(ch.clone())
        .watch(with_token(
            tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
            &alice,
        ))
        .await
        .expect("watch stream")
        .into_inner();
    for (key, end, allowed) in [
        (&b"a"[..], &b"\0"[..], false),
        (b"b", b"\0", false),
        (b"b", b"c", true),
        (b"w/", b"w0", false),
    ] {
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: key.to_vec(),
                range_end: end.to_vec(),
                ..Default::default()
            })),
        })
        .await
        .expect("send");
        let created = tokio::time::timeout(Duration::from_secs(5), responses.message())
            .await
            .expect("an answer")
            .expect("stream")
            .expect("a response");
        assert!(created.created, "{created:?}");
        if allowed {
            assert!(!created.canceled, "{key:?}..{end:?}: {created:?}");
        } else {
            assert!(created.canceled, "{key:?}..{end:?} was allowed");
            assert_eq!(created.cancel_reason, "etcdserver: permission denied");
        }
    }

    // GHSA-q8m4-xhhv-38mg: MemberList, Alarm and the Lease calls without authentication.
    let empty = |r: Result<_, tonic::Status>, what: &str| match r {
        Err(s) => assert_eq!(s.message(), "etcdserver: user name is empty", "{what}"),
        Ok(()) => panic!("{what} was served without authentication"),
    };
    empty(
        ClusterClient::new(ch.clone())
            .member_list(MemberListRequest::default())
            .await
            .map(drop),
        "MemberList",
    );
    empty(
        MaintenanceClient::new(ch.clone())
            .alarm(AlarmRequest::default())
            .await
            .map(drop),
        "Alarm",
    );
    empty(
        leases
            .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
            .await
            .map(drop),
        "LeaseGrant",
    );
    empty(
        leases.lease_leases(LeaseLeasesRequest {}).await.map(drop),
        "LeaseLeases",
    );
    empty(
        leases
            .lease_time_to_live(LeaseTimeToLiveRequest {
                id: lease,
                keys: false,
            })
            .await
            .map(drop),
        "LeaseTimeToLive",
    );
    // Status stays open (etcdctl endpoint status, health checks).
    MaintenanceClient::new(ch.clone())
        .status(quorumkv::proto::etcdserverpb::StatusRequest {})
        .await
        .expect("Status");
    // An invalid token is refused as etcd refuses it.
    let err = kv
        .range(with_token(
            RangeRequest {
                key: b"a".to_vec(),
                ..Default::default()
            },
            "not-a-token.1",
        ))
        .await
        .expect_err("a made-up token");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "etcdserver: invalid auth token");

    // etcd PR #22386: with the NOSPACE alarm active (deletes still allowed), permissions are
    // still checked.
    let mut maintenance = MaintenanceClient::new(ch.clone());
    let refused = maintenance
        .alarm(with_token(
            AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id: 1,
                alarm: AlarmType::Nospace as i32,
            },
            &alice,
        ))
        .await
        .expect_err("a user raising an alarm");
    // etcd's Maintenance refusal: gRPC Unknown, `auth: permission denied`.
    assert_eq!(refused.code(), Code::Unknown);
    assert_eq!(refused.message(), "auth: permission denied");
    maintenance
        .alarm(with_token(
            AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id: 1,
                alarm: AlarmType::Nospace as i32,
            },
            &root_token,
        ))
        .await
        .expect("root raises NOSPACE");
    denied(
        kv.delete_range(with_token(
            DeleteRangeRequest {
                key: b"secret".to_vec(),
                ..Default::default()
            },
            &alice,
        ))
        .await,
        "a delete under NOSPACE",
    );
    assert_eq!(
        root(&ep, &["get", "secret", "--print-value-only"]).trim(),
        "s3cret"
    );

    // CVE-2020-15115: an empty password is refused (a user without one is --no-password).
    let err = fails(as_user(&ep, ROOT, &["user", "add", "eve:"]));
    assert!(err.contains("password is empty"), "{err}");
    ok(as_user(
        &ep,
        ROOT,
        &["user", "add", "dave", "--no-password"],
    ));
    let err = fails(as_user(&ep, "dave:", &["get", "a"]));
    assert!(err.contains("user name is empty"), "{err}");
}

#[test]
fn the_data_dir_is_private_and_a_loose_one_is_warned_about() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[]);
    ok(etcdctl(&server.endpoint(), &["put", "k", "v"]));
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&server.data_dir), 0o700);
    let mut files = 0;
    let mut stack = vec![server.data_dir.clone()];
    while let Some(path) = stack.pop() {
        for entry in std::fs::read_dir(&path).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                assert_eq!(mode(&path), 0o700, "{}", path.display());
                stack.push(path);
            } else {
                assert_eq!(
                    mode(&path) & 0o077,
                    0,
                    "{} is open to others",
                    path.display()
                );
                files += 1;
            }
        }
    }
    assert!(
        files >= 3,
        "the WAL, the backend and the identity are there"
    );
    // CVE-2020-15113: an existing dir open to others is used, with a warning.
    server.terminate();
    std::fs::set_permissions(&server.data_dir, std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    server.spawn();
    server.wait_ready();
    assert!(
        server
            .log()
            .contains("the data dir can be read by other users"),
        "{}",
        server.log()
    );
}

#[test]
fn auth_is_replicated_and_survives_restarts() {
    if skip_without_etcdctl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers = start_cluster(dir.path(), &["a", "b", "c"], &FAST_BCRYPT);
    let eps: Vec<String> = servers.iter().map(Server::endpoint).collect();
    enable_auth(&eps[0]);
    root(&eps[0], &["user", "add", "alice:apw"]);
    root(&eps[0], &["role", "add", "r"]);
    root(
        &eps[0],
        &["role", "grant-permission", "r", "readwrite", "k"],
    );
    root(&eps[0], &["user", "grant-role", "alice", "r"]);
    // Every member enforces the same users and permissions.
    for ep in &eps {
        ok(as_user(ep, "alice:apw", &["put", "k", "v"]));
        let err = fails(as_user(ep, "alice:apw", &["put", "other", "v"]));
        assert!(err.contains("permission denied"), "{err}");
        let err = fails(etcdctl(ep, &["get", "k"]));
        assert!(err.contains("user name is empty"), "{err}");
    }
    // A token issued by one member is known to the others (issued through the log).
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let first = channel(&servers[0]).await;
        let token = token(&first, "alice", "apw").await;
        for server in &servers[1..] {
            let mut kv = KvClient::new(channel(server).await);
            let mut answered = false;
            for _ in 0..50 {
                match kv
                    .range(with_token(
                        RangeRequest {
                            key: b"k".to_vec(),
                            ..Default::default()
                        },
                        &token,
                    ))
                    .await
                {
                    Ok(_) => {
                        answered = true;
                        break;
                    }
                    // The member may not have applied the token yet.
                    Err(s) if s.code() == Code::Unauthenticated => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(s) => panic!("{s:?}"),
                }
            }
            assert!(answered, "the token is not known on another member");
        }
    });
    // After a restart of every member: the same users, roles and permissions.
    for server in servers.iter_mut() {
        server.terminate();
    }
    for server in servers.iter_mut() {
        server.spawn();
    }
    for server in servers.iter_mut() {
        server.wait_ready_as(&["--user", ROOT]);
    }
    wait_until(
        "alice's put after the restart",
        Duration::from_secs(20),
        || {
            as_user(&eps[2], "alice:apw", &["put", "k", "again"])
                .status
                .success()
        },
    );
    let err = fails(as_user(&eps[1], "alice:apw", &["put", "other", "v"]));
    assert!(err.contains("permission denied"), "{err}");
    let err = fails(etcdctl(&eps[1], &["get", "k"]));
    assert!(err.contains("user name is empty"), "{err}");
}

#[test]
fn the_gateway_takes_auth_paths_and_the_authorization_header() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &FAST_BCRYPT);
    let post = |path: &str, body: &str, token: &str| {
        common::http_post(server.client_port, path, body, token)
    };
    let (status, _) = post(
        "/v3/auth/user/add",
        r#"{"name":"root","password":"rootpw"}"#,
        "",
    );
    assert_eq!(status, 200);
    let (status, _) = post(
        "/v3/auth/user/grant",
        r#"{"user":"root","role":"root"}"#,
        "",
    );
    assert_eq!(status, 200);
    let (status, _) = post("/v3/auth/enable", "{}", "");
    assert_eq!(status, 200);
    let (status, body) = post("/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#, "");
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["message"], "etcdserver: user name is empty");
    let (status, body) = post("/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#, "garbage");
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["message"], "etcdserver: invalid auth token");
    let (status, body) = post(
        "/v3/auth/authenticate",
        r#"{"name":"root","password":"bad"}"#,
        "",
    );
    assert_eq!(status, 400);
    assert_eq!(
        body["message"],
        "etcdserver: authentication failed, invalid user ID or password"
    );
    let (_, body) = post(
        "/v3/auth/authenticate",
        r#"{"name":"root","password":"rootpw"}"#,
        "",
    );
    let token = body["token"].as_str().expect("a token").to_string();
    let (status, body) = post("/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#, &token);
    assert_eq!(status, 200, "{body}");
    let (_, body) = post("/v3/auth/status", "{}", &token);
    assert_eq!(body["enabled"], true);
    let (_, body) = post("/v3/auth/role/add", r#"{"name":"r2"}"#, &token);
    assert!(body["header"].is_object(), "{body}");
    let (_, body) = post(
        "/v3/auth/role/grant",
        r#"{"name":"r2","perm":{"permType":"READ","key":"YQ==","range_end":"Yg=="}}"#,
        &token,
    );
    assert!(body["header"].is_object(), "{body}");
    let (_, body) = post("/v3/auth/role/get", r#"{"role":"r2"}"#, &token);
    assert_eq!(body["perm"][0]["key"], "YQ==", "{body}");
    let (_, body) = post("/v3/auth/user/list", "{}", &token);
    assert_eq!(body["users"], serde_json::json!(["root"]));
    let (_, body) = post("/v3/auth/role/list", "{}", &token);
    // (The root role is granted without a role of that name, as etcd allows.)
    assert_eq!(body["roles"], serde_json::json!(["r2"]));
    let (status, body) = post("/v3/watch", r#"{"create_request":{"key":"YQ=="}}"#, "");
    assert_eq!(status, 400, "{body}");
    let (status, _) = post("/v3/auth/disable", "{}", &token);
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_are_signed_checked_and_grow_old_with_the_auth_store() {
    if skip_without_etcdctl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let private = dir.path().join("jwt.key");
    let public = dir.path().join("jwt.pub");
    std::fs::write(&private, key.serialize_pem()).expect("write");
    std::fs::write(&public, key.public_key_pem()).expect("write");
    let option = format!(
        "jwt,pub-key={},priv-key={},sign-method=ES256,ttl=10m",
        public.display(),
        private.display()
    );
    let server = Server::start(dir.path(), &["--auth-token", &option, "--bcrypt-cost", "4"]);
    let ep = server.endpoint();
    enable_auth(&ep);
    root(&ep, &["put", "k", "v"]);
    let ch = channel(&server).await;
    let jwt = token(&ch, "root", "rootpw").await;
    assert_eq!(jwt.split('.').count(), 3, "not a JWT: {jwt}");
    let mut kv = KvClient::new(ch.clone());
    let get = |token: String| {
        let mut kv = kv.clone();
        async move {
            kv.range(with_token(
                RangeRequest {
                    key: b"k".to_vec(),
                    ..Default::default()
                },
                &token,
            ))
            .await
        }
    };
    get(jwt.clone()).await.expect("a fresh token");
    // A changed signature is refused.
    let forged = format!("{}x", &jwt[..jwt.len() - 1]);
    let err = get(forged).await.expect_err("forged");
    assert_eq!(err.message(), "etcdserver: invalid auth token");
    // After an auth change the token is old, as with etcd; a new one works.
    root(&ep, &["role", "add", "another"]);
    let err = get(jwt).await.expect_err("old");
    assert_eq!(err.message(), "etcdserver: revision of auth store is old");
    let fresh = token(&ch, "root", "rootpw").await;
    get(fresh).await.expect("a token issued after the change");
    kv.put(with_token(
        PutRequest {
            key: b"k".to_vec(),
            value: b"w".to_vec(),
            ..Default::default()
        },
        "",
    ))
    .await
    .expect_err("no token, no user");
}
