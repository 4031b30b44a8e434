//! `cargo xtask <task>`: everything a newcomer needs on a fresh machine, each task doing its
//! own set-up first.
mod bench;
mod demo;
mod eval;
mod fuzz;
mod package;
mod setup;
mod test;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "precedent's development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain (pinned nightly, bpf-linker) and the system packages tests need.
    Setup,
    /// Set up if needed, then build the `precedent` binary (debug).
    Build,
    /// Set up if needed, then run unit tests and the root integration tests, on the host kernel
    /// and on Debian's 6.1 LTS kernel under QEMU.
    Test {
        /// Only the unit tests (no root needed).
        #[arg(long)]
        unit_only: bool,
    },
    /// Set up if needed, then run the root integration tests on Debian's 6.1 LTS kernel under
    /// QEMU (software emulation); the kernel is cached in ~/.cache/precedent/vm.
    VmTest {
        /// An integration test binary to run (repeatable); default: xdp_packets, capture,
        /// blocking, daemon.
        #[arg(long = "test", value_name = "NAME")]
        tests: Vec<String>,
    },
    /// Set up if needed, then tell the whole story: customers, learning, attacks, blocks.
    Demo {
        /// Run the story offline through `precedent replay` (what happens without root).
        #[arg(long)]
        replay: bool,
    },
    /// Labelled detection benchmark: FIFA sessions as normal traffic, injected attacks, per kind
    /// detection at 0.1% and 1% false positives (no root needed).
    Eval {
        /// fifa-sessions.dat (default: ../shared/data/fifa-sessions.dat from the workspace).
        #[arg(long, value_name = "PATH")]
        data: Option<PathBuf>,
        /// Random seeds (each injects its own attacks and shuffles its own mix).
        #[arg(long, default_value_t = 3)]
        seeds: u64,
        /// Injected sessions per attack kind and seed.
        #[arg(long, default_value_t = 200)]
        per_kind: usize,
        /// Also write every held-out session's scores to PREFIX.SEED (tab-separated), to see
        /// which sessions set a threshold and which attacks fall below it.
        #[arg(long, value_name = "PREFIX")]
        dump: Option<PathBuf>,
    },
    /// Set up if needed, then build the .deb (release binary with the XDP program, systemd
    /// unit, default config, completions, man page) under target/debian/ with cargo-deb.
    Package,
    /// Nanoseconds per packet of the XDP program (BPF_PROG_TEST_RUN) vs an empty program.
    BenchXdp,
    /// Time from an abusive request to the first dropped packet of its client (p50/p99).
    BenchBlock,
    /// The daemon's resident memory idle and after many requests from many sessions.
    BenchMemory {
        #[arg(long, default_value_t = 1_000_000)]
        requests: u64,
        #[arg(long, default_value_t = 100_000)]
        sessions: u64,
    },
    /// HTTP requests per second through a veth pair with and without precedent attached.
    BenchE2e {
        /// Seconds per measurement round.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Rounds per configuration (alternating).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// The detection engine on one core: requests/s (FIFA sessions and a synthetic API), memory
    /// per session and context, and the model side by side with anomaly-grid (no root needed).
    BenchEngine,
    /// Fuzz every parser of outside input (HTTP requests, access logs, captures, config, rules,
    /// state files, control requests, discovery) with cargo-fuzz, one target after another.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Per-target libFuzzer logs go here (default: fuzz/logs).
        #[arg(long, value_name = "DIR")]
        log_dir: Option<PathBuf>,
        /// Only these targets (default: all).
        #[arg(value_name = "TARGET")]
        targets: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Build => setup::ensure().and_then(|()| build_agent()).map(|_| ()),
        Task::Test { unit_only } => test::run(unit_only),
        Task::VmTest { tests } => vm::run_cli(&tests),
        Task::Demo { replay } => demo::run(replay),
        Task::Eval {
            data,
            seeds,
            per_kind,
            dump,
        } => eval::run(data, seeds, per_kind, dump),
        Task::Package => package::run(),
        Task::BenchXdp => bench::xdp(),
        Task::BenchBlock => bench::block_latency(),
        Task::BenchMemory { requests, sessions } => bench::memory(requests, sessions),
        Task::BenchE2e { seconds, rounds } => bench::e2e(seconds, rounds),
        Task::BenchEngine => bench::engine(),
        Task::Fuzz {
            time,
            log_dir,
            targets,
        } => fuzz::run(&fuzz::Options {
            seconds: time,
            targets,
            log_dir,
            optimized: true,
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent dir")
        .to_path_buf()
}

/// Builds `precedent` (debug) and returns the binary's path.
pub fn build_agent() -> anyhow::Result<PathBuf> {
    step("building precedent");
    cargo(&["build", "--package", "precedent"])?;
    Ok(target_dir().join("debug/precedent"))
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs cargo (the one that runs us) in the workspace root; fails if it fails.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    exec(Command::new(cargo).args(args).current_dir(workspace_root()))
}

/// Runs a command with inherited stdio; fails with the command line if it fails.
pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

pub fn step(what: &str) {
    eprintln!("==> {what}");
}

pub fn is_root() -> bool {
    precedent_tests::is_root()
}
