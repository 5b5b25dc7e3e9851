//! What the agent shows: its health endpoints and the health-check node
//! ports (kube-proxy's), its Prometheus metrics, lbctl's views of the
//! maps and `lbctl monitor`'s event stream. `health` and `metrics` define what their endpoints answer; `http`
//! serves all of them the same way.

pub mod health;
mod http;
pub mod metrics;
pub mod monitor;
#[cfg(test)]
mod test_support;
pub mod views;
