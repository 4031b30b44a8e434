//! Header parsing for the XDP program: Ethernet (optionally one 802.1Q/802.1ad tag), IPv4
//! with options, IPv6 without extension headers, TCP with options.
//!
//! Headers are read in place through typed pointers after one bounds check each, and only
//! the fields the verdict needs are loaded: this runs for every packet. Payload bytes go
//! through `bpf_xdp_load_bytes`, which is safe on multi-buffer packets too. The egress
//! program's segments are read the same way, in place ([`egress_segment`]).
use agent_common::{EventHeader, FlowKey};
use aya_ebpf::{
    helpers::generated::{bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};

const ETH_P_IPV4: u16 = 0x0800_u16.to_be();
const ETH_P_IPV6: u16 = 0x86DD_u16.to_be();
const ETH_P_8021Q: u16 = 0x8100_u16.to_be();
const ETH_P_8021AD: u16 = 0x88A8_u16.to_be();
const IPPROTO_TCP: u8 = 6;
const IPPROTO_FRAGMENT: u8 = 44;

/// Why a packet was not captured; each maps to a counter (or to none).
#[derive(Clone, Copy)]
pub enum Skip {
    /// Not IP, not TCP, not HTTP: the ordinary case, counted only as passed.
    NotInteresting,
    /// Headers inconsistent or cut short.
    Malformed,
    /// Bytes needed lie outside what the program can read.
    Nonlinear,
    /// HTTP/2 connection preface.
    Http2,
    /// A request to a server port not configured for analysis.
    OtherPort,
    /// Bytes the server had already acknowledged.
    Stale,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    ver_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: [u8; 4],
    daddr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    ver_tc_flow: [u8; 4],
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHdr {
    source: u16,
    dest: u16,
    seq: u32,
    ack_seq: u32,
    doff_res: u8,
    flags: u8,
    window: u16,
    check: u16,
    urg_ptr: u16,
}

/// Where things are in the packet; addresses and ports are read later, only when needed.
#[derive(Clone, Copy)]
pub struct Headers {
    pub is_v6: bool,
    /// Offset of the IP header.
    pub l3: usize,
    /// The L4 protocol is TCP and its header was parsed (ports and payload are valid).
    pub is_tcp: bool,
    /// Offset of the TCP header.
    pub l4: usize,
    pub payload_off: usize,
    /// TCP payload length according to the IP header.
    pub payload_len: usize,
    /// IPv6 extension headers precede the L4 header (not walked: no capture).
    pub ipv6_ext: bool,
    /// An IP fragment of a TCP segment: its bytes are only a part of the segment (a later
    /// fragment has no TCP header at all), so nothing is read from it.
    pub tcp_fragment: bool,
}

impl Headers {
    /// The same packet with its payload starting `n` bytes later (`n` at most its length).
    #[inline(always)]
    pub fn advanced(&self, n: usize) -> Headers {
        Headers {
            payload_off: self.payload_off + n,
            payload_len: self.payload_len - n,
            ..*self
        }
    }
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Skip> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return Err(out_of_reach(ctx));
    }
    Ok((start + offset) as *const T)
}

/// A read past `data_end` failed: the packet is either short (malformed) or continues in
/// fragments the linear area does not hold (non-linear).
///
/// Inlined like everything else: as a function of its own (once `#[cold]`, out of line) the
/// verifier walked it again from each of its twenty call sites, each time with the caller's
/// state, and it cost most of the verifier's work on the program.
#[inline(always)]
pub fn out_of_reach(ctx: &XdpContext) -> Skip {
    let total = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as usize;
    if total > ctx.data_end() - ctx.data() {
        Skip::Nonlinear
    } else {
        Skip::Malformed
    }
}

#[inline(always)]
pub fn headers(ctx: &XdpContext) -> Result<Headers, Skip> {
    // Ethernet, with at most one VLAN tag. Ethertypes are compared in network order.
    let mut ethertype = unsafe { *ptr_at::<u16>(ctx, 12)? };
    let mut l3 = 14;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = unsafe { *ptr_at::<u16>(ctx, 16)? };
        l3 = 18;
    }
    let mut h = Headers {
        is_v6: false,
        l3,
        is_tcp: false,
        l4: 0,
        payload_off: 0,
        payload_len: 0,
        ipv6_ext: false,
        tcp_fragment: false,
    };
    if ethertype == ETH_P_IPV4 {
        let ip = ptr_at::<Ipv4Hdr>(ctx, l3)?;
        let ver_ihl = unsafe { (*ip).ver_ihl };
        let ihl = ((ver_ihl & 0x0f) as usize) * 4;
        let total_len = u16::from_be(unsafe { (*ip).tot_len }) as usize;
        if ver_ihl >> 4 != 4 || ihl < 20 || total_len < ihl {
            return Err(Skip::Malformed);
        }
        // More fragments follow (MF), or this is a later one (an offset).
        let fragment = u16::from_be(unsafe { (*ip).frag_off }) & 0x3fff != 0;
        if unsafe { (*ip).protocol } == IPPROTO_TCP {
            if fragment {
                h.tcp_fragment = true;
            } else {
                tcp(ctx, &mut h, l3 + ihl, total_len - ihl)?;
            }
        }
        Ok(h)
    } else if ethertype == ETH_P_IPV6 {
        let ip = ptr_at::<Ipv6Hdr>(ctx, l3)?;
        if unsafe { (*ip).ver_tc_flow[0] } >> 4 != 6 {
            return Err(Skip::Malformed);
        }
        h.is_v6 = true;
        let payload_len = u16::from_be(unsafe { (*ip).payload_len }) as usize;
        match unsafe { (*ip).next_header } {
            IPPROTO_TCP => tcp(ctx, &mut h, l3 + 40, payload_len)?,
            // A fragment header first: its own next header says what was fragmented.
            IPPROTO_FRAGMENT if unsafe { *ptr_at::<u8>(ctx, l3 + 40)? } == IPPROTO_TCP => {
                h.tcp_fragment = true
            }
            // Hop-by-hop, routing, fragment, destination options, AH, ESP, mobility, HIP,
            // shim6, experimental: walking the chain costs more than the rare request behind
            // it is worth. The source is known, so blocking still applies.
            0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254 => h.ipv6_ext = true,
            _ => {}
        }
        Ok(h)
    } else {
        Err(Skip::NotInteresting)
    }
}

/// Fills the TCP header and payload position; `segment_len` is the TCP header plus payload
/// according to the IP header.
#[inline(always)]
fn tcp(ctx: &XdpContext, h: &mut Headers, off: usize, segment_len: usize) -> Result<(), Skip> {
    let t = ptr_at::<TcpHdr>(ctx, off)?;
    let doff = ((unsafe { (*t).doff_res } >> 4) as usize) * 4;
    if doff < 20 || segment_len < doff {
        return Err(Skip::Malformed);
    }
    h.is_tcp = true;
    h.l4 = off;
    h.payload_off = off + doff;
    h.payload_len = segment_len - doff;
    Ok(())
}

/// Source address for the block lookup: IPv4 in the first 4 bytes.
#[inline(always)]
pub fn source_v4(ctx: &XdpContext, h: &Headers) -> Result<[u8; 4], Skip> {
    Ok(unsafe { (*ptr_at::<Ipv4Hdr>(ctx, h.l3)?).saddr })
}

#[inline(always)]
pub fn source_v6(ctx: &XdpContext, h: &Headers) -> Result<[u8; 16], Skip> {
    Ok(unsafe { (*ptr_at::<Ipv6Hdr>(ctx, h.l3)?).saddr })
}

/// Writes the source and destination addresses (IPv4 in the first 4 bytes, the rest zero) and
/// ports of an event straight into its header in the ring. Building them on the stack first
/// cost a zeroing loop (LLVM's BPF `memset` goes byte by byte) and two byte-wise copies per
/// address: more instructions than the rest of the header.
///
/// # Safety
/// `hdr` points to a writable, 8-byte aligned `EventHeader` (a ring buffer reservation).
#[inline(always)]
pub unsafe fn write_endpoints(
    ctx: &XdpContext,
    h: &Headers,
    hdr: *mut EventHeader,
) -> Result<(), Skip> {
    unsafe {
        let saddr = (&raw mut (*hdr).saddr).cast::<u64>();
        let daddr = (&raw mut (*hdr).daddr).cast::<u64>();
        if h.is_v6 {
            let ip = ptr_at::<Ipv6Hdr>(ctx, h.l3)?;
            // Packet bytes carry no alignment: byte loads, which LLVM emits for these copies.
            core::ptr::copy_nonoverlapping(&raw const (*ip).saddr, saddr.cast(), 1);
            core::ptr::copy_nonoverlapping(&raw const (*ip).daddr, daddr.cast(), 1);
        } else {
            let ip = ptr_at::<Ipv4Hdr>(ctx, h.l3)?;
            // The 4 network-order bytes read natively land first in the little-endian word.
            saddr.write(u64::from(u32::from_ne_bytes((*ip).saddr)));
            saddr.add(1).write(0);
            daddr.write(u64::from(u32::from_ne_bytes((*ip).daddr)));
            daddr.add(1).write(0);
        }
        let t = ptr_at::<TcpHdr>(ctx, h.l4)?;
        (*hdr).sport = u16::from_be((*t).source);
        (*hdr).dport = u16::from_be((*t).dest);
    }
    Ok(())
}

/// The TCP destination port as it is in the header (network byte order).
#[inline(always)]
pub fn dest_port_be(ctx: &XdpContext, h: &Headers) -> Result<u16, Skip> {
    Ok(unsafe { (*ptr_at::<TcpHdr>(ctx, h.l4)?).dest })
}

/// `len`, already checked to be in 1..=N (N a power of two), as a length the verifier can
/// prove to be in 1..=N for bpf_xdp_load_bytes. Verifiers before 6.8 learn no lower bound from
/// `len != 0` (6.1 rejects the program), so the bound comes from masking instead; black_box
/// keeps LLVM from folding the mask back into `len`.
#[inline(always)]
pub fn load_len<const N: usize>(len: usize) -> u32 {
    const { assert!(N.is_power_of_two()) };
    ((core::hint::black_box(len).wrapping_sub(1) & (N - 1)) + 1) as u32
}

/// Reads the first 8 payload bytes, as a little-endian word (zero-padded when the payload is
/// shorter), into `head`.
///
/// An out-parameter rather than `Result<u64, _>`: LLVM fills the error variant's unused bytes
/// from whatever register is at hand, and the verifier rejects reading it.
#[inline(always)]
pub fn payload_head(ctx: &XdpContext, h: &Headers, head: &mut u64) -> Result<(), Skip> {
    payload_word(ctx, h, 0, head)
}

/// [`payload_head`] at `off` bytes into the payload (`off` < `payload_len`).
#[inline(always)]
fn payload_word(ctx: &XdpContext, h: &Headers, off: usize, word: &mut u64) -> Result<(), Skip> {
    let at = h.payload_off + off;
    let left = h.payload_len - off;
    if left >= 8
        && let Ok(p) = ptr_at::<u64>(ctx, at)
    {
        *word = unsafe { p.read_unaligned() };
        return Ok(());
    }
    let len = if left < 8 { left } else { 8 };
    if len == 0 {
        return Err(Skip::NotInteresting);
    }
    let mut bytes = [0u8; 8];
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            at as u32,
            bytes.as_mut_ptr().cast(),
            load_len::<8>(len),
        )
    };
    if rc < 0 {
        return Err(out_of_reach(ctx));
    }
    *word = u64::from_le_bytes(bytes);
    Ok(())
}

pub use agent_common::BLANK_MAX;

/// The number of CR and LF bytes the payload starts with: read in place 8 at a time up to the
/// end of the linear area, the last few by helper one by one; bytes past the payload, if any,
/// are padding, not blank. In-place loads cost next to nothing where a helper call costs
/// ~30 ns, which 175 rounds over a segment of empty lines would make 5 µs a packet. A run of
/// empty lines reaching into a multi-buffer packet's fragments is not followed there (the
/// caller then finds no request). Nothing in the loop is compared with the payload's length:
/// an exit would narrow what the verifier knows of it differently in every round, and it
/// would then walk the rest of the program once per round (far more than its budget).
#[inline(always)]
pub fn leading_blank(ctx: &XdpContext, h: &Headers) -> Result<usize, Skip> {
    let mut off = 0usize;
    let mut rounds = 0;
    while rounds < BLANK_MAX / 8 {
        let Ok(p) = ptr_at::<u64>(ctx, h.payload_off + off) else {
            break;
        };
        let k = blank_prefix(unsafe { p.read_unaligned() });
        if k < 8 {
            return Ok(off + k);
        }
        off += 8;
        rounds += 1;
    }
    if rounds == BLANK_MAX / 8 {
        return Err(Skip::Malformed);
    }
    // Fewer than 8 bytes left in the linear area: the rest one at a time.
    for i in 0..7 {
        let mut b = 0u8;
        let rc = unsafe {
            bpf_xdp_load_bytes(
                ctx.ctx,
                (h.payload_off + off + i) as u32,
                (&raw mut b).cast(),
                1,
            )
        };
        if rc < 0 || (b != b'\r' && b != b'\n') {
            return Ok(off + i);
        }
    }
    Ok(off + 7)
}

/// How many of the 8 bytes of `w` (little-endian, first byte lowest) lead with CR or LF,
/// without branches: per byte, "is zero" of `w` XOR the repeated character is its top bit
/// (exact, no carry crosses bytes); the lowest byte that is neither gives the count.
#[inline(always)]
pub fn blank_prefix(w: u64) -> usize {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const TOP: u64 = 0x8080_8080_8080_8080;
    let zero_bytes = |x: u64| !(((x & LOW7) + LOW7) | x | LOW7);
    let blank = zero_bytes(w ^ 0x0d0d_0d0d_0d0d_0d0d) | zero_bytes(w ^ 0x0a0a_0a0a_0a0a_0a0a);
    let other = !blank & TOP;
    // The lowest such top bit, at 8i + 7: below 1 << 8i lie 8i ones (all 64 when none is).
    let lowest = other & other.wrapping_neg();
    ((lowest >> 7).wrapping_sub(1).count_ones() / 8) as usize
}

/// Does the payload start with an HTTP/1.x request method followed by a space? `w` holds the
/// first 8 bytes in little-endian order, so masks keep the first N bytes.
#[inline(always)]
pub fn is_http_method(w: u64) -> bool {
    const M4: u64 = 0xffff_ffff;
    const M5: u64 = 0xff_ffff_ffff;
    const M6: u64 = 0xffff_ffff_ffff;
    const M7: u64 = 0xff_ffff_ffff_ffff;
    const fn le(s: &[u8; 8]) -> u64 {
        u64::from_le_bytes(*s)
    }
    // Dispatch on the first byte so a non-HTTP payload costs one or two compares.
    match w as u8 {
        b'G' => w & M4 == le(b"GET \0\0\0\0"),
        b'P' => {
            w & M5 == le(b"POST \0\0\0")
                || w & M4 == le(b"PUT \0\0\0\0")
                || w & M6 == le(b"PATCH \0\0")
        }
        b'D' => w & M7 == le(b"DELETE \0"),
        b'H' => w & M5 == le(b"HEAD \0\0\0"),
        b'O' => w == le(b"OPTIONS "),
        b'C' => w == le(b"CONNECT "),
        b'T' => w & M6 == le(b"TRACE \0\0"),
        _ => false,
    }
}

/// Could a payload of `len` bytes (1..=7, fewer than [`is_http_method`] needs) be the start of
/// a request whose method token the next segment completes (`G`, `PO`, `DELETE`)? `w` holds
/// the bytes zero-padded, as from [`payload_head`].
#[inline(always)]
pub fn is_method_prefix(w: u64, len: usize) -> bool {
    const fn le(s: &[u8; 8]) -> u64 {
        u64::from_le_bytes(*s)
    }
    const TOKENS: [u64; 9] = [
        le(b"GET \0\0\0\0"),
        le(b"POST \0\0\0"),
        le(b"PUT \0\0\0\0"),
        le(b"PATCH \0\0"),
        le(b"DELETE \0"),
        le(b"HEAD \0\0\0"),
        le(b"OPTIONS "),
        le(b"CONNECT "),
        le(b"TRACE \0\0"),
    ];
    if len == 0 || len >= 8 {
        return false;
    }
    let mask = (1u64 << (len * 8)) - 1;
    let mut i = 0;
    while i < TOKENS.len() {
        if w & mask == TOKENS[i] & mask {
            return true;
        }
        i += 1;
    }
    false
}

/// Does the payload end with the blank line that ends an HTTP header? Reads its last 4 bytes
/// (from fragments too); a payload shorter than that cannot tell, and says no.
#[inline(always)]
pub fn ends_header(ctx: &XdpContext, h: &Headers) -> bool {
    if h.payload_len < 4 {
        return false;
    }
    let mut tail = [0u8; 4];
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            (h.payload_off + h.payload_len - 4) as u32,
            tail.as_mut_ptr().cast(),
            4,
        )
    };
    rc >= 0 && tail == *b"\r\n\r\n"
}

/// The TCP sequence number (host order).
#[inline(always)]
pub fn tcp_seq(ctx: &XdpContext, h: &Headers) -> Result<u32, Skip> {
    Ok(u32::from_be(unsafe { (*ptr_at::<TcpHdr>(ctx, h.l4)?).seq }))
}

/// Fills the `FOLLOW` key of the packet's connection (every field, padding included: the
/// whole key is hashed).
#[inline(always)]
pub fn flow_key(ctx: &XdpContext, h: &Headers) -> Result<FlowKey, Skip> {
    // One literal with every field: a zeroed key filled in afterwards was a call to LLVM's BPF
    // `memset`, a loop over the key's 40 bytes one at a time.
    unsafe {
        let (saddr, daddr) = if h.is_v6 {
            let ip = ptr_at::<Ipv6Hdr>(ctx, h.l3)?;
            let s = (&raw const (*ip).saddr).cast::<[u8; 8]>();
            let d = (&raw const (*ip).daddr).cast::<[u8; 8]>();
            (
                [u64::from_ne_bytes(*s), u64::from_ne_bytes(*s.add(1))],
                [u64::from_ne_bytes(*d), u64::from_ne_bytes(*d.add(1))],
            )
        } else {
            let ip = ptr_at::<Ipv4Hdr>(ctx, h.l3)?;
            (
                [u64::from(u32::from_ne_bytes((*ip).saddr)), 0],
                [u64::from(u32::from_ne_bytes((*ip).daddr)), 0],
            )
        };
        let t = ptr_at::<TcpHdr>(ctx, h.l4)?;
        Ok(FlowKey {
            saddr,
            daddr,
            sport: (*t).source,
            dport: (*t).dest,
            _pad: 0,
        })
    }
}

/// "PRI * HTTP/2.0": a client starting HTTP/2 with prior knowledge (h2c).
#[inline(always)]
pub fn is_http2_preface(w: u64) -> bool {
    w == u64::from_le_bytes(*b"PRI * HT")
}

/// TCP flags (the 14th byte of the header).
pub const TCP_RST: u8 = 0x04;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// What the egress program needs of a segment the server sends: its connection as the client
/// sees it (the `ACKS` key, client first), its flags and acknowledgement number.
pub struct EgressSegment {
    pub key: FlowKey,
    /// Client and server addresses as in `EventHeader` (IPv4 in the first 4 bytes).
    pub client: [u8; 16],
    pub server: [u8; 16],
    pub is_v6: bool,
    pub flags: u8,
    /// Acknowledgement number, host order.
    pub ack: u32,
}

/// Reads an outgoing TCP segment at TC egress (Ethernet, at most one VLAN tag, IPv4 or IPv6
/// without extension headers; anything else is not interesting). See [`egress_read`].
#[inline(always)]
pub fn egress_segment(ctx: &TcContext) -> Result<EgressSegment, Skip> {
    let load16 = |off: usize| egress_read::<u16>(ctx, off);
    let mut ethertype = load16(12)?;
    let mut l3 = 14;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = load16(16)?;
        l3 = 18;
    }
    let mut seg = EgressSegment {
        key: FlowKey::default(),
        client: [0; 16],
        server: [0; 16],
        is_v6: false,
        flags: 0,
        ack: 0,
    };
    let l4 = if ethertype == ETH_P_IPV4 {
        let ip: Ipv4Hdr = egress_read(ctx, l3)?;
        let ihl = ((ip.ver_ihl & 0x0f) as usize) * 4;
        let later_fragment = u16::from_be(ip.frag_off) & 0x1fff != 0;
        if ip.ver_ihl >> 4 != 4 || ihl < 20 || ip.protocol != IPPROTO_TCP || later_fragment {
            return Err(Skip::NotInteresting);
        }
        // The server is the source: the key is the client's view, as the XDP program has it.
        seg.key.saddr = [u64::from(u32::from_ne_bytes(ip.daddr)), 0];
        seg.key.daddr = [u64::from(u32::from_ne_bytes(ip.saddr)), 0];
        seg.client[..4].copy_from_slice(&ip.daddr);
        seg.server[..4].copy_from_slice(&ip.saddr);
        l3 + ihl
    } else if ethertype == ETH_P_IPV6 {
        let ip: Ipv6Hdr = egress_read(ctx, l3)?;
        if ip.ver_tc_flow[0] >> 4 != 6 || ip.next_header != IPPROTO_TCP {
            return Err(Skip::NotInteresting);
        }
        let word = |a: &[u8; 16], i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&a[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(w)
        };
        seg.key.saddr = [word(&ip.daddr, 0), word(&ip.daddr, 1)];
        seg.key.daddr = [word(&ip.saddr, 0), word(&ip.saddr, 1)];
        seg.client = ip.daddr;
        seg.server = ip.saddr;
        seg.is_v6 = true;
        l3 + 40
    } else {
        return Err(Skip::NotInteresting);
    };
    let t: TcpHdr = egress_read(ctx, l4)?;
    seg.key.sport = t.dest;
    seg.key.dport = t.source;
    seg.flags = t.flags;
    seg.ack = u32::from_be(t.ack_seq);
    Ok(seg)
}

/// A header of an outgoing segment at `off`: read in place when it lies in the socket
/// buffer's linear area, as the headers the local stack builds do; else through
/// `bpf_skb_load_bytes`, which also reaches the non-linear part. In place it costs a bounds
/// check where the helper cost about 15 ns a call, on every segment the server sends.
#[inline(always)]
fn egress_read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, Skip> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() <= ctx.data_end() {
        // SAFETY: the bytes lie between data and data_end (checked just above, as the
        // verifier requires); T is plain header data, valid for any bytes.
        Ok(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
    } else {
        ctx.load::<T>(off).map_err(|_| Skip::NotInteresting)
    }
}
