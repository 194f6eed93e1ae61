//! Metrics as the agent keeps them and Prometheus reads them.
//!
//! Hot paths (attach, every DNS query) only bump atomics: a [`Counter`] or a
//! [`Histogram`], found once through a [`Family`] by its label values and
//! kept. Values that already live elsewhere (a device's byte counters, the
//! number of sandboxes) are read at scrape time and written straight into
//! the exposition with [`Text`]; nothing copies them in between.
//!
//! The exposition is Prometheus's text format, version 0.0.4.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The content type of [`Text`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Seconds, for latencies from tens of microseconds (a DNS answer) to
/// seconds (an attach that waits for a slow `nft -f`).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Observations counted into cumulative buckets, with their sum.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative (one atomic add per observation); made
    /// cumulative when rendered.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// The sum in nanoseconds (or millionths of the unit for `observe`), so
    /// it stays an integer atomic.
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// `bounds` are the buckets' upper bounds, ascending; `+Inf` is implied.
    pub fn new(bounds: &'static [f64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "ascending bounds");
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn latency() -> Histogram {
        Histogram::new(LATENCY_BUCKETS)
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = (v.max(0.0) * 1e9) as u64;
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum(&self) -> f64 {
        self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }
}

/// A member's labels: (name, value) pairs.
type Labels = Vec<(&'static str, String)>;

/// One metric per combination of label values, made on first use.
pub struct Family<M> {
    labels: &'static [&'static str],
    make: fn() -> M,
    members: Mutex<BTreeMap<Vec<String>, Arc<M>>>,
}

impl<M> Family<M> {
    pub fn new(labels: &'static [&'static str], make: fn() -> M) -> Family<M> {
        Family {
            labels,
            make,
            members: Mutex::new(BTreeMap::new()),
        }
    }

    /// The member for these label values (in the order of the family's
    /// label names). Keep the `Arc` on a hot path instead of asking again.
    pub fn with(&self, values: &[&str]) -> Arc<M> {
        assert_eq!(
            values.len(),
            self.labels.len(),
            "label values for {:?}",
            self.labels
        );
        let mut members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        // Families are small (a member per network or outcome): a scan
        // finds one without allocating a key.
        let same = |k: &Vec<String>| k.iter().map(String::as_str).eq(values.iter().copied());
        if let Some((_, m)) = members.iter().find(|(k, _)| same(k)) {
            return Arc::clone(m);
        }
        let m = Arc::new((self.make)());
        members.insert(
            values.iter().map(|v| v.to_string()).collect(),
            Arc::clone(&m),
        );
        m
    }

    fn each(&self) -> Vec<(Labels, Arc<M>)> {
        let members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        members
            .iter()
            .map(|(values, m)| {
                let labels = self.labels.iter().copied().zip(values.iter().cloned());
                (labels.collect(), Arc::clone(m))
            })
            .collect()
    }
}

impl Family<Counter> {
    pub fn counters(labels: &'static [&'static str]) -> Self {
        Family::new(labels, Counter::default)
    }
}

impl Family<Histogram> {
    pub fn latencies(labels: &'static [&'static str]) -> Self {
        Family::new(labels, Histogram::latency)
    }
}

/// What a metric is, for its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A text exposition being written: each metric's `# HELP` and `# TYPE`
/// once, then its samples.
#[derive(Debug, Default)]
pub struct Text {
    out: String,
}

impl Text {
    pub fn new() -> Text {
        Text::default()
    }

    /// Starts a metric. Every sample of it must follow before the next
    /// metric starts (the format wants a metric's samples together).
    pub fn metric(&mut self, name: &str, help: &str, kind: Kind) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    /// One sample: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }

    /// A counter family: `name` should end in `_total`.
    pub fn counters(&mut self, name: &str, help: &str, family: &Family<Counter>) {
        self.metric(name, help, Kind::Counter);
        for (labels, c) in family.each() {
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            self.sample(name, &labels, c.get() as f64);
        }
    }

    /// A histogram family: `_bucket` (cumulative, ending in `+Inf`), `_sum`
    /// and `_count` per member.
    pub fn histograms(&mut self, name: &str, help: &str, family: &Family<Histogram>) {
        self.metric(name, help, Kind::Histogram);
        for (labels, h) in family.each() {
            let mut with_le: Vec<(&str, &str)> =
                labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let plain = with_le.clone();
            // Read the total first: buckets bumped after it only make the
            // `+Inf` bucket (set to the total) no smaller than the others.
            let total = h.count();
            let mut cumulative = 0u64;
            let bucket = format!("{name}_bucket");
            let les: Vec<String> = h.bounds.iter().map(|b| format_value(*b)).collect();
            for (le, n) in les.iter().zip(&h.buckets) {
                cumulative += n.load(Ordering::Relaxed);
                with_le.push(("le", le));
                self.sample(&bucket, &with_le, cumulative.min(total) as f64);
                with_le.pop();
            }
            with_le.push(("le", "+Inf"));
            self.sample(&bucket, &with_le, total as f64);
            self.sample(&format!("{name}_sum"), &plain, h.sum());
            self.sample(&format!("{name}_count"), &plain, total as f64);
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_keeps_one_member_per_label_values() {
        let f = Family::counters(&["network", "result"]);
        f.with(&["a", "ok"]).inc();
        f.with(&["a", "ok"]).add(2);
        f.with(&["b", "error"]).inc();
        let mut t = Text::new();
        t.counters("weft_x_total", "Things.", &f);
        assert_eq!(
            t.finish(),
            "# HELP weft_x_total Things.\n# TYPE weft_x_total counter\n\
             weft_x_total{network=\"a\",result=\"ok\"} 3\n\
             weft_x_total{network=\"b\",result=\"error\"} 1\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        static B: &[f64] = &[0.1, 1.0];
        let f = Family::new(&["op"], || Histogram::new(B));
        let h = f.with(&["attach"]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(7.0);
        let mut t = Text::new();
        t.histograms("weft_d_seconds", "Durations.", &f);
        let text = t.finish();
        assert!(
            text.contains("weft_d_seconds_bucket{op=\"attach\",le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("weft_d_seconds_bucket{op=\"attach\",le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("weft_d_seconds_bucket{op=\"attach\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("weft_d_seconds_count{op=\"attach\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("weft_d_seconds_sum{op=\"attach\"} 7.55\n"),
            "{text}"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut t = Text::new();
        t.metric("weft_g", "a \\ b\nc", Kind::Gauge);
        t.sample("weft_g", &[("name", "q\"x\\y\nz")], 1.5);
        assert_eq!(
            t.finish(),
            "# HELP weft_g a \\\\ b\\nc\n# TYPE weft_g gauge\nweft_g{name=\"q\\\"x\\\\y\\nz\"} 1.5\n"
        );
    }
}
