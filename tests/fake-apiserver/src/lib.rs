//! A fake Kubernetes API server for tests: the real list/watch protocol over
//! plain HTTP/1.1, for the resources the lb agent uses.
//!
//! The agent is tested with its normal `kube::Client`, built from the kubeconfig
//! [`FakeApiServer::write_kubeconfig`] writes. The server runs on its own thread
//! with its own tokio runtime; every control method is synchronous and
//! thread-safe, so plain `#[test]` functions drive it.
//!
//! What it serves (JSON only):
//! - core/v1 `services` (namespaced), `nodes` (cluster-scoped), `events`
//!   (namespaced); discovery.k8s.io/v1 `endpointslices` and events.k8s.io/v1
//!   `events` (namespaced);
//! - LIST (cluster-wide and per namespace) with `labelSelector`,
//!   `fieldSelector` (`metadata.name`, `metadata.namespace`), `limit` and
//!   `continue` (pages consistent at the first page's resourceVersion), and
//!   `resourceVersion` / `resourceVersionMatch`;
//! - WATCH (`watch=true|1`): a chunked stream of `{"type":..,"object":..}` lines:
//!   history after the requested resourceVersion (or synthetic ADDED events of
//!   the current state for `""`/`"0"`/`sendInitialEvents=true`), then live
//!   events; selector transitions become ADDED/DELETED as in kube-apiserver's
//!   cacher; BOOKMARKs (periodic, on demand, and the `k8s.io/initial-events-end`
//!   one for streaming lists); `timeoutSeconds`; an ERROR event with a 410
//!   Expired Status when the resourceVersion was compacted;
//! - GET/POST/PUT/PATCH (merge and strategic-merge as JSON merge patch,
//!   server-side apply as upsert+merge)/DELETE of single objects;
//! - `/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}[/v1]`, `/healthz`,
//!   `/livez`, `/readyz`; anything else is a 404 Status.
//!
//! Requests must carry `Authorization: Bearer` [`TOKEN`] (the kubeconfig has
//! it); others get a 401 Status.
//!
//! ```no_run
//! use fake_apiserver::{FakeApiServer, ResourceKind};
//! let server = FakeApiServer::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
//! let kubeconfig = server.write_kubeconfig(std::path::Path::new("/tmp/t1"));
//! server.apply(&serde_json::json!({
//!     "apiVersion": "v1", "kind": "Service",
//!     "metadata": {"name": "web", "namespace": "default"},
//!     "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
//! }));
//! // ... run the agent with KUBECONFIG=kubeconfig ...
//! server.delete(ResourceKind::Service, "default", "web");
//! ```
//!
//! Inside, one module per concern: `store` (objects, the one
//! resourceVersion counter, history), `object` (server-set metadata,
//! validation, merge patch), `selector` (label and field selectors), `list`
//! (pagination), `watch` (streams, bookmarks, 410), `http` (serving, auth)
//! and `routes` (paths, discovery, verbs), `faults` (outages, latency,
//! injected statuses, cut watches), and `server` (the handle tests hold).

mod error;
mod faults;
mod http;
mod kind;
mod list;
mod object;
mod query;
mod routes;
mod selector;
mod server;
mod store;
mod watch;

pub use kind::ResourceKind;
pub use server::FakeApiServer;

/// The bearer token the server expects (and the kubeconfig carries).
pub const TOKEN: &str = "fake-apiserver-token";
