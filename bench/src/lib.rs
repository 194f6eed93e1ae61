//! Benchmarks of weft against Docker's default bridge and the CNI reference
//! plugins. The `attach` binary (src/bin/attach.rs) drives them; see
//! bench/README.md.

pub mod cni;
pub mod docker;
pub mod harness;
pub mod hostcheck;
pub mod netns;
pub mod report;
pub mod stats;
pub mod sys;
pub mod weft;
