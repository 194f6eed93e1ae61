//! Waiting with a deadline: for a condition to hold, for a command to end.

use crate::{Error, Result};
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a condition of [`eventually`] answers: `true`/`Ok(())` when it
/// holds; `false` or `Err(why)` when not (yet).
pub trait Check {
    fn check(self) -> std::result::Result<(), String>;
}

impl Check for bool {
    fn check(self) -> std::result::Result<(), String> {
        if self {
            Ok(())
        } else {
            Err("still false".into())
        }
    }
}

impl Check for std::result::Result<(), String> {
    fn check(self) -> std::result::Result<(), String> {
        self
    }
}

/// Polls `f` every 50 ms until it holds and returns how long that took;
/// panics with `what` and the last answer once `timeout` has passed.
pub fn eventually<C: Check>(what: &str, timeout: Duration, f: impl FnMut() -> C) -> Duration {
    eventually_every(what, timeout, Duration::from_millis(50), f)
}

/// [`eventually`], polling every `every`.
pub fn eventually_every<C: Check>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> C,
) -> Duration {
    let start = Instant::now();
    loop {
        match f().check() {
            Ok(()) => return start.elapsed(),
            Err(e) if start.elapsed() > timeout => {
                panic!("timed out after {timeout:?} waiting for {what}: {e}")
            }
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// Runs `cmd` (stdin from /dev/null, stdout and stderr captured) and
/// returns its output; panics if it cannot start or takes longer than
/// `limit` (it is killed then).
pub fn output_within(mut cmd: Command, limit: Duration) -> Output {
    run_within(&mut cmd, limit).unwrap_or_else(|e| panic!("{e}"))
}

/// [`output_within`], as a result: an error if `cmd` cannot start or takes
/// longer than `limit` (then it is killed).
pub fn run_within(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error(format!("cannot run {cmd:?}: {e}")))?;
    // Read both pipes while waiting, so a chatty command cannot block; a
    // process it left behind holding them open cannot keep us past `limit`.
    let deadline = Instant::now() + limit;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            let _ = tx.send(buf);
        });
        rx
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let late = |cmd: &Command| Error(format!("{cmd:?} took more than {limit:?}"));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(late(cmd));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(Error(format!("waiting for {cmd:?}: {e}"))),
        }
    };
    let collect = |rx: mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| late(cmd))
    };
    Ok(Output {
        status,
        stdout: collect(stdout)?,
        stderr: collect(stderr)?,
    })
}
