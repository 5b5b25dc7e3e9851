//! Shared support for lb's privileged integration tests, the demo and the
//! benchmark: privilege checks, paths of built artifacts, packet builders and
//! the network-namespace topology.

pub mod artifacts;
pub mod fake_apiserver;
pub mod netns;
pub mod packet;
pub mod privilege;
pub mod topology;
