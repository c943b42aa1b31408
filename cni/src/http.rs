//! The little HTTP/1.1 the plugin speaks to tokend: one request per connection
//! (`Connection: close`), answers framed by `Content-Length`, chunked encoding or EOF.

use std::fmt::Write as _;

/// Largest answer accepted (a `GET /v1/pods` of a full node is well under a megabyte).
pub const MAX_ANSWER: usize = 16 << 20;
const MAX_HEADERS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Where parsing a partly read answer stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Read more.
    Incomplete,
    Complete(Answer),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed HTTP answer: {0}")]
    Malformed(String),
    #[error("connection closed after {0} bytes, before the answer was complete")]
    Truncated(usize),
    #[error("answer larger than {MAX_ANSWER} bytes")]
    TooLarge,
}

/// The bytes of a request with an optional JSON body.
pub fn request(method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: podid-tokend\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if let Some(body) = body {
        let _ = write!(
            head,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    bytes
}

/// Parses what has been read so far; `eof` says the peer closed the connection.
pub fn parse_answer(buf: &[u8], eof: bool) -> Result<Progress, HttpError> {
    if buf.len() > MAX_ANSWER {
        return Err(HttpError::TooLarge);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if eof => return Err(HttpError::Truncated(buf.len())),
        Ok(httparse::Status::Partial) => return Ok(Progress::Incomplete),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let status = response
        .code
        .ok_or_else(|| HttpError::Malformed("no status code".to_owned()))?;
    let rest = &buf[head_len..];
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
    };
    let chunked =
        header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().ends_with("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(length) = header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| HttpError::Malformed(format!("Content-Length {length:?}")))?;
        (rest.len() >= length).then(|| rest[..length].to_vec())
    } else {
        eof.then(|| rest.to_vec())
    };
    match body {
        Some(body) => Ok(Progress::Complete(Answer { status, body })),
        None if eof => Err(HttpError::Truncated(buf.len())),
        None => Ok(Progress::Incomplete),
    }
}

/// Decodes a chunked body; `None` until the last (zero-length) chunk has arrived.
fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>, HttpError> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&rest[..line_end]);
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Malformed(format!("chunk size {size_text:?}")))?;
        if size == 0 {
            return Ok(Some(body));
        }
        let data_start = line_end + 2;
        let data_end = data_start
            .checked_add(size)
            .filter(|end| *end <= MAX_ANSWER)
            .ok_or(HttpError::TooLarge)?;
        if rest.len() < data_end + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[data_start..data_end]);
        rest = &rest[data_end + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn complete(status: u16, body: &str) -> Result<Progress, HttpError> {
        Ok(Progress::Complete(Answer {
            status,
            body: body.as_bytes().to_vec(),
        }))
    }

    #[test]
    fn request_shape() {
        let req = request("PUT", "/v1/pods/abc/eth0", Some(b"{}"));
        assert_eq!(
            String::from_utf8(req).unwrap(),
            "PUT /v1/pods/abc/eth0 HTTP/1.1\r\nHost: podid-tokend\r\nConnection: close\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
        let req = String::from_utf8(request("GET", "/v1/status", None)).unwrap();
        assert!(req.ends_with("Accept: application/json\r\n\r\n"));
        assert!(!req.contains("Content-Length"));
    }

    #[test]
    fn content_length_body() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 21\r\n\r\n{\"listenerPort\":2579}";
        assert_eq!(
            parse_answer(answer, false),
            complete(200, r#"{"listenerPort":2579}"#)
        );
        assert_eq!(
            parse_answer(&answer[..answer.len() - 1], false),
            Ok(Progress::Incomplete)
        );
        assert_eq!(
            parse_answer(&answer[..answer.len() - 1], true),
            Err(HttpError::Truncated(answer.len() - 1))
        );
        assert_eq!(parse_answer(&answer[..10], false), Ok(Progress::Incomplete));
    }

    #[test]
    fn body_until_eof() {
        let answer = b"HTTP/1.1 503 Service Unavailable\r\n\r\n{\"error\":\"starting\"}";
        assert_eq!(parse_answer(answer, false), Ok(Progress::Incomplete));
        assert_eq!(
            parse_answer(answer, true),
            complete(503, r#"{"error":"starting"}"#)
        );
    }

    #[test]
    fn chunked_body() {
        let answer = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"err\r\nb;ext=1\r\nor\":\"nope\"}\r\n0\r\n\r\n";
        assert_eq!(
            parse_answer(answer, false),
            complete(404, r#"{"error":"nope"}"#)
        );
        assert_eq!(
            parse_answer(&answer[..answer.len() - 7], false),
            Ok(Progress::Incomplete)
        );
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(matches!(
            parse_answer(bad, false),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_answers() {
        assert!(matches!(
            parse_answer(b"garbage\r\n\r\n", true),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", true),
            Err(HttpError::Malformed(_))
        ));
        assert_eq!(parse_answer(b"", true), Err(HttpError::Truncated(0)));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), eof in any::<bool>()) {
            let _ = parse_answer(&bytes, eof);
        }

        #[test]
        fn never_panics_after_a_valid_head(tail in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            bytes.extend(tail);
            let _ = parse_answer(&bytes, true);
        }
    }
}
