//! Applies nftables batches with `nft -f -`: one batch is one kernel
//! transaction, so a table is replaced whole or not at all.

use crate::error::{KernelError, Result};
use std::io::Write;
use std::process::{Command, Stdio};

pub fn apply(batch: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                KernelError::Nft(
                    "the nft command is missing; install it (apt-get install nftables)".into(),
                )
            } else {
                KernelError::io("run nft", e)
            }
        })?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(batch.as_bytes())
        .map_err(|e| KernelError::io("write to nft", e))?;
    let out = child
        .wait_with_output()
        .map_err(|e| KernelError::io("wait for nft", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(KernelError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// One table as `nft -j list table` prints it (JSON), None when it is absent.
pub fn list_table_json(family: &str, name: &str) -> Result<Option<String>> {
    list(&["-j", "list", "table", family, name])
}

/// The current ruleset of one table, as `nft list table` prints it.
pub fn list_table(family: &str, name: &str) -> Result<Option<String>> {
    list(&["list", "table", family, name])
}

/// What `nft ARGS` prints, None when it fails (the table is absent).
fn list(args: &[&str]) -> Result<Option<String>> {
    let out = Command::new("nft")
        .args(args)
        .output()
        .map_err(|e| KernelError::io("run nft", e))?;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
}
