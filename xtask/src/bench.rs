//! Benchmarks that print figures: `bench-xdp` (per-packet cost in the kernel), `bench-e2e`
//! (HTTP throughput through a veth pair with and without precedent attached) and `bench-engine`
//! (the detection engine alone, on one core).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
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

/// Concurrent keep-alive clients generating load.
const CLIENTS: usize = 4;
const PORT: u16 = 8080;

pub fn e2e(seconds: u64, rounds: usize) -> anyhow::Result<()> {
    setup::ensure()?;
    require_root("bench-e2e")?;
    step("building precedent (release)");
    cargo(&["build", "--release", "--package", "precedent"])?;
    let bin = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("release/precedent");

    let net = TestNet::new("bench", 77)?;
    let server = HttpServer::start(SocketAddr::new(net.host_ip.into(), PORT))?;
    let target = SocketAddr::new(net.host_ip.into(), PORT);
    step(&format!(
        "{rounds} rounds x {seconds}s each, alternating without/with `precedent daemon --iface {}`; {CLIENTS} keep-alive clients",
        net.host_if
    ));
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let off = load(&net, target, Duration::from_secs(seconds))?;
        let daemon = Daemon::start_discarding_stdout(&bin, &["daemon", "--iface", &net.host_if])?;
        let on = load(&net, target, Duration::from_secs(seconds))?;
        drop(daemon);
        eprintln!("  round {round}: without {off:>9.0} req/s   with {on:>9.0} req/s");
        without.push(off);
        with.push(on);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (off, on) = (median(&mut without), median(&mut with));
    println!(
        "HTTP through veth ({CLIENTS} keep-alive clients, median of {rounds} rounds of {seconds}s, alternating)"
    );
    println!("  without precedent: {off:>10.0} req/s");
    println!(
        "  with precedent:    {on:>10.0} req/s   (daemon capturing and printing every request)"
    );
    println!("  ratio with/without: {:.3}", on / off);
    println!("  requests served in total: {}", server.served());
    Ok(())
}

/// Requests per second that `CLIENTS` keep-alive connections from the namespace achieve.
fn load(net: &TestNet, target: SocketAddr, dur: Duration) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let d = done.clone();
    net.run_in_ns(move || {
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let threads: Vec<_> = (0..CLIENTS)
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
            let _ = t.join();
        }
        start.elapsed()
    })
    .map(|elapsed| done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64())
}

fn require_root(task: &str) -> anyhow::Result<()> {
    if !is_root() {
        anyhow::bail!("{task} attaches XDP programs and needs root: rerun as root");
    }
    Ok(())
}
