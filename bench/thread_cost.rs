//! What one thread per connection costs on this machine, apart from any work: N threads of the
//! server's stack size, all alive at once, each blocked in one read until its peer hangs up,
//! then joined. Prints the process's CPU (user + system) per thread, to start them and to end
//! them.
//!
//! ```text
//! cargo run --release --example thread_cost [THREADS]     # default 2000
//! ```

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use lottery::bench::{CONNECTION_STACK_SIZE, process_cpu};

fn main() -> io::Result<()> {
    let threads: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("THREADS {n:?}: {e}")))?,
        None => 2000,
    };
    let began = (Instant::now(), process_cpu());
    let (peer, socket) = UnixStream::pair()?;
    let socket = Arc::new(socket);
    let handles = (0..threads)
        .map(|_| {
            let socket = Arc::clone(&socket);
            thread::Builder::new().stack_size(CONNECTION_STACK_SIZE).spawn(move || {
                let _ = (&*socket).read(&mut [0u8; 1]);
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    let started = process_cpu();
    drop(peer);
    for handle in handles {
        let _ = handle.join();
    }
    let ended = process_cpu();
    let per_thread = |seconds: f64| seconds * 1e6 / threads as f64;
    println!(
        "{threads} threads: {:.0} µs of CPU each ({:.0} to start, {:.0} to end), {:.3} s",
        per_thread(ended - began.1),
        per_thread(started - began.1),
        per_thread(ended - started),
        began.0.elapsed().as_secs_f64()
    );
    Ok(())
}
