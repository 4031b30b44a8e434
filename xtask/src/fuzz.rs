//! `cargo xtask fuzz`: the cargo-fuzz targets in fuzz/ (one per parser of outside input), one
//! after another, each for a fixed time, from its committed seeds (fuzz/seeds/TARGET) plus what
//! earlier runs found (fuzz/corpus/TARGET, not in git). libFuzzer needs the pinned nightly (the
//! one that builds the XDP program) and cargo-fuzz, installed into the cache directory if missing.
//! Prints executions, speed, corpus and crashes per target; fails if any target crashed.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{exec, setup, step, workspace_root};

/// cargo-fuzz release installed when none is on PATH.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every target in fuzz/Cargo.toml, in run order.
pub const TARGETS: &[&str] = &[
    "http",
    "access_log",
    "pcap",
    "config",
    "rules",
    "state",
    "control",
    "discovery",
];

/// Seconds one input may take before libFuzzer calls it a hang (a crash like any other); well
/// above the slowest input seen, even on a machine busy with builds.
const HANG_SECS: u64 = 30;

pub struct Options {
    pub seconds: u64,
    /// Empty: all of [`TARGETS`].
    pub targets: Vec<String>,
    /// Per-target libFuzzer logs (default: fuzz/logs).
    pub log_dir: Option<PathBuf>,
    /// Build optimized (campaigns: many more executions per second) or not (a short check:
    /// the build, which instruments every dependency, takes a third of the time).
    pub optimized: bool,
}

/// What one target's run did, from libFuzzer's final stats.
struct Outcome {
    target: String,
    seconds: f64,
    execs: u64,
    new_units: u64,
    corpus: usize,
    /// The crashing input libFuzzer saved, when it found one.
    crash: Option<String>,
    log: PathBuf,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let targets: Vec<String> = if opts.targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        opts.targets.clone()
    };
    if let Some(t) = targets.iter().find(|t| !TARGETS.contains(&t.as_str())) {
        bail!(
            "no fuzz target {t:?}; the targets are {}",
            TARGETS.join(", ")
        );
    }
    let fuzz_dir = workspace_root().join("fuzz");
    let log_dir = opts
        .log_dir
        .clone()
        .unwrap_or_else(|| fuzz_dir.join("logs"));
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let nightly = setup::pinned_nightly()?;
    setup::ensure_nightly(&nightly)?;
    let tool_dir = setup::ensure_cargo_tool("cargo-fuzz", CARGO_FUZZ_VERSION)?;

    // Same flags for build and run, or `run` rebuilds.
    let flags: &[&str] = if opts.optimized {
        &["--debug-assertions"]
    } else {
        &["--dev"]
    };
    step(&format!(
        "building the fuzz targets (libFuzzer, address sanitizer, debug assertions{})",
        if opts.optimized { "" } else { ", unoptimized" }
    ));
    let start = Instant::now();
    exec(cargo_fuzz(&nightly, &tool_dir).arg("build").args(flags))?;
    eprintln!("built in {:.0}s", start.elapsed().as_secs_f64());

    let mut outcomes = Vec::new();
    for target in &targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        let seeds = fuzz_dir.join("seeds").join(target);
        std::fs::create_dir_all(&corpus)?;
        let log = log_dir.join(format!("{target}.log"));
        step(&format!(
            "fuzzing {target} for {}s (log: {})",
            opts.seconds,
            log.display()
        ));
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let started = Instant::now();
        // New inputs go to the first corpus directory; the seeds are only read.
        let status = cargo_fuzz(&nightly, &tool_dir)
            .arg("run")
            .args(flags)
            .arg(target)
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", opts.seconds))
            .arg(format!("-timeout={HANG_SECS}"))
            .arg("-print_final_stats=1")
            .stdout(Stdio::null())
            .stderr(file)
            .status()
            .context("running cargo fuzz run")?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let mut outcome = parse_log(target, &text, started.elapsed().as_secs_f64(), &log);
        outcome.corpus = count_files(&corpus) + count_files(&seeds);
        if !status.success() && outcome.crash.is_none() {
            bail!(
                "cargo fuzz run {target} failed ({status}) without a crash artifact; see {}",
                log.display()
            );
        }
        if let Some(crash) = &outcome.crash {
            eprintln!(
                "CRASH in {target}: {crash}\n  {}\n  reproduce: cargo +{nightly} fuzz run {} {target} {crash}",
                panic_line(&text),
                flags.join(" ")
            );
        }
        outcomes.push(outcome);
    }
    print_table(&outcomes);
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crash.is_some())
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzzing found crashes in {}: turn each into a regression test and fix it",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// `cargo +NIGHTLY fuzz` in the workspace root, with cargo-fuzz on PATH and the XDP build
/// skipped (the targets never load it). The outer cargo's variables are removed so the inner
/// one and cargo-fuzz's rustc checks see the nightly.
fn cargo_fuzz(nightly: &str, tool_dir: &Path) -> Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        std::iter::once(tool_dir.to_path_buf()).chain(std::env::split_paths(&path)),
    )
    .expect("PATH entries joined back");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", nightly, "cargo", "fuzz"])
        .current_dir(workspace_root())
        .env("PATH", path)
        .env("AYA_BUILD_SKIP", "1")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn parse_log(target: &str, text: &str, seconds: f64, log: &Path) -> Outcome {
    // "Done 123456 runs in 601 second(s)": the fuzzing time, without the build check.
    let seconds = text
        .lines()
        .find_map(|l| l.strip_prefix("Done ")?.split(" runs in ").nth(1))
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(seconds);
    let stat = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // "artifact_prefix='...'; Test unit written to fuzz/artifacts/http/crash-<sha1>"
    let crash = text
        .lines()
        .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
        .map(str::to_string);
    Outcome {
        target: target.to_string(),
        seconds,
        execs: stat("number_of_executed_units"),
        new_units: stat("new_units_added"),
        corpus: 0,
        crash,
        log: log.to_path_buf(),
    }
}

/// The panic message (or sanitizer report) from a crash log, for the summary line.
fn panic_line(text: &str) -> &str {
    text.lines()
        .find(|l| l.contains("panicked at") || l.contains("ERROR: AddressSanitizer"))
        .or_else(|| text.lines().find(|l| l.contains("ERROR: libFuzzer")))
        .unwrap_or("(no panic message; see the log)")
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.flatten().count())
}

fn print_table(outcomes: &[Outcome]) {
    eprintln!(
        "\n{:<12} {:>8} {:>12} {:>10} {:>8} {:>8}  result",
        "target", "seconds", "execs", "execs/s", "new", "corpus"
    );
    for o in outcomes {
        let rate = o.execs as f64 / o.seconds.max(1e-9);
        let result = match &o.crash {
            Some(c) => format!("CRASH {c}"),
            None => "ok".to_string(),
        };
        eprintln!(
            "{:<12} {:>8.0} {:>12} {:>10.0} {:>8} {:>8}  {result}",
            o.target, o.seconds, o.execs, rate, o.new_units, o.corpus
        );
    }
    if let Some(o) = outcomes.first() {
        let dir = o.log.parent().unwrap_or(Path::new("."));
        eprintln!("logs: {}", dir.display());
    }
}
