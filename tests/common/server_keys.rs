//! The settings that make a `lottery-server` use the keys.

use super::keys::Keys;

impl Keys {
    /// The server's settings for TLS and tokens, to pass to [`TestServer::start`].
    pub fn server_env(&self) -> Vec<(String, String)> {
        vec![
            ("SERVER_AGENCY_KEYS".into(), self.path("agencies.keys")),
            ("SERVER_TLS_CERT".into(), self.path("server.pem")),
            ("SERVER_TLS_KEY".into(), self.path("server.key")),
        ]
    }
}
