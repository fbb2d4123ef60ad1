//! The lottery central: a thread-per-connection TCP server that takes bets from betting
//! agencies, stores them durably in `bets.csv`, makes the draw once every agency is done, and
//! tells each agency its own winners.
//!
//! # Layout
//!
//! Modules are grouped by the side they belong to:
//!
//! - [`wire`]: what crosses the network. [`wire::bet`] (a bet, its validation, its CSV rows:
//!   the reference path), [`wire::row`] (the fast path: plain rows checked in place and
//!   copied), [`wire::plain`] (plain CSV lines found eight bytes at a time), [`wire::protocol`]
//!   (requests and replies over bytes; no sockets), [`wire::connection`] (a server's socket and
//!   its read buffer: lines with deadlines, the 8 KiB cap), [`wire::transport`] (plain text or
//!   TLS over one socket, with read and write deadlines), [`wire::token`] (an agency's secret and
//!   its digest).
//! - [`ledger`]: where the round lives, behind the [`ledger::Ledger`] trait. [`ledger::file`]
//!   (the default: the state behind the Mutex, the "winners ready" and group-commit Condvars),
//!   [`ledger::store`] (`bets.csv`: append whole rows, sync, read back, recover a torn tail; its
//!   fast reader is `ledger/scan.rs`), [`ledger::round_file`] (the `DONE`s and the draw across
//!   restarts), [`ledger::lock`] (one server per storage), [`ledger::free_space`]
//!   (`SERVER_MIN_FREE_BYTES`),
//!   [`ledger::postgres`] (the round in PostgreSQL, shared by replicas).
//! - [`server`]: bind, the door (accepts, answers probes, holds connections until they say
//!   more), a pooled thread per connection that does ([`server::pool`]), orderly shutdown;
//!   [`server::session`] is one connection's conversation, request by request;
//!   [`server::auth`] who may speak for an agency; [`server::tls`] the certificate, TLS or
//!   plain by the first byte, handshakes taking turns; [`server::registry`] the live
//!   connections, agencies' sessions and guests; [`server::guest_log`] guest lines kept few;
//!   [`server::probes`] the probes the door answers; [`server::suspects`] addresses that failed.
//! - [`agency`]: the agency client (used by `lottery-agency`, `lottery-round` and the tests);
//!   [`agency::credentials`] its token and the CA it trusts; its bets file is read and batched
//!   in `agency/source.rs`.
//! - [`tools`]: [`tools::local_round`] (`lottery-round`, a whole round in one process),
//!   [`tools::dataset`] (synthetic agency files), [`tools::hostile`] (misbehaving clients),
//!   [`tools::keys`] (`--make-keys`), [`tools::attacks`], [`tools::attack_round`] and
//!   [`tools::botnet`] (`lottery-round --attack`, its attackers in a process of their own).
//! - [`config`]: `config.ini` plus environment into typed settings.
//! - [`logging`]: the log line format of the spec.
//! - [`output`]: stdout and stderr that a closed pipe stops instead of crashing.
//! - [`app`]: what the binaries run, so that `src/bin/*` only wire.

pub mod agency;
pub mod app;
pub mod config;
pub mod ledger;
pub mod logging;
pub mod output;
pub mod server;
pub mod tools;
pub mod wire;
