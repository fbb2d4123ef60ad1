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

/// This process's CPU time (user + system) so far, its ended threads' included, in seconds.
#[must_use]
pub fn process_cpu() -> f64 {
    // SAFETY: getrusage writes one `rusage` through the pointer it is given, which is valid.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &raw mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// This thread's CPU time (user + system) so far, in seconds, to the nanosecond: fine enough
/// for spans of microseconds.
#[must_use]
pub fn thread_cpu() -> f64 {
    // SAFETY: clock_gettime writes one `timespec` through the pointer it is given, which is valid.
    let now = unsafe {
        let mut now = std::mem::zeroed::<libc::timespec>();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut now);
        now
    };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}
