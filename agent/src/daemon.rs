//! The long-running process: attach capture, turn events into request records, stop cleanly.
//!
//! Signals are handled in one place (here) and become a single shutdown path: the program is
//! detached from every interface before the process exits.
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    capture::{self, Capture, CapturedRequest},
    http,
};

/// Captured requests waiting for the engine; beyond this the reader counts and drops.
const PIPELINE_DEPTH: usize = 8192;

pub struct DaemonOptions {
    pub ifaces: Vec<String>,
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
    let mut capture = Capture::attach(&opts.ifaces)?;
    let ring = capture.take_events()?;
    let (tx, mut rx) = mpsc::channel(PIPELINE_DEPTH);
    let reader = tokio::spawn(capture::read_events(ring, tx));

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut parser = http::Parser::new(http::HttpConfig::default());
    let mut skipped = http::SkipCounters::default();
    tracing::info!(interfaces = ?opts.ifaces, "precedent daemon running");
    loop {
        tokio::select! {
            Some(req) = rx.recv() => {
                if let Err(reason) = emit(&mut parser, &req) {
                    skipped.record(reason);
                }
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM received"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT received"); break; }
        }
    }
    drop(rx);
    reader.abort();
    capture.detach();
    tracing::info!(skipped = skipped.total(), "precedent daemon stopped");
    Ok(())
}

/// Prints the request as a JSON line; the skip reason when the bytes were not a usable request.
fn emit(parser: &mut http::Parser, req: &CapturedRequest) -> Result<(), http::SkipReason> {
    let parsed = match parser.parse(&req.data) {
        Ok(p) => p,
        Err(reason) => {
            tracing::debug!(client = %req.client, reason = reason.as_str(), "captured bytes skipped");
            return Err(reason);
        }
    };
    let ts = UNIX_EPOCH + Duration::from_nanos(req.ts_unix_ns);
    let line = RequestLine {
        ts: humantime::format_rfc3339_micros(ts).to_string(),
        client: req.client.to_string(),
        server: req.server.to_string(),
        method: parsed.method.as_str(),
        path: parsed.path,
        query: parsed.query,
        version: parsed.version,
        truncated: (req.payload_len as usize) > req.data.len(),
    };
    match serde_json::to_string(&line) {
        Ok(json) => println!("{json}"),
        Err(e) => tracing::warn!(error = %e, "could not serialise request line"),
    }
    Ok(())
}
