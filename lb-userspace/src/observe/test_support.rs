//! Helpers shared by the unit tests of the HTTP handlers (health, metrics).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, Response, StatusCode};

/// A GET request for `path` (handlers are called directly, no sockets).
pub fn get(path: &str) -> Request<()> {
    Request::builder().uri(path).body(()).expect("request")
}

/// Status, headers and body text of a handler's response.
pub fn read_response(resp: Response<Full<Bytes>>) -> (StatusCode, HeaderMap, String) {
    let (parts, body) = resp.into_parts();
    let bytes = futures::executor::block_on(body.collect())
        .expect("Full never fails")
        .to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(bytes.to_vec()).expect("utf-8 body"),
    )
}
