//! lb's userspace: the node agent (`lb-agent`) and the inspection CLI
//! (`lbctl`). One direction of flow, each stage testable alone:
//!
//! ```text
//! source/    watchers | manifest file -> validated inputs, model output (lb-core)
//! (lb-core)  model -> desired state; plan -> ordered map writes
//! dataplane/ load, pin, attach; map writes; netlink; conntrack GC; raw bpf(2)
//! agent/     the control loop of both modes
//! observe/   /healthz, health-check node ports, /metrics; lbctl's views
//! ```

pub mod agent;
pub mod dataplane;
pub mod observe;
pub mod source;
