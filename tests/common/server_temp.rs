//! A `lottery-server` in a temporary directory of its own.

use super::server::TestServer;

impl TestServer {
    /// A server for `agencies` agencies in a fresh temporary directory, with extra settings.
    pub fn start(agencies: u32, env: &[(&str, &str)]) -> TestServer {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let mut server = TestServer::start_in(tmp.path(), agencies, 0, env);
        server._tmp = Some(tmp);
        server
    }
}
