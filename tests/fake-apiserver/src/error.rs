//! Errors as kube-apiserver reports them: a `Status` object with the HTTP
//! code, a machine-readable reason and a message clients show.

use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use crate::http::{json_response, Body};
use crate::ResourceKind;

#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) code: u16,
    reason: &'static str,
    pub(crate) message: String,
    details: Option<Value>,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    pub(crate) fn unknown_path() -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
        e.details = Some(json!({}));
        e
    }

    pub(crate) fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    pub(crate) fn not_found(kind: ResourceKind, name: &str) -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.qualified()),
        );
        e.details = Some(json!({"name": name, "group": kind.group(), "kind": kind.plural()}));
        e
    }

    pub(crate) fn already_exists(kind: ResourceKind, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", kind.qualified()),
        );
        e.details = Some(json!({"name": name, "group": kind.group(), "kind": kind.plural()}));
        e
    }

    pub(crate) fn conflict(kind: ResourceKind, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                kind.qualified()
            ),
        );
        e.details = Some(json!({"name": name, "group": kind.group(), "kind": kind.plural()}));
        e
    }

    pub(crate) fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// 410 for a resourceVersion whose history was compacted away.
    pub(crate) fn too_old_resource_version(rv: u64, current: u64) -> Self {
        Self::expired(format!("too old resource version: {rv} ({current})"))
    }

    /// A bare status answer (test-injected failures).
    pub(crate) fn status(code: u16) -> Self {
        let (reason, message) = match code {
            401 => ("Unauthorized", "Unauthorized"),
            403 => ("Forbidden", "forbidden"),
            429 => (
                "TooManyRequests",
                "Too many requests, please try again later.",
            ),
            500 => (
                "InternalError",
                "Internal error occurred: injected by the fake apiserver",
            ),
            503 => (
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            504 => (
                "Timeout",
                "Timeout: request did not complete within requested timeout",
            ),
            _ => ("", "injected failure"),
        };
        Self::new(code, reason, message)
    }

    pub(crate) fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }

    pub(crate) fn into_response(self) -> Response<Body> {
        let mut r = json_response(
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &self.to_status(),
        );
        if self.code == 429 {
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        r
    }
}
