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
///
/// 56 bytes, so that with the ring's own 8-byte record header it fills exactly one cache line:
/// every record size (header + 128, 512, 1024 or 4096 payload bytes) is then a whole number of
/// lines, records start on line boundaries in the (page-aligned) ring, and the payload copy
/// lands on whole lines.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds at capture.
    pub ts_ns: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// TCP sequence number of the segment's first payload byte: where the bytes sit in the
    /// connection's stream, so userspace can tell a segment that starts a request from one
    /// inside an earlier request's body that merely looks like a request.
    pub seq: u32,
    /// TCP payload length of the packet as it was on the wire (may exceed `captured_len`).
    pub payload_len: u32,
    /// How many payload bytes follow the header (at most [`CAPTURE_MAX`]).
    pub captured_len: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// 0: the segment starts a request. n ≥ 1: the nth segment after that start on the same
    /// connection, captured because the start did not hold the whole header (see
    /// [`FollowState`]); userspace appends it to the start's bytes.
    pub piece: u8,
}

pub const EVENT_HEADER_LEN: usize = core::mem::size_of::<EventHeader>();
/// The ring buffer's own header in front of every record (`BPF_RINGBUF_HDR_SZ`).
pub const RINGBUF_RECORD_HEADER_LEN: usize = 8;
const _: () = assert!(EVENT_HEADER_LEN == 56);
const _: () = assert!((RINGBUF_RECORD_HEADER_LEN + EVENT_HEADER_LEN).is_multiple_of(64));
const _: () = assert!(CAPTURE_MAX <= u16::MAX as usize);

/// A request whose header is split over several TCP segments (a client writing it in pieces,
/// or an attacker splitting `GET /transferFunds` as `GE` + `T /transferFunds` so no single
/// segment looks like a request) is followed: when a segment that starts a request, or could
/// (`G`, `PO`), is shorter than the capture length and does not end the header (`\r\n\r\n`),
/// the program remembers its connection in `FOLLOW` and captures the segments that continue
/// it, in sequence, as pieces of the same request, until the header ends, the capture length
/// is reached, [`FOLLOW_MAX_PIECES`] pieces have come, or the connection is quiet for
/// [`FOLLOW_IDLE_NS`].
pub const FOLLOW_MAX_PIECES: u8 = 64;
/// How long a followed connection may stay quiet between pieces (30 s: servers give a client
/// about a minute for its whole header).
pub const FOLLOW_IDLE_NS: u64 = 30_000_000_000;
/// Connections followed at once; beyond it, the least recently used one is forgotten.
pub const FOLLOW_FLOWS: u32 = 8_192;

/// Key of `FOLLOW`: the connection, client side first. Addresses as in [`EventHeader`]
/// (IPv4 in the first 4 bytes, the rest zero), read as native words; ports as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub saddr: [u64; 2],
    pub daddr: [u64; 2],
    pub sport: u16,
    pub dport: u16,
    pub _pad: u32,
}

/// Value of `FOLLOW`: where the followed request's next segment must start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FollowState {
    /// TCP sequence number the next piece starts at (host order).
    pub next_seq: u32,
    /// Where the first piece started (the end of the start's bytes): a segment from here to
    /// `next_seq` is another copy of bytes captured as pieces ([`COPY_PIECE`]).
    pub first_seq: u32,
    /// Payload bytes captured for the request so far.
    pub captured: u16,
    /// Pieces captured after the start.
    pub pieces: u8,
    /// 1 once the header ended (or the following stopped): no more pieces, only copies of
    /// them, for [`COPY_WINDOW_NS`].
    pub ended: u8,
    pub _pad: u32,
    /// CLOCK_MONOTONIC (coarse) nanoseconds after which the connection is no longer followed.
    pub until_ns: u64,
}

/// [`EventHeader::piece`] of another copy of bytes already captured as a piece of a followed
/// request: a segment that starts where one of its pieces did, or inside them. The stack of
/// the server kept one copy (the first, unless it refused it: a bad checksum), so the agent
/// compares them (see `acked` in the agent) instead of trusting the first: a bad-checksum
/// piece followed by the real one would otherwise leave the agent with the forged bytes.
pub const COPY_PIECE: u8 = 254;
/// How long, after a followed header ended, copies of its pieces are still captured: the
/// agent waits 2 s for a record's acknowledgement, so a copy later than that finds nothing
/// to compare with anyway.
pub const COPY_WINDOW_NS: u64 = 2_000_000_000;

/// [`EventHeader::piece`] of an acknowledgement record: no payload; `seq` is the
/// acknowledgement number the server sent on the connection (addresses and ports as in a
/// request record, client first). See [`AckWatch`].
pub const ACK_RECORD: u8 = u8::MAX;
const _: () = assert!(FOLLOW_MAX_PIECES < COPY_PIECE && COPY_PIECE < ACK_RECORD);

/// Empty-line bytes skipped before a request line, at most. RFC 9112 §2.2 has servers ignore
/// empty lines before one (nginx skips any number), so a request behind them must be found:
/// `\r\nPOST /transferFunds ...` is served like the request it is. A segment holds about 1460
/// payload bytes on an Ethernet MTU; more blank bytes than this, and the parse gives up
/// (counted).
pub const BLANK_MAX: usize = 2048;

/// How far into a segment the XDP program looks for the server's acknowledged point (see
/// `Counter::Overlapping`): a mask, so segments of more than 32 KiB (coalesced by GRO) are not
/// read past it.
pub const OVERLAP_MAX: u32 = 0x7fff;

/// `a` is at or past `b` in TCP sequence space, which wraps: up to 2^31 ahead counts as past.
#[inline(always)]
pub const fn seq_reaches(a: u32, b: u32) -> bool {
    a.wrapping_sub(b) as i32 >= 0
}

/// Connections whose acknowledgements are watched at once (`ACKS`); beyond it, the least
/// recently used one is forgotten. The egress program reports the next acknowledgement the
/// server sends on a connection it does not hold (and holds it again), so a forgotten entry
/// costs only the XDP program's check for stale copies, never a request.
pub const ACK_FLOWS: u32 = 65_536;

/// Value of `ACKS`, keyed by [`FlowKey`]: a request counts only once the server's TCP stack
/// acknowledged its bytes, because the XDP program sees segments the stack then throws away
/// (a forged source address, a bad checksum, data outside the receive window, bytes it
/// already had), and a request made of such a segment was never served.
///
/// The egress program creates the entry from the server's SYN-ACK (or its first
/// acknowledgement on a connection the map does not hold) and keeps `latest`; the XDP
/// program skips a request segment whose bytes all lie before `latest` (counted `stale`) and
/// sets `wait_for` when it captures; the egress program sends an [`ACK_RECORD`] for each
/// acknowledgement of the server's that moves past `reported` while `wait_for` lies beyond it
/// (one, when the server acknowledges a request whole), and notes it in `reported`. Each field has one
/// writer, so the two programs need no lock.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AckWatch {
    /// Sequence number just past the newest captured bytes of the connection (host order).
    pub wait_for: u32,
    /// The newest acknowledgement number the server sent (host order); for a connection
    /// first seen at a captured request, where that request starts until the server sends one.
    pub latest: u32,
    /// The acknowledgement number last reported; a newer one is reported while `wait_for`
    /// lies beyond it.
    pub reported: u32,
    /// 1 once `latest` is an acknowledgement the server sent: only then does it tell which
    /// bytes the server has.
    pub from_server: u32,
}

impl AckWatch {
    /// A connection whose stream the server has acknowledged up to `acked`, waiting for
    /// `wait_for` (equal to `acked` when nothing is waited for yet).
    #[inline(always)]
    pub const fn acknowledged(wait_for: u32, acked: u32) -> Self {
        AckWatch {
            wait_for,
            latest: acked,
            reported: acked,
            from_server: 1,
        }
    }

    /// A connection first seen at a request captured from `seq` to `wait_for`, before any
    /// acknowledgement of the server's (one older than the programs, or forgotten by them).
    #[inline(always)]
    pub const fn unacknowledged(wait_for: u32, seq: u32) -> Self {
        AckWatch {
            wait_for,
            latest: seq,
            reported: seq,
            from_server: 0,
        }
    }

    /// The server's acknowledgement, if it sent one: what it has of the stream, up to there.
    #[inline(always)]
    pub const fn server_has(&self) -> Option<u32> {
        if self.from_server != 0 {
            Some(self.latest)
        } else {
            None
        }
    }
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<FollowState>() == 24);
const _: () = assert!(core::mem::size_of::<AckWatch>() == 16);

/// Runtime settings for the XDP program: entry 0 of the `CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Bytes of payload to capture per request; 0 means [`CAPTURE_DEFAULT`]; capped at
    /// [`CAPTURE_MAX`].
    pub capture_len: u32,
    /// How many of `ports` are in use; 0: requests to any port are captured.
    pub port_count: u32,
    /// Server ports whose requests are captured, in network byte order (compared with the
    /// TCP header as it is); unused slots hold 0. Requests to other ports are counted, not
    /// sent to userspace.
    pub ports: [u16; KERNEL_PORTS],
    /// 1: IP fragments of TCP segments pass (counted); 0: they are dropped (counted). A
    /// request split over IP fragments would reach the server unread: TCP stacks send
    /// segments that fit the path (DF set), so only an evasion or a broken path fragments.
    pub pass_fragments: u32,
}

/// Server ports the program itself can filter on; with more configured, it captures every
/// port and userspace filters.
pub const KERNEL_PORTS: usize = 16;

const _: () = assert!(core::mem::size_of::<Config>() == 44);

/// Bits of [`Enforcement::flags`]: which block/allow tries hold entries. The XDP program
/// skips lookups in empty maps, which keeps the common path cheap; the userspace enforcer
/// keeps these bits in step with the maps.
///
/// `FLAG_BLOCK_*`: the prefix tries (`BLOCK_V4`, `BLOCK_V6`) hold entries.
pub const FLAG_BLOCK_V4: u32 = 1 << 0;
pub const FLAG_BLOCK_V6: u32 = 1 << 1;
pub const FLAG_ALLOW_V4: u32 = 1 << 2;
pub const FLAG_ALLOW_V6: u32 = 1 << 3;

/// How many prefix lengths per address family the hash tables serve. Operators use few
/// (the daemon blocks /32 and /128; people add /24, /64, /48...); a block of a ninth
/// length goes to the LPM trie, which matches any length, only more slowly.
pub const HASHED_LENGTHS: usize = 8;

/// Entry 0 of the `ENFORCE` array map, written by userspace: what the block maps hold, so
/// the program searches only where something can be found.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enforcement {
    /// `FLAG_*` bits.
    pub flags: u32,
    /// How many entries of `host_bits_v4` / `host_bits_v6` are in use.
    pub lengths_v4: u8,
    pub lengths_v6: u8,
    pub _pad: [u8; 2],
    /// The prefix lengths present in the hash tables, as host bits (32 − prefix length for
    /// IPv4, 128 − it for IPv6), longest prefix first. The program derives each length's mask
    /// from its host bits, so a torn read of this array (userspace rewrites it while packets
    /// are judged) can only skip or add a probe, never pair a key with the wrong mask.
    pub host_bits_v4: [u8; HASHED_LENGTHS],
    pub host_bits_v6: [u8; HASHED_LENGTHS],
}

const _: () = assert!(core::mem::size_of::<Enforcement>() == 24);

/// A block: the value of the LPM tries keyed by source prefix, and part of each slot of the
/// hash tables.
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

/// Blocks live in hash tables keyed by (prefix, prefix length): array maps used as hash tables
/// with buckets of [`EXACT_WAYS`] consecutive slots, the bucket chosen by [`exact_bucket_v4`] /
/// [`exact_bucket_v6`]. The program probes one bucket per prefix length in use ("tuple space
/// search": a handful of lengths, each an exact match). Array lookups are inlined into the
/// program by the verifier, so a probe costs a few instructions per slot, where a BPF hash map
/// or LPM trie lookup is a call into the kernel (measured here: ~22-34 ns for a hash map,
/// ~16-20 ns for a trie, against ~0 for an array; see `cargo xtask bench-xdp`).
/// Userspace places entries; a block whose bucket is full, or whose prefix length is not
/// among the [`HASHED_LENGTHS`] served, goes to the LPM trie instead, which matches it just
/// as well (only more slowly).
pub const EXACT_BUCKET_BITS: u32 = 14;
pub const EXACT_WAYS: u32 = 4;
/// Buckets per hash table (the array map's entries: one lookup reaches a whole bucket).
pub const EXACT_BUCKETS: u32 = 1 << EXACT_BUCKET_BITS;

/// A bucket of a hash table: the value of `BLOCK_EXACT_V4` / `BLOCK_EXACT_V6`. A prefix may
/// sit in any of its bucket's slots; an empty slot has an expiry of 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket<S> {
    pub slots: [S; EXACT_WAYS as usize],
}

/// Entries of the hash tables before buckets were map values (one slot per entry, single
/// addresses only): userspace moves the blocks of such pinned tables into the current ones.
pub const LEGACY_EXACT_SLOTS: u32 = EXACT_BUCKETS * EXACT_WAYS;
/// Value sizes of those earlier slots: the address (4 bytes and 4 of padding, or 16), then a
/// [`BlockEntry`].
pub const LEGACY_EXACT_SLOT_V4_SIZE: usize = 24;
pub const LEGACY_EXACT_SLOT_V6_SIZE: usize = 32;

/// A slot of `BLOCK_EXACT_V4`. Empty while `entry.expires_ns` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExactSlotV4 {
    /// The prefix (host bits zero) as its 4 network-order bytes read as a native integer
    /// (`u32::from_ne_bytes`): see [`prefix_v4`].
    pub addr: u32,
    /// 32 − prefix length: 0 for a single address. Follows `addr` so the program compares
    /// both as one 64-bit word.
    pub host_bits: u32,
    pub entry: BlockEntry,
}

/// A slot of `BLOCK_EXACT_V6`. Empty while `entry.expires_ns` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExactSlotV6 {
    /// The prefix's 16 network-order bytes as two native integers (`u64::from_ne_bytes`),
    /// host bits zero: see [`prefix_v6`].
    pub addr: [u64; 2],
    /// 128 − prefix length: 0 for a single address.
    pub host_bits: u32,
    pub _pad: u32,
    pub entry: BlockEntry,
}

const _: () = assert!(core::mem::size_of::<ExactSlotV4>() == 24);
const _: () = assert!(core::mem::size_of::<ExactSlotV6>() == 40);
const _: () = assert!(core::mem::size_of::<Bucket<ExactSlotV4>>() == 96);
const _: () = assert!(core::mem::size_of::<Bucket<ExactSlotV6>>() == 160);

impl ExactSlotV4 {
    /// `addr` and `host_bits` as the one word the program compares (little-endian layout).
    #[inline(always)]
    pub const fn key(prefix: u32, host_bits: u32) -> u64 {
        prefix as u64 | (host_bits as u64) << 32
    }
}

/// `addr` (network-order bytes read natively, as in the slots) with its lowest `host_bits`
/// address bits cleared; `host_bits` is at most 32.
#[inline(always)]
pub const fn prefix_v4(addr: u32, host_bits: u32) -> u32 {
    // The mask in network order (the top `32 - host_bits` bits set), then byte-swapped into
    // the slots' native reading on little-endian machines. Shifting by 32 is undefined, so
    // a /0 (all host bits) is spelled out.
    let mask = if host_bits >= 32 {
        0
    } else {
        u32::MAX << host_bits
    };
    addr & u32::from_ne_bytes(mask.to_be_bytes())
}

/// `addr` (two native words of network-order bytes) with its lowest `host_bits` bits
/// cleared; `host_bits` is at most 128.
#[inline(always)]
pub const fn prefix_v6(addr: [u64; 2], host_bits: u32) -> [u64; 2] {
    let (hi_bits, lo_bits) = if host_bits > 64 {
        (host_bits - 64, 64)
    } else {
        (0, host_bits)
    };
    [
        addr[0] & mask_v6_word(hi_bits),
        addr[1] & mask_v6_word(lo_bits),
    ]
}

/// The mask keeping all but the lowest `bits` bits of a network-order word read natively.
#[inline(always)]
const fn mask_v6_word(bits: u32) -> u64 {
    let m = if bits >= 64 { 0 } else { u64::MAX << bits };
    u64::from_ne_bytes(m.to_be_bytes())
}

/// The bucket of an IPv4 prefix (its host bits folded in, then multiplicative hashing: one
/// multiply, one shift). The kernel and userspace both call this, so they always agree.
#[inline(always)]
pub const fn exact_bucket_v4(prefix: u32, host_bits: u32) -> u32 {
    (prefix ^ host_bits.wrapping_mul(0x85EB_CA6B)).wrapping_mul(0x9E37_79B1)
        >> (32 - EXACT_BUCKET_BITS)
}

/// The bucket of an IPv6 prefix (both halves and the host bits folded, then multiplicative
/// hashing).
#[inline(always)]
pub const fn exact_bucket_v6(prefix: [u64; 2], host_bits: u32) -> u32 {
    let folded = prefix[0]
        ^ prefix[1].rotate_left(29)
        ^ (host_bits as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
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
    /// Requests to server ports not configured for analysis (passed without capture).
    OtherPort,
    /// Segments captured as pieces of a request whose header they continue.
    Continued,
    /// Followed requests whose next segment came out of order (a gap: the segment between
    /// was lost or reordered), which ends the following; retransmissions are not counted.
    FollowLost,
    /// Request segments whose bytes the server had already acknowledged (a retransmission
    /// after the acknowledgement, or bytes forged behind the stream): not captured.
    Stale,
    /// Segments that began among bytes the server had acknowledged and went on past them:
    /// read from the acknowledged point, where the server reads on (a request there is
    /// captured from it).
    Overlapping,
    /// Segments of a followed request that came again over bytes captured as its pieces:
    /// captured again ([`COPY_PIECE`]) for the agent to compare.
    PieceCopies,
    /// IP fragments of TCP segments (IPv4, or IPv6 with a fragment header first): no request
    /// can be read from them, so they are dropped unless [`Config::pass_fragments`] is set.
    TcpFragment,
}

pub const COUNTER_COUNT: u32 = 18;

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
        Counter::OtherPort,
        Counter::Continued,
        Counter::FollowLost,
        Counter::Stale,
        Counter::Overlapping,
        Counter::PieceCopies,
        Counter::TcpFragment,
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
            Counter::OtherPort => "other_port",
            Counter::Continued => "continued",
            Counter::FollowLost => "follow_lost",
            Counter::Stale => "stale",
            Counter::Overlapping => "overlapping",
            Counter::PieceCopies => "piece_copies",
            Counter::TcpFragment => "tcp_fragments",
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
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::AckWatch {}
    unsafe impl aya::Pod for super::Enforcement {}
    unsafe impl aya::Pod for super::BlockEntry {}
    unsafe impl aya::Pod for super::ExactSlotV4 {}
    unsafe impl aya::Pod for super::ExactSlotV6 {}
    // An array of Pod slots, nothing else.
    unsafe impl<S: aya::Pod> aya::Pod for super::Bucket<S> {}
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
            let b = exact_bucket_v4(u32::from_ne_bytes((0x0a03_0000 + i).to_be_bytes()), 0);
            assert!(b < n);
            seen[b as usize] = true;
        }
        assert!(seen.iter().filter(|s| **s).count() > 3500);
        let mut seen6 = [false; 1 << EXACT_BUCKET_BITS];
        for i in 0..4096u64 {
            let b = exact_bucket_v6([0x0000_00fd_u64, i.to_be()], 0);
            assert!(b < n);
            seen6[b as usize] = true;
        }
        assert!(seen6.iter().filter(|s| **s).count() > 3500);
    }

    #[test]
    fn prefixes_clear_exactly_the_host_bits_in_network_order() {
        let v4 = |a: [u8; 4]| u32::from_ne_bytes(a);
        let addr = v4([10, 66, 3, 4]);
        assert_eq!(prefix_v4(addr, 0), addr);
        assert_eq!(prefix_v4(addr, 8), v4([10, 66, 3, 0]));
        assert_eq!(prefix_v4(addr, 16), v4([10, 66, 0, 0]));
        assert_eq!(prefix_v4(addr, 20), v4([10, 64, 0, 0]));
        assert_eq!(prefix_v4(addr, 31), v4([0, 0, 0, 0]));
        assert_eq!(prefix_v4(addr, 32), 0);
        let v6 = |a: [u8; 16]| {
            [
                u64::from_ne_bytes(a[..8].try_into().unwrap()),
                u64::from_ne_bytes(a[8..].try_into().unwrap()),
            ]
        };
        let addr = v6([0xfd, 0, 0, 8, 0, 0, 0, 1, 0xab, 0xcd, 0, 0, 0, 0, 0, 0x99]);
        assert_eq!(prefix_v6(addr, 0), addr);
        assert_eq!(
            prefix_v6(addr, 64),
            v6([0xfd, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
        );
        assert_eq!(
            prefix_v6(addr, 56),
            v6([0xfd, 0, 0, 8, 0, 0, 0, 1, 0xab, 0, 0, 0, 0, 0, 0, 0])
        );
        assert_eq!(
            prefix_v6(addr, 80),
            v6([0xfd, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        );
        assert_eq!(prefix_v6(addr, 128), [0, 0]);
    }

    #[test]
    fn single_address_buckets_are_those_of_tables_written_before_prefixes_were_hashed() {
        // Pinned tables from earlier versions hold single addresses placed by the old hashes
        // (no host bits); the current ones must find them where they are.
        let old_v4 = |a: u32| a.wrapping_mul(0x9E37_79B1) >> (32 - EXACT_BUCKET_BITS);
        let old_v6 = |a: [u64; 2]| {
            let folded = a[0] ^ a[1].rotate_left(29);
            (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - EXACT_BUCKET_BITS)) as u32
        };
        for i in 0..1000u32 {
            let a = 0x0a00_0000u32.wrapping_add(i.wrapping_mul(2_654_435_761));
            assert_eq!(exact_bucket_v4(a, 0), old_v4(a));
            let w = [u64::from(a) << 7, u64::from(i)];
            assert_eq!(exact_bucket_v6(w, 0), old_v6(w));
        }
        // Lengths spread: the same prefix at different lengths rarely shares a bucket.
        let p = prefix_v4(u32::from_ne_bytes([10, 0, 0, 0]), 24);
        let mut buckets = [0u32; 33];
        for (hb, b) in buckets.iter_mut().enumerate() {
            *b = exact_bucket_v4(p, hb as u32);
        }
        buckets.sort_unstable();
        let distinct = 1 + buckets.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(distinct > 30, "{distinct}");
    }
}
