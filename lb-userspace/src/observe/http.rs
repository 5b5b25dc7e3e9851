//! The HTTP server behind every listener of the agent: `/healthz` and
//! `/livez` ([`super::health::serve_health`]), `/metrics` and `/proxyMode`
//! ([`super::metrics::serve_metrics`]) and the health-check node ports
//! ([`super::health::ServiceHealthServers`]). Those modules only define a
//! [`Handler`]; the connection handling is here so that every listener
//! behaves the same:
//! - [`serve`] runs until its future is dropped (e.g. the task holding it is
//!   aborted); dropping it closes the listener and every open connection,
//!   which is how a health-check node port is closed when its Service no
//!   longer wants it.
//! - HTTP/1.1 only (kube-proxy's servers are Go's `net/http`; probes and
//!   load balancers speak HTTP/1.1). At most [`MAX_CONNECTIONS`] open
//!   connections per listener; further ones are closed at once, so a flood
//!   of idle clients costs bounded memory and file descriptors.
//!   [`HEADER_READ_TIMEOUT`] to send a request head, so an idle connection
//!   does not hold a slot forever.
//! - Malformed requests are answered by hyper (400) or the connection is
//!   closed; nothing panics.
//! - A handler sees the request head only: no endpoint takes a body. It is
//!   called for any method, as Go's `ServeMux` does.
//! - The plain and JSON answers carry the headers Go's `net/http` and
//!   kube-proxy send (`X-Content-Type-Options: nosniff`), and unknown paths
//!   get Go's `404 page not found` body.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Answers one request. Called on the connection's task: it must not block.
pub(crate) type Handler = Arc<dyn Fn(&Request<()>) -> Response<Full<Bytes>> + Send + Sync>;

/// Open connections per listener; further ones are closed right away.
pub(crate) const MAX_CONNECTIONS: usize = 1024;

/// Time a client has to send a complete request head.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Go's `http.NotFound` body.
const NOT_FOUND_BODY: &str = "404 page not found\n";

/// `body` with `Content-Type: content_type`.
pub(crate) fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// What Go's `http.Error` and kube-proxy's plain handlers send.
pub(crate) fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    nosniff(response(status, "text/plain; charset=utf-8", body))
}

/// What kube-proxy's health handlers send.
pub(crate) fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    nosniff(response(status, "application/json", body))
}

/// Go's `http.NotFound`.
pub(crate) fn not_found() -> Response<Full<Bytes>> {
    plain(StatusCode::NOT_FOUND, NOT_FOUND_BODY)
}

fn nosniff(mut resp: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    resp.headers_mut()
        .insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

/// Accepts connections on `listener` and answers each request with
/// `handler`, until dropped. Never returns on its own. `what` names the
/// server in log lines.
pub(crate) async fn serve(listener: TcpListener, what: &'static str, handler: Handler) {
    serve_limited(listener, what, handler, MAX_CONNECTIONS).await
}

/// [`serve`] with a connection limit of `max_connections`: the tests use a
/// small one to see the limit at work without opening a thousand sockets.
async fn serve_limited(
    listener: TcpListener,
    what: &'static str,
    handler: Handler,
    max_connections: usize,
) {
    let limit = Arc::new(Semaphore::new(max_connections));
    // Owning the connections' tasks here is what closes them when this
    // future is dropped.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            // Reap finished connections.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // E.g. EMFILE: back off instead of spinning.
                        tracing::warn!(server = what, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::debug!(server = what, %peer, "too many connections; closing");
                    continue;
                };
                let handler = handler.clone();
                conns.spawn(async move {
                    let _permit = permit;
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (head, _body) = req.into_parts();
                        let resp = handler(&Request::from_parts(head, ()));
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), svc);
                    if let Err(e) = conn.await {
                        tracing::debug!(server = what, %peer, error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
