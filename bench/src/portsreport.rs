//! Results of the `ports` benchmark: JSON and the readable text.

use crate::iperf::LoadSeen;
use crate::nftcount::TableCount;
use crate::stats::median;
use serde::Serialize;
use std::fmt::Write;

/// One way to reach an iperf3 server, measured several times.
#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    pub label: String,
    /// Namespace the client ran in.
    pub from: String,
    /// ADDRESS:PORT the client connected to.
    pub target: String,
    pub gbps: Vec<f64>,
    pub median_gbps: Option<f64>,
    pub retransmits: Vec<Option<u64>>,
    /// The load before each measurement.
    pub load: Vec<LoadSeen>,
    /// Why measuring stopped, if it did (the remaining runs are skipped).
    pub error: Option<String>,
}

impl PathResult {
    pub fn new(label: String, from: String, target: String) -> PathResult {
        PathResult {
            label,
            from,
            target,
            gbps: Vec::new(),
            median_gbps: None,
            retransmits: Vec::new(),
            load: Vec::new(),
            error: None,
        }
    }

    pub fn finish(&mut self) {
        self.median_gbps = (!self.gbps.is_empty()).then(|| median(&self.gbps));
    }
}

/// A published port against the same server reached directly.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub way: String,
    pub scenario: String,
    pub published: PathResult,
    pub direct: PathResult,
    /// median published / median direct.
    pub ratio: Option<f64>,
}

impl Pair {
    pub fn finish(&mut self) {
        self.published.finish();
        self.direct.finish();
        self.ratio = match (self.published.median_gbps, self.direct.median_gbps) {
            (Some(p), Some(d)) if d > 0.0 => Some(p / d),
            _ => None,
        };
    }
}

/// Time to publish one more port at one level of ports already published.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    /// Ports published when the probes ran (not counting them).
    pub ports: usize,
    /// Wall time of each `weft run` that published the bulk ports added to
    /// reach this level, with how many ports each published.
    pub bulk_runs: Vec<(usize, f64)>,
    pub table: TableCount,
    /// With the probe sandboxes present.
    pub table_with_probes: TableCount,
    /// After removing them again.
    pub table_after: TableCount,
    pub load: LoadSeen,
    /// `weft run -d -p PORT:80 -- sleep infinity`: wall ms and the agent's
    /// network_setup ms.
    pub publish_wall_ms: Vec<f64>,
    pub publish_setup_ms: Vec<f64>,
    /// The same without `-p`, interleaved with them, for reference.
    pub plain_wall_ms: Vec<f64>,
    pub plain_setup_ms: Vec<f64>,
    /// Then `weft rm -f ID` of each of them, one by one in the order made:
    /// wall ms and the agent's network_teardown ms.
    pub unpublish_wall_ms: Vec<f64>,
    pub unpublish_teardown_ms: Vec<f64>,
    pub plain_rm_wall_ms: Vec<f64>,
    pub plain_rm_teardown_ms: Vec<f64>,
}

impl Level {
    pub fn publish_wall_median(&self) -> f64 {
        median(&self.publish_wall_ms)
    }
    pub fn publish_setup_median(&self) -> f64 {
        median(&self.publish_setup_ms)
    }
    pub fn plain_wall_median(&self) -> f64 {
        median(&self.plain_wall_ms)
    }
    pub fn plain_setup_median(&self) -> f64 {
        median(&self.plain_setup_ms)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Scale {
    /// The table with no port published.
    pub empty_table: TableCount,
    pub levels: Vec<Level>,
    /// Whether every count of rules (text and JSON) was the same.
    pub rules_constant: bool,
    /// Between the last two levels (e.g. 10000 and 1000): ratios of the
    /// medians of wall time and of network_setup.
    pub last_over_previous_wall: Option<f64>,
    pub last_over_previous_setup: Option<f64>,
    /// The same for removing a sandbox with one published port.
    pub unpublish_last_over_previous_wall: Option<f64>,
    pub unpublish_last_over_previous_teardown: Option<f64>,
    pub took_s: f64,
}

impl Scale {
    pub fn finish(&mut self) {
        let mut all = vec![self.empty_table];
        for l in &self.levels {
            all.extend([l.table, l.table_with_probes, l.table_after]);
        }
        let first = all[0].rules;
        self.rules_constant = all
            .iter()
            .all(|t| t.rules == first && t.rules_json == first);
        if let [.., prev, last] = self.levels.as_slice() {
            self.last_over_previous_wall =
                Some(last.publish_wall_median() / prev.publish_wall_median());
            self.last_over_previous_setup =
                Some(last.publish_setup_median() / prev.publish_setup_median());
            self.unpublish_last_over_previous_wall =
                Some(median(&last.unpublish_wall_ms) / median(&prev.unpublish_wall_ms));
            self.unpublish_last_over_previous_teardown =
                Some(median(&last.unpublish_teardown_ms) / median(&prev.unpublish_teardown_ms));
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PortsReport {
    pub kernel: String,
    pub cpus: usize,
    pub iperf3: String,
    pub seconds: u32,
    pub reps: usize,
    pub congestion: String,
    pub max_load: f64,
    pub throughput: Vec<Pair>,
    pub scale: Option<Scale>,
    pub notes: Vec<String>,
    pub total_s: f64,
}

fn loads(p: &PathResult) -> String {
    if p.load.is_empty() {
        return String::new();
    }
    let v: Vec<String> = p
        .load
        .iter()
        .map(|l| format!("{:.2}", l.at_start))
        .collect();
    let gave_up = p.load.iter().filter(|l| l.gave_up).count();
    format!(
        "load {}{}",
        v.join("/"),
        if gave_up > 0 {
            format!(" ({gave_up} run(s) NOT quiet: waited the limit, measured anyway)")
        } else {
            String::new()
        }
    )
}

fn path_line(t: &mut String, p: &PathResult) {
    let runs: Vec<String> = p.gbps.iter().map(|g| format!("{g:.2}")).collect();
    let med = p
        .median_gbps
        .map_or_else(|| "-".to_string(), |m| format!("{m:.2}"));
    let _ = writeln!(
        t,
        "    {:<56} {:>7}  [{}]  {}",
        p.label,
        med,
        runs.join(" "),
        loads(p)
    );
    if let Some(e) = &p.error {
        let _ = writeln!(t, "      FAILED: {e}");
    }
}

impl PortsReport {
    pub fn text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "ports: kernel {}, {} CPUs{}",
            self.kernel,
            self.cpus,
            if self.iperf3.is_empty() {
                String::new()
            } else {
                format!(", {}", self.iperf3)
            }
        );
        if !self.throughput.is_empty() {
            let _ = writeln!(
                t,
                "\nThroughput, TCP, one stream, -C {} (both ends), {} s per run, median of {} runs, Gbit/s\n(each run starts once the 1-minute load average is below {}; the load seen is listed)",
                self.congestion, self.seconds, self.reps, self.max_load
            );
            for pair in &self.throughput {
                let _ = writeln!(t, "  {} — {}", pair.way, pair.scenario);
                path_line(&mut t, &pair.published);
                path_line(&mut t, &pair.direct);
                let _ = writeln!(
                    t,
                    "    published / direct: {}",
                    pair.ratio
                        .map_or_else(|| "-".to_string(), |r| format!("{r:.3}"))
                );
            }
        }
        if let Some(s) = &self.scale {
            let _ = writeln!(
                t,
                "\nweft: nft rules and the time to publish one more port (medians of {} `weft run -d -p PORT:80 -- sleep infinity`;\n`without -p`: the same command without -p, interleaved, for reference)",
                s.levels.first().map_or(0, |l| l.publish_wall_ms.len())
            );
            let _ = writeln!(
                t,
                "  {:>7} {:>6} {:>9}   {:>14} {:>14}   {:>14} {:>14}   {:>5}",
                "ports",
                "rules",
                "elements",
                "publish wall",
                "publish setup",
                "w/o -p wall",
                "w/o -p setup",
                "load"
            );
            let _ = writeln!(
                t,
                "  {:>7} {:>6} {:>9}",
                0, s.empty_table.rules, s.empty_table.publish_elements
            );
            for l in &s.levels {
                let _ = writeln!(
                    t,
                    "  {:>7} {:>6} {:>9}   {:>11.3} ms {:>11.3} ms   {:>11.3} ms {:>11.3} ms   {:>5.2}{}",
                    l.ports,
                    l.table.rules,
                    l.table.publish_elements,
                    l.publish_wall_median(),
                    l.publish_setup_median(),
                    l.plain_wall_median(),
                    l.plain_setup_median(),
                    l.load.at_start,
                    if l.load.gave_up { " (not quiet)" } else { "" }
                );
            }
            let _ = writeln!(
                t,
                "\n  then `weft rm -f ID` of each, one by one (medians):\n  {:>7}   {:>14} {:>16}   {:>14} {:>16}",
                "ports", "rm wall", "rm teardown", "w/o -p rm wall", "w/o -p teardown"
            );
            for l in &s.levels {
                let _ = writeln!(
                    t,
                    "  {:>7}   {:>11.3} ms {:>13.3} ms   {:>11.3} ms {:>13.3} ms",
                    l.ports,
                    median(&l.unpublish_wall_ms),
                    median(&l.unpublish_teardown_ms),
                    median(&l.plain_rm_wall_ms),
                    median(&l.plain_rm_teardown_ms)
                );
            }
            let _ = writeln!(t);
            let counts: Vec<String> = std::iter::once(&s.empty_table)
                .chain(
                    s.levels
                        .iter()
                        .flat_map(|l| [&l.table, &l.table_with_probes, &l.table_after]),
                )
                .map(|c| {
                    if c.rules == c.rules_json {
                        c.rules.to_string()
                    } else {
                        format!("{}(json {})", c.rules, c.rules_json)
                    }
                })
                .collect();
            let _ = writeln!(
                t,
                "  rule count constant: {} (counted {} times: {})",
                if s.rules_constant { "yes" } else { "NO" },
                counts.len(),
                counts.join(" ")
            );
            if let (Some(w), Some(n), [.., prev, last]) = (
                s.last_over_previous_wall,
                s.last_over_previous_setup,
                s.levels.as_slice(),
            ) {
                let _ = writeln!(
                    t,
                    "  publish({}) / publish({}): wall {w:.3}x, network_setup {n:.3}x",
                    last.ports, prev.ports
                );
                if let (Some(w), Some(n)) = (
                    s.unpublish_last_over_previous_wall,
                    s.unpublish_last_over_previous_teardown,
                ) {
                    let _ = writeln!(
                        t,
                        "  rm with a published port({}) / ({}): wall {w:.3}x, network_teardown {n:.3}x",
                        last.ports, prev.ports
                    );
                }
            }
            for l in &s.levels {
                if !l.bulk_runs.is_empty() {
                    let runs: Vec<String> = l
                        .bulk_runs
                        .iter()
                        .map(|(n, ms)| format!("{n} ports {ms:.0} ms"))
                        .collect();
                    let _ = writeln!(
                        t,
                        "  to reach {}: weft run -d with {}",
                        l.ports,
                        runs.join(", ")
                    );
                }
            }
            let _ = writeln!(t, "  took {:.1} s", s.took_s);
        }
        if !self.notes.is_empty() {
            let _ = writeln!(t, "\nnotes:");
            for n in &self.notes {
                let _ = writeln!(t, "  - {n}");
            }
        }
        let _ = writeln!(t, "\ntotal {:.1} s", self.total_s);
        t
    }
}
