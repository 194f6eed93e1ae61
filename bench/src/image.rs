//! A minimal root file system for one dynamically linked program: the
//! program, the shared libraries `ldd` lists for it and the dynamic loader,
//! each at the path `ldd` names, plus an empty /tmp. Made for
//! `docker import` (see [`crate::docker::DockerHarness::import_tree`]).

use crate::sys::{bail, run_ok, Context, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The files a program needs according to `ldd` output: libraries
/// (`name => /path (0x…)`) and the loader (`/path (0x…)`). The vDSO, which
/// has no file, is left out; a library `not found` is an error.
pub fn ldd_files(ldd_output: &str) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for line in ldd_output.lines() {
        let l = line.trim();
        if l.is_empty() {
            continue;
        }
        let path = if let Some((name, rest)) = l.split_once("=>") {
            let rest = rest.trim();
            if rest.starts_with("not found") {
                return bail(format!("ldd: library {} not found", name.trim()));
            }
            rest.split_whitespace().next().unwrap_or("")
        } else {
            l.split_whitespace().next().unwrap_or("")
        };
        // `linux-vdso.so.1 (0x…)` and the like: no file behind it.
        if path.starts_with('/') {
            let p = PathBuf::from(path);
            if !files.contains(&p) {
                files.push(p);
            }
        }
    }
    if files.is_empty() {
        return bail(format!(
            "ldd listed no files (a static program?): {ldd_output:?}"
        ));
    }
    Ok(files)
}

fn copy_into(root: &Path, src: &Path) -> Result<()> {
    let rel = src
        .strip_prefix("/")
        .context(format_args!("{} is not an absolute path", src.display()))?;
    let dst = root.join(rel);
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent).context(format_args!("creating {}", parent.display()))?;
    }
    // fs::copy follows symlinks: the image gets a regular file under the
    // name the loader looks for.
    fs::copy(src, &dst).context(format_args!(
        "copying {} to {}",
        src.display(),
        dst.display()
    ))?;
    Ok(())
}

/// Fills `root` (which must exist) with `program`, what it links to and
/// /tmp (mode 1777). Returns the files copied, program first.
pub fn program_rootfs(program: &Path, root: &Path) -> Result<Vec<PathBuf>> {
    let out = run_ok(Command::new("ldd").arg(program), Duration::from_secs(30)).context(
        format_args!("listing the libraries of {} with ldd", program.display()),
    )?;
    let mut files = vec![program.to_path_buf()];
    files.extend(ldd_files(&String::from_utf8_lossy(&out.stdout))?);
    for f in &files {
        copy_into(root, f)?;
    }
    let tmp = root.join("tmp");
    fs::create_dir_all(&tmp).context(format_args!("creating {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))
        .context(format_args!("chmod 1777 {}", tmp.display()))?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldd() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibiperf.so.0 => /lib/x86_64-linux-gnu/libiperf.so.0 (0x00007f46)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f45)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f47)\n";
        let f = ldd_files(out).unwrap();
        assert_eq!(
            f,
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libiperf.so.0"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(ldd_files("\tlibfoo.so.1 => not found\n").is_err());
        assert!(ldd_files("\tnot a dynamic executable\n").is_err());
    }
}
