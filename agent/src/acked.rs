//! Requests count only once the server's TCP stack acknowledged them.
//!
//! The XDP program runs before the stack, so it also sees segments the stack throws away: a
//! request from a forged source address (no connection: the stack answers with a reset, or
//! not at all), a segment with a bad checksum, data outside the receive window, bytes the
//! stack already had. None of them reached the server, yet each would be learned from, could
//! satisfy a precedence rule ("a balance lookup came first") and, with a forged address,
//! could get someone else's address blocked with one packet.
//!
//! The egress program reports when the server acknowledges the newest captured bytes of a
//! connection (an `ACK_RECORD` in the ring, see `AckWatch` in agent-common). Here each
//! captured record waits until an acknowledgement of its connection reaches its end; what is
//! not acknowledged within [`ACK_WAIT`] is dropped and counted. The stack acknowledges on
//! receipt (within its delayed-ACK time, 40 ms to 200 ms on Linux), whatever the application
//! does, so the wait adds that much to detection and never a server's response time.
//!
//! Two more cases are settled here:
//! - a record that starts at bytes acknowledged before it came starts among bytes the server
//!   already had (a retransmission, or bytes forged behind the stream, longer ones too): the
//!   server did not read a request from there; dropped, counted `stale` (the XDP program
//!   drops whole copies itself, once it saw the handshake). A retransmission that joins old
//!   bytes and a new pipelined request in one segment loses that request too: TCP does that
//!   only after a lost acknowledgement, and the alternative would let forged bytes through;
//! - a record at the start of one still waiting, with other bytes, means the waiting one was
//!   not taken (or it would have been acknowledged): it is replaced, counted `superseded`.
//!   That is a segment with a bad checksum followed by the real one, the classic insertion.
//!
//! Records of one connection leave in the order they came. Memory is bounded: at most
//! [`MAX_WAITING`] records wait and [`MAX_CONNECTIONS`] connections are remembered.
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use serde::Serialize;

use crate::capture::CapturedRequest;

/// How long a record waits for its acknowledgement (nanoseconds).
pub const ACK_WAIT_NS: u64 = 2_000_000_000;
/// How long a connection with nothing waiting is remembered (its last acknowledgement tells
/// stale copies apart): as long as the reassembler remembers connections.
const REMEMBER_NS: u64 = 120_000_000_000;
/// Records waiting at once; beyond it, new records are dropped (counted `overflow`).
pub const MAX_WAITING: usize = 65_536;
/// Connections remembered at once (as many as the kernel's `ACKS` map holds).
pub const MAX_CONNECTIONS: usize = agent_common::ACK_FLOWS as usize;

/// What became of the records that came through, for `status` and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AckCounters {
    /// Records the server acknowledged, handed on.
    pub acknowledged: u64,
    /// Records not acknowledged within [`ACK_WAIT_NS`]: dropped.
    pub unacknowledged: u64,
    /// Records of bytes acknowledged before they came: dropped.
    pub stale: u64,
    /// Records replaced by other bytes at the same place before an acknowledgement: dropped.
    pub superseded: u64,
    /// Records dropped because [`MAX_WAITING`] records or [`MAX_CONNECTIONS`] connections
    /// were already waiting.
    pub overflow: u64,
}

type Conn = (SocketAddr, SocketAddr);

#[derive(Default)]
struct Connection {
    /// The newest acknowledgement reported (None until the first).
    acked: Option<u32>,
    /// Records waiting, oldest first, with the time they stop waiting.
    waiting: VecDeque<(u64, CapturedRequest)>,
    /// Last time anything came for the connection.
    seen_ns: u64,
}

/// The waiting room. With `enabled` false (no egress program attached) records pass straight
/// through.
pub struct AckGate {
    enabled: bool,
    conns: HashMap<Conn, Connection>,
    waiting: usize,
    counters: AckCounters,
}

/// `a` is at or past `b` in sequence space.
fn reaches(a: u32, b: u32) -> bool {
    a.wrapping_sub(b) as i32 >= 0
}

/// Sequence number just past a record's bytes.
fn end_of(r: &CapturedRequest) -> u32 {
    r.seq.wrapping_add(r.data.len() as u32)
}

impl AckGate {
    pub fn new(enabled: bool) -> Self {
        AckGate {
            enabled,
            conns: HashMap::new(),
            waiting: 0,
            counters: AckCounters::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn counters(&self) -> AckCounters {
        self.counters
    }

    /// Records waiting for their acknowledgement.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Takes one record from the ring: a request record waits (or is dropped, see the module
    /// documentation); an acknowledgement releases the records it covers, returned in order.
    pub fn push(&mut self, rec: CapturedRequest) -> Vec<CapturedRequest> {
        if !self.enabled {
            return if rec.is_ack() { Vec::new() } else { vec![rec] };
        }
        let key = (rec.client, rec.server);
        let now = rec.ts_unix_ns;
        if rec.is_ack() {
            let Some(c) = self.conns.get_mut(&key) else {
                return Vec::new();
            };
            c.seen_ns = c.seen_ns.max(now);
            if c.acked.is_none_or(|a| reaches(rec.seq, a)) {
                c.acked = Some(rec.seq);
            }
            let ack = rec.seq;
            let mut out = Vec::new();
            let mut kept = VecDeque::with_capacity(c.waiting.len());
            for (deadline, r) in c.waiting.drain(..) {
                if reaches(ack, end_of(&r)) {
                    out.push(r);
                } else {
                    kept.push_back((deadline, r));
                }
            }
            c.waiting = kept;
            self.waiting -= out.len();
            self.counters.acknowledged += out.len() as u64;
            return out;
        }
        if self.waiting >= MAX_WAITING
            || (self.conns.len() >= MAX_CONNECTIONS && !self.conns.contains_key(&key))
        {
            self.counters.overflow += 1;
            return Vec::new();
        }
        let c = self.conns.entry(key).or_default();
        c.seen_ns = c.seen_ns.max(now);
        // The server already had the bytes at the record's start: what it read there came
        // first, so no request starts there now (a longer copy's new tail continues whatever
        // was there; it is not read from the start of this one).
        if c.acked.is_some_and(|a| !reaches(rec.seq, a)) {
            self.counters.stale += 1;
            return Vec::new();
        }
        if rec.piece == 0
            && let Some(i) = c
                .waiting
                .iter()
                .position(|(_, w)| w.piece == 0 && w.seq == rec.seq && w.data != rec.data)
        {
            c.waiting.remove(i);
            self.waiting -= 1;
            self.counters.superseded += 1;
        }
        c.waiting.push_back((now.saturating_add(ACK_WAIT_NS), rec));
        self.waiting += 1;
        Vec::new()
    }

    /// Drops the records whose wait is over at `now_ns`, and forgets connections quiet for
    /// long with nothing waiting.
    pub fn expire(&mut self, now_ns: u64) {
        let mut dropped = 0;
        self.conns.retain(|_, c| {
            let before = c.waiting.len();
            c.waiting.retain(|(deadline, _)| *deadline > now_ns);
            dropped += before - c.waiting.len();
            !c.waiting.is_empty() || now_ns.saturating_sub(c.seen_ns) < REMEMBER_NS
        });
        self.waiting -= dropped;
        self.counters.unacknowledged += dropped as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::ACK_RECORD;

    const T0: u64 = 1_790_000_000_000_000_000;

    fn rec(port: u16, seq: u32, data: &[u8], piece: u8, ts: u64) -> CapturedRequest {
        CapturedRequest {
            ts_unix_ns: ts,
            client: SocketAddr::from(([10, 0, 0, 2], port)),
            server: SocketAddr::from(([10, 0, 0, 1], 8080)),
            seq,
            payload_len: data.len() as u32,
            piece,
            data: data.to_vec(),
        }
    }

    fn ack(port: u16, ack: u32, ts: u64) -> CapturedRequest {
        rec(port, ack, b"", ACK_RECORD, ts)
    }

    const GET: &[u8] = b"GET /balance HTTP/1.1\r\n\r\n";
    const POST: &[u8] = b"POST /transferFunds HTTP/1.1\r\n\r\n";

    #[test]
    fn a_record_leaves_once_an_acknowledgement_reaches_its_end() {
        let mut g = AckGate::new(true);
        assert!(g.push(rec(1, 100, GET, 0, T0)).is_empty());
        assert_eq!(g.waiting(), 1);
        // Short of the end: the server has not got all of it.
        assert!(g.push(ack(1, 100 + GET.len() as u32 - 1, T0)).is_empty());
        // Another connection's acknowledgement releases nothing here.
        assert!(g.push(ack(2, 10_000, T0)).is_empty());
        let out = g.push(ack(1, 100 + GET.len() as u32, T0));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data, GET);
        assert_eq!(g.waiting(), 0);
        assert_eq!(g.counters().acknowledged, 1);
    }

    #[test]
    fn records_leave_in_order_and_one_never_acknowledged_is_dropped_after_the_wait() {
        let mut g = AckGate::new(true);
        let a = 5000u32;
        g.push(rec(1, a, GET, 0, T0));
        // Forged far ahead of the stream (outside the window): never acknowledged.
        g.push(rec(1, a + 1_000_000, GET, 0, T0 + 1));
        g.push(rec(1, a + GET.len() as u32, POST, 0, T0 + 2));
        let out = g.push(ack(1, a + (GET.len() + POST.len()) as u32, T0 + 3));
        assert_eq!(
            out.iter().map(|r| r.data.as_slice()).collect::<Vec<_>>(),
            vec![GET, POST]
        );
        assert_eq!(g.waiting(), 1);
        g.expire(T0 + ACK_WAIT_NS);
        assert_eq!(g.waiting(), 1, "the wait is not over yet");
        g.expire(T0 + ACK_WAIT_NS + 2);
        assert_eq!(g.waiting(), 0);
        assert_eq!(g.counters().unacknowledged, 1);
    }

    #[test]
    fn a_forged_request_with_no_connection_never_leaves() {
        let mut g = AckGate::new(true);
        assert!(g.push(rec(9, 1234, POST, 0, T0)).is_empty());
        // The server answers a segment of no connection with a reset, which the egress
        // program does not report; nothing else comes.
        g.expire(T0 + 3 * ACK_WAIT_NS);
        assert_eq!(g.counters().unacknowledged, 1);
        assert_eq!(g.counters().acknowledged, 0);
    }

    #[test]
    fn bytes_acknowledged_before_they_came_are_stale() {
        let mut g = AckGate::new(true);
        g.push(rec(1, 100, GET, 0, T0));
        let end = 100 + GET.len() as u32;
        assert_eq!(g.push(ack(1, end, T0)).len(), 1);
        // The same bytes again (the client missed the acknowledgement), other bytes forged
        // behind the stream, longer than what was acknowledged too: the server read none of
        // them as a request.
        assert!(g.push(rec(1, 100, GET, 0, T0 + 1)).is_empty());
        assert!(g.push(rec(1, 100, POST, 0, T0 + 1)).is_empty());
        assert!(g.push(rec(1, 110, GET, 0, T0 + 1)).is_empty());
        assert_eq!(g.counters().stale, 3);
        assert_eq!(g.waiting(), 0);
        // What follows in the stream still waits as usual, across the sequence wrap too.
        let mut g = AckGate::new(true);
        let near_wrap = u32::MAX - 10;
        g.push(rec(1, near_wrap, GET, 0, T0));
        assert_eq!(
            g.push(ack(1, near_wrap.wrapping_add(GET.len() as u32), T0))
                .len(),
            1
        );
        g.push(rec(
            1,
            near_wrap.wrapping_add(GET.len() as u32),
            POST,
            0,
            T0,
        ));
        assert_eq!(g.waiting(), 1);
        assert_eq!(g.counters().stale, 0);
    }

    #[test]
    fn other_bytes_at_the_place_of_a_waiting_record_replace_it() {
        // The insertion attack: a balance lookup with a bad checksum (the stack drops it),
        // then the real segment at the same place, then the transfer.
        let mut g = AckGate::new(true);
        g.push(rec(1, 100, GET, 0, T0));
        let filler = b"GET /favicon.ico HTTP/1.1\r\n\r\n";
        g.push(rec(1, 100, filler, 0, T0 + 1));
        g.push(rec(1, 100 + filler.len() as u32, POST, 0, T0 + 2));
        let out = g.push(ack(1, 100 + (filler.len() + POST.len()) as u32, T0 + 3));
        assert_eq!(
            out.iter().map(|r| r.data.as_slice()).collect::<Vec<_>>(),
            vec![filler.as_slice(), POST]
        );
        assert_eq!(g.counters().superseded, 1);
        // The same bytes again are a retransmission, left for the reassembler to drop.
        let mut g = AckGate::new(true);
        g.push(rec(1, 100, GET, 0, T0));
        g.push(rec(1, 100, GET, 0, T0 + 1));
        assert_eq!(g.waiting(), 2);
        assert_eq!(g.counters().superseded, 0);
    }

    #[test]
    fn disabled_it_passes_requests_and_ignores_acknowledgements() {
        let mut g = AckGate::new(false);
        assert_eq!(g.push(rec(1, 100, GET, 0, T0)).len(), 1);
        assert!(g.push(ack(1, 1000, T0)).is_empty());
        assert_eq!(g.waiting(), 0);
    }

    #[test]
    fn memory_is_bounded_by_waiting_records_and_connections() {
        let mut g = AckGate::new(true);
        for i in 0..(MAX_WAITING + 100) as u32 {
            // Forged records from ever new ports: none is acknowledged.
            g.push(rec((i % 60_000) as u16, i, POST, 0, T0));
        }
        assert_eq!(g.waiting(), MAX_WAITING);
        assert!(g.conns.len() <= MAX_CONNECTIONS);
        assert_eq!(g.counters().overflow, 100);
        g.expire(T0 + ACK_WAIT_NS + 1);
        assert_eq!(g.waiting(), 0);
        // Quiet connections are forgotten once nothing waits and they are old enough.
        g.expire(T0 + REMEMBER_NS + 1);
        assert!(g.conns.is_empty());
    }
}
