//! The end-to-end benchmark of `lb-bench-e2e` (`cargo xtask bench`, part
//! "e2e"): lb against kube-proxy's iptables and nftables layouts and
//! against no service proxy at all, side by side in the netns topology.
//!
//! - [`kubeproxy`]: kube-proxy's rule sets generated from the Services;
//! - [`loadgen`]: the one-connection-per-request HTTP load generator;
//! - [`blast`]: the UDP packet generator and sink of the NodePort test;
//! - [`cpu`]: the machine's CPU time from /proc/stat;
//! - [`e2e`]: settings, interleaved rounds, the run as a whole;
//! - [`beds`]: the test beds (one topology per mode and service count);
//! - [`report`]: the printed results and targets.

pub mod beds;
pub mod blast;
pub mod cpu;
pub mod e2e;
pub mod kubeproxy;
pub mod loadgen;
pub mod report;
