//! What the measurements in `bench/` (cargo examples) take from the product, so that they
//! measure its own choices rather than copies that could drift from them.

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, ServerConfig};

/// The stack of a server connection's thread.
pub const CONNECTION_STACK_SIZE: usize = crate::server::STACK_SIZE;

/// The server's and an agency's TLS configurations, as `lottery-server` and `lottery-agency`
/// make them, from a new CA and server certificate written into `dir` (as
/// `lottery-server --make-keys` writes them).
///
/// # Errors
/// A file cannot be written or read back.
pub fn tls_configs(dir: &Path) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), String> {
    crate::tools::keys::write_server_keys(dir, 1, &[])?;
    let server = crate::server::tls::server_config(&dir.join("server.pem"), &dir.join("server.key"))?;
    let agency = crate::agency::credentials::client_config(&dir.join("ca.pem"))?;
    Ok((server, agency))
}
