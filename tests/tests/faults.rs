//! Faults the daemon must live through while it keeps protecting: SIGKILL in the middle of a
//! state write, a full state directory, the XDP program detached from outside, the interface
//! deleted and re-created, and a control socket probed by strangers and fed garbage.
//! Needs root (XDP, namespaces, mounts).
use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use precedent_tests::{
    Daemon, HttpServer, TestNet,
    fixtures::{Scratch, request, wait_until, write_config},
    hostile::{Rng, control, control_raw, counter, force_detach_xdp_links},
    precedent_bin,
};

const PORT: u16 = 8080;

fn status(socket: &Path) -> serde_json::Value {
    control(socket, "status").unwrap().0
}

const BREAK_RULE: &str = r#"
mode = "enforce"
[[rule]]
id = "transfer-needs-balance"
operation = "POST /api/v1/transferFunds"
preceded_by = ["GET /api/v1/accounts/{account_id}/balance"]
action = "block"
block_ttl = "10m"
"#;

/// The attacker skips the balance lookup; true when the third request finds itself blocked.
fn attacker_gets_blocked(net: &TestNet, target: SocketAddr) -> bool {
    let r = net
        .run_in_ns(move || {
            let a = request(target, "attacker", "POST", "/api/v1/auth");
            let b = request(target, "attacker", "POST", "/api/v1/transferFunds");
            // The block lands a few hundred microseconds later on an idle machine, but far
            // later under emulation (QEMU TCG) or load: keep trying for up to 20 s.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let c = loop {
                let c = request(target, "attacker", "GET", "/api/v1/accounts/17/balance");
                if c.is_err() || std::time::Instant::now() > deadline {
                    break c;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            (a, b, c)
        })
        .unwrap();
    assert!(
        r.0.is_ok() && r.1.is_ok(),
        "attacker's first requests: {r:?}"
    );
    r.2.is_err()
}

/// SIGKILL lands while the daemon is writing model.state (it is asked to save back to back),
/// again and again; every restart loads the last complete file, never a torn one. Then a torn
/// main file is planted by hand: it is moved aside and the `.prev` copy is loaded.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn sigkill_during_state_writes_never_loads_a_torn_file() {
    let net = TestNet::new("flt1", 41).unwrap();
    let _server = HttpServer::start(SocketAddr::new(net.host_ip.into(), PORT)).unwrap();
    let dir = Scratch::new("flt1");
    let state = dir.join("state");
    let state_s = state.display().to_string();
    let config = write_config(&dir, "mode = \"learn\"\n");
    let args = [
        "daemon",
        "--iface",
        &net.host_if,
        "--config",
        &config,
        "--state-dir",
        &state_s,
    ];
    let target = SocketAddr::new(net.host_ip.into(), PORT);

    // Something to remember: what 40 requests taught it.
    let endpoints;
    {
        let daemon = Daemon::start(&precedent_bin(), &args).unwrap();
        net.run_in_ns(move || {
            for i in 0..40 {
                request(target, "c", "GET", &format!("/api/v1/thing{i}/list")).unwrap();
            }
        })
        .unwrap();
        let socket = daemon.socket().unwrap();
        assert!(wait_until(Duration::from_secs(5), || {
            counter(&status(&socket), "userspace_counters", "requests") == 40
        }));
        endpoints = status(&socket)["endpoints"].clone();
        assert!(endpoints.as_u64().unwrap() > 0);
    } // SIGTERM: saved
    let mut rng = Rng::new(0x5eed);
    let (mut kills, mut interrupted, mut saves_done) = (0, 0, 0u64);
    let started = Instant::now();
    while kills < 12 && (interrupted < 3 || kills < 4) {
        let mut daemon = Daemon::start(&precedent_bin(), &args).unwrap();
        let log = daemon.log_text();
        assert!(
            log.contains("model loaded"),
            "restart {kills}: last good model not loaded:\n{log}"
        );
        assert!(
            !log.contains("damaged state file"),
            "restart {kills}: a torn file was found:\n{log}"
        );
        let socket = daemon.socket().unwrap();
        assert_eq!(
            status(&socket)["endpoints"],
            endpoints,
            "restart {kills}: endpoints lost"
        );
        // Saves back to back from another thread while we pick a moment to kill.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let saver = {
            let (socket, stop) = (socket.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if control(&socket, "model_save").is_ok() {
                        n += 1;
                    }
                }
                n
            })
        };
        std::thread::sleep(Duration::from_millis(100 + rng.below(300)));
        daemon.signal(libc::SIGKILL);
        let _ = daemon.stop(Duration::from_secs(5));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        saves_done += saver.join().unwrap();
        kills += 1;
        // A temp file left behind means the kill landed inside a write.
        let torn: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".model.state.tmp-"))
            .collect();
        if !torn.is_empty() {
            interrupted += 1;
        }
    }
    eprintln!(
        "sigkill: {kills} kills, {interrupted} inside a model.state write, {saves_done} saves completed, {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        interrupted > 0,
        "no kill interrupted a write in {kills} tries: the test proved nothing"
    );

    // The next start removes the leftovers and loads the last complete file.
    {
        let daemon = Daemon::start(&precedent_bin(), &args).unwrap();
        let log = daemon.log_text();
        assert!(log.contains("model loaded"), "{log}");
        assert_eq!(status(&daemon.socket().unwrap())["endpoints"], endpoints);
        let names: Vec<String> = std::fs::read_dir(&state)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.contains(".tmp-")),
            "temp files left: {names:?}"
        );
    }
    // A torn main file (half of it, as if written without the atomic rename): never loaded.
    let model = state.join("model.state");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let daemon = Daemon::start(&precedent_bin(), &args).unwrap();
    let log = daemon.log_text();
    assert!(log.contains("damaged state file moved aside"), "{log}");
    assert!(log.contains("using the previous good state copy"), "{log}");
    assert_eq!(
        status(&daemon.socket().unwrap())["endpoints"],
        endpoints,
        "the .prev copy was not loaded"
    );
    drop(daemon);
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs on {}", path.display());
        Self(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem holding `dir` with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    p
}

/// The state directory is a 512 KiB tmpfs, filled up: saves fail with a clear log line and
/// `status` says so, while the rule still blocks; freeing space lets saves succeed again.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn full_state_directory_is_reported_and_blocking_continues() {
    let net = TestNet::new("flt2", 42).unwrap();
    let _server = HttpServer::start(SocketAddr::new(net.host_ip.into(), PORT)).unwrap();
    let dir = Scratch::new("flt2");
    let state = dir.join("state");
    let tmpfs = Tmpfs::mount(&state, "512k");
    let config = write_config(&dir, &format!("save_every = \"1s\"\n{BREAK_RULE}"));
    let state_s = state.display().to_string();
    let mut daemon = Daemon::start(
        &precedent_bin(),
        &[
            "daemon",
            "--iface",
            &net.host_if,
            "--config",
            &config,
            "--state-dir",
            &state_s,
        ],
    )
    .unwrap();
    let socket = daemon.socket().unwrap();
    daemon
        .wait_for_log("state saved", Duration::from_secs(5))
        .unwrap();
    let filler = fill(&state);

    daemon
        .wait_for_log("saving state failed", Duration::from_secs(5))
        .unwrap();
    let log = daemon.log_text();
    assert!(log.contains("is full (no space left on device)"), "{log}");
    let s = status(&socket);
    let err = s["state_save_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("is full"),
        "status does not say saves fail: {s}"
    );
    assert!(
        counter(&s, "userspace_counters", "state_save_failures") > 0,
        "{s}"
    );
    // The previous copies are intact: no temp file was left to eat the space.
    assert!(
        std::fs::read_dir(&state)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains(".tmp-"))
    );

    // Protection continues on a full disk.
    let target = SocketAddr::new(net.host_ip.into(), PORT);
    assert!(
        attacker_gets_blocked(&net, target),
        "no block while the disk is full"
    );
    assert_eq!(status(&socket)["blocks_active"], 1);

    std::fs::remove_file(filler).unwrap();
    daemon
        .wait_for_log("state saves work again", Duration::from_secs(5))
        .unwrap();
    let s = status(&socket);
    assert!(
        s.get("state_save_error").is_none(),
        "error still shown after recovery: {s}"
    );
    drop(daemon);
    drop(tmpfs);
}

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip").args(args).output().unwrap()
}

/// `ip link set dev X xdp off` (and its generic/driver variants) while the daemon runs, in
/// native and in generic attach mode. With a bpf_link attachment (Linux 5.9+) the kernel
/// refuses to detach it; an `off` for the other mode is a harmless no-op; were one to get
/// through (netlink attachments on older kernels), the watcher puts the program back. Then
/// the link is detached for real (BPF_LINK_DETACH): the watcher re-attaches within a check
/// or two. Either way the program is on the interface afterwards and a block applies.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn xdp_detached_from_outside_is_refused_or_reattached() {
    let net = TestNet::new("flt3", 43).unwrap();
    let _server = HttpServer::start(SocketAddr::new(net.host_ip.into(), PORT)).unwrap();
    let target = SocketAddr::new(net.host_ip.into(), PORT);
    let dir = Scratch::new("flt3");
    for (mode, own_variant) in [("native", "xdpdrv"), ("generic", "xdpgeneric")] {
        let config = write_config(&dir, &format!("attach_mode = \"{mode}\"\n"));
        let daemon = Daemon::start(
            &precedent_bin(),
            &["daemon", "--iface", &net.host_if, "--config", &config],
        )
        .unwrap();
        let socket = daemon.socket().unwrap();
        assert_eq!(status(&socket)["interfaces"][0]["attach_mode"], mode);
        let mut refused = Vec::new();
        for variant in ["xdp", "xdpgeneric", "xdpdrv"] {
            let out = ip(&["link", "set", "dev", &net.host_if, variant, "off"]);
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            eprintln!(
                "{mode} attach, `{variant} off`: {}",
                if out.status.success() {
                    "accepted".into()
                } else {
                    format!("refused ({err})")
                }
            );
            if !out.status.success() {
                refused.push(variant);
            }
        }
        // Give the watcher two checks to notice anything that got through.
        std::thread::sleep(Duration::from_millis(2500));
        let s = status(&socket);
        let reattached = counter(&s, "userspace_counters", "interfaces_reattached");
        assert!(
            refused.contains(&own_variant) || reattached > 0,
            "{mode}: `{own_variant} off` went through and nothing re-attached: {s}"
        );
        assert_eq!(s["interfaces"][0]["name"], net.host_if, "{s}");
        assert!(s.get("interfaces_missing").is_none(), "{s}");
        let link =
            String::from_utf8_lossy(&ip(&["-d", "link", "show", "dev", &net.host_if]).stdout)
                .to_string();
        assert!(
            link.contains("prog/xdp"),
            "{mode}: no XDP program on the interface:\n{link}"
        );
        // What `ip` could not do, BPF_LINK_DETACH does (bpftool's `link detach`): the program
        // leaves the interface while the daemon still holds its now defunct link. The
        // watcher sees our program id gone from the interface and attaches it again.
        let ifindex = s["interfaces"][0]["ifindex"].as_u64().unwrap() as u32;
        assert_eq!(
            force_detach_xdp_links(ifindex).unwrap(),
            1,
            "{mode}: no XDP link to detach"
        );
        let detached_at = Instant::now();
        assert!(
            wait_until(Duration::from_secs(5), || {
                counter(
                    &status(&socket),
                    "userspace_counters",
                    "interfaces_reattached",
                ) == reattached + 1
            }),
            "{mode}: program detached from outside and never re-attached:\n{}",
            daemon.log_text()
        );
        eprintln!(
            "{mode} attach, BPF_LINK_DETACH: re-attached after {:?}",
            detached_at.elapsed()
        );
        assert!(daemon.log_text().contains("xdp program re-attached"));
        let link =
            String::from_utf8_lossy(&ip(&["-d", "link", "show", "dev", &net.host_if]).stdout)
                .to_string();
        assert!(
            link.contains("prog/xdp"),
            "{mode}: program not back:\n{link}"
        );
        let block = format!("{}/32", net.ns_ip);
        control_raw(
            &socket,
            format!(
                "{{\"version\":1,\"cmd\":\"blocks_add\",\"net\":\"{block}\",\"ttl\":\"1m\"}}\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let r = net
            .run_in_ns(move || request(target, "x", "GET", "/ping"))
            .unwrap();
        assert!(
            r.is_err(),
            "{mode}: blocked client served after the detach attempts: {r:?}"
        );
        control_raw(
            &socket,
            format!("{{\"version\":1,\"cmd\":\"blocks_remove\",\"net\":\"{block}\"}}\n").as_bytes(),
        )
        .unwrap();
    }
}

/// The interface is deleted (the kernel drops the program with it) and created again under
/// the same name: the daemon reports it missing, re-attaches to the new ifindex, logs both,
/// and captures and blocks there again.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn deleted_and_recreated_interface_is_reattached() {
    let net = TestNet::new("flt4", 44).unwrap();
    let target = SocketAddr::new(net.host_ip.into(), PORT);
    let mut daemon = Daemon::start(&precedent_bin(), &["daemon", "--iface", &net.host_if]).unwrap();
    let socket = daemon.socket().unwrap();
    let before = status(&socket);
    let old_index = before["interfaces"][0]["ifindex"].as_u64().unwrap();
    assert!(old_index > 0, "{before}");

    net.delete_link().unwrap();
    daemon
        .wait_for_log("interface gone", Duration::from_secs(5))
        .unwrap();
    let s = status(&socket);
    assert_eq!(s["interfaces_missing"][0], net.host_if, "{s}");
    assert_eq!(s["interfaces"].as_array().map(Vec::len), Some(0), "{s}");
    assert_eq!(
        counter(&s, "userspace_counters", "interfaces_lost"),
        1,
        "{s}"
    );
    // The human status says it too.
    let out = Command::new(precedent_bin())
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("MISSING"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    net.create_link().unwrap();
    daemon
        .wait_for_log("xdp program re-attached", Duration::from_secs(5))
        .unwrap();
    let s = status(&socket);
    let new_index = s["interfaces"][0]["ifindex"].as_u64().unwrap();
    assert_ne!(new_index, old_index, "{s}");
    assert!(s.get("interfaces_missing").is_none(), "{s}");
    assert_eq!(
        counter(&s, "userspace_counters", "interfaces_reattached"),
        1,
        "{s}"
    );

    // Capturing again: requests on the new interface reach the engine ...
    let server = HttpServer::start(target).unwrap();
    let captured = counter(&s, "kernel_counters", "captured");
    let r = net
        .run_in_ns(move || request(target, "c", "GET", "/api/v1/after"))
        .unwrap();
    assert!(r.is_ok_and(|l| l.contains("200")));
    assert!(wait_until(Duration::from_secs(3), || counter(
        &status(&socket),
        "kernel_counters",
        "captured"
    ) > captured));
    // ... and blocks apply again.
    let block = format!("{}/32", net.ns_ip);
    control_raw(
        &socket,
        format!("{{\"version\":1,\"cmd\":\"blocks_add\",\"net\":\"{block}\"}}\n").as_bytes(),
    )
    .unwrap();
    let r = net
        .run_in_ns(move || request(target, "c", "GET", "/api/v1/after"))
        .unwrap();
    assert!(
        r.is_err(),
        "block does not apply on the re-created interface: {r:?}"
    );
    assert_eq!(server.served(), 1);
}

/// A non-root user is refused; oversized, malformed, wrong-version, binary and half-sent
/// requests each get an error reply; the daemon answers `status` throughout and after.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn control_socket_refuses_strangers_and_survives_garbage() {
    let net = TestNet::new("flt5", 45).unwrap();
    let daemon = Daemon::start(&precedent_bin(), &["daemon", "--iface", &net.host_if]).unwrap();
    let socket = daemon.socket().unwrap();
    let pid = status(&socket)["pid"].clone();

    // A half-sent request first: it is cut off after the server's 5 s read timeout while
    // everything below is served.
    let half = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            s.write_all(b"{\"version\":1,\"cm").unwrap();
            let mut reply = String::new();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let _ = s.read_to_string(&mut reply);
            reply
        })
    };

    // Non-root: the socket (0600 in a 0700 directory) keeps nobody out before the daemon's
    // own SO_PEERCRED check even runs; the CLI says permission denied.
    let dir = socket.parent().unwrap();
    let out = Command::new(precedent_bin())
        .args(["status", "--socket"])
        .arg(&socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("permission denied") || err.contains("root"),
        "{err}"
    );
    // Even with the directory opened up, the daemon refuses the peer by its uid.
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap()
    };
    mode(dir, 0o755);
    mode(&socket, 0o666);
    let out = Command::new(precedent_bin())
        .args(["status", "--socket"])
        .arg(&socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    mode(&socket, 0o600);
    mode(dir, 0o700);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("only root may use the precedent control socket"),
        "{err}"
    );

    let mut oversized = vec![b'{'; 1 << 20];
    oversized.push(b'\n');
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("1 MiB request", oversized, "larger than"),
        ("not JSON", b"{not json at all\n".to_vec(), ""),
        (
            "unknown version",
            b"{\"version\":99,\"cmd\":\"status\"}\n".to_vec(),
            "version",
        ),
        (
            "unknown command",
            b"{\"version\":1,\"cmd\":\"rm_rf\"}\n".to_vec(),
            "",
        ),
        ("binary", vec![0xff, 0x00, 0xfe, 0x80, b'\n'], ""),
        (
            "wrong field type",
            b"{\"version\":1,\"cmd\":\"sequences\",\"top\":\"many\"}\n".to_vec(),
            "",
        ),
    ];
    for (what, bytes, needle) in cases {
        let (reply, took) = control_raw(&socket, &bytes).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{what}: {e}: {reply:?}"));
        assert_eq!(v["ok"], false, "{what}: {reply}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains(needle), "{what}: {e}");
        eprintln!("{what}: error reply in {took:?}: {e}");
        assert_eq!(status(&socket)["pid"], pid, "{what}: daemon changed");
    }
    let reply = half.join().unwrap();
    assert!(
        reply.contains("no complete request within"),
        "half-sent request: {reply:?}"
    );
    assert_eq!(status(&socket)["pid"], pid);
    assert!(daemon.log_text().contains("bad control request"));
}
