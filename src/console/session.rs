//! Who is looking: a browser's session. With tokens configured a browser logs in once with a
//! token (`/ui/login`) and then carries an opaque session id in an `HttpOnly`, `SameSite=Strict`
//! cookie that expires; the session holds the token's identity (name and role) and a token of its
//! own that every form posts back (the console's defence against cross-site requests, with the
//! cookie's `SameSite` and an `Origin` check). Without tokens every browser gets a session of
//! `local` at its first page, for that form token. Sessions live in this process: a restart logs
//! everyone out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::api::auth::Identity;

/// The cookie's name.
pub const COOKIE: &str = "downlink_session";
/// How long a session lasts from its login.
pub const LIFE: Duration = Duration::from_secs(12 * 3600);
/// Most sessions held; past it the one closest to expiring goes first.
const MOST: usize = 10_000;

/// One browser's session.
#[derive(Debug, Clone)]
pub struct Session {
    pub who: Identity,
    /// The token every form of this session posts back.
    pub form_token: String,
    expires: Instant,
}

impl Session {
    /// Whether a posted form token is this session's (compared in constant time).
    pub fn owns_form(&self, posted: &str) -> bool {
        bool::from(self.form_token.as_bytes().ct_eq(posted.as_bytes()))
    }
}

/// Every session of this server.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

/// `n` random bytes as hex, from the OS generator; `None` if it fails (no weaker fallback).
fn random_hex(n: usize) -> Option<String> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).ok()?;
    Some(hex::encode(bytes))
}

impl Sessions {
    /// A new session for `who`: its id (the cookie's value) and the session.
    pub fn open(&self, who: Identity) -> Option<(String, Session)> {
        let id = random_hex(32)?;
        let session = Session {
            who,
            form_token: random_hex(16)?,
            expires: Instant::now() + LIFE,
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        map.retain(|_, s| s.expires > now);
        if map.len() >= MOST {
            if let Some(first) = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                map.remove(&first);
            }
        }
        map.insert(id.clone(), session.clone());
        Some((id, session))
    }

    /// The live session of this id.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends a session (logout).
    pub fn close(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Role;

    #[test]
    fn a_session_is_found_by_its_id_until_closed() {
        let sessions = Sessions::default();
        let who = Identity {
            name: "ops".into(),
            role: Role::Operate,
        };
        let (id, s) = sessions.open(who.clone()).unwrap();
        assert_eq!(id.len(), 64);
        assert_eq!(sessions.get(&id).map(|s| s.who), Some(who));
        assert!(s.owns_form(&s.form_token));
        assert!(!s.owns_form("forged"));
        let (other, _) = sessions.open(s.who.clone()).unwrap();
        assert_ne!(id, other);
        sessions.close(&id);
        assert!(sessions.get(&id).is_none());
        assert!(sessions.get("nope").is_none());
    }
}
