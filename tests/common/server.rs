//! A `lottery-server` started for one test, on a port the system chose.

use std::path::{Path, PathBuf};

use super::process::{Proc, command};

/// The server's binary.
pub const SERVER: &str = env!("CARGO_BIN_EXE_lottery-server");

/// A `lottery-server` on `127.0.0.1`, on a port the system chose, storing into a temporary
/// directory. Killed (SIGKILL) and reaped on `Drop` if still running.
pub struct TestServer {
    // Dropped first: the process goes before its directory.
    pub proc: Proc,
    pub port: u16,
    pub dir: PathBuf,
    pub(super) _tmp: Option<tempfile::TempDir>,
}

impl TestServer {
    /// A server storing into `dir/bets.csv` on `port` (0: any), for a restart on the same files.
    pub fn start_in(dir: &Path, agencies: u32, port: u16, env: &[(&str, &str)]) -> TestServer {
        let agencies = agencies.to_string();
        let port_text = port.to_string();
        let storage = dir.join("bets.csv");
        let storage = storage.to_str().expect("UTF-8 temp path");
        // Plain text and protected mode unless the test says otherwise (see `Keys`): most tests
        // speak the protocol by hand from loopback, as the `nc` session of docs/protocol.md does.
        let mut vars = vec![
            ("SERVER_IP", "127.0.0.1"),
            ("SERVER_PORT", port_text.as_str()),
            ("SERVER_AGENCIES", agencies.as_str()),
            ("SERVER_STORAGE_PATH", storage),
            ("SERVER_AGENCY_KEYS", ""),
            ("SERVER_TLS_CERT", ""),
            ("SERVER_TLS_KEY", ""),
            ("SERVER_METRICS_ADDRESS", ""),
        ];
        vars.extend_from_slice(env);
        let mut proc = Proc::spawn("lottery-server", command(SERVER, dir, &vars));
        let listen = proc.logs.wait_for("action: listen | result: success");
        let address = listen
            .split(" | ")
            .find_map(|f| f.strip_prefix("address: "))
            .unwrap_or_else(|| panic!("no address in {listen:?}"));
        let port: u16 = address.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("a port in the listen line");
        let server = TestServer { proc, port, dir: dir.to_owned(), _tmp: None };
        assert_eq!(server.address(), address, "the server listens where the tests connect");
        let bets = format!("path: {} |", server.bets_path().display());
        let opened = server.proc.logs.seen.iter().find(|l| l.contains("action: open_storage | result: success"));
        // A server on PostgreSQL (`SERVER_DATABASE_URL`) names no file.
        if let Some(opened) = opened.filter(|l| l.contains(" path: ")) {
            assert!(opened.contains(&bets), "the server stores where the tests read: {opened}");
        }
        server
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn bets_path(&self) -> PathBuf {
        self.dir.join("bets.csv")
    }
}
