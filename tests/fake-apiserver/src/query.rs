//! Query strings: percent-decoding, the parameters of list and watch
//! requests, and the opaque `continue` tokens of paginated lists.

use crate::error::ApiError;

/// Parsed query string (percent-decoded).
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(q: Option<&str>) -> Query {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (pct_decode(k), pct_decode(v)),
                    None => (pct_decode(p), String::new()),
                })
                .collect(),
        )
    }

    pub(crate) fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }

    /// The `resourceVersion` parameter ("" when absent).
    pub(crate) fn resource_version(&self) -> &str {
        self.get("resourceVersion").unwrap_or("")
    }

    /// The `resourceVersionMatch` parameter ("" when absent).
    pub(crate) fn resource_version_match(&self) -> &str {
        self.get("resourceVersionMatch").unwrap_or("")
    }
}

/// A resourceVersion given by a client, as a number.
pub(crate) fn parse_resource_version(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s:?}")))
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let digit = |c: u8| (c as char).to_digit(16);
                match (digit(b[i + 1]), digit(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes a `continue` token (hex: opaque to clients, safe in URLs).
pub(crate) fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Decodes what [`hex`] made; None for anything else.
pub(crate) fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert_eq!(pct_decode("a%21b%2Cc+d"), "a!b,c d");
        assert_eq!(pct_decode("100%"), "100%");
        assert_eq!(unhex(&hex("5\0ns\0n")).unwrap(), "5\0ns\0n");
        assert_eq!(unhex("zz"), None);
        let q = Query::parse(Some("watch=1&labelSelector=a%3Db&resourceVersion=7"));
        assert!(q.flag("watch"));
        assert_eq!(q.get("labelSelector"), Some("a=b"));
        assert_eq!(parse_resource_version(q.resource_version()).unwrap(), 7);
        assert!(parse_resource_version("x").is_err());
    }
}
