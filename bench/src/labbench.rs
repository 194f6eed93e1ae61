//! What the lab-based benchmarks (converge, overlay, attach --net) share:
//! the weft binary to run, guards that remove the lab and the base
//! directory on every exit path, and `weft run -d` / `weft rm -f` on a lab
//! host as a [`Harness`] of bench/attach.

use crate::harness::{Harness, Sample};
use crate::sys::{self, bail, timed, Context};
use crate::weft::{parse_rm, WeftRun};
use std::path::{Path, PathBuf};
use std::time::Duration;
use weft_lab::Lab;

/// `--weft`, else `$WEFT_BIN`, else the `weft` next to the running
/// benchmark (weft-testkit's rule).
pub fn weft_binary(given: Option<&PathBuf>) -> Result<PathBuf, String> {
    match given {
        Some(w) if w.exists() => Ok(w.clone()),
        Some(w) => Err(format!(
            "{} is missing: cargo build --release -p weft",
            w.display()
        )),
        None => weft_testkit::find_weft_bin().map_err(|e| e.to_string()),
    }
}

/// Takes a lab down on drop.
pub struct LabGuard(pub Lab);

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = weft_lab::down(&self.0.dir) {
            eprintln!("lab down: {e}");
        }
    }
}

/// Removes a directory tree on drop.
pub struct RemoveDir<'a>(pub &'a Path);

impl Drop for RemoveDir<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0);
    }
}

/// `weft run -d --net NET` and `weft rm -f` as one host of a lab, timed
/// (spawn to exit) with the agent's own network times, as
/// [`crate::weft::WeftHarness`] does on an agent of its own. Sandboxes it
/// attached and did not remove are removed on drop.
pub struct LabHost<'a> {
    lab: &'a Lab,
    host: usize,
    net: String,
    /// Where `timed` puts the command's output.
    scratch: PathBuf,
    live: Vec<String>,
}

impl<'a> LabHost<'a> {
    pub fn new(lab: &'a Lab, host: usize, net: &str, scratch: &Path) -> sys::Result<LabHost<'a>> {
        std::fs::create_dir_all(scratch).context(format_args!("create {}", scratch.display()))?;
        Ok(LabHost {
            lab,
            host,
            net: net.to_string(),
            scratch: scratch.to_path_buf(),
            live: Vec::new(),
        })
    }

    fn timed(&self, args: &[&str]) -> sys::Result<(Duration, std::process::Output)> {
        let (wall, out) = timed(&mut self.lab.weft(self.host, args), None, &self.scratch)?;
        if !out.status.success() {
            return bail(format!(
                "h{}: `weft {}` failed ({}): {}",
                self.host + 1,
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok((wall, out))
    }
}

impl Harness for LabHost<'_> {
    type Handle = String;

    fn attach(&mut self) -> sys::Result<(String, Sample)> {
        let args = [
            "run", "-d", "--format", "json", "--net", &self.net, "--", "sleep", "infinity",
        ];
        let (wall, out) = self.timed(&args)?;
        let r = WeftRun::parse(&out.stdout, wall, &format!("weft {}", args.join(" ")))?;
        self.live.push(r.id.clone());
        Ok((
            r.id,
            Sample {
                wall,
                inner_us: Some(r.network_setup_us),
            },
        ))
    }

    fn remove(&mut self, id: String) -> sys::Result<Sample> {
        let args = ["rm", "-f", "--format", "json", &id];
        let (wall, out) = self.timed(&args)?;
        self.live.retain(|l| *l != id);
        let teardown = parse_rm(&out.stdout, &id, &self.lab.weft(self.host, &args))?;
        Ok(Sample {
            wall,
            inner_us: Some(teardown),
        })
    }
}

impl Drop for LabHost<'_> {
    fn drop(&mut self) {
        if self.live.is_empty() {
            return;
        }
        let mut args = vec!["rm".to_string(), "-f".into()];
        args.append(&mut self.live);
        let _ = self.lab.weft(self.host, &args).output();
    }
}
