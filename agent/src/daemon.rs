//! The long-running process: attach capture, turn events into request records, stop cleanly.
//!
//! Signals are handled in one place (here) and become a single shutdown path: the program is
//! detached from every interface before the process exits.
use std::{
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    capture::{self, AttachMode, CapturedRequest, Datapath, LoadOptions},
    http,
};

/// Captured requests waiting for the engine; beyond this the reader counts and drops.
const PIPELINE_DEPTH: usize = 8192;

/// How often counters are logged and expired blocks swept.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);

pub struct DaemonOptions {
    pub ifaces: Vec<String>,
    pub attach_mode: AttachMode,
    pub load: LoadOptions,
}

/// One JSON line per parsed request on stdout.
#[derive(Serialize)]
struct RequestLine<'a> {
    ts: String,
    client: String,
    server: String,
    method: &'a str,
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<&'a str>,
    version: &'a str,
    /// The capture ended before the request did (long headers); the request line is whole.
    truncated: bool,
}

pub async fn run(opts: DaemonOptions) -> anyhow::Result<()> {
    if opts.ifaces.is_empty() {
        anyhow::bail!(capture::CaptureError::NoInterface {
            available: capture::available_interfaces()
        });
    }
    // Check every interface name before loading anything: the commonest mistake, cheapest error.
    for iface in &opts.ifaces {
        if !std::path::Path::new("/sys/class/net").join(iface).exists() {
            anyhow::bail!(capture::CaptureError::UnknownInterface {
                name: iface.clone(),
                available: capture::available_interfaces(),
            });
        }
    }
    let mut datapath = Datapath::load(&opts.load)?;
    // The enforcer tells the kernel which (possibly pinned) block maps hold entries: take it
    // before attaching so pinned blocks apply from the first packet.
    let mut enforcer = datapath.take_enforcer()?;
    for iface in &opts.ifaces {
        datapath.attach(iface, opts.attach_mode)?;
    }
    let ring = datapath.take_events()?;
    let overflow = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = mpsc::channel(PIPELINE_DEPTH);
    let reader = tokio::spawn(capture::read_events(ring, tx, overflow.clone()));

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut housekeeping = tokio::time::interval_at(
        tokio::time::Instant::now() + HOUSEKEEPING_EVERY,
        HOUSEKEEPING_EVERY,
    );
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut parser = http::Parser::new(http::HttpConfig::default());
    let mut skipped = http::SkipCounters::default();
    tracing::info!(interfaces = ?opts.ifaces, capture_len = opts.load.capture_len, "precedent daemon running");
    loop {
        tokio::select! {
            Some(req) = rx.recv() => {
                if let Err(reason) = emit(&mut parser, &req) {
                    skipped.record(reason);
                }
            }
            _ = housekeeping.tick() => {
                match enforcer.sweep() {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "expired blocks swept"),
                    Err(e) => tracing::warn!(error = %e, "sweeping expired blocks failed"),
                }
                log_counters(&datapath, &overflow, &skipped);
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM received"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT received"); break; }
        }
    }
    drop(rx);
    reader.abort();
    log_counters(&datapath, &overflow, &skipped);
    datapath.detach_all();
    tracing::info!("precedent daemon stopped");
    Ok(())
}

/// One structured log line with the kernel counters and the userspace drops.
fn log_counters(datapath: &Datapath, overflow: &AtomicU64, skipped: &http::SkipCounters) {
    match datapath.counters() {
        Ok(c) => tracing::info!(
            kernel = %serde_json::to_string(&c).unwrap_or_default(),
            engine_overflow = overflow.load(std::sync::atomic::Ordering::Relaxed),
            unparsed = skipped.total(),
            "counters"
        ),
        Err(e) => tracing::warn!(error = %e, "reading kernel counters failed"),
    }
}

/// Prints the request as a JSON line, or says why the bytes were not a usable request.
fn emit(parser: &mut http::Parser, req: &CapturedRequest) -> Result<(), http::SkipReason> {
    let parsed = parser.parse(&req.data).inspect_err(|reason| {
        tracing::debug!(client = %req.client, reason = reason.as_str(), "captured bytes skipped");
    })?;
    let ts = UNIX_EPOCH + Duration::from_nanos(req.ts_unix_ns);
    let line = RequestLine {
        ts: humantime::format_rfc3339_micros(ts).to_string(),
        client: req.client.to_string(),
        server: req.server.to_string(),
        method: parsed.method.as_str(),
        path: parsed.path,
        query: parsed.query,
        version: parsed.version,
        truncated: req.truncated(),
    };
    match serde_json::to_string(&line) {
        Ok(json) => println!("{json}"),
        Err(e) => tracing::warn!(error = %e, "could not serialise request line"),
    }
    Ok(())
}
