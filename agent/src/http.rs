//! Captured bytes → HTTP request.
//!
//! The XDP program sends only the first bytes of a request, so input is routinely cut off
//! mid-header. Parsing accepts that, as long as the request line itself is complete.
use thiserror::Error;

/// A request line (and the headers that fitted in the capture).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub query: Option<String>,
    /// "HTTP/1.0" or "HTTP/1.1".
    pub version: &'static str,
}

/// Why captured bytes were not turned into a request.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    #[error("request line incomplete (capture truncated before the version)")]
    IncompleteRequestLine,
    #[error("malformed request line or header")]
    Malformed,
}

/// Headers read at most; requests with more are still accepted (the rest is ignored).
const MAX_HEADERS: usize = 32;

pub fn parse_request(bytes: &[u8]) -> Result<Request, SkipReason> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(_) => {}
        // Too many headers or a header cut off: the request line may still be complete,
        // so fall back to parsing just that line.
        Err(httparse::Error::TooManyHeaders) => return parse_request_line_only(bytes),
        Err(_) => return Err(SkipReason::Malformed),
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(SkipReason::IncompleteRequestLine);
    };
    Ok(build(method, target, minor))
}

fn parse_request_line_only(bytes: &[u8]) -> Result<Request, SkipReason> {
    let end = bytes.windows(2).position(|w| w == b"\r\n").ok_or(SkipReason::IncompleteRequestLine)?;
    let mut line = bytes[..end + 2].to_vec();
    line.extend_from_slice(b"\r\n");
    let mut no_headers = [httparse::EMPTY_HEADER; 0];
    let mut req = httparse::Request::new(&mut no_headers);
    req.parse(&line).map_err(|_| SkipReason::Malformed)?;
    match (req.method, req.path, req.version) {
        (Some(m), Some(p), Some(v)) => Ok(build(m, p, v)),
        _ => Err(SkipReason::IncompleteRequestLine),
    }
}

fn build(method: &str, target: &str, minor: u8) -> Request {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    let version = if minor == 0 { "HTTP/1.0" } else { "HTTP/1.1" };
    Request { method: method.to_string(), path, query, version }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_complete_request() {
        let r = parse_request(b"GET /a/b?x=1 HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/a/b");
        assert_eq!(r.query.as_deref(), Some("x=1"));
        assert_eq!(r.version, "HTTP/1.1");
    }

    #[test]
    fn accepts_capture_truncated_mid_header() {
        let r = parse_request(b"POST /transfer HTTP/1.0\r\nHost: api\r\nContent-Ty").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str(), r.version), ("POST", "/transfer", "HTTP/1.0"));
    }

    #[test]
    fn rejects_request_line_cut_before_version() {
        assert_eq!(parse_request(b"GET /very/long/pa"), Err(SkipReason::IncompleteRequestLine));
    }

    #[test]
    fn rejects_binary_junk() {
        assert_eq!(parse_request(b"\x00\x01\x02 \xff\xfe\r\n\r\n"), Err(SkipReason::Malformed));
    }

    #[test]
    fn too_many_headers_still_yields_request_line() {
        let mut raw = b"GET /h HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            raw.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        assert_eq!(parse_request(&raw).unwrap().path, "/h");
    }
}
