//! `lottery-server --make-keys DIR`: everything a round needs to run on TLS with agency
//! tokens. A CA (`ca.pem`, the only file agencies need besides their own token), the server's
//! certificate signed by it (`server.pem`, `server.key`), one random token per agency
//! (`agency-<k>.token`) and the server's `agencies.keys` (their SHA-256 digests).
//!
//! It never overwrites a file: every name is checked before anything is written, and each file
//! is created with `create_new`, so two runs racing cannot both write one. Secrets are created
//! with mode 0600 from the start (never written first and restricted after).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use time::{Duration, OffsetDateTime};

use crate::server::auth::AgencyKeys;
use crate::wire::token::Token;

/// The names every server certificate holds: the compose service, and loopback.
pub(crate) const BASE_NAMES: [&str; 4] = ["server", "localhost", "127.0.0.1", "::1"];

/// What [`make_keys`] wrote.
#[derive(Debug)]
pub(crate) struct Made {
    pub dir: PathBuf,
    pub files: Vec<String>,
}

/// The files [`make_keys`] writes for `agencies` agencies.
pub(crate) fn file_names(agencies: u32) -> Vec<String> {
    let mut names: Vec<String> = ["ca.pem", "server.pem", "server.key", "agencies.keys"].map(String::from).into();
    names.extend((1..=agencies).map(|k| format!("agency-{k}.token")));
    names
}

/// Writes the keys of a round of `agencies` agencies into `dir` (created, mode 0700, if
/// missing); the server's certificate also names `extra_names`.
///
/// # Errors
/// A file already exists (nothing is written then), a name is not a DNS name or IP address,
/// or a file cannot be written. Said for a person, with the path.
pub(crate) fn make_keys(dir: &Path, agencies: u32, extra_names: &[String]) -> Result<Made, String> {
    let names = file_names(agencies);
    let existing: Vec<&String> = names.iter().filter(|n| dir.join(n).exists()).collect();
    if !existing.is_empty() {
        let list: Vec<&str> = existing.iter().map(|s| s.as_str()).collect();
        return Err(format!("{} already holds {}; refusing to overwrite keys", dir.display(), list.join(", ")));
    }
    let tokens = write_server_keys(dir, agencies, extra_names)?;
    for (k, token) in (1..).zip(&tokens) {
        write_new(dir, &format!("agency-{k}.token"), format!("{}\n", token.expose()).as_bytes(), 0o600)?;
    }
    Ok(Made { dir: dir.to_owned(), files: names })
}

/// Writes `ca.pem`, `server.pem`, `server.key` and `agencies.keys` into `dir` (created, mode
/// 0700, if missing) and returns the agencies' tokens without writing them: `lottery-round`
/// keeps them in memory rather than create a file per agency.
///
/// # Errors
/// As [`make_keys`].
pub(crate) fn write_server_keys(dir: &Path, agencies: u32, extra_names: &[String]) -> Result<Vec<Token>, String> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let certs = certificates(extra_names)?;
    let tokens: Vec<Token> = (0..agencies)
        .map(|_| Token::generate().map_err(|e| format!("no random bytes from the system: {e}")))
        .collect::<Result<_, _>>()?;
    let digests: Vec<_> = tokens.iter().map(Token::digest).collect();
    write_new(dir, "ca.pem", certs.ca.as_bytes(), 0o644)?;
    write_new(dir, "server.pem", certs.server.as_bytes(), 0o644)?;
    write_new(dir, "server.key", certs.server_key.as_bytes(), 0o600)?;
    write_new(dir, "agencies.keys", AgencyKeys::file_text(&digests).as_bytes(), 0o600)?;
    Ok(tokens)
}

/// PEM texts of the CA certificate, the server's certificate and the server's key.
struct Certificates {
    ca: String,
    server: String,
    server_key: String,
}

fn certificates(extra_names: &[String]) -> Result<Certificates, String> {
    let now = OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate().map_err(|e| format!("cannot make the CA's key: {e}"))?;
    let mut ca_params = CertificateParams::default();
    // A name of its own: a verifier that meets another round's CA finds no issuer of that name
    // ("unknown issuer"), rather than a signature that does not check.
    let mut tag = [0u8; 4];
    getrandom::fill(&mut tag).map_err(|e| format!("no random bytes from the system: {e}"))?;
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    ca_params.distinguished_name.push(DnType::CommonName, format!("lottery central CA {tag}"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (ca_params.not_before, ca_params.not_after) = (now - Duration::hours(1), now + Duration::days(3650));
    let ca = ca_params.self_signed(&ca_key).map_err(|e| format!("cannot make the CA: {e}"))?;

    let mut names: Vec<String> = BASE_NAMES.map(String::from).into();
    names.extend(extra_names.iter().map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()));
    let mut params = CertificateParams::new(names).map_err(|e| format!("SERVER_TLS_NAMES: {e}"))?;
    params.distinguished_name.push(DnType::CommonName, "lottery-server");
    (params.not_before, params.not_after) = (now - Duration::hours(1), now + Duration::days(825));
    let server_key = KeyPair::generate().map_err(|e| format!("cannot make the server's key: {e}"))?;
    let issuer = Issuer::new(ca_params, &ca_key);
    let server =
        params.signed_by(&server_key, &issuer).map_err(|e| format!("cannot sign the server's certificate: {e}"))?;
    Ok(Certificates { ca: ca.pem(), server: server.pem(), server_key: server_key.serialize_pem() })
}

/// Creates `dir/name` with `mode`, failing if it exists.
fn write_new(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), String> {
    let path = dir.join(name);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn makes_every_file_with_secrets_private_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let made = make_keys(&keys, 2, &["lottery.example".into()]).unwrap();
        assert_eq!(made.files.len(), 6);
        for name in ["server.key", "agencies.keys", "agency-1.token", "agency-2.token"] {
            let mode = fs::metadata(keys.join(name)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
        }
        let loaded = AgencyKeys::load(&keys.join("agencies.keys"), 2).unwrap();
        let token = Token::new(fs::read_to_string(keys.join("agency-2.token")).unwrap().trim()).unwrap();
        assert!(loaded.verify(2, &token) && !loaded.verify(1, &token));
        let before = fs::read(keys.join("ca.pem")).unwrap();
        let err = make_keys(&keys, 3, &[]).unwrap_err();
        assert!(err.contains("refusing to overwrite"), "{err}");
        assert!(!keys.join("agency-3.token").exists(), "nothing is written when one file exists");
        assert_eq!(fs::read(keys.join("ca.pem")).unwrap(), before);
    }
}
