//! What the lab-based benchmarks (converge, overlay) share: the weft binary
//! to run, and guards that remove the lab and the base directory on every
//! exit path.

use std::path::{Path, PathBuf};
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
