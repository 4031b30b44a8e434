//! Benchmarks that print figures: `bench-xdp` (per-packet cost in the kernel), `bench-e2e`
//! (HTTP throughput through a veth pair with and without precedent attached) and `bench-engine`
//! (the detection engine alone, on one core).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use precedent_tests::{Daemon, HttpServer, TestNet};

use crate::{cargo, exec, is_root, setup, step, workspace_root};

pub fn xdp() -> anyhow::Result<()> {
    setup::ensure()?;
    require_root("bench-xdp")?;
    step("cargo bench -p precedent-tests --bench xdp");
    cargo(&["bench", "--package", "precedent-tests", "--bench", "xdp"])
}

/// Runs the engine bench, then the model bench (the side-by-side with anomaly-grid), in release.
/// Neither needs the eBPF object, so its build is skipped (no nightly toolchain, no root).
pub fn engine() -> anyhow::Result<()> {
    for bench in ["engine", "model"] {
        step(&format!(
            "AYA_BUILD_SKIP=1 cargo bench --package precedent --bench {bench}"
        ));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        exec(
            std::process::Command::new(cargo)
                .args(["bench", "--package", "precedent", "--bench", bench])
                .env("AYA_BUILD_SKIP", "1")
                .current_dir(workspace_root()),
        )?;
    }
    Ok(())
}

/// Concurrent keep-alive clients generating load (bench-memory).
const CLIENTS: usize = 4;
const PORT: u16 = 8080;

/// `cargo xtask bench-e2e`: builds the release daemon, then runs tests/benches/e2e.rs, which
/// measures HTTP req/s through a veth pair without precedent, with the XDP program alone
/// (native and generic attach, minimal ring reader) and with the full daemon, alternating,
/// with 4 clients; `E2E_CLIENTS=4,64` also measures a CPU-saturated regime in the same run.
pub fn e2e(seconds: u64, rounds: usize) -> anyhow::Result<()> {
    let bin = release_agent("bench-e2e")?;
    step("cargo bench -p precedent-tests --bench e2e");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    exec(
        std::process::Command::new(cargo)
            .args(["bench", "--package", "precedent-tests", "--bench", "e2e"])
            .env("PRECEDENT_BIN", &bin)
            .env("E2E_SECONDS", seconds.to_string())
            .env("E2E_ROUNDS", rounds.to_string())
            .current_dir(workspace_root()),
    )
}

/// Set-up, root check, and the release binary (benchmarks measure what would be deployed).
fn release_agent(task: &str) -> anyhow::Result<PathBuf> {
    setup::ensure()?;
    require_root(task)?;
    step("building precedent (release)");
    cargo(&["build", "--release", "--package", "precedent"])?;
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("release/precedent"))
}

fn require_root(task: &str) -> anyhow::Result<()> {
    if !is_root() {
        anyhow::bail!("{task} attaches XDP programs and needs root: rerun as root");
    }
    Ok(())
}

/// Attackers (one address each) in the block-latency benchmark.
const BLOCK_TRIALS: u32 = 60;
/// Spacing of the probe packets that follow each abusive request.
const PROBE_EVERY: Duration = Duration::from_micros(20);

/// `cargo xtask bench-block`: time from an abusive request reaching the interface to the first
/// dropped packet of that client, over many trials, with the real daemon in enforce mode.
///
/// Each trial: a fresh client address sends a request that breaks a blocking precedence rule,
/// then a UDP probe every 20 µs carrying its CLOCK_MONOTONIC send time. A sink on the host keeps
/// the newest send time that got through; the first probe after it was dropped. Both ends run on
/// this machine, so their clocks agree.
pub fn block_latency() -> anyhow::Result<()> {
    let bin = release_agent("bench-block")?;

    let net = TestNet::new("blklat", 76)?;
    for i in 0..BLOCK_TRIALS {
        net.add_ns_address(format!("10.231.76.{}", 10 + i).parse()?)?;
    }
    let _server = HttpServer::start(SocketAddr::new(net.host_ip.into(), PORT))?;
    let sink = std::net::UdpSocket::bind(SocketAddr::new(net.host_ip.into(), 9999))?;
    let newest = Arc::new(AtomicU64::new(0));
    {
        let newest = newest.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            while let Ok(n) = sink.recv(&mut buf) {
                if n >= 8 {
                    newest.fetch_max(
                        u64::from_le_bytes(buf[..8].try_into().unwrap()),
                        Ordering::Relaxed,
                    );
                }
            }
        });
    }
    let dir = std::env::temp_dir().join(format!("precedent-bench-block-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("precedent.toml");
    std::fs::write(
        &config,
        format!(
            r#"mode = "enforce"
interfaces = ["{}"]
log_format = "text"
[decide]
max_block_share = 1.0
[[rule]]
id = "transfer-needs-balance"
operation = "POST /api/v1/transferFunds"
preceded_by = ["GET /api/v1/accounts/{{id}}/balance"]
action = "block"
block_ttl = "10m"
"#,
            net.host_if
        ),
    )?;
    let daemon = Daemon::start_discarding_stdout(
        &bin,
        &["daemon", "--config", &config.display().to_string()],
    )?;
    step(&format!(
        "{BLOCK_TRIALS} trials, each from its own address, daemon in enforce mode"
    ));

    let target = SocketAddr::new(net.host_ip.into(), PORT);
    let probe_to = SocketAddr::new(net.host_ip.into(), 9999);
    let mut latencies = Vec::new();
    for i in 0..BLOCK_TRIALS {
        let src: std::net::IpAddr = format!("10.231.76.{}", 10 + i).parse()?;
        newest.store(0, Ordering::Relaxed);
        let (sent_at, first_probe, probes_end) = net.run_in_ns(move || -> std::io::Result<(u64, u64, u64)> {
            let probe = std::net::UdpSocket::bind(SocketAddr::new(src, 0))?;
            let mut s = precedent_tests::connect_from(src, target, Duration::from_secs(1))?;
            let req = format!("POST /api/v1/transferFunds HTTP/1.1\r\nHost: bank\r\nAuthorization: Bearer t{i}\r\nContent-Length: 0\r\n\r\n");
            let sent_at = monotonic_ns();
            s.write_all(req.as_bytes())?;
            // Probe for up to 200 ms, sleeping between probes: a busy loop would take one of
            // this machine's two cores away from the daemon and measure that instead.
            let end = sent_at + 200_000_000;
            let first_probe = monotonic_ns();
            while monotonic_ns() < end {
                let now = monotonic_ns();
                let _ = probe.send_to(&now.to_le_bytes(), probe_to);
                std::thread::sleep(PROBE_EVERY);
            }
            Ok((sent_at, first_probe, end))
        })??;
        std::thread::sleep(Duration::from_millis(20));
        let last = newest.load(Ordering::Relaxed);
        if last == 0 {
            // Blocked before even the first probe got through: the first probe's send time
            // bounds the latency from above.
            latencies.push(first_probe.saturating_sub(sent_at));
            continue;
        }
        if last + 2 * PROBE_EVERY.as_nanos() as u64 >= probes_end {
            eprintln!("  trial {i}: not blocked within 200 ms");
            continue;
        }
        // The first dropped probe left at most one probe interval after the last one through;
        // count the block as landing halfway (the resolution is the actual probe gap).
        latencies.push(last.saturating_sub(sent_at));
    }
    if latencies.len() < BLOCK_TRIALS as usize {
        if let Some(sock) = daemon.socket() {
            let out = std::process::Command::new(&bin)
                .args(["status", "--json", "--socket"])
                .arg(sock)
                .output()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            eprintln!(
                "status: kernel {} | userspace {} | alerts {} | blocks {}",
                v["kernel_counters"],
                v["userspace_counters"],
                v["alerts_by_signal"],
                v["blocks_active"]
            );
        }
        let log = daemon.log_text();
        let notable: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("counters"))
            .collect();
        eprintln!(
            "daemon log (warnings, errors, counters):\n{}",
            notable.join("\n")
        );
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(!latencies.is_empty(), "no trial was blocked");
    latencies.sort_unstable();
    let pct =
        |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize] as f64 / 1e3;
    println!(
        "abusive request -> last packet let through (or the first probe, if none got through) ({} of {BLOCK_TRIALS} trials blocked; probes every {} us plus scheduling, ~60-80 us apart)",
        latencies.len(),
        PROBE_EVERY.as_micros()
    );
    println!(
        "  p50 {:8.1} us   p90 {:8.1} us   p99 {:8.1} us   max {:8.1} us",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `cargo xtask bench-memory`: the daemon's resident memory idle, and after 1,000,000 requests
/// from 100,000 sessions (each a distinct bearer token) sent through the veth pair.
pub fn memory(requests: u64, sessions: u64) -> anyhow::Result<()> {
    let bin = release_agent("bench-memory")?;
    let net = TestNet::new("benchmem", 75)?;
    let server = HttpServer::start(SocketAddr::new(net.host_ip.into(), PORT))?;
    let daemon = Daemon::start_discarding_stdout(
        &bin,
        &["daemon", "--iface", &net.host_if, "--mode", "detect"],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let pid = daemon.pid();
    let idle = rss_kib(pid)?;
    step(&format!(
        "{requests} requests from {sessions} sessions, {CLIENTS} keep-alive connections"
    ));
    let target = SocketAddr::new(net.host_ip.into(), PORT);
    let started = Instant::now();
    let per_client = requests / CLIENTS as u64;
    net.run_in_ns(move || {
        let threads: Vec<_> = (0..CLIENTS as u64)
            .map(|c| {
                std::thread::spawn(move || -> std::io::Result<()> {
                    let mut s = TcpStream::connect(target)?;
                    s.set_nodelay(true)?;
                    let mut buf = [0u8; 256];
                    let paths = ["/api/v1/auth", "/api/v1/users/7/accounts", "/api/v1/accounts/9/balance", "/api/v1/transferFunds"];
                    for i in 0..per_client {
                        let n = c * per_client + i;
                        // Sessions interleave so that all of them stay live at once.
                        let session = n % sessions;
                        let path = paths[((n / sessions) % paths.len() as u64) as usize];
                        let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer session-{session}\r\n\r\n");
                        s.write_all(req.as_bytes())?;
                        let mut got = Vec::with_capacity(96);
                        while !got.ends_with(b"\r\n\r\nok") {
                            let n = s.read(&mut buf)?;
                            if n == 0 {
                                return Ok(());
                            }
                            got.extend_from_slice(&buf[..n]);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
    })?;
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid)?;
    let status = std::process::Command::new(&bin)
        .args(["status", "--json", "--socket"])
        .arg(daemon.socket().unwrap_or_default())
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap_or_default();
    println!("daemon resident memory (VmRSS)");
    println!("  idle:                             {:>8} KiB", idle);
    println!("  after {requests} requests:      {:>8} KiB", after);
    println!(
        "  requests analysed {} (served {} in {:.1}s), sessions live {}, evicted {}, model contexts {}, model bytes {}",
        v["userspace_counters"]["requests"],
        server.served(),
        elapsed.as_secs_f64(),
        v["sessions_live"],
        v["userspace_counters"]["sessions_evicted"],
        v["model"]["contexts"],
        v["model"]["bytes"]
    );
    println!(
        "  kernel: captured {}, ring buffer full {}; engine overflow {}",
        v["kernel_counters"]["captured"],
        v["kernel_counters"]["ringbuf_full"],
        v["userspace_counters"]["engine_overflow"]
    );
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for pid {pid}"))
}
