//! Summaries of a series of timings.

use serde::Serialize;
use std::time::Duration;

/// A series of timings in milliseconds, in the order they were taken.
#[derive(Debug, Clone, Default)]
pub struct Series(pub Vec<f64>);

impl Series {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64() * 1e3);
    }

    pub fn push_us(&mut self, us: u64) {
        self.0.push(us as f64 / 1e3);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `q` quantile (0..=1) of the samples, in ms.
    pub fn p(&self, q: f64) -> f64 {
        percentile(&self.0, q)
    }

    /// The largest sample, in ms (NaN when empty).
    pub fn max(&self) -> f64 {
        self.0.iter().copied().fold(f64::NAN, f64::max)
    }

    pub fn summary(&self) -> Summary {
        let v = &self.0;
        let window = 10.min(v.len());
        let first = median(&v[..window]);
        let last = median(&v[v.len() - window..]);
        Summary {
            count: v.len(),
            median_ms: median(v),
            p99_ms: percentile(v, 0.99),
            min_ms: v.iter().copied().reduce(f64::min).unwrap_or(f64::NAN),
            max_ms: v.iter().copied().reduce(f64::max).unwrap_or(f64::NAN),
            mean_ms: if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            },
            first10_median_ms: first,
            last10_median_ms: last,
            last_over_first10: last / first,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub count: usize,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Median of the first 10 samples (fewer if N < 10).
    pub first10_median_ms: f64,
    /// Median of the last 10 samples.
    pub last10_median_ms: f64,
    /// last10_median_ms / first10_median_ms: stays near 1 when the cost of
    /// one operation does not grow with the number already present.
    pub last_over_first10: f64,
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let s = sorted(v);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// Nearest-rank percentile, `p` in (0, 1].
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let s = sorted(v);
    let rank = (p * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// xorshift64*, enough to spread the pauses between samples; seeded from
/// the clock.
pub struct XorShift(u64);

impl XorShift {
    pub fn seeded() -> XorShift {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        XorShift(t | 1)
    }

    /// Uniform enough in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentile() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v[..10], 0.99), 10.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn first_and_last_ten() {
        let mut s = Series::default();
        for i in 0..100 {
            s.0.push(if i < 50 { 1.0 } else { 2.0 });
        }
        let sum = s.summary();
        assert_eq!(sum.first10_median_ms, 1.0);
        assert_eq!(sum.last10_median_ms, 2.0);
        assert_eq!(sum.last_over_first10, 2.0);
    }
}
