//! Header parsing for the XDP program: Ethernet (optionally one 802.1Q/802.1ad tag), IPv4
//! with options, IPv6 without extension headers, TCP with options.
//!
//! Headers are read by direct packet access with explicit bounds checks against `data_end`;
//! payload bytes go through `bpf_xdp_load_bytes`, which is safe on multi-buffer packets too.
use aya_ebpf::{
    helpers::generated::{bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    programs::XdpContext,
};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;

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
}

/// What the rest of the program needs from the headers.
pub struct Headers {
    pub is_v6: bool,
    /// Source/destination; IPv4 addresses occupy the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The L4 protocol is TCP and its header was parsed (ports and payload are valid).
    pub is_tcp: bool,
    pub sport: u16,
    pub dport: u16,
    pub payload_off: usize,
    /// TCP payload length according to the IP header.
    pub payload_len: usize,
    /// IPv6 extension headers precede the L4 header (not walked: no capture).
    pub ipv6_ext: bool,
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Reads a `T` at `offset`, or explains why it cannot be read.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, Skip> {
    match ptr_at::<T>(ctx, offset) {
        Some(p) => Ok(unsafe { p.read_unaligned() }),
        None => Err(out_of_reach(ctx)),
    }
}

/// A read past `data_end` failed: the packet is either short (malformed) or continues in
/// fragments the linear area does not hold (non-linear).
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
    // Ethernet, with at most one VLAN tag.
    let mut ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    let mut l3 = 14;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be(read::<u16>(ctx, 16)?);
        l3 = 18;
    }
    match ethertype {
        ETH_P_IPV4 => ipv4(ctx, l3),
        ETH_P_IPV6 => ipv6(ctx, l3),
        _ => Err(Skip::NotInteresting),
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize) -> Result<Headers, Skip> {
    let ip: [u8; 20] = read(ctx, l3)?;
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Err(Skip::Malformed);
    }
    let total_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if total_len < ihl {
        return Err(Skip::Malformed);
    }
    let mut h = Headers {
        is_v6: false,
        saddr: [0; 16],
        daddr: [0; 16],
        is_tcp: false,
        sport: 0,
        dport: 0,
        payload_off: 0,
        payload_len: 0,
        ipv6_ext: false,
    };
    h.saddr[..4].copy_from_slice(&ip[12..16]);
    h.daddr[..4].copy_from_slice(&ip[16..20]);
    // Later fragments carry no TCP header; they are passed (and still subject to blocking).
    let frag_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if ip[9] != IPPROTO_TCP || frag_offset != 0 {
        return Ok(h);
    }
    tcp(ctx, &mut h, l3 + ihl, total_len - ihl)?;
    Ok(h)
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize) -> Result<Headers, Skip> {
    let ip: [u8; 40] = read(ctx, l3)?;
    if ip[0] >> 4 != 6 {
        return Err(Skip::Malformed);
    }
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let mut h = Headers {
        is_v6: true,
        saddr: [0; 16],
        daddr: [0; 16],
        is_tcp: false,
        sport: 0,
        dport: 0,
        payload_off: 0,
        payload_len: 0,
        ipv6_ext: false,
    };
    h.saddr.copy_from_slice(&ip[8..24]);
    h.daddr.copy_from_slice(&ip[24..40]);
    match ip[6] {
        IPPROTO_TCP => {
            tcp(ctx, &mut h, l3 + 40, payload_len)?;
            Ok(h)
        }
        // Hop-by-hop, routing, fragment, destination options, AH, ESP, mobility, HIP, shim6,
        // experimental: walking the chain costs more than the rare request behind it is worth.
        // The source is known, so blocking still applies; only capture is skipped.
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254 => {
            h.ipv6_ext = true;
            Ok(h)
        }
        _ => Ok(h),
    }
}

/// Fills ports and payload position from the TCP header at `off`; `segment_len` is the TCP
/// header plus payload according to the IP header.
#[inline(always)]
fn tcp(ctx: &XdpContext, h: &mut Headers, off: usize, segment_len: usize) -> Result<(), Skip> {
    let t: [u8; 14] = read(ctx, off)?;
    let doff = ((t[12] >> 4) as usize) * 4;
    if doff < 20 || segment_len < doff {
        return Err(Skip::Malformed);
    }
    h.is_tcp = true;
    h.sport = u16::from_be_bytes([t[0], t[1]]);
    h.dport = u16::from_be_bytes([t[2], t[3]]);
    h.payload_off = off + doff;
    h.payload_len = segment_len - doff;
    Ok(())
}

/// Reads the first 8 payload bytes into `head` (left zero where the payload is shorter).
///
/// An out-parameter rather than `Result<[u8; 8], _>`: LLVM fills the error variant's unused
/// bytes from whatever register is at hand, and the verifier rejects reading it.
#[inline(always)]
pub fn payload_head(ctx: &XdpContext, h: &Headers, head: &mut [u8; 8]) -> Result<(), Skip> {
    if let Some(p) = ptr_at::<[u8; 8]>(ctx, h.payload_off) {
        *head = unsafe { p.read_unaligned() };
        return Ok(());
    }
    let len = if h.payload_len < 8 { h.payload_len } else { 8 };
    if len == 0 {
        return Err(Skip::NotInteresting);
    }
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            h.payload_off as u32,
            head.as_mut_ptr().cast(),
            len as u32,
        )
    };
    if rc < 0 {
        return Err(out_of_reach(ctx));
    }
    Ok(())
}

/// Does the payload start with an HTTP/1.x request method followed by a space?
#[inline(always)]
pub fn is_http_method(h: [u8; 8]) -> bool {
    let w = u64::from_le_bytes(h);
    const M4: u64 = 0xffff_ffff;
    const M5: u64 = 0xff_ffff_ffff;
    const M6: u64 = 0xffff_ffff_ffff;
    const M7: u64 = 0xff_ffff_ffff_ffff;
    let le = |s: &[u8; 8]| u64::from_le_bytes(*s);
    w & M4 == le(b"GET \0\0\0\0")
        || w & M5 == le(b"POST \0\0\0")
        || w & M4 == le(b"PUT \0\0\0\0")
        || w & M7 == le(b"DELETE \0")
        || w & M5 == le(b"HEAD \0\0\0")
        || w & M6 == le(b"PATCH \0\0")
        || w == le(b"OPTIONS ")
        || w == le(b"CONNECT ")
        || w & M6 == le(b"TRACE \0\0")
}

/// "PRI * HTTP/2.0": a client starting HTTP/2 with prior knowledge (h2c).
#[inline(always)]
pub fn is_http2_preface(h: [u8; 8]) -> bool {
    h == *b"PRI * HT"
}
