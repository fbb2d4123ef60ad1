//! The command line of the three binaries: help, bad flags, bad settings, missing files.

mod common;

use common::{AGENCY, ROUND, SERVER, TestServer, command, run_to_exit};

const BINARIES: [(&str, &str); 3] = [("lottery-server", SERVER), ("lottery-agency", AGENCY), ("lottery-round", ROUND)];

#[test]
fn help_on_all_three_binaries_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    for (name, binary) in BINARIES {
        let mut cmd = command(binary, dir.path(), &[]);
        cmd.arg("--help");
        let (status, stdout, stderr) = run_to_exit(name, cmd);
        assert!(status.success(), "{name} --help: {status}; {stderr}");
        assert!(stdout.contains(name) && stdout.contains("Usage"), "{name} --help printed {stdout:?}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "--help wrote files");
}

#[test]
fn a_bad_flag_exits_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (name, binary) in BINARIES {
        let mut cmd = command(binary, dir.path(), &[]);
        cmd.arg("--bogus");
        let (status, stdout, stderr) = run_to_exit(name, cmd);
        assert!(!status.success(), "{name} --bogus exited 0");
        assert_eq!(stderr.lines().count(), 1, "{name}: stderr {stderr:?}");
        assert!(stderr.contains("bogus"), "{name}: {stderr:?} does not name the flag");
        assert!(stdout.is_empty(), "{name}: did something before refusing: {stdout:?}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a refused start wrote files");
}

#[test]
fn a_bad_config_value_exits_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // (name, binary, environment, the key the error must name)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 5] = [
        ("lottery-server", SERVER, &[("SERVER_PORT", "abc")], "SERVER_PORT"),
        ("lottery-server", SERVER, &[("SERVER_IDLE_TIMEOUT_MS", "soon")], "SERVER_IDLE_TIMEOUT_MS"),
        ("lottery-server", SERVER, &[("LOTTERY_CONFIG", "no-such.ini")], "LOTTERY_CONFIG"),
        ("lottery-agency", AGENCY, &[("CLI_ID", "1"), ("CLI_BATCH_MAXAMOUNT", "many")], "CLI_BATCH_MAXAMOUNT"),
        ("lottery-agency", AGENCY, &[], "CLI_ID"),
    ];
    for (name, binary, env, key) in cases {
        let (status, stdout, stderr) = run_to_exit(name, command(binary, dir.path(), env));
        assert!(!status.success(), "{name} with {env:?} exited 0");
        assert_eq!(stderr.lines().count(), 1, "{name} with {env:?}: stderr {stderr:?}");
        assert!(stderr.contains(key), "{name} with {env:?}: {stderr:?} does not name {key}");
        assert!(stdout.is_empty(), "{name} with {env:?} logged before refusing: {stdout:?}");
    }
    // Refused before anything else happened: no bets file, no round file.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a refused start wrote files");
}

#[test]
fn an_agency_with_a_missing_data_file_says_so_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("agency-7.csv");
    // Nothing listens on port 1: the agency must refuse before trying to connect.
    let env = [("CLI_ID", "7"), ("CLI_SERVER_ADDRESS", "127.0.0.1:1"), ("CLI_DATA_PATH", missing.to_str().unwrap())];
    let (status, stdout, stderr) = run_to_exit("lottery-agency", command(AGENCY, dir.path(), &env));
    assert!(!status.success(), "exited 0 without its data file");
    assert_eq!(stderr.lines().count(), 1, "stderr {stderr:?}");
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr:?} does not name the file");
    assert!(!stdout.contains("action: connect"), "it tried to connect first: {stdout}");
}

#[test]
fn agency_ping_is_a_health_check() {
    let server = TestServer::start(1, &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(AGENCY, dir.path(), &[("CLI_SERVER_ADDRESS", &server.address())]);
    cmd.arg("--ping");
    let (status, stdout, _) = run_to_exit("lottery-agency --ping", cmd);
    assert!(status.success(), "{status}");
    assert_eq!(stdout, format!("PONG from {}", server.address()));
    drop(server);
    // No server there any more: one line on stderr, exit 1.
    let mut cmd = command(AGENCY, dir.path(), &[]);
    cmd.args(["--ping", "127.0.0.1:1"]);
    let (status, _, stderr) = run_to_exit("lottery-agency --ping", cmd);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.starts_with("lottery-agency: cannot reach 127.0.0.1:1") && stderr.lines().count() == 1, "{stderr}");
}
