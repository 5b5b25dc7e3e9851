//! lb's userspace: the node agent (`lb-agent`) and the inspection CLI (`lbctl`).
//!
//! Flow, one direction, each stage testable alone:
//! `manifest` (source) -> `model` (pure) -> `sync` (pure diff) -> `dataplane` (aya).
//! Side: `inspect` (lbctl's views), `netlink` (interfaces and addresses).

pub mod agent;
pub mod cluster;
pub mod conntrack_gc;
pub mod dataplane;
pub mod health;
pub mod inspect;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod state;
pub mod sync;
#[cfg(test)]
mod test_support;
pub mod watch;
