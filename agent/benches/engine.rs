//! The engine's whole per-request path (parse → discover → session → score → learn, plus the
//! daemon's periodic `maintain`), driven by `Engine::on_capture` on raw HTTP request bytes:
//! requests per second on one core, on the FIFA World Cup sessions (pages as operations) and on a
//! synthetic workload shaped like the seed's snapshot (301 endpoints, ~88,000 long sessions);
//! then memory per live session and per context. `cargo xtask bench-engine` runs this and the
//! model bench (`benches/model.rs`, the side-by-side with anomaly-grid) in one go.
//!
//! Run: `AYA_BUILD_SKIP=1 cargo bench -p precedent --bench engine`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use criterion::{BatchSize, Criterion, Throughput};
use precedent::decide::Mode;
use precedent::engine::{Engine, EngineConfig};
use precedent::model::bench_support::fifa_path;
use precedent::model::{Model, ModelConfig, Op};
use precedent::rules::RuleFile;
use precedent::session::{SessionConfig, SessionKey, SessionTable};

/// Counts live heap bytes, for the memory figures.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only keeps a byte count.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_heap() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const SECOND: u64 = 1_000_000_000;
const T0: u64 = 1_790_000_000 * SECOND;
/// The daemon calls `maintain` about once a second; at a million requests a second of one
/// core that is far rarer than this, so this over-counts its share.
const MAINTAIN_EVERY: usize = 1000;
/// Sessions in flight at once: requests of this many sessions are interleaved.
const CONCURRENT: usize = 2000;

/// Deterministic generator (splitmix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A request stream: raw bytes of every request, in arrival order, with their timestamps.
struct Workload {
    name: &'static str,
    buf: Vec<u8>,
    /// (end offset in `buf`, timestamp, client address index)
    reqs: Vec<(u32, u64, u32)>,
    sessions: usize,
    distinct_ops: usize,
}

impl Workload {
    /// Interleaves the sessions (`CONCURRENT` in flight, the next request taken from a random
    /// one), each session with its own bearer token and client address; 50 µs between requests.
    fn build(
        name: &'static str,
        sessions: &[Vec<u32>],
        path: impl Fn(u32) -> String,
        seed: u64,
    ) -> Self {
        let mut rng = Rng(seed);
        let mut buf = Vec::new();
        let mut reqs = Vec::new();
        let mut active: Vec<(usize, usize)> = Vec::new();
        let mut next_session = 0;
        let mut ts = T0;
        let mut distinct = std::collections::HashSet::new();
        loop {
            while active.len() < CONCURRENT && next_session < sessions.len() {
                active.push((next_session, 0));
                next_session += 1;
            }
            if active.is_empty() {
                break;
            }
            let a = rng.below(active.len() as u64) as usize;
            let (s, i) = active[a];
            let op = sessions[s][i];
            distinct.insert(op);
            buf.extend_from_slice(
                format!(
                    "GET {} HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: bench/1.0\r\n\
                     Accept: */*\r\nAuthorization: Bearer tok-{s:08x}-{:016x}\r\n\r\n",
                    path(op),
                    (s as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                )
                .as_bytes(),
            );
            ts += 50_000;
            reqs.push((buf.len() as u32, ts, s as u32));
            if i + 1 == sessions[s].len() {
                active.swap_remove(a);
            } else {
                active[a].1 += 1;
            }
        }
        Workload {
            name,
            buf,
            reqs,
            sessions: sessions.len(),
            distinct_ops: distinct.len(),
        }
    }

    /// The first `n` requests only.
    fn truncated(mut self, n: usize) -> Self {
        if n < self.reqs.len() {
            self.reqs.truncate(n);
            self.buf
                .truncate(self.reqs.last().map_or(0, |r| r.0 as usize));
        }
        self
    }

    fn len(&self) -> u64 {
        self.reqs.len() as u64
    }

    /// Feeds every request to `engine`, calling `maintain` every `MAINTAIN_EVERY` requests.
    /// Returns the alerts raised. Not inlined, so profilers can attribute the pass to it.
    #[inline(never)]
    fn run(&self, engine: &mut Engine) -> u64 {
        self.run_timed(engine).0
    }

    /// [`Workload::run`], also returning the CPU seconds spent in `maintain`. Its work per call
    /// is bounded (`maintain_budget` entries examined, plus the sessions that ended), not
    /// proportional to traffic: called every `MAINTAIN_EVERY` requests here, about once a second
    /// in the daemon, so its share of a request's cost here is an artefact of the call rate
    /// (at a million requests a second the daemon's is a thousandth of it). Reported apart so
    /// the per-request figure can be read both ways; the call rate stays, so figures remain
    /// comparable with earlier runs (it also sets how soon collapse cycles complete).
    #[inline(never)]
    fn run_timed(&self, engine: &mut Engine) -> (u64, f64) {
        let mut start = 0usize;
        let mut alerts = 0u64;
        let mut maintain_cpu = 0.0;
        let mut last_ts = T0;
        for (i, &(end, ts, client)) in self.reqs.iter().enumerate() {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | client));
            let out = engine
                .on_capture(ts, ip, &self.buf[start..end as usize], 0)
                .expect("bench requests parse");
            alerts += out.alerts.len() as u64;
            black_box(out);
            start = end as usize;
            last_ts = ts;
            if (i + 1) % MAINTAIN_EVERY == 0 {
                let t = thread_cpu_secs();
                engine.maintain(ts);
                maintain_cpu += thread_cpu_secs() - t;
            }
        }
        let t = thread_cpu_secs();
        engine.maintain(last_ts);
        maintain_cpu += thread_cpu_secs() - t;
        (alerts, maintain_cpu)
    }
}

/// Page id → a path discovery keeps distinct: base-16 digits as letters, one segment each, so
/// no position sees more than 16 values (the `{param}` threshold is 20) and nothing looks
/// like an integer or a hex token. 1234 → `/p/e/n/c`.
fn fifa_path_for(page: u32) -> String {
    let d = |shift: u32| (b'a' + ((page >> shift) & 15) as u8) as char;
    format!("/p/{}/{}/{}", d(8), d(4), d(0))
}

fn fifa_sessions() -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(fifa_path()).unwrap_or_else(|e| {
        panic!("cannot read {}: {e}", fifa_path().display());
    });
    text.lines()
        .map(|l| {
            l.split_whitespace()
                .map(|t| t.parse::<u32>().expect("page id"))
                .collect::<Vec<_>>()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

const SYN_ENDPOINTS: u32 = 301;
const SYN_SESSIONS: usize = 88_000;

/// The seed's snapshot shape: 301 endpoints, 88,000 sessions, long sessions. Each endpoint has
/// a handful of likely successors (Zipf-ish weights) and a small chance of a jump anywhere;
/// session lengths have a long tail (Pareto, median ~20, capped at 2000); a fifth of the
/// steps repeat the previous endpoint (pagination, polling).
fn synthetic_sessions() -> Vec<Vec<u32>> {
    let mut rng = Rng(0x5eed_0001);
    let succ: Vec<Vec<u32>> = (0..SYN_ENDPOINTS)
        .map(|_| {
            (0..6)
                .map(|_| rng.below(u64::from(SYN_ENDPOINTS)) as u32)
                .collect()
        })
        .collect();
    // Zipf weights 1/(r+1) over the 6 successors, as a cumulative table.
    let weights: Vec<f64> = (0..6).map(|r| 1.0 / f64::from(r + 1)).collect();
    let total: f64 = weights.iter().sum();
    let entry: Vec<u32> = (0..8)
        .map(|_| rng.below(u64::from(SYN_ENDPOINTS)) as u32)
        .collect();
    (0..SYN_SESSIONS)
        .map(|_| {
            let len = ((10.0 / (1.0 - rng.unit()).powf(1.0 / 1.2)) as usize).clamp(2, 2000);
            let mut s = Vec::with_capacity(len);
            let mut cur = entry[rng.below(entry.len() as u64) as usize];
            s.push(cur);
            while s.len() < len {
                let u = rng.unit();
                if u < 0.2 {
                    // repeat
                } else if u < 0.25 {
                    cur = rng.below(u64::from(SYN_ENDPOINTS)) as u32;
                } else {
                    let mut x = rng.unit() * total;
                    let mut r = 0;
                    while r < 5 && x >= weights[r] {
                        x -= weights[r];
                        r += 1;
                    }
                    cur = succ[cur as usize][r];
                }
                s.push(cur);
            }
            s
        })
        .collect()
}

/// Endpoint → path: 16 resource groups, some with an integer id in the middle (discovery turns
/// those into `{id}` on sight, as it would with real object ids).
fn synthetic_path(op: u32, id: u64) -> String {
    const GROUPS: [&str; 16] = [
        "accounts", "users", "orders", "items", "carts", "payments", "invoices", "reports",
        "search", "auth", "profile", "settings", "messages", "files", "admin", "stats",
    ];
    const VERBS: [&str; 19] = [
        "list", "get", "create", "update", "delete", "export", "import", "share", "archive",
        "restore", "approve", "reject", "close", "open", "lock", "unlock", "sync", "verify",
        "history",
    ];
    let g = GROUPS[(op % 16) as usize];
    let v = VERBS[((op / 16) % 19) as usize];
    if op.is_multiple_of(3) {
        format!("/api/v2/{g}/{id}/{v}")
    } else {
        format!("/api/v2/{g}/{v}")
    }
}

fn engine() -> Engine {
    engine_in(Mode::Detect)
}

fn engine_in(mode: Mode) -> Engine {
    let cfg = EngineConfig::default();
    Engine::new(&cfg, RuleFile::default(), [7; 16], mode).expect("engine")
}

/// CPU time of this thread: unlike wall time, it leaves out the time other processes on a
/// shared machine took the core (not the caches they pollute).
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn throughput_report(w: &Workload, mode: Mode) -> Engine {
    let mut e = engine_in(mode);
    let t = Instant::now();
    let cpu = thread_cpu_secs();
    let (alerts, maintain_cpu) = w.run_timed(&mut e);
    let cpu = thread_cpu_secs() - cpu;
    let s = t.elapsed().as_secs_f64();
    let mem = e.model().memory();
    println!(
        "  {:<10} {:>9} requests, {:>6} sessions: {:>9.0} requests/s of CPU time ({:>5.0} ns, \
         {:>3.0} of them in maintain), {:>9.0} of wall time; one pass from an empty engine, {mode:?} mode; {} operations discovered ({} distinct \
         in the input), {} contexts, {} alerts",
        w.name,
        w.len(),
        w.sessions,
        w.len() as f64 / cpu,
        cpu * 1e9 / w.len() as f64,
        maintain_cpu * 1e9 / w.len() as f64,
        w.len() as f64 / s,
        e.discovery().len(),
        w.distinct_ops,
        mem.contexts,
        alerts,
    );
    e
}

/// Bytes per live session: heap growth of a session table holding `n` sessions with full
/// histories, divided by `n` (the table's own index and LRU links included).
fn session_bytes(n: usize) -> f64 {
    let cfg = SessionConfig {
        max_sessions: n,
        ..SessionConfig::default()
    };
    let before = live_heap();
    let mut t = SessionTable::new(cfg);
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for s in 0..n as u128 {
        let key = SessionKey(s.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835));
        for step in 0..12u32 {
            t.observe(key, precedent::discovery::OpId(step), ip, T0);
        }
    }
    let after = live_heap();
    let per = (after - before) as f64 / n as f64;
    drop(black_box(t));
    per
}

/// The model alone trained on the FIFA pages: heap it really holds vs what `memory()` says.
fn model_bytes(sessions: &[Vec<u32>]) {
    let before = live_heap();
    let mut m = Model::new(ModelConfig::default()).expect("model");
    let mut steps = 0usize;
    for s in sessions {
        let mut hist: Vec<Op> = Vec::new();
        for &op in s {
            if hist.last() == Some(&op) {
                continue;
            }
            m.learn(&hist, op, T0);
            hist.push(op);
            steps += 1;
            if steps.is_multiple_of(MAINTAIN_EVERY) {
                m.maintain(T0);
            }
        }
    }
    m.maintain_full(T0);
    let heap = (live_heap() - before) as f64;
    let mem = m.memory();
    println!(
        "  model on FIFA: {} contexts ({} retained by the collapse); heap {:.1} MB measured \
         ({:.1} MB estimated): {:.1} bytes per context, {:.1} bytes per retained context",
        mem.contexts,
        mem.retained_contexts,
        heap / 1e6,
        mem.bytes as f64 / 1e6,
        heap / mem.contexts as f64,
        heap / mem.retained_contexts.max(1) as f64,
    );
}

fn fifa_workload(raw: &[Vec<u32>]) -> Workload {
    Workload::build("FIFA", raw, fifa_path_for, 1)
}

fn synthetic_workload() -> Workload {
    let mut id_rng = Rng(9);
    let ids: Vec<u64> = (0..SYN_ENDPOINTS)
        .map(|_| 1000 + id_rng.below(1_000_000))
        .collect();
    Workload::build(
        "synthetic",
        &synthetic_sessions(),
        |op| synthetic_path(op, ids[op as usize]),
        2,
    )
}

fn main() {
    let fifa_raw = fifa_sessions();
    // One pass and nothing else, for instruction counts under callgrind (repeatable on a
    // shared machine where wall time is not): PRECEDENT_BENCH_PASS=fifa|synthetic, optionally
    // PRECEDENT_BENCH_REQUESTS=n to stop after the first n requests.
    if let Ok(which) = std::env::var("PRECEDENT_BENCH_PASS") {
        let w = match which.as_str() {
            "fifa" => fifa_workload(&fifa_raw),
            "synthetic" => synthetic_workload(),
            other => panic!("PRECEDENT_BENCH_PASS={other}: use fifa or synthetic"),
        };
        let limit = std::env::var("PRECEDENT_BENCH_REQUESTS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok());
        let w = w.truncated(limit.unwrap_or(usize::MAX));
        // The interval table is built once per process, on first use; outside the pass, so a
        // short pass is not dominated by it.
        black_box(precedent::model::IntervalCache::new().interval(1, 2));
        let mut e = engine();
        let cpu = thread_cpu_secs();
        let (alerts, maintain_cpu) = w.run_timed(&mut e);
        let cpu = thread_cpu_secs() - cpu;
        println!(
            "{} requests of {}: {alerts} alerts; {:.0} ns of CPU time per request \
             ({:.0} of them in maintain, called every {MAINTAIN_EVERY} requests)",
            w.len(),
            w.name,
            cpu * 1e9 / w.len() as f64,
            maintain_cpu * 1e9 / w.len() as f64
        );
        return;
    }
    let fifa = fifa_workload(&fifa_raw);
    let syn = synthetic_workload();

    println!(
        "engine: Engine::on_capture on raw requests (parse → discover → session → score → \
         learn → signals), maintain every {MAINTAIN_EVERY} requests, {CONCURRENT} sessions \
         interleaved, one core"
    );
    for mode in [Mode::Detect, Mode::Learn] {
        let e = throughput_report(&fifa, mode);
        assert_eq!(
            e.discovery().len(),
            fifa.distinct_ops,
            "discovery must keep every FIFA page a distinct operation"
        );
        drop(e);
        drop(throughput_report(&syn, mode));
    }

    println!("memory:");
    println!(
        "  session table: {:.0} bytes per live session (100,000 sessions with full histories)",
        session_bytes(100_000)
    );
    model_bytes(&fifa_raw);

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(10))
        .configure_from_args();
    for w in [&fifa, &syn] {
        let mut g = c.benchmark_group(format!("engine_{}", w.name));
        g.throughput(Throughput::Elements(w.len()));
        g.bench_function("on_capture", |b| {
            b.iter_batched(
                engine,
                |mut e| {
                    black_box(w.run(&mut e));
                    e
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }
    c.final_summary();
}
