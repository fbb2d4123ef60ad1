//! TLS keys and agency tokens made by the real `lottery-server --make-keys`.

use std::path::{Path, PathBuf};

use super::process::command;
use super::run::run_to_exit;
use super::server::SERVER;

/// Keys made by the real `lottery-server --make-keys`, and the settings that use them.
pub struct Keys {
    pub dir: PathBuf,
}

impl Keys {
    /// Runs `lottery-server --make-keys DIR` for `agencies` agencies; panics if it fails.
    pub fn make(dir: &Path, agencies: u32) -> Keys {
        let agencies = agencies.to_string();
        let cmd = {
            let mut cmd = command(SERVER, dir, &[("SERVER_AGENCIES", agencies.as_str())]);
            cmd.arg("--make-keys").arg(dir.join("keys"));
            cmd
        };
        let (status, stdout, stderr) = run_to_exit("lottery-server --make-keys", cmd);
        assert!(status.success(), "--make-keys failed: {stderr}");
        assert!(stdout.starts_with("wrote ca.pem"), "{stdout}");
        Keys { dir: dir.join("keys") }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().expect("UTF-8 temp path").to_owned()
    }

    /// Agency `id`'s token (for a test's own TLS client; never printed).
    pub fn token(&self, id: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("agency-{id}.token"))).expect("token file").trim().to_owned()
    }
}

/// `[(String, String)]` as the `[(&str, &str)]` that [`TestServer::start`] and [`agency`] take.
pub fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}
