//! Simple tokens (etcd's `--auth-token simple`): random, opaque, issued through the log so that
//! every member knows them, and forgotten after `--auth-token-ttl` without use. They live in
//! memory only: after a restart clients authenticate again, as with etcd.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use rand::Rng;

/// etcd's `--auth-token-ttl` default.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);

/// At most this many tokens are kept; past it, the least recently used are forgotten.
const MAX_TOKENS: usize = 100_000;

struct Entry {
    user: String,
    /// When it was last used (or issued), in the clock's milliseconds.
    used_ms: AtomicU64,
}

/// The simple tokens this member knows, with the user each stands for.
pub struct TokenTable {
    tokens: RwLock<HashMap<String, Entry>>,
    ttl_ms: u64,
}

/// A new simple token: 16 random letters, then `.` and the raft index it is proposed after
/// (etcd's shape; clients treat it as opaque).
pub fn new_simple_token(index: u64) -> String {
    let mut rng = rand::thread_rng();
    let letters: String = (0..16)
        .map(|_| {
            let n = rng.gen_range(0..52u8);
            if n < 26 {
                (b'a' + n) as char
            } else {
                (b'A' + n - 26) as char
            }
        })
        .collect();
    format!("{letters}.{index}")
}

impl TokenTable {
    pub fn new(ttl: Duration) -> TokenTable {
        TokenTable {
            tokens: RwLock::default(),
            ttl_ms: ttl.as_millis().max(1) as u64,
        }
    }

    /// Learns a token (applied from the log), used as of `now_ms`.
    pub fn insert(&self, token: String, user: String, now_ms: u64) {
        let mut tokens = self.tokens.write().unwrap_or_else(|p| p.into_inner());
        if tokens.len() >= MAX_TOKENS {
            let ttl = self.ttl_ms;
            tokens.retain(|_, e| now_ms.saturating_sub(e.used_ms.load(Ordering::Relaxed)) < ttl);
            if tokens.len() >= MAX_TOKENS {
                if let Some(oldest) = tokens
                    .iter()
                    .min_by_key(|(_, e)| e.used_ms.load(Ordering::Relaxed))
                    .map(|(t, _)| t.clone())
                {
                    tokens.remove(&oldest);
                }
            }
        }
        tokens.insert(
            token,
            Entry {
                user,
                used_ms: AtomicU64::new(now_ms),
            },
        );
    }

    /// The user `token` stands for, if it is known and was used within the TTL; a use
    /// restarts its TTL, as etcd's do.
    pub fn user(&self, token: &str, now_ms: u64) -> Option<String> {
        {
            let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
            let entry = tokens.get(token)?;
            let used = entry.used_ms.load(Ordering::Relaxed);
            if now_ms.saturating_sub(used) < self.ttl_ms {
                entry.used_ms.fetch_max(now_ms, Ordering::Relaxed);
                return Some(entry.user.clone());
            }
        }
        self.tokens
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(token);
        None
    }

    /// Forgets every token of `user` (deleted, or a new password).
    pub fn forget_user(&self, user: &str) {
        self.tokens
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, e| e.user != user);
    }

    /// Forgets every token (auth disabled, or the state replaced by a snapshot).
    pub fn clear(&self) {
        self.tokens
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    pub fn len(&self) -> usize {
        self.tokens.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_after_the_ttl_without_use() {
        let table = TokenTable::new(Duration::from_secs(10));
        table.insert("t1".into(), "alice".into(), 1_000);
        assert_eq!(table.user("t1", 5_000).as_deref(), Some("alice"));
        // Used at 5 s: good until 15 s.
        assert_eq!(table.user("t1", 14_000).as_deref(), Some("alice"));
        assert_eq!(table.user("t1", 24_500), None);
        assert!(table.is_empty(), "an expired token is forgotten");
        assert_eq!(table.user("nope", 0), None);
    }

    #[test]
    fn a_users_tokens_are_forgotten_together() {
        let table = TokenTable::new(DEFAULT_TOKEN_TTL);
        table.insert("a1".into(), "alice".into(), 0);
        table.insert("a2".into(), "alice".into(), 0);
        table.insert("b1".into(), "bob".into(), 0);
        table.forget_user("alice");
        assert_eq!(table.len(), 1);
        assert_eq!(table.user("b1", 1).as_deref(), Some("bob"));
    }

    #[test]
    fn simple_tokens_have_etcds_shape() {
        let token = new_simple_token(117);
        let (letters, index) = token.split_once('.').expect("a dot");
        assert_eq!(letters.len(), 16);
        assert!(letters.chars().all(|c| c.is_ascii_alphabetic()));
        assert_eq!(index, "117");
        assert_ne!(new_simple_token(1), new_simple_token(1));
    }
}
