//! Blocking over real TCP: a client in a namespace talks to a server through a veth pair with
//! the XDP program attached, gets blocked (new and existing connections stop), is unblocked,
//! and works again. IPv4 and IPv6. Also: pinned maps outlive the program that created them.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use agent_common::Counter;
use precedent::capture::{AttachMode, Datapath, LoadOptions, PROGRAM};
use precedent_tests::{HttpServer, TestNet};

mod common;

const PORT: u16 = 8080;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// One GET on `s`; Ok(status line) or the I/O error (a timeout when blocked).
fn request(s: &mut TcpStream) -> std::io::Result<String> {
    s.write_all(b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n")?;
    let mut resp = Vec::new();
    let mut b = [0u8; 1];
    while !resp.ends_with(b"\r\n\r\nok") {
        s.read_exact(&mut b)?;
        resp.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&resp)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn connect(target: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&target, Duration::from_millis(800))?;
    s.set_read_timeout(Some(Duration::from_millis(800)))?;
    Ok(s)
}

fn block_cycle(server_ip: IpAddr, client_ip: IpAddr, tag: &str, net: &TestNet) {
    let server = HttpServer::start(SocketAddr::new(server_ip, PORT)).unwrap();
    let mut dp = Datapath::load(&LoadOptions::default()).unwrap();
    dp.attach(&net.host_if, AttachMode::Auto).unwrap();
    let mut enforcer = dp.take_enforcer().unwrap();
    let target = SocketAddr::new(server_ip, PORT);

    // A keep-alive connection opened before the block, used again after it.
    let (mut existing, first) = net
        .run_in_ns(move || {
            let mut s = connect(target).unwrap();
            let status = request(&mut s).unwrap();
            (s, status)
        })
        .unwrap();
    assert!(first.contains("200"), "{tag}: {first}");

    let client_net = ipnet::IpNet::from(client_ip);
    enforcer
        .block(client_net, Duration::from_secs(300))
        .unwrap();
    let (existing_after, new_after) = net
        .run_in_ns(move || {
            let existing = request(&mut existing).map(|_| ()).map_err(|e| e.kind());
            let new = connect(target).map(|_| ()).map_err(|e| e.kind());
            (existing, new)
        })
        .unwrap();
    assert!(
        existing_after.is_err(),
        "{tag}: existing connection still served while blocked"
    );
    assert!(
        new_after.is_err(),
        "{tag}: new connection accepted while blocked"
    );
    let blocked = dp.counters().unwrap().get(Counter::Blocked);
    assert!(blocked > 0, "{tag}: no packet counted as blocked");
    let entry = enforcer
        .blocks()
        .unwrap()
        .into_iter()
        .find(|b| b.net == client_net)
        .unwrap();
    assert!(entry.dropped > 0);

    assert!(enforcer.unblock(client_net).unwrap());
    let again = net
        .run_in_ns(move || {
            let mut s = connect(target).unwrap();
            request(&mut s).unwrap()
        })
        .unwrap();
    assert!(again.contains("200"), "{tag}: {again}");
    assert!(server.served() >= 2);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn ipv4_client_is_blocked_then_unblocked() {
    let net = TestNet::new("blk4", 11).unwrap();
    block_cycle(net.host_ip.into(), net.ns_ip.into(), "ipv4", &net);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn ipv6_client_is_blocked_then_unblocked() {
    let net = TestNet::new("blk6", 12).unwrap();
    block_cycle(net.host_ip6.into(), net.ns_ip6.into(), "ipv6", &net);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn pinned_block_maps_survive_a_restart() {
    let dir =
        std::path::PathBuf::from(format!("/sys/fs/bpf/precedent-test-{}", std::process::id()));
    let opts = LoadOptions {
        pin_dir: Some(dir.clone()),
        ..LoadOptions::default()
    };
    let cleanup = scopeguard(dir.clone());
    {
        let mut dp = Datapath::load(&opts).unwrap();
        let mut enforcer = dp.take_enforcer().unwrap();
        // A prefix (trie) and single addresses (exact-address hash maps).
        for net in ["10.44.0.0/16", "10.45.0.9/32", "fd00:45::9/128"] {
            enforcer
                .block(net.parse().unwrap(), Duration::from_secs(600))
                .unwrap();
        }
        enforcer.allow("10.44.1.0/24".parse().unwrap()).unwrap();
    }
    // An earlier version kept single addresses in the trie: put one there by hand.
    {
        let data = aya::maps::MapData::from_pin(dir.join("BLOCK_V4")).unwrap();
        let mut trie: aya::maps::LpmTrie<_, [u8; 4], agent_common::BlockEntry> =
            aya::maps::LpmTrie::try_from(aya::maps::Map::LpmTrie(data)).unwrap();
        let entry = agent_common::BlockEntry {
            expires_ns: precedent::clock::monotonic_ns() + 600_000_000_000,
            dropped: 3,
        };
        trie.insert(&aya::maps::lpm_trie::Key::new(32, [10, 46, 0, 1]), entry, 0)
            .unwrap();
    }
    // A new load (a restarted daemon) finds the same entries, the old-style one included.
    let mut dp = Datapath::load(&opts).unwrap();
    let mut enforcer = dp.take_enforcer().unwrap();
    let blocks = enforcer.blocks().unwrap();
    let nets: Vec<String> = blocks.iter().map(|b| b.net.to_string()).collect();
    assert_eq!(
        nets,
        [
            "10.44.0.0/16",
            "10.45.0.9/32",
            "10.46.0.1/32",
            "fd00:45::9/128"
        ]
    );
    assert!(
        blocks
            .iter()
            .all(|b| b.remaining > Duration::from_secs(500))
    );
    assert_eq!(blocks[2].dropped, 3);
    assert_eq!(enforcer.len(), 4);
    assert_eq!(
        enforcer.allowlist().unwrap(),
        vec!["10.44.1.0/24".parse().unwrap()]
    );
    // The kernel enforces all of them, and the moved entry unblocks like any other.
    for src in ["10.44.7.7", "10.45.0.9", "10.46.0.1", "fd00:45::9"] {
        let dst = if src.contains(':') {
            "fd00:45::1"
        } else {
            "10.45.0.1"
        };
        let frame = precedent_tests::Packet::tcp(src, dst, b"GET / HTTP/1.1\r\n\r\n").build();
        assert_eq!(
            dp.test_run(PROGRAM, &frame, 1).unwrap().0,
            XDP_DROP,
            "{src}"
        );
    }
    assert!(enforcer.unblock("10.46.0.1/32".parse().unwrap()).unwrap());
    let frame = precedent_tests::Packet::tcp("10.46.0.1", "10.45.0.1", b"x").build();
    assert_eq!(dp.test_run(PROGRAM, &frame, 1).unwrap().0, XDP_PASS);
    // Without pinning, a fresh load starts empty.
    let mut fresh = Datapath::load(&LoadOptions::default()).unwrap();
    assert!(fresh.take_enforcer().unwrap().blocks().unwrap().is_empty());
    drop(cleanup);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn attaches_in_each_mode_and_to_several_interfaces() {
    let a = TestNet::new("mode1", 13).unwrap();
    let b = TestNet::new("mode2", 14).unwrap();
    let mut dp = Datapath::load(&LoadOptions::default()).unwrap();
    assert_eq!(
        dp.attach(&a.host_if, AttachMode::Generic).unwrap(),
        AttachMode::Generic
    );
    // veth supports native XDP, so auto picks it.
    assert_eq!(
        dp.attach(&b.host_if, AttachMode::Auto).unwrap(),
        AttachMode::Native
    );
    let ifaces: Vec<String> = dp.attachments().into_iter().map(|x| x.iface).collect();
    assert_eq!(ifaces, vec![a.host_if.clone(), b.host_if.clone()]);
    let link = |iface: &str| {
        String::from_utf8(
            std::process::Command::new("ip")
                .args(["link", "show", iface])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
    };
    assert!(
        link(&a.host_if).contains("xdpgeneric"),
        "{}",
        link(&a.host_if)
    );
    assert!(link(&b.host_if).contains("xdp"), "{}", link(&b.host_if));
    dp.detach_all();
    assert!(
        !link(&a.host_if).contains("xdp"),
        "still attached after detach: {}",
        link(&a.host_if)
    );
    assert!(!link(&b.host_if).contains("xdp"));
    let err = dp
        .attach("nosuch0", AttachMode::Auto)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("interface nosuch0 not found; available:"),
        "{err}"
    );
}

/// Removes the pin directory (and its maps) when dropped, even if the test panics.
fn scopeguard(dir: std::path::PathBuf) -> impl Drop {
    struct Guard(std::path::PathBuf);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    Guard(dir)
}

/// Raw `bpf(2)` calls, to build pinned maps of layouts this version no longer creates.
mod raw_bpf {
    use std::{ffi::CString, os::fd::RawFd, path::Path};

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;

    fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> i64 {
        // SAFETY: `attr` is a zeroed union bpf_attr of ample size for these commands.
        unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of_val(attr) as libc::c_uint,
            )
        }
    }

    /// An array map of `entries` values of `value_size` bytes, pinned at `path`, with `values`
    /// written at their indexes.
    pub fn pinned_array(path: &Path, value_size: u32, entries: u32, values: &[(u32, Vec<u8>)]) {
        let mut attr = [0u64; 16];
        // map_type, key_size; value_size, max_entries.
        attr[0] = u64::from(BPF_MAP_TYPE_ARRAY) | (4u64 << 32);
        attr[1] = u64::from(value_size) | (u64::from(entries) << 32);
        let fd = bpf(BPF_MAP_CREATE, &mut attr);
        assert!(
            fd >= 0,
            "BPF_MAP_CREATE: {}",
            std::io::Error::last_os_error()
        );
        let fd = fd as RawFd;
        for (key, value) in values {
            assert_eq!(value.len(), value_size as usize);
            let mut attr = [0u64; 16];
            // map_fd, (pad), key pointer, value pointer, flags.
            attr[0] = fd as u64;
            attr[1] = key as *const u32 as u64;
            attr[2] = value.as_ptr() as u64;
            assert_eq!(bpf(BPF_MAP_UPDATE_ELEM, &mut attr), 0, "update");
        }
        let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let mut attr = [0u64; 16];
        // pathname pointer, bpf_fd.
        attr[0] = c.as_ptr() as u64;
        attr[1] = fd as u64;
        assert_eq!(
            bpf(BPF_OBJ_PIN, &mut attr),
            0,
            "pin: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: our own descriptor; the pin keeps the map alive.
        unsafe { libc::close(fd) };
    }
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn pinned_tables_of_the_earlier_layout_are_moved_into_the_current_ones() {
    use agent_common::{LEGACY_EXACT_SLOTS, exact_bucket_v4, exact_bucket_v6};
    let dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/precedent-test-legacy-{}",
        std::process::id()
    ));
    let cleanup = scopeguard(dir.clone());
    std::fs::create_dir_all(&dir).unwrap();
    let expires = precedent::clock::monotonic_ns() + 600_000_000_000;
    let entry = |dropped: u64| {
        let mut v = expires.to_ne_bytes().to_vec();
        v.extend_from_slice(&dropped.to_ne_bytes());
        v
    };
    // The earlier layout: one map entry per slot, slot = bucket * 4 + way, the address first.
    let v4: std::net::Ipv4Addr = "10.47.0.9".parse().unwrap();
    let mut slot4 = v4.octets().to_vec();
    slot4.extend_from_slice(&[0; 4]);
    slot4.extend(entry(5));
    let b4 = exact_bucket_v4(u32::from_ne_bytes(v4.octets()), 0) * 4;
    raw_bpf::pinned_array(
        &dir.join("BLOCK_EXACT_V4"),
        24,
        LEGACY_EXACT_SLOTS,
        &[(b4 + 1, slot4)],
    );
    let v6: std::net::Ipv6Addr = "fd00:47::9".parse().unwrap();
    let mut slot6 = v6.octets().to_vec();
    slot6.extend(entry(7));
    let o = v6.octets();
    let words = [
        u64::from_ne_bytes(o[..8].try_into().unwrap()),
        u64::from_ne_bytes(o[8..].try_into().unwrap()),
    ];
    let b6 = exact_bucket_v6(words, 0) * 4;
    raw_bpf::pinned_array(
        &dir.join("BLOCK_EXACT_V6"),
        32,
        LEGACY_EXACT_SLOTS,
        &[(b6, slot6)],
    );

    let opts = LoadOptions {
        pin_dir: Some(dir.clone()),
        ..LoadOptions::default()
    };
    let value_size = |name: &str| {
        aya::maps::MapInfo::from_pin(dir.join(name))
            .unwrap()
            .value_size()
    };
    let asides = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter(|n| n.ends_with("-earlier-layout"))
            .collect::<Vec<_>>()
    };

    // A start that fails after the tables were read leaves them where they were, blocks and
    // all: here another pinned map has a layout no version used.
    raw_bpf::pinned_array(&dir.join("ALLOW_V4"), 8, 16, &[]);
    assert!(Datapath::load(&opts).is_err());
    assert_eq!(
        (value_size("BLOCK_EXACT_V4"), value_size("BLOCK_EXACT_V6")),
        (24, 32)
    );
    assert!(asides().is_empty(), "{:?}", asides());
    std::fs::remove_file(dir.join("ALLOW_V4")).unwrap();

    let mut dp = Datapath::load(&opts).unwrap();
    // Until the blocks are in the new tables, the earlier ones wait aside.
    assert_eq!(asides().len(), 2);
    let mut enforcer = dp.take_enforcer().unwrap();
    assert!(asides().is_empty(), "{:?}", asides());
    let blocks = enforcer.blocks().unwrap();
    let got = common::dropped_by_block(&blocks);
    assert_eq!(
        got,
        [
            ("10.47.0.9/32".to_string(), 5),
            ("fd00:47::9/128".to_string(), 7)
        ]
    );
    assert!(
        blocks
            .iter()
            .all(|b| b.remaining > Duration::from_secs(500))
    );
    for (src, dst) in [("10.47.0.9", "10.47.0.1"), ("fd00:47::9", "fd00:47::1")] {
        let frame = precedent_tests::Packet::tcp(src, dst, b"GET / HTTP/1.1\r\n\r\n").build();
        assert_eq!(
            dp.test_run(PROGRAM, &frame, 1).unwrap().0,
            XDP_DROP,
            "{src}"
        );
    }
    assert!(enforcer.unblock("10.47.0.9/32".parse().unwrap()).unwrap());
    drop((enforcer, dp));
    // The tables are of the current layout now: the next start reuses them as they are.
    let mut dp = Datapath::load(&opts).unwrap();
    let nets: Vec<String> = dp
        .take_enforcer()
        .unwrap()
        .blocks()
        .unwrap()
        .iter()
        .map(|b| b.net.to_string())
        .collect();
    assert_eq!(nets, ["fd00:47::9/128"]);
    drop(dp);

    // A start that stopped before the blocks were moved (a crash) left a table aside: the next
    // start moves its blocks into the current tables, then removes it.
    let v4: std::net::Ipv4Addr = "10.47.0.10".parse().unwrap();
    let mut slot = v4.octets().to_vec();
    slot.extend_from_slice(&[0; 4]);
    slot.extend(entry(3));
    let b = exact_bucket_v4(u32::from_ne_bytes(v4.octets()), 0) * 4;
    raw_bpf::pinned_array(
        &dir.join("BLOCK_EXACT_V4-earlier-layout"),
        24,
        LEGACY_EXACT_SLOTS,
        &[(b + 2, slot)],
    );
    let mut dp = Datapath::load(&opts).unwrap();
    let got = common::dropped_by_block(&dp.take_enforcer().unwrap().blocks().unwrap());
    assert_eq!(
        got,
        [
            ("10.47.0.10/32".to_string(), 3),
            // 7 moved, and the probe packet dropped above.
            ("fd00:47::9/128".to_string(), 8)
        ]
    );
    assert!(asides().is_empty(), "{:?}", asides());
    drop(dp);

    // Any other layout is refused with the path and what to do, not a verifier dump.
    std::fs::remove_file(dir.join("ALLOW_V4")).unwrap();
    raw_bpf::pinned_array(&dir.join("ALLOW_V4"), 8, 16, &[]);
    let err = Datapath::load(&opts)
        .err()
        .expect("an incompatible pin is refused");
    let msg = err.to_string();
    assert!(
        msg.contains("ALLOW_V4") && msg.contains("remove it"),
        "{msg}"
    );
    drop(cleanup);
}
