//! precedent's XDP program.
//!
//! For every IPv4/TCP segment whose payload starts with an HTTP/1.x method token and a space,
//! copy the start of the payload (request line and first headers) into the `EVENTS` ring
//! buffer. Every packet gets `XDP_PASS`: this program only observes.
#![no_std]
#![no_main]

use agent_common::{CAPTURE_MAX, FAMILY_IPV4, RequestEvent};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, generated::bpf_xdp_load_bytes},
    macros::{map, xdp},
    maps::RingBuf,
    programs::XdpContext,
};

/// 256 KiB holds about 450 events: enough to ride out a burst while userspace wakes up.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

const ETH_HDR_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;

#[xdp]
pub fn precedent(ctx: XdpContext) -> u32 {
    // Every path passes the packet; the result only tells us whether we captured it.
    let _ = try_capture(&ctx);
    xdp_action::XDP_PASS
}

/// Bounds-checked pointer to a `T` at `offset` in the linear part of the packet.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
fn try_capture(ctx: &XdpContext) -> Result<(), ()> {
    // Ethernet: only untagged IPv4 for now.
    let ethertype = u16::from_be(unsafe { *ptr_at::<u16>(ctx, 12)? });
    if ethertype != ETH_P_IPV4 {
        return Err(());
    }

    // IPv4: version/IHL, total length, protocol, addresses.
    let ip = ETH_HDR_LEN;
    let ver_ihl: u8 = unsafe { *ptr_at(ctx, ip)? };
    if ver_ihl >> 4 != 4 {
        return Err(());
    }
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(());
    }
    let total_len = u16::from_be(unsafe { *ptr_at::<u16>(ctx, ip + 2)? }) as usize;
    let proto: u8 = unsafe { *ptr_at(ctx, ip + 9)? };
    if proto != IPPROTO_TCP {
        return Err(());
    }
    let saddr: [u8; 4] = unsafe { *ptr_at(ctx, ip + 12)? };
    let daddr: [u8; 4] = unsafe { *ptr_at(ctx, ip + 16)? };

    // TCP: ports and data offset. The header starts after the IPv4 options.
    let tcp = ip + ihl;
    let ports: [u16; 2] = unsafe { *ptr_at(ctx, tcp)? };
    let doff_byte: u8 = unsafe { *ptr_at(ctx, tcp + 12)? };
    let doff = ((doff_byte >> 4) as usize) * 4;
    if doff < 20 {
        return Err(());
    }

    // The IP total length is the truth about payload size (XDP buffers may carry Ethernet
    // padding after it).
    let payload_len = total_len.checked_sub(ihl + doff).ok_or(())?;
    let payload_off = tcp + doff;
    if payload_len < 4 {
        return Err(());
    }

    // Look at the first 8 bytes: enough for the longest method token plus its space.
    let mut head = [0u8; 8];
    let head_len = if payload_len < 8 { payload_len } else { 8 };
    load_bytes(ctx, payload_off, &mut head, head_len)?;
    if !is_http_method(&head) {
        return Err(());
    }

    let Some(mut entry) = EVENTS.reserve::<RequestEvent>(0) else {
        return Err(());
    };
    let ev = entry.as_mut_ptr();
    let captured = if payload_len < CAPTURE_MAX { payload_len } else { CAPTURE_MAX };
    // bpf_xdp_load_bytes also reads from fragments of multi-buffer packets, so a request
    // whose start lies past the linear area is still captured safely.
    let copied = unsafe { load_bytes(ctx, payload_off, &mut (*ev).data, captured) };
    if copied.is_err() {
        entry.discard(0);
        return Err(());
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[..4].copy_from_slice(&saddr);
    dst[..4].copy_from_slice(&daddr);
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).saddr = src;
        (*ev).daddr = dst;
        (*ev).sport = u16::from_be(ports[0]);
        (*ev).dport = u16::from_be(ports[1]);
        (*ev).ifindex = (*ctx.ctx).ingress_ifindex;
        (*ev).family = FAMILY_IPV4;
        (*ev)._pad = [0; 3];
        (*ev).payload_len = payload_len as u32;
        (*ev).captured_len = captured as u32;
        (*ev)._pad2 = 0;
    }
    entry.submit(0);
    Ok(())
}

/// Copy `len` bytes (1..=buf.len()) at `offset` of the packet into `buf`.
#[inline(always)]
fn load_bytes<const N: usize>(
    ctx: &XdpContext,
    offset: usize,
    buf: &mut [u8; N],
    len: usize,
) -> Result<(), ()> {
    // The verifier needs len provably within 1..=N.
    if len == 0 || len > N {
        return Err(());
    }
    let rc = unsafe {
        bpf_xdp_load_bytes(ctx.ctx, offset as u32, buf.as_mut_ptr().cast(), len as u32)
    };
    if rc < 0 { Err(()) } else { Ok(()) }
}

/// Does the payload start with an HTTP/1.x request method followed by a space?
#[inline(always)]
fn is_http_method(h: &[u8; 8]) -> bool {
    match h[0] {
        b'G' => h[..4] == *b"GET ",
        b'H' => h[..5] == *b"HEAD ",
        b'P' => h[..4] == *b"PUT " || h[..5] == *b"POST " || h[..6] == *b"PATCH ",
        b'D' => h[..7] == *b"DELETE ",
        b'O' => h == b"OPTIONS ",
        b'C' => h == b"CONNECT ",
        b'T' => h[..6] == *b"TRACE ",
        _ => false,
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
