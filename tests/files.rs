//! The server's files and the machine's other users, black box: every file it writes is its
//! user's alone whatever the umask, nothing it writes goes through a link another user planted,
//! a storage directory others may write is refused, a lock held by another program is named as
//! what it is; the export goes to a new file, standard output or a device; and a server started
//! on another round's files says so.
//!
//! The parts about another user run as `nobody` when the tests run as root, and say that they
//! are skipped otherwise.

mod common {
    pub mod client;
    pub mod log_line;
    pub mod process;
    pub mod run;
    pub mod server;
}

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use common::client::Client;
use common::process::{Proc, STEP, command};
use common::run::run_to_exit;
use common::server::TestServer;

/// `nobody`'s uid and gid on Debian-like systems.
const NOBODY: u32 = 65534;

const ROW: &str = "1,Ana,Paz,42,1990-01-01,7574\n";

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs `cmd` as `nobody` (the caller is root).
fn as_nobody(cmd: &mut Command) -> &mut Command {
    cmd.uid(NOBODY).gid(NOBODY)
}

/// The settings of a server storing into `dir/bets.csv`, in protected mode on loopback.
fn server_env(dir: &Path, agencies: &str) -> Vec<(String, String)> {
    let storage = dir.join("bets.csv").to_str().expect("UTF-8 temp path").to_owned();
    [
        ("SERVER_IP", "127.0.0.1"),
        ("SERVER_PORT", "0"),
        ("SERVER_AGENCIES", agencies),
        ("SERVER_STORAGE_PATH", storage.as_str()),
        ("SERVER_AGENCY_KEYS", ""),
        ("SERVER_TLS_CERT", ""),
        ("SERVER_TLS_KEY", ""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// `lottery-server` with `env` in `dir`.
fn server_command(dir: &Path, env: &[(String, String)]) -> Command {
    let mut cmd = command(common::server::SERVER, dir, &[]);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// `lottery-server` with `env` (and `args`) in `dir`, run to its exit.
fn server_run(dir: &Path, env: &[(String, String)], args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut cmd = server_command(dir, env);
    cmd.args(args);
    run_to_exit("lottery-server", cmd)
}

/// Asserts that a server on `dir` refuses to start with one line holding each of `needles`.
fn assert_refused(dir: &Path, needles: &[&str]) -> String {
    let (status, _, stderr) = server_run(dir, &server_env(dir, "1"), &[]);
    assert!(!status.success(), "it started: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
    stderr
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn every_file_the_server_writes_is_private_under_umask_000() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut cmd = server_command(dir, &server_env(dir, "1"));
    // SAFETY: umask(2) is async-signal-safe and touches nothing but the child's own mask.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut server = Proc::spawn("lottery-server", cmd);
    let listen = server.logs.wait_for("action: listen | result: success");
    let port =
        common::log_line::log_field(&listen, "address").and_then(|a| a.rsplit_once(':')?.1.parse().ok()).unwrap();
    let mut client = Client::connect(port);
    assert_eq!(client.send("HELLO 1"), "OK 0");
    assert_eq!(client.send("BET Ana,Paz,42,1990-01-01,7574"), "OK 1");
    assert_eq!(client.send("DONE"), "OK");
    assert_eq!(client.send("WINNERS"), "WINNERS 1 42");
    server.signal(libc::SIGTERM);
    server.wait_success(STEP);

    let mut export = server_command(dir, &server_env(dir, "1"));
    export.args(["--export-bets", "round.csv"]);
    // SAFETY: as above.
    unsafe {
        export.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let (status, _, stderr) = run_to_exit("lottery-server --export-bets", export);
    assert!(status.success(), "{stderr}");
    for name in ["bets.csv", "bets.csv.round", "bets.csv.lock", "round.csv"] {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
    }
    if !is_root() {
        println!("skipped: reading the files as another user needs root to become `nobody`");
        return;
    }
    chmod(dir, 0o755);
    for name in ["bets.csv", "bets.csv.round", "round.csv"] {
        let out = as_nobody(Command::new("cat").arg(dir.join(name))).output().unwrap();
        assert!(!out.status.success(), "nobody read {name}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{name}");
    }
}

#[test]
fn a_storage_directory_other_users_may_write_is_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("storage");
    fs::create_dir(&dir).unwrap();
    for (mode, who) in [(0o777, "every user"), (0o775, "its group")] {
        chmod(&dir, mode);
        assert_refused(&dir, &[&dir.display().to_string(), who, "chmod go-w"]);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "it wrote into a loose directory");
    }
    // A sticky directory (as /tmp) is not: others cannot rename or remove what is ours there.
    chmod(&dir, 0o1777);
    let mut server = TestServer::start_in(&dir, 1, 0, &[]);
    assert_eq!(server.client().send("HELLO 1"), "OK 0");
    server.proc.signal(libc::SIGTERM);
    server.proc.wait_success(STEP);
}

/// A directory every user may write (sticky, so the rule lets the server use it) in a
/// temporary directory others may enter; and a file of root's outside it, "precious".
fn shared_dir() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let shared = tmp.path().join("shared");
    fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o1777);
    let precious = tmp.path().join("precious");
    fs::write(&precious, "precious\n").unwrap();
    (tmp, shared, precious)
}

#[test]
fn a_link_planted_in_place_of_any_file_of_the_server_is_refused_and_its_target_untouched() {
    let root = is_root();
    if !root {
        println!("skipped in part: not root, so the links are planted by this user, not by `nobody`");
    }
    for name in ["bets.csv", "bets.csv.round", "bets.csv.lock"] {
        let (_tmp, shared, precious) = shared_dir();
        let link = shared.join(name);
        if root {
            let status = as_nobody(Command::new("ln").arg("-s").arg(&precious).arg(&link)).status().unwrap();
            assert!(status.success(), "nobody could not plant {name}");
        } else {
            symlink(&precious, &link).unwrap();
        }
        assert_refused(&shared, &[&link.display().to_string(), "symbolic link", "remove the link"]);
        assert_eq!(fs::read_to_string(&precious).unwrap(), "precious\n", "{name}");
        assert_eq!(mode(&precious), 0o644, "{name}");
    }
}

#[test]
fn a_file_another_user_planted_in_a_shared_directory_is_refused() {
    if !is_root() {
        println!("skipped: planting a file as another user needs root to become `nobody`");
        return;
    }
    let (_tmp, shared, _) = shared_dir();
    let planted = shared.join("bets.csv");
    let status = as_nobody(Command::new("touch").arg(&planted)).status().unwrap();
    assert!(status.success());
    assert_refused(&shared, &[&planted.display().to_string(), &format!("belongs to uid {NOBODY}")]);
    assert_eq!(fs::read(&planted).unwrap(), b"", "it wrote into another user's file");
}

#[test]
fn a_lock_held_by_another_users_program_is_named_as_what_it_is() {
    if !is_root() {
        println!("skipped: holding the lock as another user needs root to become `nobody`");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    chmod(dir, 0o755);
    let mut first = TestServer::start_in(dir, 1, 0, &[]);
    assert_eq!(first.client().send("HELLO 1"), "OK 0");
    let stale = first.proc.pid();
    first.proc.signal(libc::SIGTERM);
    first.proc.wait_success(STEP);
    // The operator loosened the lock file; another user opens it read-only and locks it. The
    // file still holds the first server's pid, which must not be blamed.
    let lock = dir.join("bets.csv.lock");
    chmod(&lock, 0o644);
    let mut flock = Command::new("flock");
    flock.arg("-F").arg("-s").arg(&lock).args(["sh", "-c", "echo locked; exec sleep 600"]);
    as_nobody(&mut flock);
    let mut holder = Proc::spawn("flock as nobody", flock);
    holder.logs.wait_for("locked");
    let before = fs::read(dir.join("bets.csv")).unwrap();
    let stderr =
        assert_refused(dir, &[&format!("locked by pid {} (sleep, uid {NOBODY}), not a lottery-server", holder.pid())]);
    assert!(!stderr.contains(&stale.to_string()), "it blamed the stale pid: {stderr}");
    assert_eq!(fs::read(dir.join("bets.csv")).unwrap(), before);
}

#[test]
fn the_export_goes_to_standard_output_or_a_device_and_never_over_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bets = format!("{ROW}1,\"Eva, la\",Sol,7,1980-02-02,1\n");
    fs::write(dir.join("bets.csv"), &bets).unwrap();
    let env = server_env(dir, "1");

    let (status, stdout, stderr) = server_run(dir, &env, &["--export-bets", "-"]);
    assert!(status.success(), "{stderr}");
    assert_eq!(format!("{stdout}\n"), bets);
    assert_eq!(stderr.trim(), "lottery-server: wrote 2 bets to -");

    // /dev/stdout is the pipe the test reads (a FIFO); /dev/null a character device.
    let (status, stdout, stderr) = server_run(dir, &env, &["--export-bets", "/dev/stdout"]);
    assert!(status.success(), "{stderr}");
    assert_eq!(format!("{stdout}\n"), bets);
    let (status, stdout, stderr) = server_run(dir, &env, &["--export-bets", "/dev/null"]);
    assert!(status.success() && stdout.is_empty(), "{stderr}");
    assert!(stderr.contains("wrote 2 bets to /dev/null"), "{stderr}");

    let (status, stdout, stderr) = server_run(dir, &env, &["--export-bets", "round.csv"]);
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "lottery-server: wrote 2 bets to round.csv");
    assert_eq!(fs::read_to_string(dir.join("round.csv")).unwrap(), bets);
    assert_eq!(mode(&dir.join("round.csv")), 0o600);

    // An existing file, or a link to a new one, is never written.
    fs::write(dir.join("old.csv"), "keep\n").unwrap();
    symlink(dir.join("new.csv"), dir.join("link.csv")).unwrap();
    for name in ["old.csv", "link.csv"] {
        let (status, _, stderr) = server_run(dir, &env, &["--export-bets", name]);
        assert!(!status.success());
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("exists") && stderr.contains("- for standard output"), "{stderr}");
    }
    assert_eq!(fs::read_to_string(dir.join("old.csv")).unwrap(), "keep\n");
    assert!(!dir.join("new.csv").exists());
}

#[test]
fn an_export_to_a_reader_that_leaves_early_ends_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::write(dir.join("bets.csv"), ROW).unwrap();
    let env = server_env(dir, "1");
    // `--export-bets - | head -0`: the reader is gone before the first write.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut cmd = server_command(dir, &env);
    cmd.args(["--export-bets", "-"]).stdin(std::process::Stdio::null()).stdout(writer);
    cmd.stderr(std::process::Stdio::piped());
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{:?}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{:?}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_server_on_another_rounds_storage_says_so_and_how_to_start_a_new_round() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut server = TestServer::start_in(dir, 5, 0, &[]);
    let mut client = server.client();
    assert_eq!(client.send("HELLO 5"), "OK 0");
    assert_eq!(client.send("BET Ana,Paz,42,1990-01-01,7574"), "OK 1");
    server.proc.signal(libc::SIGTERM);
    server.proc.wait_success(STEP);
    let before = (fs::read(dir.join("bets.csv")).unwrap(), fs::read(dir.join("bets.csv.round")).unwrap());
    let bets = dir.join("bets.csv").display().to_string();
    let stderr = assert_refused(
        dir,
        &[
            &format!("{bets}: holds another round's bets (a round of 5 agencies, as {bets}.round says)"),
            "SERVER_AGENCIES is 1",
            &format!(
                "to start a new round, move {bets} and {bets}.round away or set SERVER_STORAGE_PATH to a new file"
            ),
        ],
    );
    assert!(!stderr.contains("line 1"), "{stderr}");
    assert_eq!((fs::read(dir.join("bets.csv")).unwrap(), fs::read(dir.join("bets.csv.round")).unwrap()), before);

    // The bets of an earlier version's round that had no round file yet: from its rows.
    fs::remove_file(dir.join("bets.csv.round")).unwrap();
    assert_refused(dir, &["holds another round's bets (a round of at least 5 agencies from line 1)"]);
}
