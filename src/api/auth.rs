//! Who may call: bearer tokens and a client allow-list of networks, either or both. Every
//! configured mechanism must pass. `/healthz` and `/readyz` stay open.
//!
//! Tokens are never stored: settings hold the SHA-256 of each token (hex), and a presented token
//! is hashed and compared against every stored hash in constant time, so neither the comparison
//! nor the number of configured tokens tells an attacker how close a guess was.

use std::net::{IpAddr, SocketAddr};

use sha2::{Digest, Sha256};

use crate::settings::{Settings, SettingsError};

/// Paths anyone may call (load balancers, systemd).
pub const OPEN_PATHS: &[&str] = &["/healthz", "/readyz"];

/// A network of the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Reads `10.0.0.0/8`, `2001:db8::/32` or a single address.
    pub fn parse(text: &str) -> Result<Network, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not an address or network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{text}` has a bad prefix length"))?,
            None => max,
        };
        Ok(Network { addr, prefix })
    }

    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => (
                u128::from(u32::from(n)) << 96,
                u128::from(u32::from(i)) << 96,
                self.prefix,
            ),
            (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), self.prefix),
            _ => return false,
        };
        let mask = if bits == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(bits))
        };
        a & mask == b & mask
    }
}

/// The access rules in force.
#[derive(Debug, Clone, Default)]
pub struct Access {
    token_hashes: Vec<[u8; 32]>,
    networks: Vec<Network>,
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or not one of ours (HTTP 401).
    Token,
    /// The peer is outside the allow-list (HTTP 403).
    Network,
}

/// SHA-256 of a token as lowercase hex, as the settings hold it.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Access {
    /// The rules of the settings: `auth_token_hashes`, the hashes in `auth_token_file` (one per
    /// line, `#` comments) and `allow_networks`.
    pub fn from_settings(s: &Settings) -> Result<Access, SettingsError> {
        let bad = |m: String| SettingsError::Invalid(m);
        let mut hashes: Vec<String> = s.auth_token_hashes.clone();
        if !s.auth_token_file.is_empty() {
            let text = std::fs::read_to_string(&s.auth_token_file).map_err(|e| {
                bad(format!(
                    "cannot read auth_token_file {}: {e}",
                    s.auth_token_file
                ))
            })?;
            hashes.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        let token_hashes = hashes
            .iter()
            .map(|h| {
                parse_hash(h).ok_or_else(|| {
                    bad("auth token hashes must be 64 hex digits (SHA-256; see `downlink hash-token`)".into())
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let networks = s
            .allow_networks
            .iter()
            .map(|n| Network::parse(n).map_err(|e| bad(format!("allow_networks: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Access {
            token_hashes,
            networks,
        })
    }

    /// Whether any mechanism is configured.
    pub fn is_configured(&self) -> bool {
        !self.token_hashes.is_empty() || !self.networks.is_empty()
    }

    /// Checks a call from `peer` with this `Authorization` header value.
    pub fn check(&self, peer: Option<IpAddr>, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        if !self.networks.is_empty() {
            let inside = peer.is_some_and(|ip| self.networks.iter().any(|n| n.contains(ip)));
            if !inside {
                return Err(Refusal::Network);
            }
        }
        if !self.token_hashes.is_empty() {
            let token = authorization
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .ok_or(Refusal::Token)?;
            let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            // Every stored hash is compared in full, whatever matched before.
            let mut matched = 0u8;
            for stored in &self.token_hashes {
                let diff = stored
                    .iter()
                    .zip(presented.iter())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b));
                matched |= u8::from(diff == 0);
            }
            if matched == 0 {
                return Err(Refusal::Token);
            }
        }
        Ok(())
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
        s.allow_networks = nets.iter().map(|n| n.to_string()).collect();
        Access::from_settings(&s).unwrap()
    }

    #[test]
    fn networks_match_by_prefix() {
        let n = Network::parse("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(Network::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Network::parse("::1")
            .unwrap()
            .contains("::1".parse().unwrap()));
        assert!(Network::parse("10.0.0.0/33").is_err());
        assert!(Network::parse("nope").is_err());
    }

    #[test]
    fn tokens_and_networks_must_all_pass() {
        let a = access(&["s3cret", "other"], &["127.0.0.0/8"]);
        let local = Some("127.0.0.1".parse().unwrap());
        assert_eq!(a.check(local, Some(b"Bearer s3cret")), Ok(()));
        assert_eq!(a.check(local, Some(b"Bearer other")), Ok(()));
        assert_eq!(a.check(local, Some(b"Bearer wrong")), Err(Refusal::Token));
        assert_eq!(a.check(local, Some(b"s3cret")), Err(Refusal::Token));
        assert_eq!(a.check(local, None), Err(Refusal::Token));
        let far = Some("10.0.0.1".parse().unwrap());
        assert_eq!(a.check(far, Some(b"Bearer s3cret")), Err(Refusal::Network));
        assert_eq!(Access::default().check(far, None), Ok(()));
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
    fn bad_hashes_are_refused() {
        let mut s = Settings::defaults();
        s.auth_token_hashes = vec!["abc".into()];
        assert!(Access::from_settings(&s).is_err());
    }
}
