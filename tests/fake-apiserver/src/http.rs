//! HTTP/1.1 serving: the accept loop, one hyper connection per client, and
//! what every request goes through before it is routed (the request log,
//! fault injection, the bearer token).

use std::io;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::error::ApiError;
use crate::routes::route;
use crate::server::Shared;
use crate::watch::bookmark_ticker;
use crate::TOKEN;

/// Every response body: a whole JSON document, or a watch stream.
pub(crate) type Body = UnsyncBoxBody<Bytes, io::Error>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    serialized_response(status, v)
}

/// A JSON response from anything serializable.
pub(crate) fn serialized_response(status: StatusCode, v: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(v).expect("JSON");
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Accepts connections until `stop` fires. While the server is down a new
/// connection is closed at once, as a restarting kube-apiserver's would be.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    tokio::spawn(bookmark_ticker(shared.clone()));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            acc = listener.accept() => match acc {
                Ok((stream, _)) => {
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    if shared.faults.is_down() {
                        drop(stream);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let sh = shared.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| handle(sh.clone(), req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// One request. An `Err` makes hyper close the connection without an answer.
async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    shared
        .stats()
        .requests
        .push(format!("{} {target}", req.method()));
    if let Some(injected) = shared.faults.before_answer().await? {
        return Ok(injected.into_response());
    }
    let want = format!("Bearer {TOKEN}");
    let authorized = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == want);
    if !authorized {
        return Ok(ApiError::status(401).into_response());
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    Ok(route(&shared, &parts, &body).unwrap_or_else(ApiError::into_response))
}
