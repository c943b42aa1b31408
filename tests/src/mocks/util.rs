//! Small shared pieces: the clock in Unix seconds, Azure-style GUIDs and timestamps, and JSON
//! responses.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Response, StatusCode};
use k8s_openapi::jiff::Timestamp;
use ring::rand::{SecureRandom as _, SystemRandom};

/// Seconds since the Unix epoch (0 for a clock before it).
pub(crate) fn unix(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn now_unix() -> i64 {
    unix(SystemTime::now())
}

/// A random version-4 GUID, lower case, as Entra writes trace and object ids.
pub(crate) fn guid() -> String {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the system random source works");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// `8-4-4-4-12` hexadecimal digits, any case.
pub(crate) fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|c| c.is_ascii_hexdigit()))
}

fn format_unix(seconds: i64, pattern: &str) -> String {
    Timestamp::from_second(seconds)
        .map(|t| t.strftime(pattern).to_string())
        .unwrap_or_default()
}

/// `2024-05-01 12:00:00Z`, Entra's `timestamp` field and description line.
pub(crate) fn aad_timestamp(seconds: i64) -> String {
    format_unix(seconds, "%Y-%m-%d %H:%M:%SZ")
}

/// `2024-05-01T12:00:00.0000000Z`, the times in Entra's assertion-lifetime messages.
pub(crate) fn aad_instant(seconds: i64) -> String {
    format_unix(seconds, "%Y-%m-%dT%H:%M:%S.0000000Z")
}

pub(crate) fn response(
    status: StatusCode,
    content_type: &str,
    headers: &[(&'static str, String)],
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let map = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(content_type) {
        map.insert(CONTENT_TYPE, value);
    }
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            map.insert(HeaderName::from_static(name), value);
        }
    }
    response
}

/// Serialises a JSON document (key order as built: `serde_json` keeps insertion order here).
pub(crate) fn json_bytes(value: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("JSON values serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_have_the_v4_shape() {
        let g = guid();
        assert!(is_guid(&g), "{g}");
        assert_eq!(&g[14..15], "4");
        assert!(!is_guid("not-a-guid"));
        assert!(is_guid("00000002-0000-0000-C000-000000000000"));
    }

    #[test]
    fn timestamps_use_entra_formats() {
        assert_eq!(aad_timestamp(0), "1970-01-01 00:00:00Z");
        assert_eq!(aad_instant(86_400), "1970-01-02T00:00:00.0000000Z");
    }
}
