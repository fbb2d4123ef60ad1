//! The lottery central: a thread-per-connection TCP server that takes bets from betting
//! agencies, stores them durably in `bets.csv`, makes the draw once every agency is done, and
//! tells each agency its own winners.
//!
//! # Layout
//!
//! - [`bet`]: a bet, its validation, its CSV rows (data file, wire, store).
//! - [`protocol`]: requests and replies, parsed and encoded over bytes; no sockets.
//! - [`connection`]: a socket and its read buffer: lines with deadlines, the 8 KiB cap.
//! - [`store`]: `bets.csv`: append whole rows, sync, read back, recover a torn tail.
//! - [`round_file`]: the small file that remembers `DONE`s and the draw across restarts.
//! - [`round`]: the state behind the Mutex, the "winners ready" and group-commit Condvars.
//! - [`session`]: one connection's conversation, request by request.
//! - [`server`]: bind, the accept loop, one thread per connection, orderly shutdown.
//! - [`agency`]: the agency client (used by `lottery-agency`, `lottery-round` and the tests).
//! - [`dataset`]: synthetic agency files for rounds without the course's data.
//! - [`hostile`]: misbehaving clients, for `lottery-round --hostile` and the tests.
//! - [`config`]: `config.ini` plus environment into typed settings.
//! - [`logging`]: the log line format of the spec.
//! - [`local_round`]: `lottery-round`, a whole round in one process, with its report.
//! - [`app`]: what the binaries run, so that `src/bin/*` only wire.

pub mod agency;
pub mod app;
pub mod bet;
pub mod config;
pub mod connection;
pub mod dataset;
pub mod hostile;
pub mod local_round;
pub mod logging;
pub mod protocol;
pub mod round;
pub mod round_file;
pub mod server;
pub mod session;
pub mod store;
