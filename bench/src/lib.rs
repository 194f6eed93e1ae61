//! Benchmarks of weft against Docker's default bridge, the CNI reference
//! plugins, kernel VXLAN and hand-built flannel-style paths: the eight
//! binaries of src/bin (attach, ports, converge, tunnel, overlay, psload,
//! explain, dns), each described in bench/README.md. Their namespaces come
//! from weft-testkit.

pub mod cni;
pub mod docker;
pub mod firstping;
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
