//! Shared support for lb's privileged integration tests, the demo and the
//! benchmarks. One module per job:
//!
//! - [`privilege`]: may a privileged test run here (the
//!   [`require_privileges!`] guard), bpffs mounted;
//! - [`artifacts`]: where the built agent, lbctl and eBPF object are;
//! - [`netns`]: fresh private and named network namespaces;
//! - [`packet`]: frames with correct checksums, and their verification;
//! - [`datapath`]: the eBPF object loaded for BPF_PROG_TEST_RUN, typed maps;
//! - [`monitor`]: the same with the `lbctl monitor` switch, its events;
//! - [`objects`]: the Kubernetes objects tests give the agent, typed;
//! - [`load`]: long-lived and new connections through a restart, counted;
//! - [`topology`]: emulated kubeadm-like nodes, pods and an external client
//!   in network namespaces, with one agent per node.
//!
//! The fake API server lives in its own crate, `fake-apiserver`.

pub mod artifacts;
pub mod datapath;
pub mod load;
pub mod monitor;
pub mod netns;
pub mod objects;
pub mod packet;
pub mod privilege;
pub mod topology;
