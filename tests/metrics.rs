//! The operator's listener (`SERVER_METRICS_ADDRESS`) against the real binary: where it binds,
//! what `/metrics`, `/round.json` and `/` say during a round, what bad input on it gets, and (with
//! `--include-ignored`) the exposition through `promtool` and the page in headless Chromium.

mod common {
    pub mod client;
    pub mod log_line;
    pub mod process;
    pub mod run;
    pub mod server;
    pub mod server_temp;
}

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::client::Client;
use common::process::{STEP, command};
use common::run::run_to_exit;
use common::server::TestServer;

/// A server for `agencies` agencies with its metrics on a free loopback port; and that port's address.
fn start(agencies: u32) -> (TestServer, SocketAddr) {
    let mut server = TestServer::start(agencies, &[("SERVER_METRICS_ADDRESS", "127.0.0.1:0")]);
    let line = server.proc.logs.wait_for("action: listen | result: success | service: metrics");
    let address = common::log_line::log_field(&line, "address").unwrap_or_else(|| panic!("no address in {line:?}"));
    let address: SocketAddr = address.parse().expect("ip:port");
    assert_ne!(address.port(), 0);
    (server, address)
}

/// Sends `request` as it is and returns the whole answer (the server closes after one).
fn exchange(address: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect_timeout(&address, STEP).expect("connect to the metrics port");
    stream.set_read_timeout(Some(STEP)).unwrap();
    stream.set_write_timeout(Some(STEP)).unwrap();
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// `GET path`: the status line and the body.
fn get(address: SocketAddr, path: &str) -> (String, String) {
    let answer = exchange(address, format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {answer:?}"));
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

/// The value of the sample `name` (with its labels, e.g. `lottery_agencies{state="done"}`).
fn sample(metrics: &str, name: &str) -> f64 {
    let line = metrics.lines().find(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ')));
    let line = line.unwrap_or_else(|| panic!("no {name} in\n{metrics}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a number")
}

/// A string field of `/round.json`.
fn field<'a>(json: &'a str, key: &str) -> &'a str {
    let start = json.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("no {key} in {json}")) + key.len() + 3;
    let rest = &json[start..];
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    &rest[..rest.find(['"', ',', '}']).unwrap_or(rest.len())]
}

/// Agency `id` connects, stores two bets and says DONE: the connection, to ask WINNERS later.
fn send_bets_and_done(server: &TestServer, id: u32) -> Client {
    let mut agency = server.client();
    assert_eq!(agency.send(&format!("HELLO {id}")), "OK 0");
    let doc = 1000 + id;
    agency
        .write(format!("BATCH 0 2\nAna,Paz,{doc},1990-01-01,7574\nLuis,Sol,2{doc},1980-02-02,1\n").as_bytes())
        .unwrap();
    assert_eq!(agency.read_line(), "OK 2");
    assert_eq!(agency.send("DONE"), "OK");
    agency
}

/// Waits (generously) until `/round.json` satisfies `ok`, and returns it.
fn wait_round(address: SocketAddr, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, json) = get(address, "/round.json");
        if ok(&json) || Instant::now() > deadline {
            return json;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn port_zero_is_said_in_the_log_and_the_round_is_counted() {
    let (mut server, metrics) = start(3);
    let (status, body) = get(metrics, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(sample(&body, "lottery_agencies{state=\"not_connected\"}"), 3.0);
    assert_eq!(sample(&body, "lottery_round_phase{phase=\"open\"}"), 1.0);
    let mut first = send_bets_and_done(&server, 1);
    let second = send_bets_and_done(&server, 2);
    drop(second);
    let mut guest = server.client();
    assert_eq!(guest.send("PING"), "PONG");
    assert!(guest.send("HELLO 9").starts_with("ERR BAD_AGENCY"));
    let json = wait_round(metrics, |j| field(j, "missing") == "3" && field(j, "states").starts_with("22"));
    assert_eq!(field(&json, "missing"), "3", "{json}");
    assert_eq!((field(&json, "states"), field(&json, "bets"), field(&json, "drawn")), ("220", "4", "false"));
    let _third = send_bets_and_done(&server, 3);
    server.proc.logs.wait_for("action: sorteo | result: success");
    assert!(first.send("WINNERS").starts_with("WINNERS"));
    let json = wait_round(metrics, |j| field(j, "states") == "322");
    assert_eq!((field(&json, "states"), field(&json, "missing"), field(&json, "phase")), ("322", "", "drawn"));
    assert_ne!(field(&json, "draw_unix_ms"), "null");
    let (_, body) = get(metrics, "/metrics");
    for (name, value) in [
        ("lottery_agencies{state=\"told\"}", 1.0),
        ("lottery_agencies{state=\"done\"}", 2.0),
        ("lottery_bets", 6.0),
        ("lottery_bets_stored_total", 6.0),
        ("lottery_batches_stored_total", 3.0),
        ("lottery_refusals_total{reason=\"BAD_AGENCY\"}", 1.0),
        ("lottery_probes_total", 1.0),
        ("lottery_round_phase{phase=\"drawn\"}", 1.0),
        ("lottery_appended_bytes_total", std::fs::metadata(server.bets_path()).unwrap().len() as f64),
    ] {
        assert_eq!(sample(&body, name), value, "{name}");
    }
    assert!(sample(&body, "lottery_fdatasync_duration_seconds_count") >= 1.0);
    assert_eq!(sample(&body, "lottery_group_commit_bets_sum"), 6.0);
    assert!(sample(&body, "lottery_draw_timestamp_seconds") > 1.0e9);
    assert!(sample(&body, "lottery_connections_total{kind=\"guest\"}") >= 4.0);
    assert_eq!(sample(&body, "lottery_connections_total{kind=\"agency\"}"), 3.0);
    server.proc.signal(libc::SIGTERM);
    server.proc.wait_success(Duration::from_secs(10));
    assert!(server.proc.logs.until_eof().iter().any(|l| l.contains("action: close_metrics | result: success")));
}

#[test]
fn nothing_served_names_a_bettor() {
    let (server, metrics) = start(2);
    let _agency = send_bets_and_done(&server, 1);
    for path in ["/metrics", "/round.json", "/"] {
        let (status, body) = get(metrics, path);
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
        for secret in ["Ana", "Paz", "1001", "7574", "1990-01-01"] {
            assert!(!body.contains(secret), "{path} shows {secret}");
        }
    }
}

#[test]
fn the_default_address_taken_is_a_warning_and_no_metrics() {
    // Held here, or by someone else: either way taken.
    let _held = TcpListener::bind("127.0.0.1:9745");
    let mut server = TestServer::start(1, &[("SERVER_METRICS_ADDRESS", "127.0.0.1:9745")]);
    let warning = server.proc.logs.wait_for("service: metrics");
    assert!(warning.contains("WARN") && warning.contains("result: fail"), "{warning}");
    assert_eq!(server.client().send("PING"), "PONG");
}

#[test]
fn an_explicit_address_that_cannot_be_bound_stops_the_server() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("bets.csv");
    let env = [
        ("SERVER_PORT", "0"),
        ("SERVER_IP", "127.0.0.1"),
        ("SERVER_STORAGE_PATH", storage.to_str().unwrap()),
        ("SERVER_AGENCY_KEYS", ""),
        ("SERVER_TLS_CERT", ""),
        ("SERVER_TLS_KEY", ""),
        ("SERVER_METRICS_ADDRESS", taken.as_str()),
    ];
    let (status, _, stderr) = run_to_exit("lottery-server", command(common::server::SERVER, dir.path(), &env));
    assert!(!status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("SERVER_METRICS_ADDRESS") && stderr.contains(&taken), "{stderr}");
}

#[test]
fn bad_input_on_the_metrics_port_gets_an_http_error_and_never_touches_the_round() {
    let (server, metrics) = start(2);
    assert!(get(metrics, "/nope").0.starts_with("HTTP/1.1 404"));
    assert!(exchange(metrics, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(exchange(metrics, b"\x16\x03\x01\x00\x05hello\r\n\r\n").starts_with("HTTP/1.1 400"));
    let huge = format!("GET / HTTP/1.1\r\nCookie: {}\r\n\r\n", "a".repeat(100_000));
    assert!(exchange(metrics, huge.as_bytes()).starts_with("HTTP/1.1 431"));
    // A crowd of silent clients: each is answered 408 at its deadline or 503 at once, the
    // listener's threads stay few, and the agencies' port serves throughout.
    let crowd: Vec<TcpStream> =
        (0..300).map(|_| TcpStream::connect_timeout(&metrics, STEP).expect("connect")).collect();
    let mut agency = send_bets_and_done(&server, 1);
    assert_eq!(agency.send("PING"), "PONG");
    let threads = thread_count(server.proc.pid());
    assert!(threads < 40, "{threads} threads with 300 clients on the metrics port");
    let mut answers = Vec::new();
    for mut client in crowd {
        client.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut answer = String::new();
        let _ = client.read_to_string(&mut answer);
        answers.push(answer.lines().next().unwrap_or_default().to_owned());
    }
    assert!(
        answers.iter().all(|a| a == "HTTP/1.1 408 Request Timeout" || a == "HTTP/1.1 503 Service Unavailable"),
        "{answers:?}"
    );
    assert!(answers.iter().any(|a| a.contains("503")), "a queue of 64 took 300 clients");
    assert_eq!(get(metrics, "/metrics").0, "HTTP/1.1 200 OK");
    let _second = send_bets_and_done(&server, 2);
    assert!(agency.send("WINNERS").starts_with("WINNERS"));
}

fn thread_count(pid: i32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

#[test]
#[ignore = "needs promtool (Debian's prometheus package)"]
fn promtool_finds_the_exposition_well_formed() {
    let (server, metrics) = start(2);
    let _agency = send_bets_and_done(&server, 1);
    let (_, body) = get(metrics, "/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool on the PATH");
    promtool.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool: {said}");
}

/// The page as headless Chromium renders it after a few seconds of (virtual) time.
fn chromium(url: &str, dir: &Path, screenshot: Option<&Path>) -> String {
    let profile = dir.join(format!("chromium-{}", screenshot.is_some()));
    let mut cmd = Command::new("chromium");
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        .args(["--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=3000"])
        .arg(format!("--user-data-dir={}", profile.display()));
    match screenshot {
        Some(path) => cmd.arg(format!("--screenshot={}", path.display())).arg("--window-size=1280,900"),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).output().expect("chromium on the PATH");
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with `id` in a dumped DOM.
fn element<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no #{id} in {dom}"));
    let text = &dom[start..];
    let text = &text[text.find('>').unwrap() + 1..];
    &text[..text.find('<').unwrap()]
}

#[test]
#[ignore = "needs chromium"]
fn the_page_shows_the_missing_agencies_then_the_draw() {
    let (mut server, metrics) = start(20);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{metrics}/");
    let mut agencies: Vec<Client> = (1..=19).filter(|&id| id != 7).map(|id| send_bets_and_done(&server, id)).collect();
    let late = server.client();
    let dom = chromium(&url, dir.path(), None);
    assert_eq!(element(&dom, "missing"), "7, 20", "{dom}");
    assert_eq!(element(&dom, "draw"), "not yet");
    assert_eq!(element(&dom, "phase"), "open");
    drop(late);
    agencies.push(send_bets_and_done(&server, 7));
    let mut last = server.client();
    assert_eq!(last.send("HELLO 20"), "OK 0");
    let screenshot = std::env::var_os("LOTTERY_PAGE_SCREENSHOT").map(std::path::PathBuf::from);
    if let Some(path) = &screenshot {
        // Mid-round, with one agency connected and none told yet: every colour but one.
        chromium(&url, dir.path(), Some(path));
    }
    assert_eq!(last.send("DONE"), "OK");
    server.proc.logs.wait_for("action: sorteo | result: success");
    for agency in agencies.iter_mut().take(10) {
        assert!(agency.send("WINNERS").starts_with("WINNERS"));
    }
    let dom = chromium(&url, dir.path(), None);
    assert_eq!(element(&dom, "missing"), "none", "{dom}");
    assert_eq!(element(&dom, "phase"), "drawn");
    assert_ne!(element(&dom, "draw"), "not yet");
    assert_eq!(element(&dom, "n-told"), "10");
}
