//! Types shared by the XDP program (`agent-ebpf`) and the userspace agent.
//!
//! Every struct here crosses the kernel/user boundary byte for byte, so each is `#[repr(C)]`
//! with explicit padding and a size checked at compile time.
#![no_std]

/// Largest request prefix an event can carry (request line plus the first headers).
pub const CAPTURE_MAX: usize = 4096;
/// Capture length used when userspace has not configured one.
pub const CAPTURE_DEFAULT: u32 = 512;

/// The XDP program wakes the ring buffer's reader at most once per this interval per CPU.
/// A wakeup is an interrupt and a context switch; at one per request (the kernel's adaptive
/// policy wakes a reader that has caught up, which a fast reader always has) it cost a quarter
/// of the HTTP throughput in `cargo xtask bench-e2e`. Records submitted without a wakeup are
/// found by the reader's contract: after every drain that found records, it drains again at
/// least this long later, until a drain finds nothing. So a record waits at most about this
/// long, and the first request after a quiet spell still wakes the reader at once.
pub const RING_WAKEUP_EVERY_NS: u64 = 1_000_000;

/// Address family tags used in [`EventHeader::family`].
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// Fixed part of a ring buffer event; `captured_len` payload bytes follow it directly.
/// The record may be longer than header + `captured_len` (sizes come in a few fixed buckets);
/// bytes past `captured_len` are meaningless.
///
/// Addresses are stored in 16 bytes; an IPv4 address occupies the first 4 (network order).
/// Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds at capture.
    pub ts_ns: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// Interface the packet arrived on.
    pub ifindex: u32,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    pub _pad: [u8; 3],
    /// TCP payload length of the packet as it was on the wire (may exceed `captured_len`).
    pub payload_len: u32,
    /// How many payload bytes follow the header.
    pub captured_len: u32,
    pub _pad2: u32,
}

pub const EVENT_HEADER_LEN: usize = core::mem::size_of::<EventHeader>();
const _: () = assert!(EVENT_HEADER_LEN == 64);

/// Runtime settings for the XDP program: entry 0 of the `CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Bytes of payload to capture per request; 0 means [`CAPTURE_DEFAULT`]; capped at
    /// [`CAPTURE_MAX`].
    pub capture_len: u32,
    pub _pad: u32,
}

/// Bits of the `ENFORCE_FLAGS` array map (entry 0): which block/allow maps hold entries.
/// The XDP program skips lookups in empty maps, which keeps the common path cheap; the
/// userspace enforcer keeps these bits in step with the maps.
///
/// `FLAG_BLOCK_*`: the prefix tries (`BLOCK_V4`, `BLOCK_V6`) hold entries.
pub const FLAG_BLOCK_V4: u32 = 1 << 0;
pub const FLAG_BLOCK_V6: u32 = 1 << 1;
pub const FLAG_ALLOW_V4: u32 = 1 << 2;
pub const FLAG_ALLOW_V6: u32 = 1 << 3;
/// The exact-address tables (`BLOCK_EXACT_V4`, `BLOCK_EXACT_V6`) hold entries.
pub const FLAG_EXACT_V4: u32 = 1 << 4;
pub const FLAG_EXACT_V6: u32 = 1 << 5;

/// A block: the value of the LPM tries keyed by source prefix, and part of each slot of the
/// exact-address tables.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockEntry {
    /// CLOCK_MONOTONIC nanoseconds after which the block no longer applies. The kernel side
    /// compares against its own (coarse, ~4 ms resolution) clock, so a block ends on time even
    /// if userspace is gone.
    pub expires_ns: u64,
    /// Packets dropped because of this entry (updated atomically by the XDP program).
    pub dropped: u64,
}

/// Blocks of single addresses (/32, /128: the daemon's own blocks) live in the exact-address
/// tables: array maps used as hash tables with buckets of [`EXACT_WAYS`] consecutive slots,
/// the bucket chosen by [`exact_bucket_v4`] / [`exact_bucket_v6`]. Array lookups are inlined
/// into the program by the verifier, so a lookup costs a few instructions per slot, where a
/// BPF hash map or LPM trie lookup is a call into the kernel (measured here: ~22-34 ns for a
/// hash map, ~16 ns for a trie, against ~0 for an array; see `cargo xtask bench-xdp`).
/// Userspace places entries; an address whose bucket is full goes to the LPM trie instead,
/// which matches it just as well (only more slowly).
pub const EXACT_BUCKET_BITS: u32 = 14;
pub const EXACT_WAYS: u32 = 4;
/// Slots per exact-address table.
pub const EXACT_SLOTS: u32 = (1 << EXACT_BUCKET_BITS) * EXACT_WAYS;

/// A slot of `BLOCK_EXACT_V4`. Empty while `entry.expires_ns` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExactSlotV4 {
    /// The address as its 4 network-order bytes read as a native integer (`u32::from_ne_bytes`).
    pub addr: u32,
    pub _pad: u32,
    pub entry: BlockEntry,
}

/// A slot of `BLOCK_EXACT_V6`. Empty while `entry.expires_ns` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExactSlotV6 {
    /// The address's 16 network-order bytes as two native integers (`u64::from_ne_bytes`).
    pub addr: [u64; 2],
    pub entry: BlockEntry,
}

const _: () = assert!(core::mem::size_of::<ExactSlotV4>() == 24);
const _: () = assert!(core::mem::size_of::<ExactSlotV6>() == 32);

/// The bucket of an IPv4 address (multiplicative hashing: one multiply, one shift). The kernel
/// and userspace both call this, so they always agree.
#[inline(always)]
pub const fn exact_bucket_v4(addr: u32) -> u32 {
    addr.wrapping_mul(0x9E37_79B1) >> (32 - EXACT_BUCKET_BITS)
}

/// The bucket of an IPv6 address (both halves folded, then multiplicative hashing).
#[inline(always)]
pub const fn exact_bucket_v6(addr: [u64; 2]) -> u32 {
    let folded = addr[0] ^ addr[1].rotate_left(29);
    (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - EXACT_BUCKET_BITS)) as u32
}

/// Per-CPU cache of the coarse clock (`CLOCK` map): the coarse clock only moves once per tick,
/// so the program re-reads it (a kernel call) only when `jiffies` (inlined, free) has moved.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockCache {
    pub jiffies: u64,
    pub coarse_ns: u64,
}

/// Indexes into the per-CPU `COUNTERS` array: one slot per outcome.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets given XDP_PASS.
    Passed = 0,
    /// Packets dropped because their source is blocked.
    Blocked,
    /// Requests sent to the ring buffer.
    Captured,
    /// Captured requests whose payload was longer than the capture length.
    Truncated,
    /// Requests lost because the ring buffer was full.
    RingbufFull,
    /// Packets from a blocked prefix that the allowlist let through.
    Allowlisted,
    /// Packets whose source matched a block that had already expired.
    BlockExpired,
    /// HTTP/2 connection prefaces seen (counted, not captured).
    Http2Preface,
    /// Requests whose bytes lay outside what the program can read (non-linear buffers).
    NonlinearSkipped,
    /// Packets whose headers were inconsistent or truncated.
    ParseGaveUp,
    /// IPv6 packets with extension headers (passed without capture).
    Ipv6ExtHeader,
}

pub const COUNTER_COUNT: u32 = 11;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Passed,
        Counter::Blocked,
        Counter::Captured,
        Counter::Truncated,
        Counter::RingbufFull,
        Counter::Allowlisted,
        Counter::BlockExpired,
        Counter::Http2Preface,
        Counter::NonlinearSkipped,
        Counter::ParseGaveUp,
        Counter::Ipv6ExtHeader,
    ];

    /// Stable snake_case name, used in logs, `status` and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Passed => "passed",
            Counter::Blocked => "blocked",
            Counter::Captured => "captured",
            Counter::Truncated => "truncated",
            Counter::RingbufFull => "ringbuf_full",
            Counter::Allowlisted => "allowlisted",
            Counter::BlockExpired => "block_expired",
            Counter::Http2Preface => "http2_preface",
            Counter::NonlinearSkipped => "nonlinear_skipped",
            Counter::ParseGaveUp => "parse_gave_up",
            Counter::Ipv6ExtHeader => "ipv6_ext_header",
        }
    }
}

/// Maximum entries per block trie and allow trie (each of IPv4 and IPv6); the exact-address
/// tables hold [`EXACT_SLOTS`] each.
pub const MAX_BLOCKS: u32 = 65_536;
pub const MAX_ALLOW: u32 = 4_096;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are repr(C), Copy, padded explicitly, and valid for every bit pattern.
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::BlockEntry {}
    unsafe impl aya::Pod for super::ExactSlotV4 {}
    unsafe impl aya::Pod for super::ExactSlotV6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_buckets_stay_in_range_and_spread_neighbouring_addresses() {
        let n = 1u32 << EXACT_BUCKET_BITS;
        let mut seen = [false; 1 << EXACT_BUCKET_BITS];
        // 4,096 consecutive addresses (a /20 an attacker might hold): almost no two collide.
        for i in 0..4096u32 {
            let b = exact_bucket_v4(u32::from_ne_bytes((0x0a03_0000 + i).to_be_bytes()));
            assert!(b < n);
            seen[b as usize] = true;
        }
        assert!(seen.iter().filter(|s| **s).count() > 3500);
        let mut seen6 = [false; 1 << EXACT_BUCKET_BITS];
        for i in 0..4096u64 {
            let b = exact_bucket_v6([0x0000_00fd_u64, i.to_be()]);
            assert!(b < n);
            seen6[b as usize] = true;
        }
        assert!(seen6.iter().filter(|s| **s).count() > 3500);
    }
}
