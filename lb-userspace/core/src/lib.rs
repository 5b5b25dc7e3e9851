//! lb's pure core, one direction of flow, each stage testable alone:
//!
//! ```text
//! Service, EndpointSlice, Node --model--> DesiredState --plan--> [MapOp]
//!                                              ^                     |
//!                                   MapContents (what the maps hold) <'
//! ```
//!
//! - [`model`]: every kube-proxy rule decided from objects (docs/service-contract.md:
//!   W1-W6, F1, F4-F9, E3, E5, E6, H1); validated inputs ([`model::ParsedService`],
//!   [`model::ParsedSlice`]) are made once per object and kept by the sources.
//! - [`plan`]: ONE planner ([`plan::Planner`]) that turns the desired state
//!   into the ordered, minimal map writes, over every service port (a full
//!   diff) or over the changed ones (incremental), with service-port identity
//!   carried by [`ServicePortName`].
//!
//! No I/O, no clock, no randomness: the same inputs give the same outputs.

pub mod contents;
pub mod desired;
pub mod maglev;
pub mod model;
pub mod plan;
#[cfg(test)]
mod test_fixtures;

pub use contents::{MapContents, MapOp};
pub use desired::{
    DesiredServicePort, DesiredState, Endpoint, Frontend, FrontendKind, Protocol, ServicePortName,
};
