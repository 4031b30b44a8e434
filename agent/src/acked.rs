//! Requests count only once the server's TCP stack acknowledged them.
//!
//! The XDP program runs before the stack, so it also sees segments the stack throws away: a
//! request from a forged source address (no connection: the stack answers with a reset, or
//! not at all), a segment with a bad checksum, data outside the receive window, bytes the
//! stack already had. None of them reached the server, yet each would be learned from, could
//! satisfy a precedence rule ("a balance lookup came first") and, with a forged address,
//! could get someone else's address blocked with one packet.
//!
//! The egress program reports the server's acknowledgements on a connection while captured
//! bytes of it wait (an `ACK_RECORD` in the ring, see `AckWatch` in agent-common): each one
//! that moves on, not only the one reaching the newest capture's end, since that capture may
//! be a segment the stack dropped, which must not hold back the request before it. Here each
//! captured record waits until an acknowledgement of its connection reaches its end; what is
//! not acknowledged within [`ACK_WAIT`] is dropped and counted. The stack acknowledges on
//! receipt (within its delayed-ACK time, 40 ms to 200 ms on Linux), whatever the application
//! does, so the wait adds that much to detection and never a server's response time.
//!
//! Two more cases are settled here:
//! - a record that starts at bytes acknowledged before it came starts among bytes the server
//!   already had (a retransmission, or bytes forged behind the stream, longer ones too): the
//!   server did not read a request from there; dropped, counted `stale` (the XDP program
//!   drops whole copies itself, and reads a segment that goes on past the acknowledged point
//!   from there, where the server reads on: a retransmission joining old bytes and a new
//!   request, or a request hidden behind a byte already sent, is captured at that point and
//!   never reaches this check);
//! - a record at the start of one still waiting, with other bytes, replaces it, counted
//!   `superseded`. One copy being the start of the other is a client resending its bytes
//!   with more behind them. Copies that disagree are something no TCP stack does: either the
//!   stack dropped the first (a bad checksum, the classic insertion, with the real segment
//!   after it) or it kept the first and dropped the second as bytes it already had (a client
//!   racing the server's delayed ACK to show precedent a lookup in place of the transfer the
//!   server read). The two look the same from here, so once the position is acknowledged
//!   (the connection is real: a forged pair never is) the disagreement is reported as a
//!   [`Conflict`] for the engine to alert on (`conflicting_copies`), counted `conflicting`.
//!   The same holds for the pieces of a header split over segments: the XDP program captures
//!   a segment over bytes it already captured as pieces again (`COPY_PIECE`); one that
//!   disagrees with the waiting piece at its place takes that piece's place and number, with
//!   the conflict; one that agrees, or finds no piece there, is dropped (counted
//!   `piece_copies`): the pieces the reassembler joins are those the server acknowledged.
//!
//! Records of one connection leave in the order they came. Memory is bounded: at most
//! [`MAX_WAITING`] records wait (past it, the longest-waiting goes: see there) and
//! [`MAX_CONNECTIONS`] connections' acknowledgements are remembered.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;

use agent_common::seq_reaches;
use serde::Serialize;

use crate::capture::CapturedRequest;

/// How long a record waits for its acknowledgement (nanoseconds).
pub const ACK_WAIT_NS: u64 = 2_000_000_000;
/// How long a connection's last acknowledgement is remembered once nothing waits on it (it
/// tells stale copies apart): as long as the reassembler remembers connections.
const REMEMBER_NS: u64 = 120_000_000_000;
/// Records waiting at once. Beyond it the one that has waited longest is dropped (counted
/// `overflow`): the server acknowledges within its delayed-ACK time, so a record still
/// waiting after that is most likely one it never received. A flood of spoofed requests meant
/// to crowd real ones out must then outpace `MAX_WAITING` records per delayed-ACK time
/// (about 330,000 a second at 200 ms), where refusing new records gave up at 33,000 a second.
pub const MAX_WAITING: usize = 65_536;
/// Records waiting on one connection at once; beyond it the connection's oldest goes (counted
/// `overflow`). A real client has a few requests (and pieces of them) in flight before the
/// server's acknowledgement; a flood forged on one connection's addresses and ports would
/// otherwise make every record's search of the connection's queue as long as the flood.
pub const MAX_PER_CONNECTION: usize = 256;
/// Connections whose last acknowledgement is remembered at once (as many as the kernel's
/// `ACKS` map holds). Only connections the server acknowledged get in, so spoofed traffic
/// cannot fill it; past it, a new connection's acknowledgements are not remembered (the XDP
/// program still skips stale copies of what it saw acknowledged).
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
    /// Records dropped, the longest-waiting first, to keep at most [`MAX_WAITING`] waiting.
    pub overflow: u64,
    /// Acknowledged positions the client had sent two disagreeing copies of (see [`Conflict`]).
    pub conflicting: u64,
    /// Copies of pieces that agreed with the piece at their place, or found none waiting
    /// there (a retransmission, mostly): dropped.
    pub piece_copies: u64,
}

/// Two copies of the start of a request (or of a piece of one) at the same place in a
/// connection's stream that disagree, the place since acknowledged by the server. The server read one of them and
/// precedent analysed `analysed`, the later; which one the server read cannot be told from
/// outside its TCP stack (see the module documentation), hence the alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// When the acknowledgement came.
    pub ts_unix_ns: u64,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub seq: u32,
    /// 0 for copies of a request's start, n for copies of its nth piece.
    pub piece: u8,
    /// The first copy that disagreed with the analysed one.
    pub replaced: Vec<u8>,
    pub analysed: Vec<u8>,
}

/// Conflicts kept for [`AckGate::take_conflicts`]; the daemon takes them after every record,
/// so this only bounds a caller that never does.
const MAX_CONFLICTS: usize = 1024;

/// Whether two copies of bytes at the same place disagree: as far as both go (a copy may
/// be shorter, resent with less or more behind it, or cut by the capture length).
fn disagree(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().min(b.len());
    a[..n] != b[..n]
}

type Conn = (SocketAddr, SocketAddr);

/// A record waiting, with its arrival number and the time it stops waiting.
struct Waiting {
    id: u64,
    deadline: u64,
    rec: CapturedRequest,
    /// An earlier copy at the same place that disagreed with this one.
    replaced: Option<Vec<u8>>,
}

/// A connection's newest acknowledgement, and when anything last came for it.
struct Acked {
    ack: u32,
    seen_ns: u64,
}

/// The waiting room. With `enabled` false (no egress program attached) records pass straight
/// through.
pub struct AckGate {
    enabled: bool,
    /// Records waiting, per connection, oldest first.
    waiting: HashMap<Conn, VecDeque<Waiting>>,
    /// Every waiting record's connection by arrival number: the first is the longest-waiting.
    by_arrival: BTreeMap<u64, Conn>,
    next_id: u64,
    /// Connections the server acknowledged on, with their newest acknowledgement.
    acked: HashMap<Conn, Acked>,
    /// Conflicts acknowledged and not yet taken.
    conflicts: Vec<Conflict>,
    counters: AckCounters,
}

/// Sequence number just past a record's bytes.
fn end_of(r: &CapturedRequest) -> u32 {
    r.seq.wrapping_add(r.data.len() as u32)
}

impl AckGate {
    pub fn new(enabled: bool) -> Self {
        AckGate {
            enabled,
            waiting: HashMap::new(),
            by_arrival: BTreeMap::new(),
            next_id: 0,
            acked: HashMap::new(),
            conflicts: Vec::new(),
            counters: AckCounters::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn counters(&self) -> AckCounters {
        self.counters
    }

    /// The newest acknowledgement the server sent on the connection, if it sent one (and it
    /// is still remembered): the bytes before it are the server's already.
    pub fn acknowledged(&self, client: SocketAddr, server: SocketAddr) -> Option<u32> {
        self.acked.get(&(client, server)).map(|a| a.ack)
    }

    /// The conflicts acknowledged since the last call, oldest first.
    pub fn take_conflicts(&mut self) -> Vec<Conflict> {
        std::mem::take(&mut self.conflicts)
    }

    /// Records waiting for their acknowledgement.
    pub fn waiting(&self) -> usize {
        self.by_arrival.len()
    }

    /// Takes one record from the ring: a request record waits (or is dropped, see the module
    /// documentation); an acknowledgement releases the records it covers, returned in order.
    pub fn push(&mut self, rec: CapturedRequest) -> Vec<CapturedRequest> {
        if !self.enabled {
            // Without acknowledgements nothing tells which copy of a piece the server kept:
            // the first captured stands, as when the program did not capture copies.
            if rec.is_piece_copy() {
                self.counters.piece_copies += 1;
            }
            return if rec.is_ack() || rec.is_piece_copy() {
                Vec::new()
            } else {
                vec![rec]
            };
        }
        if rec.is_ack() {
            self.acknowledge(rec)
        } else {
            self.wait(rec);
            Vec::new()
        }
    }

    fn acknowledge(&mut self, ack: CapturedRequest) -> Vec<CapturedRequest> {
        let key = (ack.client, ack.server);
        let now = ack.ts_unix_ns;
        let has_waiting = self.waiting.contains_key(&key);
        let room = self.acked.len() < MAX_CONNECTIONS;
        match self.acked.get_mut(&key) {
            Some(a) => {
                a.seen_ns = a.seen_ns.max(now);
                if seq_reaches(ack.seq, a.ack) {
                    a.ack = ack.seq;
                }
            }
            // Remembered only for connections that carried requests: the egress program also
            // reports the server's other connections, once each.
            None if has_waiting && room => {
                self.acked.insert(
                    key,
                    Acked {
                        ack: ack.seq,
                        seen_ns: now,
                    },
                );
            }
            None => {}
        }
        let Some(queue) = self.waiting.get_mut(&key) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(queue.len());
        for w in queue.drain(..) {
            if seq_reaches(ack.seq, end_of(&w.rec)) {
                self.by_arrival.remove(&w.id);
                if let Some(replaced) = w.replaced {
                    self.counters.conflicting += 1;
                    if self.conflicts.len() < MAX_CONFLICTS {
                        self.conflicts.push(Conflict {
                            ts_unix_ns: now,
                            client: w.rec.client,
                            server: w.rec.server,
                            seq: w.rec.seq,
                            piece: w.rec.piece,
                            replaced,
                            analysed: w.rec.data.clone(),
                        });
                    }
                }
                out.push(w.rec);
            } else {
                kept.push_back(w);
            }
        }
        *queue = kept;
        if queue.is_empty() {
            self.waiting.remove(&key);
        }
        self.counters.acknowledged += out.len() as u64;
        out
    }

    fn wait(&mut self, rec: CapturedRequest) {
        let key = (rec.client, rec.server);
        let now = rec.ts_unix_ns;
        // The server already had the bytes at the record's start: what it read there came
        // first, so no request starts there now (a longer copy's new tail continues whatever
        // was there; it is not read from the start of this one).
        if let Some(a) = self.acked.get_mut(&key) {
            a.seen_ns = a.seen_ns.max(now);
            if !seq_reaches(rec.seq, a.ack) {
                self.counters.stale += 1;
                return;
            }
        }
        if rec.is_piece_copy() {
            self.compare_piece(key, rec);
            return;
        }
        let mut replaced = None;
        if rec.piece == 0
            && let Some(queue) = self.waiting.get_mut(&key)
            && let Some(i) = queue
                .iter()
                .position(|w| w.rec.piece == 0 && w.rec.seq == rec.seq && w.rec.data != rec.data)
        {
            if let Some(w) = queue.remove(i) {
                self.by_arrival.remove(&w.id);
                // The first disagreement is the one reported, however many copies follow.
                replaced = w
                    .replaced
                    .or_else(|| disagree(&w.rec.data, &rec.data).then_some(w.rec.data));
            }
            self.counters.superseded += 1;
        }
        if self.by_arrival.len() >= MAX_WAITING {
            self.drop_longest_waiting();
        }
        let queue = self.waiting.entry(key).or_default();
        if queue.len() >= MAX_PER_CONNECTION
            && let Some(oldest) = queue.pop_front()
        {
            self.by_arrival.remove(&oldest.id);
            self.counters.overflow += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.by_arrival.insert(id, key);
        queue.push_back(Waiting {
            id,
            deadline: now.saturating_add(ACK_WAIT_NS),
            rec,
            replaced,
        });
    }

    /// Another copy of bytes captured as pieces: it takes the place (and number) of the
    /// waiting piece at its start when they disagree, and is dropped otherwise.
    fn compare_piece(&mut self, key: Conn, mut rec: CapturedRequest) {
        let Some(queue) = self.waiting.get_mut(&key) else {
            self.counters.piece_copies += 1;
            return;
        };
        let Some(w) = queue
            .iter_mut()
            .find(|w| w.rec.piece > 0 && w.rec.seq == rec.seq && disagree(&w.rec.data, &rec.data))
        else {
            self.counters.piece_copies += 1;
            return;
        };
        rec.piece = w.rec.piece;
        // Waiting as long as the piece it replaces did, in its place in the stream's order.
        let earlier = std::mem::replace(&mut w.rec, rec);
        w.replaced = w.replaced.take().or(Some(earlier.data));
        self.counters.superseded += 1;
    }

    fn drop_longest_waiting(&mut self) {
        let Some((id, key)) = self.by_arrival.pop_first() else {
            return;
        };
        if let Some(queue) = self.waiting.get_mut(&key) {
            queue.retain(|w| w.id != id);
            if queue.is_empty() {
                self.waiting.remove(&key);
            }
        }
        self.counters.overflow += 1;
    }

    /// Drops the records whose wait is over at `now_ns`, and forgets the acknowledgements of
    /// connections quiet for long with nothing waiting.
    pub fn expire(&mut self, now_ns: u64) {
        let by_arrival = &mut self.by_arrival;
        let mut dropped = 0;
        self.waiting.retain(|_, queue| {
            queue.retain(|w| {
                let keep = w.deadline > now_ns;
                if !keep {
                    by_arrival.remove(&w.id);
                    dropped += 1;
                }
                keep
            });
            !queue.is_empty()
        });
        self.counters.unacknowledged += dropped;
        let waiting = &self.waiting;
        self.acked.retain(|key, a| {
            now_ns.saturating_sub(a.seen_ns) < REMEMBER_NS || waiting.contains_key(key)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{ACK_RECORD, COPY_PIECE};

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
        // Copies that disagree: reported once the place is acknowledged, with both.
        assert_eq!(
            g.take_conflicts(),
            vec![Conflict {
                ts_unix_ns: T0 + 3,
                client: SocketAddr::from(([10, 0, 0, 2], 1)),
                server: SocketAddr::from(([10, 0, 0, 1], 8080)),
                seq: 100,
                piece: 0,
                replaced: GET.to_vec(),
                analysed: filler.to_vec(),
            }]
        );
        assert!(g.take_conflicts().is_empty(), "taken once");
        assert_eq!(g.counters().conflicting, 1);
        // The same bytes again are a retransmission, left for the reassembler to drop.
        let mut g = AckGate::new(true);
        g.push(rec(1, 100, GET, 0, T0));
        g.push(rec(1, 100, GET, 0, T0 + 1));
        assert_eq!(g.waiting(), 2);
        assert_eq!(g.counters().superseded, 0);
        g.push(ack(1, 100 + GET.len() as u32, T0 + 2));
        assert!(g.take_conflicts().is_empty());
    }

    #[test]
    fn copies_that_agree_as_far_as_both_go_are_no_conflict() {
        // A client resending its request with the next one joined behind it, and a copy cut
        // shorter by the capture length: one is the start of the other.
        let mut g = AckGate::new(true);
        let joined = [GET, POST].concat();
        g.push(rec(1, 100, GET, 0, T0));
        g.push(rec(1, 100, &joined, 0, T0 + 1));
        g.push(rec(1, 100, &joined[..10], 0, T0 + 2));
        assert_eq!(g.counters().superseded, 2);
        let out = g.push(ack(1, 100 + joined.len() as u32, T0 + 3));
        assert_eq!(out.len(), 1);
        assert!(g.take_conflicts().is_empty());
        assert_eq!(g.counters().conflicting, 0);
    }

    #[test]
    fn the_first_disagreement_is_reported_once_and_only_for_an_acknowledged_place() {
        // A client racing the server's delayed ACK: the transfer (which the server keeps),
        // then a lookup of the same length at the same place (which it drops as bytes it
        // already has), then the lookup again. precedent analyses the lookup; the conflict
        // names the transfer.
        let lookup = b"GET /balance HTTP/1.1\r\nX: 12\r\n\r\n";
        assert_eq!(lookup.len(), POST.len());
        let transfer = POST;
        let mut g = AckGate::new(true);
        g.push(rec(1, 100, transfer, 0, T0));
        g.push(rec(1, 100, lookup, 0, T0 + 1));
        g.push(rec(1, 100, lookup, 0, T0 + 2));
        let out = g.push(ack(1, 100 + lookup.len() as u32, T0 + 3));
        assert_eq!(out.len(), 2, "the lookup and its retransmission");
        let conflicts = g.take_conflicts();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].replaced, transfer);
        assert_eq!(conflicts[0].analysed, lookup);
        // A forged pair of disagreeing copies (no connection: never acknowledged) is no
        // conflict: nobody's address is alerted on from it.
        let mut g = AckGate::new(true);
        g.push(rec(9, 5000, transfer, 0, T0));
        g.push(rec(9, 5000, lookup, 0, T0 + 1));
        g.expire(T0 + ACK_WAIT_NS + 2);
        assert_eq!(g.counters().unacknowledged, 1);
        assert!(g.take_conflicts().is_empty());
        assert_eq!(g.counters().conflicting, 0);
    }

    #[test]
    fn a_copy_of_a_piece_that_disagrees_takes_its_place_and_one_that_agrees_is_dropped() {
        // `POST /api/v1/` + `transferFunds ...` split in two, the second piece first forged
        // (a bad checksum: the stack drops it) and then sent for real, with a third piece
        // between them.
        let start = b"POST /api/v1/";
        let forged = b"accounts HTTP/1.1\r\n";
        let real = b"transfer HTTP/1.1\r\n";
        let third = b"Host: bank.test\r\n\r\n";
        let (a, b) = (100, 100 + start.len() as u32);
        let c = b + real.len() as u32;
        let mut g = AckGate::new(true);
        g.push(rec(1, a, start, 0, T0));
        g.push(rec(1, b, forged, 1, T0 + 1));
        g.push(rec(1, c, third, 2, T0 + 2));
        g.push(rec(1, b, real, COPY_PIECE, T0 + 3));
        // Again (a retransmission of the real one): agrees, dropped.
        g.push(rec(1, b, real, COPY_PIECE, T0 + 4));
        // Over bytes no waiting piece starts at: dropped.
        g.push(rec(1, b + 3, &real[3..], COPY_PIECE, T0 + 4));
        let out = g.push(ack(1, c + third.len() as u32, T0 + 5));
        let got: Vec<(u8, &[u8])> = out.iter().map(|r| (r.piece, r.data.as_slice())).collect();
        assert_eq!(got, vec![(0, &start[..]), (1, &real[..]), (2, &third[..])]);
        let conflicts = g.take_conflicts();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(
            (
                conflicts[0].piece,
                conflicts[0].seq,
                conflicts[0].replaced.as_slice()
            ),
            (1, b, &forged[..])
        );
        assert_eq!((g.counters().superseded, g.counters().piece_copies), (1, 2));
        // Without acknowledgements the first copy stands.
        let mut g = AckGate::new(false);
        assert!(g.push(rec(1, b, real, COPY_PIECE, T0)).is_empty());
        assert_eq!(g.counters().piece_copies, 1);
    }

    #[test]
    fn disabled_it_passes_requests_and_ignores_acknowledgements() {
        let mut g = AckGate::new(false);
        assert_eq!(g.push(rec(1, 100, GET, 0, T0)).len(), 1);
        assert!(g.push(ack(1, 1000, T0)).is_empty());
        assert_eq!(g.waiting(), 0);
    }

    #[test]
    fn a_flood_of_spoofed_records_does_not_crowd_out_a_real_one() {
        let mut g = AckGate::new(true);
        // Spoofed request segments from ever new addresses (the stack answers them with
        // resets or not at all) fill the waiting room...
        let spoofed = |i: u32| {
            let mut r = rec((i % 50_000) as u16, i, POST, 0, T0);
            r.client.set_ip([10, 66, (i / 50_000) as u8, 9].into());
            r
        };
        for i in 0..MAX_WAITING as u32 {
            g.push(spoofed(i));
        }
        assert_eq!(g.waiting(), MAX_WAITING);
        // ... when a real request comes: it takes the place of the one that waited longest.
        g.push(rec(1, 100, GET, 0, T0 + 1));
        for i in 0..1000 {
            g.push(spoofed(MAX_WAITING as u32 + i));
        }
        let out = g.push(ack(1, 100 + GET.len() as u32, T0 + 40_000_000));
        assert_eq!(
            out.len(),
            1,
            "the real request is still there when its ACK comes"
        );
        assert_eq!(out[0].data, GET);
        assert_eq!(g.counters().overflow, 1001);
        assert_eq!(g.waiting(), MAX_WAITING - 1);
    }

    #[test]
    fn a_flood_on_one_connection_keeps_its_queue_short() {
        let mut g = AckGate::new(true);
        for i in 0..100_000u32 {
            // Forged on one connection's addresses and ports, each at new bytes.
            g.push(rec(7, 1_000 + i * 100, POST, 0, T0));
        }
        assert_eq!(g.waiting(), MAX_PER_CONNECTION);
        assert_eq!(g.counters().overflow, 100_000 - MAX_PER_CONNECTION as u64);
        // The connection's newest records are the ones kept.
        let last = 1_000 + 99_999 * 100;
        let out = g.push(ack(7, last + POST.len() as u32, T0 + 1));
        assert_eq!(out.len(), MAX_PER_CONNECTION);
        assert_eq!(out.last().unwrap().seq, last);
    }

    #[test]
    fn memory_is_bounded_by_waiting_records_and_connections() {
        let mut g = AckGate::new(true);
        for i in 0..(MAX_WAITING + 100) as u32 {
            // Forged records from ever new ports: none is acknowledged.
            g.push(rec((i % 60_000) as u16, i, POST, 0, T0));
        }
        assert_eq!(g.waiting(), MAX_WAITING);
        assert!(g.waiting.len() <= MAX_WAITING);
        assert_eq!(g.counters().overflow, 100);
        g.expire(T0 + ACK_WAIT_NS + 1);
        assert_eq!(g.waiting(), 0);
        assert!(g.waiting.is_empty());
        // Acknowledged connections are remembered, at most MAX_CONNECTIONS of them, and
        // forgotten once nothing waits and they are old enough.
        for i in 0..(MAX_CONNECTIONS + 10) as u32 {
            let port = (i % 60_000) as u16;
            let ip = (i / 60_000) as u8;
            let mut r = rec(port, 0, GET, 0, T0);
            r.client.set_ip([10, 1, ip, 2].into());
            g.push(r.clone());
            let mut a = ack(port, GET.len() as u32, T0);
            a.client = r.client;
            assert_eq!(g.push(a).len(), 1);
        }
        assert_eq!(g.acked.len(), MAX_CONNECTIONS);
        g.expire(T0 + REMEMBER_NS + 1);
        assert!(g.acked.is_empty());
    }
}
