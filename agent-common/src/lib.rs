//! Types shared by the XDP program (`agent-ebpf`) and the userspace agent.
//!
//! Every struct here crosses the kernel/user boundary byte for byte, so each is `#[repr(C)]`
//! with explicit padding and a size checked at compile time.
#![no_std]

/// Largest request prefix an event can carry (request line plus the first headers).
pub const CAPTURE_MAX: usize = 512;

/// Address family tags used in [`RequestEvent::family`].
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// One captured HTTP/1.x request start, sent from XDP to userspace through the ring buffer.
///
/// Addresses are stored in 16 bytes; an IPv4 address occupies the first 4 (network order).
/// Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RequestEvent {
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
    /// How many bytes of `data` are valid.
    pub captured_len: u32,
    pub _pad2: u32,
    pub data: [u8; CAPTURE_MAX],
}

const _: () = assert!(core::mem::size_of::<RequestEvent>() == 64 + CAPTURE_MAX);

#[cfg(feature = "user")]
mod user {
    // SAFETY: RequestEvent is repr(C), Copy, and every bit pattern is valid for its fields.
    unsafe impl aya::Pod for super::RequestEvent {}
}
