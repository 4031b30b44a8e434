//! `cargo xtask setup`: the pinned eBPF nightly, bpf-linker built against its LLVM, and the
//! Debian packages the tests use. Every step checks first, so a second run only looks.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{exec, step, workspace_root};

/// bpf-linker release known to build against the pinned nightly's LLVM (see ebpf-toolchain.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests and demo need (package, a command it installs): `ip` for
/// namespaces and veth pairs; QEMU and a static busybox for the 6.1 kernel run (vm.rs).
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", "busybox"),
];

pub fn run() -> anyhow::Result<()> {
    let start = Instant::now();
    ensure()?;
    eprintln!("setup complete in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Brings everything into place (idempotent).
pub fn ensure() -> anyhow::Result<()> {
    let nightly = pinned_nightly()?;
    ensure_nightly(&nightly)?;
    ensure_bpf_linker(&nightly)?;
    ensure_packages()?;
    Ok(())
}

/// The `channel` of agent-ebpf/rust-toolchain.toml: the one place the nightly is pinned.
pub fn pinned_nightly() -> anyhow::Result<String> {
    let file = workspace_root().join("agent-ebpf/rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|r| r.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .next()
        .with_context(|| format!("{}: no channel line", file.display()))
}

/// Same directory agent/build.rs looks in.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PRECEDENT_CACHE_DIR") {
        return dir.into();
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("precedent")
}

pub fn ensure_nightly(nightly: &str) -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", nightly])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src")
        });
    if installed {
        step(&format!("{nightly} with rust-src: present"));
        return Ok(());
    }
    step(&format!("installing {nightly} with rust-src (rustup)"));
    exec(Command::new("rustup").args([
        "toolchain",
        "install",
        nightly,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn ensure_bpf_linker(nightly: &str) -> anyhow::Result<()> {
    let root = cache_dir().join("bpf-linker");
    let bin = root.join("bin/bpf-linker");
    // The marker names what the binary was built against; a new nightly means a rebuild.
    let marker = root.join("built-for");
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION} against {nightly}\n");
    let works = Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works && std::fs::read_to_string(&marker).is_ok_and(|m| m == wanted) {
        step(&format!("bpf-linker: present ({})", bin.display()));
        return Ok(());
    }

    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against {nightly}'s LLVM (about a minute)"
    ));
    let sysroot = capture(
        Command::new("rustc")
            .arg(format!("+{nightly}"))
            .args(["--print", "sysroot"]),
    )?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm_major = llvm_major(nightly)?;
    // bpf-linker's build looks for libLLVM under $LLVM_PREFIX/lib; the nightly ships one.
    let prefix = cache_dir().join(format!("llvm-{nightly}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let mut found = false;
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if name.starts_with("libLLVM.so") {
            found = true;
            symlink_force(&path, &prefix_lib.join(&name))?;
            symlink_force(&path, &prefix_lib.join("libLLVM.so"))?;
        }
    }
    if !found {
        bail!("{nightly} ships no libLLVM.so in {}", lib.display());
    }
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--force",
        "--root",
    ])
    .arg(&root)
    .env("LLVM_PREFIX", &prefix);
    if llvm_major != 23 {
        cmd.args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ]);
    }
    exec(&mut cmd)?;
    std::fs::write(&marker, wanted)?;
    Ok(())
}

/// A directory holding the cargo subcommand `krate` (cargo-deb, cargo-fuzz): the one on PATH
/// if it runs, otherwise `<cache>/KRATE/bin`, filled by `cargo install KRATE --locked` (pinned
/// `version`) on first use.
pub fn ensure_cargo_tool(krate: &str, version: &str) -> anyhow::Result<PathBuf> {
    let runs = |bin: &Path| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&path).find(|d| runs(&d.join(krate))) {
        step(&format!("{krate}: present ({})", dir.display()));
        return Ok(dir);
    }
    let root = cache_dir().join(krate);
    let bin = root.join("bin").join(krate);
    if runs(&bin) {
        step(&format!("{krate}: present ({})", bin.display()));
        return Ok(root.join("bin"));
    }
    step(&format!(
        "installing {krate} {version} into {} (cargo install --locked; a few minutes, once)",
        root.display()
    ));
    exec(
        Command::new("cargo")
            .args(["install", krate, "--version", version, "--locked", "--root"])
            .arg(&root),
    )?;
    Ok(root.join("bin"))
}

fn llvm_major(nightly: &str) -> anyhow::Result<u32> {
    let vv = capture(Command::new("rustc").arg(format!("+{nightly}")).arg("-vV"))?;
    vv.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.parse().ok())
        .with_context(|| format!("no LLVM version in `rustc +{nightly} -vV`"))
}

fn ensure_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, cmd)| !on_path(cmd))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        let names: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
        step(&format!("system packages: present ({})", names.join(", ")));
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "missing packages {}: run `sudo apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    step(&format!("installing {} (apt-get)", missing.join(", ")));
    exec(Command::new("apt-get").arg("update").arg("-q"))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn on_path(cmd: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(cmd).is_file())
}

fn symlink_force(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(dst);
    std::os::unix::fs::symlink(src, dst).with_context(|| format!("linking {}", dst.display()))
}

fn capture(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
