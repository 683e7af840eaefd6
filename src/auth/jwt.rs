//! JWT tokens (etcd's `--auth-token jwt,pub-key=...,priv-key=...,sign-method=...,ttl=...`):
//! signed by the member that checked the password, checked by any member with the public key,
//! no log round. As etcd's, a token carries the user and the auth revision it was issued at,
//! so a change to the auth store makes the tokens issued before it old (clients authenticate
//! again on `etcdserver: revision of auth store is old`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

/// etcd's default JWT TTL.
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

pub struct JwtTokens {
    algorithm: Algorithm,
    /// `None`: this member only checks tokens (no private key given).
    signing: Option<EncodingKey>,
    checking: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for JwtTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtTokens")
            .field("algorithm", &self.algorithm)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl JwtTokens {
    /// From etcd's option string after `jwt,`: `pub-key=PATH,priv-key=PATH,sign-method=RS256|
    /// RS384|RS512|PS256|PS384|PS512|ES256|ES384|EdDSA,ttl=5m`.
    pub fn from_options(options: &str) -> Result<JwtTokens, String> {
        let mut public = None;
        let mut private = None;
        let mut method = None;
        let mut ttl = DEFAULT_JWT_TTL;
        for part in options.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("--auth-token jwt option {part:?} is not name=value"))?;
            match name {
                "pub-key" => public = Some(value.to_string()),
                "priv-key" => private = Some(value.to_string()),
                "sign-method" => method = Some(value.to_string()),
                "ttl" => {
                    ttl = crate::config::parse_duration(value)
                        .map_err(|e| format!("--auth-token jwt ttl {value:?}: {e}"))?
                }
                other => return Err(format!("unknown --auth-token jwt option {other:?}")),
            }
        }
        let method = method.ok_or("--auth-token jwt needs sign-method=")?;
        let algorithm: Algorithm = method
            .parse()
            .map_err(|_| format!("unsupported JWT sign-method {method:?}"))?;
        let public = public.ok_or("--auth-token jwt needs pub-key=")?;
        let read = |path: &str| {
            std::fs::read(path).map_err(|e| format!("cannot read the JWT key {path}: {e}"))
        };
        let public_pem = read(&public)?;
        let checking = match algorithm {
            Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&public_pem),
            Algorithm::EdDSA => DecodingKey::from_ed_pem(&public_pem),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => DecodingKey::from_rsa_pem(&public_pem),
            other => {
                return Err(format!(
                    "JWT sign-method {other:?} needs no key pair: not supported"
                ))
            }
        }
        .map_err(|e| format!("the JWT public key {public}: {e}"))?;
        let signing = match private {
            None => None,
            Some(path) => {
                let pem = read(&path)?;
                Some(
                    match algorithm {
                        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
                        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
                        _ => EncodingKey::from_rsa_pem(&pem),
                    }
                    .map_err(|e| format!("the JWT private key {path}: {e}"))?,
                )
            }
        };
        Ok(JwtTokens {
            algorithm,
            signing,
            checking,
            ttl,
        })
    }

    /// A token for `user`, issued at auth revision `revision`.
    pub fn sign(&self, user: &str, revision: u64) -> Result<String, String> {
        let key = self
            .signing
            .as_ref()
            .ok_or("this member has no JWT private key (priv-key=) to issue tokens with")?;
        let exp = (SystemTime::now() + self.ttl)
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(u64::MAX);
        let claims = Claims {
            username: user.to_string(),
            revision,
            exp,
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key)
            .map_err(|e| format!("cannot sign a JWT: {e}"))
    }

    /// The user and auth revision of a valid, unexpired token.
    pub fn check(&self, token: &str) -> Option<(String, u64)> {
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.checking, &validation).ok()?;
        Some((data.claims.username, data.claims.revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(dir: &std::path::Path, alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
        let key = rcgen::KeyPair::generate_for(alg).expect("key");
        let private = dir.join("private.pem");
        let public = dir.join("public.pem");
        std::fs::write(&private, key.serialize_pem()).expect("write");
        std::fs::write(&public, key.public_key_pem()).expect("write");
        (public.display().to_string(), private.display().to_string())
    }

    #[test]
    fn tokens_sign_and_check_with_es256_and_eddsa() {
        for (alg, method) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, "ES256"),
            (&rcgen::PKCS_ED25519, "EdDSA"),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (public, private) = keys(dir.path(), alg);
            let jwt = JwtTokens::from_options(&format!(
                "pub-key={public},priv-key={private},sign-method={method},ttl=1m"
            ))
            .expect(method);
            let token = jwt.sign("alice", 7).expect("sign");
            assert_eq!(
                jwt.check(&token),
                Some(("alice".to_string(), 7)),
                "{method}"
            );
            let mut forged = token.clone();
            forged.pop();
            assert_eq!(jwt.check(&forged), None, "{method}: a changed token");
            // Only the public key: checks, cannot issue.
            let checker =
                JwtTokens::from_options(&format!("pub-key={public},sign-method={method}"))
                    .expect("checker");
            assert!(checker.check(&token).is_some());
            assert!(checker.sign("alice", 7).is_err());
        }
    }

    #[test]
    fn bad_options_are_refused_by_name() {
        assert!(JwtTokens::from_options("sign-method=RS256")
            .expect_err("no key")
            .contains("pub-key"));
        assert!(JwtTokens::from_options("pub-key=/nope,sign-method=RS256")
            .expect_err("no file")
            .contains("/nope"));
        assert!(JwtTokens::from_options("pub-key=/x,sign-method=XX1")
            .expect_err("method")
            .contains("XX1"));
        assert!(JwtTokens::from_options("pub-key=/x,what=1")
            .expect_err("option")
            .contains("what"));
    }
}
