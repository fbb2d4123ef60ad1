//! Nothing acknowledged is lost: a round whose server is killed with SIGKILL (or stopped with
//! SIGTERM) at random moments and restarted on the same files still ends with every bet stored
//! exactly once, every agency with its winners, and one draw.

mod common {
    pub mod agency;
    pub mod client;
    pub mod log_line;
    pub mod process;
    pub mod server;
    pub mod store;
    pub mod winners_reply;
}

use std::net::{Ipv4Addr, TcpListener};
use std::time::{SystemTime, UNIX_EPOCH};

use common::agency::agency;
use common::log_line::log_field;
use common::process::{Proc, STEP};
use common::server::TestServer;
use common::store::{assert_store, expected_store, read_csv, winners_of};
use common::winners_reply::winners_reply;

const AGENCIES: u32 = 5;
const BETS: u64 = 3_000;
const LIVES: usize = 6;

/// The seed of the kill moments: `LOTTERY_TEST_SEED`, or the clock (a failure names it, to
/// replay the run).
fn seed() -> u64 {
    std::env::var("LOTTERY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7574))
}

/// A port that was free a moment ago: every life of the server must listen on the same one,
/// since the agencies keep reconnecting to it.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().port()
}

/// Draws logged by a server that has exited (its whole output is read first).
fn sorteos(server: &mut TestServer) -> usize {
    server.proc.logs.until_eof().iter().filter(|l| l.contains("action: sorteo | result: success")).count()
}

/// How a life of the server ends.
#[derive(Clone, Copy)]
enum Stop {
    /// SIGKILL: no warning, nothing flushed.
    Kill,
    /// SIGTERM: it must exit 0 within 2 s, its last line `shutdown`.
    Term,
}

impl Stop {
    fn apply(self, server: &mut TestServer) {
        match self {
            Stop::Kill => {
                server.proc.child.kill().unwrap();
                server.proc.wait_exit(STEP);
            }
            Stop::Term => {
                server.proc.signal(libc::SIGTERM);
                server.proc.wait_success(STEP);
                let last = server.proc.logs.until_eof().last().cloned().unwrap_or_default();
                assert!(last.ends_with("action: shutdown | result: success"), "last line {last:?}");
            }
        }
    }
}

#[test]
fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    round_across_lives(Stop::Kill);
}

#[test]
fn sigterm_mid_round_loses_and_duplicates_nothing() {
    round_across_lives(Stop::Term);
}

/// [`lives`] with a fresh seed; a failure's panic message ends with the seed that replays it,
/// so that it shows wherever the failure does.
fn round_across_lives(how: Stop) {
    let seed = seed();
    if let Err(panic) = std::panic::catch_unwind(|| lives(how, seed)) {
        let why = match (panic.downcast_ref::<String>(), panic.downcast_ref::<&str>()) {
            (Some(why), _) => why.clone(),
            (None, Some(why)) => (*why).to_owned(),
            (None, None) => "a panic without a message".to_owned(),
        };
        panic!("{why}\nreplay with LOTTERY_TEST_SEED={seed}");
    }
}

/// A 5-agency round whose server is stopped `LIVES` times, each after a random number of
/// acknowledged batches, and once more after the draw; every life restarts on the same files.
fn lives(how: Stop, seed: u64) {
    let mut rng = seed | 1;
    let mut next = move |below: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % below
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let files = lottery::tools::dataset::generate(&data, AGENCIES, BETS, 99).unwrap();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let start = || TestServer::start_in(dir.path(), AGENCIES, port, &[]);

    let mut server = start();
    // Small batches: many of them, so that every stop lands mid-round.
    let retry = [("CLI_RETRY_TIMEOUT_MS", "30000")];
    let mut agencies: Vec<Proc> =
        files.iter().zip(1..).map(|(file, id)| agency(dir.path(), id, &address, file, 10, &retry)).collect();

    // Each life stores a random number of batches (at most 1,500 are sent in all), then stops;
    // the next life starts on the same files.
    let mut draws = 0;
    for life in 1..=LIVES {
        let batches = 1 + next(150) as usize;
        server.proc.logs.wait_count("action: apuesta_recibida | result: success", batches);
        how.apply(&mut server);
        draws += sorteos(&mut server);
        println!("life {life}: stopped after {batches} batches");
        server = start();
        let resumed = server.proc.logs.wait_for("action: open_storage | result: success");
        assert!(log_field(&resumed, "bets").is_some_and(|b| b != "0"), "{resumed}");
    }

    for (agency, file) in agencies.iter_mut().zip(&files) {
        let status = agency.wait_exit(STEP * 6);
        assert!(status.success(), "{} failed:\n{}", agency.name, agency.logs.until_eof().join("\n"));
        let line = agency.logs.wait_for("action: consulta_ganadores | result: success");
        let want = winners_of(&read_csv(file)).len().to_string();
        assert_eq!(log_field(&line, "cant_ganadores"), Some(want.as_str()), "{}", agency.name);
        assert!(!agency.logs.seen.iter().any(|l| l.contains("result: fail")), "{}", agency.name);
    }

    // Stopped after the draw too: the next life knows it and answers WINNERS at once, without
    // drawing again.
    server.proc.logs.wait_for("action: sorteo | result: success");
    how.apply(&mut server);
    draws += sorteos(&mut server);
    let mut server = start();
    let mut client = server.client();
    assert_eq!(client.send("STATUS"), format!("STATUS agencies_done=5/5 bets={} drawn=true", BETS * 5));
    for (file, id) in files.iter().zip(1..) {
        assert_eq!(client.send(&format!("HELLO {id}")), format!("OK {BETS}"));
        assert_eq!(client.send("WINNERS"), winners_reply(&winners_of(&read_csv(file))));
    }
    server.proc.signal(libc::SIGTERM);
    server.proc.wait_success(STEP);
    draws += sorteos(&mut server);
    assert_eq!(draws, 1, "the draw must be logged once over all the server's lives");

    // Exactly the agencies' bets, each once.
    assert_store(&dir.path().join("bets.csv"), &expected_store(&files));
}

/// Agencies of the crowd round, each with a few bets.
const CROWD: u32 = 1_000;
const CROWD_BETS: usize = 3;
/// Room for every agency and the default guests.
const CROWD_ENV: &[(&str, &str)] = &[("SERVER_MAX_CONNECTIONS", "1300")];
/// Connections the test drives at once.
const WORKERS: usize = 16;

/// Agency `agency`'s bets, as an agency sends them (one in four wins).
fn crowd_rows(agency: u32) -> Vec<String> {
    (0..CROWD_BETS)
        .map(|j| {
            let number = if (agency as usize + j).is_multiple_of(4) { "7574".to_owned() } else { j.to_string() };
            format!("Ana,Paz,{},1990-01-01,{number}", agency as usize * 10 + j)
        })
        .collect()
}

/// What the agencies of the crowd were told, over every life of the server.
struct Crowd {
    /// Bets acknowledged per agency (index 0 is agency 1).
    bets: Vec<std::sync::atomic::AtomicUsize>,
    /// Whether its `DONE` was acknowledged.
    done: Vec<std::sync::atomic::AtomicBool>,
    /// How many `DONE`s were acknowledged, for the test to wait on.
    dones: std::sync::Mutex<usize>,
    more: std::sync::Condvar,
}

impl Crowd {
    fn new() -> Crowd {
        Crowd {
            bets: (0..CROWD).map(|_| Default::default()).collect(),
            done: (0..CROWD).map(|_| Default::default()).collect(),
            dones: std::sync::Mutex::new(0),
            more: std::sync::Condvar::new(),
        }
    }

    /// Waits until at least `n` `DONE`s were acknowledged.
    fn wait_dones(&self, n: usize) {
        let dones = self.dones.lock().unwrap();
        let (dones, _) = self.more.wait_timeout_while(dones, STEP * 6, |d| *d < n).unwrap();
        assert!(*dones >= n, "only {} DONEs acknowledged, waiting for {n}", *dones);
    }
}

/// A raw connection whose every failure is an error, not a panic: the server may be killed.
struct Line {
    stream: std::net::TcpStream,
    reader: std::io::BufReader<std::net::TcpStream>,
}

impl Line {
    fn connect(port: u16) -> std::io::Result<Line> {
        let stream = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        stream.set_read_timeout(Some(STEP))?;
        stream.set_write_timeout(Some(STEP))?;
        Ok(Line { reader: std::io::BufReader::new(stream.try_clone()?), stream })
    }

    /// Sends `request` (one or more lines) and reads the reply line.
    fn ask(&mut self, request: &str) -> std::io::Result<String> {
        use std::io::{BufRead, Write};
        self.stream.write_all(request.as_bytes())?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 || !reply.ends_with('\n') {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(reply.trim_end().to_owned())
    }
}

/// One agency of the crowd over one connection: `HELLO`, the bets the server lacks, `DONE`; or,
/// if its `DONE` was acknowledged in an earlier life, a check that it is still done. An error is
/// a broken connection (the server was killed); a wrong reply fails the test.
fn crowd_agency(port: u16, crowd: &Crowd, agency: u32) -> std::io::Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    let i = agency as usize - 1;
    let mut line = Line::connect(port)?;
    let hello = line.ask(&format!("HELLO {agency}\n"))?;
    let held: usize = hello.strip_prefix("OK ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{hello}"));
    assert!(held >= crowd.bets[i].load(SeqCst) && held <= CROWD_BETS, "agency {agency}: {hello}");
    let rows = crowd_rows(agency);
    if crowd.done[i].load(SeqCst) {
        let extra = format!("BATCH {held} 1\nAna,Paz,99,1990-01-01,7574\n");
        let reply = line.ask(&extra)?;
        assert!(reply.starts_with("ERR CLOSED"), "agency {agency} was told OK to DONE, then took a bet: {reply}");
        return Ok(());
    }
    if held < CROWD_BETS {
        let batch = format!("BATCH {held} {}\n{}\n", CROWD_BETS - held, rows[held..].join("\n"));
        assert_eq!(line.ask(&batch)?, format!("OK {CROWD_BETS}"), "agency {agency}");
        crowd.bets[i].store(CROWD_BETS, SeqCst);
    }
    assert_eq!(line.ask("DONE\n")?, "OK", "agency {agency}");
    if !crowd.done[i].swap(true, SeqCst) {
        *crowd.dones.lock().unwrap() += 1;
        crowd.more.notify_all();
    }
    Ok(())
}

/// Runs every agency of the crowd against the server on `port` from `WORKERS` threads, each
/// stopping at its first broken connection.
fn crowd_workers(port: u16, crowd: &std::sync::Arc<Crowd>) -> Vec<std::thread::JoinHandle<()>> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1));
    (0..WORKERS)
        .map(|_| {
            let (crowd, next) = (std::sync::Arc::clone(crowd), std::sync::Arc::clone(&next));
            std::thread::spawn(move || {
                loop {
                    let agency = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if agency > CROWD || crowd_agency(port, &crowd, agency).is_err() {
                        return;
                    }
                }
            })
        })
        .collect()
}

/// A 1,000-agency round whose server is SIGKILLed three times among the `DONE`s, restarted on
/// the same files each time: every agency told `OK` to its `DONE` is still done after each
/// restart, the round completes with one draw, and every bet is stored once.
#[test]
fn sigkill_among_the_dones_of_a_thousand_agencies_keeps_every_done() {
    let dir = tempfile::tempdir().unwrap();
    let crowd = std::sync::Arc::new(Crowd::new());
    let mut draws = 0;
    for kill_at in [150, 500, 850] {
        let mut server = TestServer::start_in(dir.path(), CROWD, 0, CROWD_ENV);
        let workers = crowd_workers(server.port, &crowd);
        crowd.wait_dones(kill_at);
        server.proc.child.kill().unwrap();
        server.proc.wait_exit(STEP);
        for worker in workers {
            worker.join().expect("an agency was told something wrong");
        }
        draws += sorteos(&mut server);
        let told = *crowd.dones.lock().unwrap();
        println!("killed after {kill_at} DONEs; {told} acknowledged");
        // The next life knows at least every DONE acknowledged so far.
        let mut next = TestServer::start_in(dir.path(), CROWD, 0, CROWD_ENV);
        let opened = next.proc.logs.wait_for("action: open_storage | result: success");
        let recorded: usize = log_field(&opened, "agencies_done").and_then(|d| d.parse().ok()).unwrap();
        assert!(recorded >= told, "{recorded} agencies done on disk, {told} told OK: {opened}");
        next.proc.child.kill().unwrap();
        next.proc.wait_exit(STEP);
        draws += sorteos(&mut next);
    }
    let mut server = TestServer::start_in(dir.path(), CROWD, 0, CROWD_ENV);
    for worker in crowd_workers(server.port, &crowd) {
        worker.join().expect("an agency was told something wrong");
    }
    server.proc.logs.wait_for("action: sorteo | result: success");
    let mut client = server.client();
    for agency in 1..=CROWD {
        assert_eq!(client.send(&format!("HELLO {agency}")), format!("OK {CROWD_BETS}"));
        let rows: Vec<Vec<String>> =
            crowd_rows(agency).iter().map(|r| r.split(',').map(str::to_owned).collect()).collect();
        assert_eq!(client.send("WINNERS"), winners_reply(&winners_of(&rows)), "agency {agency}");
    }
    server.proc.signal(libc::SIGTERM);
    server.proc.wait_success(STEP);
    draws += sorteos(&mut server);
    assert_eq!(draws, 1, "the draw must be logged once over all the server's lives");

    let mut expected: Vec<Vec<String>> = (1..=CROWD)
        .flat_map(|a| {
            crowd_rows(a).into_iter().map(move |r| format!("{a},{r}").split(',').map(str::to_owned).collect())
        })
        .collect();
    expected.sort();
    assert_store(&dir.path().join("bets.csv"), &expected);
}
