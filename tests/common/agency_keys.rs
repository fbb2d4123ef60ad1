//! The settings that make a `lottery-agency` use the keys.

use super::keys::Keys;

impl Keys {
    /// Agency `id`'s settings for TLS and its token, to pass to [`agency`].
    pub fn agency_env(&self, id: u32) -> Vec<(String, String)> {
        vec![
            ("CLI_TOKEN_FILE".into(), self.path(&format!("agency-{id}.token"))),
            ("CLI_TLS_CA".into(), self.path("ca.pem")),
        ]
    }
}
