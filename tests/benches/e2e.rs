//! HTTP requests per second through a veth pair with and without precedent, alternating in
//! one run. Needs root. Run with `cargo xtask bench-e2e` (which also builds the daemon).
//!
//! Configurations, each measured once per round:
//! - `without`: nothing attached;
//! - `empty native` / `empty generic`: the empty baseline XDP program attached. On a veth,
//!   attaching any program changes the receive path (native: NAPI, GRO and a copy of every
//!   cloned TCP skb into an XDP buffer; generic: the skb is copied/linearised too), so this is
//!   the price of XDP on this link, whatever the program does;
//! - `xdp native` / `xdp generic`: precedent's program loaded and attached by the daemon's own
//!   code ([`Datapath`]), its ring buffer emptied by a minimal reader that decodes nothing and
//!   runs no engine: the cost of the program on the request path;
//! - `daemon`: the full `precedent daemon` (capture, engine, alerts), when `PRECEDENT_BIN` is
//!   set. On a small machine this mostly measures the engine's CPU, shared with the load.
//!
//! The load generator and the HTTP server are pinned to different CPUs so they do not
//! compete with each other; the reader goes on `E2E_READER_CPU` (default: the server's).
//! Settings: `E2E_SECONDS` (per measurement, default 3), `E2E_ROUNDS` (default 5),
//! `E2E_ONLY` (comma-separated setup names, e.g. `without,empty native`: a subset, to profile
//! one setup with `perf record -a`; the ratios need `without` in it), `E2E_CLIENTS`
//! (comma-separated client counts, each measured in every round and reported separately;
//! default `4`; `4,64` measures both regimes below in one run).
//!
//! Two regimes answer different questions:
//! - few clients (4): each connection waits for its answer before sending again, so the CPUs
//!   idle between packets and req/s is bound by the round-trip latency: what a program on
//!   the path adds to every request's latency;
//! - many clients (64): both CPUs stay busy, as on a loaded server: req/s is bound by CPU
//!   time, and a ratio tells how much of it the program takes.
//!
//! Which regime a series was in is measured, not assumed: each measurement records the CPU
//! time of this process (clients, server, reader, and the softirq work done on their behalf)
//! against the two CPUs' wall time, and how busy the CPUs were in all. Other work on the
//! machine shows up as the difference, and makes the figures unreliable: it is reported.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use agent_common::Counter;
use precedent::capture::{AttachMode, DRAIN_EVERY, Datapath, LoadOptions, RING_LINGER};
use precedent_tests::{Daemon, HttpServer, TestNet};

/// Concurrent keep-alive clients generating load, one measurement series per count
/// (`E2E_CLIENTS` overrides, e.g. `4,64` for both regimes).
const CLIENTS: [usize; 1] = [4];
const PORT: u16 = 8080;
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    Without,
    /// The empty baseline program.
    Empty(AttachMode),
    /// precedent's program with a minimal ring reader.
    Xdp(AttachMode, Reader),
    Daemon,
}

/// How the minimal reader waits for records.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// Like the daemon: woken by the kernel (and every DRAIN_EVERY in any case).
    Woken,
    /// Never waits on the ring: drains every DRAIN_EVERY. Tells how much of the cost is the
    /// wakeups (the kernel still signals; nobody sleeps on the ring).
    Timer,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Without => "without",
            Setup::Empty(AttachMode::Generic) => "empty generic",
            Setup::Empty(_) => "empty native",
            Setup::Xdp(AttachMode::Generic, _) => "xdp generic",
            Setup::Xdp(_, Reader::Woken) => "xdp native",
            Setup::Xdp(_, Reader::Timer) => "xdp nat timer",
            Setup::Daemon => "full daemon",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Setup::Without => "no XDP program",
            Setup::Empty(AttachMode::Generic) => "empty XDP program, generic (skb) mode",
            Setup::Empty(_) => "empty XDP program, native (driver) mode",
            Setup::Xdp(AttachMode::Generic, _) => {
                "precedent's program, generic mode, minimal reader woken by the kernel"
            }
            Setup::Xdp(_, Reader::Woken) => {
                "precedent's program, native mode, minimal reader woken by the kernel"
            }
            Setup::Xdp(_, Reader::Timer) => {
                "precedent's program, native mode, minimal reader draining every 10 ms"
            }
            Setup::Daemon => {
                "precedent daemon (auto = native): capture, engine, alerts; unpinned (its CPU is not in `bench`)"
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    if !precedent_tests::is_root() {
        anyhow::bail!("bench-e2e attaches XDP programs and needs root");
    }
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let seconds = env("E2E_SECONDS", 3);
    let client_counts: Vec<usize> = match std::env::var("E2E_CLIENTS") {
        Ok(v) => v
            .split(',')
            .map(|c| c.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("E2E_CLIENTS={v:?}: {e}"))?,
        Err(_) => CLIENTS.to_vec(),
    };
    anyhow::ensure!(
        !client_counts.is_empty() && !client_counts.contains(&0),
        "E2E_CLIENTS needs client counts of at least 1"
    );
    let rounds = env("E2E_ROUNDS", 5) as usize;
    let reader_cpu = env("E2E_READER_CPU", SERVER_CPU as u64) as usize;
    let daemon_bin = std::env::var_os("PRECEDENT_BIN").map(PathBuf::from);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    anyhow::ensure!(cpus >= 2, "bench-e2e pins client and server to two CPUs");

    let net = TestNet::new("bench", 77)?;
    // Receive through NAPI in every setup, as a NIC does (see `set_host_gro`): without this,
    // "without" would take the veth's cheaper non-NAPI path that no XDP setup can take.
    let gro = std::env::var("E2E_GRO").map_or(true, |v| v != "0");
    net.set_host_gro(gro)?;
    let target = SocketAddr::new(net.host_ip.into(), PORT);
    // The server's threads (acceptor and one per connection) inherit this thread's CPU set.
    pin_current_thread(SERVER_CPU)?;
    let server = HttpServer::start(target)?;
    unpin_current_thread(cpus)?;

    let mut setups = vec![
        Setup::Without,
        Setup::Empty(AttachMode::Native),
        Setup::Xdp(AttachMode::Native, Reader::Woken),
        Setup::Xdp(AttachMode::Native, Reader::Timer),
        Setup::Empty(AttachMode::Generic),
        Setup::Xdp(AttachMode::Generic, Reader::Woken),
    ];
    if daemon_bin.is_some() {
        setups.push(Setup::Daemon);
    }
    if let Ok(only) = std::env::var("E2E_ONLY") {
        let wanted: Vec<&str> = only.split(',').map(str::trim).collect();
        setups.retain(|s| wanted.contains(&s.name()));
        anyhow::ensure!(!setups.is_empty(), "E2E_ONLY={only:?} names no setup");
    }
    println!(
        "HTTP through veth {}: {client_counts:?} keep-alive clients pinned to CPU {CLIENT_CPU}, server on CPU {SERVER_CPU}, \
         ring reader on CPU {reader_cpu}; {rounds} rounds x {seconds}s per setup and client count, alternating",
        net.host_if
    );
    let dur = Duration::from_secs(seconds);
    // [client count][setup]: req/s, and the busy shares of the client and server CPUs.
    let mut rates = vec![vec![Vec::new(); setups.len()]; client_counts.len()];
    let mut busy = vec![vec![Vec::new(); setups.len()]; client_counts.len()];
    for round in 1..=rounds {
        println!("  round {round}:");
        for (c, &clients) in client_counts.iter().enumerate() {
            // Each round starts with a different setup, so slow drifts in the machine's load
            // do not always hit the same one.
            let order = (0..setups.len()).map(|k| (k + round - 1) % setups.len());
            for i in order {
                let setup = &setups[i];
                let before = (cpu_times()?, own_cpu());
                let wall = Instant::now();
                let (rate, note) = measure(
                    *setup,
                    &net,
                    target,
                    (dur, clients),
                    reader_cpu,
                    &daemon_bin,
                )?;
                let cpus_wall = 2.0 * wall.elapsed().as_secs_f64();
                let own = (own_cpu() - before.1).as_secs_f64() / cpus_wall;
                let all = busy_share(&before.0, &cpu_times()?);
                println!(
                    "    {clients:>3} clients  {:<13} {rate:>7.0} req/s  CPU: bench {:>3.0}%, all {:>3.0}%{note}",
                    setup.name(),
                    own * 100.0,
                    all * 100.0
                );
                rates[c][i].push(rate);
                busy[c][i].push((own, all));
            }
        }
    }

    println!(
        "medians (same run): req/s, ratio to `without`, ratio to the empty program in the same mode, range over rounds, \
         share of the two CPUs used by the bench / busy in all"
    );
    for (c, &clients) in client_counts.iter().enumerate() {
        let medians: Vec<f64> = rates[c].iter_mut().map(|v| median(v)).collect();
        // `median` sorted each series: first and last are the extremes.
        let ranges: Vec<String> = rates[c]
            .iter()
            .map(|v| format!("{:.0}-{:.0}", v[0], v[v.len() - 1]))
            .collect();
        let busy_medians: Vec<(f64, f64)> = busy[c]
            .iter()
            .map(|v| {
                let mut cl: Vec<f64> = v.iter().map(|b| b.0).collect();
                let mut sv: Vec<f64> = v.iter().map(|b| b.1).collect();
                (median(&mut cl), median(&mut sv))
            })
            .collect();
        // Labelled from what was measured without any program: saturated when both CPUs
        // were busy nearly all the time with the bench's own work.
        let (own, all) = busy_medians[0];
        let regime = if own >= 0.9 {
            "CPU-saturated"
        } else if all >= 0.9 {
            "undetermined: the CPUs were busy, but not with the bench"
        } else {
            "latency-bound: the CPUs idled between requests"
        };
        println!(
            "  {clients} clients: {regime} (without a program: bench {:.0}%, all {:.0}% of 2 CPUs)",
            own * 100.0,
            all * 100.0
        );
        if all - own > 0.1 {
            println!(
                "    warning: other work took {:.0}% of the CPUs during these measurements; the ratios are not reliable",
                (all - own) * 100.0
            );
        }
        let median_of = |s: Setup| setups.iter().position(|x| *x == s).map(|i| medians[i]);
        for (i, (setup, m)) in setups.iter().zip(&medians).enumerate() {
            let vs_empty = match setup {
                Setup::Xdp(mode, _) => median_of(Setup::Empty(*mode))
                    .map_or(String::new(), |e| format!("{:.3}", m / e)),
                _ => String::new(),
            };
            println!(
                "    {:<13} {m:>9.0} req/s   {:.3}   {vs_empty:>5}   {:>13}   {:>3.0}%/{:>3.0}%   {}",
                setup.name(),
                m / medians[0],
                ranges[i],
                busy_medians[i].0 * 100.0,
                busy_medians[i].1 * 100.0,
                setup.description()
            );
        }
    }
    println!("  requests served in total: {}", server.served());
    Ok(())
}

/// One measurement: sets `setup` up, runs the load, tears it down. The note says what the
/// kernel program saw, as a check that it was really on the path.
fn measure(
    setup: Setup,
    net: &TestNet,
    target: SocketAddr,
    (dur, clients): (Duration, usize),
    reader_cpu: usize,
    daemon_bin: &Option<PathBuf>,
) -> anyhow::Result<(f64, String)> {
    match setup {
        Setup::Without => Ok((load(net, target, dur, clients)?, String::new())),
        Setup::Empty(mode) => {
            let mut dp = Datapath::load(&LoadOptions::default())?;
            let used = dp.attach_baseline(&net.host_if, mode)?;
            anyhow::ensure!(used == mode, "asked for {mode} XDP, got {used}");
            let rate = load(net, target, dur, clients)?;
            drop(dp);
            Ok((rate, String::new()))
        }
        Setup::Xdp(mode, how) => {
            let mut dp = Datapath::load(&LoadOptions::default())?;
            let ring = dp.take_events()?;
            let _enforcer = dp.take_enforcer()?;
            let used = dp.attach(&net.host_if, mode)?;
            anyhow::ensure!(used == mode, "asked for {mode} XDP, got {used}");
            let stop = Arc::new(AtomicBool::new(false));
            let reader = {
                let stop = stop.clone();
                std::thread::spawn(move || read_ring(ring, &stop, reader_cpu, how))
            };
            let rate = load(net, target, dur, clients);
            stop.store(true, Ordering::Relaxed);
            let read = reader.join().expect("ring reader panicked")?;
            let c = dp.counters()?;
            drop(dp);
            let rate = rate?;
            let captured = c.get(Counter::Captured);
            // Every request must have gone through the program and been captured.
            anyhow::ensure!(
                captured as f64 >= rate * dur.as_secs_f64() * 0.99,
                "{}: only {captured} requests captured at {rate:.0} req/s",
                setup.name()
            );
            Ok((
                rate,
                format!(
                    " (captured {captured}, read {read}, ring full {})",
                    c.get(Counter::RingbufFull)
                ),
            ))
        }
        Setup::Daemon => {
            let bin = daemon_bin
                .as_ref()
                .expect("daemon setup needs PRECEDENT_BIN");
            let daemon =
                Daemon::start_discarding_stdout(bin, &["daemon", "--iface", &net.host_if])?;
            let rate = load(net, target, dur, clients)?;
            drop(daemon);
            Ok((rate, String::new()))
        }
    }
}

/// Empties the ring buffer until `stop`, the way the daemon's reader does (woken by the
/// kernel, and every DRAIN_EVERY in any case), but without decoding or handing anything on.
/// Returns how many records it read.
fn read_ring(
    mut ring: aya::maps::RingBuf<aya::maps::MapData>,
    stop: &AtomicBool,
    cpu: usize,
    how: Reader,
) -> anyhow::Result<u64> {
    pin_current_thread(cpu)?;
    let mut read = 0u64;
    let fd = ring.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        match how {
            // SAFETY: one valid pollfd; the ring (and its fd) outlive the call.
            Reader::Woken => unsafe {
                libc::poll(&mut pfd, 1, DRAIN_EVERY.as_millis() as i32);
            },
            Reader::Timer => std::thread::sleep(DRAIN_EVERY),
        }
        // The daemon reader's contract (see RING_LINGER): after records, look again later.
        loop {
            let mut n = 0;
            while let Some(item) = ring.next() {
                std::hint::black_box(item.len());
                n += 1;
            }
            read += n;
            if n == 0 {
                break;
            }
            std::thread::sleep(RING_LINGER);
        }
    }
    Ok(read)
}

/// Requests per second that `clients` keep-alive connections from the namespace achieve.
fn load(net: &TestNet, target: SocketAddr, dur: Duration, clients: usize) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let d = done.clone();
    let elapsed = net.run_in_ns(move || -> anyhow::Result<Duration> {
        // The client threads inherit this CPU set.
        pin_current_thread(CLIENT_CPU)?;
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let threads: Vec<_> = (0..clients)
            .map(|i| {
                let (stop, d) = (stop.clone(), d.clone());
                std::thread::spawn(move || -> std::io::Result<()> {
                    let mut s = TcpStream::connect(target)?;
                    s.set_nodelay(true)?;
                    let req = format!("GET /api/v1/items/{i} HTTP/1.1\r\nHost: bench\r\n\r\n");
                    let mut buf = [0u8; 256];
                    while !stop.load(Ordering::Relaxed) {
                        s.write_all(req.as_bytes())?;
                        // The server's reply is small and fixed; read until its 2-byte body.
                        let mut got = Vec::with_capacity(96);
                        while !got.ends_with(b"\r\n\r\nok") {
                            let n = s.read(&mut buf)?;
                            if n == 0 {
                                return Ok(());
                            }
                            got.extend_from_slice(&buf[..n]);
                        }
                        d.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        std::thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("client panicked")?;
        }
        Ok(start.elapsed())
    })??;
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64())
}

/// Per-CPU (busy, total) jiffies from /proc/stat, indexed by CPU number.
fn cpu_times() -> anyhow::Result<Vec<(u64, u64)>> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let mut out = Vec::new();
    for line in stat.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        // The aggregate "cpu" line has no number.
        let Some(Ok(n)) = fields.next().map(str::parse::<usize>) else {
            continue;
        };
        let v: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
        anyhow::ensure!(v.len() >= 5, "/proc/stat: short line {line:?}");
        // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
        let total: u64 = v.iter().take(8).sum();
        let busy = total - v[3] - v[4];
        if out.len() <= n {
            out.resize(n + 1, (0, 0));
        }
        out[n] = (busy, total);
    }
    Ok(out)
}

/// Busy share of the client and server CPUs together between two [`cpu_times`] readings.
fn busy_share(before: &[(u64, u64)], after: &[(u64, u64)]) -> f64 {
    let (mut busy, mut total) = (0, 0);
    for cpu in [CLIENT_CPU, SERVER_CPU] {
        if let (Some(b), Some(a)) = (before.get(cpu), after.get(cpu)) {
            busy += a.0.saturating_sub(b.0);
            total += a.1.saturating_sub(b.1);
        }
    }
    if total == 0 {
        0.0
    } else {
        busy as f64 / total as f64
    }
}

/// User and system CPU time of this process so far, all threads.
fn own_cpu() -> Duration {
    // SAFETY: rusage is plain data (all zeroes valid) and getrusage only writes it.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn pin_current_thread(cpu: usize) -> anyhow::Result<()> {
    set_affinity(&[cpu])
}

fn unpin_current_thread(cpus: usize) -> anyhow::Result<()> {
    set_affinity(&(0..cpus).collect::<Vec<_>>())
}

/// sched_setaffinity for the calling thread; threads it spawns afterwards inherit the set.
fn set_affinity(cpus: &[usize]) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET stay inside it; pid 0 is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!(
                "sched_setaffinity({cpus:?}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}
