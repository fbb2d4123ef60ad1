//! A binary run to its exit, for its status and what it said.

use std::process::{Command, ExitStatus};

use super::process::{Proc, STEP};

/// Runs `cmd` to completion (at most [`STEP`]) and returns its exit status, stdout and stderr.
pub fn run_to_exit(name: &str, cmd: Command) -> (ExitStatus, String, String) {
    let mut proc = Proc::spawn(name, cmd);
    let status = proc.wait_exit(STEP);
    let stdout = proc.logs.until_eof().join("\n");
    (status, stdout, proc.stderr())
}
