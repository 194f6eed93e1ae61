//! The measuring loop shared by the three ways of attaching a sandbox.

use crate::stats::Series;
use crate::sys::{check_interrupted, Context, Result};
use std::time::{Duration, Instant};

/// One measured operation.
pub struct Sample {
    /// Wall-clock time of the whole command, as the benchmark saw it.
    pub wall: Duration,
    /// The network part alone as the tool itself reports it, if it does
    /// (weft's `network_setup_us` / `network_teardown_us`).
    pub inner_us: Option<u64>,
}

/// A way of attaching sandboxes to a network. Implementations own everything
/// they set up and undo all of it when dropped, including sandboxes that were
/// attached but never removed.
pub trait Harness {
    type Handle;
    /// Creates one sandbox attached to the network.
    fn attach(&mut self) -> Result<(Self::Handle, Sample)>;
    /// Removes a sandbox made by [`Harness::attach`].
    fn remove(&mut self, handle: Self::Handle) -> Result<Sample>;
    /// Called right after the last remove: waits for work the tool left to
    /// the kernel and says how long it took, as a note for the report.
    fn settle(&mut self) -> Result<Option<String>> {
        Ok(None)
    }
}

#[derive(Default)]
pub struct Measured {
    pub attach: Series,
    pub remove: Series,
    pub inner_attach: Series,
    pub inner_remove: Series,
    pub attach_phase: Duration,
    pub remove_phase: Duration,
    pub settle_note: Option<String>,
}

/// Attaches `n` sandboxes one after the other, then removes them in the same
/// order. `warmup` sandboxes are attached and removed first, unmeasured.
pub fn measure<H: Harness>(h: &mut H, label: &str, n: usize, warmup: usize) -> Result<Measured> {
    for i in 0..warmup {
        check_interrupted()?;
        let (handle, _) = h
            .attach()
            .context(format_args!("{label}: warm-up attach {}", i + 1))?;
        h.remove(handle)
            .context(format_args!("{label}: warm-up remove {}", i + 1))?;
    }
    let step = progress_step(n);
    let mut m = Measured::default();
    let mut handles = Vec::with_capacity(n);
    let t = Instant::now();
    for i in 0..n {
        check_interrupted()?;
        let (handle, s) = h
            .attach()
            .context(format_args!("{label}: attach {} of {n}", i + 1))?;
        handles.push(handle);
        m.attach.push(s.wall);
        if let Some(us) = s.inner_us {
            m.inner_attach.push_us(us);
        }
        if (i + 1) % step == 0 && i + 1 < n {
            eprintln!("  {label}: attached {}/{n}", i + 1);
        }
    }
    m.attach_phase = t.elapsed();
    let t = Instant::now();
    for (i, handle) in handles.into_iter().enumerate() {
        check_interrupted()?;
        let s = h
            .remove(handle)
            .context(format_args!("{label}: remove {} of {n}", i + 1))?;
        m.remove.push(s.wall);
        if let Some(us) = s.inner_us {
            m.inner_remove.push_us(us);
        }
        if (i + 1) % step == 0 && i + 1 < n {
            eprintln!("  {label}: removed {}/{n}", i + 1);
        }
    }
    m.remove_phase = t.elapsed();
    m.settle_note = h.settle()?;
    Ok(m)
}

fn progress_step(n: usize) -> usize {
    if n >= 400 {
        n / 4
    } else {
        usize::MAX
    }
}
