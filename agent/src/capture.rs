//! The kernel side of capture: loads the XDP program, attaches it to interfaces, configures
//! it, reads its counters, and turns its ring buffer into a stream of [`CapturedRequest`]s.
//!
//! This is the only module that loads programs. The block and allow maps it creates are
//! handed to [`crate::enforce`]; everything downstream receives plain values.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use agent_common::{
    BlockEntry, Bucket, CAPTURE_MAX, COUNTER_COUNT, Config, Counter, EVENT_HEADER_LEN,
    EXACT_BUCKETS, EventHeader, ExactSlotV4, ExactSlotV6, FAMILY_IPV4, KERNEL_PORTS, MAX_ALLOW,
    MAX_BLOCKS,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        Program, ProgramError, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions, Xdp,
        XdpMode,
        tc::{self, SchedClassifierLinkId},
        xdp::XdpLinkId,
    },
};
use ipnet::IpNet;
use serde::Serialize;
use thiserror::Error;
use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::{clock, enforce::Enforcer};

/// The XDP object built by agent/build.rs (empty when built with AYA_BUILD_SKIP=1).
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/precedent"));

/// The capturing/blocking program, and the empty one benchmarks compare it with.
pub const PROGRAM: &str = "precedent";
pub const BASELINE_PROGRAM: &str = "baseline";
/// The TC egress program that reports the server's acknowledgements (see [`crate::acked`]).
pub const ACK_PROGRAM: &str = "precedent_acks";
/// An empty TC classifier, the egress program's baseline in benchmarks.
pub const ACK_BASELINE_PROGRAM: &str = "tc_baseline";
const EVENTS_MAP: &str = "EVENTS";
/// Maps that hold operator state and are pinned when pinning is on, so blocks survive restarts.
pub const PINNED_MAPS: [&str; 6] = [
    "BLOCK_EXACT_V4",
    "BLOCK_EXACT_V6",
    "BLOCK_V4",
    "BLOCK_V6",
    "ALLOW_V4",
    "ALLOW_V6",
];

/// Capture set-up failures, each phrased so the operator knows what to do next.
#[derive(Debug, Error)]
pub enum CaptureError {
    #[error(
        "this precedent binary was built with AYA_BUILD_SKIP=1 and has no XDP program; rebuild it without that variable"
    )]
    NoProgram,
    #[error(
        "the kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing); precedent needs Linux 5.8+ built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,
    #[error(
        "permission denied while {doing}; run as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
    )]
    Permission { doing: &'static str },
    #[error("the kernel does not support BPF ring buffers (needs Linux 5.8+)")]
    NoRingBuf,
    #[error("interface {name} not found; available: {available}")]
    UnknownInterface { name: String, available: String },
    #[error("no interface given; pass --iface NAME (available: {available})")]
    NoInterface { available: String },
    #[error("attaching XDP to {iface} in {mode} mode failed: {detail}")]
    Attach {
        iface: String,
        mode: AttachMode,
        detail: String,
    },
    #[error(
        "attaching the acknowledgement watcher (TC egress) to {iface} failed: {detail}; \
         capture.wait_for_acks = false runs without it"
    )]
    AttachEgress { iface: String, detail: String },
    #[error("capture length {0} out of range: must be 1..={CAPTURE_MAX}")]
    CaptureLen(u32),
    #[error("ring buffer size {0} invalid: must be a power of two, at least 64 KiB")]
    RingSize(u32),
    #[error("pin directory {path}: {detail}")]
    PinDir { path: PathBuf, detail: String },
    #[error(
        "pinned map {path} does not have the layout this version uses ({detail}); it was left by an incompatible version: remove it (its entries are lost) and start again"
    )]
    PinnedLayout { path: PathBuf, detail: String },
    #[error("loading the XDP program failed: {0}")]
    Load(String),
    #[error("BPF map {map}: {detail}")]
    Map { map: &'static str, detail: String },
}

/// How the program is attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) XDP where the driver supports it, generic otherwise.
    #[default]
    Auto,
    /// Driver mode only: fail if the driver lacks XDP support.
    Native,
    /// Generic (skb) mode: works on every interface, at a higher cost per packet.
    Generic,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Auto => "auto",
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        })
    }
}

impl std::str::FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            other => Err(format!(
                "unknown attach mode {other:?}: use auto, native or generic"
            )),
        }
    }
}

/// Load-time settings.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Payload bytes captured per request (1..=4096).
    pub capture_len: u32,
    /// Ring buffer size in bytes (power of two).
    pub ring_bytes: u32,
    /// Pin the block and allow maps in this bpffs directory and re-use them on the next start.
    pub pin_dir: Option<PathBuf>,
    /// Capture only requests to these server ports (empty: every port). See
    /// [`Datapath::set_ports`].
    pub ports: Vec<u16>,
    /// Attach the egress program next to the capturing one, so requests count only once the
    /// server acknowledged them ([`crate::acked`]).
    pub watch_acks: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            capture_len: agent_common::CAPTURE_DEFAULT,
            ring_bytes: 4 << 20,
            pin_dir: None,
            ports: Vec::new(),
            watch_acks: true,
        }
    }
}

/// An interface the program is attached to.
#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    pub iface: String,
    /// The interface's index when attached: a re-created interface of the same name has another.
    pub ifindex: u32,
    /// `native` or `generic`: what the kernel accepted.
    pub mode: AttachMode,
}

/// Sums over CPUs of the XDP program's per-CPU counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters([u64; COUNTER_COUNT as usize]);

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Counter::ALL.iter().map(|c| (c.name(), self.0[*c as usize]))
    }

    /// Per-counter difference `self − earlier` (counters only grow while the program is loaded).
    pub fn since(&self, earlier: &Counters) -> Counters {
        let mut d = *self;
        for (v, e) in d.0.iter_mut().zip(earlier.0) {
            *v = v.saturating_sub(e);
        }
        d
    }
}

impl Serialize for Counters {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

/// A captured request start with addresses decoded; the payload is still raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedRequest {
    /// Unix time in nanoseconds.
    pub ts_unix_ns: u64,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// TCP sequence number of the first byte of `data` (see [`agent_common::EventHeader::seq`]).
    pub seq: u32,
    /// Length of the TCP payload on the wire; larger than `data.len()` when truncated.
    pub payload_len: u32,
    /// 0: the segment starts a request; n ≥ 1: the nth segment continuing the request started
    /// on the same connection (see [`crate::reassemble`]); [`agent_common::COPY_PIECE`]: another
    /// copy of bytes captured as such pieces (see [`crate::acked`]).
    pub piece: u8,
    pub data: Vec<u8>,
}

impl CapturedRequest {
    /// Decodes one ring buffer record (header + payload). `mono_to_unix_ns` converts the
    /// kernel's CLOCK_MONOTONIC stamp to wall time. None for a record too short to be one.
    pub fn decode(record: &[u8], mono_to_unix_ns: i128) -> Option<Self> {
        let header = record.get(..EVENT_HEADER_LEN)?;
        // SAFETY: EventHeader is Pod-like (repr(C), any bit pattern valid) and the slice
        // holds exactly its size; read_unaligned because the ring promises no alignment.
        let h: EventHeader = unsafe { std::ptr::read_unaligned(header.as_ptr().cast()) };
        let payload = &record[EVENT_HEADER_LEN..];
        let len = (h.captured_len as usize).min(payload.len());
        let ip = |raw: &[u8; 16]| -> IpAddr {
            if h.family == FAMILY_IPV4 {
                IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
            } else {
                IpAddr::V6(Ipv6Addr::from(*raw))
            }
        };
        Some(Self {
            ts_unix_ns: (h.ts_ns as i128 + mono_to_unix_ns).max(0) as u64,
            client: SocketAddr::new(ip(&h.saddr), h.sport),
            server: SocketAddr::new(ip(&h.daddr), h.dport),
            seq: h.seq,
            payload_len: h.payload_len,
            piece: h.piece,
            data: payload[..len].to_vec(),
        })
    }

    /// An acknowledgement record from the egress program, not a request: `seq` is the
    /// acknowledgement number the server sent (see [`crate::acked`]).
    pub fn is_ack(&self) -> bool {
        self.piece == agent_common::ACK_RECORD
    }

    /// Another copy of bytes captured as pieces of a followed request.
    pub fn is_piece_copy(&self) -> bool {
        self.piece == agent_common::COPY_PIECE
    }

    /// The capture ended before the request did.
    pub fn truncated(&self) -> bool {
        self.payload_len as usize > self.data.len()
    }
}

/// The loaded programs and maps, attached to zero or more interfaces. Dropping it detaches.
pub struct Datapath {
    ebpf: Ebpf,
    /// Each attachment, with the program attached (`PROGRAM`, or the baseline in benchmarks)
    /// and the egress program's link when acknowledgements are watched there.
    attachments: Vec<(
        Attachment,
        &'static str,
        XdpLinkId,
        Option<SchedClassifierLinkId>,
    )>,
    watch_acks: bool,
    /// The block and allow maps are pinned, so they may hold entries from an earlier run.
    pinned: bool,
    /// Blocks read from pinned hash tables of an earlier layout (see [`legacy_exact`]),
    /// written into the current maps when the enforcer is taken.
    legacy: Migration,
}

impl Datapath {
    /// Loads the XDP object and configures it; attaches nothing yet.
    pub fn load(opts: &LoadOptions) -> Result<Self, CaptureError> {
        if XDP_OBJECT.is_empty() {
            return Err(CaptureError::NoProgram);
        }
        if !(1..=CAPTURE_MAX as u32).contains(&opts.capture_len) {
            return Err(CaptureError::CaptureLen(opts.capture_len));
        }
        if !opts.ring_bytes.is_power_of_two() || opts.ring_bytes < 64 * 1024 {
            return Err(CaptureError::RingSize(opts.ring_bytes));
        }
        if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(CaptureError::NoBtf);
        }
        raise_memlock_rlimit();

        let mut legacy = Migration::default();
        if let Some(dir) = &opts.pin_dir {
            prepare_pin_dir(dir)?;
            legacy = check_pins(dir)?;
        }
        match Self::load_object(opts) {
            Ok(mut dp) => {
                dp.legacy = legacy;
                Ok(dp)
            }
            Err(e) => {
                // The tables of the earlier layout go back where they were: the next start
                // (or the earlier version, if the operator goes back to it) finds them.
                legacy.undo();
                Err(e)
            }
        }
    }

    /// [`Datapath::load`] once the pinned maps are checked: creates (or reuses) the maps,
    /// loads and configures the programs.
    fn load_object(opts: &LoadOptions) -> Result<Self, CaptureError> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(EVENTS_MAP, opts.ring_bytes);
        let pin_paths: Vec<(&'static str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => PINNED_MAPS.iter().map(|m| (*m, dir.join(m))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(XDP_OBJECT)
            .map_err(|e| classify(e, "creating BPF maps"))?;
        for name in [PROGRAM, BASELINE_PROGRAM] {
            program(&mut ebpf, name)?
                .load()
                .map_err(|e| classify(e, "loading the XDP program"))?;
        }
        if opts.watch_acks {
            for name in [ACK_PROGRAM, ACK_BASELINE_PROGRAM] {
                egress_program(&mut ebpf, name)?
                    .load()
                    .map_err(|e| classify(e, "loading the TC egress program"))?;
            }
        }
        let mut dp = Self {
            ebpf,
            attachments: Vec::new(),
            watch_acks: opts.watch_acks,
            pinned: opts.pin_dir.is_some(),
            legacy: Migration::default(),
        };
        dp.set_capture_len(opts.capture_len)?;
        dp.set_ports(&opts.ports)?;
        Ok(dp)
    }

    /// Attaches the capturing program to `iface`. `Auto` tries native XDP first and falls
    /// back to generic when the driver refuses.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachMode, CaptureError> {
        self.attach_program(PROGRAM, iface, mode)
    }

    /// Attaches the empty baseline program instead: benchmarks use it to tell the cost of
    /// having any XDP program on an interface from the cost of this one.
    pub fn attach_baseline(
        &mut self,
        iface: &str,
        mode: AttachMode,
    ) -> Result<AttachMode, CaptureError> {
        self.attach_program(BASELINE_PROGRAM, iface, mode)
    }

    fn attach_program(
        &mut self,
        name: &'static str,
        iface: &str,
        mode: AttachMode,
    ) -> Result<AttachMode, CaptureError> {
        if !Path::new("/sys/class/net").join(iface).exists() {
            return Err(CaptureError::UnknownInterface {
                name: iface.to_string(),
                available: available_interfaces(),
            });
        }
        let ifindex = crate::ifwatch::if_index(iface).unwrap_or(0);
        // The egress program first: an interface where it cannot run gets neither, rather
        // than requests that would wait for acknowledgements never reported.
        let egress = if self.watch_acks && name == PROGRAM {
            Some(self.attach_egress(iface)?)
        } else {
            None
        };
        let prog = program(&mut self.ebpf, name)?;
        let try_mode = |prog: &mut Xdp, m: AttachMode| {
            let flags = if m == AttachMode::Generic {
                XdpMode::Skb
            } else {
                XdpMode::Driver
            };
            prog.attach(iface, flags).map_err(|e| {
                if has_errno(&e, &[libc::EPERM, libc::EACCES]) {
                    CaptureError::Permission {
                        doing: "attaching XDP",
                    }
                } else {
                    CaptureError::Attach {
                        iface: iface.to_string(),
                        mode: m,
                        detail: chain(&e),
                    }
                }
            })
        };
        let attached = match mode {
            AttachMode::Auto => match try_mode(prog, AttachMode::Native) {
                Ok(l) => Ok((l, AttachMode::Native)),
                Err(CaptureError::Attach { detail, .. }) => {
                    tracing::info!(iface, reason = %detail, "native XDP refused; using generic mode");
                    try_mode(prog, AttachMode::Generic).map(|l| (l, AttachMode::Generic))
                }
                Err(e) => Err(e),
            },
            m => try_mode(prog, m).map(|l| (l, m)),
        };
        let (link, used) = match attached {
            Ok(a) => a,
            Err(e) => {
                if let Some(link) = egress {
                    self.detach_egress(iface, link);
                }
                return Err(e);
            }
        };
        tracing::info!(iface, mode = %used, program = name, "xdp program attached");
        self.attachments.push((
            Attachment {
                iface: iface.to_string(),
                ifindex,
                mode: used,
            },
            name,
            link,
            egress,
        ));
        Ok(used)
    }

    /// Attaches the acknowledgement watcher to `iface`'s egress (a `clsact` qdisc is added
    /// first where the kernel attaches through netlink; one already there is fine).
    fn attach_egress(&mut self, iface: &str) -> Result<SchedClassifierLinkId, CaptureError> {
        let failed = |detail: String| CaptureError::AttachEgress {
            iface: iface.to_string(),
            detail,
        };
        if let Err(e) = tc::qdisc_add_clsact(iface)
            && !has_errno(&e, &[libc::EEXIST])
        {
            // Kernels with TCX (6.6+) need no qdisc; the attach below says if one was needed.
            tracing::debug!(iface, error = %chain(&e), "adding the clsact qdisc");
        }
        let link = egress_program(&mut self.ebpf, ACK_PROGRAM)?
            .attach(iface, TcAttachType::Egress)
            .map_err(|e| failed(chain(&e)))?;
        tracing::info!(iface, "acknowledgement watcher attached (tc egress)");
        Ok(link)
    }

    fn detach_egress(&mut self, iface: &str, link: SchedClassifierLinkId) {
        if let Ok(prog) = egress_program(&mut self.ebpf, ACK_PROGRAM)
            && let Err(e) = prog.detach(link)
        {
            tracing::debug!(iface, error = %e, "releasing the tc egress attachment");
        }
    }

    /// Whether requests wait for the server's acknowledgements (the egress program is loaded
    /// and attached next to the capturing one).
    pub fn watches_acks(&self) -> bool {
        self.watch_acks
    }

    pub fn attachments(&self) -> Vec<Attachment> {
        self.attachments.iter().map(|(a, ..)| a.clone()).collect()
    }

    /// Kernel id of the capturing program, to recognise it among an interface's XDP programs.
    pub fn program_id(&mut self) -> Result<u32, CaptureError> {
        let info = program(&mut self.ebpf, PROGRAM)?
            .info()
            .map_err(|e| CaptureError::Load(chain(&e)))?;
        Ok(info.id())
    }

    /// Instructions the kernel's verifier walked to accept the capturing program (None on
    /// kernels before 5.16, which do not say). Its budget is 1,000,000: the empty-line scan
    /// and the following make this the number to watch when the program grows.
    pub fn verified_instructions(&mut self) -> Result<Option<u32>, CaptureError> {
        let info = program(&mut self.ebpf, PROGRAM)?
            .info()
            .map_err(|e| CaptureError::Load(chain(&e)))?;
        Ok(info.verified_instruction_count())
    }

    /// Forgets the attachment to `iface` (after the interface vanished or lost the program),
    /// releasing its link. Errors are expected here (the interface may be gone) and only logged.
    pub fn detach(&mut self, iface: &str) {
        let Some(i) = self.attachments.iter().position(|(a, ..)| a.iface == iface) else {
            return;
        };
        let (_, name, link, egress) = self.attachments.remove(i);
        if let Ok(prog) = program(&mut self.ebpf, name)
            && let Err(e) = prog.detach(link)
        {
            tracing::debug!(iface, error = %e, "releasing a stale xdp attachment");
        }
        if let Some(link) = egress {
            self.detach_egress(iface, link);
        }
    }

    /// Detaches from every interface, logging each.
    pub fn detach_all(&mut self) {
        for (a, name, link, egress) in std::mem::take(&mut self.attachments) {
            let detached = program(&mut self.ebpf, name)
                .and_then(|p| p.detach(link).map_err(|e| CaptureError::Load(chain(&e))));
            match detached {
                Ok(()) => tracing::info!(iface = %a.iface, "xdp program detached"),
                Err(e) => tracing::warn!(iface = %a.iface, error = %e, "xdp detach failed"),
            }
            if let Some(link) = egress {
                self.detach_egress(&a.iface, link);
            }
        }
    }

    /// Changes how many payload bytes each captured request carries; takes effect at once.
    pub fn set_capture_len(&mut self, len: u32) -> Result<(), CaptureError> {
        if !(1..=CAPTURE_MAX as u32).contains(&len) {
            return Err(CaptureError::CaptureLen(len));
        }
        self.update_config(|c| c.capture_len = len)
    }

    /// Captures only requests to these server ports from now on (empty: every port); the
    /// others are counted as `other_port`. The program compares at most [`KERNEL_PORTS`]; with
    /// more, it captures every port and the caller filters (the daemon always does).
    pub fn set_ports(&mut self, ports: &[u16]) -> Result<(), CaptureError> {
        self.update_config(|c| {
            c.ports = [0; KERNEL_PORTS];
            if ports.len() > KERNEL_PORTS {
                c.port_count = 0;
                return;
            }
            for (slot, port) in c.ports.iter_mut().zip(ports) {
                *slot = port.to_be();
            }
            c.port_count = ports.len() as u32;
        })
    }

    /// Whether IP fragments of TCP segments pass (true) or are dropped (false, as loaded).
    /// No request can be read from a fragment, so a client that fragments its requests
    /// would have them served unread; TCP stacks do not fragment (they send segments that
    /// fit the path with DF set), so dropping costs only such evasions and broken paths.
    pub fn set_pass_fragments(&mut self, pass: bool) -> Result<(), CaptureError> {
        self.update_config(|c| c.pass_fragments = u32::from(pass))
    }

    /// Reads, changes and writes back the program's `CONFIG` entry. A packet racing the write
    /// may see a mix of old and new fields; each field alone is valid either way.
    fn update_config(&mut self, change: impl FnOnce(&mut Config)) -> Result<(), CaptureError> {
        let map = self.ebpf.map_mut("CONFIG").ok_or(missing("CONFIG"))?;
        let mut config: Array<&mut MapData, Config> =
            Array::try_from(map).map_err(map_err("CONFIG"))?;
        let mut value = config.get(&0, 0).map_err(map_err("CONFIG"))?;
        change(&mut value);
        config.set(0, value, 0).map_err(map_err("CONFIG"))
    }

    /// The kernel counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, CaptureError> {
        let map = self.ebpf.map("COUNTERS").ok_or(missing("COUNTERS"))?;
        let per_cpu: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_err("COUNTERS"))?;
        let mut out = Counters::default();
        for (i, slot) in out.0.iter_mut().enumerate() {
            let values = per_cpu.get(&(i as u32), 0).map_err(map_err("COUNTERS"))?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// Takes the ring buffer out, for [`read_events`] (or a test draining it directly).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, CaptureError> {
        let map = self.ebpf.take_map(EVENTS_MAP).ok_or(missing(EVENTS_MAP))?;
        RingBuf::try_from(map).map_err(map_err(EVENTS_MAP))
    }

    /// Takes the block and allow maps out, for the enforcement side.
    pub fn take_enforcer(&mut self) -> Result<Enforcer, CaptureError> {
        let mut enforcer = Enforcer::from_ebpf(&mut self.ebpf, self.pinned)?;
        let legacy = std::mem::take(&mut self.legacy);
        for (addr, entry) in legacy.blocks {
            // On failure the table of the earlier layout stays pinned aside, and the next
            // start moves its blocks again.
            enforcer
                .restore(IpNet::from(addr), entry)
                .map_err(|e| CaptureError::Map {
                    map: "BLOCK_EXACT",
                    detail: format!("moving the block of {addr} from the earlier layout: {e}"),
                })?;
        }
        // Every block is in the current tables: only now is the earlier table let go.
        for (_, aside, _) in legacy.tables {
            match std::fs::remove_file(&aside) {
                Ok(()) => {
                    tracing::info!(path = %aside.display(), "blocks moved; pinned table of the earlier layout removed")
                }
                // Left in place, its blocks would come back at the next start, also those
                // unblocked since: say so.
                Err(e) => {
                    tracing::warn!(path = %aside.display(), error = %e, "blocks moved, but the pinned table of the earlier layout could not be removed; remove it by hand")
                }
            }
        }
        Ok(enforcer)
    }

    /// Runs program `name` (XDP, or a TC egress one) once per repeat on `packet` through
    /// BPF_PROG_TEST_RUN; returns the verdict and the kernel's average run time. For unit tests
    /// and benchmarks.
    pub fn test_run(
        &mut self,
        name: &str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration), CaptureError> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.repeat = repeat.max(1);
        let r = match self.ebpf.program_mut(name) {
            Some(Program::Xdp(p)) => p.test_run(opts),
            Some(Program::SchedClassifier(p)) => p.test_run(opts),
            _ => {
                return Err(CaptureError::Load(format!(
                    "no XDP or TC program {name} in the object"
                )));
            }
        }
        .map_err(|e| CaptureError::Load(chain(&e)))?;
        Ok((r.return_value, r.duration))
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// How often the reader also drains the ring without being woken: a safety net, since the
/// kernel's wakeups (see [`RING_LINGER`]) normally deliver within a millisecond.
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// The XDP program wakes the reader at most once per this interval per CPU (under load, one
/// wakeup per request cost a quarter of the throughput). So after every drain that found
/// records, the reader drains again this long later, until a drain finds nothing: a record
/// submitted without a wakeup is read at most about this late.
pub const RING_LINGER: Duration = Duration::from_nanos(agent_common::RING_WAKEUP_EVERY_NS);

/// Reads the ring buffer until `tx` closes, decoding each record.
///
/// The reader never waits for downstream: when the channel is full the request is counted
/// in `overflow` and dropped, so the ring keeps draining (a full ring would lose requests in
/// the kernel instead, counted there as `ringbuf_full`).
pub async fn read_events(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<CapturedRequest>,
    overflow: std::sync::Arc<std::sync::atomic::AtomicU64>,
    timeline: clock::Timeline,
) -> io::Result<()> {
    let offset = timeline.offset_ns();
    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged while the AsyncFd
    // owns the RingBuf.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut drained = tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                let n = drain(guard.get_inner_mut(), &tx, &overflow, offset);
                guard.clear_ready();
                n
            }
            _ = tick.tick() => drain(fd.get_mut(), &tx, &overflow, offset),
            () = tx.closed() => return Ok(()),
        };
        // Records may have come in without a wakeup: look again until the ring stays empty.
        loop {
            match drained {
                None => return Ok(()),
                Some(0) => break,
                Some(_) => {}
            }
            tokio::select! {
                () = tokio::time::sleep(RING_LINGER) => {}
                () = tx.closed() => return Ok(()),
            }
            drained = drain(fd.get_mut(), &tx, &overflow, offset);
        }
    }
}

/// Hands every record in the ring downstream and says how many there were; None once the
/// receiver is gone.
fn drain(
    ring: &mut RingBuf<MapData>,
    tx: &mpsc::Sender<CapturedRequest>,
    overflow: &std::sync::atomic::AtomicU64,
    offset: i128,
) -> Option<usize> {
    let mut n = 0;
    while let Some(item) = ring.next() {
        n += 1;
        let Some(req) = CapturedRequest::decode(&item, offset) else {
            continue;
        };
        drop(item);
        match tx.try_send(req) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                let n = overflow.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "engine behind: captured requests dropped");
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return None,
        }
    }
    Some(n)
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp, CaptureError> {
    ebpf.program_mut(name)
        .ok_or_else(|| CaptureError::Load(format!("program {name} missing from object")))?
        .try_into()
        .map_err(|e: ProgramError| CaptureError::Load(e.to_string()))
}

fn egress_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut SchedClassifier, CaptureError> {
    ebpf.program_mut(name)
        .ok_or_else(|| CaptureError::Load(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e: ProgramError| CaptureError::Load(chain(&e)))
}

fn missing(map: &'static str) -> CaptureError {
    CaptureError::Map {
        map,
        detail: "missing from the object".into(),
    }
}

fn map_err<E: std::error::Error + 'static>(map: &'static str) -> impl Fn(E) -> CaptureError {
    move |e| CaptureError::Map {
        map,
        detail: chain(&e),
    }
}

/// The layout each pinned map must have: (key size, value size, entries).
fn pinned_layout(name: &str) -> (u32, u32, u32) {
    use std::mem::size_of;
    // LPM trie keys are a 4-byte prefix length followed by the address.
    match name {
        "BLOCK_EXACT_V4" => (4, size_of::<Bucket<ExactSlotV4>>() as u32, EXACT_BUCKETS),
        "BLOCK_EXACT_V6" => (4, size_of::<Bucket<ExactSlotV6>>() as u32, EXACT_BUCKETS),
        "BLOCK_V4" => (8, size_of::<BlockEntry>() as u32, MAX_BLOCKS),
        "BLOCK_V6" => (20, size_of::<BlockEntry>() as u32, MAX_BLOCKS),
        "ALLOW_V4" => (8, 1, MAX_ALLOW),
        "ALLOW_V6" => (20, 1, MAX_ALLOW),
        other => unreachable!("{other} is not a pinned map"),
    }
}

/// Blocks being moved out of pinned hash tables of the earlier layout. Such a table is not
/// unpinned when its blocks are read: it is renamed aside (see [`aside_path`]) and removed only
/// once its blocks are in the current tables ([`Datapath::take_enforcer`]). A start that fails
/// before that renames it back; a crash leaves it aside, and the next start reads it from there.
#[derive(Debug, Default)]
struct Migration {
    blocks: Vec<(IpAddr, BlockEntry)>,
    /// (pin path, aside path, renamed by this start) of each table being moved.
    tables: Vec<(PathBuf, PathBuf, bool)>,
}

impl Migration {
    /// Puts back the tables this start renamed aside, removing the empty table of the current
    /// layout a failed load may have pinned in their place. Failures are logged: the table
    /// is then still aside, where the next start looks.
    fn undo(self) {
        for (path, aside, renamed) in self.tables {
            if !renamed {
                continue;
            }
            if path.exists()
                && let Err(e) = std::fs::remove_file(&path)
            {
                tracing::warn!(path = %path.display(), error = %e, "removing the table this failed start pinned");
                continue;
            }
            match std::fs::rename(&aside, &path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "start failed; pinned table of the earlier layout put back")
                }
                Err(e) => {
                    tracing::warn!(path = %aside.display(), error = %e, "start failed; the pinned table of the earlier layout stays aside")
                }
            }
        }
    }
}

/// Where a pinned table of the earlier layout waits while its blocks are moved. bpffs refuses
/// names with dots, hence the dash.
fn aside_path(pin: &Path) -> PathBuf {
    let mut name = pin.file_name().unwrap_or_default().to_os_string();
    name.push("-earlier-layout");
    pin.with_file_name(name)
}

/// Checks the maps an earlier run pinned under `dir` before they are reused: a map of another
/// layout would fail the program's load with a verifier message no operator can act on. The
/// hash tables of the earlier layout (one slot per map entry, single addresses only) are read
/// out and renamed aside (see [`Migration`]); their blocks come back, with their expiry, in
/// the new tables.
fn check_pins(dir: &Path) -> Result<Migration, CaptureError> {
    let mut migration = Migration::default();
    match check_pins_into(dir, &mut migration) {
        Ok(()) => Ok(migration),
        Err(e) => {
            migration.undo();
            Err(e)
        }
    }
}

fn check_pins_into(dir: &Path, migration: &mut Migration) -> Result<(), CaptureError> {
    use agent_common::{LEGACY_EXACT_SLOT_V4_SIZE, LEGACY_EXACT_SLOT_V6_SIZE, LEGACY_EXACT_SLOTS};
    for name in PINNED_MAPS {
        let path = dir.join(name);
        let earlier = match name {
            "BLOCK_EXACT_V4" => Some((4, LEGACY_EXACT_SLOT_V4_SIZE as u32, LEGACY_EXACT_SLOTS)),
            "BLOCK_EXACT_V6" => Some((4, LEGACY_EXACT_SLOT_V6_SIZE as u32, LEGACY_EXACT_SLOTS)),
            _ => None,
        };
        let layout = |p: &Path| -> Result<(u32, u32, u32), CaptureError> {
            let info = aya::maps::MapInfo::from_pin(p).map_err(|e| CaptureError::PinnedLayout {
                path: p.to_path_buf(),
                detail: chain(&e),
            })?;
            Ok((info.key_size(), info.value_size(), info.max_entries()))
        };
        let want = pinned_layout(name);
        let v6 = name == "BLOCK_EXACT_V6";
        // A table left aside by a start that did not finish moving its blocks.
        let aside = aside_path(&path);
        let mut pending = false;
        if let Some(earlier) = earlier
            && aside.exists()
        {
            let err = |detail: String| CaptureError::PinnedLayout {
                path: aside.clone(),
                detail,
            };
            let found = layout(&aside)?;
            if found != earlier {
                return Err(err(format!(
                    "left aside while moving blocks, but of layout {found:?}, not the earlier {earlier:?}"
                )));
            }
            let blocks = legacy_exact(&aside, v6).map_err(err)?;
            tracing::info!(path = %aside.display(), blocks = blocks.len(), "moving blocks from a pinned table of the earlier layout left aside by an unfinished start");
            migration.blocks.extend(blocks);
            migration.tables.push((path.clone(), aside.clone(), false));
            pending = true;
        }
        if !path.exists() {
            continue;
        }
        let err = |detail: String| CaptureError::PinnedLayout {
            path: path.clone(),
            detail,
        };
        let found = layout(&path)?;
        if found == want {
            continue;
        }
        if Some(found) != earlier {
            return Err(err(format!(
                "key/value sizes and entries {found:?}, expected {want:?}"
            )));
        }
        if pending {
            return Err(err(format!(
                "of the earlier layout, and so is {}: keep the one holding the blocks",
                aside.display()
            )));
        }
        let blocks = legacy_exact(&path, v6).map_err(err)?;
        std::fs::rename(&path, &aside)
            .map_err(|e| err(format!("renaming to {}: {e}", aside.display())))?;
        tracing::info!(path = %path.display(), blocks = blocks.len(), "moving blocks from a pinned table of the earlier layout");
        migration.blocks.extend(blocks);
        migration.tables.push((path.clone(), aside, true));
    }
    Ok(())
}

/// The live blocks of a pinned hash table of the earlier layout: one slot per entry, the
/// address's network-order bytes (IPv4: 4 and 4 of padding; IPv6: 16) then a [`BlockEntry`].
fn legacy_exact(path: &Path, v6: bool) -> Result<Vec<(IpAddr, BlockEntry)>, String> {
    let data = aya::maps::MapData::from_pin(path).map_err(|e| chain(&e))?;
    let map = aya::maps::Map::Array(data);
    // Both layouts are read as raw bytes: the structs they were are gone.
    let slots: Vec<Vec<u8>> = if v6 {
        let t: Array<MapData, [u8; 32]> = Array::try_from(map).map_err(|e| chain(&e))?;
        t.iter()
            .map(|s| s.map(|s| s.to_vec()))
            .collect::<Result<_, _>>()
    } else {
        let t: Array<MapData, [u8; 24]> = Array::try_from(map).map_err(|e| chain(&e))?;
        t.iter()
            .map(|s| s.map(|s| s.to_vec()))
            .collect::<Result<_, _>>()
    }
    .map_err(|e| chain(&e))?;
    let mut out = Vec::new();
    for slot in slots {
        let entry_at = slot.len() - 16;
        let word = |i: usize| u64::from_ne_bytes(slot[i..i + 8].try_into().expect("8 bytes"));
        let entry = BlockEntry {
            expires_ns: word(entry_at),
            dropped: word(entry_at + 8),
        };
        if entry.expires_ns == 0 {
            continue;
        }
        let addr: IpAddr = if v6 {
            <[u8; 16]>::try_from(&slot[..16]).expect("16 bytes").into()
        } else {
            <[u8; 4]>::try_from(&slot[..4]).expect("4 bytes").into()
        };
        out.push((addr, entry));
    }
    Ok(out)
}

/// The pin directory must be on a BPF filesystem; create it if needed. Like bpftool, mount
/// bpffs at /sys/fs/bpf when the directory lives there and nothing is mounted yet (systemd
/// normally does it; minimal systems and containers often don't).
fn prepare_pin_dir(dir: &Path) -> Result<(), CaptureError> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    const BPFFS_ROOT: &str = "/sys/fs/bpf";
    let err = |detail: String| CaptureError::PinDir {
        path: dir.to_path_buf(),
        detail,
    };
    let on_bpffs = |p: &Path| -> Result<bool, String> {
        let c =
            std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and out-pointer.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error().to_string());
        }
        Ok(st.f_type as i64 == BPF_FS_MAGIC)
    };
    if dir.starts_with(BPFFS_ROOT) && !on_bpffs(Path::new(BPFFS_ROOT)).map_err(err)? {
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: constant, NUL-terminated arguments.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                c"mode=0700".as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(err(format!(
                "mounting bpffs on {BPFFS_ROOT}: {}",
                io::Error::last_os_error()
            )));
        }
        tracing::info!(path = BPFFS_ROOT, "mounted bpffs for pinned maps");
    }
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    if !on_bpffs(dir).map_err(err)? {
        return Err(err(
            "not on a BPF filesystem (mount -t bpf bpf /sys/fs/bpf)".into(),
        ));
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so loading cannot fail there.
fn raise_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK (fine on Linux 5.11+)");
    }
}

pub fn available_interfaces() -> String {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "none found".into()
    } else {
        names.join(", ")
    }
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

/// An error and all its sources on one line.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

/// Maps load-time errors onto the ones an operator can act on.
fn classify<E: std::error::Error + 'static>(err: E, doing: &'static str) -> CaptureError {
    // The verifier also answers EACCES (for a rejected program), so EACCES only means missing
    // privileges when we are not root.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if has_errno(&err, &[libc::EPERM]) || (!root && has_errno(&err, &[libc::EACCES])) {
        return CaptureError::Permission { doing };
    }
    let text = chain(&err);
    if text.contains(EVENTS_MAP) && has_errno(&err, &[libc::EINVAL]) {
        return CaptureError::NoRingBuf;
    }
    CaptureError::Load(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(h: EventHeader, payload: &[u8]) -> Vec<u8> {
        // SAFETY: EventHeader is repr(C) plain data.
        let bytes = unsafe {
            std::slice::from_raw_parts((&h as *const EventHeader).cast::<u8>(), EVENT_HEADER_LEN)
        };
        let mut v = bytes.to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_ipv4_event_and_converts_clock() {
        let mut h = EventHeader {
            ts_ns: 1_000,
            sport: 40000,
            dport: 80,
            family: 4,
            ..Default::default()
        };
        h.saddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        h.daddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        h.payload_len = 700;
        h.captured_len = 5;
        let r = CapturedRequest::decode(&record(h, b"GET /"), 5_000).unwrap();
        assert_eq!(r.client, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(r.server, "10.0.0.1:80".parse().unwrap());
        assert_eq!(r.ts_unix_ns, 6_000);
        assert_eq!(r.data, b"GET /");
        assert!(r.truncated());
    }

    #[test]
    fn decodes_ipv6_event() {
        let mut h = EventHeader {
            family: 6,
            sport: 1,
            dport: 443,
            ..Default::default()
        };
        h.saddr = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
        h.captured_len = 3;
        h.payload_len = 3;
        let r = CapturedRequest::decode(&record(h, b"GET"), 0).unwrap();
        assert_eq!(r.client, "[fd00::2]:1".parse().unwrap());
        assert!(!r.truncated());
    }

    #[test]
    fn short_or_lying_records_are_safe() {
        assert!(CapturedRequest::decode(&[0u8; 10], 0).is_none());
        // captured_len claims more than the record holds: clamp, don't panic.
        let h = EventHeader {
            family: 4,
            captured_len: 4000,
            payload_len: 4000,
            ..Default::default()
        };
        assert_eq!(
            CapturedRequest::decode(&record(h, b"GET /x"), 0)
                .unwrap()
                .data,
            b"GET /x"
        );
    }

    #[test]
    fn attach_mode_parses_and_rejects() {
        assert_eq!(
            "generic".parse::<AttachMode>().unwrap(),
            AttachMode::Generic
        );
        assert!(
            "turbo"
                .parse::<AttachMode>()
                .unwrap_err()
                .contains("auto, native or generic")
        );
    }
}
