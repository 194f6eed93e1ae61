//! Results: JSON and the readable table.

use crate::harness::Measured;
use crate::stats::Summary;
use serde::Serialize;
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Way {
    Weft,
    Docker,
    Cni,
    /// `attach --net shared`: weft on a local bridge network, as a lab host.
    #[serde(rename = "weft-bridge")]
    WeftBridge,
    /// … and on a network whose one subnet is shared by all hosts.
    #[serde(rename = "weft-shared")]
    WeftShared,
}

impl Way {
    pub fn name(self) -> &'static str {
        match self {
            Way::Weft => "weft",
            Way::Docker => "docker",
            Way::Cni => "cni",
            Way::WeftBridge => "weft-bridge",
            Way::WeftShared => "weft-shared",
        }
    }

    /// What is measured, attach / remove.
    pub fn label(self) -> &'static str {
        match self {
            Way::Weft => "weft run -d / rm -f",
            Way::Docker => "docker run -d / rm -f",
            Way::Cni => "cni bridge ADD / DEL",
            Way::WeftBridge => "weft run -d --net bridge-net",
            Way::WeftShared => "weft run -d --net shared-net",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Samples {
    pub attach_ms: Vec<f64>,
    pub remove_ms: Vec<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub network_setup_ms: Vec<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub network_teardown_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WayReport {
    pub way: Way,
    pub measures: &'static str,
    pub attach: Summary,
    pub remove: Summary,
    /// weft only: the agent's own timing of the network part.
    pub network_setup: Option<Summary>,
    pub network_teardown: Option<Summary>,
    /// Seconds spent starting the daemon/namespace, attaching, removing,
    /// tearing down, and in all.
    pub start_s: f64,
    pub attach_phase_s: f64,
    pub remove_phase_s: f64,
    pub teardown_s: f64,
    pub total_s: f64,
    pub notes: Vec<String>,
    pub samples: Samples,
}

impl WayReport {
    pub fn new(way: Way, m: Measured, start_s: f64, teardown_s: f64, notes: Vec<String>) -> Self {
        let opt = |s: &crate::stats::Series| (!s.is_empty()).then(|| s.summary());
        let attach_phase_s = m.attach_phase.as_secs_f64();
        let remove_phase_s = m.remove_phase.as_secs_f64();
        WayReport {
            way,
            measures: way.label(),
            attach: m.attach.summary(),
            remove: m.remove.summary(),
            network_setup: opt(&m.inner_attach),
            network_teardown: opt(&m.inner_remove),
            start_s,
            attach_phase_s,
            remove_phase_s,
            teardown_s,
            total_s: start_s + attach_phase_s + remove_phase_s + teardown_s,
            notes,
            samples: Samples {
                attach_ms: m.attach.0,
                remove_ms: m.remove.0,
                network_setup_ms: m.inner_attach.0,
                network_teardown_ms: m.inner_remove.0,
            },
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    /// docker run median / weft run median
    pub docker_run_over_weft_run: Option<f64>,
    /// CNI ADD median / weft run median
    pub cni_add_over_weft_run: Option<f64>,
    /// CNI DEL median / weft rm median
    pub cni_del_over_weft_rm: Option<f64>,
    /// docker rm median / weft rm median
    pub docker_rm_over_weft_rm: Option<f64>,
    pub weft_network_setup_median_ms: Option<f64>,
    pub weft_network_teardown_median_ms: Option<f64>,
    /// weft run on a shared-subnet network / on a local bridge network, medians
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_run_over_bridge_run: Option<f64>,
    /// weft rm of the same, medians
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_rm_over_bridge_rm: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub n: usize,
    pub ways: Vec<WayReport>,
    pub ratios: Ratios,
}

impl RunReport {
    pub fn new(n: usize, ways: Vec<WayReport>) -> RunReport {
        let get = |w: Way| ways.iter().find(|r| r.way == w);
        let div = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        let mut ratios = Ratios::default();
        if let Some(weft) = get(Way::Weft) {
            if let Some(d) = get(Way::Docker) {
                ratios.docker_run_over_weft_run = div(d.attach.median_ms, weft.attach.median_ms);
                ratios.docker_rm_over_weft_rm = div(d.remove.median_ms, weft.remove.median_ms);
            }
            if let Some(c) = get(Way::Cni) {
                ratios.cni_add_over_weft_run = div(c.attach.median_ms, weft.attach.median_ms);
                ratios.cni_del_over_weft_rm = div(c.remove.median_ms, weft.remove.median_ms);
            }
        }
        if let (Some(s), Some(b)) = (get(Way::WeftShared), get(Way::WeftBridge)) {
            ratios.shared_run_over_bridge_run = div(s.attach.median_ms, b.attach.median_ms);
            ratios.shared_rm_over_bridge_rm = div(s.remove.median_ms, b.remove.median_ms);
        }
        if let Some(weft) = get(Way::Weft) {
            ratios.weft_network_setup_median_ms = weft.network_setup.as_ref().map(|s| s.median_ms);
            ratios.weft_network_teardown_median_ms =
                weft.network_teardown.as_ref().map(|s| s.median_ms);
        }
        RunReport { n, ways, ratios }
    }

    /// The readable table for this N.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let took: Vec<String> = self
            .ways
            .iter()
            .map(|w| format!("{} {:.1} s", w.way.name(), w.total_s))
            .collect();
        let _ = writeln!(t, "N = {}   (took: {})", self.n, took.join(", "));
        let _ = writeln!(
            t,
            "  {:<32} {:>29}   {:>9} {:>9} {:>9}   {:>19}",
            "", "attach ms", "", "", "", "remove ms"
        );
        let _ = writeln!(
            t,
            "  {:<32} {:>9} {:>9} {:>9}   {:>9} {:>9} {:>9}   {:>9} {:>9}",
            "", "median", "p99", "max", "first10", "last10", "last/10th", "median", "p99"
        );
        for w in &self.ways {
            row(&mut t, w.measures, &w.attach, &w.remove);
            if let (Some(a), Some(r)) = (&w.network_setup, &w.network_teardown) {
                row(&mut t, "  weft network setup / teardown", a, r);
            }
        }
        let mut parts = Vec::new();
        let r = &self.ratios;
        let x = |v: Option<f64>| v.map(|v| format!("{v:.2}x"));
        if let Some(v) = x(r.docker_run_over_weft_run) {
            parts.push(format!("docker run / weft run {v}"));
        }
        if let Some(v) = x(r.cni_add_over_weft_run) {
            parts.push(format!("cni ADD / weft run {v}"));
        }
        if let Some(v) = x(r.cni_del_over_weft_rm) {
            parts.push(format!("cni DEL / weft rm {v}"));
        }
        if let Some(v) = x(r.docker_rm_over_weft_rm) {
            parts.push(format!("docker rm / weft rm {v}"));
        }
        if let Some(v) = x(r.shared_run_over_bridge_run) {
            parts.push(format!("shared run / bridge run {v} (goal <= 2x)"));
        }
        if let Some(v) = x(r.shared_rm_over_bridge_rm) {
            parts.push(format!("shared rm / bridge rm {v}"));
        }
        if let Some(v) = r.weft_network_setup_median_ms {
            parts.push(format!("weft network setup median {v:.3} ms"));
        }
        if let Some(v) = r.weft_network_teardown_median_ms {
            parts.push(format!("teardown median {v:.3} ms"));
        }
        if !parts.is_empty() {
            let _ = writeln!(t, "  ratios of medians: {}", parts.join(" | "));
        }
        for w in &self.ways {
            let _ = writeln!(
                t,
                "  {}: start {:.1} s, attach {:.1} s, remove {:.1} s, teardown {:.1} s{}",
                w.way.name(),
                w.start_s,
                w.attach_phase_s,
                w.remove_phase_s,
                w.teardown_s,
                if w.notes.is_empty() {
                    String::new()
                } else {
                    format!("; {}", w.notes.join("; "))
                }
            );
        }
        t
    }
}

fn row(t: &mut String, label: &str, a: &Summary, r: &Summary) {
    let _ = writeln!(
        t,
        "  {:<32} {:>9.3} {:>9.3} {:>9.3}   {:>9.3} {:>9.3} {:>9.2}   {:>9.3} {:>9.3}",
        label,
        a.median_ms,
        a.p99_ms,
        a.max_ms,
        a.first10_median_ms,
        a.last10_median_ms,
        a.last_over_first10,
        r.median_ms,
        r.p99_ms
    );
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub kernel: String,
    pub cpus: usize,
    pub warmup: usize,
    pub runs: Vec<RunReport>,
    pub total_s: f64,
}
