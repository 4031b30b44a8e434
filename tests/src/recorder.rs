//! Records every frame an interface sees, both directions, into a pcap file: what
//! `tcpdump -i IFACE -w FILE` writes, without tcpdump on the machine.
use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};

/// A packet socket on one interface, read by a thread until [`FrameRecorder::finish`].
pub struct FrameRecorder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<u8>>>,
}

impl FrameRecorder {
    /// Starts recording `iface` of the calling thread's network namespace.
    pub fn start(iface: &str) -> anyhow::Result<Self> {
        let name = std::ffi::CString::new(iface)?;
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {iface}");
        }
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket call.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(all),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        addr.sll_ifindex = ifindex as i32;
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        let rcvbuf: libc::c_int = 8 << 20;
        // SAFETY: valid pointers and lengths on an open socket.
        let ok = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) == 0
                && libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                ) == 0
                && libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&rcvbuf as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                ) == 0
        };
        if !ok {
            return Err(std::io::Error::last_os_error()).context("setting up the packet socket");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || record(&fd, &stop)
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops after what has arrived so far and returns the capture, a little-endian pcap of
    /// Ethernet frames with microsecond timestamps.
    pub fn finish(mut self) -> Vec<u8> {
        // What is in flight on the veth arrives within a moment.
        std::thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for FrameRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn record(fd: &OwnedFd, stop: &AtomicBool) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&65_535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes()); // Ethernet
    let mut buf = vec![0u8; 65_535];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: a valid buffer of its length on an open socket.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            continue; // the receive timeout: look at `stop` again
        }
        let orig = n as usize;
        let kept = orig.min(buf.len());
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        for v in [
            ts.as_secs() as u32,
            ts.subsec_micros(),
            kept as u32,
            orig as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&buf[..kept]);
    }
    out
}
