//! Loads the XDP program onto interfaces and turns its ring buffer into a stream of events.
//!
//! This is the only module that talks to the kernel's capture side. Everything downstream
//! receives plain [`RequestEvent`] values and does not know how they were obtained.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use agent_common::{FAMILY_IPV4, RequestEvent};
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use thiserror::Error;
use tokio::{io::unix::AsyncFd, sync::mpsc};

/// The XDP object built by agent/build.rs (empty when built with AYA_BUILD_SKIP=1).
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/precedent"));

const PROGRAM: &str = "precedent";
const EVENTS_MAP: &str = "EVENTS";

/// Capture set-up failures, each phrased so the operator knows what to do next.
#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("this precedent binary was built with AYA_BUILD_SKIP=1 and has no XDP program; rebuild it without that variable")]
    NoProgram,
    #[error("the kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing); precedent needs Linux 5.8+ built with CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf,
    #[error("permission denied while {doing}; run as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON")]
    Permission { doing: &'static str },
    #[error("the kernel does not support BPF ring buffers (needs Linux 5.8+)")]
    NoRingBuf,
    #[error("interface {name} not found; available: {available}")]
    UnknownInterface { name: String, available: String },
    #[error("no interface given; pass --iface NAME (available: {available})")]
    NoInterface { available: String },
    #[error("attaching XDP to {iface} failed: {source}")]
    Attach { iface: String, source: aya::programs::ProgramError },
    #[error("loading the XDP program failed: {0}")]
    Load(String),
}

/// A captured request start with addresses decoded; the payload is still raw bytes.
#[derive(Debug, Clone)]
pub struct CapturedRequest {
    /// CLOCK_REALTIME nanoseconds since the Unix epoch.
    pub ts_unix_ns: u64,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub ifindex: u32,
    /// Length of the TCP payload on the wire; larger than `data.len()` when truncated.
    pub payload_len: u32,
    pub data: Vec<u8>,
}

impl CapturedRequest {
    /// Decodes a kernel event. `mono_to_unix_ns` converts CLOCK_MONOTONIC to wall time.
    pub fn from_event(ev: &RequestEvent, mono_to_unix_ns: i128) -> Self {
        let ip = |raw: &[u8; 16]| -> IpAddr {
            if ev.family == FAMILY_IPV4 {
                IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
            } else {
                IpAddr::V6(Ipv6Addr::from(*raw))
            }
        };
        let len = (ev.captured_len as usize).min(ev.data.len());
        Self {
            ts_unix_ns: (ev.ts_ns as i128 + mono_to_unix_ns).max(0) as u64,
            client: SocketAddr::new(ip(&ev.saddr), ev.sport),
            server: SocketAddr::new(ip(&ev.daddr), ev.dport),
            ifindex: ev.ifindex,
            payload_len: ev.payload_len,
            data: ev.data[..len].to_vec(),
        }
    }
}

/// The loaded program, attached to one or more interfaces. Dropping it detaches everything.
pub struct Capture {
    ebpf: Ebpf,
    links: Vec<(String, XdpLinkId)>,
}

impl Capture {
    /// Loads the XDP program and attaches it to every interface in `ifaces`.
    pub fn attach(ifaces: &[String]) -> Result<Self, CaptureError> {
        if ifaces.is_empty() {
            return Err(CaptureError::NoInterface { available: available_interfaces() });
        }
        // Check interfaces first: the cheapest error to hit and the most common typo.
        for name in ifaces {
            if !Path::new("/sys/class/net").join(name).exists() {
                return Err(CaptureError::UnknownInterface {
                    name: name.clone(),
                    available: available_interfaces(),
                });
            }
        }
        if XDP_OBJECT.is_empty() {
            return Err(CaptureError::NoProgram);
        }
        if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(CaptureError::NoBtf);
        }
        raise_memlock_rlimit();

        let mut ebpf = Ebpf::load(XDP_OBJECT).map_err(|e| classify(e, "creating BPF maps"))?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| CaptureError::Load(format!("program {PROGRAM} missing from object")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| CaptureError::Load(e.to_string()))?;
        program.load().map_err(|e| classify(e, "loading the XDP program"))?;

        let mut links = Vec::new();
        for iface in ifaces {
            let link = program.attach(iface, XdpMode::default()).map_err(|source| {
                if has_errno(&source, &[libc::EPERM, libc::EACCES]) {
                    CaptureError::Permission { doing: "attaching XDP" }
                } else {
                    CaptureError::Attach { iface: iface.clone(), source }
                }
            })?;
            tracing::info!(iface = %iface, "xdp program attached");
            links.push((iface.clone(), link));
        }
        Ok(Self { ebpf, links })
    }

    /// Takes the ring buffer out of the program, for [`read_events`].
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, CaptureError> {
        let map = self
            .ebpf
            .take_map(EVENTS_MAP)
            .ok_or_else(|| CaptureError::Load(format!("map {EVENTS_MAP} missing")))?;
        RingBuf::try_from(map).map_err(|e| CaptureError::Load(e.to_string()))
    }

    /// Detaches from every interface, logging each.
    pub fn detach(mut self) {
        let Some(program) = self.ebpf.program_mut(PROGRAM) else { return };
        let Ok(program): Result<&mut Xdp, _> = program.try_into() else { return };
        for (iface, link) in self.links.drain(..) {
            match program.detach(link) {
                Ok(()) => tracing::info!(iface = %iface, "xdp program detached"),
                Err(e) => tracing::warn!(iface = %iface, error = %e, "xdp detach failed"),
            }
        }
    }
}

/// Reads the ring buffer until `tx` closes, decoding each event.
///
/// The kernel drops events itself when the ring is full, so this reader never blocks the
/// kernel; when the channel downstream is full, the event is counted in `dropped` rather
/// than stalling the ring.
pub async fn read_events(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<CapturedRequest>,
) -> io::Result<()> {
    let offset = mono_to_unix_offset_ns();
    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged while the AsyncFd
    // owns the RingBuf.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut dropped: u64 = 0;
    loop {
        let mut guard = tokio::select! {
            g = fd.readable_mut() => g?,
            () = tx.closed() => return Ok(()),
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<RequestEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole RequestEvent (checked length); read_unaligned
            // because the ring gives no alignment guarantee we can name in types.
            let ev: RequestEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            match tx.try_send(CapturedRequest::from_event(&ev, offset)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    dropped += 1;
                    if dropped.is_power_of_two() {
                        tracing::warn!(dropped, "pipeline full: captured requests dropped");
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
            }
        }
        guard.clear_ready();
    }
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC, in nanoseconds: converts `bpf_ktime_get_ns` to wall time.
fn mono_to_unix_offset_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: valid clock id and out-pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so loading cannot fail there.
fn raise_memlock_rlimit() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK (fine on Linux 5.11+)");
    }
}

fn available_interfaces() -> String {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    if names.is_empty() { "none found".into() } else { names.join(", ") }
}

/// Does any `io::Error` in `err`'s source chain carry one of `codes`?
fn has_errno(err: &(dyn std::error::Error + 'static), codes: &[i32]) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.raw_os_error().is_some_and(|c| codes.contains(&c))
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Maps load-time errors onto the ones an operator can act on.
fn classify<E: std::error::Error + 'static>(err: E, doing: &'static str) -> CaptureError {
    if has_errno(&err, &[libc::EPERM, libc::EACCES]) {
        return CaptureError::Permission { doing };
    }
    let text = format!("{err}");
    if text.contains(EVENTS_MAP) && has_errno(&err, &[libc::EINVAL]) {
        return CaptureError::NoRingBuf;
    }
    let mut full = text;
    let mut src = err.source();
    while let Some(s) = src {
        full.push_str(": ");
        full.push_str(&s.to_string());
        src = s.source();
    }
    CaptureError::Load(full)
}
