//! Passwords, kept only as bcrypt hashes (etcd's format: `$2a$`/`$2b$`, cost in the hash).

/// etcd's `--bcrypt-cost` default.
pub const DEFAULT_BCRYPT_COST: u32 = 10;

/// The bcrypt hash of `password` at `cost` (4..=31; etcd's range).
pub fn hash_password(password: &str, cost: u32) -> Result<String, String> {
    bcrypt::hash(password, cost).map_err(|e| format!("cannot hash the password: {e}"))
}

/// Does `password` match `hash`? A malformed hash matches nothing.
pub fn verify_password(password: &str, hash: &str) -> bool {
    !hash.is_empty() && bcrypt::verify(password, hash).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let hash = hash_password("s3cret", 4).expect("hash");
        assert!(hash.starts_with("$2"));
        assert!(!hash.contains("s3cret"));
        assert!(verify_password("s3cret", &hash));
        assert!(!verify_password("s3cre", &hash));
        assert!(!verify_password("s3cret", ""));
        assert!(!verify_password("s3cret", "not a hash"));
    }
}
