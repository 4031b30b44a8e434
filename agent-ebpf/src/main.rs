//! precedent's XDP program.
//!
//! For every packet: if its source address is in a block map (and the block has not expired
//! and the allowlist does not cover it), drop it. Otherwise, if it is a TCP segment whose
//! payload starts with an HTTP/1.x method token and a space, copy the start of the payload
//! into the `EVENTS` ring buffer. The only verdicts are pass and drop; packets are never
//! modified. Every outcome is counted in the per-CPU `COUNTERS` array.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod parse;

use agent_common::{
    BlockEntry, CAPTURE_DEFAULT, CAPTURE_MAX, COUNTER_COUNT, Config, Counter, EVENT_HEADER_LEN,
    EventBuf, MAX_ALLOW, MAX_BLOCKS,
};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, generated::bpf_xdp_load_bytes},
    macros::{map, xdp},
    maps::{Array, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::XdpContext,
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

/// Where an event is assembled: too big for the 512-byte BPF stack.
#[map]
static SCRATCH: PerCpuArray<EventBuf> = PerCpuArray::with_max_entries(1, 0);

#[map]
static BLOCK_V4: LpmTrie<[u8; 4], BlockEntry> = LpmTrie::with_max_entries(MAX_BLOCKS, 0);
#[map]
static BLOCK_V6: LpmTrie<[u8; 16], BlockEntry> = LpmTrie::with_max_entries(MAX_BLOCKS, 0);
#[map]
static ALLOW_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_ALLOW, 0);
#[map]
static ALLOW_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_ALLOW, 0);

#[xdp]
pub fn precedent(ctx: XdpContext) -> u32 {
    if inspect(&ctx) == Verdict::Drop {
        bump(Counter::Blocked);
        xdp_action::XDP_DROP
    } else {
        bump(Counter::Passed);
        xdp_action::XDP_PASS
    }
}

/// An empty program built alongside, so `cargo xtask bench-xdp` can report the cost of
/// `precedent` relative to doing nothing at all.
#[xdp]
pub fn baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[derive(PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
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
    let blocked = if h.is_v6 {
        is_blocked(&BLOCK_V6, &ALLOW_V6, Key::new(128, h.saddr))
    } else {
        let mut v4 = [0u8; 4];
        v4.copy_from_slice(&h.saddr[..4]);
        is_blocked(&BLOCK_V4, &ALLOW_V4, Key::new(32, v4))
    };
    if blocked {
        return Verdict::Drop;
    }
    if h.ipv6_ext {
        bump(Counter::Ipv6ExtHeader);
        return Verdict::Pass;
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
    }
}

/// Looks the source up in the block trie (longest prefix); an expired block or an allowlist
/// match lets the packet through.
#[inline(always)]
fn is_blocked<K>(block: &LpmTrie<K, BlockEntry>, allow: &LpmTrie<K, u8>, key: Key<K>) -> bool {
    let Some(entry) = block.get(&key) else {
        return false;
    };
    if unsafe { bpf_ktime_get_ns() } >= entry.expires_ns {
        bump(Counter::BlockExpired);
        return false;
    }
    if allow.get(&key).is_some() {
        bump(Counter::Allowlisted);
        return false;
    }
    // Map values are shared by all CPUs: add atomically (BPF_ATOMIC_ADD). The BPF target
    // exposes no stable atomic types, hence the intrinsic.
    let dropped = &entry.dropped as *const u64 as *mut u64;
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(dropped, 1) };
    true
}

/// Sends the start of an HTTP/1.x request to the ring buffer, if the payload is one.
#[inline(always)]
fn capture(ctx: &XdpContext, h: &Headers) -> Result<(), Skip> {
    if !h.is_tcp || h.payload_len < 4 {
        return Err(Skip::NotInteresting);
    }
    let mut head = [0u8; 8];
    parse::payload_head(ctx, h, &mut head)?;
    if !parse::is_http_method(head) {
        if parse::is_http2_preface(head) {
            return Err(Skip::Http2);
        }
        return Err(Skip::NotInteresting);
    }

    let limit = match CONFIG.get(0) {
        Some(c) if c.capture_len != 0 => c.capture_len as usize,
        _ => CAPTURE_DEFAULT as usize,
    };
    let mut captured = if h.payload_len < limit {
        h.payload_len
    } else {
        limit
    };
    if captured > CAPTURE_MAX {
        captured = CAPTURE_MAX;
    }
    if captured == 0 {
        return Err(Skip::NotInteresting);
    }

    let buf = SCRATCH.get_ptr_mut(0).ok_or(Skip::NotInteresting)?;
    // bpf_xdp_load_bytes also reads from the fragments of multi-buffer packets.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            h.payload_off as u32,
            (*buf).data.as_mut_ptr().cast(),
            captured as u32,
        )
    };
    if rc < 0 {
        return Err(parse::out_of_reach(ctx));
    }
    unsafe {
        let hdr = &mut (*buf).header;
        hdr.ts_ns = bpf_ktime_get_ns();
        hdr.saddr = h.saddr;
        hdr.daddr = h.daddr;
        hdr.sport = h.sport;
        hdr.dport = h.dport;
        hdr.ifindex = (*ctx.ctx).ingress_ifindex;
        hdr.family = if h.is_v6 { 6 } else { 4 };
        hdr.payload_len = h.payload_len as u32;
        hdr.captured_len = captured as u32;
    }
    // Only the header and the captured bytes go to the ring, not the whole scratch buffer.
    let event = unsafe {
        core::slice::from_raw_parts(buf.cast::<u8>().cast_const(), EVENT_HEADER_LEN + captured)
    };
    if EVENTS.output::<[u8]>(event, 0).is_err() {
        bump(Counter::RingbufFull);
        return Ok(());
    }
    bump(Counter::Captured);
    if h.payload_len > captured {
        bump(Counter::Truncated);
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
