//! Benchmarks of weft against Docker's default bridge and the CNI reference
//! plugins. The `attach` binary (src/bin/attach.rs) times attaching and
//! removing sandboxes; `ports` (src/bin/ports.rs) measures published ports
//! (throughput through them, and the cost of publishing with thousands
//! published). See bench/README.md.

pub mod cni;
pub mod docker;
pub mod harness;
pub mod hostcheck;
pub mod image;
pub mod iperf;
pub mod labbench;
pub mod netns;
pub mod nftcount;
pub mod outside;
pub mod portsreport;
pub mod reference;
pub mod report;
pub mod stats;
pub mod sys;
pub mod weft;
