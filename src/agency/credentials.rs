//! What an agency proves and checks: its token (read from `CLI_TOKEN_FILE`) and the CA it
//! trusts for the server's certificate (`CLI_TLS_CA`), with the name it expects the server to
//! hold (`CLI_TLS_NAME`, else the host part of the address it connects to).

use std::fs;
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
pub struct Credentials {
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
    pub fn load(settings: &AgencySettings) -> Result<Credentials, String> {
        let token = settings.token_file.as_deref().map(read_token).transpose()?;
        let tls = settings.tls_ca.as_deref().map(client_config).transpose()?;
        Ok(Credentials { token, tls, tls_name: settings.tls_name.clone() })
    }

    /// The name the server's certificate must hold when we connect to `address` (`host:port`).
    ///
    /// # Errors
    /// The name is neither a DNS name nor an IP address.
    pub fn server_name(&self, address: &str) -> Result<ServerName<'static>, String> {
        let host = match &self.tls_name {
            Some(name) => name.as_str(),
            None => address.rsplit_once(':').map_or(address, |(host, _)| host),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{host:?} cannot be checked against a certificate: {e}"))
    }
}

fn read_token(path: &Path) -> Result<Token, String> {
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
    fn the_name_to_check_is_the_host_of_the_address_unless_set() {
        let creds = Credentials::default();
        assert_eq!(creds.server_name("server:12345").unwrap().to_str(), "server");
        assert_eq!(creds.server_name("127.0.0.1:1").unwrap().to_str(), "127.0.0.1");
        assert_eq!(creds.server_name("[::1]:1").unwrap().to_str(), "::1");
        let named = Credentials { tls_name: Some("lottery.example".into()), ..Credentials::default() };
        assert_eq!(named.server_name("10.0.0.1:1").unwrap().to_str(), "lottery.example");
    }
}
