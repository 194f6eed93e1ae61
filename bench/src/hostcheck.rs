//! A snapshot of the machine's own network state (links, addresses, routes,
//! rules, nftables tables, named namespaces) taken before and after the
//! benchmark, to prove that everything happened inside our namespaces and
//! that nothing was left behind.

use crate::netns;
use crate::sys::run;
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostSnapshot {
    items: BTreeSet<String>,
}

fn lines(program: &str, args: &[&str]) -> Vec<String> {
    match run(Command::new(program).args(args), Duration::from_secs(30)) {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

/// Drops the changing lifetime fields of IPv6 routes ("expires 123sec").
fn stable_route(line: &str) -> String {
    let mut out = Vec::new();
    let mut skip = false;
    for tok in line.split_whitespace() {
        if skip {
            skip = false;
            continue;
        }
        if tok == "expires" {
            skip = true;
            continue;
        }
        out.push(tok);
    }
    out.join(" ")
}

impl HostSnapshot {
    pub fn take() -> HostSnapshot {
        let mut items = BTreeSet::new();
        for l in lines("ip", &["-o", "link", "show"]) {
            if let Some(name) = l.split_whitespace().nth(1) {
                items.insert(format!("link {}", name.trim_end_matches(':')));
            }
        }
        for l in lines("ip", &["-o", "addr", "show"]) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 4 {
                items.insert(format!("address {} {}", f[1], f[3]));
            }
        }
        for fam in ["-4", "-6"] {
            for l in lines("ip", &[fam, "route", "show", "table", "all"]) {
                items.insert(format!("route {}", stable_route(&l)));
            }
            for l in lines("ip", &[fam, "rule", "show"]) {
                items.insert(format!("rule {l}"));
            }
        }
        for l in lines("nft", &["list", "tables"]) {
            items.insert(format!("nft {l}"));
        }
        if let Ok(rd) = fs::read_dir("/run/netns") {
            for e in rd.flatten() {
                items.insert(format!("netns {}", e.file_name().to_string_lossy()));
            }
        }
        HostSnapshot { items }
    }

    /// What appeared or disappeared since `before`.
    pub fn diff(&self, before: &HostSnapshot) -> Vec<String> {
        let mut d: Vec<String> = self
            .items
            .difference(&before.items)
            .map(|i| format!("new: {i}"))
            .collect();
        d.extend(
            before
                .items
                .difference(&self.items)
                .map(|i| format!("gone: {i}")),
        );
        d
    }
}

/// Processes whose command line mentions `needle` (e.g. our directory).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        let Ok(raw) = fs::read(Path::new("/proc").join(&name).join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{name}: {}", cmdline.trim()));
        }
    }
    found
}

/// After a run, with every guard dropped: compares the machine's network
/// state with `before`, and looks for our namespaces (names containing
/// `pid`), our work directory `base` and processes mentioning it. Prints
/// what it finds, or `cleanup: ok`; returns whether all is clean.
pub fn check_clean(before: &HostSnapshot, base: &Path, pid: u32) -> bool {
    let mut ok = true;
    let after = HostSnapshot::take();
    // Named namespaces of other programs (a test suite running meanwhile)
    // are not ours: every namespace the benchmark names starts with PREFIX.
    let (others, diff): (Vec<String>, Vec<String>) =
        after.diff(before).into_iter().partition(|d| {
            let item = d
                .strip_prefix("new: ")
                .or_else(|| d.strip_prefix("gone: "))
                .unwrap_or(d);
            item.strip_prefix("netns ")
                .is_some_and(|name| !name.starts_with(netns::PREFIX))
        });
    if !others.is_empty() {
        eprintln!(
            "note: other programs' namespaces came or went during the run (not ours, whose names start with {:?}): {}",
            netns::PREFIX,
            others.join(", ")
        );
    }
    if !diff.is_empty() {
        ok = false;
        eprintln!("warning: the machine's network state changed during the run (ours, or someone else's):");
        for d in diff {
            eprintln!("  {d}");
        }
    }
    let ours = netns::list_with_prefix(netns::PREFIX)
        .into_iter()
        .filter(|n| n.contains(&pid.to_string()))
        .collect::<Vec<_>>();
    if !ours.is_empty() {
        ok = false;
        eprintln!("warning: namespaces left behind: {ours:?}");
    }
    if base.exists() {
        ok = false;
        eprintln!("warning: {} was not removed", base.display());
    }
    let procs = processes_mentioning(&base.to_string_lossy());
    if !procs.is_empty() {
        ok = false;
        eprintln!("warning: processes still running:");
        for p in procs {
            eprintln!("  {p}");
        }
    }
    if ok {
        eprintln!("cleanup: ok (no namespaces, links, addresses, routes, rules, nft tables, processes or files left)");
    }
    ok
}

/// The body of a benchmark's `main`: signal handlers, a snapshot of the
/// host, `run` (in `root`/wftbench-PID), then the check that nothing is left.
/// `run` returns whether its own results were good.
pub fn run_checked(
    name: &str,
    root: &Path,
    run: impl FnOnce(&Path, u32) -> crate::sys::Result<bool>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    if let Err(e) = crate::sys::install_signal_handlers() {
        eprintln!("{name}: error: {e}");
        return ExitCode::FAILURE;
    }
    let before = HostSnapshot::take();
    let pid = std::process::id();
    let base = root.join(format!("wftbench-{pid}"));
    let result = run(&base, pid);
    if let Err(e) = &result {
        eprintln!("{name}: error: {e}");
    }
    // Every guard has been dropped by now; check that nothing is left.
    let clean = check_clean(&before, &base, pid);
    match result {
        Ok(true) if clean => ExitCode::SUCCESS,
        Err(_) if crate::sys::interrupted() => ExitCode::from(130),
        _ => ExitCode::FAILURE,
    }
}
