//! An agency's secret token: what `HELLO <agency> <token>` carries, what `agency-<k>.token`
//! holds, and the SHA-256 digest the server keeps in `agencies.keys` instead of the token.
//!
//! A token is 256 random bits written as 64 hex digits. With that much entropy a single
//! SHA-256 is enough to keep the server's file useless to a thief (nothing to brute-force, so
//! no slow password hash is needed), and digests are compared in constant time.
//! `Debug` never shows the token, so a `{:?}` of a request cannot leak it into a log.

use std::fmt;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// Random bytes in a token made by `--make-keys` (the contract asks for at least 128 bits).
pub(crate) const TOKEN_BYTES: usize = 32;

/// Longest token accepted on the wire or from a file: bounds what a client makes us hash.
pub(crate) const MAX_TOKEN_LEN: usize = 256;

/// A secret token, as presented by an agency.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

/// The SHA-256 of a token: what the server stores and compares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest(pub [u8; 32]);

impl Token {
    /// A token from text: printable ASCII without spaces, 1 to [`MAX_TOKEN_LEN`] bytes.
    pub fn new(text: &str) -> Option<Token> {
        let ok = !text.is_empty() && text.len() <= MAX_TOKEN_LEN && text.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| Token(text.to_owned()))
    }

    /// A fresh random token.
    ///
    /// # Errors
    /// The operating system's random source failed.
    pub fn generate() -> Result<Token, getrandom::Error> {
        let mut bytes = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut bytes)?;
        Ok(Token(hex(&bytes)))
    }

    /// The token's text, to write into its file or a `HELLO` line.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn digest(&self) -> TokenDigest {
        TokenDigest(Sha256::digest(self.0.as_bytes()).into())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl TokenDigest {
    /// Whether `token` hashes to this digest, in time that does not depend on where they differ.
    pub fn matches(&self, token: &Token) -> bool {
        self.0.ct_eq(&token.digest().0).into()
    }

    /// `sha256:<64 hex digits>`, as a line of `agencies.keys` holds it.
    pub fn to_text(self) -> String {
        format!("sha256:{}", hex(&self.0))
    }

    /// The inverse of [`TokenDigest::to_text`].
    pub fn from_text(text: &str) -> Option<TokenDigest> {
        let hexits = text.strip_prefix("sha256:")?.as_bytes();
        if hexits.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hexits.chunks(2)) {
            let pair = std::str::from_utf8(pair).ok()?;
            *byte = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(TokenDigest(out))
    }
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenDigest(..)")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_is_256_bits_of_hex_and_matches_only_its_digest() {
        let (a, b) = (Token::generate().unwrap(), Token::generate().unwrap());
        assert_eq!(a.expose().len(), 2 * TOKEN_BYTES);
        assert!(a.expose().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(a.digest().matches(&a));
        assert!(!a.digest().matches(&b));
        let text = a.digest().to_text();
        assert_eq!(TokenDigest::from_text(&text), Some(a.digest()));
        assert_eq!(TokenDigest::from_text("sha256:zz"), None);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let token = Token::new("s3cret-value").unwrap();
        assert!(!format!("{token:?} {:?}", token.digest()).contains("s3cret"));
        assert_eq!(Token::new("has space"), None);
        assert_eq!(Token::new(""), None);
    }
}
