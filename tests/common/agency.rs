//! A `lottery-agency` process started for one test.

use std::path::Path;
use std::process::Command;

use super::process::{Proc, command};

/// The agency's binary.
pub const AGENCY: &str = env!("CARGO_BIN_EXE_lottery-agency");

/// An agency process for `id`, sending `data` to `address` in batches of at most `batch`.
pub fn agency(dir: &Path, id: u32, address: &str, data: &Path, batch: usize, env: &[(&str, &str)]) -> Proc {
    let (id, batch) = (id.to_string(), batch.to_string());
    let data = data.to_str().expect("UTF-8 temp path");
    // No token and plain text unless the test says otherwise (see `Keys::agency_env`).
    let mut vars = vec![
        ("CLI_ID", id.as_str()),
        ("CLI_SERVER_ADDRESS", address),
        ("CLI_DATA_PATH", data),
        ("CLI_BATCH_MAXAMOUNT", &batch),
        ("CLI_TOKEN_FILE", ""),
        ("CLI_TLS_CA", ""),
    ];
    vars.extend_from_slice(env);
    let cmd: Command = command(AGENCY, dir, &vars);
    Proc::spawn(&format!("lottery-agency {id}"), cmd)
}
