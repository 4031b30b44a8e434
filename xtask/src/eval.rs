//! `cargo xtask eval`: the labelled detection benchmark (agent/examples/eval.rs) on the FIFA
//! sessions, built in release (it replays about a million requests per seed). xtask does not
//! link the agent: it runs the example through cargo with the eBPF build skipped, since the
//! benchmark never loads the XDP program.
use std::{path::PathBuf, process::Command};

use anyhow::bail;

use crate::{exec, step, workspace_root};

pub fn run(
    data: Option<PathBuf>,
    seeds: u64,
    per_kind: usize,
    dump: Option<PathBuf>,
) -> anyhow::Result<()> {
    let data = data.unwrap_or_else(|| workspace_root().join("../shared/data/fifa-sessions.dat"));
    if !data.exists() {
        bail!(
            "{} not found; pass --data PATH to fifa-sessions.dat (one session of page ids per line)",
            data.display()
        );
    }
    step("building and running the evaluation (release)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "run",
        "--release",
        "--package",
        "precedent",
        "--example",
        "eval",
        "--",
    ])
    .arg("--data")
    .arg(&data)
    .args(["--seeds", &seeds.to_string()])
    .args(["--per-kind", &per_kind.to_string()])
    .env("AYA_BUILD_SKIP", "1")
    .current_dir(workspace_root());
    if let Some(prefix) = dump {
        // The example runs from the workspace root: a relative prefix means the caller's.
        cmd.arg("--dump").arg(std::path::absolute(prefix)?);
    }
    exec(&mut cmd)
}
