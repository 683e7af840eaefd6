//! TLS on the client and peer ports, with certificates made here (rcgen) and etcdctl 3.4 as the
//! client: client certificates required, a peer from another CA refused, a client
//! certificate's common name as the user, certificates rotated without a restart, garbage
//! handshakes, auto TLS.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{etcdctl, etcdctl_available, fails, new_cluster_over, ok, wait_until, Server};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

fn skip_without_etcdctl() -> bool {
    if etcdctl_available() {
        return false;
    }
    eprintln!("skipped: etcdctl is not installed (apt-get install etcd-client; ci/test does)");
    true
}

/// A certificate authority that writes PEM files into a directory.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    name: String,
}

/// A certificate and its key, as files.
#[derive(Clone)]
struct Pair {
    cert: PathBuf,
    key: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signed");
        std::fs::write(dir.join(format!("{name}-ca.pem")), cert.pem()).expect("write");
        Ca {
            issuer: Issuer::new(params, key),
            dir: dir.to_path_buf(),
            name: name.to_string(),
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A certificate for `cn`, good for 127.0.0.1 and localhost, as server and as client.
    fn issue(&self, cn: &str) -> Pair {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let pair = Pair {
            cert: self.dir.join(format!("{}-{cn}.pem", self.name)),
            key: self.dir.join(format!("{}-{cn}-key.pem", self.name)),
        };
        std::fs::write(&pair.cert, cert.pem()).expect("write");
        std::fs::write(&pair.key, key.serialize_pem()).expect("write");
        pair
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// etcdctl's TLS flags for `ca` and an optional client certificate.
fn client_flags(ca: &Path, pair: Option<&Pair>) -> Vec<String> {
    let mut flags = vec![format!("--cacert={}", s(ca))];
    if let Some(pair) = pair {
        flags.push(format!("--cert={}", s(&pair.cert)));
        flags.push(format!("--key={}", s(&pair.key)));
    }
    flags
}

fn ctl(endpoint: &str, flags: &[String], args: &[&str]) -> std::process::Output {
    let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
    all.extend_from_slice(args);
    etcdctl(endpoint, &all)
}

/// `ctl`, asked again (for up to 15 s) while the cluster answers that it has no leader: with a
/// member added that never joins, every live member is needed for the quorum, and one slow
/// heartbeat on a loaded machine starts an election.
fn ctl_through_elections(endpoint: &str, flags: &[String], args: &[&str]) -> std::process::Output {
    let start = std::time::Instant::now();
    loop {
        let out = ctl(endpoint, flags, args);
        let no_leader = String::from_utf8_lossy(&out.stderr).contains("no leader");
        if out.status.success() || !no_leader || start.elapsed() > Duration::from_secs(15) {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A member serving clients over TLS (client certificates required), with `extra` flags.
fn tls_server(root: &Path, server: &Pair, ca: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--cert-file".to_string(),
        s(&server.cert),
        "--key-file".to_string(),
        s(&server.key),
        "--trusted-ca-file".to_string(),
        s(ca),
        "--client-cert-auth".to_string(),
        "--bcrypt-cost".to_string(),
        "4".to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut member = Server::new(root, &args);
    member.client_scheme = "https";
    member
}

#[test]
fn clients_need_a_certificate_from_the_trusted_ca() {
    if skip_without_etcdctl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "main");
    let rogue = Ca::new(dir.path(), "rogue");
    let server_pair = ca.issue("server");
    let client = ca.issue("client");
    let mut server = tls_server(dir.path(), &server_pair, &ca.ca_file(), &[]);
    server.spawn();
    let good = client_flags(&ca.ca_file(), Some(&client));
    server.wait_ready_as(&good.iter().map(String::as_str).collect::<Vec<_>>());
    let ep = server.endpoint();
    ok(ctl(&ep, &good, &["put", "k", "over TLS"]));
    assert_eq!(
        ok(ctl(&ep, &good, &["get", "k", "--print-value-only"])).trim(),
        "over TLS"
    );
    // The JSON gateway and the health endpoint share the TLS port (curl, where installed).
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok()
    {
        let curl = |path: &str, body: &str| {
            let out = std::process::Command::new("curl")
                .args([
                    "-s",
                    "--cacert",
                    &s(&ca.ca_file()),
                    "--cert",
                    &s(&client.cert),
                ])
                .args(["--key", &s(&client.key), "-X", "POST", "-d", body])
                .arg(format!("{ep}{path}"))
                .output()
                .expect("curl");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let range = curl("/v3/kv/range", r#"{"key":"aw=="}"#);
        assert!(range.contains("\"kvs\""), "{range}");
        let health = std::process::Command::new("curl")
            .args([
                "-s",
                "--cacert",
                &s(&ca.ca_file()),
                "--cert",
                &s(&client.cert),
            ])
            .args(["--key", &s(&client.key)])
            .arg(format!("{ep}/health"))
            .output()
            .expect("curl");
        assert!(String::from_utf8_lossy(&health.stdout).contains("true"));
    }
    // No client certificate, or one from another CA: refused in the handshake.
    fails(ctl(&ep, &client_flags(&ca.ca_file(), None), &["get", "k"]));
    let stranger = rogue.issue("client");
    fails(ctl(
        &ep,
        &client_flags(&ca.ca_file(), Some(&stranger)),
        &["get", "k"],
    ));
    // Plain HTTP to the TLS port: refused too.
    fails(etcdctl(
        &format!("http://127.0.0.1:{}", server.client_port),
        &["get", "k"],
    ));
    let log = server.log();
    assert!(log.contains("rejected a TLS connection"), "{log}");
    // The member serves on.
    ok(ctl(&ep, &good, &["get", "k"]));
}

#[test]
fn a_client_certificates_common_name_is_the_user() {
    if skip_without_etcdctl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "main");
    let server_pair = ca.issue("server");
    let root_cert = ca.issue("root");
    let alice_cert = ca.issue("alice");
    let mut server = tls_server(dir.path(), &server_pair, &ca.ca_file(), &[]);
    server.spawn();
    let as_root = client_flags(&ca.ca_file(), Some(&root_cert));
    let as_alice = client_flags(&ca.ca_file(), Some(&alice_cert));
    server.wait_ready_as(&as_root.iter().map(String::as_str).collect::<Vec<_>>());
    let ep = server.endpoint();
    ok(ctl(&ep, &as_root, &["user", "add", "root:rootpw"]));
    ok(ctl(
        &ep,
        &as_root,
        &["user", "add", "alice", "--no-password"],
    ));
    ok(ctl(&ep, &as_root, &["role", "add", "r"]));
    ok(ctl(
        &ep,
        &as_root,
        &[
            "role",
            "grant-permission",
            "r",
            "readwrite",
            "a/",
            "--prefix",
        ],
    ));
    ok(ctl(&ep, &as_root, &["user", "grant-role", "alice", "r"]));
    ok(ctl(&ep, &as_root, &["auth", "enable"]));
    // Without a token, the certificate's common name is the user (as etcd).
    ok(ctl(&ep, &as_root, &["put", "b", "root may"]));
    ok(ctl(&ep, &as_alice, &["put", "a/1", "alice may"]));
    let err = fails(ctl(&ep, &as_alice, &["put", "b", "alice may not"]));
    assert!(err.contains("permission denied"), "{err}");
    // A token wins over the certificate.
    let err = fails(ctl(&ep, &as_root, &["--user", "root:wrong", "get", "b"]));
    assert!(err.contains("authentication failed"), "{err}");
}

#[test]
fn certificates_rotate_without_a_restart() {
    if skip_without_etcdctl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let old = Ca::new(dir.path(), "old");
    let new = Ca::new(dir.path(), "new");
    // The files the member reads, replaced in place below.
    let live = Pair {
        cert: dir.path().join("live.pem"),
        key: dir.path().join("live-key.pem"),
    };
    let live_ca = dir.path().join("live-ca.pem");
    let install = |pair: &Pair, ca: &Ca| {
        for (from, to) in [
            (&pair.cert, &live.cert),
            (&pair.key, &live.key),
            (&ca.ca_file(), &live_ca),
        ] {
            // Written to a new file and renamed into place, as certificate tools do.
            let tmp = to.with_extension("tmp");
            std::fs::copy(from, &tmp).expect("copy");
            std::fs::rename(&tmp, to).expect("rename");
        }
    };
    install(&old.issue("server"), &old);
    let old_client = client_flags(&old.ca_file(), Some(&old.issue("client")));
    let new_client = client_flags(&new.ca_file(), Some(&new.issue("client")));
    let mut server = tls_server(dir.path(), &live, &live_ca, &[]);
    server.spawn();
    server.wait_ready_as(&old_client.iter().map(String::as_str).collect::<Vec<_>>());
    let ep = server.endpoint();
    ok(ctl(&ep, &old_client, &["put", "k", "v1"]));
    fails(ctl(&ep, &new_client, &["get", "k"]));
    install(&new.issue("server"), &new);
    wait_until(
        "the new certificates in use",
        Duration::from_secs(10),
        || ctl(&ep, &new_client, &["get", "k"]).status.success(),
    );
    assert_eq!(
        ok(ctl(&ep, &new_client, &["get", "k", "--print-value-only"])).trim(),
        "v1"
    );
    fails(ctl(&ep, &old_client, &["get", "k"]));
    assert!(server
        .log()
        .contains("TLS certificate files changed: reloaded"));
}

#[test]
fn garbage_handshakes_leave_the_member_serving() {
    if skip_without_etcdctl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "main");
    let server_pair = ca.issue("server");
    let good = client_flags(&ca.ca_file(), Some(&ca.issue("client")));
    let mut server = tls_server(dir.path(), &server_pair, &ca.ca_file(), &[]);
    server.spawn();
    server.wait_ready_as(&good.iter().map(String::as_str).collect::<Vec<_>>());
    for i in 0..1000u32 {
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", server.client_port)).expect("connect");
        let garbage: Vec<u8> = (0..64u32).map(|b| (b * 7 + i) as u8).collect();
        let _ = stream.write_all(&garbage);
    }
    ok(ctl(&server.endpoint(), &good, &["put", "still", "serving"]));
    let warnings = server.log().matches("rejected a TLS connection").count();
    assert!(
        (1..=200).contains(&warnings),
        "{warnings} warnings for 1,000 garbage handshakes: not rate-limited"
    );
}

#[test]
fn auto_tls_makes_a_private_self_signed_certificate() {
    if skip_without_etcdctl() {
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::new(dir.path(), &["--auto-tls"]);
    server.client_scheme = "https";
    server.spawn();
    // etcdctl 3.4 ignores --insecure-skip-tls-verify without other TLS flags (with etcd's auto
    // TLS as well): the self-signed certificate is its own CA.
    let cert = server.data_dir.join("fixtures/client/cert.pem");
    let cacert = format!("--cacert={}", s(&cert));
    server.wait_ready_as(&[&cacert]);
    ok(etcdctl(&server.endpoint(), &[&cacert, "put", "k", "v"]));
    let key = server.data_dir.join("fixtures/client/key.pem");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", key.display());
    // Checking the certificate against a CA fails: it is self-signed.
    fails(etcdctl(&server.endpoint(), &["get", "k"]));
}

#[test]
fn an_https_url_without_a_certificate_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::new(dir.path(), &[]);
    server.client_scheme = "https";
    let status = server.run_to_exit(Duration::from_secs(10));
    assert!(!status.success());
    assert!(
        server
            .log()
            .contains("TLS key/cert (--cert-file, --key-file) must be provided"),
        "{}",
        server.log()
    );
}

/// Three members speaking TLS to each other (and to clients); a fourth with a certificate
/// from another CA cannot join; one with the right CA but another common name neither.
#[test]
fn a_cluster_over_peer_tls_refuses_a_peer_from_another_ca() {
    if skip_without_etcdctl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "main");
    let rogue = Ca::new(dir.path(), "rogue");
    let client = client_flags(&ca.ca_file(), Some(&ca.issue("client")));
    let names = ["m1", "m2", "m3"];
    let peer_pair = ca.issue("peer");
    let server_pair = ca.issue("server");
    let peer_flags = |pair: &Pair, ca_file: &Path| -> Vec<String> {
        vec![
            "--peer-cert-file".into(),
            s(&pair.cert),
            "--peer-key-file".into(),
            s(&pair.key),
            "--peer-trusted-ca-file".into(),
            s(ca_file),
            "--peer-client-cert-auth".into(),
            "--peer-cert-allowed-cn".into(),
            "peer".into(),
            "--cert-file".into(),
            s(&server_pair.cert),
            "--key-file".into(),
            s(&server_pair.key),
            "--trusted-ca-file".into(),
            s(&ca.ca_file()),
            "--client-cert-auth".into(),
        ]
    };
    let flags = peer_flags(&peer_pair, &ca.ca_file());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut servers = new_cluster_over(dir.path(), &names, &flags, "https", "https");
    // The members' --initial-cluster, for the intruders below.
    let initial = servers[0].extra_args[3].clone();
    for server in servers.iter_mut() {
        server.spawn();
    }
    let wait: Vec<&str> = client.iter().map(String::as_str).collect();
    for server in servers.iter_mut() {
        server.wait_ready_as(&wait);
    }
    ok(ctl(
        &servers[0].endpoint(),
        &client,
        &["put", "k", "replicated"],
    ));
    for server in &servers {
        wait_until("the put on every member", Duration::from_secs(10), || {
            ctl(
                &server.endpoint(),
                &client,
                &["get", "k", "--print-value-only", "--consistency=s"],
            )
            .status
            .success()
        });
    }
    let list = ok(ctl(&servers[0].endpoint(), &client, &["member", "list"]));
    assert!(list.contains("https://127.0.0.1"), "{list}");

    // Intruders: a certificate from another CA, and the right CA with another common name.
    for (label, pair, ca_file) in [
        ("rogue-ca", rogue.issue("peer"), rogue.ca_file()),
        ("wrong-cn", ca.issue("intruder"), ca.ca_file()),
    ] {
        let root = dir.path().join(label);
        std::fs::create_dir_all(&root).expect("dir");
        let mut intruder = Server::new(&root, &[]);
        intruder.client_scheme = "https";
        intruder.peer_scheme = "https";
        let added = ok(ctl_through_elections(
            &servers[0].endpoint(),
            &client,
            &[
                "member",
                "add",
                label,
                &format!("--peer-urls={}", intruder.peer_url()),
            ],
        ));
        assert!(added.contains("added"), "{added}");
        let mut cluster = format!("{initial},{label}={}", intruder.peer_url());
        cluster.retain(|c| c != ' ');
        intruder.extra_args = vec![
            "--name".into(),
            label.into(),
            "--initial-cluster".into(),
            cluster,
            "--initial-cluster-state".into(),
            "existing".into(),
        ];
        intruder.extra_args.extend(peer_flags(&pair, &ca_file));
        intruder.spawn();
        std::thread::sleep(Duration::from_secs(3));
        // It never becomes a working member: it cannot join or get the log (it never even
        // published its name).
        let health = ctl(&intruder.endpoint(), &client, &["endpoint", "health"]);
        assert!(!health.status.success(), "{label} joined");
        let refused = servers
            .iter()
            .any(|s| s.log().contains("rejected a TLS connection"));
        assert!(refused, "no member logged the refusal");
        // The cluster serves on; the intruder goes again.
        ok(ctl_through_elections(
            &servers[1].endpoint(),
            &client,
            &["put", "k", label],
        ));
        let id = ok(ctl(&servers[0].endpoint(), &client, &["member", "list"]))
            .lines()
            .find(|l| l.contains(&intruder.peer_url()))
            .and_then(|l| l.split(',').next())
            .expect("the intruder's id")
            .trim()
            .to_string();
        ok(ctl_through_elections(
            &servers[0].endpoint(),
            &client,
            &["member", "remove", &id],
        ));
        intruder.kill9();
    }
}

/// `--peer-auto-tls`: the members make their own certificates and speak TLS to each other
/// (without checking each other's, as etcd's auto TLS).
#[test]
fn peers_with_auto_tls_form_a_cluster() {
    if skip_without_etcdctl() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let names = ["p1", "p2", "p3"];
    let mut servers = new_cluster_over(dir.path(), &names, &["--peer-auto-tls"], "http", "https");
    for server in servers.iter_mut() {
        server.spawn();
    }
    for server in servers.iter_mut() {
        server.wait_ready();
    }
    ok(etcdctl(
        &servers[0].endpoint(),
        &["put", "k", "over peer TLS"],
    ));
    wait_until(
        "the put on the third member",
        Duration::from_secs(10),
        || {
            etcdctl(
                &servers[2].endpoint(),
                &["get", "k", "--print-value-only", "--consistency=s"],
            )
            .stdout
                == b"over peer TLS\n"
        },
    );
    assert!(servers[1].data_dir.join("fixtures/peer/cert.pem").exists());
    // A plain-TCP peer connection to a TLS peer port is refused.
    let mut plain =
        std::net::TcpStream::connect(("127.0.0.1", servers[0].peer_port)).expect("connect");
    let _ = plain.write_all(b"QKVPEER1 not TLS at all");
    wait_until("the refusal in the log", Duration::from_secs(5), || {
        servers[0].log().contains("rejected a TLS connection")
    });
}
