//! Who may call: bearer tokens and a client allow-list of networks, either or both. Every
//! configured mechanism must pass. `/healthz` and `/readyz` stay open. A token has a name and a
//! role (`read` or `operate`); the caller a call was accepted for is who runs and stops record.
//!
//! Tokens are never stored: settings hold the SHA-256 of each token (hex), and a presented token
//! is hashed and compared against every stored hash in constant time, so neither the comparison
//! nor the number of configured tokens tells an attacker how close a guess was.

use std::net::{IpAddr, SocketAddr};

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::settings::{AllowedNetwork, Role, Settings, TokenHash};

/// Paths anyone may call (load balancers, systemd).
pub const OPEN_PATHS: &[&str] = &["/healthz", "/readyz"];

/// The name runs and stops record when the server asks for no token.
pub const LOCAL: &str = "local";

/// A token the server accepts.
#[derive(Debug, Clone)]
struct Token {
    hash: TokenHash,
    name: String,
    role: Role,
}

/// The access rules in force.
#[derive(Debug, Clone, Default)]
pub struct Access {
    tokens: Vec<Token>,
    networks: Vec<AllowedNetwork>,
}

/// Who a call was accepted for: a token's name and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's name, or [`LOCAL`] when no token is configured.
    pub name: String,
    pub role: Role,
}

impl Identity {
    /// The caller when the server asks for no token.
    pub fn local() -> Identity {
        Identity {
            name: LOCAL.to_owned(),
            role: Role::Operate,
        }
    }

    /// Whether this caller may run and stop tasks.
    pub fn may_operate(&self) -> bool {
        self.role == Role::Operate
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or not one of ours (HTTP 401).
    Token,
    /// The peer is outside the allow-list (HTTP 403).
    Network,
}

/// Whether a call runs or stops tasks, which only `operate` tokens may.
pub fn operates(method: &actix_web::http::Method, path: &str) -> bool {
    *method == actix_web::http::Method::POST
        && matches!(path, "/api/run" | "/api/parallel_run" | "/api/stop")
}

/// Whether a path is the console's, which takes a token at its login and then a session cookie
/// (the allow-list still applies first).
pub fn is_console(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// Why the access rules could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read auth_token_file {path}: {source}")]
    ReadTokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("auth_token_file {path}, line {line}: {message}")]
    BadTokenFileLine {
        path: String,
        line: usize,
        message: String,
    },
}

/// SHA-256 of a token, as the settings hold it (shown as 64 hex digits).
pub fn hash_token(token: &str) -> TokenHash {
    TokenHash(Sha256::digest(token.as_bytes()).into())
}

/// Whether `ip` is in `net`; an IPv4-mapped IPv6 address counts as its IPv4 address.
fn contains(net: &AllowedNetwork, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    net.0.contains(&ip)
}

/// The token of an `Authorization` header value: the `Bearer` scheme, in any case (RFC 7235
/// makes the scheme case-insensitive), then the token.
fn bearer(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl Access {
    /// The rules of the settings: `auth_tokens`, `auth_token_hashes` and the hashes in
    /// `auth_token_file` (one per line, `#` comments; operate), `auth_read_token_hashes` (read),
    /// and `allow_networks`.
    pub fn from_settings(s: &Settings) -> Result<Access, AuthError> {
        let mut token_hashes = s.auth_token_hashes.clone();
        let read_hashes = s.auth_read_token_hashes.iter();
        if !s.auth_token_file.is_empty() {
            let path = s.auth_token_file.clone();
            let text =
                std::fs::read_to_string(&path).map_err(|source| AuthError::ReadTokenFile {
                    path: path.clone(),
                    source,
                })?;
            for (i, line) in text.lines().enumerate() {
                let line_text = line.trim();
                if line_text.is_empty() || line_text.starts_with('#') {
                    continue;
                }
                let hash = line_text.parse::<TokenHash>().map_err(|message| {
                    AuthError::BadTokenFileLine {
                        path: path.clone(),
                        line: i + 1,
                        message,
                    }
                })?;
                token_hashes.push(hash);
            }
        }
        let unnamed = |hash: &TokenHash, role| Token {
            hash: *hash,
            name: format!("token-{}", &hash.to_string()[..8]),
            role,
        };
        let tokens = s
            .auth_tokens
            .iter()
            .map(|t| Token {
                hash: t.sha256,
                name: t.name.clone(),
                role: t.role,
            })
            .chain(token_hashes.iter().map(|h| unnamed(h, Role::Operate)))
            .chain(read_hashes.map(|h| unnamed(h, Role::Read)))
            .collect();
        Ok(Access {
            tokens,
            networks: s.allow_networks.clone(),
        })
    }

    /// Whether any mechanism is configured.
    pub fn is_configured(&self) -> bool {
        !self.tokens.is_empty() || !self.networks.is_empty()
    }

    /// Whether callers must present a token (the console then asks for one).
    pub fn wants_token(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Checks a call from `peer` with this `Authorization` header value; who it is for.
    pub fn check(
        &self,
        peer: Option<IpAddr>,
        authorization: Option<&[u8]>,
    ) -> Result<Identity, Refusal> {
        self.check_network(peer)?;
        if self.tokens.is_empty() {
            return Ok(Identity::local());
        }
        let token = authorization.and_then(bearer).ok_or(Refusal::Token)?;
        self.token(token).ok_or(Refusal::Token)
    }

    /// Checks only the allow-list (the console then asks for a token itself).
    pub fn check_network(&self, peer: Option<IpAddr>) -> Result<(), Refusal> {
        if self.networks.is_empty()
            || peer.is_some_and(|ip| self.networks.iter().any(|n| contains(n, ip)))
        {
            Ok(())
        } else {
            Err(Refusal::Network)
        }
    }

    /// The caller a presented token stands for, if it is one of ours.
    pub fn token(&self, token: &str) -> Option<Identity> {
        let presented = hash_token(token);
        // Every stored hash is compared in full and in constant time, whatever matched before;
        // the index of the match is selected the same way.
        let (matched, index) = self.tokens.iter().enumerate().fold(
            (subtle::Choice::from(0), 0u32),
            |(any, index), (i, stored)| {
                let this = stored.hash.0.ct_eq(&presented.0);
                let i = u32::try_from(i).unwrap_or(u32::MAX);
                (any | this, u32::conditional_select(&index, &i, this))
            },
        );
        if !bool::from(matched) {
            return None;
        }
        let t = self.tokens.get(usize::try_from(index).ok()?)?;
        Some(Identity {
            name: t.name.clone(),
            role: t.role,
        })
    }
}

/// Refuses to serve a non-loopback address with no protection, unless the settings say so
/// explicitly; the warning to log at every start when they do.
pub fn check_exposure(
    settings: &Settings,
    access: &Access,
    addr: SocketAddr,
) -> Result<Option<String>, String> {
    if addr.ip().is_loopback() || access.is_configured() {
        return Ok(None);
    }
    if settings.allow_unauthenticated {
        return Ok(Some(format!(
            "serving {addr} with no authentication (allow_unauthenticated = true): anyone who reaches it can run playbooks on the nodes"
        )));
    }
    Err(format!(
        "refusing to serve {addr} without authentication: set auth_token_hashes, auth_token_file or allow_networks, or allow_unauthenticated = true"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(tokens: &[&str], nets: &[&str]) -> Access {
        let mut s = Settings::defaults();
        s.auth_token_hashes = tokens.iter().map(|t| hash_token(t)).collect();
        s.allow_networks = nets.iter().map(|n| n.parse().unwrap()).collect();
        Access::from_settings(&s).unwrap()
    }

    fn net(text: &str) -> AllowedNetwork {
        text.parse().unwrap()
    }

    #[test]
    fn networks_match_by_prefix() {
        let n = net("10.1.0.0/16");
        assert!(contains(&n, "10.1.200.3".parse().unwrap()));
        assert!(!contains(&n, "10.2.0.1".parse().unwrap()));
        assert!(contains(&n, "::ffff:10.1.0.9".parse().unwrap()));
        assert!(contains(&net("0.0.0.0/0"), "8.8.8.8".parse().unwrap()));
        assert!(contains(&net("::1"), "::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<AllowedNetwork>().is_err());
        assert!("nope".parse::<AllowedNetwork>().is_err());
    }

    #[test]
    fn tokens_and_networks_must_all_pass() {
        let a = access(&["s3cret", "other"], &["127.0.0.0/8"]);
        let local = Some("127.0.0.1".parse().unwrap());
        assert!(a.check(local, Some(b"Bearer s3cret")).is_ok());
        assert!(a.check(local, Some(b"Bearer other")).is_ok());
        assert_eq!(a.check(local, Some(b"Bearer wrong")), Err(Refusal::Token));
        assert_eq!(a.check(local, Some(b"s3cret")), Err(Refusal::Token));
        assert_eq!(a.check(local, Some(b"Bearer ")), Err(Refusal::Token));
        assert_eq!(a.check(local, None), Err(Refusal::Token));
        let far = Some("10.0.0.1".parse().unwrap());
        assert_eq!(a.check(far, Some(b"Bearer s3cret")), Err(Refusal::Network));
        let open = Access::default().check(far, None).unwrap();
        assert_eq!((open.name.as_str(), open.role), (LOCAL, Role::Operate));
    }

    #[test]
    fn a_token_is_its_name_and_role() {
        let mut s = Settings::defaults();
        s.auth_token_hashes = vec![hash_token("op")];
        s.auth_read_token_hashes = vec![hash_token("look")];
        s.auth_tokens = vec![crate::settings::NamedToken {
            name: "orchestrator".into(),
            sha256: hash_token("orch"),
            role: Role::Operate,
        }];
        let a = Access::from_settings(&s).unwrap();
        let who = |t: &str| a.token(t).map(|c| (c.name, c.role));
        assert_eq!(who("orch"), Some(("orchestrator".into(), Role::Operate)));
        let op_name = format!("token-{}", &hash_token("op").to_string()[..8]);
        assert_eq!(who("op"), Some((op_name, Role::Operate)));
        assert_eq!(who("look").map(|w| w.1), Some(Role::Read));
        assert!(!a.token("look").unwrap().may_operate());
        assert_eq!(who("nope"), None);
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_is_not() {
        let a = access(&["s3cret"], &[]);
        for header in [&b"bearer s3cret"[..], b"BEARER s3cret", b"BeArEr s3cret"] {
            assert!(a.check(None, Some(header)).is_ok());
        }
        assert_eq!(a.check(None, Some(b"Bearer S3CRET")), Err(Refusal::Token));
        assert_eq!(a.check(None, Some(b"Basic s3cret")), Err(Refusal::Token));
    }

    #[test]
    fn exposure_needs_protection_or_consent() {
        let mut s = Settings::defaults();
        let open = Access::default();
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(
            check_exposure(&s, &open, "127.0.0.1:8080".parse().unwrap()),
            Ok(None)
        );
        assert!(check_exposure(&s, &open, public).is_err());
        assert_eq!(check_exposure(&s, &access(&["t"], &[]), public), Ok(None));
        s.allow_unauthenticated = true;
        assert!(check_exposure(&s, &open, public).unwrap().is_some());
    }

    #[test]
    fn a_bad_line_of_the_token_file_is_named() {
        let dir = std::env::temp_dir().join(format!("dl-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        let good = hash_token("a").to_string();
        std::fs::write(&path, format!("# orchestrator\n{good}\nnot-a-hash\n")).unwrap();
        let mut s = Settings::defaults();
        s.auth_token_file = path.display().to_string();
        let err = Access::from_settings(&s).unwrap_err().to_string();
        assert!(
            err.contains("line 3") && err.contains("64 hex digits"),
            "{err}"
        );
        std::fs::write(&path, format!("{good}\n")).unwrap();
        assert!(Access::from_settings(&s).unwrap().is_configured());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
