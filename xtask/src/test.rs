//! `cargo xtask test`: set-up, unit tests (no root), then the root integration tests,
//! single-threaded because they create network namespaces and attach XDP programs, then a
//! short run of every fuzz target.
use crate::{build_agent, cargo, is_root, setup, step};

pub fn run(unit_only: bool) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    setup::ensure()?;
    let bin = build_agent()?;

    step("unit tests");
    // Default members only: the eBPF crate cannot build for the host.
    cargo(&["test"])?;

    if unit_only {
        eprintln!("skipping root integration tests (--unit-only)");
    } else {
        if !is_root() {
            anyhow::bail!(
                "the integration tests need root (network namespaces, XDP): rerun as root, \
                 e.g. `sudo -E cargo xtask test`, or pass --unit-only"
            );
        }
        step("root tests (single-threaded): XDP, namespaces, sockets as other users");
        // SAFETY: single-threaded here; the child cargo reads it.
        unsafe { std::env::set_var("PRECEDENT_BIN", &bin) };
        // Every test that needs root is #[ignore]d so plain `cargo test` passes without it.
        // replay's throughput figure is an ignored test too, but a benchmark, not a root test.
        cargo(&[
            "test",
            "--",
            "--ignored",
            "--test-threads=1",
            "--skip",
            "replay::tests::throughput",
        ])?;
    }
    // Every parser briefly, from the committed seeds and what earlier runs found; the long
    // campaign is `cargo xtask fuzz --time 600`.
    crate::fuzz::run(&crate::fuzz::Options {
        seconds: 15,
        targets: Vec::new(),
        log_dir: None,
    })?;
    eprintln!("all tests passed in {:.0}s", start.elapsed().as_secs_f64());
    Ok(())
}
