//! The server of a round that `lottery-round` runs in its own process, on a free loopback port,
//! with the credentials its agencies use.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::config::{AgencySettings, MetricsAddress, ServerSettings};
use crate::ledger::Ledger;
use crate::ledger::file::{FileConfig, FileLedger};
use crate::server::operator::Operator;
use crate::server::{self, Limits, Security, ShutdownHandle};
use crate::tools::attacks::Attack;
use crate::tools::round_options::Options;

/// How an attack round's agencies and server prove and check who they are.
pub(crate) struct RoundCredentials {
    /// For the round's own server.
    pub(crate) security: Arc<Security>,
    /// For each agency (index 0 is agency 1): its token file, CA and name to check.
    pub(crate) agencies: Vec<AgencySettings>,
}
/// The server, in this process, on a free loopback port.
pub(crate) struct LocalServer {
    pub(crate) addr: SocketAddr,
    pub(crate) dir: PathBuf,
    pub(crate) shutdown: ShutdownHandle,
    thread: thread::JoinHandle<io::Result<()>>,
    /// The round's page and metrics, served with `--watch`.
    operator: Operator,
}

impl LocalServer {
    pub(crate) fn start(
        opts: &Options,
        settings: &ServerSettings,
        dir: &Path,
        security: Arc<Security>,
    ) -> Result<LocalServer, String> {
        let config = FileConfig {
            agencies: opts.agencies + u32::from(opts.hostile_agency().is_some()),
            storage_path: dir.join("bets.csv"),
            ..FileConfig::from_settings(settings)
        };
        let (ledger, _) = FileLedger::open(config).map_err(|e| e.to_string())?;
        // A crowd of agencies connects at once: room for all of them in the listen queue (the
        // kernel caps it at net.core.somaxconn).
        let backlog = i32::try_from(opts.agencies).unwrap_or(i32::MAX).saturating_add(64).max(1024);
        let listener = server::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), backlog).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let shutdown = ShutdownHandle::new().map_err(|e| e.to_string())?;
        let mut limits = Limits::from_settings(settings);
        // Room for every agency besides the guests (the progress probe, hostile clients).
        if opts.attacks.is_empty() && opts.hostile == 0 {
            // The round's own agencies all arrive at once from 127.0.0.1: none of them is a
            // stranger to shed while it connects (an attack round measures the configured door).
            let crowd = opts.agencies as usize + 64;
            limits.guests.total = limits.guests.total.max(crowd);
            limits.guests.per_ip = limits.guests.per_ip.max(crowd);
        }
        let others = 1 + opts.hostile as usize + limits.guests.total;
        limits.max_connections = limits.max_connections.max(opts.agencies as usize + others);
        if opts.hostile > 0 {
            // Hostile clients are cut off quickly, so that the round is not kept waiting.
            limits.idle_timeout = Duration::from_secs(1);
        }
        let ledger: Arc<dyn Ledger> = Arc::new(ledger);
        // The page, for a person to watch, or a target, for the `metrics` attack.
        let served = opts.watch || opts.attacks.contains(&Attack::Metrics);
        let page =
            served.then_some(MetricsAddress { addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), required: true });
        let operator = Operator::start(page, Arc::clone(&ledger))?;
        let (handle, metrics) = (shutdown.clone(), operator.metrics());
        let thread = thread::Builder::new()
            .name("server".into())
            .spawn(move || server::run(listener, ledger, limits, security, &handle, metrics))
            .map_err(|e| format!("cannot start the server thread: {e}"))?;
        Ok(LocalServer { addr, dir: dir.to_owned(), shutdown, thread, operator })
    }

    /// Where the round's page (and `/metrics`) is served, with `--watch` or `--attack metrics`.
    pub(crate) fn page(&self) -> Option<SocketAddr> {
        self.operator.address()
    }

    pub(crate) fn stop(self) -> Result<(), String> {
        self.shutdown.trigger();
        let joined = self.thread.join();
        self.operator.stop();
        match joined {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("server: {e}")),
            Err(_) => Err("the server thread panicked".into()),
        }
    }
}
