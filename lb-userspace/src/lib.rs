//! lb's userspace: the node agent (`lb-agent`) and the inspection CLI (`lbctl`).
//!
//! Flow, one direction, each stage testable alone:
//! `manifest`/watchers -> `model` (pure) -> `sync` (pure diff) -> `dataplane` (aya).

pub mod state;
pub mod model;
pub mod sync;
