//! systemd readiness notifications for the `Type=notify` unit (dist/precedent.service).
//!
//! Each call is a no-op when `NOTIFY_SOCKET` is unset (not under systemd, tests, `cargo run`),
//! and a failure to notify is logged, never fatal: protection matters more than bookkeeping.
use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Start-up finished: programs attached, state loaded, control socket bound.
/// `systemctl start` returns (and units ordered after us start) only after this.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// SIGHUP received; call [`ready`] again once the new config is applied (or rejected).
pub fn reloading() {
    // MONOTONIC_USEC lets systemd tie this RELOADING=1 to the reload it started.
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Shutting down: detaching and saving state.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Free-form status line shown by `systemctl status precedent`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_calls_are_noops_without_systemd() {
        // Under `cargo test` NOTIFY_SOCKET is unset; nothing must panic or block.
        assert!(std::env::var_os("NOTIFY_SOCKET").is_none());
        ready("test");
        reloading();
        status("still fine");
        stopping();
    }

    #[test]
    fn ready_reaches_a_notify_socket() {
        // A datagram socket standing in for systemd's; the helper must write READY=1 to it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        // Call sd_notify directly with an explicit socket via the env var is process-global and
        // racy across test threads, so go through a child process instead.
        let exe = std::env::current_exe().unwrap();
        let status = std::process::Command::new(exe)
            .args(["--exact", "notify::tests::child_sends_ready", "--ignored"])
            .env("NOTIFY_SOCKET", &path)
            .status()
            .unwrap();
        assert!(status.success());
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(msg.contains("READY=1"), "{msg}");
        assert!(msg.contains("STATUS=child"), "{msg}");
    }

    #[test]
    #[ignore = "helper run by ready_reaches_a_notify_socket in a child process"]
    fn child_sends_ready() {
        ready("child");
    }
}
