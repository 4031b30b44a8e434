//! `precedent replay`: drives the engine with replayed records, the way the daemon drives it
//! with captures, and tallies what a live agent would have done.
//!
//! Each record is scored, then learned (one engine call). Alerts go out as the daemon's JSON
//! lines; in enforce mode a block order makes the client's later requests, until the TTL in
//! traffic time, count as blocked instead of reaching the engine, as the XDP drop would.
use std::{
    collections::{BTreeMap, HashMap},
    io::{self, Write},
    net::IpAddr,
};

use serde::Serialize;

use super::{Format, ReplayRecord, ReplaySummary};
use crate::{
    decide::{AlertAction, Mode},
    engine::{Engine, Outcome},
    http::SelectedHeaders,
};

/// The default warm-up never exceeds this many requests.
pub const DEFAULT_WARMUP_CAP: u64 = 10_000;
/// ... nor this share of the input's estimated request count.
pub const DEFAULT_WARMUP_SHARE: f64 = 0.10;

const SECOND: u64 = 1_000_000_000;
/// Upkeep rounds run for one gap in the traffic (one per second, like the daemon's timer).
const MAX_TICKS_PER_GAP: u64 = 3600;

/// Requests before alerts may fire when `--warmup` is not given.
///
/// The total is unknown while streaming, so it is estimated up front from the input sizes:
/// about 200 bytes per access-log or jsonl line and 600 per captured packet, gzip files
/// counted at 5× their compressed size. The warm-up is 10% of that estimate, at most
/// 10,000 requests. Starting from a saved model (`--model`) there is no default warm-up:
/// that model already knows the traffic.
pub fn default_warmup(summary: &ReplaySummary, from_model: bool) -> u64 {
    if from_model {
        return 0;
    }
    let estimate: f64 = summary
        .files
        .iter()
        .map(|f| {
            let bytes = f.size as f64 * if f.gzip { 5.0 } else { 1.0 };
            let per_record = match f.format {
                Some(Format::Pcap) => 600.0,
                _ => 200.0,
            };
            bytes / per_record
        })
        .sum();
    ((estimate * DEFAULT_WARMUP_SHARE) as u64).min(DEFAULT_WARMUP_CAP)
}

/// What the engine did with the replayed records.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunStats {
    pub mode: Mode,
    pub warmup: u64,
    /// Records given to the engine.
    pub requests: u64,
    /// Records of blocked clients, held back as the XDP program would have dropped them.
    pub blocked_requests: u64,
    /// Sessions opened by the engine.
    pub sessions: u64,
    /// Sessions evicted at the session table's cap (memory bound).
    pub sessions_evicted: u64,
    /// Operations discovered (endpoint templates).
    pub operations: usize,
    pub contexts: usize,
    pub alerts: u64,
    pub alerts_by_signal: BTreeMap<String, u64>,
    pub alerts_by_rule: BTreeMap<String, u64>,
    /// Enforce mode: blocks the agent would have placed.
    pub blocks: u64,
    /// Alerts that would have blocked in enforce mode (detect mode, guard, allowlist).
    pub would_block_alerts: u64,
    pub guard_trips: u64,
    /// Clients blocked at least once.
    pub blocked_clients: u64,
    /// First and last traffic time (Unix ns) replayed.
    pub first_ts_ns: Option<u64>,
    pub last_ts_ns: Option<u64>,
}

/// The replay loop's state around the engine.
pub struct Driver {
    engine: Engine,
    /// Client → block end (traffic time, ns).
    blocks: HashMap<IpAddr, u64>,
    blocked_ever: u64,
    blocked_requests: u64,
    alerts: u64,
    last_second: Option<u64>,
    first_ts: Option<u64>,
    last_ts: Option<u64>,
    warmup: u64,
}

impl Driver {
    /// `warmup`: requests before alerts may fire (see [`default_warmup`]).
    pub fn new(mut engine: Engine, warmup: u64) -> Self {
        engine.set_warmup(warmup);
        Driver {
            engine,
            blocks: HashMap::new(),
            blocked_ever: 0,
            blocked_requests: 0,
            alerts: 0,
            last_second: None,
            first_ts: None,
            last_ts: None,
            warmup,
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Feeds one record; alert lines go to `out`, exactly as the daemon prints them.
    pub fn feed(&mut self, rec: &ReplayRecord, out: &mut impl Write) -> io::Result<()> {
        let ts = rec.ts_ns;
        self.first_ts.get_or_insert(ts);
        self.last_ts = Some(ts);
        // Upkeep once per second of traffic time passed, before the request: the daemon's
        // timer fires every second, so a gap of 3 s got 3 rounds of (budgeted) upkeep there and
        // gets 3 here. Past an hour of silence the model has long finished its cycles.
        let sec = ts / SECOND;
        if let Some(last) = self.last_second.filter(|&s| sec > s) {
            for back in (0..(sec - last).min(MAX_TICKS_PER_GAP)).rev() {
                self.engine.maintain(ts - back * SECOND);
            }
            self.blocks.retain(|_, until| *until > ts);
        }
        self.last_second = Some(self.last_second.map_or(sec, |s| s.max(sec)));

        if let Some(&until) = self.blocks.get(&rec.client) {
            if until > ts {
                self.blocked_requests += 1;
                return Ok(());
            }
            self.blocks.remove(&rec.client);
        }
        let active = self.blocks.len();
        let outcome = if let Some(c) = &rec.conflict {
            self.engine.on_conflicting_copies(c, active)
        } else {
            self.request(rec, active)
        };
        for alert in &outcome.alerts {
            self.alerts += 1;
            serde_json::to_writer(&mut *out, alert)?;
            out.write_all(b"\n")?;
            debug_assert!(
                alert.action != AlertAction::Block || outcome.block.is_some(),
                "a blocking alert comes with its order"
            );
        }
        if let Some(order) = outcome.block {
            let until = ts.saturating_add(u64::try_from(order.ttl.as_nanos()).unwrap_or(u64::MAX));
            if self.blocks.insert(order.client, until).is_none() {
                self.blocked_ever += 1;
            }
        }
        Ok(())
    }

    /// A request record: as the daemon's engine takes it.
    fn request(&mut self, rec: &ReplayRecord, active: usize) -> Outcome {
        let ts = rec.ts_ns;
        match &rec.session {
            Some(session) => self.engine.on_request_in_session(
                ts,
                rec.client,
                rec.method,
                rec.host.as_deref(),
                &rec.path,
                session,
                active,
            ),
            None => {
                let headers = SelectedHeaders::from_pairs(
                    rec.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
                );
                self.engine.on_request(
                    ts,
                    rec.client,
                    rec.method,
                    rec.host.as_deref(),
                    &rec.path,
                    &headers,
                    active,
                )
            }
        }
    }

    /// Ends the replay: sessions still open are closed (their runs and surprise learned, as
    /// the idle sweep would), then the tallies.
    pub fn finish(&mut self) -> RunStats {
        if let Some(last) = self.last_ts {
            let idle = u64::try_from(self.engine_idle_timeout_ns()).unwrap_or(u64::MAX);
            self.engine
                .maintain(last.saturating_add(idle).saturating_add(SECOND));
        }
        self.stats()
    }

    fn engine_idle_timeout_ns(&self) -> u128 {
        self.engine.sessions().config().idle_timeout.as_nanos()
    }

    /// The tallies so far.
    pub fn stats(&self) -> RunStats {
        let d = self.engine.decider().counters();
        let s = self.engine.sessions().counters();
        RunStats {
            mode: self.engine.mode(),
            warmup: self.warmup,
            requests: self.engine.counters().requests,
            blocked_requests: self.blocked_requests,
            sessions: s.created,
            sessions_evicted: s.evicted,
            operations: self.engine.discovery().stats().operations,
            contexts: self.engine.model().contexts(),
            alerts: self.alerts,
            alerts_by_signal: d
                .alerts_by_signal
                .iter()
                .map(|(k, v)| ((*k).to_string(), *v))
                .collect(),
            alerts_by_rule: d.alerts_by_rule.clone(),
            blocks: d.blocks_ordered,
            would_block_alerts: d.would_block,
            guard_trips: d.guard_trips,
            blocked_clients: self.blocked_ever,
            first_ts_ns: self.first_ts,
            last_ts_ns: self.last_ts,
        }
    }
}

/// Everything `precedent replay` reports at the end (`--summary-json` prints this).
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub engine: RunStats,
    pub input: ReplaySummary,
}

impl RunSummary {
    /// The human-readable summary for stderr.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let (e, i) = (&self.engine, &self.input);
        let mut o = String::new();
        let _ = writeln!(o, "replay summary ({} mode)", e.mode);
        if let (Some(a), Some(b)) = (e.first_ts_ns, e.last_ts_ns) {
            let _ = writeln!(
                o,
                "  traffic        {} .. {}",
                crate::decide::rfc3339(a),
                crate::decide::rfc3339(b)
            );
        }
        let _ = writeln!(
            o,
            "  records        {} read, {} to the engine, {} held back as blocked",
            i.records, e.requests, e.blocked_requests
        );
        let _ = writeln!(
            o,
            "  warm-up        first {} requests (no alerts)",
            e.warmup
        );
        let _ = writeln!(
            o,
            "  sessions       {} ({} evicted at the cap)",
            e.sessions, e.sessions_evicted
        );
        let _ = writeln!(
            o,
            "  operations     {} discovered, {} model contexts",
            e.operations, e.contexts
        );
        let _ = writeln!(o, "  alerts         {}", e.alerts);
        for (k, v) in &e.alerts_by_signal {
            let _ = writeln!(o, "    signal {k:<20} {v}");
        }
        for (k, v) in &e.alerts_by_rule {
            let _ = writeln!(o, "    rule   {k:<20} {v}");
        }
        if e.mode == Mode::Enforce {
            let _ = writeln!(
                o,
                "  would-be blocks {} ({} clients), {} blocked requests, guard trips {}",
                e.blocks, e.blocked_clients, e.blocked_requests, e.guard_trips
            );
        } else {
            let _ = writeln!(
                o,
                "  would-be blocks {} alerts would have blocked in enforce mode",
                e.would_block_alerts
            );
        }
        let _ = writeln!(o, "  unparseable    {}", i.skipped_total);
        for (reason, n) in &i.skipped {
            let _ = writeln!(o, "    {reason:<22} {n}");
        }
        for ex in &i.examples {
            let _ = writeln!(
                o,
                "    e.g. {}:{} {}: {}",
                ex.file.display(),
                ex.pos,
                ex.reason,
                ex.excerpt
            );
        }
        let late = match i.late_policy {
            super::LatePolicy::Drop => "dropped",
            super::LatePolicy::Clamp => "kept, their time raised",
        };
        let _ = writeln!(
            o,
            "  late records   {} ({late}: behind by more than --reorder-window), {} released early by the reorder cap",
            i.late, i.reorder_overflow
        );
        let a = &i.acks;
        if a.files_waited > 0 {
            let _ = writeln!(
                o,
                "  acknowledged   {} requests the server acknowledged in the capture; dropped: {} never acknowledged, {} stale, {} superseded, {} overflow",
                a.acknowledged, a.unacknowledged, a.stale, a.superseded, a.overflow
            );
            if a.conflicting > 0 {
                let _ = writeln!(
                    o,
                    "  conflicting    {} places the clients sent two different versions of (alerted on as conflicting_copies)",
                    a.conflicting
                );
            }
        }
        if i.snaplen_cut > 0 || !i.packets_ignored.is_empty() {
            let ignored: u64 = i.packets_ignored.values().sum();
            let _ = writeln!(
                o,
                "  packets        {ignored} not requests, {} cut by snaplen",
                i.snaplen_cut
            );
        }
        for f in &i.files {
            let _ = writeln!(
                o,
                "  file           {} ({}{}): {} records",
                f.path.display(),
                f.format.map_or("empty", Format::as_str),
                if f.gzip { ", gzip" } else { "" },
                f.records
            );
        }
        for err in &i.errors {
            let _ = writeln!(
                o,
                "  FILE ERROR     {} after line/packet {}: {}",
                err.file.display(),
                err.pos,
                err.message
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::replay::FileSummary;

    fn input(files: &[(u64, Option<Format>, bool)]) -> ReplaySummary {
        ReplaySummary {
            files: files
                .iter()
                .map(|&(size, format, gzip)| FileSummary {
                    path: PathBuf::from("x"),
                    format,
                    gzip,
                    size,
                    bytes_read: 0,
                    units: 0,
                    records: 0,
                })
                .collect(),
            ..ReplaySummary::default()
        }
    }

    #[test]
    fn default_warmup_is_a_tenth_of_the_estimate_capped_and_zero_from_a_model() {
        // 2 MB of access log ≈ 10,000 lines → 1,000 requests of warm-up.
        let small = input(&[(2_000_000, Some(Format::Combined), false)]);
        assert_eq!(default_warmup(&small, false), 1_000);
        assert_eq!(default_warmup(&small, true), 0);
        // Gzip counts at 5× its size; captures at 600 bytes a request; the cap holds.
        let gz = input(&[(400_000, Some(Format::Combined), true)]);
        assert_eq!(default_warmup(&gz, false), 1_000);
        let pcap = input(&[(6_000_000, Some(Format::Pcap), false)]);
        assert_eq!(default_warmup(&pcap, false), 1_000);
        let huge = input(&[(10_000_000_000, Some(Format::Combined), false)]);
        assert_eq!(default_warmup(&huge, false), DEFAULT_WARMUP_CAP);
        assert_eq!(default_warmup(&input(&[(0, None, false)]), false), 0);
    }
}
