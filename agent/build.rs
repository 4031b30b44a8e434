//! Builds the XDP program (`agent-ebpf`) with the pinned nightly and embeds it in `precedent`.
//!
//! The nightly and bpf-linker are installed by `cargo xtask setup`; when either is missing
//! the build stops with one line that says so, instead of a wall of linker errors.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    if let Err(msg) = build() {
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let ebpf_dir = manifest_dir.join("../agent-ebpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");

    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // Lets tools that never load the program (clippy, docs) build without the nightly.
        // The embedded object is then empty and `precedent daemon` refuses to start.
        std::fs::write(out_dir.join("precedent"), b"").map_err(|e| e.to_string())?;
        println!("cargo:warning=AYA_BUILD_SKIP set: the XDP program is not embedded");
        return Ok(());
    }

    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let nightly = pinned_nightly(&toolchain_file)?;

    let setup_hint = "run `cargo xtask setup`";
    let nightly_ok = Command::new("rustup")
        .args(["run", &nightly, "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly_ok {
        return Err(format!(
            "eBPF toolchain {nightly} is not installed: {setup_hint}"
        ));
    }

    // bpf-linker lives in the cache directory xtask setup builds it into; put it on PATH
    // for the nested cargo that aya-build spawns.
    let linker_dir = cache_dir().join("bpf-linker/bin");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![linker_dir.clone()];
    dirs.extend(env::split_paths(&path));
    let have_linker = dirs.iter().any(|d| d.join("bpf-linker").is_file());
    if !have_linker {
        return Err(format!(
            "bpf-linker not found (looked in {} and PATH): {setup_hint}",
            linker_dir.display()
        ));
    }
    let joined = env::join_paths(dirs).map_err(|e| e.to_string())?;
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("PATH", joined) };

    let root_dir = ebpf_dir.to_str().ok_or("non-UTF-8 path to agent-ebpf")?;
    let package = aya_build::Package {
        name: "agent-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&nightly))
        .map_err(|e| format!("building the XDP program failed: {e:#}"))
}

/// The `channel = "..."` line of agent-ebpf/rust-toolchain.toml.
fn pinned_nightly(file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .next()
        .ok_or_else(|| format!("{}: no channel line", file.display()))
}

/// Where `cargo xtask setup` keeps bpf-linker and the LLVM it links against.
fn cache_dir() -> PathBuf {
    println!("cargo:rerun-if-env-changed=PRECEDENT_CACHE_DIR");
    if let Some(dir) = env::var_os("PRECEDENT_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("precedent")
}
