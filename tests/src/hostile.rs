//! Tools for hostile-load and fault tests: raw frame injection into a test namespace's veth
//! (far faster than real TCP, and any session key or path the test wants), raw control
//! socket requests with their latency, and the resident memory of a process.
use std::{
    io::{Read as _, Write as _},
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::TestNet;

/// An AF_PACKET socket bound to the namespace end of a [`TestNet`]'s veth pair: frames sent
/// on it arrive on the host end, where the XDP program sees them. The frames never reach a
/// socket: their destination MAC is not the host end's, so the stack drops them after XDP.
pub struct FrameSender {
    fd: std::os::fd::OwnedFd,
    /// Frames the kernel accepted.
    pub sent: u64,
}

impl FrameSender {
    pub fn open(net: &TestNet) -> anyhow::Result<Self> {
        let ifname = net.ns_if.clone();
        net.run_in_ns(move || -> anyhow::Result<Self> {
            let name = std::ffi::CString::new(ifname)?;
            // SAFETY: valid C string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                bail!("no interface {name:?} in the namespace");
            }
            // SAFETY: plain socket call; protocol 0: this socket only sends.
            let fd =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
            }
            // SAFETY: a fresh fd we own.
            let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            // SAFETY: valid address and length.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error()).context("binding AF_PACKET socket");
            }
            Ok(Self { fd, sent: 0 })
        })?
    }

    /// Sends one Ethernet frame. A full transmit queue (ENOBUFS) is waited out briefly.
    pub fn send(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        loop {
            // SAFETY: valid buffer and length on a bound socket.
            let n =
                unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n >= 0 {
                self.sent += 1;
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            return Err(e).context("sending a frame");
        }
    }
}

/// Sends one raw line to a control socket and returns the reply line and how long it took.
pub fn control_raw(socket: &Path, request: &[u8]) -> anyhow::Result<(String, Duration)> {
    let start = Instant::now();
    let mut s =
        UnixStream::connect(socket).with_context(|| format!("connecting {}", socket.display()))?;
    // A hang detector, not a performance limit.
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    // The server may answer (and close) before reading everything of an oversized request.
    let _ = s.write_all(request);
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok((reply.trim_end().to_string(), start.elapsed()))
}

/// `{"version":1,"cmd":CMD}` on the control socket: the reply's `data`, or its error.
pub fn control(socket: &Path, cmd: &str) -> anyhow::Result<(serde_json::Value, Duration)> {
    let (line, took) = control_raw(
        socket,
        format!("{{\"version\":1,\"cmd\":\"{cmd}\"}}\n").as_bytes(),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("reply {line:?}"))?;
    if v["ok"] != true {
        bail!("{cmd}: {}", v["error"]);
    }
    Ok((v["data"].clone(), took))
}

/// Resident set size of `pid` in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

/// A counter out of a `status` reply: `kernel_counters` or `userspace_counters`.
pub fn counter(status: &serde_json::Value, group: &str, name: &str) -> u64 {
    status[group][name].as_u64().unwrap_or(0)
}

/// Small, fast, deterministic pseudo-random numbers (xorshift64*), so a failing run repeats.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Detaches every XDP bpf_link on interface `ifindex` with BPF_LINK_DETACH, the way
/// `bpftool link detach` does: the program leaves the interface although its owner still
/// holds the link (now defunct). This is how a program gets "detached from outside" on
/// kernels where `ip link set dev X xdp off` is refused. Returns how many links it detached.
pub fn force_detach_xdp_links(ifindex: u32) -> std::io::Result<u32> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
    const BPF_LINK_DETACH: libc::c_long = 34;
    const BPF_LINK_TYPE_XDP: u32 = 6;
    // SAFETY (all three helpers): `attr` is a zero-initialised bpf_attr-sized buffer with the
    // fields of `cmd` filled in, as the bpf(2) ABI requires.
    fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
        unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of_val(attr),
            )
        }
    }
    let mut detached = 0;
    let mut id = 0u32;
    loop {
        let mut attr = [0u64; 16];
        attr[0] = u64::from(id); // start_id
        if bpf(BPF_LINK_GET_NEXT_ID, &mut attr) != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(detached);
            }
            return Err(e);
        }
        id = (attr[0] >> 32) as u32; // next_id
        let mut attr = [0u64; 16];
        attr[0] = u64::from(id); // link_id
        let fd = bpf(BPF_LINK_GET_FD_BY_ID, &mut attr);
        if fd < 0 {
            continue; // gone meanwhile
        }
        // SAFETY: a fresh fd we own.
        let fd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        // struct bpf_link_info: type, id, prog_id, then (8-aligned) xdp.ifindex at byte 16.
        let mut info = [0u32; 32];
        let mut attr = [0u64; 16];
        attr[0] = u64::from(fd.as_raw_fd() as u32) | ((std::mem::size_of_val(&info) as u64) << 32);
        attr[1] = info.as_mut_ptr() as u64;
        if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) != 0 {
            continue;
        }
        if info[0] == BPF_LINK_TYPE_XDP && info[4] == ifindex {
            let mut attr = [0u64; 16];
            attr[0] = u64::from(fd.as_raw_fd() as u32);
            if bpf(BPF_LINK_DETACH, &mut attr) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            detached += 1;
        }
    }
}
