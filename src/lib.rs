//! The lottery central: a thread-per-connection TCP server that takes bets from betting
//! agencies, stores them durably in `bets.csv`, makes the draw once every agency is done, and
//! tells each agency its own winners.
//!
//! # Layout
//!
//! This is the project's one map of its modules; the docs link here. Modules are grouped by
//! the side they belong to (private ones are named by their file):
//!
//! - [`wire`]: what crosses the network, the same for both sides. [`wire::bet`] (a bet, its
//!   validation, its CSV rows for the data file, the wire and the store: the reference path),
//!   [`wire::row`] (the fast path: a plain row checked in place and copied, else the
//!   reference), `wire::plain` (plain CSV lines found eight bytes at a time: commas, quotes,
//!   control bytes), [`wire::protocol`] (requests and replies parsed and encoded over bytes; no
//!   sockets), `wire::connection` (a socket and its read buffer: lines with deadlines, the
//!   8 KiB cap, replies), `wire::transport` (plain text or TLS over one socket, with read and
//!   write deadlines; the door's non-blocking peek and send), `wire::token` (an agency's
//!   secret and its SHA-256 digest; `Debug` never shows it).
//! - `ledger`: where the round lives, behind the `ledger::Ledger` trait (what the server
//!   needs of the storage, both back-ends). `ledger::file` (the default: the state behind the
//!   `Mutex`, the "winners ready" and group-commit `Condvar`s), `ledger::store` (`bets.csv`:
//!   append whole rows, sync, read back, recover a torn tail), `ledger/scan.rs` (reading
//!   `bets.csv` back fast, the csv crate taking over at the first odd line),
//!   `ledger::round_file` (`bets.csv.round`, the round's journal: the `DONE`s and the draw
//!   across restarts), `ledger::lock` (the `flock` on `bets.csv.lock`: one server per
//!   storage, who holds it, the storage directory's rule), `ledger::free_space`
//!   (`SERVER_MIN_FREE_BYTES`, from `statvfs`), `ledger::stats` (the file ledger's syncs and
//!   draw, for the metrics), `ledger::postgres` (the round in PostgreSQL, shared by replicas:
//!   batches, `DONE`, the draw; its connection pool in `ledger/postgres/pool.rs`, a batch's rows
//!   as arrays in `columns.rs`, the watcher thread that `LISTEN`s for a draw and keeps
//!   `STATUS`'s figures in `watch.rs`, `--export-bets` in `export.rs`, start-up failures said in
//!   one line in `error.rs`, the role's privileges checked at start-up in `privileges.rs`; the
//!   tables in `ledger/schema.sql`).
//! - `server`: the central's side. Bind, the door, a pooled thread per connection that says
//!   more than probes, orderly shutdown. `server::door` (the accept loop in `epoll`:
//!   connections held without a thread until they say more than probes, the waiting room,
//!   deadlines, the shutdown's `eventfd`), `server::probes` (the probes the door answers
//!   itself: `PING`, `STATUS`, `QUIT`), `server::pool` (connection threads kept for the next
//!   connection), `server::registry` (the live connections, which one speaks for each agency,
//!   the guests), `server::suspects` (addresses whose guests failed lately: seated and
//!   handshaken last), `server::guest_log` (the lines a peer can cause, rate-limited: guest
//!   lines past 50 a second and an agency's refusals past 5 counted into one),
//!   `server::session` (one connection's conversation: read, admit, dispatch, reply),
//!   `server::auth` (`agencies.keys`, tokens checked in constant time, protected mode),
//!   `server::tls` (the certificate; TLS or plain by the first byte; handshakes take turns),
//!   `server::metrics` (the counters the server keeps for operators), `server::operator`
//!   (the operator's HTTP listener on `SERVER_METRICS_ADDRESS`: `/metrics`, `/round.json` and
//!   the page `page.html`; its request line in `operator/http.rs`, `server::operator::view`
//!   the round as JSON and as Prometheus metrics).
//! - `agency`: the agency client (used by `lottery-agency`, `lottery-round` and the tests);
//!   `agency::credentials` its token, the CA it trusts and the name it checks; its bets file is
//!   read by lines and cut into batches of at most 8 KiB in `agency/source.rs`; one connection to
//!   the server (plain or TLS, requests and replies) in `agency/link.rs`; how long it keeps
//!   trying and how long it pauses (since its last progress, jittered) in `agency/patience.rs`.
//! - [`tools`]: what runs rounds rather than serving them. [`tools::local_round`]
//!   (`lottery-round`; its flags in `tools::round_options`, its in-process server in
//!   `tools::local_server`), `tools::progress` (progress on stderr: a bar on a terminal, plain
//!   lines otherwise), `tools::report` (the round's table and rate), [`tools::dataset`]
//!   (synthetic agency files), `tools::crowd` (where and how a round's agencies run: in
//!   `lottery-round`'s process, or in one of their own when the open-files limit asks for it),
//!   [`tools::hostile`] (misbehaving clients), `tools::keys`
//!   (`lottery-server --make-keys`), [`tools::attacks`], `tools::attack_round` and
//!   `tools::botnet` (`lottery-round --attack`: the attackers, a round per kind, and the
//!   attackers' process and scheduling group of their own).
//! - [`config`]: `config.ini` plus the environment into typed settings; `config/ini.rs` reads
//!   `config.ini` line by line, so that every error has its file and line.
//! - `logging`: the log line format of the spec.
//! - `output`: stdout and stderr that a closed pipe stops instead of crashing.
//! - `sync`: `lock_unpoisoned`, the one way a `Mutex` is taken (why poisoning is ignored).
//! - [`bench`](mod@bench): what the measurements in `bench/` take from the product (the server's TLS
//!   configuration and its threads' stack), so that they measure it rather than copies.
//! - [`app`]: what the binaries run, so that `src/bin/*.rs` only wire; `app::StartError` (in
//!   `app/start_error.rs`) the server's start-up failures, each said in one line.
//!
//! Outside `src/`: `tests/` (the binaries, black box, on port 0 in temporary directories),
//! `bench/` (the measurements of `docs/performance.md`), `fuzz/` (the parsers' fuzz target),
//! `scripts/` (compose smoke tests, the PostgreSQL test cluster, `probe.sh`).

pub(crate) mod agency;
pub mod app;
pub mod bench;
pub mod config;
pub(crate) mod ledger;
pub(crate) mod logging;
pub(crate) mod output;
pub(crate) mod server;
mod sync;
pub mod tools;
pub mod wire;
