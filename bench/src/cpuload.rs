//! Per-CPU load while a measurement runs: a thread samples /proc/stat
//! every 100 ms, and afterwards each CPU's idle share over any stretch of
//! the run can be read back.
//!
//! Why: on a 2-core machine, multi-stream TCP over veth pairs has two
//! steady states. In one, both CPUs work (the sender's writes drive the
//! data path on its CPU, the receiver's reads and ACKs run on the other).
//! In the other, the ACKs arriving on the receiver's CPU transmit the
//! sender's queued data from the same softirq, so that one CPU carries the
//! whole path while the other sits mostly idle, and throughput falls to
//! between a quarter and a half. Which state a second is in is the
//! machine's doing, not the datapath's; a benchmark that compares two
//! datapaths has to see it to compare like with like.

use crate::sys::{bail, Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Jiffies one CPU has spent busy and in all, since boot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// Parses the `cpuN` lines of /proc/stat (not the `cpu` sum). Busy is
/// user, nice, system, irq, softirq and steal; idle and iowait are not.
pub fn parse_per_cpu(stat: &str) -> Result<Vec<CpuTimes>> {
    let mut cpus = Vec::new();
    for line in stat.lines() {
        let mut f = line.split_whitespace();
        let Some(name) = f.next() else { continue };
        if !name.starts_with("cpu") || name == "cpu" {
            continue;
        }
        let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
        if v.len() < 8 {
            return bail(format!("unexpected /proc/stat line {line:?}"));
        }
        let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
        cpus.push(CpuTimes {
            busy,
            total: busy + v[3] + v[4],
        });
    }
    if cpus.is_empty() {
        return bail("no cpuN lines in /proc/stat");
    }
    Ok(cpus)
}

/// Samples taken at known instants.
#[derive(Debug, Default, Clone)]
pub struct CpuSamples(pub Vec<(Instant, Vec<CpuTimes>)>);

impl CpuSamples {
    /// Each CPU's idle share (0..1) between the samples nearest to `from`
    /// and `to`; None if fewer than two samples fall in that stretch.
    pub fn idle_between(&self, from: Instant, to: Instant) -> Option<Vec<f64>> {
        let nearest = |t: Instant| {
            self.0
                .iter()
                .enumerate()
                .min_by_key(|(_, (at, _))| if *at > t { *at - t } else { t - *at })
                .map(|(i, _)| i)
        };
        let (a, b) = (nearest(from)?, nearest(to)?);
        if b <= a {
            return None;
        }
        let (s0, s1) = (&self.0[a].1, &self.0[b].1);
        Some(
            s0.iter()
                .zip(s1)
                .map(|(x, y)| {
                    let total = y.total.saturating_sub(x.total);
                    let busy = y.busy.saturating_sub(x.busy);
                    if total == 0 {
                        0.0
                    } else {
                        1.0 - busy as f64 / total as f64
                    }
                })
                .collect(),
        )
    }
}

/// The sampling thread; `finish` stops it and returns what it saw.
pub struct CpuSampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<CpuSamples>>>,
}

impl CpuSampler {
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = CpuSamples::default();
            loop {
                let s = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
                out.0.push((Instant::now(), parse_per_cpu(&s)?));
                if flag.load(Ordering::Relaxed) {
                    return Ok(out);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        CpuSampler {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> Result<CpuSamples> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => bail("the CPU sampling thread panicked"),
        }
    }
}

impl Drop for CpuSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  10 0 20 300 4 0 6 0 0 0\n\
        cpu0 5 0 10 150 2 0 3 0 0 0\n\
        cpu1 5 0 10 150 2 0 3 1 0 0\n\
        intr 1 2 3\n";

    #[test]
    fn parses_each_cpu_not_the_sum() {
        let c = parse_per_cpu(STAT).unwrap();
        assert_eq!(
            c,
            vec![
                CpuTimes {
                    busy: 18,
                    total: 170
                },
                CpuTimes {
                    busy: 19,
                    total: 171
                }
            ]
        );
    }

    #[test]
    fn refuses_a_short_line() {
        assert!(parse_per_cpu("cpu0 1 2 3\n").is_err());
        assert!(parse_per_cpu("intr 1\n").is_err());
    }

    #[test]
    fn idle_share_between_nearest_samples() {
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        let cpu = |busy, total| CpuTimes { busy, total };
        let s = CpuSamples(vec![
            (at(0), vec![cpu(0, 0), cpu(0, 0)]),
            (at(1000), vec![cpu(90, 100), cpu(25, 100)]),
        ]);
        let idle = s.idle_between(at(20), at(990)).unwrap();
        assert!((idle[0] - 0.10).abs() < 1e-9, "{idle:?}");
        assert!((idle[1] - 0.75).abs() < 1e-9, "{idle:?}");
        // Both ends nearest the same sample: no stretch to measure.
        assert!(s.idle_between(at(0), at(100)).is_none());
    }
}
