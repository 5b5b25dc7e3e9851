//! What the server does to one JSON object: its metadata fields, the few
//! validations worth having, and JSON merge patches.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::ResourceKind;

pub(crate) fn set_rv(v: &mut Value, rv: u64) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), rv.to_string().into());
    }
}

pub(crate) fn meta_str(v: &Value, field: &str) -> String {
    v.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

pub(crate) fn has_generation(kind: ResourceKind) -> bool {
    matches!(kind, ResourceKind::Service | ResourceKind::EndpointSlice)
}

/// Whether an update bumps metadata.generation (Service: spec; EndpointSlice:
/// anything outside metadata).
pub(crate) fn spec_changed(kind: ResourceKind, old: &Value, new: &Value) -> bool {
    match kind {
        ResourceKind::Service => old.get("spec") != new.get("spec"),
        _ => {
            let strip = |v: &Value| {
                let mut v = v.clone();
                if let Some(m) = v.as_object_mut() {
                    m.remove("metadata");
                }
                v
            };
            strip(old) != strip(new)
        }
    }
}

/// DNS-1123 subdomain-ish (what names of these kinds must be).
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

/// The few validations worth having: the ones a client can get wrong.
pub(crate) fn validate(kind: ResourceKind, obj: &Value) -> Result<(), ApiError> {
    let name = meta_str(obj, "name");
    let invalid = |field: &str, what: &str| {
        ApiError::invalid(format!(
            "{}.{} \"{name}\" is invalid: {field}: {what}",
            kind.plural(),
            kind.group()
        ))
    };
    if kind == ResourceKind::Event {
        if obj.get("eventTime").is_none_or(Value::is_null) {
            return Err(invalid("eventTime", "Required value"));
        }
        for field in [
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
        ] {
            if obj
                .get(field)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(invalid(field, "Required value"));
            }
        }
        match obj.get("type").and_then(Value::as_str) {
            Some("Normal" | "Warning") => {}
            _ => return Err(invalid("type", "Unsupported value")),
        }
    }
    if kind == ResourceKind::CoreEvent && obj.get("involvedObject").is_none_or(Value::is_null) {
        return Err(invalid("involvedObject", "Required value"));
    }
    if kind == ResourceKind::EndpointSlice
        && obj.get("addressType").and_then(Value::as_str).is_none()
    {
        return Err(invalid("addressType", "Required value"));
    }
    Ok(())
}

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("made an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

pub(crate) fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, sod) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn metadata_and_merge_patch() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        let mut a = json!({"a": {"b": 1, "c": 2}, "d": 1});
        merge_patch(&mut a, &json!({"a": {"b": null, "e": 3}, "d": [1]}));
        assert_eq!(a, json!({"a": {"c": 2, "e": 3}, "d": [1]}));
        assert!(valid_name("web-1.a"));
        assert!(!valid_name("Web") && !valid_name("-a") && !valid_name(""));
        let mut o = json!({"metadata": {"name": "x"}});
        set_rv(&mut o, 7);
        assert_eq!(meta_str(&o, "resourceVersion"), "7");
    }
}
