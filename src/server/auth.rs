//! Who may speak for an agency: the token hashes of `agencies.keys`, checked in constant time,
//! and the rules of protected mode (no keys: `HELLO` only from loopback).
//!
//! `agencies.keys` holds one line per agency, `<agency> sha256:<hex>`, and `#` comments. It
//! never holds a token: a thief who reads it cannot speak for anyone.

use std::fs;
use std::net::IpAddr;
use std::path::Path;

use crate::wire::token::{Token, TokenDigest};

/// The token digest of every agency of the round (index 0 is agency 1).
#[derive(Debug, Clone)]
pub struct AgencyKeys {
    digests: Vec<TokenDigest>,
}

impl AgencyKeys {
    /// Reads `path`, which must name a digest for each of agencies `1..=agencies`.
    ///
    /// # Errors
    /// The file cannot be read, a line is not `<agency> sha256:<hex>`, or an agency is missing.
    pub fn load(path: &Path, agencies: u32) -> Result<AgencyKeys, String> {
        let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut digests: Vec<Option<TokenDigest>> = vec![None; agencies as usize];
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || format!("{} line {}: expected \"<agency> sha256:<64 hex digits>\"", path.display(), n + 1);
            let (agency, digest) = line.split_once(' ').ok_or_else(bad)?;
            let agency: u32 = agency.parse().map_err(|_| bad())?;
            let digest = TokenDigest::from_text(digest.trim()).ok_or_else(bad)?;
            if let Some(slot) = agency.checked_sub(1).and_then(|i| digests.get_mut(i as usize)) {
                *slot = Some(digest);
            }
        }
        let missing: Vec<String> =
            digests.iter().zip(1..).filter(|(d, _)| d.is_none()).map(|(_, k)| k.to_string()).collect();
        if !missing.is_empty() {
            return Err(format!(
                "{} has no key for agency {} of the {agencies} in SERVER_AGENCIES",
                path.display(),
                missing.join(", ")
            ));
        }
        Ok(AgencyKeys { digests: digests.into_iter().flatten().collect() })
    }

    /// The text of an `agencies.keys` file for these digests (agency 1 first).
    pub fn file_text(digests: &[TokenDigest]) -> String {
        let mut text =
            String::from("# lottery-server agency keys: the SHA-256 of each agency's token, never a token\n");
        for (k, digest) in (1..).zip(digests) {
            text.push_str(&format!("{k} {}\n", digest.to_text()));
        }
        text
    }

    /// Whether `token` is `agency`'s, compared in constant time.
    pub fn verify(&self, agency: u32, token: &Token) -> bool {
        let digest = agency.checked_sub(1).and_then(|i| self.digests.get(i as usize));
        digest.is_some_and(|d| d.matches(token))
    }
}

/// Why a `HELLO` is refused, for the `ERR AUTH` reply. Never mentions the token presented.
pub(crate) fn check_hello(
    keys: Option<&AgencyKeys>,
    agency: u32,
    token: Option<&Token>,
    peer: IpAddr,
) -> Result<(), String> {
    match (keys, token) {
        (Some(_), None) => Err(format!("agency {agency} must give its token: HELLO {agency} <token>")),
        (Some(keys), Some(token)) if keys.verify(agency, token) => Ok(()),
        (Some(_), Some(_)) => Err(format!("that is not agency {agency}'s token")),
        (None, _) if is_loopback(peer) => Ok(()),
        (None, _) => Err("this server has no agency keys (protected mode): HELLO only from loopback".into()),
    }
}

/// Loopback, also as an IPv4-mapped IPv6 address (`::ffff:127.0.0.1` on a dual-stack socket).
pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(tokens: &[Token]) -> (tempfile::TempDir, AgencyKeys) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agencies.keys");
        let digests: Vec<TokenDigest> = tokens.iter().map(Token::digest).collect();
        fs::write(&path, AgencyKeys::file_text(&digests)).unwrap();
        let keys = AgencyKeys::load(&path, tokens.len() as u32).unwrap();
        (dir, keys)
    }

    #[test]
    fn a_token_opens_only_its_own_agency() {
        let tokens = [Token::generate().unwrap(), Token::generate().unwrap()];
        let (_dir, keys) = keys(&tokens);
        let remote: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(check_hello(Some(&keys), 1, Some(&tokens[0]), remote), Ok(()));
        assert!(check_hello(Some(&keys), 1, Some(&tokens[1]), remote).is_err());
        assert!(check_hello(Some(&keys), 2, None, remote).is_err());
        assert!(check_hello(Some(&keys), 3, Some(&tokens[0]), remote).is_err());
    }

    #[test]
    fn protected_mode_takes_hello_only_from_loopback() {
        for ip in ["127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.0.2"] {
            assert_eq!(check_hello(None, 1, None, ip.parse().unwrap()), Ok(()), "{ip}");
        }
        assert!(check_hello(None, 1, None, "10.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn a_keys_file_must_cover_every_agency_and_be_well_formed() {
        let (dir, _) = keys(&[Token::generate().unwrap()]);
        let path = dir.path().join("agencies.keys");
        let err = AgencyKeys::load(&path, 3).unwrap_err();
        assert!(err.contains("no key for agency 2, 3"), "{err}");
        fs::write(&path, "1 md5:abc\n").unwrap();
        let err = AgencyKeys::load(&path, 1).unwrap_err();
        assert!(err.contains("line 1: expected"), "{err}");
    }
}
