//! etcd's configuration sources, so that the binary drops into an etcd deployment unchanged:
//! `ETCD_<FLAG>` environment variables (as well as `QUORUMKV_<FLAG>`), etcd's `--config-file`
//! (its YAML keys are the flags' names), and etcd's flags that quorumkv takes without their
//! changing anything here, or refuses by name, never silently.
//!
//! Everything here is a pure function of the command line, the environment and the file's
//! text; `main` applies the result before parsing its flags.

use std::collections::BTreeMap;

/// What to do with an etcd flag that quorumkv does not implement as a flag of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// Taking it changes nothing here (a logger choice, a tuning knob of etcd's own storage).
    Ignore,
    /// Changes nothing at these values (compared case-blind); refused at any other.
    IgnoreIf(&'static [&'static str]),
    /// Not built: refused with the reason, whatever the value.
    Refuse(&'static str),
    /// Not built: refused unless the value is one of these (etcd's defaults).
    RefuseUnless(&'static [&'static str], &'static str),
}

const CRL: &str = "certificate revocation lists are not supported yet";
const EMPTY_OR_FALSE: &[&str] = &["", "false"];

/// etcd 3.4/3.5 flags quorumkv has no flag for, and what it does with each.
const FOREIGN_FLAGS: &[(&str, Policy)] = &[
    ("logger", Policy::IgnoreIf(&["zap", "capnslog"])),
    ("log-outputs", Policy::IgnoreIf(&["default", "stderr"])),
    ("enable-pprof", Policy::IgnoreIf(EMPTY_OR_FALSE)),
    ("metrics", Policy::IgnoreIf(&["basic", "extensive"])),
    ("max-snapshots", Policy::Ignore),
    ("max-wals", Policy::Ignore),
    ("backend-batch-interval", Policy::Ignore),
    ("backend-batch-limit", Policy::Ignore),
    ("backend-bbolt-freelist-type", Policy::Ignore),
    ("experimental-backend-bbolt-freelist-type", Policy::Ignore),
    (
        "experimental-enable-lease-checkpoint",
        Policy::IgnoreIf(&["true", ""]),
    ),
    (
        "experimental-enable-lease-checkpoint-persist",
        Policy::IgnoreIf(&["true", ""]),
    ),
    ("grpc-keepalive-min-time", Policy::Ignore),
    ("grpc-keepalive-interval", Policy::Ignore),
    ("grpc-keepalive-timeout", Policy::Ignore),
    ("pre-vote", Policy::IgnoreIf(&["true", ""])),
    ("socket-reuse-address", Policy::IgnoreIf(EMPTY_OR_FALSE)),
    ("socket-reuse-port", Policy::IgnoreIf(EMPTY_OR_FALSE)),
    (
        "experimental-enable-v2v3",
        Policy::RefuseUnless(&[""], "the v2 API is not built"),
    ),
    (
        "force-new-cluster",
        Policy::RefuseUnless(EMPTY_OR_FALSE, "not built"),
    ),
    (
        "unsafe-no-fsync",
        Policy::RefuseUnless(EMPTY_OR_FALSE, "quorumkv always syncs its WAL"),
    ),
    (
        "proxy",
        Policy::RefuseUnless(&["", "off"], "the v2 proxy is not built"),
    ),
    (
        "discovery",
        Policy::RefuseUnless(&[""], "discovery is not built"),
    ),
    (
        "discovery-srv",
        Policy::RefuseUnless(&[""], "discovery is not built"),
    ),
    (
        "discovery-proxy",
        Policy::RefuseUnless(&[""], "discovery is not built"),
    ),
    (
        "experimental-enable-distributed-tracing",
        Policy::RefuseUnless(EMPTY_OR_FALSE, "tracing is not built"),
    ),
    ("client-crl-file", Policy::RefuseUnless(&[""], CRL)),
    ("peer-crl-file", Policy::RefuseUnless(&[""], CRL)),
    ("cors", Policy::Refuse("CORS is not built")),
    (
        "host-whitelist",
        Policy::Refuse("host whitelists are not built"),
    ),
];

/// Flags that take no value on etcd's command line when given bare (`--enable-pprof`).
const BARE_BOOLEANS: &[&str] = &[
    "enable-pprof",
    "client-cert-auth",
    "peer-client-cert-auth",
    "auto-tls",
    "peer-auto-tls",
    "force-new-cluster",
    "unsafe-no-fsync",
    "socket-reuse-address",
    "socket-reuse-port",
    "experimental-enable-lease-checkpoint",
    "experimental-enable-lease-checkpoint-persist",
    "experimental-enable-distributed-tracing",
    "experimental-enable-v2v3",
    "pre-vote",
];

fn policy(flag: &str) -> Option<Policy> {
    FOREIGN_FLAGS
        .iter()
        .find(|(name, _)| *name == flag)
        .map(|(_, policy)| *policy)
}

/// Applies a foreign flag's policy: `Ok(note)` when it is taken without effect.
fn judge(flag: &str, value: &str, policy: Policy) -> Result<String, String> {
    let matches = |allowed: &[&str]| allowed.iter().any(|a| a.eq_ignore_ascii_case(value));
    match policy {
        Policy::Ignore => Ok(format!(
            "--{flag}={value} is accepted and has no effect here"
        )),
        Policy::IgnoreIf(allowed) if matches(allowed) => Ok(format!(
            "--{flag}={value} is accepted and has no effect here"
        )),
        Policy::IgnoreIf(allowed) => Err(format!(
            "--{flag}={value} is not supported (only {})",
            allowed.join(", ")
        )),
        Policy::RefuseUnless(allowed, _) if matches(allowed) => {
            Ok(format!("--{flag}={value} is accepted (etcd's default)"))
        }
        Policy::Refuse(reason) | Policy::RefuseUnless(_, reason) => {
            Err(format!("--{flag} is not supported: {reason}"))
        }
    }
}

/// The command line and environment after etcd's sources are folded in.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The arguments for the flag parser (program name first).
    pub args: Vec<String>,
    /// `QUORUMKV_<FLAG>` variables to set, from `ETCD_<FLAG>` ones.
    pub env: Vec<(String, String)>,
    /// What was taken without effect, or not recognised, for the log once it is up.
    pub notes: Vec<String>,
}

/// Folds etcd's configuration sources into a command line for quorumkv's flag parser.
/// `read_file` reads `--config-file` (a function, so tests need no files). As etcd: with a
/// config file, the file alone configures the member (other flags and the environment are
/// ignored). `known` says whether quorumkv has a flag of that name.
pub fn resolve(
    args: &[String],
    env: &[(String, String)],
    known: &dyn Fn(&str) -> bool,
    read_file: &dyn Fn(&str) -> Result<String, String>,
) -> Result<Resolved, String> {
    let mut resolved = Resolved {
        args: args.first().cloned().into_iter().collect(),
        ..Default::default()
    };
    let rest = args.get(1..).unwrap_or_default();
    // The offline tools take their own flags.
    if rest.first().is_some_and(|a| !a.starts_with('-')) {
        resolved.args.extend(rest.iter().cloned());
        return Ok(resolved);
    }
    let mut pairs = split_flags(rest)?;
    let config_file = pairs
        .iter()
        .find(|(flag, _)| flag == "config-file")
        .map(|(_, value)| value.clone())
        .or_else(|| env_value(env, "CONFIG_FILE"));
    if let Some(path) = config_file {
        let text = read_file(&path)?;
        pairs = yaml_flags(&text).map_err(|e| format!("--config-file {path}: {e}"))?;
        resolved.notes.push(format!(
            "configured by {path}; other flags and the environment are ignored"
        ));
    } else {
        for (name, value) in env {
            let Some(flag) = name.strip_prefix("ETCD_") else {
                continue;
            };
            let flag = flag.to_ascii_lowercase().replace('_', "-");
            if pairs.iter().any(|(f, _)| *f == flag) {
                resolved.notes.push(format!(
                    "{name} is shadowed by the command-line flag --{flag}"
                ));
            } else if let Some(policy) = policy(&flag) {
                resolved.notes.push(judge(&flag, value, policy)?);
            } else if known(&flag) {
                let ours = format!("QUORUMKV_{}", &name["ETCD_".len()..]);
                if !env.iter().any(|(n, _)| *n == ours) {
                    resolved.env.push((ours, value.clone())); // else QUORUMKV_ wins.
                }
            } else {
                resolved
                    .notes
                    .push(format!("unrecognized environment variable {name}"));
            }
        }
    }
    for (flag, value) in pairs {
        if flag == "config-file" {
            continue;
        }
        if let Some(policy) = policy(&flag) {
            resolved.notes.push(judge(&flag, &value, policy)?);
            continue;
        }
        if value.is_empty() {
            resolved.args.push(format!("--{flag}"));
        } else {
            resolved.args.push(format!("--{flag}={value}"));
        }
    }
    Ok(resolved)
}

fn env_value(env: &[(String, String)], suffix: &str) -> Option<String> {
    env.iter()
        .find(|(name, _)| *name == format!("QUORUMKV_{suffix}"))
        .or_else(|| {
            env.iter()
                .find(|(name, _)| *name == format!("ETCD_{suffix}"))
        })
        .map(|(_, value)| value.clone())
}

/// `--flag=value`, `--flag value` and bare booleans as (flag, value) pairs; a lone `-flag`
/// (Go's flag package takes one dash too) counts as `--flag`.
fn split_flags(args: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let Some(body) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            return Err(format!("unexpected argument {arg:?}"));
        };
        if let Some((flag, value)) = body.split_once('=') {
            pairs.push((flag.to_string(), value.to_string()));
            i += 1;
            continue;
        }
        let takes_value = !is_bare(body) && !matches!(body, "help" | "h" | "version" | "V");
        match args.get(i + 1) {
            Some(value) if takes_value && !value.starts_with("--") => {
                pairs.push((body.to_string(), value.clone()));
                i += 2;
            }
            _ => {
                pairs.push((body.to_string(), String::new()));
                i += 1;
            }
        }
    }
    // Bare booleans mean true; `--help` and `--version` stay bare.
    Ok(pairs
        .into_iter()
        .map(|(flag, value)| {
            if value.is_empty() && is_bare(&flag) {
                (flag, "true".to_string())
            } else {
                (flag, value)
            }
        })
        .collect())
}

fn is_bare(flag: &str) -> bool {
    BARE_BOOLEANS.contains(&flag)
        || matches!(
            flag,
            "strict-reconfig-check"
                | "auto-promote-learners"
                | "experimental-initial-corrupt-check"
                | "experimental-compact-hash-check-enabled"
                | "enable-v2"
        )
}

/// etcd's YAML config file as flags: each key is a flag's name; lists join with commas; the
/// transport-security sections become the TLS flags they stand for (`peer-` for the peer's).
fn yaml_flags(text: &str) -> Result<Vec<(String, String)>, String> {
    let document: BTreeMap<String, serde_yaml::Value> =
        serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let mut pairs = Vec::new();
    for (key, value) in document {
        match (key.as_str(), value) {
            (section @ ("client-transport-security" | "peer-transport-security"), value) => {
                let prefix = if section.starts_with("peer") {
                    "peer-"
                } else {
                    ""
                };
                let serde_yaml::Value::Mapping(fields) = value else {
                    continue;
                };
                for (field, value) in fields {
                    let field = field.as_str().unwrap_or_default().to_string();
                    if let Some(value) = scalar(&value) {
                        pairs.push((format!("{prefix}{field}"), value));
                    }
                }
            }
            (_, serde_yaml::Value::Null) => {}
            (_, value) => match scalar(&value) {
                Some(value) => pairs.push((key, value)),
                None => return Err(format!("key {key:?}: unsupported value")),
            },
        }
    }
    Ok(pairs)
}

fn scalar(value: &serde_yaml::Value) -> Option<String> {
    match value {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Null => Some(String::new()),
        serde_yaml::Value::Sequence(items) => Some(
            items
                .iter()
                .filter_map(scalar)
                .collect::<Vec<_>>()
                .join(","),
        ),
        _ => None,
    }
}

/// A Go duration as etcd's flags take it: `500ms`, `5s`, `10m`, `1h30m`, `0`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("invalid duration {text:?} (want e.g. 500ms, 5s, 10m, 1h30m)");
    let text = text.trim();
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        std::iter::once("quorumkv")
            .chain(list.iter().copied())
            .map(String::from)
            .collect()
    }

    fn known(flag: &str) -> bool {
        matches!(
            flag,
            "name"
                | "data-dir"
                | "snapshot-count"
                | "listen-metrics-urls"
                | "initial-cluster"
                | "cert-file"
                | "client-cert-auth"
        )
    }

    fn no_file(path: &str) -> Result<String, String> {
        Err(format!("no file {path}"))
    }

    #[test]
    fn kubeadm_style_flags_pass_through_and_harmless_ones_are_noted() {
        let resolved = resolve(
            &args(&[
                "--name=node",
                "--data-dir",
                "/var/lib/etcd",
                "--logger=zap",
                "--experimental-initial-corrupt-check=true",
                "--enable-pprof",
                "--enable-pprof=false",
            ]),
            &[],
            &known,
            &no_file,
        );
        let e = resolved.expect_err("pprof on is refused");
        assert!(e.contains("--enable-pprof=true"), "{e}");
        let resolved = resolve(
            &args(&["--name=node", "--data-dir", "/var/lib/etcd", "--logger=zap"]),
            &[],
            &known,
            &no_file,
        )
        .expect("resolve");
        assert_eq!(
            resolved.args,
            args(&["--name=node", "--data-dir=/var/lib/etcd"])
        );
        assert_eq!(resolved.notes.len(), 1);
    }

    #[test]
    fn revocation_lists_are_refused_by_name() {
        let e = resolve(
            &args(&["--client-crl-file=/etc/kubernetes/pki/etcd/crl.pem"]),
            &[],
            &known,
            &no_file,
        )
        .expect_err("refused");
        assert!(
            e.contains("--client-crl-file") && e.contains("revocation"),
            "{e}"
        );
        assert!(resolve(&args(&["--peer-crl-file="]), &[], &known, &no_file).is_ok());
    }

    #[test]
    fn etcd_environment_variables_become_ours_unless_a_flag_or_ours_is_set() {
        let env = vec![
            ("ETCD_NAME".to_string(), "from-etcd".to_string()),
            ("ETCD_SNAPSHOT_COUNT".to_string(), "10".to_string()),
            ("QUORUMKV_SNAPSHOT_COUNT".to_string(), "20".to_string()),
            ("ETCD_DATA_DIR".to_string(), "/x".to_string()),
            ("ETCD_UNSUPPORTED_ARCH".to_string(), "arm".to_string()),
        ];
        let resolved = resolve(&args(&["--data-dir=/y"]), &env, &known, &no_file).expect("resolve");
        assert_eq!(
            resolved.env,
            vec![("QUORUMKV_NAME".to_string(), "from-etcd".to_string())]
        );
        assert!(resolved.notes.iter().any(|n| n.contains("ETCD_DATA_DIR")));
        assert!(resolved
            .notes
            .iter()
            .any(|n| n.contains("unrecognized environment variable ETCD_UNSUPPORTED_ARCH")));
        let e = resolve(
            &args(&[]),
            &[("ETCD_PEER_CRL_FILE".to_string(), "/c".to_string())],
            &known,
            &no_file,
        )
        .expect_err("refused");
        assert!(e.contains("--peer-crl-file"), "{e}");
    }

    #[test]
    fn a_config_file_alone_configures_with_etcds_yaml_keys() {
        let yaml = "name: infra1\ndata-dir: /var/lib/etcd\nsnapshot-count: 10000\n\
            listen-metrics-urls: http://127.0.0.1:2381\ninitial-cluster: infra1=http://a:2380\n\
            log-outputs: [stderr]\nlogger: zap\ncors:\n\
            client-transport-security:\n  cert-file:\n  client-cert-auth: false\n";
        let read = |path: &str| -> Result<String, String> {
            assert_eq!(path, "/etc/etcd.yml");
            Ok(yaml.to_string())
        };
        let resolved = resolve(
            &args(&["--config-file", "/etc/etcd.yml", "--name=ignored"]),
            &[("ETCD_NAME".to_string(), "ignored".to_string())],
            &known,
            &read,
        )
        .expect("resolve");
        assert!(resolved.env.is_empty());
        assert!(resolved.args.contains(&"--name=infra1".to_string()));
        assert!(resolved
            .args
            .contains(&"--snapshot-count=10000".to_string()));
        assert!(!resolved.args.iter().any(|a| a.contains("ignored")));
        // The transport-security section becomes the TLS flags it stands for (an empty file
        // name is no file: `main` reads it as unset).
        assert!(resolved
            .args
            .contains(&"--client-cert-auth=false".to_string()));
        let bad = |_: &str| -> Result<String, String> { Ok("name: [".to_string()) };
        let e = resolve(&args(&["--config-file=/x.yml"]), &[], &known, &bad).expect_err("bad");
        assert!(e.contains("/x.yml"), "{e}");
    }

    #[test]
    fn go_durations_parse_as_etcds_flags_write_them() {
        let secs = |t: &str| parse_duration(t).map(|d| d.as_secs_f64());
        assert_eq!(secs("500ms"), Ok(0.5));
        assert_eq!(secs("5s"), Ok(5.0));
        assert_eq!(secs("1h30m"), Ok(5400.0));
        assert_eq!(secs("0"), Ok(0.0));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn the_tools_and_bare_flags_are_left_alone() {
        let tool = args(&["snapshot", "status", "f.db"]);
        assert_eq!(
            resolve(&tool, &[], &known, &no_file).expect("resolve").args,
            tool
        );
        let resolved = resolve(&args(&["--version"]), &[], &known, &no_file).expect("resolve");
        assert_eq!(resolved.args, args(&["--version"]));
    }
}
