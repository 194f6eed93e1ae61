//! What the lab-based benchmarks (converge, overlay) share: the weft binary
//! to run, and guards that remove the lab and the base directory on every
//! exit path.

use std::path::{Path, PathBuf};
use weft_lab::Lab;

/// `--weft`, else the `weft` next to the running benchmark.
pub fn weft_binary(given: Option<&PathBuf>) -> Result<PathBuf, String> {
    let weft = match given {
        Some(w) => w.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .parent()
            .ok_or("no exe dir")?
            .join("weft"),
    };
    if !weft.exists() {
        return Err(format!(
            "{} is missing: cargo build --release -p weft",
            weft.display()
        ));
    }
    Ok(weft)
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
