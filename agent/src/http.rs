//! Captured bytes → HTTP request.
//!
//! The XDP program sends only the first bytes of a request, so input is routinely cut off
//! mid-header: parsing accepts that as long as the request line is whole, and keeps the
//! headers whose lines fitted. Anything else that is not a clean HTTP/1.x request is skipped
//! with a named [`SkipReason`] (counted by [`SkipCounters`]), never a panic.
use std::{fmt, mem::MaybeUninit, sync::LazyLock};

use memchr::memmem;
use smallvec::SmallVec;
use thiserror::Error;

/// Default cap on the path length; longer paths are skipped as [`SkipReason::PathTooLong`].
pub const DEFAULT_MAX_PATH_LEN: usize = 2048;

/// Headers httparse may read per request. A capture is at most 4096 bytes, so a legitimate
/// request never comes close; more is treated as [`Request::headers_dropped`].
const MAX_HEADERS: usize = 128;

/// The request methods precedent follows (the ones the XDP program recognises).
/// A closed set keeps every per-method structure downstream small and bounded.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Trace,
    Connect,
}

impl Method {
    pub const ALL: [Method; 9] = [
        Method::Get,
        Method::Head,
        Method::Post,
        Method::Put,
        Method::Delete,
        Method::Patch,
        Method::Options,
        Method::Trace,
        Method::Connect,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
            Method::Options => "OPTIONS",
            Method::Trace => "TRACE",
            Method::Connect => "CONNECT",
        }
    }

    /// Exact, case-sensitive match (methods are case-sensitive per RFC 9110).
    pub fn parse(token: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.as_str() == token)
    }

    /// Dense index 0..9, for per-method arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the parser keeps besides the request line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Header names (case-insensitive) whose values the session identifier may need, e.g.
    /// `authorization`. `Host` and `Cookie` are always kept.
    pub session_headers: Vec<String>,
    /// Paths longer than this (bytes, before the query) are skipped.
    pub max_path_len: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            session_headers: vec!["authorization".into()],
            max_path_len: DEFAULT_MAX_PATH_LEN,
        }
    }
}

/// The headers kept for session identification, borrowed from the capture.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SelectedHeaders<'a> {
    entries: SmallVec<[(&'a str, &'a str); 4]>,
}

impl<'a> SelectedHeaders<'a> {
    /// Headers from another source (an access log, a JSON line): same lookups as captured ones.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            entries: pairs.into_iter().collect(),
        }
    }

    /// First value of the header `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.entries
            .iter()
            .find(|(n, _)| same_name(n, name))
            .map(|(_, v)| *v)
    }

    /// Every value of `name`, in order (a client may send several `Cookie` lines).
    pub fn get_all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a str> + 's {
        self.entries
            .iter()
            .filter(move |(n, _)| same_name(n, name))
            .map(|(_, v)| *v)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Header names match case-insensitively; captured ones are kept lowercase (see [`kept_name`]),
/// so comparing the bytes first settles the usual lookup with a lowercase name.
fn same_name(a: &str, b: &str) -> bool {
    a == b || a.eq_ignore_ascii_case(b)
}

/// Values are secrets (tokens, cookies): Debug shows names and lengths only.
impl fmt::Debug for SelectedHeaders<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.entries
                    .iter()
                    .map(|(n, v)| format!("{n}: <{} bytes redacted>", v.len())),
            )
            .finish()
    }
}

/// A parsed request, borrowing from the capture (or from the [`Parser`]'s scratch buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: Method,
    /// Path without the query string, as sent (normalisation is discovery's job).
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// From an absolute-form target, else the `Host` header; as sent (may carry a port).
    pub host: Option<&'a str>,
    /// "HTTP/1.0" or "HTTP/1.1".
    pub version: &'static str,
    /// Host, Cookie and the configured session headers.
    pub headers: SelectedHeaders<'a>,
    /// The capture ended before the header section did: headers after the cut are missing.
    pub truncated: bool,
    /// More header lines than the parser reads: the request line is kept, headers are not.
    pub headers_dropped: bool,
    /// Where another request pipelined behind this one starts in the parsed bytes, when the
    /// capture goes on past this request's head and body (see [`pipelined`]).
    pub next: Option<usize>,
}

/// Why captured bytes were not turned into a request. [`SkipReason::as_str`] is stable
/// (counter and log names).
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    #[error("empty capture")]
    Empty,
    #[error("not an HTTP/1.x request (bad method token or binary data)")]
    NotHttp,
    #[error("method is not one precedent follows")]
    UnknownMethod,
    #[error("request line incomplete (capture truncated before the version)")]
    IncompleteRequestLine,
    #[error("request line without a valid HTTP/1.x version")]
    BadVersion,
    #[error("request target is not origin-form or absolute-form")]
    BadTarget,
    #[error("request line or selected header is not valid UTF-8")]
    InvalidUtf8,
    #[error("path longer than the configured maximum")]
    PathTooLong,
    #[error("malformed header line")]
    MalformedHeader,
    #[error("CR, LF, NUL or line folding inside a header (header injection attempt)")]
    HeaderInjection,
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("Host header with characters no host name has")]
    BadHost,
}

impl SkipReason {
    pub const ALL: [SkipReason; 12] = [
        SkipReason::Empty,
        SkipReason::NotHttp,
        SkipReason::UnknownMethod,
        SkipReason::IncompleteRequestLine,
        SkipReason::BadVersion,
        SkipReason::BadTarget,
        SkipReason::InvalidUtf8,
        SkipReason::PathTooLong,
        SkipReason::MalformedHeader,
        SkipReason::HeaderInjection,
        SkipReason::DuplicateHost,
        SkipReason::BadHost,
    ];

    /// Stable snake_case name for counters and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Empty => "empty",
            SkipReason::NotHttp => "not_http",
            SkipReason::UnknownMethod => "unknown_method",
            SkipReason::IncompleteRequestLine => "incomplete_request_line",
            SkipReason::BadVersion => "bad_version",
            SkipReason::BadTarget => "bad_target",
            SkipReason::InvalidUtf8 => "invalid_utf8",
            SkipReason::PathTooLong => "path_too_long",
            SkipReason::MalformedHeader => "malformed_header",
            SkipReason::HeaderInjection => "header_injection",
            SkipReason::DuplicateHost => "duplicate_host",
            SkipReason::BadHost => "bad_host",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Per-reason counts of skipped captures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkipCounters {
    counts: [u64; SkipReason::ALL.len()],
}

impl SkipCounters {
    pub fn record(&mut self, reason: SkipReason) {
        self.counts[reason.index()] += 1;
    }

    pub fn get(&self, reason: SkipReason) -> u64 {
        self.counts[reason.index()]
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(name, count)` for every reason, zeros included, in a fixed order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        SkipReason::ALL
            .iter()
            .map(|r| (r.as_str(), self.counts[r.index()]))
    }
}

/// Reusable parser. Owns a scratch buffer so a capture cut mid-header can be re-parsed
/// without allocating once the buffer has grown to the capture size.
#[derive(Debug)]
pub struct Parser {
    config: HttpConfig,
    scratch: Vec<u8>,
}

impl Parser {
    pub fn new(mut config: HttpConfig) -> Self {
        for h in &mut config.session_headers {
            h.make_ascii_lowercase();
        }
        Parser {
            config,
            scratch: Vec::new(),
        }
    }

    pub fn config(&self) -> &HttpConfig {
        &self.config
    }

    /// Parses every request in a capture in order: the first, then each one pipelined behind
    /// it ([`Request::next`]). `f` gets each result with its position (0 for the first) and
    /// the bytes it was parsed from; the walk ends after the last request or at the first
    /// failure, past which no request can be located. The one place that knows how a capture
    /// is walked: live capture, the request log and pcap replay all read captures through it.
    pub fn each_request(
        &mut self,
        bytes: &[u8],
        mut f: impl FnMut(usize, &[u8], Result<Request<'_>, SkipReason>),
    ) {
        let mut at = 0;
        for i in 0.. {
            let parsed = self.parse(&bytes[at..]);
            let next = parsed.as_ref().ok().and_then(|r| r.next);
            f(i, &bytes[at..], parsed);
            match next {
                // Each request takes at least its request line, so this ends.
                Some(n) => at += n,
                None => return,
            }
        }
    }

    /// Parses one captured request. The result borrows from `bytes` or from `self`.
    pub fn parse<'a>(&'a mut self, bytes: &'a [u8]) -> Result<Request<'a>, SkipReason> {
        if bytes.is_empty() {
            return Err(SkipReason::Empty);
        }
        // Header slots left uninitialised: httparse writes the ones it fills, and zeroing all
        // MAX_HEADERS (4 KB) cost more than parsing a typical request's few headers.
        let mut headers = [const { MaybeUninit::<httparse::Header<'a>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let first_error = match req.parse_with_uninit_headers(bytes, &mut headers) {
            Ok(httparse::Status::Complete(head_len)) => {
                // The common case, a whole head: it is exactly what httparse read (up to the
                // first empty line, or earlier at a bare LF), so the injection check needs no
                // search for the head's end, and only the bare LF is left for it to find.
                let head = &bytes[..head_len];
                debug_assert_eq!(bare_lf_in(head), injection_in(head).is_some(), "{head:?}");
                if bare_lf_in(head) && looks_like_request_line(bytes) {
                    return Err(SkipReason::HeaderInjection);
                }
                let (m, p, v) = line_parts(&req)?;
                let hdrs: &[httparse::Header<'a>] = req.headers;
                let next = pipelined(bytes, head_len, hdrs);
                return build(&self.config, m, p, v, hdrs, false, false)
                    .map(|r| Request { next, ..r });
            }
            Ok(httparse::Status::Partial) => None,
            Err(e) => Some(e),
        };
        // Strict line endings: a bare LF is accepted as a line end by some servers and not by
        // others, which is exactly what header smuggling exploits. Bare CR likewise.
        let head_end = HEAD_END.find(bytes).map(|i| i + 4);
        let head = &bytes[..head_end.unwrap_or(bytes.len())];
        if let Some(reason) = injection_in(head) {
            // Only meaningful once the request line is known to be HTTP-ish.
            if looks_like_request_line(bytes) {
                return Err(reason);
            }
        }
        match first_error {
            None => {}
            Some(httparse::Error::TooManyHeaders) => {
                let (m, p, v) = line_parts(&req)?;
                return build(&self.config, m, p, v, &[], head_end.is_none(), true);
            }
            Some(e) => return Err(classify(e, bytes, &self.config)),
        }
        // Partial: either the request line itself is cut, or some header is.
        if req.version.is_none() {
            if req.method.is_some()
                && let Some(r) = cut_after_path(bytes, &self.config)
            {
                return r;
            }
            if req.method.is_some() && bytes.len() > self.config.max_path_len + 16 {
                return Err(SkipReason::PathTooLong);
            }
            if req.method.is_none() && !bytes.iter().all(|b| b.is_ascii_uppercase()) {
                return Err(SkipReason::NotHttp);
            }
            return Err(SkipReason::IncompleteRequestLine);
        }
        // Keep the complete lines only (a header cut mid-value would hash to a wrong session
        // key) and close the header section so httparse accepts it.
        let last_line_end = rfind(bytes, b"\r\n").map(|i| i + 2).unwrap_or(bytes.len());
        self.scratch.clear();
        self.scratch.extend_from_slice(&bytes[..last_line_end]);
        self.scratch.extend_from_slice(b"\r\n");
        let scratch: &'a [u8] = &self.scratch;
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(scratch, &mut headers) {
            Ok(httparse::Status::Complete(_)) => {
                let (m, p, v) = line_parts(&req)?;
                let hdrs: &[httparse::Header<'a>] = req.headers;
                build(&self.config, m, p, v, hdrs, true, false)
            }
            Err(httparse::Error::TooManyHeaders) => {
                let (m, p, v) = line_parts(&req)?;
                build(&self.config, m, p, v, &[], true, true)
            }
            Ok(httparse::Status::Partial) => Err(SkipReason::MalformedHeader),
            Err(e) => Err(classify(e, scratch, &self.config)),
        }
    }
}

/// A request line the capture cut after the path: in the query (`GET /search?q=` and 600
/// bytes, cut at 512) or in the version. The method and the path are whole, so the request
/// is analysed, with the query as far as it goes and no headers (its session is then keyed
/// by the client address): padding the query past the capture must not hide a request.
/// Bytes httparse read up to the cut are valid request-line bytes. `None` when the cut is in
/// the path itself.
fn cut_after_path<'a>(
    bytes: &'a [u8],
    config: &'a HttpConfig,
) -> Option<Result<Request<'a>, SkipReason>> {
    let sp = memchr::memchr(b' ', bytes)?;
    let rest = &bytes[sp + 1..];
    let (target, whole) = match memchr::memchr(b' ', rest) {
        Some(i) => (&rest[..i], true),
        None => (rest, false),
    };
    if !whole && memchr::memchr(b'?', target).is_none() {
        return None;
    }
    // The cut may split a character of the query: keep what is whole.
    let target = match std::str::from_utf8(target) {
        Ok(t) => t,
        Err(e) if e.error_len().is_none() && !whole => {
            std::str::from_utf8(&target[..e.valid_up_to()]).ok()?
        }
        Err(_) => return Some(Err(SkipReason::InvalidUtf8)),
    };
    let method = std::str::from_utf8(&bytes[..sp]).ok()?;
    Some(build(config, method, target, 1, &[], true, false))
}

/// One-off parse with a fresh [`Parser`]; prefer keeping a `Parser` on a hot path.
pub fn parse_request_owned(bytes: &[u8], config: &HttpConfig) -> Result<OwnedRequest, SkipReason> {
    let mut p = Parser::new(config.clone());
    p.parse(bytes).map(|r| OwnedRequest::from(&r))
}

/// An owned copy of the request line fields (no header values: those are secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub host: Option<String>,
    pub version: &'static str,
    pub truncated: bool,
}

impl From<&Request<'_>> for OwnedRequest {
    fn from(r: &Request<'_>) -> Self {
        OwnedRequest {
            method: r.method,
            path: r.path.to_string(),
            query: r.query.map(str::to_string),
            host: r.host.map(str::to_string),
            version: r.version,
            truncated: r.truncated,
        }
    }
}

type LineParts<'a> = (&'a str, &'a str, u8);

fn line_parts<'a>(req: &httparse::Request<'_, 'a>) -> Result<LineParts<'a>, SkipReason> {
    match (req.method, req.path, req.version) {
        (Some(m), Some(p), Some(v)) => Ok((m, p, v)),
        _ => Err(SkipReason::IncompleteRequestLine),
    }
}

fn build<'a>(
    config: &'a HttpConfig,
    method: &'a str,
    target: &'a str,
    minor: u8,
    headers: &[httparse::Header<'a>],
    truncated: bool,
    headers_dropped: bool,
) -> Result<Request<'a>, SkipReason> {
    let method = Method::parse(method).ok_or(SkipReason::UnknownMethod)?;
    let (authority, rest) = split_target(target)?;
    // One scan for the first '?' or '#'. A fragment never belongs in a request target: it is
    // dropped rather than keyed on, from the path or from the query it ends.
    let (path, query) = match memchr::memchr2(b'?', b'#', rest.as_bytes()) {
        Some(i) if rest.as_bytes()[i] == b'?' => {
            let q = &rest[i + 1..];
            let q = memchr::memchr(b'#', q.as_bytes()).map_or(q, |j| &q[..j]);
            (&rest[..i], Some(q))
        }
        Some(i) => (&rest[..i], None),
        None => (rest, None),
    };
    if path.len() > config.max_path_len {
        return Err(SkipReason::PathTooLong);
    }
    let mut host = authority;
    let mut host_header_seen = false;
    let mut selected = SelectedHeaders::default();
    for h in headers {
        let Some(name) = kept_name(config, h.name) else {
            continue;
        };
        let value = header_str(h.value)?;
        if name == HOST {
            if host_header_seen {
                return Err(SkipReason::DuplicateHost);
            }
            host_header_seen = true;
            if !valid_host(value) {
                return Err(SkipReason::BadHost);
            }
            // RFC 9112 §3.2.2: an absolute-form target's authority wins over Host.
            if host.is_none() && !value.is_empty() {
                host = Some(value);
            }
        } else {
            selected.entries.push((name, value));
        }
    }
    Ok(Request {
        method,
        path,
        query,
        host,
        version: if minor == 0 { "HTTP/1.0" } else { "HTTP/1.1" },
        headers: selected,
        truncated,
        headers_dropped,
        next: None,
    })
}

const HOST: &str = "host";
const COOKIE: &str = "cookie";

/// The lowercase name a header is kept under (`host`, `cookie`, or the configured session
/// header it matches, lowercased by [`Parser::new`]), or None when it is not kept. Lookups
/// in [`SelectedHeaders`] then compare names that are already lowercase.
fn kept_name<'c>(config: &'c HttpConfig, name: &str) -> Option<&'c str> {
    if name.eq_ignore_ascii_case(HOST) {
        Some(HOST)
    } else if name.eq_ignore_ascii_case(COOKIE) {
        Some(COOKIE)
    } else {
        config
            .session_headers
            .iter()
            .find(|n| name.eq_ignore_ascii_case(n))
            .map(String::as_str)
    }
}

/// A header value as text. httparse has trimmed it and refused control characters in it
/// (value bytes are tab, 0x20..=0x7e and 0x80..=0xff; obsolete line folding is refused in
/// requests), so only UTF-8 is left to check, and an ASCII value (nearly every one) needs no
/// more than `is_ascii`.
fn header_str(v: &[u8]) -> Result<&str, SkipReason> {
    debug_assert!(!has_control(v), "httparse let a control character through");
    if v.is_ascii() {
        // SAFETY: ASCII bytes are valid UTF-8.
        Ok(unsafe { std::str::from_utf8_unchecked(v) })
    } else {
        std::str::from_utf8(v).map_err(|_| SkipReason::InvalidUtf8)
    }
}

/// Where a request pipelined behind the one whose head ends at `head_len` starts in `bytes`,
/// if anything follows: after the head, its body and any empty lines (some clients end a body
/// with an extra CRLF). Pipelining puts several requests in one segment, and a request hidden
/// behind another must not go unseen. Nothing after a body that goes on past the bytes, or
/// whose end cannot be told, is looked at.
fn pipelined(bytes: &[u8], head_len: usize, headers: &[httparse::Header<'_>]) -> Option<usize> {
    if head_len >= bytes.len() {
        return None;
    }
    let next = body_end(bytes, head_len, headers)?;
    let next = next + blank_lines(bytes.get(next..)?);
    (next < bytes.len()).then_some(next)
}

/// Where the body of a request whose head ends at `head_len` in `bytes` ends: possibly past
/// the bytes (a Content-Length body going on); None when the bytes cannot tell (a chunked body
/// going on past them or malformed, or a framing the server refuses: see [`framing`]).
fn body_end(bytes: &[u8], head_len: usize, headers: &[httparse::Header<'_>]) -> Option<usize> {
    match framing(headers) {
        Framing::Length(n) => head_len.checked_add(n),
        Framing::Chunked => chunked_len(&bytes[head_len..]).map(|n| head_len + n),
        Framing::Unknown => None,
    }
}

/// How a request's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Content-Length, or 0 without one.
    Length(usize),
    /// `Transfer-Encoding` whose final coding is `chunked`, and no Content-Length.
    Chunked,
    /// Anything else. A final coding that is not chunked, or Transfer-Encoding together with
    /// Content-Length (the ground of request smuggling): RFC 9112 §6.3 has the server answer
    /// 400, or close the connection after the request, so nothing behind it is served. A
    /// length that is not a number, or one of a gigabyte or more, which sequence numbers could
    /// not place.
    Unknown,
}

fn framing(headers: &[httparse::Header<'_>]) -> Framing {
    let (mut length, mut chunked) = (None, None);
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding of the last such header is the final one.
            let Ok(v) = std::str::from_utf8(h.value) else {
                return Framing::Unknown;
            };
            let last = v.rsplit(',').next().unwrap_or_default();
            chunked = Some(last.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
            let Some(n) = n else {
                return Framing::Unknown;
            };
            length = Some(n);
        }
    }
    match (chunked, length) {
        (Some(true), None) => Framing::Chunked,
        (Some(_), _) => Framing::Unknown,
        (None, None) => Framing::Length(0),
        (None, Some(n)) if n < MAX_TRACKED_BODY => Framing::Length(n),
        (None, Some(_)) => Framing::Unknown,
    }
}

/// The length of the chunked body `bytes` start with (chunks, the last chunk, trailer fields
/// and the empty line), or None when it goes on past them or is malformed (a chunk size line,
/// a chunk's end or a trailer field: the server refuses it, and nothing after it is a request).
fn chunked_len(bytes: &[u8]) -> Option<usize> {
    let mut at = 0usize;
    loop {
        let Ok(httparse::Status::Complete((line, size))) = httparse::parse_chunk_size(&bytes[at..])
        else {
            return None;
        };
        at += line;
        if size == 0 {
            break;
        }
        // The chunk's data, then its CRLF.
        // Checked: a chunk size is the sender's to choose, up to 2^64 - 1.
        let end = at.checked_add(usize::try_from(size).ok()?)?;
        let next = end.checked_add(2)?;
        if bytes.get(end..next)? != b"\r\n" {
            return None;
        }
        at = next;
    }
    // Trailer fields, then the empty line that ends the body.
    let mut trailers = [httparse::EMPTY_HEADER; 16];
    match httparse::parse_headers(&bytes[at..], &mut trailers) {
        Ok(httparse::Status::Complete((len, _))) => Some(at + len),
        _ => None,
    }
}

/// Bodies this long or longer are not followed (see [`framing`]).
const MAX_TRACKED_BODY: usize = 1 << 30;

/// Empty lines some clients send after a body.
pub(crate) fn blank_lines(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count()
}

/// How the captured bytes of a connection end, read request by request (each head, then its
/// body: the Content-Length it announces, or its chunks), for [`crate::reassemble`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// At the end of a request: whatever comes next on the connection starts a new one.
    Boundary,
    /// Inside a head that starts at this offset: the next segment continues it.
    Head(usize),
    /// Inside a body that ends at this offset, past the bytes given: the stream's next bytes
    /// up to there are body, however much they look like a request.
    Body(usize),
    /// Where requests end cannot be told (junk, a chunked body going on past the bytes):
    /// nothing is assumed.
    Unknown,
}

/// Whether no request in `bytes` can announce a body, told without parsing: no line starts
/// with a `Content-Length` name (any case), so [`tail`] cannot find [`Tail::Body`] (a
/// `Transfer-Encoding` makes it `Unknown`). Most captured requests are such a GET, which the
/// engine parses anyway: where nothing else needs the tail, the reassembler saves its parse.
pub fn announces_no_body(bytes: &[u8]) -> bool {
    !bytes
        .split(|&b| b == b'\n')
        .any(|line| starts_with_name(line, b"content-length"))
}

fn starts_with_name(line: &[u8], lowercase: &[u8]) -> bool {
    line.get(..lowercase.len())
        .is_some_and(|l| l.eq_ignore_ascii_case(lowercase))
}

/// Reads `bytes` (the start of a request, possibly followed by pipelined ones) to its end.
pub fn tail(bytes: &[u8]) -> Tail {
    let mut at = 0;
    while at < bytes.len() {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(&bytes[at..], &mut headers) {
            Ok(httparse::Status::Partial) => return Tail::Head(at),
            Ok(httparse::Status::Complete(head_len)) => {
                let Some(end) = body_end(&bytes[at..], head_len, req.headers) else {
                    return Tail::Unknown;
                };
                let end = at + end;
                if end > bytes.len() {
                    return Tail::Body(end);
                }
                at = end + blank_lines(&bytes[end..]);
            }
            Err(_) => return Tail::Unknown,
        }
    }
    Tail::Boundary
}

/// Origin-form `/p?q` or absolute-form `http://host/p?q`; returns (authority, path+query).
fn split_target(target: &str) -> Result<(Option<&str>, &str), SkipReason> {
    if target.starts_with('/') {
        return Ok((None, target));
    }
    let rest = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
        .ok_or(SkipReason::BadTarget)?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], &rest[i..]),
        // "http://h?q" has an empty path, which means "/".
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') || !valid_host(authority) {
        return Err(SkipReason::BadTarget);
    }
    let path = if path.starts_with('?') { "/" } else { path };
    Ok((Some(authority), path))
}

/// A control character other than tab (`is_ascii_control`: below 0x20, or 0x7f). Written
/// without an early exit so the compiler can test many bytes per instruction (values such as
/// tokens are tens of bytes, and every request has some).
fn has_control(v: &[u8]) -> bool {
    v.iter().fold(false, |bad, &b| {
        bad | ((b < 0x20 && b != b'\t') | (b == 0x7f))
    })
}

/// Characters a Host value (name or address, optional port) may have; also applied to the
/// virtual host an access log names.
pub(crate) fn valid_host(h: &str) -> bool {
    h.len() <= 255 && h.bytes().all(|b| HOST_BYTES[usize::from(b)])
}

/// [`valid_host`]'s characters as a table: one load per byte of every request's Host.
static HOST_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']' | b'_');
        b += 1;
    }
    t
};

/// [`injection_in`] for a head httparse parsed whole, where it comes down to a bare LF: httparse
/// takes one as a line end, but refuses NUL and other control bytes in the request line,
/// names and values, a CR that no LF follows, and a header line that starts with whitespace
/// (obsolete line folding is refused in requests). A test checks the two agree on such heads.
/// Branch-free over byte pairs, like [`injection_in`], so it runs many bytes per instruction.
fn bare_lf_in(head: &[u8]) -> bool {
    let pairs = head.iter().zip(head.iter().skip(1));
    (head.first() == Some(&b'\n'))
        | pairs.fold(false, |bad, (&p, &b)| bad | ((b == b'\n') & (p != b'\r')))
}

/// CR or LF not part of CRLF, NUL, or a line that starts with whitespace (obs-fold) in the
/// request head.
fn injection_in(head: &[u8]) -> Option<SkipReason> {
    // Every byte is judged with its neighbours, without branches or an early exit, so the
    // compiler tests many bytes per instruction (a head is a few hundred bytes, every request).
    let bad = |prev: u8, b: u8, next: Option<u8>| {
        (b == 0)
            | ((b == b'\r') & next.is_some_and(|n| n != b'\n'))
            | ((b == b'\n') & ((prev != b'\r') | matches!(next, Some(b' ' | b'\t'))))
    };
    let found = match head {
        [] => false,
        [only] => bad(0, *only, None),
        [first, .., last] => {
            let n = head.len();
            // An LF first has no CR before it (prev 0); a CR last may be cut (next None).
            let middle = head[..n - 2]
                .iter()
                .zip(&head[1..n - 1])
                .zip(&head[2..])
                .fold(false, |acc, ((&p, &b), &nx)| acc | bad(p, b, Some(nx)));
            bad(0, *first, Some(head[1])) | middle | bad(head[n - 2], *last, None)
        }
    };
    found.then_some(SkipReason::HeaderInjection)
}

/// Method token (uppercase letters) then a space: worth naming a header problem rather than
/// calling the bytes junk.
fn looks_like_request_line(bytes: &[u8]) -> bool {
    let n = bytes
        .iter()
        .take(16)
        .take_while(|b| b.is_ascii_uppercase())
        .count();
    n > 0 && bytes.get(n) == Some(&b' ')
}

fn classify(e: httparse::Error, bytes: &[u8], config: &HttpConfig) -> SkipReason {
    let line_end = find(bytes, b"\r\n").unwrap_or(bytes.len());
    let line = &bytes[..line_end];
    match e {
        httparse::Error::HeaderName | httparse::Error::HeaderValue | httparse::Error::NewLine => {
            injection_in(bytes).unwrap_or(SkipReason::MalformedHeader)
        }
        httparse::Error::Version => SkipReason::BadVersion,
        httparse::Error::Token | httparse::Error::Status => {
            if !looks_like_request_line(bytes) {
                return SkipReason::NotHttp;
            }
            if std::str::from_utf8(line).is_err() {
                return SkipReason::InvalidUtf8;
            }
            if line.len() > config.max_path_len + 16 {
                return SkipReason::PathTooLong;
            }
            // "GET /index.html" (HTTP/0.9 style): a target and no version after it.
            if line.iter().filter(|&&b| b == b' ').count() == 1 && line.last() != Some(&b' ') {
                return SkipReason::BadVersion;
            }
            SkipReason::BadTarget
        }
        httparse::Error::TooManyHeaders => SkipReason::MalformedHeader,
    }
}

/// The blank line ending a request head, searched once per request: the searcher is built
/// once, since building one costs more than a search through a few hundred bytes.
static HEAD_END: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\r\n\r\n"));

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memmem::find(hay, needle)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memmem::rfind(hay, needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<OwnedRequest, SkipReason> {
        parse_request_owned(bytes, &HttpConfig::default())
    }

    /// Where the parser says a pipelined request starts, for each capture.
    fn next_of(bytes: &[u8]) -> Option<usize> {
        Parser::new(HttpConfig::default())
            .parse(bytes)
            .unwrap()
            .next
    }

    #[test]
    fn pipelined_requests_are_found_after_the_head_and_the_announced_body() {
        let get = b"GET /balance HTTP/1.1\r\nHost: bank\r\n\r\n";
        let post = b"POST /transfer HTTP/1.1\r\nHost: bank\r\nContent-Length: 7\r\n\r\n{\"a\":1}";
        assert_eq!(next_of(get), None, "nothing follows");
        assert_eq!(next_of(&[&get[..], post].concat()), Some(get.len()));
        assert_eq!(next_of(&[&post[..], get].concat()), Some(post.len()));
        // Empty lines between requests are skipped; nothing but them is nothing.
        assert_eq!(
            next_of(&[&post[..], b"\r\n", get].concat()),
            Some(post.len() + 2)
        );
        assert_eq!(next_of(&[&post[..], b"\r\n"].concat()), None);
        // A body longer than the capture: what follows it was not captured.
        assert_eq!(next_of(&post[..post.len() - 2]), None);
        // A chunked body is read chunk by chunk to its end: the transfer hidden behind one in
        // the same segment is found (chunk extensions and trailer fields included).
        let chunked =
            b"POST /t HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(next_of(&[&chunked[..], get].concat()), Some(chunked.len()));
        let dressed = b"POST /t HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n\
                        5;name=v\r\nhello\r\nA\r\n0123456789\r\n00\r\nX-Sum: 1\r\n\r\n";
        assert_eq!(next_of(&[&dressed[..], get].concat()), Some(dressed.len()));
        // No end to be known: a chunked body going on past the bytes (at any point of its
        // framing) or malformed, a final coding other than chunked, Transfer-Encoding with a
        // Content-Length (request smuggling ground), a Content-Length that is not a number.
        for cut in 48..chunked.len() {
            assert_eq!(super::tail(&chunked[..cut]), Tail::Unknown, "cut at {cut}");
        }
        assert_eq!(super::tail(chunked), Tail::Boundary);
        // A chunk size that reaches the end of the address space is no body to follow.
        // Its line is 18 bytes (16 digits and CRLF), so these end the data at the last offsets.
        for size in [u64::MAX - 19, u64::MAX - 18, u64::MAX - 17, u64::MAX] {
            let huge =
                format!("POST /t HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{size:x}\r\nab\r\n");
            assert_eq!(super::tail(huge.as_bytes()), Tail::Unknown, "{size}");
        }
        for body in [
            &b"5\r\nhelloX\r\n0\r\n\r\n"[..],
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
        ] {
            let head = b"POST /t HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
            assert_eq!(next_of(&[&head[..], body, get].concat()), None, "{body:?}");
        }
        for head in [
            &b"POST /t HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"[..],
            b"POST /t HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 15\r\n\r\n",
        ] {
            let body = b"5\r\nhello\r\n0\r\n\r\n";
            assert_eq!(next_of(&[head, &body[..], get].concat()), None, "{head:?}");
        }
        let bad = b"POST /t HTTP/1.1\r\nContent-Length: lots\r\n\r\nGET /x HTTP/1.1\r\n\r\n";
        assert_eq!(next_of(bad), None);
        // Whatever follows is the next parse's to judge (junk is counted there).
        assert_eq!(
            next_of(&[&get[..], b"\x16\x03\x01junk"].concat()),
            Some(get.len())
        );
    }

    /// The branch-free scan agrees with the rule written byte by byte, on every head of up to
    /// 6 bytes over the characters that matter.
    #[test]
    fn injection_scan_matches_the_byte_by_byte_rule() {
        fn reference(head: &[u8]) -> bool {
            head.iter().enumerate().any(|(i, &b)| match b {
                0 => true,
                b'\r' => head.get(i + 1).is_some_and(|&n| n != b'\n'),
                b'\n' => {
                    i == 0 || head[i - 1] != b'\r' || matches!(head.get(i + 1), Some(b' ' | b'\t'))
                }
                _ => false,
            })
        }
        const ALPHABET: [u8; 6] = [b'a', b'\r', b'\n', b' ', b'\t', 0];
        for len in 0..=6u32 {
            for mut code in 0..6usize.pow(len) {
                let head: Vec<u8> = (0..len)
                    .map(|_| {
                        let c = ALPHABET[code % 6];
                        code /= 6;
                        c
                    })
                    .collect();
                assert_eq!(injection_in(&head).is_some(), reference(&head), "{head:?}");
            }
        }
    }

    /// On every head httparse parses whole, looking for a bare LF finds what the full
    /// injection scan finds: valid requests with CR, LF, NUL, space, tab and text put in at
    /// random places, and the ones httparse still accepts compared.
    #[test]
    fn a_whole_head_needs_only_the_bare_lf_check() {
        let base =
            b"GET /a?b=1 HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer x\r\nAccept: */*\r\n\r\n";
        const NOISE: [&[u8]; 9] = [
            b"\r", b"\n", b"\r\n", b"\n ", b"\r\n\t", b"\0", b" ", b"\t", b"x:y",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) as usize % n
        };
        let (mut whole, mut flagged) = (0, 0);
        for _ in 0..20_000 {
            let mut head = base.to_vec();
            for _ in 0..1 + next(3) {
                let at = next(head.len() + 1);
                let noise = NOISE[next(NOISE.len())];
                head.splice(at..at, noise.iter().copied());
            }
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&head) {
                whole += 1;
                let head = &head[..n];
                assert_eq!(bare_lf_in(head), injection_in(head).is_some(), "{head:?}");
                flagged += usize::from(bare_lf_in(head));
            }
        }
        // Both outcomes were exercised.
        assert!(
            whole > 1000 && flagged > 100,
            "{whole} whole heads, {flagged} flagged"
        );
    }

    #[test]
    fn host_table_matches_the_character_rule() {
        for b in 0..=255u8 {
            let want =
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_');
            assert_eq!(HOST_BYTES[usize::from(b)], want, "byte {b:#04x}");
        }
    }

    /// The branch-free scan flags exactly what `is_ascii_control` flags, tab excepted.
    #[test]
    fn control_scan_matches_is_ascii_control_except_tab() {
        for b in 0..=255u8 {
            let want = b.is_ascii_control() && b != b'\t';
            assert_eq!(has_control(&[b'a', b, b'z']), want, "byte {b:#04x}");
        }
        assert!(!has_control(b"Bearer tok-0001\tx"));
    }

    #[test]
    fn parses_complete_request_with_host_and_session_headers() {
        let mut p = Parser::new(HttpConfig::default());
        let raw = b"GET /a/b?x=1 HTTP/1.1\r\nHost: api.example\r\nAuthorization: Bearer t0k\r\nCookie: sid=1\r\nAccept: */*\r\n\r\n";
        let r = p.parse(raw).unwrap();
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.path, "/a/b");
        assert_eq!(r.query, Some("x=1"));
        assert_eq!(r.host, Some("api.example"));
        assert_eq!(r.version, "HTTP/1.1");
        assert_eq!(r.headers.get("AUTHORIZATION"), Some("Bearer t0k"));
        assert_eq!(r.headers.get("cookie"), Some("sid=1"));
        assert_eq!(
            r.headers.get("accept"),
            None,
            "unselected headers are not kept"
        );
        assert!(!r.truncated);
    }

    #[test]
    fn truncated_mid_header_keeps_request_line_and_whole_header_lines() {
        let mut p = Parser::new(HttpConfig::default());
        let raw =
            b"POST /transfer HTTP/1.0\r\nHost: api\r\nAuthorization: Bearer abc\r\nCookie: sid=12";
        let r = p.parse(raw).unwrap();
        assert_eq!(
            (r.method, r.path, r.version),
            (Method::Post, "/transfer", "HTTP/1.0")
        );
        assert_eq!(r.host, Some("api"));
        assert_eq!(r.headers.get("authorization"), Some("Bearer abc"));
        assert_eq!(
            r.headers.get("cookie"),
            None,
            "a header cut mid-value must not be used"
        );
        assert!(r.truncated);
    }

    #[test]
    fn truncation_right_after_request_line_is_fine() {
        let r = parse(b"GET /x HTTP/1.1\r\nHo").unwrap();
        assert_eq!(r.path, "/x");
        assert!(r.truncated);
    }

    #[test]
    fn request_line_cut_before_version_is_incomplete() {
        assert_eq!(
            parse(b"GET /very/long/pa"),
            Err(SkipReason::IncompleteRequestLine)
        );
    }

    /// Padding the query (or a cut in the version) leaves the method and the path whole: the
    /// request is analysed, not skipped, whatever the capture length.
    #[test]
    fn request_line_cut_after_the_path_is_analysed() {
        let r = parse(b"GET /x HTTP/1.").unwrap();
        assert_eq!(
            (r.method, r.path.as_str(), r.query),
            (Method::Get, "/x", None)
        );
        assert!(r.truncated);
        for pad in [600, 5000] {
            let mut raw = b"POST /transferFunds?pad=".to_vec();
            raw.extend(std::iter::repeat_n(b'A', pad));
            raw.extend_from_slice(b" HTTP/1.1\r\nAuthorization: Bearer t\r\n\r\n");
            for cut in [512, 4096.min(raw.len() - 40)] {
                let mut parser = Parser::new(HttpConfig::default());
                let r = parser.parse(&raw[..cut]).unwrap();
                assert_eq!((r.method, r.path), (Method::Post, "/transferFunds"));
                assert!(r.query.unwrap().starts_with("pad=AAAA"));
                assert!(r.truncated && r.headers.is_empty());
            }
        }
        // A character the cut splits is left out; the path is checked as ever.
        assert_eq!(
            parse(b"GET /s?q=caf\xc3").unwrap().query.as_deref(),
            Some("q=caf")
        );
        assert_eq!(
            parse(b"GET /caf\xc3\x28?q HTTP/1.1"),
            Err(SkipReason::InvalidUtf8)
        );
    }

    #[test]
    fn binary_junk_is_not_http() {
        assert_eq!(
            parse(b"\x00\x01\x02 \xff\xfe\r\n\r\n"),
            Err(SkipReason::NotHttp)
        );
        assert_eq!(
            parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            Err(SkipReason::NotHttp)
        );
        assert_eq!(parse(b""), Err(SkipReason::Empty));
    }

    #[test]
    fn invalid_utf8_in_path_or_selected_header_is_skipped() {
        assert_eq!(
            parse(b"GET /caf\xc3\x28 HTTP/1.1\r\n\r\n"),
            Err(SkipReason::InvalidUtf8)
        );
        assert_eq!(
            parse(b"GET /ok HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\r\n\r\n"),
            Err(SkipReason::InvalidUtf8)
        );
    }

    #[test]
    fn path_of_100kb_is_too_long() {
        let mut raw = b"GET /".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 100 * 1024));
        let mut complete = raw.clone();
        complete.extend_from_slice(b" HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(parse(&complete), Err(SkipReason::PathTooLong));
        // The same path cut off before its version (a capture) is still "too long".
        assert_eq!(parse(&raw), Err(SkipReason::PathTooLong));
        // At the cap it is fine.
        let mut at_cap = b"GET /".to_vec();
        at_cap.extend(std::iter::repeat_n(b'a', DEFAULT_MAX_PATH_LEN - 1));
        at_cap.extend_from_slice(b" HTTP/1.1\r\n\r\n");
        assert_eq!(parse(&at_cap).unwrap().path.len(), DEFAULT_MAX_PATH_LEN);
    }

    #[test]
    fn request_line_without_version_is_bad_version() {
        assert_eq!(
            parse(b"GET /index.html\r\nHost: h\r\n\r\n"),
            Err(SkipReason::BadVersion)
        );
        assert_eq!(
            parse(b"GET /index.html HTTP/2.0\r\n\r\n"),
            Err(SkipReason::BadVersion)
        );
    }

    #[test]
    fn header_injection_attempts_are_named() {
        for raw in [
            &b"GET / HTTP/1.1\r\nX-A: a\rInjected: b\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nX-A: a\nAuthorization: Bearer evil\r\n\r\n",
            b"GET / HTTP/1.1\r\nAuthorization: Bearer a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nAuthorization: Bearer a\x00b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\n\tfold\r\n\r\n",
        ] {
            assert_eq!(
                parse(raw),
                Err(SkipReason::HeaderInjection),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn malformed_header_name_and_duplicate_host() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n"),
            Err(SkipReason::MalformedHeader)
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            Err(SkipReason::DuplicateHost)
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"),
            Err(SkipReason::BadHost)
        );
    }

    #[test]
    fn huge_header_count_keeps_request_line_and_drops_headers() {
        let mut raw = b"GET /h HTTP/1.1\r\n".to_vec();
        for i in 0..1000 {
            raw.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        let mut p = Parser::new(HttpConfig::default());
        {
            let r = p.parse(&raw).unwrap();
            assert_eq!(r.path, "/h");
            assert!(r.headers_dropped);
            assert!(r.headers.is_empty());
        }
        // And the same, truncated (no end of header section).
        let cut = &raw[..3000];
        let r = p.parse(cut).unwrap();
        assert!(r.headers_dropped && r.truncated);
    }

    #[test]
    fn every_followed_method_parses_and_absurd_ones_are_skipped() {
        for m in Method::ALL {
            let raw = format!("{} /x HTTP/1.1\r\n\r\n", m.as_str());
            assert_eq!(parse(raw.as_bytes()).unwrap().method, m);
        }
        assert_eq!(
            parse(b"get /x HTTP/1.1\r\n\r\n"),
            Err(SkipReason::UnknownMethod)
        );
        assert_eq!(
            parse(b"BREW /pot HTTP/1.1\r\n\r\n"),
            Err(SkipReason::UnknownMethod)
        );
        let long = format!("{} /x HTTP/1.1\r\n\r\n", "A".repeat(5000));
        assert_eq!(parse(long.as_bytes()), Err(SkipReason::UnknownMethod));
    }

    #[test]
    fn absolute_form_target_sets_host_and_path() {
        let r =
            parse(b"GET http://api.example:8080/v1/x?q=1 HTTP/1.1\r\nHost: other\r\n\r\n").unwrap();
        assert_eq!(r.host.as_deref(), Some("api.example:8080"));
        assert_eq!(r.path, "/v1/x");
        assert_eq!(r.query.as_deref(), Some("q=1"));
        assert_eq!(
            parse(b"OPTIONS * HTTP/1.1\r\n\r\n"),
            Err(SkipReason::BadTarget)
        );
        assert_eq!(
            parse(b"CONNECT h:443 HTTP/1.1\r\n\r\n"),
            Err(SkipReason::BadTarget)
        );
    }

    #[test]
    fn debug_output_redacts_header_values() {
        let mut p = Parser::new(HttpConfig::default());
        let r = p
            .parse(b"GET / HTTP/1.1\r\nAuthorization: Bearer sekrit-token\r\n\r\n")
            .unwrap();
        let dbg = format!("{r:?}");
        assert!(!dbg.contains("sekrit-token"), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn skip_counters_count_per_reason() {
        let mut c = SkipCounters::default();
        c.record(SkipReason::NotHttp);
        c.record(SkipReason::NotHttp);
        c.record(SkipReason::PathTooLong);
        assert_eq!(c.get(SkipReason::NotHttp), 2);
        assert_eq!(c.total(), 3);
        assert_eq!(
            c.iter().find(|(n, _)| *n == "path_too_long"),
            Some(("path_too_long", 1))
        );
        let names: std::collections::HashSet<_> =
            SkipReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), SkipReason::ALL.len(), "names are unique");
    }

    #[test]
    fn random_bytes_never_panic() {
        // Cheap deterministic fuzz: xorshift bytes, some with an HTTP-looking prefix.
        let mut s: u64 = 0x9E3779B97F4A7C15;
        let mut p = Parser::new(HttpConfig::default());
        for i in 0..20_000 {
            let len = (i % 300) + 1;
            let mut buf = if i % 2 == 0 {
                b"GET /".to_vec()
            } else {
                Vec::new()
            };
            for _ in 0..len {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                buf.push(if s.is_multiple_of(5) {
                    b"\r\n :/?"[(s >> 8) as usize % 6]
                } else {
                    (s >> 16) as u8
                });
            }
            let _ = p.parse(&buf);
        }
    }
    /// The shortcut never hides a body: heads, bodies and junk put together at random, and
    /// wherever it says "no body" the parse finds none either.
    #[test]
    fn announces_no_body_only_where_tail_finds_none() {
        const PARTS: [&[u8]; 17] = [
            b"Transfer-Encoding: chunked\r\n",
            b"4\r\nabcd\r\n",
            b"0\r\n\r\n",
            b"GET /a HTTP/1.1\r\n",
            b"POST /b HTTP/1.1\r\n",
            b"Host: h\r\n",
            b"content-LENGTH: 4\r\n",
            b"Content-Length: 0\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"X: y\r\n",
            b"\r\n",
            b"\n",
            b"abcd",
            b"GE",
            b"\r\n\r\n",
            b" folded\r\n",
            b"Content-Length : 3\r\n",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut shortcut = 0;
        for _ in 0..200_000 {
            let mut bytes = Vec::new();
            for _ in 0..1 + next(8) {
                bytes.extend_from_slice(PARTS[next(PARTS.len())]);
            }
            if announces_no_body(&bytes) {
                shortcut += 1;
                let t = tail(&bytes);
                assert!(
                    !matches!(t, Tail::Body(_)),
                    "{t:?} for {:?}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
        assert!(shortcut > 5_000, "{shortcut}");
        assert!(announces_no_body(
            b"GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"
        ));
        assert!(!announces_no_body(
            b"GET / HTTP/1.1\r\nCONTENT-length: 3\r\n\r\n"
        ));
    }

    #[test]
    fn tail_reads_requests_and_their_bodies_to_the_end() {
        use super::{Tail, tail};
        assert_eq!(tail(b"GET / HTTP/1.1\r\n\r\n"), Tail::Boundary);
        assert_eq!(tail(b"GET / HTTP/1.1\r\nHost: a\r\n"), Tail::Head(0));
        assert_eq!(tail(b"PO"), Tail::Head(0));
        let post = b"POST / HTTP/1.1\r\ncontent-LENGTH: 4\r\n\r\n";
        assert_eq!(tail(post), Tail::Body(post.len() + 4));
        let mut two = post.to_vec();
        two.extend_from_slice(b"abcd\r\nGET /x HTTP/1.1\r\n");
        assert_eq!(tail(&two), Tail::Head(post.len() + 6));
        two.extend_from_slice(b"\r\n");
        assert_eq!(tail(&two), Tail::Boundary);
        assert_eq!(
            tail(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd"),
            Tail::Unknown
        );
        // A chunked body that ends in the bytes is passed like any other: a request behind
        // it is read, and one cut short waits for its next piece.
        let chunked =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n";
        assert_eq!(tail(chunked), Tail::Boundary);
        let mut behind = chunked.to_vec();
        behind.extend_from_slice(b"POST /transferFunds HTTP/1.1\r\n");
        assert_eq!(tail(&behind), Tail::Head(chunked.len()));
        assert_eq!(
            tail(b"POST / HTTP/1.1\r\nContent-Length: 9999999999\r\n\r\n"),
            Tail::Unknown
        );
        assert_eq!(tail(b"\x16\x03\x01 junk"), Tail::Unknown);
    }
}
