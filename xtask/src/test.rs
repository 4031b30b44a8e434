//! `cargo xtask test`: set-up, unit tests (no root), then the root integration tests on the host
//! kernel, single-threaded because they create network namespaces and attach XDP programs, then
//! the same root tests on Debian's 6.1 LTS kernel under QEMU (vm.rs), one table of both, and
//! a short run of every fuzz target (fuzz.rs).
//!
//! The root tests run their binaries directly (not through `cargo test`) so each test's outcome
//! can be read from libtest's `test NAME ... ok` lines, the same way on the host and in the VM.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{build_agent, cargo, is_root, setup, step, vm, workspace_root};

/// libtest arguments for the root tests: only the `#[ignore]`d ones, one at a time. replay's
/// throughput figure is an ignored test too, but a benchmark, not a root test.
pub const ROOT_TEST_ARGS: &[&str] = &[
    "--ignored",
    "--test-threads=1",
    "--skip",
    "replay::tests::throughput",
];

pub fn run(unit_only: bool) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    setup::ensure()?;
    let bin = build_agent()?;

    step("unit tests");
    // Default members only: the eBPF crate cannot build for the host.
    cargo(&["test"])?;

    if unit_only {
        eprintln!("skipping root integration tests (--unit-only)");
        eprintln!("unit tests passed in {:.0}s", start.elapsed().as_secs_f64());
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the integration tests need root (network namespaces, XDP): rerun as root, \
             e.g. `sudo -E cargo xtask test`, or pass --unit-only"
        );
    }
    let binaries = test_binaries()?;
    step("root tests on the host kernel (single-threaded): XDP, namespaces, the daemon");
    let host = run_on_host(&binaries, &bin)?;
    let in_vm = vm::select(&binaries, &[])?;
    let guest = vm::run(&in_vm, &bin)?;
    let matrix = [host, guest];
    print_matrix(&matrix);
    check(&matrix)?;
    // Every parser briefly, from the committed seeds and what earlier runs found, built
    // unoptimized (minutes less to build than fuzzing 15 s gains from optimization); the long
    // campaign is `cargo xtask fuzz --time 600`.
    crate::fuzz::run(&crate::fuzz::Options {
        seconds: 15,
        targets: Vec::new(),
        log_dir: None,
        optimized: false,
    })?;
    eprintln!("all tests passed in {:.0}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// One test executable cargo built for the workspace's default members.
#[derive(Debug, Clone)]
pub struct TestBinary {
    /// `xdp_packets` for an integration test, `precedent (lib)` for a crate's unit tests.
    pub label: String,
    pub path: PathBuf,
    /// The package's directory: `cargo test` runs a test binary there, so do we.
    pub dir: PathBuf,
}

/// Builds every test binary of the default members and lists them (from cargo's JSON output).
pub fn test_binaries() -> anyhow::Result<Vec<TestBinary>> {
    step("building the test binaries");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "test",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed ({})", out.status);
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(target), Some(kind), Some(manifest)) = (
            msg["executable"].as_str(),
            msg["target"]["name"].as_str(),
            msg["target"]["kind"][0].as_str(),
            msg["manifest_path"].as_str(),
        ) else {
            continue;
        };
        binaries.push(TestBinary {
            label: if kind == "test" {
                target.to_string()
            } else {
                format!("{target} ({kind})")
            },
            path: exe.into(),
            dir: Path::new(manifest)
                .parent()
                .context("manifest path without a directory")?
                .to_path_buf(),
        });
    }
    if binaries.is_empty() {
        bail!("cargo test --no-run listed no test binaries");
    }
    Ok(binaries)
}

/// What one test did on one kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    Ignored,
    /// Started and never finished: the binary was killed by a timeout or died.
    Unfinished,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Passed => "ok",
            Outcome::Failed => "FAILED",
            Outcome::Ignored => "ignored",
            Outcome::Unfinished => "HUNG/DIED",
        }
    }
}

/// The root tests' outcomes on one kernel.
#[derive(Debug, Default)]
pub struct KernelResults {
    /// `uname -r` of the kernel they ran on.
    pub kernel: String,
    /// (binary label, test name) -> outcome.
    pub tests: BTreeMap<(String, String), Outcome>,
    /// What went wrong outside any single test: a binary that failed without a failing test,
    /// a binary that never ran, a VM that timed out.
    pub problems: Vec<String>,
}

impl KernelResults {
    /// Records one binary's libtest output and exit status (None: it never exited).
    pub fn record(&mut self, binary: &str, output: &str, status: Option<i32>) {
        let parsed = parse_libtest(output);
        let mut failed = false;
        for (name, outcome) in parsed {
            failed |= matches!(outcome, Outcome::Failed | Outcome::Unfinished);
            self.tests.insert((binary.to_string(), name), outcome);
        }
        match status {
            Some(0) => {}
            Some(code) if !failed => self.problems.push(format!(
                "{binary}: exited with status {code} without a failing test"
            )),
            Some(_) => {}
            None => self.problems.push(format!("{binary}: did not finish")),
        }
        if !output.contains("test result: ") && status == Some(0) {
            self.problems
                .push(format!("{binary}: exited 0 without libtest's summary line"));
        }
    }

    pub fn failed(&self) -> bool {
        !self.problems.is_empty()
            || self
                .tests
                .values()
                .any(|o| matches!(o, Outcome::Failed | Outcome::Unfinished))
    }
}

/// Reads libtest's human output (`test NAME ... ok`). A test whose result never came (the
/// binary hung and was killed, or crashed) is `Unfinished`. A child process writing to the
/// inherited stdout can push the result onto a later line, so a pending test takes the next
/// line that ends in a result word.
pub fn parse_libtest(output: &str) -> Vec<(String, Outcome)> {
    fn result(word: &str) -> Option<Outcome> {
        let word = word.trim();
        match word {
            "ok" => Some(Outcome::Passed),
            "FAILED" => Some(Outcome::Failed),
            _ if word.starts_with("ignored") => Some(Outcome::Ignored),
            _ => None,
        }
    }
    let mut tests = Vec::new();
    let mut pending: Option<String> = None;
    for line in output.lines() {
        let line = line.trim_end_matches('\r');
        if let Some((name, rest)) = line
            .strip_prefix("test ")
            .and_then(|l| l.split_once(" ... "))
        {
            if let Some(name) = pending.take() {
                tests.push((name, Outcome::Unfinished));
            }
            match result(rest) {
                Some(outcome) => tests.push((name.to_string(), outcome)),
                None => pending = Some(name.to_string()),
            }
        } else if let Some(name) = pending.as_ref() {
            let last = line.rsplit(' ').next().unwrap_or_default();
            if let Some(outcome) = result(last).filter(|o| *o != Outcome::Ignored) {
                tests.push((name.clone(), outcome));
                pending = None;
            }
        }
    }
    if let Some(name) = pending {
        tests.push((name, Outcome::Unfinished));
    }
    tests
}

/// Runs every test binary's root tests on this machine's kernel, echoing their output.
fn run_on_host(binaries: &[TestBinary], precedent: &Path) -> anyhow::Result<KernelResults> {
    let mut results = KernelResults {
        kernel: uname_r()?,
        ..Default::default()
    };
    for b in binaries {
        eprintln!("---- {} ({})", b.label, b.path.display());
        let mut child = Command::new(&b.path)
            .args(ROOT_TEST_ARGS)
            .current_dir(&b.dir)
            // As `cargo test` would: some tests find their files from here at run time.
            .env("CARGO_MANIFEST_DIR", &b.dir)
            .env("PRECEDENT_BIN", precedent)
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", b.path.display()))?;
        let mut output = String::new();
        for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
            let line = line?;
            println!("{line}");
            output.push_str(&line);
            output.push('\n');
        }
        let status = child.wait()?;
        // Killed by a signal: no code, which is what "did not finish" means.
        results.record(&b.label, &output, status.code());
    }
    Ok(results)
}

fn uname_r() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?
        .trim()
        .to_string())
}

/// One row per root test, one column per kernel; `-` where a kernel did not run that binary.
pub fn print_matrix(kernels: &[KernelResults]) {
    let mut rows: BTreeMap<&(String, String), Vec<&str>> = BTreeMap::new();
    for (i, k) in kernels.iter().enumerate() {
        for (key, outcome) in &k.tests {
            rows.entry(key).or_insert_with(|| vec!["-"; kernels.len()])[i] = outcome.word();
        }
    }
    let name = |(bin, test): &(String, String)| format!("{bin}::{test}");
    let width = rows.keys().map(|k| name(k).len()).max().unwrap_or(4).max(4);
    let cols: Vec<String> = kernels.iter().map(|k| k.kernel.clone()).collect();
    let col_w = cols.iter().map(String::len).max().unwrap_or(0).max(9);
    println!();
    print!("{:width$}", "test");
    for c in &cols {
        print!("  {c:col_w$}");
    }
    println!();
    for (key, words) in &rows {
        print!("{:width$}", name(key));
        for w in words {
            print!("  {w:col_w$}");
        }
        println!();
    }
    if rows.values().any(|words| words.contains(&"-")) {
        println!("(-: not run on that kernel)");
    }
    for k in kernels {
        for p in &k.problems {
            println!("{}: {p}", k.kernel);
        }
    }
}

/// Fails if any test failed or hung, or anything else went wrong, on any kernel.
pub fn check(kernels: &[KernelResults]) -> anyhow::Result<()> {
    let failed: Vec<&str> = kernels
        .iter()
        .filter(|k| k.failed())
        .map(|k| k.kernel.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("root tests failed on {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_lines_give_each_tests_outcome() {
        let out = "\nrunning 3 tests\ntest a::one ... ok\ntest two ... FAILED\n\
                   test three ... ignored, needs root\n\nfailures:\n\ntest result: FAILED. 1 passed";
        assert_eq!(
            parse_libtest(out),
            vec![
                ("a::one".to_string(), Outcome::Passed),
                ("two".to_string(), Outcome::Failed),
                ("three".to_string(), Outcome::Ignored),
            ]
        );
    }

    #[test]
    fn a_test_without_result_is_unfinished_and_child_output_is_skipped() {
        let out = "test slow ... child says hi\nstill going\n ok\r\ntest stuck ... \nTimeout";
        assert_eq!(
            parse_libtest(out),
            vec![
                ("slow".to_string(), Outcome::Passed),
                ("stuck".to_string(), Outcome::Unfinished),
            ]
        );
    }

    #[test]
    fn a_binary_failing_without_a_failed_test_is_a_problem() {
        let mut k = KernelResults::default();
        k.record("x", "test a ... ok\ntest result: ok. 1 passed", Some(0));
        assert!(!k.failed());
        k.record("y", "test b ... ok\n", Some(101));
        assert!(k.failed());
        let mut k = KernelResults::default();
        k.record("z", "test c ... ", None);
        assert_eq!(k.tests[&("z".into(), "c".into())], Outcome::Unfinished);
        assert!(k.failed());
    }
}
