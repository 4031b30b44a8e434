//! Harness for precedent's root integration tests and the demo: throw-away network
//! namespaces joined by veth pairs, a tiny HTTP server, and a supervised daemon process.
//!
//! Every resource is owned by a guard whose `Drop` removes it, so a failing test (a panic)
//! still cleans up. Traffic only ever flows between the test's own namespace and the host end
//! of its own veth pair.
pub mod daemon;
pub mod fixtures;
pub mod hostile;
pub mod http_server;
pub mod netns;
pub mod packet;
pub mod recorder;

pub use daemon::Daemon;
pub use http_server::HttpServer;
pub use netns::TestNet;
pub use packet::Packet;

/// A TCP connection from `source` (an address of the calling thread's namespace) to `target`.
pub fn connect_from(
    source: std::net::IpAddr,
    target: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<std::net::TcpStream> {
    let domain = socket2::Domain::for_address(target);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.bind(&std::net::SocketAddr::new(source, 0).into())?;
    sock.connect_timeout(&target.into(), timeout)?;
    sock.set_read_timeout(Some(timeout))?;
    Ok(sock.into())
}

/// True when running as root (the integration tests need CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `precedent ARGS`, which must succeed, and returns what it printed on stdout.
pub fn precedent_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = std::process::Command::new(precedent_bin())
        .args(args)
        .output()
        .unwrap();
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    assert!(
        out.status.success(),
        "precedent {shown:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Path of the `precedent` binary under test: $PRECEDENT_BIN, else the workspace's debug build.
pub fn precedent_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("PRECEDENT_BIN") {
        return p.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/precedent");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p precedent`; `cargo xtask test` does this)",
        bin.display()
    );
    bin
}
