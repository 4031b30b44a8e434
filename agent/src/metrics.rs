//! Optional Prometheus endpoint (`metrics_listen`): `GET /metrics` on a loopback address
//! answers with the counters of `precedent status` in the text exposition format.
//!
//! The numbers come from a `status` request sent through the control channel, like the CLI's,
//! so this task holds no engine state and the engine owner stays its only owner.
use std::{
    collections::HashSet,
    fmt::{Display, Write as _},
    io,
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use crate::{
    control::{ControlRequest, Peer, Request, api::StatusReport},
    decide::Mode,
};

/// Prometheus text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A scrape request is a request line and a few headers; anything longer is refused.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a client has to send its request, and to take the reply.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Time the engine owner has to answer `status` (Prometheus' default scrape timeout is 10s).
const STATUS_TIMEOUT: Duration = Duration::from_secs(8);
/// How long an error reply waits for the client to stop sending before closing.
const LINGER: Duration = Duration::from_secs(1);
/// Scrapes served at once; more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 4;

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

/// `report` in the Prometheus text format: one family per counter or gauge, `HELP` and
/// `TYPE` first, counters ending in `_total`.
pub fn render(report: &StatusReport) -> String {
    let mut x = Exposition::default();

    x.family(
        "precedent_build_info",
        Kind::Gauge,
        "Version of the running daemon (always 1).",
    );
    x.sample("precedent_build_info", &[("version", &report.version)], 1);

    x.family(
        "precedent_mode",
        Kind::Gauge,
        "1 for the current mode (learn, detect or enforce), 0 for the others.",
    );
    for mode in Mode::ALL {
        let on = u8::from(mode == report.mode);
        x.sample("precedent_mode", &[("mode", mode.as_str())], on);
    }

    x.family(
        "precedent_enforcement_suspended",
        Kind::Gauge,
        "1 while the block-share guard has suspended enforcement.",
    );
    let suspended = u8::from(report.enforcement_suspended.is_some());
    x.sample("precedent_enforcement_suspended", &[], suspended);

    x.family(
        "precedent_interfaces_missing",
        Kind::Gauge,
        "Configured interfaces the XDP program is not on (deleted; re-attached when they return).",
    );
    x.sample(
        "precedent_interfaces_missing",
        &[],
        report.interfaces_missing.len(),
    );

    x.family(
        "precedent_state_save_failing",
        Kind::Gauge,
        "1 while state saves fail (a full disk, ...); protection continues.",
    );
    let failing = u8::from(report.state_save_error.is_some());
    x.sample("precedent_state_save_failing", &[], failing);

    x.family(
        "precedent_uptime_seconds",
        Kind::Gauge,
        "Seconds since the daemon started.",
    );
    x.sample("precedent_uptime_seconds", &[], report.uptime_secs);

    x.family(
        "precedent_interface_info",
        Kind::Gauge,
        "Interfaces the XDP program is attached to, with the attach mode the kernel accepted.",
    );
    for i in &report.interfaces {
        let mode = i.attach_mode.to_string();
        x.sample(
            "precedent_interface_info",
            &[("interface", &i.name), ("attach_mode", &mode)],
            1,
        );
    }

    x.family(
        "precedent_xdp_packets_total",
        Kind::Counter,
        "XDP program counters by outcome (packets; requests for captured, truncated and ringbuf_full; segments for continued).",
    );
    for (outcome, v) in &report.kernel_counters {
        x.sample("precedent_xdp_packets_total", &[("outcome", outcome)], v);
    }

    // Userspace counters: one family each, except the per-reason parse skips, which share one
    // family with a `reason` label (their sum is `precedent_agent_skipped_total`). That family
    // is declared first so no other key can take its name.
    let (by_reason, plain): (Vec<_>, Vec<_>) = report
        .userspace_counters
        .iter()
        .partition(|(k, _)| k.starts_with("skipped_"));
    let name = "precedent_agent_skipped_by_reason_total";
    x.family(
        name,
        Kind::Counter,
        "Requests the engine skipped, by reason.",
    );
    for (key, v) in by_reason {
        let reason = &key["skipped_".len()..];
        x.sample(name, &[("reason", reason)], v);
    }
    for (key, v) in plain {
        let name = format!(
            "precedent_agent_{}_total",
            metric_name_part(key.strip_suffix("_total").unwrap_or(key))
        );
        let help = format!("Agent counter {key} (as in `precedent status`).");
        // Two keys that differ only in characters a metric name cannot hold would collide;
        // the first one wins rather than emitting an invalid duplicate family.
        if x.family(&name, Kind::Counter, &help) {
            x.sample(&name, &[], v);
        }
    }

    x.family(
        "precedent_alerts_total",
        Kind::Counter,
        "Alerts since start, by anomaly signal (kind=signal) or rule id (kind=rule).",
    );
    for (key, v) in &report.alerts_by_signal {
        let (kind, name) = match key.strip_prefix("rule:") {
            Some(rule) => ("rule", rule),
            None => ("signal", key.as_str()),
        };
        x.sample(
            "precedent_alerts_total",
            &[("kind", kind), ("name", name)],
            v,
        );
    }

    for (name, help, v) in [
        (
            "precedent_sessions_live",
            "Sessions currently tracked.",
            report.sessions_live,
        ),
        (
            "precedent_requests_waiting",
            "Requests whose header is still arriving in pieces (split over TCP segments).",
            report.requests_waiting,
        ),
        (
            "precedent_blocks_active",
            "Clients or prefixes currently blocked.",
            report.blocks_active,
        ),
        (
            "precedent_endpoints",
            "Operations discovered.",
            report.endpoints,
        ),
        (
            "precedent_model_operations",
            "Operations known to the model.",
            report.model.operations,
        ),
        (
            "precedent_model_contexts",
            "Contexts held by the model.",
            report.model.contexts,
        ),
        (
            "precedent_model_bytes",
            "Approximate heap bytes held by the model.",
            report.model.bytes,
        ),
    ] {
        x.family(name, Kind::Gauge, help);
        x.sample(name, &[], v);
    }
    x.out
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

#[derive(Default)]
struct Exposition {
    out: String,
    families: HashSet<String>,
}

impl Exposition {
    /// Writes the `HELP` and `TYPE` lines; false (and nothing written) if `name` was already
    /// declared, since a family must appear once.
    fn family(&mut self, name: &str, kind: Kind, help: &str) -> bool {
        if !self.families.insert(name.to_string()) {
            return false;
        }
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        true
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label_value(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Label values may hold anything (rule ids come from operators); the format escapes
/// backslash, double quote and newline.
fn escape_label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A counter key as part of a metric name: `[a-zA-Z0-9_]`, everything else becomes `_`.
fn metric_name_part(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------
//
// A hand-written HTTP/1.0 responder rather than hyper/axum: the endpoint answers one GET
// path on loopback, one request per connection, and httparse (already used for captured
// requests) parses the request head. A web framework would add dozens of crates for that.

/// Listens on `addr` and serves scrapes until `shutdown`. A failure to listen is logged and
/// the daemon carries on without metrics (the config was already checked to be loopback).
pub async fn serve(
    addr: SocketAddr,
    control: mpsc::Sender<ControlRequest>,
    shutdown: CancellationToken,
) {
    match MetricsServer::bind(addr).await {
        Ok(server) => server.run(control, shutdown).await,
        Err(e) => tracing::error!(
            %addr,
            error = %e,
            "metrics endpoint not started: cannot listen (check metrics_listen)"
        ),
    }
}

/// A bound metrics listener (tests bind port 0 and ask for the address).
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        Ok(MetricsServer {
            listener: TcpListener::bind(addr).await?,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self, control: mpsc::Sender<ControlRequest>, shutdown: CancellationToken) {
        match self.local_addr() {
            Ok(addr) => tracing::info!(%addr, "metrics endpoint listening (GET /metrics)"),
            Err(e) => tracing::info!(error = %e, "metrics endpoint listening (GET /metrics)"),
        }
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let control = control.clone();
                            conns.spawn(async move {
                                serve_one(stream, &control).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            // A fresh socket's send buffer takes this without blocking.
                            let _ = stream.try_write(&Reply::text(503, "too many scrapes at once\n").bytes(false));
                        }
                    },
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning on accept.
                        tracing::warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        conns.abort_all();
        tracing::info!("metrics endpoint closed");
    }
}

struct Reply {
    status: u16,
    content_type: &'static str,
    extra_header: Option<&'static str>,
    body: String,
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            extra_header: None,
            body: body.into(),
        }
    }

    fn bytes(&self, head_only: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let mut head = format!(
            "HTTP/1.0 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if let Some(h) = self.extra_header {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if !head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

async fn serve_one(mut stream: TcpStream, control: &mpsc::Sender<ControlRequest>) {
    let (reply, head_only) = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => (Reply::text(408, "no complete request in time\n"), false),
        Ok(Err(reply)) => (reply, false),
        Ok(Ok(None)) => return, // connected and closed: a port probe
        Ok(Ok(Some((method, path)))) => {
            let head_only = method == "HEAD";
            (route(&method, &path, control).await, head_only)
        }
    };
    let write = async {
        stream.write_all(&reply.bytes(head_only)).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(IO_TIMEOUT, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics reply not delivered"),
        Err(_) => tracing::debug!("metrics client did not read its reply in time"),
    }
    if reply.status != 200 {
        // Lingering close: closing with unread input makes the kernel send RST, which can
        // destroy the error reply before the client reads it. Drain a bounded amount first.
        let mut sink = [0u8; 4096];
        let drain = async {
            let mut left = 16 * MAX_REQUEST_HEAD;
            while left > 0 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
}

/// Reads up to the end of the request head; `Ok(None)` if the client closed first.
async fn read_head(stream: &mut TcpStream) -> Result<Option<(String, String)>, Reply> {
    let mut buf = vec![0u8; MAX_REQUEST_HEAD];
    let mut len = 0;
    loop {
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(|e| Reply::text(400, format!("reading the request failed: {e}\n")))?;
        if n == 0 {
            return if len == 0 {
                Ok(None)
            } else {
                Err(Reply::text(400, "incomplete request\n"))
            };
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                let method = req.method.unwrap_or_default().to_string();
                let path = req.path.unwrap_or_default().to_string();
                return Ok(Some((method, path)));
            }
            Ok(httparse::Status::Partial) if len == buf.len() => {
                return Err(Reply::text(
                    431,
                    format!("request head larger than {MAX_REQUEST_HEAD} bytes\n"),
                ));
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Reply::text(431, "too many request headers\n"));
            }
            Err(e) => return Err(Reply::text(400, format!("malformed request: {e}\n"))),
        }
    }
}

async fn route(method: &str, target: &str, control: &mpsc::Sender<ControlRequest>) -> Reply {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path != "/metrics" {
        return Reply::text(404, "not found; metrics are at /metrics\n");
    }
    if method != "GET" && method != "HEAD" {
        let mut r = Reply::text(405, "only GET and HEAD\n");
        r.extra_header = Some("Allow: GET, HEAD");
        return r;
    }
    match status(control).await {
        Ok(report) => Reply {
            status: 200,
            content_type: CONTENT_TYPE,
            extra_header: None,
            body: render(&report),
        },
        Err(message) => {
            tracing::warn!(error = %message, "metrics scrape failed");
            Reply::text(503, format!("{message}\n"))
        }
    }
}

/// Asks the engine owner for `status`, as the daemon's own process.
async fn status(control: &mpsc::Sender<ControlRequest>) -> Result<StatusReport, String> {
    let (reply, rx) = oneshot::channel();
    let item = ControlRequest {
        request: Request::Status,
        peer: own_peer(),
        reply,
    };
    let asked = async {
        control
            .send(item)
            .await
            .map_err(|_| "the daemon is shutting down".to_string())?;
        rx.await
            .map_err(|_| "the daemon dropped the status request".to_string())
    };
    let response = tokio::time::timeout(STATUS_TIMEOUT, asked)
        .await
        .map_err(|_| {
            format!(
                "the daemon did not answer status within {}s",
                STATUS_TIMEOUT.as_secs()
            )
        })??;
    response.into_data::<StatusReport>()
}

fn own_peer() -> Peer {
    // SAFETY: getuid/getgid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    Peer {
        uid,
        gid,
        pid: i32::try_from(std::process::id()).ok(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::{
        capture::AttachMode,
        control::{
            Response,
            api::{InterfaceStatus, ModelSize},
        },
    };

    fn report() -> StatusReport {
        let map = |kv: &[(&str, u64)]| -> BTreeMap<String, u64> {
            kv.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        StatusReport {
            version: "0.1.0".into(),
            pid: 4242,
            mode: Mode::Enforce,
            uptime_secs: 3600,
            interfaces: vec![
                InterfaceStatus {
                    name: "eth0".into(),
                    ifindex: 2,
                    attach_mode: AttachMode::Native,
                },
                InterfaceStatus {
                    name: "veth-a".into(),
                    ifindex: 2,
                    attach_mode: AttachMode::Generic,
                },
            ],
            kernel_counters: map(&[("captured", 42), ("passed", 1000), ("blocked", 3)]),
            userspace_counters: map(&[
                ("requests", 7),
                ("skipped", 3),
                ("skipped_path_too_long", 2),
                ("skipped_not_http", 1),
                ("engine_overflow", 0),
                ("sessions_evicted", 5),
            ]),
            model: ModelSize {
                operations: 12,
                contexts: 340,
                bytes: 65536,
            },
            endpoints: 11,
            sessions_live: 9,
            requests_waiting: 0,
            blocks_active: 2,
            alerts_by_signal: map(&[
                ("missing_precedent", 4),
                ("rule:transfer-needs-balance", 6),
                ("rule:odd \"id\" \\ with\nnewline", 1),
            ]),
            enforcement_suspended: None,
            interfaces_missing: Vec::new(),
            state_save_error: None,
        }
    }

    /// A checker for the text exposition format, strict enough to catch what Prometheus
    /// rejects: names, label syntax and escapes, one TYPE per family before its samples,
    /// families not interleaved, duplicate series, counters without `_total`.
    fn validate(text: &str) -> Result<(), String> {
        fn is_name(s: &str, colon: bool) -> bool {
            let ok = |c: char, first: bool| {
                c.is_ascii_alphabetic()
                    || c == '_'
                    || (colon && c == ':')
                    || (!first && c.is_ascii_digit())
            };
            let mut cs = s.chars();
            cs.next().is_some_and(|c| ok(c, true)) && cs.all(|c| ok(c, false))
        }
        if !text.ends_with('\n') {
            return Err("output must end with a newline".into());
        }
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut helps = HashSet::new();
        let mut closed = HashSet::new();
        let mut current: Option<String> = None;
        let mut series = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let err = |m: &str| Err(format!("line {}: {m}: {line:?}", n + 1));
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or("");
                if !is_name(name, true) || !helps.insert(name.to_string()) {
                    return err("bad or repeated HELP");
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                if !is_name(name, true) || parts.next().is_some() {
                    return err("bad TYPE line");
                }
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return err("unknown type");
                }
                if types.insert(name.into(), kind.into()).is_some() {
                    return err("TYPE repeated");
                }
                if let Some(prev) = current.replace(name.into()) {
                    closed.insert(prev);
                }
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            if !is_name(name, true) {
                return err("bad metric name");
            }
            let mut rest = &line[name_end..];
            let mut labels = Vec::new();
            if let Some(body) = rest.strip_prefix('{') {
                let mut chars = body.char_indices().peekable();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    if c == '}' {
                        end = Some(i);
                        break;
                    }
                    let start = i;
                    let mut eq = None;
                    for (j, c) in chars.by_ref() {
                        if c == '=' {
                            eq = Some(j);
                            break;
                        }
                    }
                    let Some(eq) = eq else {
                        return err("label without =");
                    };
                    let lname = &body[start..eq];
                    if !is_name(lname, false) {
                        return err("bad label name");
                    }
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return err("label value not quoted");
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next().map(|(_, c)| c) {
                            None => return err("unterminated label value"),
                            Some('"') => break,
                            Some('\\') => match chars.next().map(|(_, c)| c) {
                                Some('\\') => value.push('\\'),
                                Some('"') => value.push('"'),
                                Some('n') => value.push('\n'),
                                _ => return err("bad escape in label value"),
                            },
                            Some('\n') => return err("raw newline in label value"),
                            Some(c) => value.push(c),
                        }
                    }
                    labels.push((lname.to_string(), value));
                    match chars.peek().map(|&(_, c)| c) {
                        Some(',') => {
                            chars.next();
                        }
                        Some('}') => {}
                        _ => return err("expected , or } after a label"),
                    }
                }
                let Some(end) = end else {
                    return err("unterminated label set");
                };
                rest = &body[end + 1..];
            }
            let Some(value) = rest.strip_prefix(' ') else {
                return err("no space before the value");
            };
            let value = value.split(' ').next().unwrap_or("");
            if value.parse::<f64>().is_err() && !["+Inf", "-Inf", "NaN"].contains(&value) {
                return err("value is not a number");
            }
            let Some(kind) = types.get(name) else {
                return err("sample before its TYPE line");
            };
            if current.as_deref() != Some(name) || closed.contains(name) {
                return err("sample outside its family's block");
            }
            if kind == "counter" && !name.ends_with("_total") {
                return err("counter name must end in _total");
            }
            if !series.insert((name.to_string(), labels)) {
                return err("duplicate series");
            }
        }
        Ok(())
    }

    #[test]
    fn the_validator_rejects_what_prometheus_rejects() {
        let bad = [
            "foo 1\n",
            "# TYPE foo gauge\nfoo 1",
            "# TYPE foo gauge\n# TYPE foo gauge\nfoo 1\n",
            "# TYPE foo counter\nfoo 1\n",
            "# TYPE 1foo gauge\n1foo 1\n",
            "# TYPE foo gauge\nfoo{a=\"x\"y\"} 1\n",
            "# TYPE foo gauge\nfoo{a=\"x\\q\"} 1\n",
            "# TYPE foo gauge\nfoo{a-b=\"x\"} 1\n",
            "# TYPE foo gauge\nfoo one\n",
            "# TYPE foo gauge\nfoo{a=\"1\"} 1\nfoo{a=\"1\"} 2\n",
            "# TYPE foo gauge\n# TYPE bar gauge\nbar 1\nfoo 1\n",
        ];
        for text in bad {
            assert!(validate(text).is_err(), "accepted {text:?}");
        }
        validate("# HELP foo_total x\n# TYPE foo_total counter\nfoo_total{a=\"q\\\"\\\\\\n\",b=\"\"} 3\n")
            .unwrap();
    }

    #[test]
    fn rendered_status_is_valid_exposition_format() {
        let text = render(&report());
        validate(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }

    #[test]
    fn rendered_status_has_the_documented_series() {
        let text = render(&report());
        for line in [
            "precedent_xdp_packets_total{outcome=\"captured\"} 42",
            "precedent_xdp_packets_total{outcome=\"blocked\"} 3",
            "precedent_agent_requests_total 7",
            "precedent_agent_skipped_total 3",
            "precedent_agent_skipped_by_reason_total{reason=\"path_too_long\"} 2",
            "precedent_agent_engine_overflow_total 0",
            "precedent_alerts_total{kind=\"signal\",name=\"missing_precedent\"} 4",
            "precedent_alerts_total{kind=\"rule\",name=\"transfer-needs-balance\"} 6",
            "precedent_alerts_total{kind=\"rule\",name=\"odd \\\"id\\\" \\\\ with\\nnewline\"} 1",
            "precedent_mode{mode=\"enforce\"} 1",
            "precedent_mode{mode=\"learn\"} 0",
            "precedent_enforcement_suspended 0",
            "precedent_interface_info{interface=\"eth0\",attach_mode=\"native\"} 1",
            "precedent_build_info{version=\"0.1.0\"} 1",
            "precedent_uptime_seconds 3600",
            "precedent_sessions_live 9",
            "precedent_blocks_active 2",
            "precedent_endpoints 11",
            "precedent_model_operations 12",
            "precedent_model_contexts 340",
            "precedent_model_bytes 65536",
            "# TYPE precedent_xdp_packets_total counter",
            "# TYPE precedent_sessions_live gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn every_status_counter_is_exported() {
        let r = report();
        let text = render(&r);
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        let expected = r.kernel_counters.len()
            + r.userspace_counters.len()
            + r.alerts_by_signal.len()
            + r.interfaces.len()
            + Mode::ALL.len()
            + 5 // build_info, enforcement_suspended, interfaces_missing, state_save_failing, uptime
            + 7; // sessions, requests waiting, blocks, endpoints, model x3
        assert_eq!(samples, expected, "{text}");
    }

    #[test]
    fn missing_interfaces_and_failing_saves_are_gauges() {
        let mut r = report();
        let text = render(&r);
        assert!(text.lines().any(|l| l == "precedent_interfaces_missing 0"));
        assert!(text.lines().any(|l| l == "precedent_state_save_failing 0"));
        r.interfaces_missing = vec!["eth1".into()];
        r.state_save_error = Some("full".into());
        let text = render(&r);
        assert!(text.lines().any(|l| l == "precedent_interfaces_missing 1"));
        assert!(text.lines().any(|l| l == "precedent_state_save_failing 1"));
    }

    #[test]
    fn suspended_enforcement_shows_as_one() {
        let mut r = report();
        r.enforcement_suspended = Some("guard".into());
        assert!(
            render(&r)
                .lines()
                .any(|l| l == "precedent_enforcement_suspended 1")
        );
    }

    #[test]
    fn counter_keys_that_map_to_one_name_do_not_duplicate_a_family() {
        let mut r = report();
        r.userspace_counters.insert("odd-key".into(), 1);
        r.userspace_counters.insert("odd.key".into(), 2);
        r.userspace_counters.insert("already_total".into(), 3);
        r.userspace_counters.insert("skipped-by-reason".into(), 4);
        let text = render(&r);
        validate(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(text.contains("precedent_agent_odd_key_total 1"), "{text}");
        assert!(text.contains("precedent_agent_already_total 3"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_label_value("plain"), "plain");
    }

    // ---- serving -------------------------------------------------------------------------

    /// A fake engine owner: answers `status` with [`report`] and records the peer; drops
    /// everything else unanswered.
    fn fake_engine(answer: bool) -> (mpsc::Sender<ControlRequest>, mpsc::Receiver<Peer>) {
        let (tx, mut rx) = mpsc::channel::<ControlRequest>(4);
        let (peers_tx, peers) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let _ = peers_tx.send(req.peer).await;
                if answer && req.request == Request::Status {
                    req.respond(Response::ok(report()));
                }
            }
        });
        (tx, peers)
    }

    async fn start(answer: bool) -> (SocketAddr, CancellationToken, mpsc::Receiver<Peer>) {
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let (control, peers) = fake_engine(answer);
        let shutdown = CancellationToken::new();
        tokio::spawn(server.run(control, shutdown.clone()));
        (addr, shutdown, peers)
    }

    /// Sends `request` raw and returns the whole reply.
    async fn fetch(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut out))
            .await
            .expect("reply within the timeout")
            .unwrap();
        out
    }

    #[tokio::test]
    async fn get_metrics_returns_the_engines_status_as_prometheus_text() {
        let (addr, shutdown, mut peers) = start(true).await;
        let reply = fetch(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        )
        .await;
        let (head, body) = reply.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        assert!(
            head.contains(&format!("Content-Type: {CONTENT_TYPE}")),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert_eq!(body, render(&report()));
        validate(body).unwrap();

        // The request went to the engine as the daemon's own process.
        let peer = peers.recv().await.unwrap();
        assert_eq!(peer.pid, Some(std::process::id() as i32));
        assert_eq!(peer.uid, unsafe { libc::getuid() });

        // A query string is ignored; HEAD gets the head only.
        let reply = fetch(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
        let reply = fetch(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n").await;
        assert!(
            reply.starts_with("HTTP/1.0 200") && reply.ends_with("\r\n\r\n"),
            "{reply}"
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn other_paths_methods_and_garbage_are_refused() {
        let (addr, shutdown, _peers) = start(true).await;
        for (req, status) in [
            (&b"GET / HTTP/1.0\r\n\r\n"[..], "404"),
            (b"GET /metricsx HTTP/1.0\r\n\r\n", "404"),
            (
                b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
                "405",
            ),
            (b"\x16\x03\x01 not http\r\n\r\n", "400"),
        ] {
            let reply = fetch(addr, req).await;
            assert!(
                reply.starts_with(&format!("HTTP/1.0 {status} ")),
                "{req:?} gave {reply}"
            );
        }
        shutdown.cancel();
    }

    #[tokio::test]
    async fn oversized_requests_are_refused_without_reading_them_all() {
        let (addr, shutdown, _peers) = start(true).await;
        let mut req = b"GET /metrics HTTP/1.0\r\nX-Pad: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', MAX_REQUEST_HEAD));
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may close before taking everything; that is the point.
        let _ = s.write_all(&req).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.0 431 "), "{out}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn an_engine_that_does_not_answer_gives_503() {
        let (addr, shutdown, _peers) = start(false).await;
        let reply = fetch(addr, b"GET /metrics HTTP/1.0\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.0 503 "), "{reply}");
        assert!(reply.contains("dropped the status request"), "{reply}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn serve_stops_on_shutdown_and_gives_up_on_a_taken_port() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let (control, _peers) = fake_engine(true);
        // Port in use: logged, and the task ends instead of hanging or panicking.
        tokio::time::timeout(
            Duration::from_secs(5),
            serve(addr, control.clone(), CancellationToken::new()),
        )
        .await
        .expect("serve returns when it cannot listen");

        drop(taken);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(addr, control, shutdown.clone()));
        let mut reply = String::new();
        for _ in 0..50 {
            if let Ok(mut s) = TcpStream::connect(addr).await {
                s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
                s.read_to_string(&mut reply).await.unwrap();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(reply.starts_with("HTTP/1.0 200 "), "{reply}");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve ends on shutdown")
            .unwrap();
    }
}
