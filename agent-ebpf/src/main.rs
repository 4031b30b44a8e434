//! precedent's XDP program.
//!
//! For every packet: if its source address is blocked (hash table of prefixes or prefix trie),
//! the block has not expired and the allowlist does not cover it, drop it. Otherwise, if it is a TCP segment whose
//! payload starts with an HTTP/1.x method token and a space, copy the start of the payload
//! into the `EVENTS` ring buffer; when that segment does not hold the whole header, copy the
//! segments that continue it too (`FOLLOW`). The only verdicts are pass and drop; packets are never
//! modified. Every outcome is counted in the per-CPU `COUNTERS` array.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod parse;

use agent_common::{
    ACK_FLOWS, ACK_RECORD, AckWatch, BlockEntry, Bucket, CAPTURE_DEFAULT, CAPTURE_MAX, COPY_PIECE,
    COPY_WINDOW_NS, COUNTER_COUNT, ClockCache, Config, Counter, EXACT_BUCKETS, EXACT_WAYS,
    Enforcement, EventHeader, ExactSlotV4, ExactSlotV6, FAMILY_IPV4, FAMILY_IPV6, FLAG_ALLOW_V4,
    FLAG_ALLOW_V6, FLAG_BLOCK_V4, FLAG_BLOCK_V6, FOLLOW_FLOWS, FOLLOW_IDLE_NS, FOLLOW_MAX_PIECES,
    FlowKey, FollowState, HASHED_LENGTHS, MAX_ALLOW, MAX_BLOCKS, OVERLAP_MAX, RING_WAKEUP_EVERY_NS,
    RINGBUF_RECORD_HEADER_LEN, exact_bucket_v4, exact_bucket_v6, prefix_v4, prefix_v6, seq_reaches,
};
use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, xdp_action},
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_xdp_load_bytes},
    },
    macros::{classifier, map, xdp},
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use crate::parse::{Headers, Skip};

/// Default 4 MiB (about 7,000 events of 512 bytes); userspace may resize it at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// What the block maps hold (which tries are in use, which prefix lengths the hash tables
/// serve), written by userspace.
#[map]
static ENFORCE: Array<Enforcement> = Array::with_max_entries(1, 0);

/// Blocks keyed by (prefix, prefix length): hash tables in array maps (see `EXACT_WAYS` in
/// agent-common for why not a BPF hash map or the trie).
#[map]
static BLOCK_EXACT_V4: Array<Bucket<ExactSlotV4>> = Array::with_max_entries(EXACT_BUCKETS, 0);
#[map]
static BLOCK_EXACT_V6: Array<Bucket<ExactSlotV6>> = Array::with_max_entries(EXACT_BUCKETS, 0);
/// Blocks the hash tables do not hold (a full bucket, a prefix length beyond the
/// `HASHED_LENGTHS` served): longest-prefix match.
#[map]
static BLOCK_V4: LpmTrie<[u8; 4], BlockEntry> = LpmTrie::with_max_entries(MAX_BLOCKS, 0);
#[map]
static BLOCK_V6: LpmTrie<[u8; 16], BlockEntry> = LpmTrie::with_max_entries(MAX_BLOCKS, 0);
#[map]
static ALLOW_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_ALLOW, 0);
#[map]
static ALLOW_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_ALLOW, 0);

/// Connections whose request header is being followed over several segments (see
/// `FOLLOW_MAX_PIECES` in agent-common): LRU, so connections that never finish their header
/// are forgotten first when it fills.
#[map]
static FOLLOW: LruHashMap<FlowKey, FollowState> = LruHashMap::with_max_entries(FOLLOW_FLOWS, 0);

/// Entry 0: the coarse-clock time until which some connection may still be followed; before
/// the first following and after the last, segments that start no request skip `FOLLOW`.
#[map]
static FOLLOWING: Array<u64> = Array::with_max_entries(1, 0);

/// The server's acknowledgements of captured requests (see `AckWatch` in agent-common): the
/// egress program writes what the server acknowledged, the XDP program what it waits for.
#[map]
static ACKS: LruHashMap<FlowKey, AckWatch> = LruHashMap::with_max_entries(ACK_FLOWS, 0);

#[map]
static CLOCK: PerCpuArray<ClockCache> = PerCpuArray::with_max_entries(1, 0);

/// When this CPU last let a ring submission wake the reader (`bpf_ktime_get_ns`).
#[map]
static LAST_WAKEUP: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// The count of empty-line bytes a request start was found behind, passed through memory so
/// the verifier forgets its exact value: it walks the rest of the program once for the range
/// instead of once per count (more than its million-instruction budget).
#[map]
static BLANK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn precedent(ctx: XdpContext) -> u32 {
    match inspect(&ctx) {
        Verdict::Pass => {
            bump(Counter::Passed);
            xdp_action::XDP_PASS
        }
        Verdict::Drop => {
            bump(Counter::Blocked);
            xdp_action::XDP_DROP
        }
        // Counted by its reason (`tcp_fragments`), not as a blocked source.
        Verdict::Unreadable => xdp_action::XDP_DROP,
    }
}

/// An empty program built alongside, so `cargo xtask bench-xdp` can report the cost of
/// `precedent` relative to doing nothing at all.
#[xdp]
pub fn baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The same for the egress side: an empty classifier, next to which `precedent_acks` is measured.
#[classifier]
pub fn tc_baseline(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[derive(PartialEq, Eq)]
enum Verdict {
    Pass,
    /// The source is blocked.
    Drop,
    /// No request could be read from the packet, and the operator wants such packets dropped.
    Unreadable,
}

#[inline(always)]
fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other CPU writes it, so a plain increment is exact.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn inspect(ctx: &XdpContext) -> Verdict {
    let h = match parse::headers(ctx) {
        Ok(h) => h,
        Err(skip) => {
            count_skip(skip);
            return Verdict::Pass;
        }
    };
    // Blocking applies to every packet from the source, whatever its protocol, SYNs included.
    // Empty maps are not searched at all: most of the time there is nothing to find.
    let Some(st) = ENFORCE.get(0) else {
        return Verdict::Pass;
    };
    let blocked = if h.is_v6 {
        (st.lengths_v6 != 0 || st.flags & FLAG_BLOCK_V6 != 0)
            && match parse::source_v6(ctx, &h) {
                Ok(src) => is_blocked(
                    hashed_v6(src, st),
                    src,
                    128,
                    (&BLOCK_V6, st.flags & FLAG_BLOCK_V6 != 0),
                    (&ALLOW_V6, st.flags & FLAG_ALLOW_V6 != 0),
                ),
                Err(_) => false,
            }
    } else {
        (st.lengths_v4 != 0 || st.flags & FLAG_BLOCK_V4 != 0)
            && match parse::source_v4(ctx, &h) {
                Ok(src) => is_blocked(
                    hashed_v4(src, st),
                    src,
                    32,
                    (&BLOCK_V4, st.flags & FLAG_BLOCK_V4 != 0),
                    (&ALLOW_V4, st.flags & FLAG_ALLOW_V4 != 0),
                ),
                Err(_) => false,
            }
    };
    if blocked {
        return Verdict::Drop;
    }
    if h.ipv6_ext {
        bump(Counter::Ipv6ExtHeader);
        return Verdict::Pass;
    }
    if h.tcp_fragment {
        bump(Counter::TcpFragment);
        let pass = CONFIG.get(0).is_some_and(|c| c.pass_fragments != 0);
        return if pass {
            Verdict::Pass
        } else {
            Verdict::Unreadable
        };
    }
    if let Err(skip) = capture(ctx, &h) {
        count_skip(skip);
    }
    Verdict::Pass
}

#[inline(always)]
fn count_skip(skip: Skip) {
    match skip {
        Skip::NotInteresting => {}
        Skip::Malformed => bump(Counter::ParseGaveUp),
        Skip::Nonlinear => bump(Counter::NonlinearSkipped),
        Skip::Http2 => bump(Counter::Http2Preface),
        Skip::OtherPort => bump(Counter::OtherPort),
        Skip::Stale => bump(Counter::Stale),
    }
}

/// What the hash tables hold for a source.
enum Found {
    /// A live block covers it.
    Live(*mut BlockEntry),
    /// Only blocks that have expired (not yet swept) cover it.
    Expired,
    Nothing,
}

/// Searches the IPv4 hash table: for each prefix length in use, longest first, the source's
/// prefix of that length is looked up in its bucket (one array lookup, inlined by the
/// verifier, then the bucket's slots compared in turn). Every length is tried until a live
/// block is found, so an expired narrower block never hides a live wider one.
#[inline(always)]
fn hashed_v4(src: [u8; 4], st: &Enforcement) -> Found {
    let addr = u32::from_ne_bytes(src);
    let mut found = Found::Nothing;
    for i in 0..HASHED_LENGTHS {
        if i >= st.lengths_v4 as usize {
            break;
        }
        let host_bits = st.host_bits_v4[i] as u32;
        if host_bits > 32 {
            break;
        }
        let prefix = prefix_v4(addr, host_bits);
        let key = ExactSlotV4::key(prefix, host_bits);
        let Some(bucket) = BLOCK_EXACT_V4.get_ptr_mut(exact_bucket_v4(prefix, host_bits)) else {
            break;
        };
        for way in 0..EXACT_WAYS as usize {
            unsafe {
                let slot = (&raw mut (*bucket).slots).cast::<ExactSlotV4>().add(way);
                // addr and host_bits, adjacent and 8-byte aligned, read as one word.
                if *(&raw const (*slot).addr).cast::<u64>() == key && (*slot).entry.expires_ns != 0
                {
                    if coarse_now() < (*slot).entry.expires_ns {
                        return Found::Live(&raw mut (*slot).entry);
                    }
                    found = Found::Expired;
                    break;
                }
            }
        }
    }
    found
}

/// [`hashed_v4`] for IPv6.
#[inline(always)]
fn hashed_v6(src: [u8; 16], st: &Enforcement) -> Found {
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&src[..8]);
    lo.copy_from_slice(&src[8..]);
    let addr = [u64::from_ne_bytes(hi), u64::from_ne_bytes(lo)];
    let mut found = Found::Nothing;
    for i in 0..HASHED_LENGTHS {
        if i >= st.lengths_v6 as usize {
            break;
        }
        let host_bits = st.host_bits_v6[i] as u32;
        if host_bits > 128 {
            break;
        }
        let key = prefix_v6(addr, host_bits);
        let Some(bucket) = BLOCK_EXACT_V6.get_ptr_mut(exact_bucket_v6(key, host_bits)) else {
            break;
        };
        for way in 0..EXACT_WAYS as usize {
            unsafe {
                let slot = (&raw mut (*bucket).slots).cast::<ExactSlotV6>().add(way);
                if (*slot).addr[0] == key[0]
                    && (*slot).addr[1] == key[1]
                    && (*slot).host_bits == host_bits
                    && (*slot).entry.expires_ns != 0
                {
                    if coarse_now() < (*slot).entry.expires_ns {
                        return Found::Live(&raw mut (*slot).entry);
                    }
                    found = Found::Expired;
                    break;
                }
            }
        }
    }
    found
}

/// Decides on a source given what the hash table holds for it, then the prefix trie (longest
/// match, only when it holds entries). A live entry drops the packet unless the allowlist
/// covers the source; the allowlist is consulted only after such a hit, so unblocked traffic
/// never pays for it. An expired entry does not hide a live one elsewhere.
#[inline(always)]
fn is_blocked<K: Copy>(
    hashed: Found,
    src: K,
    bits: u32,
    (prefix, prefix_in_use): (&LpmTrie<K, BlockEntry>, bool),
    (allow, allow_in_use): (&LpmTrie<K, u8>, bool),
) -> bool {
    let key = Key::new(bits, src);
    let mut expired = false;
    match hashed {
        Found::Live(entry) => return enforce(entry, allow_in_use, allow, &key),
        Found::Expired => expired = true,
        Found::Nothing => {}
    }
    if prefix_in_use && let Some(entry) = prefix.get(&key) {
        if coarse_now() < entry.expires_ns {
            let entry = entry as *const BlockEntry as *mut BlockEntry;
            return enforce(entry, allow_in_use, allow, &key);
        }
        expired = true;
    }
    if expired {
        bump(Counter::BlockExpired);
    }
    false
}

/// CLOCK_MONOTONIC at the coarse clock's resolution (one tick), for block expiry. Reading the
/// coarse clock is a kernel call (~20 ns here) while `jiffies` is inlined into a plain load,
/// so each CPU keeps the last reading and refreshes it when `jiffies` has moved. The reading
/// can lag the coarse clock by up to a tick more: a block may end one tick late, never early.
#[inline(always)]
fn coarse_now() -> u64 {
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = CLOCK.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    unsafe {
        if (*cache).jiffies != jiffies || (*cache).coarse_ns == 0 {
            (*cache).coarse_ns = bpf_ktime_get_coarse_ns();
            (*cache).jiffies = jiffies;
        }
        (*cache).coarse_ns
    }
}

/// A live block matched: drop unless the allowlist covers the source (it always wins).
#[inline(always)]
fn enforce<K>(
    entry: *mut BlockEntry,
    allow_in_use: bool,
    allow: &LpmTrie<K, u8>,
    key: &Key<K>,
) -> bool {
    if allow_in_use && allow.get(key).is_some() {
        bump(Counter::Allowlisted);
        return false;
    }
    // Map values are shared by all CPUs: add atomically (BPF_ATOMIC_ADD). The BPF target
    // exposes no stable atomic types, hence the intrinsic.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*entry).dropped, 1) };
    true
}

/// A mask past [`parse::BLANK_MAX`] for the count of empty-line bytes (see `capture`).
const BLANK_MASK: usize = 0xfff;
const _: () = assert!(parse::BLANK_MAX < BLANK_MASK);

/// Sends the start of an HTTP/1.x request to the ring buffer, if the payload is one, and the
/// segments that continue a request whose header the start did not hold (see `FOLLOW`).
#[inline(always)]
fn capture(ctx: &XdpContext, h: &Headers) -> Result<(), Skip> {
    if !h.is_tcp || h.payload_len == 0 {
        return Err(Skip::NotInteresting);
    }
    let mut head = 0u64;
    parse::payload_head(ctx, h, &mut head)?;
    let method_first = parse::is_http_method(head);
    if !method_first && parse::is_http2_preface(head) {
        return Err(Skip::Http2);
    }
    let Some(config) = CONFIG.get(0) else {
        return Err(Skip::NotInteresting);
    };
    // Other ports first: their segments cost no connection lookup.
    if config.port_count != 0 {
        // All KERNEL_PORTS slots are compared, unused ones hold 0 (never a configured port):
        // a loop bounded by port_count becomes pointer arithmetic 6.1's verifier rejects.
        let port = parse::dest_port_be(ctx, h)?;
        if !config.ports.contains(&port) {
            // Counted for what starts with a method token: the rest is no request.
            return Err(if method_first {
                Skip::OtherPort
            } else {
                Skip::NotInteresting
            });
        }
    }
    let key = parse::flow_key(ctx, h)?;
    // Where the request starts: at the payload's start, or behind empty lines, which servers
    // skip (RFC 9112 §2.2). Worked out here, not in a function of its own: the verifier allows
    // 8 nested calls, and the following below already reaches them.
    let mut skipped = 0;
    if !method_first {
        // The next segment of a followed header is a piece of it, whatever it starts with
        // (`T` of `GET` dripped byte by byte is not a TRACE); otherwise a few bytes that
        // begin a method token start a request the next segment completes.
        if continuation(ctx, h, &key)? {
            return Ok(());
        }
        if matches!(head as u8, b'\r' | b'\n') {
            let Some(slot) = BLANK.get_ptr_mut(0) else {
                return Err(Skip::NotInteresting);
            };
            // Masked (up to BLANK_MASK, past BLANK_MAX) so any copy the compiler spills is
            // bounded: 6.1's verifier keeps the bound the compare below gives only for the
            // register compared.
            // SAFETY: the slot is this CPU's, valid for the program's run; volatile so the
            // round trip is not optimised away.
            skipped = unsafe {
                core::ptr::write_volatile(slot, parse::leading_blank(ctx, h)? as u64);
                core::ptr::read_volatile(slot) as usize
            } & BLANK_MASK;
            if skipped > parse::BLANK_MAX || skipped >= h.payload_len {
                return Err(Skip::NotInteresting);
            }
            parse::payload_head(ctx, &h.advanced(skipped), &mut head)?;
        }
        let len = h.payload_len - skipped;
        if !parse::is_http_method(head) && (len >= 8 || !parse::is_method_prefix(head, len)) {
            // No request starts here; one may where the server reads on (see `overlapping`).
            return overlapping(ctx, h, &key);
        }
    }
    let h = &h.advanced(skipped);
    let limit = capture_limit(config);
    let captured = if h.payload_len < limit {
        h.payload_len
    } else {
        limit
    };
    let seq = parse::tcp_seq(ctx, h)?.wrapping_add(skipped as u32);
    // The segment's end, not the captured one: a segment longer than the capture can go on
    // past the acknowledged point (a long request resent with the next one joined to it).
    let end = seq.wrapping_add(h.payload_len as u32);
    let watch = ACKS.get_ptr_mut(&key);
    if let Some(a) = watch.and_then(|w| unsafe { (*w).server_has() }) {
        // Bytes the server acknowledged already: it drops them, so no request is made of them.
        if seq_reaches(a, end) {
            return Err(Skip::Stale);
        }
        // The request starts among them and the segment goes on past them: the server reads
        // on from there (see `overlapping`).
        if !seq_reaches(seq, a) {
            return overlapping_at(ctx, h, &key, watch, a, seq);
        }
    }
    record(ctx, h, captured, limit, seq, &key, watch)
}

/// Emits a request that starts at the payload's start (`seq`, `captured` bytes of it), asks
/// for its acknowledgement, and follows its connection when the header goes on past the
/// segment.
#[inline(always)]
fn record(
    ctx: &XdpContext,
    h: &Headers,
    captured: usize,
    limit: usize,
    seq: u32,
    key: &FlowKey,
    watch: Option<*mut AckWatch>,
) -> Result<(), Skip> {
    let end = seq.wrapping_add(captured as u32);
    emit_sized(ctx, h, captured, seq, 0)?;
    await_ack(watch, key, seq, end);
    // A start that is the whole segment and does not end the header: follow its connection.
    // A complete one ends any following of the connection's earlier request.
    if captured < limit && !parse::ends_header(ctx, h) {
        let until = coarse_now() + FOLLOW_IDLE_NS;
        let next_seq = seq.wrapping_add(h.payload_len as u32);
        let state = FollowState {
            next_seq,
            first_seq: next_seq,
            captured: captured as u16,
            pieces: 0,
            ended: 0,
            _pad: 0,
            until_ns: until,
        };
        let _ = FOLLOW.insert(key, &state, 0);
        if let Some(active) = FOLLOWING.get_ptr_mut(0) {
            unsafe { *active = until };
        }
    } else if following() {
        let _ = FOLLOW.remove(key);
    }
    Ok(())
}

/// A segment that begins among bytes the server acknowledged and goes on past them overlaps
/// its stream: the stack keeps the bytes it has and takes only the rest, so a request there
/// starts at the acknowledged point, whatever comes before it in the segment. That is a client
/// resending its last bytes with a new request behind them (TCP joins them after a lost
/// acknowledgement), or one prefixing each request with a byte it already sent to go unseen
/// (`X` + `POST /transferFunds ...` starts no request at its first byte, yet the server reads
/// the transfer). Only an acknowledgement the server sent tells which bytes it has.
///
/// This one is for a payload that starts no request (`h` from its first byte).
#[inline(always)]
fn overlapping(ctx: &XdpContext, h: &Headers, key: &FlowKey) -> Result<(), Skip> {
    let watch = ACKS.get_ptr_mut(key);
    let Some(acked) = watch.and_then(|w| unsafe { (*w).server_has() }) else {
        return Err(Skip::NotInteresting);
    };
    let seq = parse::tcp_seq(ctx, h)?;
    if seq_reaches(seq, acked) {
        return Err(Skip::NotInteresting);
    }
    overlapping_at(ctx, h, key, watch, acked, seq)
}

/// The request, if one starts there, at `acked` in a payload (`h`) that starts at `seq`,
/// before it (see [`overlapping`]).
#[inline(always)]
fn overlapping_at(
    ctx: &XdpContext,
    h: &Headers,
    key: &FlowKey,
    watch: Option<*mut AckWatch>,
    acked: u32,
    seq: u32,
) -> Result<(), Skip> {
    let into = acked.wrapping_sub(seq);
    // Segments of more than 32 KiB (coalesced by GRO) are not read that far.
    if into > OVERLAP_MAX || into as usize >= h.payload_len {
        return Err(Skip::NotInteresting);
    }
    bump(Counter::Overlapping);
    // Masked behind black_box, so the verifier knows the bound of the offset it adds to packet
    // pointers: the compiler would use `into` itself, whose bound only a compare gave, and a
    // compare bounds one register, not the copy the compiler may have spilled before it (6.1's
    // verifier then refuses "math between pkt pointer and register with unbounded min value").
    // The mask changes nothing: `into` is at most OVERLAP_MAX here.
    let base = (core::hint::black_box(into) & OVERLAP_MAX) as usize;
    let mut head = 0u64;
    parse::payload_head(ctx, &h.advanced(base), &mut head)?;
    // Empty lines there are skipped as at a segment's start, up to 7 bytes of them (one word:
    // the scan for more is the costliest part of the program to verify, and the budget holds
    // one copy). Past that the record starts with them, and userspace skips them (servers
    // do); bytes past the captured length are not seen, as for any request. Offsets, not
    // copies of `Headers`: moving those around became calls to `memmove`.
    let blank = parse::blank_prefix(head);
    // At most 7, masked for the verifier as `base` is.
    let skip = core::hint::black_box(if blank == 8 { 0 } else { blank }) & 7;
    if skip != 0 {
        parse::payload_head(ctx, &h.advanced(base + skip), &mut head)?;
    }
    let rest = h.advanced(base + skip);
    let seq = acked.wrapping_add(skip as u32);
    let len = rest.payload_len;
    if blank < 8
        && !parse::is_http_method(head)
        && (len >= 8 || !parse::is_method_prefix(head, len))
    {
        return Err(Skip::NotInteresting);
    }
    let Some(config) = CONFIG.get(0) else {
        return Err(Skip::NotInteresting);
    };
    let limit = capture_limit(config);
    let captured = if len < limit { len } else { limit };
    record(ctx, &rest, captured, limit, seq, key, watch)
}

/// Asks the egress program to report when the server acknowledges the captured bytes up to
/// `end` (from `seq`). A connection whose handshake was not seen (older than the program, or
/// forgotten) gets its entry here.
#[inline(always)]
fn await_ack(watch: Option<*mut AckWatch>, key: &FlowKey, seq: u32, end: u32) {
    match watch {
        Some(w) => unsafe { (*w).wait_for = end },
        None => {
            // A connection older than the programs: nothing before `seq` is waited for.
            let _ = ACKS.insert(
                key,
                &AckWatch::unacknowledged(end, seq),
                u64::from(BPF_NOEXIST),
            );
        }
    }
}

/// On the server's way out (TC egress): notes every acknowledgement the server sends on a
/// watched connection, and reports the one that covers the newest captured request with an
/// `ACK_RECORD` in the ring. Never changes or drops a packet.
#[classifier]
pub fn precedent_acks(ctx: TcContext) -> i32 {
    let _ = watch_acks(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn watch_acks(ctx: &TcContext) -> Result<(), Skip> {
    let seg = parse::egress_segment(ctx)?;
    // A reset acknowledges nothing the stack kept (it answers segments of no connection).
    if seg.flags & parse::TCP_RST != 0 || seg.flags & parse::TCP_ACK == 0 {
        return Ok(());
    }
    // Connections to ports whose requests are not captured are not watched: their replies
    // (and the SYN-ACKs that would fill the table) stop here, before the map lookup.
    let Some(config) = CONFIG.get(0) else {
        return Ok(());
    };
    if config.port_count != 0 && !config.ports.contains(&seg.key.dport) {
        return Ok(());
    }
    if seg.flags & parse::TCP_SYN != 0 {
        // With TCP Fast Open the SYN carried a request, which the XDP program captured (its
        // entry waits for it); the SYN-ACK acknowledges it.
        let fast_open = ACKS.get_ptr(&seg.key).is_some_and(|w| unsafe {
            seq_reaches(seg.ack, (*w).wait_for) && (*w).reported != (*w).wait_for
        });
        // The server accepted a connection: from here on its stream position is known.
        let _ = ACKS.insert(&seg.key, &AckWatch::acknowledged(seg.ack, seg.ack), 0);
        if fast_open {
            let _ = report_ack(&seg);
        }
        return Ok(());
    }
    let Some(w) = ACKS.get_ptr_mut(&seg.key) else {
        // A connection the table does not hold: one older than the programs, or one whose
        // entry the LRU let go (spoofed SYNs or request segments can churn it, and the stack
        // answers those with SYN-ACKs and resets only). This is a real acknowledgement all the
        // same, so it is watched from here on and reported once: requests captured on the
        // connection are not left to time out in userspace because the entry was lost.
        // NOEXIST: an entry the XDP program created meanwhile (capturing on another CPU)
        // holds a `wait_for` this one must not overwrite.
        let flags = u64::from(BPF_NOEXIST);
        let _ = ACKS.insert(&seg.key, &AckWatch::acknowledged(seg.ack, seg.ack), flags);
        let _ = report_ack(&seg);
        return Ok(());
    };
    let (wait_for, reported) = unsafe {
        (*w).latest = seg.ack;
        (*w).from_server = 1;
        ((*w).wait_for, (*w).reported)
    };
    // Every acknowledgement that moves past the last one reported is reported while captured
    // bytes wait beyond it, not only the one reaching `wait_for`: `wait_for` is the end of the
    // newest capture, and a segment the stack drops (out of its window, a bad checksum) is
    // captured all the same. Waiting for its end alone, the client could hide a request it
    // sent with such a segment behind it: the server acknowledges the request, that
    // acknowledgement is never reported, and userspace drops the request as unacknowledged.
    // Userspace releases what each reported acknowledgement covers. Once `wait_for` is
    // reached nothing is reported, so a long upload's acknowledgements stop here.
    // Noted as reported only once in the ring: with the ring full, the next acknowledgement
    // (a duplicate too) tries again, instead of the requests waiting out their time.
    if !seq_reaches(reported, wait_for)
        && seg.ack != reported
        && seq_reaches(seg.ack, reported)
        && report_ack(&seg)
    {
        unsafe { (*w).reported = seg.ack };
    }
    Ok(())
}

/// An `ACK_RECORD`: a header with no payload, client side first as in request records.
#[inline(always)]
fn report_ack(seg: &parse::EgressSegment) -> bool {
    let Some(mut entry) = EVENTS.reserve::<EventHeader>(0) else {
        bump(Counter::RingbufFull);
        return false;
    };
    let hdr = entry.as_mut_ptr();
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the reservation holds an EventHeader; every field is written.
    unsafe {
        (*hdr).ts_ns = now;
        (*hdr).saddr = seg.client;
        (*hdr).daddr = seg.server;
        (*hdr).sport = u16::from_be(seg.key.sport);
        (*hdr).dport = u16::from_be(seg.key.dport);
        (*hdr).seq = seg.ack;
        (*hdr).payload_len = 0;
        (*hdr).captured_len = 0;
        (*hdr).family = if seg.is_v6 { FAMILY_IPV6 } else { FAMILY_IPV4 };
        (*hdr).piece = ACK_RECORD;
    }
    entry.submit(wakeup_flags(now));
    true
}

/// Payload bytes to capture per request: the configured length, or the default.
#[inline(always)]
fn capture_limit(config: &Config) -> usize {
    if config.capture_len != 0 {
        config.capture_len as usize
    } else {
        CAPTURE_DEFAULT as usize
    }
}

/// Whether any connection may be followed: `FOLLOWING` holds the latest end of a following.
/// While it is past, a segment that starts no request costs this check and nothing more.
#[inline(always)]
fn following() -> bool {
    FOLLOWING.get(0).is_some_and(|until| coarse_now() < *until)
}

/// A segment that starts with no method token: if its connection is followed and it is the
/// next one in sequence, it is captured as the next piece of the request (true). One that
/// starts among the pieces already captured is captured again as a copy (`COPY_PIECE`), also
/// for a moment after the header ended: the server kept one of the two, the first unless its
/// stack refused it (a bad checksum), and only the agent can compare them.
#[inline(always)]
fn continuation(ctx: &XdpContext, h: &Headers, key: &FlowKey) -> Result<bool, Skip> {
    if !following() {
        return Ok(false);
    }
    let Some(state) = FOLLOW.get_ptr_mut(key) else {
        return Ok(false);
    };
    let seq = parse::tcp_seq(ctx, h)?;
    let now = coarse_now();
    let (next_seq, first_seq, captured, pieces, ended, until) = unsafe {
        (
            (*state).next_seq,
            (*state).first_seq,
            (*state).captured as usize,
            (*state).pieces,
            (*state).ended,
            (*state).until_ns,
        )
    };
    if now >= until {
        let _ = FOLLOW.remove(key);
        return Ok(false);
    }
    let Some(config) = CONFIG.get(0) else {
        return Ok(false);
    };
    let limit = capture_limit(config);
    // Signed distance in sequence space: behind is bytes already seen (a retransmission, or
    // another copy of a piece); ahead is a gap, and the request can no longer be put together.
    let ahead = seq.wrapping_sub(next_seq) as i32;
    if ahead < 0 {
        // Before the first piece is the start's: its copies start requests of their own.
        if (seq.wrapping_sub(first_seq) as i32) < 0 {
            return Ok(false);
        }
        let take = if h.payload_len < limit {
            h.payload_len
        } else {
            limit
        };
        emit_piece(ctx, h, key, take, seq, COPY_PIECE)?;
        return Ok(true);
    }
    if ended != 0 {
        return Ok(false);
    }
    if ahead > 0 {
        let _ = FOLLOW.remove(key);
        bump(Counter::FollowLost);
        return Ok(false);
    }
    let left = if captured < limit {
        limit - captured
    } else {
        0
    };
    let take = if h.payload_len < left {
        h.payload_len
    } else {
        left
    };
    let pieces = pieces.wrapping_add(1);
    if take == 0 || pieces > FOLLOW_MAX_PIECES {
        let _ = FOLLOW.remove(key);
        return Ok(false);
    }
    emit_piece(ctx, h, key, take, seq, pieces)?;
    // The last piece (the header ended, or the capture length or the piece count is spent)
    // leaves the entry for COPY_WINDOW_NS, to capture copies of the pieces.
    let last = take < h.payload_len || pieces >= FOLLOW_MAX_PIECES || parse::ends_header(ctx, h);
    let until = now + if last { COPY_WINDOW_NS } else { FOLLOW_IDLE_NS };
    unsafe {
        (*state).next_seq = next_seq.wrapping_add(h.payload_len as u32);
        (*state).captured = (captured + take) as u16;
        (*state).pieces = pieces;
        (*state).ended = u8::from(last);
        (*state).until_ns = until;
    }
    if let Some(active) = FOLLOWING.get_ptr_mut(0)
        && unsafe { *active } < until
    {
        unsafe { *active = until };
    }
    Ok(true)
}

/// Emits `take` bytes of a followed connection's segment as `piece` and asks for their
/// acknowledgement, like a request start's (see `record`).
#[inline(always)]
fn emit_piece(
    ctx: &XdpContext,
    h: &Headers,
    key: &FlowKey,
    take: usize,
    seq: u32,
    piece: u8,
) -> Result<(), Skip> {
    emit_sized(ctx, h, take, seq, piece)?;
    await_ack(
        ACKS.get_ptr_mut(key),
        key,
        seq,
        seq.wrapping_add(take as u32),
    );
    Ok(())
}

/// Emits `captured` payload bytes (1..=CAPTURE_MAX) in the smallest record size that holds
/// them: the ring only accepts reservations of a size the verifier knows, so records come in
/// a few sizes; the payload is copied once, straight from the packet into the ring.
#[inline(always)]
fn emit_sized(
    ctx: &XdpContext,
    h: &Headers,
    captured: usize,
    seq: u32,
    piece: u8,
) -> Result<(), Skip> {
    if captured <= 128 {
        emit::<128>(ctx, h, captured, seq, piece)
    } else if captured <= 512 {
        emit::<512>(ctx, h, captured, seq, piece)
    } else if captured <= 1024 {
        emit::<1024>(ctx, h, captured, seq, piece)
    } else {
        emit::<CAPTURE_MAX>(ctx, h, captured, seq, piece)
    }
}

/// A ring buffer record: the header and up to `N` payload bytes.
#[repr(C)]
struct Record<const N: usize> {
    header: EventHeader,
    data: [u8; N],
}

#[inline(always)]
fn emit<const N: usize>(
    ctx: &XdpContext,
    h: &Headers,
    captured: usize,
    seq: u32,
    piece: u8,
) -> Result<(), Skip> {
    // Whole cache lines per record keep every record line-aligned in the ring (see EventHeader).
    const { assert!((RINGBUF_RECORD_HEADER_LEN + core::mem::size_of::<Record<N>>()).is_multiple_of(64)) };
    if captured == 0 || captured > N {
        return Err(Skip::NotInteresting);
    }
    let Some(mut entry) = EVENTS.reserve::<Record<N>>(0) else {
        bump(Counter::RingbufFull);
        return Ok(());
    };
    let rec = entry.as_mut_ptr();
    // bpf_xdp_load_bytes also reads from the fragments of multi-buffer packets.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            h.payload_off as u32,
            (&raw mut (*rec).data).cast(),
            parse::load_len::<N>(captured),
        )
    };
    if rc < 0 {
        entry.discard(0);
        return Err(parse::out_of_reach(ctx));
    }
    // Every header field is written in place: the reservation is not zeroed, and userspace
    // must not see bytes of an earlier record.
    let hdr = unsafe { &raw mut (*rec).header };
    // SAFETY: the reservation holds a Record<N>, whose header is 8-byte aligned.
    if let Err(skip) = unsafe { parse::write_endpoints(ctx, h, hdr) } {
        entry.discard(0);
        return Err(skip);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    unsafe {
        (*hdr).ts_ns = now;
        (*hdr).seq = seq;
        (*hdr).payload_len = h.payload_len as u32;
        (*hdr).captured_len = captured as u16;
        (*hdr).family = if h.is_v6 { FAMILY_IPV6 } else { FAMILY_IPV4 };
        (*hdr).piece = piece;
    }
    entry.submit(wakeup_flags(now));
    bump(match piece {
        0 => Counter::Captured,
        COPY_PIECE => Counter::PieceCopies,
        _ => Counter::Continued,
    });
    if h.payload_len > captured {
        bump(Counter::Truncated);
    }
    Ok(())
}

/// Submission flags: at most one wakeup per RING_WAKEUP_EVERY_NS per CPU (see agent-common
/// for the reader's side of the contract). When allowed, flags 0 (adaptive): the kernel wakes
/// the reader if it had caught up with the ring; a quiet server's request is read at once.
#[inline(always)]
fn wakeup_flags(now: u64) -> u64 {
    const BPF_RB_NO_WAKEUP: u64 = 1;
    let Some(last) = LAST_WAKEUP.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        if now.wrapping_sub(*last) >= RING_WAKEUP_EVERY_NS {
            *last = now;
            0
        } else {
            BPF_RB_NO_WAKEUP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
