//! Replay input: access logs (`combined`, `common`), `jsonl` exports and packet captures
//! (`pcap`, `pcapng`), plain or gzip, turned into one stream of [`ReplayRecord`]s in
//! timestamp order for the same engine the daemon drives.
//!
//! Each file gets its own reader and reorder window ([`reorder`]); the sorted files are merged.
//! Everything streams with fixed buffers, so memory depends on the window, not the file size.
//! Bad input never stops a replay: lines are skipped by named reason ([`formats::Skip`]), an
//! unreadable tail (a truncated .gz) ends that file with an [`InputError`] in the summary.
use std::{
    collections::BTreeMap,
    fmt,
    io::IsTerminal as _,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    acked::Conflict,
    http::{HttpConfig, Method},
};

pub mod formats;
mod input;
mod pcap;
pub mod reorder;
pub mod run;
#[cfg(test)]
mod tests;

use formats::{LineParser, Skip};
use input::{Line, LineReader};
use reorder::{LatePolicy, Merge, Reorder};

/// Input formats. `Pcap` covers pcap and pcapng (told apart by their magic numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-agent}i"` (Apache and nginx default);
    /// fields after the user agent are ignored.
    Combined,
    /// `%h %l %u %t "%r" %>s %b`; anything after the size is ignored.
    Common,
    /// One object per line: `ts` (RFC 3339 with an offset, or a number of Unix *seconds*,
    /// fractions allowed; milliseconds are rejected, not guessed), `client`, `method`, `path`
    /// (query included), optional `host`, `session` and `headers` (an object of strings).
    Jsonl,
    /// pcap or pcapng, Ethernet (with 802.1Q), raw IP, Linux SLL/SLL2 or BSD loopback.
    Pcap,
}

impl Format {
    pub const ALL: [Format; 4] = [
        Format::Combined,
        Format::Common,
        Format::Jsonl,
        Format::Pcap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Combined => "combined",
            Format::Common => "common",
            Format::Jsonl => "jsonl",
            Format::Pcap => "pcap",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pcapng" => Ok(Format::Pcap),
            _ => Format::ALL
                .into_iter()
                .find(|f| f.as_str() == s)
                .ok_or_else(|| {
                    format!("unknown format {s:?}; use combined, common, jsonl or pcap")
                }),
        }
    }
}

/// Where a record came from: the input's index in the list given to [`Replay::open`] and the
/// 1-based line number (text) or packet number (captures).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Origin {
    pub file: u32,
    pub pos: u64,
}

/// One request, as the engine consumes it.
#[derive(Clone, PartialEq, Eq)]
pub struct ReplayRecord {
    /// Unix time in nanoseconds (UTC).
    pub ts_ns: u64,
    pub client: IpAddr,
    pub method: Method,
    /// Without the query, as sent.
    pub path: String,
    pub query: Option<String>,
    /// From the request (absolute-form target, `Host`) or the jsonl `host` field.
    pub host: Option<String>,
    /// Lowercase name and value of the headers the session identifier may need: `cookie` and
    /// the configured [`HttpConfig::session_headers`]. Empty for access logs (they carry none).
    pub headers: Vec<(String, String)>,
    /// An explicit session id (jsonl `session`); hash it like any identifier.
    pub session: Option<String>,
    pub origin: Origin,
    /// Set on a record that is no request but two disagreeing copies of one place in a
    /// connection's stream (pcap replay, as the daemon alerts on them: see
    /// [`crate::acked::Conflict`]); its request fields are then empty.
    pub conflict: Option<Box<Conflict>>,
}

impl ReplayRecord {
    /// The record of a conflict the acknowledgement gate reported.
    pub fn of_conflict(c: Conflict, origin: Origin) -> Self {
        ReplayRecord {
            ts_ns: c.ts_unix_ns,
            client: c.client.ip(),
            method: Method::Get,
            path: String::new(),
            query: None,
            host: None,
            headers: Vec::new(),
            session: None,
            origin,
            conflict: Some(Box::new(c)),
        }
    }
}

/// Header values and session ids are secrets: Debug shows their lengths only.
impl fmt::Debug for ReplayRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayRecord")
            .field("ts_ns", &self.ts_ns)
            .field("client", &self.client)
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("host", &self.host)
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(n, v)| format!("{n}: <{} bytes redacted>", v.len()))
                    .collect::<Vec<_>>(),
            )
            .field(
                "session",
                &self
                    .session
                    .as_ref()
                    .map(|s| format!("<{} bytes>", s.len())),
            )
            .field("origin", &self.origin)
            .field(
                "conflict",
                &self.conflict.as_ref().map(|c| {
                    format!(
                        "<{} and {} bytes at seq {}>",
                        c.replaced.len(),
                        c.analysed.len(),
                        c.seq
                    )
                }),
            )
            .finish()
    }
}

/// Whether [`Replay`] draws a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Progress {
    /// Never (library use, tests).
    #[default]
    Hidden,
    /// On stderr when stderr is a terminal, by bytes read of the (compressed) inputs.
    Auto,
}

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// `None`: detected per file from its first bytes.
    pub format: Option<Format>,
    /// The live path's parser configuration; its `session_headers` (plus `cookie`) are the
    /// headers kept in records.
    pub http: HttpConfig,
    /// Longer lines are skipped as `line_too_long` without being buffered whole.
    pub max_line_len: usize,
    /// Disorder tolerated within one file.
    pub reorder_window: Duration,
    /// Records waiting in one file's window at most (bounds memory when the window holds
    /// more traffic than expected); beyond, the oldest is released early (`reorder_overflow`).
    pub max_buffered: usize,
    pub late: LatePolicy,
    /// Payload bytes of a captured packet given to the parser: what the daemon's
    /// `capture_len` would copy (512 by default, at most 4096).
    pub capture_len: usize,
    /// Skipped lines kept as examples, per reason.
    pub examples_per_reason: usize,
    pub progress: Progress,
    /// In captures that show the servers' side, a request counts only once the server
    /// acknowledged it, as live (the daemon's `wait_for_acks`).
    pub wait_for_acks: bool,
}

pub const DEFAULT_MAX_LINE_LEN: usize = 64 * 1024;
pub const DEFAULT_REORDER_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_BUFFERED: usize = 200_000;

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            format: None,
            http: HttpConfig::default(),
            max_line_len: DEFAULT_MAX_LINE_LEN,
            reorder_window: DEFAULT_REORDER_WINDOW,
            max_buffered: DEFAULT_MAX_BUFFERED,
            late: LatePolicy::Drop,
            capture_len: agent_common::CAPTURE_DEFAULT as usize,
            examples_per_reason: 3,
            progress: Progress::Hidden,
            wait_for_acks: true,
        }
    }
}

/// Why a replay could not start. Problems inside a file are not errors: they are counted
/// in the [`ReplaySummary`].
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("no input files given")]
    NoInput,
    #[error("cannot open {path}: {error}")]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "cannot tell the format of {path} (it starts with \"{start}\"); pass --format combined, common, jsonl or pcap"
    )]
    UnknownFormat { path: PathBuf, start: String },
    #[error("{path} looks like {found}, not {given}; drop --format to detect it per file")]
    FormatMismatch {
        path: PathBuf,
        given: Format,
        found: Format,
    },
}

/// A skipped line or packet, for the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkipExample {
    pub file: PathBuf,
    /// Line (text) or packet (capture) number, 1-based.
    pub pos: u64,
    pub reason: &'static str,
    /// The start of the line, escaped.
    pub excerpt: String,
}

/// A file that could not be read to its end. Records before the error were delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InputError {
    pub file: PathBuf,
    pub message: String,
    /// Last line or packet number read whole.
    pub pos: u64,
    /// Bytes of the file (compressed, for .gz) read when it happened.
    pub bytes_read: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileSummary {
    pub path: PathBuf,
    /// `None` for an empty file.
    pub format: Option<Format>,
    pub gzip: bool,
    pub size: u64,
    pub bytes_read: u64,
    /// Lines (text) or packets (captures) read.
    pub units: u64,
    /// Records delivered from this file.
    pub records: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplaySummary {
    pub files: Vec<FileSummary>,
    /// Records delivered.
    pub records: u64,
    pub records_by_format: BTreeMap<Format, u64>,
    /// By stable reason name ([`Skip::as_str`]).
    pub skipped: BTreeMap<&'static str, u64>,
    pub skipped_total: u64,
    /// Records that arrived behind an already released one (see [`LatePolicy`]).
    pub late: u64,
    pub late_policy: LatePolicy,
    /// Records released before their window passed because too many were waiting.
    pub reorder_overflow: u64,
    /// Packets that are not HTTP requests (ACKs, responses, other protocols), by kind.
    pub packets_ignored: BTreeMap<&'static str, u64>,
    /// Request packets cut short by the capture's snaplen (parsed as far as they go).
    pub snaplen_cut: u64,
    /// What waiting for the server's acknowledgements did in captures that show them.
    pub acks: ReplayAcks,
    pub examples: Vec<SkipExample>,
    pub errors: Vec<InputError>,
}

/// Requests of captures that show the servers' side, by what their acknowledgement said
/// (see [`pcap`]): the daemon's counters of the same names.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReplayAcks {
    /// Captures in which requests waited for acknowledgements.
    pub files_waited: u64,
    pub acknowledged: u64,
    /// Never acknowledged within the capture: dropped.
    pub unacknowledged: u64,
    pub stale: u64,
    pub superseded: u64,
    pub overflow: u64,
    /// Acknowledged places the client sent two disagreeing copies of (alerted on).
    pub conflicting: u64,
}

/// Counters every stream writes into.
#[derive(Debug, Default)]
struct Collector {
    summary: ReplaySummary,
    examples_per_reason: usize,
    examples_seen: BTreeMap<&'static str, usize>,
}

impl Collector {
    fn skip(&mut self, path: &Path, pos: u64, reason: Skip, excerpt: impl FnOnce() -> String) {
        let name = reason.as_str();
        *self.summary.skipped.entry(name).or_default() += 1;
        self.summary.skipped_total += 1;
        let seen = self.examples_seen.entry(name).or_default();
        if *seen < self.examples_per_reason {
            *seen += 1;
            self.summary.examples.push(SkipExample {
                file: path.to_owned(),
                pos,
                reason: name,
                excerpt: excerpt(),
            });
        }
    }
}

enum Source {
    Lines {
        reader: LineReader,
        parser: LineParser,
        format: Format,
    },
    Pcap(pcap::PcapSource),
    Empty,
}

struct Stream {
    index: u32,
    path: PathBuf,
    bytes_read: Arc<AtomicU64>,
    source: Source,
    reorder: Reorder<ReplayRecord>,
    done: bool,
    max_line_len: usize,
}

impl Stream {
    /// This file's next record in timestamp order.
    fn next_sorted(&mut self, c: &mut Collector) -> Option<ReplayRecord> {
        loop {
            if let Some(r) = self.reorder.pop_ready() {
                return Some(r);
            }
            if self.done {
                return self.reorder.pop_any();
            }
            match self.pull(c) {
                Some(rec) => {
                    self.reorder.push(rec.ts_ns, rec, |r, ts| r.ts_ns = ts);
                }
                None => self.done = true,
            }
        }
    }

    /// The next record in file order; `None` at the end of the file or at a read error.
    fn pull(&mut self, c: &mut Collector) -> Option<ReplayRecord> {
        match &mut self.source {
            Source::Empty => None,
            Source::Lines {
                reader,
                parser,
                format,
            } => loop {
                let line = reader.next_line();
                c.summary.files[self.index as usize].units = reader.line_no;
                let pos = reader.line_no;
                match line {
                    Ok(None) => return None,
                    Err(e) => {
                        c.summary.errors.push(InputError {
                            file: self.path.clone(),
                            message: format!("{e}"),
                            pos,
                            bytes_read: self.bytes_read.load(Ordering::Relaxed),
                        });
                        return None;
                    }
                    Ok(Some(Line::TooLong)) => {
                        let max = self.max_line_len;
                        c.skip(&self.path, pos, Skip::LineTooLong, || {
                            format!("(longer than {max} bytes)")
                        });
                    }
                    Ok(Some(Line::Text)) => {
                        let line = reader.line();
                        if line.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        let origin = Origin {
                            file: self.index,
                            pos,
                        };
                        let parsed = match format {
                            Format::Combined => parser.clf(line, true, origin),
                            Format::Common => parser.clf(line, false, origin),
                            Format::Jsonl => parser.jsonl(line, origin),
                            Format::Pcap => unreachable!("captures are not read as lines"),
                        };
                        match parsed {
                            Ok(rec) => return Some(rec),
                            Err(skip) => {
                                c.skip(&self.path, pos, skip, || formats::excerpt(line));
                            }
                        }
                    }
                }
            },
            Source::Pcap(p) => loop {
                let ev = p.next_event();
                c.summary.snaplen_cut += std::mem::take(&mut p.snaplen_cut);
                match ev {
                    pcap::Event::Record(rec) => {
                        c.summary.files[self.index as usize].units = rec.origin.pos;
                        return Some(rec);
                    }
                    pcap::Event::Skip {
                        reason,
                        packet,
                        excerpt,
                    } => {
                        c.summary.files[self.index as usize].units = packet;
                        c.skip(&self.path, packet, reason, || excerpt);
                    }
                    pcap::Event::Ignored(kind) => {
                        c.summary.files[self.index as usize].units += 1;
                        *c.summary.packets_ignored.entry(kind).or_default() += 1;
                    }
                    pcap::Event::Held => c.summary.files[self.index as usize].units += 1,
                    pcap::Event::Meta => {}
                    pcap::Event::End => {
                        let (waited, acks) = p.acks();
                        if waited {
                            let sum = &mut c.summary.acks;
                            sum.files_waited += 1;
                            sum.acknowledged += acks.acknowledged;
                            sum.unacknowledged += acks.unacknowledged;
                            sum.stale += acks.stale;
                            sum.superseded += acks.superseded;
                            sum.conflicting += acks.conflicting;
                            sum.overflow += acks.overflow;
                        }
                        return None;
                    }
                    pcap::Event::Failed(message) => {
                        let f = &c.summary.files[self.index as usize];
                        let pos = f.units;
                        c.summary.errors.push(InputError {
                            file: self.path.clone(),
                            message,
                            pos,
                            bytes_read: self.bytes_read.load(Ordering::Relaxed),
                        });
                        return None;
                    }
                }
            },
        }
    }
}

/// The replay input: an iterator of records in timestamp order over all files, and the
/// [`ReplaySummary`] of what was read, skipped and reordered.
pub struct Replay {
    streams: Vec<Stream>,
    merge: Merge<ReplayRecord>,
    primed: bool,
    collector: Collector,
    bar: Option<indicatif::ProgressBar>,
    delivered_since_tick: u32,
}

impl Replay {
    /// Opens every file (failing on the first that cannot be opened or recognised: better
    /// before an hour of replay than after) and detects formats.
    pub fn open<P: AsRef<Path>>(paths: &[P], opts: &ReplayOptions) -> Result<Replay, ReplayError> {
        if paths.is_empty() {
            return Err(ReplayError::NoInput);
        }
        let mut streams = Vec::with_capacity(paths.len());
        let mut files = Vec::with_capacity(paths.len());
        for (i, path) in paths.iter().enumerate() {
            let path = path.as_ref();
            let bytes_read = Arc::new(AtomicU64::new(0));
            let opened = input::open(path, opts.format, bytes_read.clone())?;
            let index = i as u32;
            let source = match opened.format {
                None => Source::Empty,
                Some(Format::Pcap) => {
                    let keep = LineParser::new(opts.http.clone()).keep().to_vec();
                    Source::Pcap(pcap::PcapSource::new(
                        opened.reader,
                        index,
                        opts.http.clone(),
                        keep,
                        opts.capture_len.min(agent_common::CAPTURE_MAX),
                        opts.wait_for_acks,
                    ))
                }
                Some(format) => Source::Lines {
                    reader: LineReader::new(opened.reader, opts.max_line_len),
                    parser: LineParser::new(opts.http.clone()),
                    format,
                },
            };
            files.push(FileSummary {
                path: path.to_owned(),
                format: opened.format,
                gzip: opened.gzip,
                size: opened.size,
                bytes_read: 0,
                units: 0,
                records: 0,
            });
            streams.push(Stream {
                index,
                path: path.to_owned(),
                bytes_read,
                source,
                reorder: Reorder::new(
                    u64::try_from(opts.reorder_window.as_nanos()).unwrap_or(u64::MAX),
                    opts.max_buffered,
                    opts.late,
                ),
                done: false,
                max_line_len: opts.max_line_len,
            });
        }
        let total: u64 = files.iter().map(|f| f.size).sum();
        let bar = (opts.progress == Progress::Auto && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(total),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "replay {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        let collector = Collector {
            summary: ReplaySummary {
                files,
                late_policy: opts.late,
                ..ReplaySummary::default()
            },
            examples_per_reason: opts.examples_per_reason,
            examples_seen: BTreeMap::new(),
        };
        Ok(Replay {
            merge: Merge::new(streams.len()),
            streams,
            primed: false,
            collector,
            bar,
            delivered_since_tick: 0,
        })
    }

    /// What has been read so far (complete once the iterator is exhausted).
    pub fn summary(&self) -> ReplaySummary {
        let mut s = self.collector.summary.clone();
        for (st, f) in self.streams.iter().zip(&mut s.files) {
            s.late += st.reorder.late;
            s.reorder_overflow += st.reorder.overflow;
            f.bytes_read = st.bytes_read.load(Ordering::Relaxed);
        }
        s
    }

    /// Ends the replay (clearing the progress bar) and returns the summary.
    pub fn finish(self) -> ReplaySummary {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.summary()
    }

    fn tick(&self) {
        if let Some(bar) = &self.bar {
            let read: u64 = self
                .streams
                .iter()
                .map(|s| s.bytes_read.load(Ordering::Relaxed))
                .sum();
            bar.set_position(read);
        }
    }
}

impl Iterator for Replay {
    type Item = ReplayRecord;

    fn next(&mut self) -> Option<ReplayRecord> {
        if !self.primed {
            self.primed = true;
            for (i, s) in self.streams.iter_mut().enumerate() {
                if let Some(r) = s.next_sorted(&mut self.collector) {
                    self.merge.offer(i, r.ts_ns, r);
                }
            }
        }
        let Some((i, rec)) = self.merge.pop() else {
            self.tick();
            return None;
        };
        if let Some(r) = self.streams[i].next_sorted(&mut self.collector) {
            self.merge.offer(i, r.ts_ns, r);
        }
        let s = &mut self.collector.summary;
        if rec.conflict.is_none() {
            s.records += 1;
            s.files[i].records += 1;
            if let Some(f) = s.files[i].format {
                *s.records_by_format.entry(f).or_default() += 1;
            }
        }
        self.delivered_since_tick += 1;
        if self.delivered_since_tick >= 4096 {
            self.delivered_since_tick = 0;
            self.tick();
        }
        Some(rec)
    }
}
