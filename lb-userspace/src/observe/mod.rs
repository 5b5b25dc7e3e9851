//! What the agent shows: its health endpoints and the health-check node
//! ports (kube-proxy's), its Prometheus metrics, and lbctl's views of the
//! maps.

pub mod health;
pub mod metrics;
#[cfg(test)]
mod test_support;
pub mod views;
