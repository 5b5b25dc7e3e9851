//! What the agent shows: its health endpoints and the health-check node
//! ports (kube-proxy's), its Prometheus metrics, and lbctl's views of the
//! maps. `health` and `metrics` define what their endpoints answer; `http`
//! serves all of them the same way.

pub mod health;
mod http;
pub mod metrics;
#[cfg(test)]
mod test_support;
pub mod views;
