//! What an agency proves and checks: its token (read from `CLI_TOKEN_FILE`) and the CA it
//! trusts for the server's certificate (`CLI_TLS_CA`), with the name it expects the server to
//! hold (`CLI_TLS_NAME`, else the host part of the address it connects to).

use std::fs;
use std::net::{IpAddr, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use log::warn;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use crate::config::AgencySettings;
use crate::wire::token::{MAX_TOKEN_LEN, Token};

/// The agency's token and TLS configuration, loaded once at start.
#[derive(Clone, Default)]
pub(crate) struct Credentials {
    pub token: Option<Token>,
    pub tls: Option<Arc<ClientConfig>>,
    /// `CLI_TLS_NAME`, when set.
    pub tls_name: Option<String>,
}

const HOW: &str = "make the keys with `lottery-server --make-keys .secrets` and give this agency its token and ca.pem";

impl Credentials {
    /// Reads the token file and the CA that `settings` name.
    ///
    /// # Errors
    /// A file is missing or holds no token / certificate: one line with the path and what to do.
    pub(crate) fn load(settings: &AgencySettings) -> Result<Credentials, String> {
        let token = settings.token_file.as_deref().map(read_token).transpose()?;
        let tls = settings.tls_ca.as_deref().map(client_config).transpose()?;
        Ok(Credentials { token, tls, tls_name: settings.tls_name.clone() })
    }

    /// The name the server's certificate must hold when we connect to `address` (`host:port`).
    ///
    /// # Errors
    /// The name is neither a DNS name nor an IP address.
    pub(crate) fn server_name(&self, address: &str) -> Result<ServerName<'static>, String> {
        let host = match &self.tls_name {
            Some(name) => name.as_str(),
            None => address.rsplit_once(':').map_or(address, |(host, _)| host),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{host:?} cannot be checked against a certificate: {e}"))
    }
}

/// Refuses plain text (no `CLI_TLS_CA`) to a server that is not on this machine: the token,
/// the bets and the winners would cross the network in clear.
///
/// # Errors
/// One of `addresses` (`host:port,…`) is not a loopback address, or a name that does not
/// resolve to loopback only.
pub(crate) fn check_plain_text(addresses: &str, credentials: &Credentials) -> Result<(), String> {
    if credentials.tls.is_some() {
        return Ok(());
    }
    match addresses.split(',').map(str::trim).find(|a| !is_loopback_address(a)) {
        Some(address) => Err(plain_text_refusal(address)),
        None => Ok(()),
    }
}

/// The one line that refuses plain text to `address`.
pub(crate) fn plain_text_refusal(address: &str) -> String {
    format!(
        "CLI_TLS_CA is empty and {address} is not a loopback address: this agency speaks plain text only to a server on this machine, never sending its token or bets across a network in clear; set CLI_TLS_CA to the server's CA (ca.pem, from `lottery-server --make-keys`)"
    )
}

/// `host:port` names this machine: a loopback IP, `localhost`, or a name that resolves to
/// loopback addresses only.
fn is_loopback_address(address: &str) -> bool {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ip.to_canonical().is_loopback();
    }
    if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost") {
        return true;
    }
    match address.to_socket_addrs() {
        Ok(resolved) => {
            let resolved: Vec<_> = resolved.collect();
            !resolved.is_empty() && resolved.iter().all(|a| a.ip().to_canonical().is_loopback())
        }
        Err(_) => false,
    }
}

pub(crate) fn read_token(path: &Path) -> Result<Token, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("CLI_TOKEN_FILE {}: {e}; {HOW}", path.display()))?;
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        warn!(
            "action: token_file | result: success | path: {} | warning: others can read it; chmod 600 it",
            path.display()
        );
    }
    Token::new(text.trim()).ok_or_else(|| {
        format!(
            "CLI_TOKEN_FILE {} does not hold a token (1 to {MAX_TOKEN_LEN} printable characters on one line)",
            path.display()
        )
    })
}

pub(crate) fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, String> {
    let bad = |why: String| format!("CLI_TLS_CA {}: {why}; {HOW}", ca.display());
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(bad("no usable certificate in it".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_goes_to_loopback_only() {
        let plain = Credentials::default();
        for ok in ["127.0.0.1:1", "[::1]:1", "localhost:1", "127.0.0.2:5,[::1]:2"] {
            assert_eq!(check_plain_text(ok, &plain), Ok(()), "{ok}");
        }
        for refused in ["10.0.0.1:1", "server:12345", "127.0.0.1:1,192.0.2.7:1"] {
            let err = check_plain_text(refused, &plain).unwrap_err();
            assert!(err.contains("set CLI_TLS_CA") && !err.contains("127.0.0.1:1,"), "{refused}: {err}");
        }
    }

    #[test]
    fn the_name_to_check_is_the_host_of_the_address_unless_set() {
        let creds = Credentials::default();
        assert_eq!(creds.server_name("server:12345").unwrap().to_str(), "server");
        assert_eq!(creds.server_name("127.0.0.1:1").unwrap().to_str(), "127.0.0.1");
        assert_eq!(creds.server_name("[::1]:1").unwrap().to_str(), "::1");
        let named = Credentials { tls_name: Some("lottery.example".into()), ..Credentials::default() };
        assert_eq!(named.server_name("10.0.0.1:1").unwrap().to_str(), "lottery.example");
    }
}
