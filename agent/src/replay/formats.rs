//! Text formats: Apache/nginx `common` and `combined` access logs and `jsonl`, one line in,
//! one record (or one named [`Skip`]) out, plus the sniffing that picks a format.
//!
//! Request lines go through the same [`http::Parser`] as live captures, so a path the daemon
//! would skip (too long, bad target, unknown method) is skipped here for the same reason.
use std::{borrow::Cow, collections::BTreeMap, fmt, net::IpAddr};

use serde::Deserialize;

use super::{Origin, ReplayRecord};
use crate::http::{self, Method, SkipReason};

/// Why one input line (or packet) produced no record. [`Skip::as_str`] is stable: summaries and
/// scripts key on it. Reasons from the HTTP parser keep the parser's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The line does not have the fields of its format (no `[time]`, no quoted request, ...).
    BadLine,
    BadTimestamp,
    /// The request field is not `METHOD target [HTTP/x.y]`.
    BadRequestLine,
    /// `"-"` or `""` as the request: the server logged a connection that sent no request
    /// (timeouts, TLS on a plain port). Common and harmless, hence its own name.
    NoRequestLine,
    BadClient,
    InvalidUtf8,
    LineTooLong,
    BadJson,
    /// A required jsonl field (`ts`, `client`, `method`, `path`) is missing or null.
    MissingField,
    /// A packet cut before its TCP header ended, or a capture file cut mid-packet.
    TruncatedPacket,
    /// What the live path's HTTP parser says about the request bytes.
    Http(SkipReason),
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::BadLine => "bad_line",
            Skip::BadTimestamp => "bad_timestamp",
            Skip::BadRequestLine => "bad_request_line",
            Skip::NoRequestLine => "no_request_line",
            Skip::BadClient => "bad_client",
            Skip::InvalidUtf8 => "invalid_utf8",
            Skip::LineTooLong => "line_too_long",
            Skip::BadJson => "bad_json",
            Skip::MissingField => "missing_field",
            Skip::TruncatedPacket => "truncated_packet",
            Skip::Http(r) => r.as_str(),
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fields of a common/combined line, still escaped, borrowed from the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClfFields<'a> {
    /// `%v:%p` in front of the client, as Apache's `vhost_combined` writes (Debian's
    /// `other_vhosts_access.log`): the virtual host that served the request.
    pub vhost: Option<&'a [u8]>,
    pub client: &'a [u8],
    /// `10/Oct/2000:13:55:36 -0700`, without the brackets.
    pub time: &'a [u8],
    /// Between the quotes, escapes not undone.
    pub request: &'a [u8],
    /// `"%{Referer}i" "%{User-agent}i"` follow the size (what makes a line `combined`).
    pub combined: bool,
}

/// Splits `%h %l %u %t "%r" %>s %b` and, when present, ` "%{Referer}i" "%{User-agent}i"`.
/// Anything after those is ignored (nginx setups often append fields). A `%v:%p` field in
/// front (`vhost_combined`) is recognised by the client address that follows it where `%l`
/// (almost always `-`) would be.
pub(crate) fn split_clf(line: &[u8]) -> Result<ClfFields<'_>, Skip> {
    let mut sp = memchr::memchr(b' ', line).ok_or(Skip::BadLine)?;
    let mut vhost = None;
    let mut client = &line[..sp];
    let (second, _) = token(&line[sp + 1..]);
    if second != b"-" && parse_client(second).is_ok() && parse_client(client).is_err() {
        vhost = Some(client);
        client = second;
        sp += 1 + second.len();
    }
    // %l and %u are usually "-", but %u is whatever the client authenticated as and may hold
    // spaces: find the timestamp by its bracket instead of counting fields.
    let open = memchr::memmem::find(&line[sp..], b" [").ok_or(Skip::BadLine)? + sp + 2;
    let close = memchr::memchr(b']', &line[open..]).ok_or(Skip::BadLine)? + open;
    let time = &line[open..close];
    let rest = line[close + 1..]
        .strip_prefix(b" \"")
        .ok_or(Skip::BadLine)?;
    let (request, rest) = quoted(rest).ok_or(Skip::BadLine)?;
    let rest = rest.strip_prefix(b" ").ok_or(Skip::BadLine)?;
    let (status, rest) = token(rest);
    if status.len() != 3 || !status.iter().all(u8::is_ascii_digit) {
        return Err(Skip::BadLine);
    }
    let rest = rest.strip_prefix(b" ").ok_or(Skip::BadLine)?;
    let (size, rest) = token(rest);
    if size.is_empty() || (size != b"-" && !size.iter().all(u8::is_ascii_digit)) {
        return Err(Skip::BadLine);
    }
    let combined = rest
        .strip_prefix(b" \"")
        .and_then(quoted)
        .and_then(|(_, r)| r.strip_prefix(b" \""))
        .and_then(quoted)
        .is_some();
    Ok(ClfFields {
        vhost,
        client,
        time,
        request,
        combined,
    })
}

fn token(s: &[u8]) -> (&[u8], &[u8]) {
    let end = memchr::memchr(b' ', s).unwrap_or(s.len());
    s.split_at(end)
}

/// The inside of a quoted field whose opening quote is already consumed, and what follows
/// the closing quote. A backslash escapes the next byte (Apache writes `\"` and `\\`).
fn quoted(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut i = 0;
    loop {
        i += memchr::memchr2(b'"', b'\\', &s[i..])?;
        if s[i] == b'"' {
            return Some((&s[..i], &s[i + 1..]));
        }
        i += 2;
        if i > s.len() {
            return None;
        }
    }
}

/// Undoes the escaping Apache (`\"`, `\\`, `\xhh`) and nginx (`\xhh`) apply to the request
/// line, so the HTTP parser sees the bytes the client sent.
pub(crate) fn unescape_into(s: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while let Some(j) = memchr::memchr(b'\\', &s[i..]) {
        out.extend_from_slice(&s[i..i + j]);
        i += j;
        match s.get(i + 1) {
            Some(b'x') => match (s.get(i + 2).and_then(hex), s.get(i + 3).and_then(hex)) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 4;
                }
                _ => {
                    out.push(b'\\');
                    i += 1;
                }
            },
            Some(b'n') => {
                out.push(b'\n');
                i += 2;
            }
            Some(b't') => {
                out.push(b'\t');
                i += 2;
            }
            Some(&c) => {
                out.push(c);
                i += 2;
            }
            None => {
                out.push(b'\\');
                i += 1;
            }
        }
    }
    out.extend_from_slice(&s[i..]);
}

fn hex(b: &u8) -> Option<u8> {
    (*b as char).to_digit(16).map(|d| d as u8)
}

/// A client address as logged: IPv4, IPv6, bracketed IPv6, IPv6 with a zone (`%eth0`,
/// dropped: the address alone identifies the client). IPv4-mapped IPv6 (`::ffff:10.0.0.1`,
/// what dual-stack servers log) becomes IPv4, the address the live path sees on the wire.
pub(crate) fn parse_client(s: &[u8]) -> Result<IpAddr, Skip> {
    let s = std::str::from_utf8(s).map_err(|_| Skip::BadClient)?;
    let s = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s);
    let s = s.split_once('%').map_or(s, |(a, _)| a);
    s.parse::<IpAddr>()
        .map(|a| a.to_canonical())
        .map_err(|_| Skip::BadClient)
}

/// Remembers the last timestamp parsed: busy logs write the same second on many lines.
#[derive(Debug, Default)]
pub(crate) struct ClfTimeCache {
    last: Option<([u8; 26], u64)>,
}

impl ClfTimeCache {
    pub fn parse(&mut self, s: &[u8]) -> Result<u64, Skip> {
        if let Some((raw, ns)) = &self.last
            && raw.as_slice() == s
        {
            return Ok(*ns);
        }
        let ns = parse_clf_time(s)?;
        if let Ok(raw) = <[u8; 26]>::try_from(s) {
            self.last = Some((raw, ns));
        }
        Ok(ns)
    }
}

/// `10/Oct/2000:13:55:36 -0700` → Unix ns. Strict: exact widths, English month names, a
/// numeric offset, fields in range. Hand-written because the format is fixed-width and this is
/// the hottest line of log parsing; a general strftime-style parser buys nothing here.
pub(crate) fn parse_clf_time(s: &[u8]) -> Result<u64, Skip> {
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let bad = Skip::BadTimestamp;
    if s.len() != 26
        || s[2] != b'/'
        || s[6] != b'/'
        || s[11] != b':'
        || s[14] != b':'
        || s[17] != b':'
        || s[20] != b' '
    {
        return Err(bad);
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, Skip> {
        s[r].iter().try_fold(0i64, |acc, &b| {
            b.is_ascii_digit()
                .then(|| acc * 10 + i64::from(b - b'0'))
                .ok_or(bad)
        })
    };
    let day = num(0..2)?;
    let month = MONTHS.iter().position(|m| m[..] == s[3..6]).ok_or(bad)? as i64 + 1;
    let year = num(7..11)?;
    let (hour, min, sec) = (num(12..14)?, num(15..17)?, num(18..20)?);
    let sign = match s[21] {
        b'+' => 1,
        b'-' => -1,
        _ => return Err(bad),
    };
    let (off_h, off_m) = (num(22..24)?, num(24..26)?);
    if !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || min > 59
        || sec > 60
        || off_h > 23
        || off_m > 59
    {
        return Err(bad);
    }
    let local = days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec;
    let utc = local - sign * (off_h * 3600 + off_m * 60);
    u64::try_from(utc)
        .ok()
        .and_then(|s| s.checked_mul(1_000_000_000))
        .ok_or(bad)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Per-file parsing state for the text formats: reused buffers and the live path's parser.
/// Public for the fuzz targets (fuzz/), which feed it lines the way replay does.
#[derive(Debug)]
pub struct LineParser {
    http: http::Parser,
    /// Header names kept in records (lowercase): the session headers and `cookie`.
    keep: Vec<String>,
    scratch: Vec<u8>,
    times: ClfTimeCache,
}

impl LineParser {
    pub fn new(config: http::HttpConfig) -> Self {
        let mut keep: Vec<String> = config
            .session_headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        if !keep.iter().any(|h| h == "cookie") {
            keep.push("cookie".into());
        }
        LineParser {
            http: http::Parser::new(config),
            keep,
            scratch: Vec::with_capacity(512),
            times: ClfTimeCache::default(),
        }
    }

    pub fn keep(&self) -> &[String] {
        &self.keep
    }

    /// One `common` or `combined` line (without its line end). `combined` demands the
    /// referer and user-agent fields, `common` ignores whatever follows the size.
    pub fn clf(
        &mut self,
        line: &[u8],
        combined: bool,
        origin: Origin,
    ) -> Result<ReplayRecord, Skip> {
        let f = split_clf(line)?;
        if combined && !f.combined {
            return Err(Skip::BadLine);
        }
        let client = parse_client(f.client)?;
        let ts_ns = self.times.parse(f.time)?;
        if f.request.is_empty() || f.request == b"-" {
            return Err(Skip::NoRequestLine);
        }
        self.scratch.clear();
        unescape_into(f.request, &mut self.scratch);
        if memchr::memchr(b' ', &self.scratch).is_none() {
            return Err(Skip::BadRequestLine);
        }
        read_later_versions_as_http11(&mut self.scratch);
        self.scratch.extend_from_slice(b"\r\n\r\n");
        let req = self.http.parse(&self.scratch).map_err(Skip::Http)?;
        // An absolute-form target names its host; else the virtual host, when logged.
        let host = match (req.host, f.vhost) {
            (Some(h), _) => Some(h.to_owned()),
            (None, Some(v)) => Some(
                std::str::from_utf8(v)
                    .ok()
                    .filter(|v| http::valid_host(v))
                    .ok_or(Skip::Http(SkipReason::BadHost))?
                    .to_owned(),
            ),
            (None, None) => None,
        };
        Ok(ReplayRecord {
            ts_ns,
            client,
            method: req.method,
            path: req.path.to_owned(),
            query: req.query.map(str::to_owned),
            host,
            headers: Vec::new(),
            session: None,
            origin,
            conflict: None,
        })
    }

    /// One jsonl object. See [`JsonLine`] for the fields.
    pub fn jsonl(&mut self, line: &[u8], origin: Origin) -> Result<ReplayRecord, Skip> {
        let text = std::str::from_utf8(line).map_err(|_| Skip::InvalidUtf8)?;
        let j: JsonLine<'_> = serde_json::from_str(text).map_err(|_| Skip::BadJson)?;
        let (Some(ts), Some(client), Some(method), Some(path)) = (j.ts, j.client, j.method, j.path)
        else {
            return Err(Skip::MissingField);
        };
        let ts_ns = ts.unix_ns()?;
        let client = parse_client(client.as_bytes())?;
        let method = Method::parse(&method).ok_or(Skip::Http(SkipReason::UnknownMethod))?;
        // The target goes through the live parser: same path/query split, same limits.
        if path.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(Skip::Http(SkipReason::BadTarget));
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(method.as_str().as_bytes());
        self.scratch.push(b' ');
        self.scratch.extend_from_slice(path.as_bytes());
        self.scratch.extend_from_slice(b" HTTP/1.1\r\n\r\n");
        let req = self.http.parse(&self.scratch).map_err(Skip::Http)?;
        let mut host = j.host.map(Cow::into_owned).or(req.host.map(str::to_owned));
        let mut headers = Vec::new();
        for (name, value) in j.headers.into_iter().flatten() {
            if name.eq_ignore_ascii_case("host") {
                host.get_or_insert_with(|| value.clone().into_owned());
            } else if self.keep.iter().any(|k| k.eq_ignore_ascii_case(&name)) {
                headers.push((name.to_ascii_lowercase(), value.into_owned()));
            }
        }
        Ok(ReplayRecord {
            ts_ns,
            client,
            method,
            path: req.path.to_owned(),
            query: req.query.map(str::to_owned),
            host,
            headers,
            session: j.session.map(Cow::into_owned).filter(|s| !s.is_empty()),
            origin,
            conflict: None,
        })
    }
}

/// A log names the protocol each request came over, and behind a TLS terminator most are
/// HTTP/2 or HTTP/3 (nginx and Apache log `HTTP/2.0`, `HTTP/3.0`). For the sequence they are
/// requests like any other (only live capture is limited to HTTP/1.x), so their version is
/// read as HTTP/1.1 by the request-line parser, which knows no other.
fn read_later_versions_as_http11(request_line: &mut Vec<u8>) {
    if let Some(sp) = memchr::memrchr(b' ', request_line)
        && matches!(
            &request_line[sp + 1..],
            b"HTTP/2.0" | b"HTTP/2" | b"HTTP/3.0" | b"HTTP/3"
        )
    {
        request_line.truncate(sp + 1);
        request_line.extend_from_slice(b"HTTP/1.1");
    }
}

/// One jsonl line. Unknown fields are ignored (exports carry more than replay needs).
/// `ts` is an RFC 3339 string with an offset (`2024-05-01T12:00:00.250Z`) or a number of
/// Unix **seconds**, fractions allowed (`1714564800.25`). Milliseconds are not guessed: a
/// number beyond the year 9999 in seconds is a `bad_timestamp`. `path` may carry the query.
#[derive(Debug, Deserialize)]
struct JsonLine<'a> {
    #[serde(default)]
    ts: Option<JsonTs<'a>>,
    #[serde(default, borrow)]
    client: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    path: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    host: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    session: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    headers: Option<BTreeMap<Cow<'a, str>, Cow<'a, str>>>,
}

#[derive(Debug)]
enum JsonTs<'a> {
    Text(Cow<'a, str>),
    Seconds(f64),
    WholeSeconds(i128),
}

/// 9999-12-31T23:59:59Z: anything later is a unit mistake (ms or µs given as seconds).
const MAX_UNIX_SECONDS: i128 = 253_402_300_799;

impl JsonTs<'_> {
    fn unix_ns(&self) -> Result<u64, Skip> {
        let ns: i128 = match self {
            JsonTs::Text(s) => s
                .parse::<jiff::Timestamp>()
                .map_err(|_| Skip::BadTimestamp)?
                .as_nanosecond(),
            JsonTs::WholeSeconds(s) if (0..=MAX_UNIX_SECONDS).contains(s) => s * 1_000_000_000,
            JsonTs::Seconds(s) if s.is_finite() && (0.0..=MAX_UNIX_SECONDS as f64).contains(s) => {
                // Split to keep nanosecond precision that one f64 multiply would lose.
                let whole = s.trunc();
                whole as i128 * 1_000_000_000 + ((s - whole) * 1e9).round() as i128
            }
            _ => return Err(Skip::BadTimestamp),
        };
        u64::try_from(ns).map_err(|_| Skip::BadTimestamp)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for JsonTs<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = JsonTs<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 string or Unix seconds")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(JsonTs::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(JsonTs::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(JsonTs::WholeSeconds(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(JsonTs::WholeSeconds(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(JsonTs::Seconds(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A short, printable excerpt of a skipped line for the summary. Escaped (no control bytes or
/// invalid UTF-8 reach a terminal), and a jsonl line is cut before its `"headers"`, which may
/// hold tokens.
pub(crate) fn excerpt(line: &[u8]) -> String {
    const MAX: usize = 120;
    let (line, elided) = match memchr::memmem::find(line, b"\"headers\"") {
        Some(i) => (&line[..i], true),
        None => (line, false),
    };
    let mut out = String::new();
    for b in line.iter().take(MAX) {
        out.extend(b.escape_ascii().map(char::from));
    }
    if line.len() > MAX {
        out.push('…');
    }
    if elided {
        out.push_str("[headers elided]");
    }
    out
}

/// What a text sample looks like. `None` when no line fits any text format.
pub(crate) fn sniff_text(sample: &[u8]) -> Option<super::Format> {
    use super::Format;
    let (mut json, mut combined, mut common) = (0, 0, 0);
    // The last line of a sample may be cut; it is left out unless it is the only one.
    let lines: Vec<&[u8]> = sample.split(|&b| b == b'\n').collect();
    let usable = if lines.len() > 1 {
        &lines[..lines.len() - 1]
    } else {
        &lines[..]
    };
    for line in usable
        .iter()
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .take(32)
    {
        if line.first() == Some(&b'{') {
            if serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok() {
                json += 1;
            }
        } else if let Ok(f) = split_clf(line) {
            if f.combined {
                combined += 1;
            } else {
                common += 1;
            }
        }
    }
    if json == 0 && combined == 0 && common == 0 {
        None
    } else if json >= combined + common {
        Some(Format::Jsonl)
    } else if combined >= common {
        Some(Format::Combined)
    } else {
        Some(Format::Common)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::Format;

    const O: Origin = Origin { file: 0, pos: 1 };

    fn unix_ns(rfc3339: &str) -> u64 {
        rfc3339.parse::<jiff::Timestamp>().unwrap().as_nanosecond() as u64
    }

    fn parser() -> LineParser {
        LineParser::new(http::HttpConfig::default())
    }

    fn clf(line: &str) -> Result<ReplayRecord, Skip> {
        parser().clf(line.as_bytes(), false, O)
    }

    fn combined(line: &str) -> Result<ReplayRecord, Skip> {
        parser().clf(line.as_bytes(), true, O)
    }

    fn jsonl(line: &str) -> Result<ReplayRecord, Skip> {
        parser().jsonl(line.as_bytes(), O)
    }

    #[test]
    fn clf_time_applies_the_offset_to_get_utc() {
        assert_eq!(
            parse_clf_time(b"10/Oct/2000:13:55:36 -0700"),
            Ok(unix_ns("2000-10-10T20:55:36Z"))
        );
        assert_eq!(
            parse_clf_time(b"01/Jan/2024:00:30:00 +0100"),
            Ok(unix_ns("2023-12-31T23:30:00Z"))
        );
        assert_eq!(
            parse_clf_time(b"29/Feb/2024:23:59:59 +0000"),
            Ok(unix_ns("2024-02-29T23:59:59Z"))
        );
        assert_eq!(
            parse_clf_time(b"01/Jan/1970:00:00:00 +0000"),
            Ok(0),
            "the epoch itself is fine"
        );
    }

    #[test]
    fn clf_time_rejects_everything_not_strictly_valid() {
        for bad in [
            "29/Feb/2023:00:00:00 +0000",
            "31/Apr/2024:00:00:00 +0000",
            "00/Jan/2024:00:00:00 +0000",
            "10/oct/2000:13:55:36 -0700",
            "10/Okt/2000:13:55:36 -0700",
            "10/Oct/2000:24:00:00 -0700",
            "10/Oct/2000:13:60:00 -0700",
            "10/Oct/2000:13:55:36 0700",
            "10/Oct/2000:13:55:36 -07:00",
            "10/Oct/2000 13:55:36 -0700",
            "1/Oct/2000:13:55:36 -0700",
            "10/Oct/2000:13:55:36",
            "31/Dec/1969:23:59:59 +0000",
            "10/Oct/2000:1a:55:36 -0700",
            "",
        ] {
            assert_eq!(
                parse_clf_time(bad.as_bytes()),
                Err(Skip::BadTimestamp),
                "{bad}"
            );
        }
    }

    #[test]
    fn common_line_gives_client_time_method_path_and_query() {
        let r = clf(r#"127.0.0.1 - frank [10/Oct/2000:13:55:36 -0700] "GET /apache_pb.gif?x=1&y=2 HTTP/1.0" 200 2326"#)
            .unwrap();
        assert_eq!(r.client, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(r.ts_ns, unix_ns("2000-10-10T20:55:36Z"));
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.path, "/apache_pb.gif");
        assert_eq!(r.query.as_deref(), Some("x=1&y=2"));
        assert_eq!(r.host, None);
        assert!(r.headers.is_empty() && r.session.is_none());
        assert_eq!(r.origin, O);
    }

    #[test]
    fn combined_line_with_ipv6_client_and_escaped_quotes() {
        let line = r#"2001:db8::7 - - [10/Oct/2000:13:55:36 +0000] "POST /api/v1/transferFunds HTTP/1.1" 201 - "https://bank.example/\"home\"" "Mozilla/5.0 (X11; \"quoted\" UA)""#;
        let r = combined(line).unwrap();
        assert_eq!(r.client, "2001:db8::7".parse::<IpAddr>().unwrap());
        assert_eq!(
            (r.method, r.path.as_str()),
            (Method::Post, "/api/v1/transferFunds")
        );
        // A bracketed v6 address and one with a zone are the same client.
        let r = combined(&line.replacen("2001:db8::7", "[2001:db8::7]", 1)).unwrap();
        assert_eq!(r.client, "2001:db8::7".parse::<IpAddr>().unwrap());
        let r = combined(&line.replacen("2001:db8::7", "fe80::1%eth0", 1)).unwrap();
        assert_eq!(r.client, "fe80::1".parse::<IpAddr>().unwrap());
        let r = combined(&line.replacen("2001:db8::7", "::ffff:10.0.0.9", 1)).unwrap();
        assert_eq!(
            r.client,
            "10.0.0.9".parse::<IpAddr>().unwrap(),
            "v4-mapped is v4"
        );
    }

    #[test]
    fn escaped_quote_and_hex_escape_in_the_request_are_undone() {
        let r = combined(r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET /q?s=\"x\"&t=\x22y HTTP/1.1" 200 5 "-" "-""#)
            .unwrap();
        assert_eq!(r.path, "/q");
        assert_eq!(r.query.as_deref(), Some(r#"s="x"&t="y"#));
    }

    #[test]
    fn odd_but_valid_lines_parse() {
        // A user name with a space, extra nginx fields after the user agent, size "-",
        // absolute-form target (a proxy log), HTTP/1.0.
        let r = combined(r#"192.0.2.1 - john smith [10/Oct/2000:13:55:36 +0000] "GET http://api.example:8080/v1/x?q=1 HTTP/1.0" 304 - "-" "curl/8" "203.0.113.9" rt=0.003"#)
            .unwrap();
        assert_eq!(r.host.as_deref(), Some("api.example:8080"));
        assert_eq!(
            (r.path.as_str(), r.query.as_deref()),
            ("/v1/x", Some("q=1"))
        );
        // Apache's vhost_combined: the virtual host and port in front of the client.
        let r = combined(r#"api.example.com:443 2001:db8::7 - - [10/Oct/2000:13:55:36 +0000] "GET /v1/x HTTP/1.1" 200 5 "-" "ua""#)
            .unwrap();
        assert_eq!(r.host.as_deref(), Some("api.example.com:443"));
        assert_eq!(r.client, "2001:db8::7".parse::<IpAddr>().unwrap());
        assert_eq!(r.path, "/v1/x");
        assert_eq!(
            combined(r#"a<b>:443 192.0.2.1 - - [10/Oct/2000:13:55:36 +0000] "GET / HTTP/1.1" 200 5 "-" "ua""#)
                .map(|_| ()),
            Err(Skip::Http(SkipReason::BadHost))
        );
        // A user name that looks like an address does not make the client a virtual host.
        let r = combined(
            r#"192.0.2.1 10.0.0.1 - [10/Oct/2000:13:55:36 +0000] "GET / HTTP/1.1" 200 5 "-" "ua""#,
        )
        .unwrap();
        assert_eq!((r.client, r.host), ("192.0.2.1".parse().unwrap(), None));
        // Requests that came over HTTP/2 or HTTP/3, as nginx and Apache log them.
        for version in ["HTTP/2.0", "HTTP/2", "HTTP/3.0", "HTTP/3"] {
            let r = combined(&format!(
                r#"192.0.2.1 - - [10/Oct/2000:13:55:36 +0000] "POST /api/v1/transferFunds?dry=1 {version}" 201 5 "-" "ua""#
            ))
            .unwrap_or_else(|e| panic!("{version}: {e:?}"));
            assert_eq!(
                (r.method, r.path.as_str(), r.query.as_deref()),
                (Method::Post, "/api/v1/transferFunds", Some("dry=1")),
                "{version}"
            );
        }
        // A combined line is a fine common line (the tail is ignored).
        assert!(
            clf(r#"192.0.2.1 - - [10/Oct/2000:13:55:36 +0000] "GET / HTTP/1.1" 200 1 "-" "-""#)
                .is_ok()
        );
    }

    #[test]
    fn every_malformed_kind_has_its_reason() {
        let ok = r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET /a HTTP/1.1" 200 5 "-" "ua""#;
        assert!(combined(ok).is_ok());
        let cases: &[(&str, Skip)] = &[
            (
                r#"www.example.com - - [10/Oct/2000:13:55:36 +0000] "GET /a HTTP/1.1" 200 5 "-" "ua""#,
                Skip::BadClient,
            ),
            (
                r#"10.0.0.1 - - [10/Oct/2000:13:55:36] "GET /a HTTP/1.1" 200 5 "-" "ua""#,
                Skip::BadTimestamp,
            ),
            (
                r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "-" 408 0 "-" "-""#,
                Skip::NoRequestLine,
            ),
            (
                r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "" 400 0 "-" "-""#,
                Skip::NoRequestLine,
            ),
            (
                r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "\x16\x03\x01" 400 0 "-" "-""#,
                Skip::BadRequestLine,
            ),
            (
                r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "BREW /pot HTTP/1.1" 418 0 "-" "-""#,
                Skip::Http(SkipReason::UnknownMethod),
            ),
            (
                r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "get /a HTTP/1.1" 200 5 "-" "-""#,
                Skip::Http(SkipReason::UnknownMethod),
            ),
            (
                r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET /a HTTP/4.0" 200 5 "-" "-""#,
                Skip::Http(SkipReason::BadVersion),
            ),
            (
                r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET /a HTTP/2.0x" 200 5 "-" "-""#,
                Skip::Http(SkipReason::BadVersion),
            ),
            (
                r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET /caf\xc3\x28 HTTP/1.1" 200 5 "-" "-""#,
                Skip::Http(SkipReason::InvalidUtf8),
            ),
            (
                r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET /a HTTP/1.1" 200"#,
                Skip::BadLine,
            ),
            (
                r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET /a HTTP/1.1" abc 5 "-" "-""#,
                Skip::BadLine,
            ),
            (
                r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET /a HTTP/1.1 200 5"#,
                Skip::BadLine,
            ),
            (
                r#"10.0.0.1 - - 10/Oct/2000:13:55:36 +0000 "GET /a HTTP/1.1" 200 5 "-" "-""#,
                Skip::BadLine,
            ),
            (
                r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET /a HTTP/1.1" 200 5"#,
                Skip::BadLine,
            ),
            ("garbage", Skip::BadLine),
        ];
        for (line, want) in cases {
            assert_eq!(combined(line).map(|_| ()), Err(*want), "{line}");
        }
        // The same line, common format: missing referer/user-agent is fine there.
        assert!(
            clf(r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET /a HTTP/1.1" 200 5"#).is_ok()
        );
    }

    #[test]
    fn path_over_the_live_limit_is_skipped_like_live() {
        let line = format!(
            r#"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET /{} HTTP/1.1" 200 5"#,
            "a".repeat(http::DEFAULT_MAX_PATH_LEN + 10)
        );
        assert_eq!(
            clf(&line).map(|_| ()),
            Err(Skip::Http(SkipReason::PathTooLong))
        );
    }

    #[test]
    fn jsonl_accepts_rfc3339_and_unix_seconds() {
        let base = r#""client":"10.1.2.3","method":"GET","path":"/a?b=1""#;
        let cases = [
            (r#""2024-05-01T12:00:00Z""#, unix_ns("2024-05-01T12:00:00Z")),
            (
                r#""2024-05-01T14:00:00.250+02:00""#,
                unix_ns("2024-05-01T12:00:00.25Z"),
            ),
            ("1714564800", unix_ns("2024-05-01T12:00:00Z")),
            ("1714564800.25", unix_ns("2024-05-01T12:00:00.25Z")),
        ];
        for (ts, want) in cases {
            let r = jsonl(&format!(r#"{{"ts":{ts},{base}}}"#)).unwrap();
            assert_eq!(r.ts_ns, want, "{ts}");
            assert_eq!((r.path.as_str(), r.query.as_deref()), ("/a", Some("b=1")));
        }
        for ts in [
            "1714564800000",
            "-5",
            r#""2024-05-01 12:00:00""#,
            r#""yesterday""#,
            "true",
            "null",
        ] {
            let r = jsonl(&format!(r#"{{"ts":{ts},{base}}}"#));
            let want = if matches!(ts, "true") {
                Skip::BadJson
            } else if ts == "null" {
                Skip::MissingField
            } else {
                Skip::BadTimestamp
            };
            assert_eq!(r.map(|_| ()), Err(want), "{ts}");
        }
    }

    #[test]
    fn jsonl_keeps_session_headers_host_and_session_id() {
        let r = jsonl(r#"{"ts":1,"client":"::1","method":"POST","path":"/t","session":"s-42","extra":[1,2],
            "headers":{"Authorization":"Bearer x","Cookie":"sid=1","Accept":"*/*","Host":"api.example"}}"#.replace('\n', "").as_str())
            .unwrap();
        assert_eq!(r.session.as_deref(), Some("s-42"));
        assert_eq!(r.host.as_deref(), Some("api.example"));
        let mut h = r.headers.clone();
        h.sort();
        assert_eq!(
            h,
            vec![
                ("authorization".into(), "Bearer x".into()),
                ("cookie".into(), "sid=1".into())
            ]
        );
        // An explicit host field wins over the header.
        let r = jsonl(r#"{"ts":1,"client":"::1","method":"GET","path":"/","host":"a","headers":{"host":"b"}}"#).unwrap();
        assert_eq!(r.host.as_deref(), Some("a"));
        assert!(
            !format!("{r:?}").contains("Bearer"),
            "Debug must not print header values"
        );
    }

    #[test]
    fn jsonl_malformed_kinds() {
        let cases: &[(&[u8], Skip)] = &[
            (b"{not json", Skip::BadJson),
            (b"[1,2]", Skip::BadJson),
            (
                b"{\"ts\":1,\"client\":\"::1\",\"method\":\"GET\",\"path\":\"/\xff\"}",
                Skip::InvalidUtf8,
            ),
            (
                br#"{"client":"::1","method":"GET","path":"/"}"#,
                Skip::MissingField,
            ),
            (
                br#"{"ts":1,"client":"::1","method":"GET"}"#,
                Skip::MissingField,
            ),
            (
                br#"{"ts":1,"client":"nope","method":"GET","path":"/"}"#,
                Skip::BadClient,
            ),
            (
                br#"{"ts":1,"client":"::1","method":"FETCH","path":"/"}"#,
                Skip::Http(SkipReason::UnknownMethod),
            ),
            (
                br#"{"ts":1,"client":"::1","method":"GET","path":"a b"}"#,
                Skip::Http(SkipReason::BadTarget),
            ),
            (
                br#"{"ts":1,"client":"::1","method":"GET","path":"*"}"#,
                Skip::Http(SkipReason::BadTarget),
            ),
            (
                br#"{"ts":1,"client":"::1","method":"GET","path":"/","headers":{"cookie":5}}"#,
                Skip::BadJson,
            ),
        ];
        let mut p = parser();
        for (line, want) in cases {
            assert_eq!(
                p.jsonl(line, O).map(|_| ()),
                Err(*want),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn sniff_tells_the_text_formats_apart() {
        let combined =
            b"1.2.3.4 - - [10/Oct/2000:13:55:36 -0700] \"GET / HTTP/1.1\" 200 1 \"-\" \"ua\"\n";
        let common = b"1.2.3.4 - - [10/Oct/2000:13:55:36 -0700] \"GET / HTTP/1.1\" 200 1\n";
        let json = b"{\"ts\":1,\"client\":\"::1\",\"method\":\"GET\",\"path\":\"/\"}\n";
        assert_eq!(sniff_text(&combined.repeat(3)), Some(Format::Combined));
        assert_eq!(sniff_text(&common.repeat(3)), Some(Format::Common));
        assert_eq!(
            sniff_text(&[&json[..], b"\n", &json[..]].concat()),
            Some(Format::Jsonl)
        );
        // A malformed first line does not decide alone.
        assert_eq!(
            sniff_text(&[&b"junk\n"[..], combined, combined].concat()),
            Some(Format::Combined)
        );
        assert_eq!(sniff_text(b"hello world\nnothing here\n"), None);
        // The last (possibly cut) line of a sample is not trusted when others exist.
        assert_eq!(
            sniff_text(&[&combined[..], &common[..common.len() - 1]].concat()),
            Some(Format::Combined)
        );
    }

    #[test]
    fn excerpt_escapes_and_hides_jsonl_headers() {
        assert_eq!(excerpt(b"a\x00\xff\tb"), "a\\x00\\xff\\tb");
        let e = excerpt(br#"{"ts":1,"headers":{"authorization":"Bearer secret"}}"#);
        assert!(
            !e.contains("secret") && e.ends_with("[headers elided]"),
            "{e}"
        );
        assert!(excerpt(&[b'x'; 500]).chars().count() <= 121);
    }

    #[test]
    fn random_bytes_never_panic_the_line_parsers() {
        let mut s: u64 = 0x243F_6A88_85A3_08D3;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let seeds: [&[u8]; 4] = [
            b"10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] \"GET /a HTTP/1.1\" 200 5 \"-\" \"ua\"",
            b"{\"ts\":1,\"client\":\"::1\",\"method\":\"GET\",\"path\":\"/\",\"headers\":{\"cookie\":\"a\"}}",
            b"",
            b"\\\\\\\"\"\"[[]] \\x",
        ];
        let mut p = parser();
        for i in 0..10_000 {
            let mut line = seeds[i % seeds.len()].to_vec();
            // Mutate: flip, insert and truncate at random, with bytes that matter to the parsers.
            for _ in 0..(next() % 8) {
                let r = next();
                let b = if r % 3 == 0 {
                    b"\"\\[] {}:,/x"[(r >> 8) as usize % 11]
                } else {
                    (r >> 16) as u8
                };
                match r % 4 {
                    0 if !line.is_empty() => {
                        let at = (r >> 24) as usize % line.len();
                        line[at] = b;
                    }
                    1 => {
                        let at = (r >> 24) as usize % (line.len() + 1);
                        line.insert(at, b);
                    }
                    2 => line.truncate((r >> 24) as usize % (line.len() + 1)),
                    _ => line.push(b),
                }
            }
            let _ = p.clf(&line, true, O);
            let _ = p.clf(&line, false, O);
            let _ = p.jsonl(&line, O);
            let _ = sniff_text(&line);
            let _ = excerpt(&line);
        }
    }
}
