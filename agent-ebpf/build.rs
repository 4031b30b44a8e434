//! Rebuild the eBPF object when the `bpf-linker` binary changes: it is an undeclared
//! dependency of every BPF link (artifact dependencies would express it, but are unstable).
fn main() {
    // This script also runs when the agent lists this crate as a host build-dependency;
    // only the real BPF build links with bpf-linker.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("bpf") {
        return;
    }
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
}
