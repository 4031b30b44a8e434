//! Puts back together request headers the XDP program captured in pieces.
//!
//! A client may write a request in several TCP segments: some clients write the request line
//! and the headers apart, and an attacker can split `GET /transferFunds` as `GE` +
//! `T /transferFunds` so that no single segment looks like the request. The program then
//! captures the segment that starts the request (piece 0) and, in sequence, the segments that
//! continue its header (pieces 1, 2, ...; see `FOLLOW_MAX_PIECES` in agent-common). This module
//! joins them per connection and hands on one request once its header is complete, the
//! capture length is reached, or the pieces stop coming, so the engine sees what the server
//! sees.
//!
//! It also keeps, per connection, where the body of the last request ends when that is past the
//! captured bytes (its Content-Length, placed by the TCP sequence number each record carries).
//! The server reads the bytes up to there as body, so a segment among them is not a request,
//! however much it looks like one: an attacker who sends `POST /notes` with a body of
//! `GET /balance HTTP/1.1 ...` in a segment of its own must not be credited with a balance
//! lookup the server never made. A request that begins after such a body, in a segment the
//! program captured, is taken from where the body ends.
//!
//! It is plain state, with time passed in: the daemon and the pcap replay drive the same code.
use std::{collections::VecDeque, net::SocketAddr};

use agent_common::FOLLOW_MAX_PIECES;
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::{
    capture::CapturedRequest,
    http::{self, Tail},
};

/// How long a request waits for its next piece before it is handed on as it is: a little
/// longer than the XDP program follows a quiet connection, so that a piece the program still
/// captures is never one the reassembler has given up on.
pub const IDLE_NS: u64 = agent_common::FOLLOW_IDLE_NS + 5_000_000_000;

/// Requests waiting for pieces at once; beyond it the oldest is handed on as it is. Each holds
/// at most the capture length.
pub const MAX_PENDING: usize = 4_096;

/// How long the end of an unfinished body is remembered after the segment that announced
/// it: servers wait about this long for the rest of a body (nginx's `client_body_timeout` is
/// 60 s), and a segment sent later than that is no longer read as body.
pub const BODY_IDLE_NS: u64 = 120_000_000_000;

/// Connections whose body end is remembered at once; beyond it the oldest is forgotten (a
/// look-alike request in that body would then be taken as a request).
pub const MAX_BODIES: usize = 16_384;

/// A client and a server address: one TCP connection.
type Conn = (SocketAddr, SocketAddr);

/// What reassembly did, for `status` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReassemblyCounters {
    /// Requests put together from two or more pieces.
    pub reassembled: u64,
    /// Requests handed on before their header was complete: the pieces stopped coming (idle),
    /// one was lost (a gap in the numbering), the connection started another request, or too
    /// many requests were waiting. The engine gets what was captured.
    pub incomplete: u64,
    /// Pieces that continued no waiting request. Mostly harmless: a request whose body begins
    /// in its first segment has its header already, and the next segment is body.
    pub stray_pieces: u64,
    /// Segments that looked like the start of a request but lay inside the body an earlier
    /// request on the connection announced: the server reads them as body, so the engine
    /// does not see them as requests.
    pub inside_body: u64,
    /// Request starts captured again: the same bytes at the same place in the connection's
    /// stream (a client resending a segment whose acknowledgement it missed). The server's TCP
    /// stack drops the copy; so does the reassembler, or the request would count twice.
    pub retransmitted: u64,
    /// Request starts at the place in the stream of the connection's previous one, with other
    /// bytes: the server's TCP stack took at most one of them (the other had a bad checksum,
    /// say, as in an attempt to show the analysis a request the server never read). Both are
    /// handed on; this counts that it happened.
    pub start_conflicts: u64,
}

/// A request waiting for its next piece.
struct Pending {
    /// The request's bytes so far; `req.seq` is the sequence number of the first.
    req: CapturedRequest,
    /// Bytes the program has captured in this following (its capture length bounds them);
    /// more than `req.data` when the segment began with requests handed on already.
    captured: usize,
    next_piece: u8,
    /// When the last piece came (the request's clock).
    last_ns: u64,
    /// Its place in `order`.
    ticket: u64,
}

/// Per-connection reassembly of captured request headers.
pub struct Reassembler {
    /// The capture length the program uses: a request this long has all it will get.
    limit: usize,
    pending: FxHashMap<Conn, Pending>,
    /// Waiting requests, oldest first, by ticket; entries of requests already handed on are
    /// skipped when met (their ticket no longer matches).
    order: VecDeque<(Conn, u64)>,
    next_ticket: u64,
    bodies: Bodies,
    starts: Starts,
    counters: ReassemblyCounters,
}

/// The last request start captured on each connection (per slot of a fixed table: a
/// connection whose slot another took has simply no last start), to tell a retransmission
/// from a request.
struct Starts {
    slots: Box<[Option<Start>]>,
    /// Seeded at random (foldhash, as hashbrown's maps): an attacker who could make two
    /// different segments hash alike would have the second (the one the server read) dropped
    /// as a copy of the first. Hashing a 512-byte capture costs tens of nanoseconds, where
    /// SipHash would cost hundreds on every request.
    hasher: hashbrown::DefaultHashBuilder,
}

/// A request start, by keyed hashes of its connection and bytes (24 bytes, not the 64 of two
/// socket addresses).
#[derive(Clone, Copy)]
struct Start {
    conn: u64,
    seq: u32,
    payload_len: u32,
    bytes: u64,
}

/// Slots of [`Starts`]: 16,384 connections, 512 KB.
const START_SLOTS: usize = 16_384;

/// What a request start is, next to the connection's last one.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    New,
    Retransmitted,
    Conflicting,
}

impl Starts {
    fn new() -> Self {
        Self {
            slots: vec![None; START_SLOTS].into_boxed_slice(),
            hasher: hashbrown::DefaultHashBuilder::default(),
        }
    }

    /// Compares `req` (a request start) with the last start of its connection, and remembers it.
    fn see(&mut self, conn: Conn, req: &CapturedRequest) -> Seen {
        const { assert!(std::mem::size_of::<Option<Start>>() == 32) };
        use std::hash::BuildHasher as _;
        let conn = self.hasher.hash_one(conn);
        let slot = conn as usize % START_SLOTS;
        let start = Start {
            conn,
            seq: req.seq,
            payload_len: req.payload_len,
            bytes: self.hasher.hash_one(&req.data),
        };
        let seen = match self.slots[slot] {
            Some(last) if last.conn == conn && last.seq == req.seq => {
                if last.payload_len == start.payload_len && last.bytes == start.bytes {
                    Seen::Retransmitted
                } else {
                    Seen::Conflicting
                }
            }
            _ => Seen::New,
        };
        self.slots[slot] = Some(start);
        seen
    }
}

/// Where the unfinished body of each connection's last request ends.
#[derive(Default)]
struct Bodies {
    open: FxHashMap<Conn, Body>,
    /// Connections by when their body was announced, oldest first; entries whose body has
    /// since ended or been replaced are skipped when met (their `since` no longer matches).
    order: VecDeque<(Conn, u64)>,
}

#[derive(Clone, Copy)]
struct Body {
    /// Sequence number of the first byte after the body.
    end: u32,
    /// When it was announced (the records' clock).
    since: u64,
    /// The program's following of the segment that announced it, when it goes on: the next
    /// piece's number and the bytes captured so far (a body that continues in the next
    /// segment leaves the segment without `\r\n\r\n` at its end, so it is followed).
    next_piece: u8,
    captured: usize,
}

impl Bodies {
    fn insert(&mut self, conn: Conn, body: Body, now_ns: u64) {
        self.expire(now_ns);
        if self.open.len() >= MAX_BODIES && !self.open.contains_key(&conn) {
            while let Some((c, since)) = self.order.pop_front() {
                if self.open.get(&c).is_some_and(|b| b.since == since) {
                    self.open.remove(&c);
                    break;
                }
            }
        }
        self.open.insert(conn, body);
        self.order.push_back((conn, body.since));
        if self.order.len() > 2 * MAX_BODIES {
            let open = &self.open;
            self.order
                .retain(|(c, t)| open.get(c).is_some_and(|b| b.since == *t));
        }
    }

    /// Forgets bodies announced more than [`BODY_IDLE_NS`] before `now_ns`.
    fn expire(&mut self, now_ns: u64) {
        while let Some(&(c, since)) = self.order.front() {
            if now_ns.saturating_sub(since) <= BODY_IDLE_NS {
                break;
            }
            self.order.pop_front();
            if self.open.get(&c).is_some_and(|b| b.since == since) {
                self.open.remove(&c);
            }
        }
    }
}

/// Whether the program goes on following after capturing this record (`captured`: its count
/// so far in the following): the segment was taken whole, the capture length is not spent,
/// pieces are left, and the segment does not end a header.
fn program_follows(req: &CapturedRequest, captured: usize, limit: usize) -> bool {
    !req.truncated()
        && captured < limit
        && req.piece < FOLLOW_MAX_PIECES
        && !req.data.ends_with(HEADER_END)
}

/// Requests ready for the engine after one [`Reassembler::push`], in order: at most an earlier
/// request of the same connection handed on incomplete, then the one just completed.
#[derive(Debug, Default)]
pub struct Ready {
    pub earlier: Option<CapturedRequest>,
    pub now: Option<CapturedRequest>,
}

impl IntoIterator for Ready {
    type Item = CapturedRequest;
    type IntoIter = std::iter::Chain<
        std::option::IntoIter<CapturedRequest>,
        std::option::IntoIter<CapturedRequest>,
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.earlier.into_iter().chain(self.now)
    }
}

/// Where a request header ends.
const HEADER_END: &[u8] = b"\r\n\r\n";

impl Reassembler {
    /// `capture_len`: the program's capture length in bytes.
    pub fn new(capture_len: usize) -> Self {
        Self {
            limit: capture_len.max(1),
            pending: FxHashMap::default(),
            order: VecDeque::new(),
            next_ticket: 0,
            bodies: Bodies::default(),
            starts: Starts::new(),
            counters: ReassemblyCounters::default(),
        }
    }

    /// Follows a change of the program's capture length.
    pub fn set_capture_len(&mut self, capture_len: usize) {
        self.limit = capture_len.max(1);
    }

    pub fn counters(&self) -> ReassemblyCounters {
        self.counters
    }

    /// Requests waiting for pieces.
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }

    /// Takes one captured record (a request start or a piece) and returns what is ready.
    pub fn push(&mut self, mut req: CapturedRequest) -> Ready {
        let key = (req.client, req.server);
        if req.piece > 0 && self.pending.contains_key(&key) {
            return self.continue_pending(key, req);
        }
        if req.piece == 0 {
            match self.starts.see(key, &req) {
                Seen::Retransmitted => {
                    self.counters.retransmitted += 1;
                    return Ready::default();
                }
                Seen::Conflicting => self.counters.start_conflicts += 1,
                Seen::New => {}
            }
        }
        let mut earlier = None;
        if req.piece == 0 {
            // A new request on the connection: one still waiting there will get no more.
            earlier = self.take(&key).map(|p| {
                self.counters.incomplete += 1;
                p.req
            });
        }
        // Following its own start, or after an announced body: the program's count so far.
        let mut following = (req.piece == 0).then_some((1, req.data.len()));
        if let Some(body) = self.bodies.open.get(&key).copied() {
            let inside = body.end.wrapping_sub(req.seq) as i32;
            // A piece of the following that covers the body (the announcing segment's, or a
            // look-alike start's inside it): at the body's end it starts the next request.
            let piece_of_it = req.piece > 0 && req.piece == body.next_piece;
            if inside < 0 || (inside == 0 && !piece_of_it) {
                self.bodies.open.remove(&key);
            } else {
                let inside = inside as usize;
                if req.piece == 0 && inside > 0 {
                    self.counters.inside_body += 1;
                }
                if inside >= req.data.len() {
                    // All that was captured is body. Whether the program follows on, and
                    // with what count, decides how its next piece is known.
                    let (next_piece, captured) = if piece_of_it {
                        (
                            body.next_piece.saturating_add(1),
                            body.captured + req.data.len(),
                        )
                    } else {
                        (1, req.data.len())
                    };
                    let follows = (req.piece == 0 || piece_of_it)
                        && program_follows(&req, captured, self.limit);
                    if inside > req.data.len() && inside <= req.payload_len as usize {
                        // It ends in bytes the program did not copy: what follows is unseen.
                        self.bodies.open.remove(&key);
                    } else {
                        let b = self.bodies.open.get_mut(&key).expect("present");
                        b.next_piece = if follows { next_piece } else { 0 };
                        b.captured = captured;
                    }
                    return Ready { earlier, now: None };
                }
                // The body ends in the captured bytes: a request may start after it, and
                // the program goes on following if it followed this segment.
                self.bodies.open.remove(&key);
                following = if piece_of_it {
                    Some((body.next_piece + 1, body.captured + req.data.len()))
                } else {
                    (req.piece == 0).then_some((1, req.data.len()))
                };
                let rest = req.data.split_off(inside);
                let blank = http::blank_lines(&rest);
                req.data = rest[blank..].to_vec();
                let skipped = (inside + blank) as u32;
                req.seq = req.seq.wrapping_add(skipped);
                req.payload_len = req.payload_len.saturating_sub(skipped);
                if req.data.is_empty() {
                    return Ready { earlier, now: None };
                }
            }
        }
        let Some((next_piece, captured)) = following else {
            self.counters.stray_pieces += 1;
            return Ready { earlier, now: None };
        };
        let follows = program_follows(&req, captured, self.limit);
        let now = self.settle(key, req, follows, captured, next_piece);
        if earlier.is_none() && self.pending.len() > MAX_PENDING {
            earlier = self.make_room();
        }
        Ready { earlier, now }
    }

    /// A piece for the request waiting on `key`.
    fn continue_pending(&mut self, key: Conn, req: CapturedRequest) -> Ready {
        let p = self.pending.get_mut(&key).expect("checked by the caller");
        if req.piece != p.next_piece {
            // A piece went missing (the ring was full, or the reader fell behind): what is
            // here is all this request will have.
            self.counters.stray_pieces += 1;
            self.counters.incomplete += 1;
            return Ready {
                earlier: None,
                now: self.take(&key).map(|p| p.req),
            };
        }
        let room = self.limit.saturating_sub(p.captured);
        let take = req.data.len().min(room);
        p.req.data.extend_from_slice(&req.data[..take]);
        p.captured += take;
        // Truncated when this piece was not taken whole (the capture length was spent on it);
        // the earlier pieces were, or the request would not have waited for this one.
        let left_out = (req.payload_len as usize).saturating_sub(take);
        p.req.payload_len = (p.req.data.len() + left_out) as u32;
        p.req.ts_unix_ns = req.ts_unix_ns;
        p.last_ns = req.ts_unix_ns;
        p.next_piece = p.next_piece.saturating_add(1);
        let follows = take == req.data.len() && program_follows(&req, p.captured, self.limit);
        if follows && http::tail(&p.req.data) == Tail::Head(0) {
            return Ready::default();
        }
        let p = self.take(&key).expect("present");
        self.counters.reassembled += 1;
        let now = self.settle(key, p.req, follows, p.captured, p.next_piece);
        Ready { earlier: None, now }
    }

    /// Decides what of a request's bytes (`req.data`, starting at a request; `follows`: the
    /// program captures the connection's next segment as piece `next_piece`) is handed on
    /// now: the whole requests. An unfinished head at the end waits for its pieces; a body
    /// that goes on past the bytes is remembered.
    fn settle(
        &mut self,
        key: Conn,
        mut req: CapturedRequest,
        follows: bool,
        captured: usize,
        next_piece: u8,
    ) -> Option<CapturedRequest> {
        if !follows && http::announces_no_body(&req.data) {
            // Nothing to wait for and no body to remember (the common GET): handed on as it
            // is, as the match below would, without parsing it for the engine to parse again.
            return Some(req);
        }
        match http::tail(&req.data) {
            Tail::Head(at) if follows => {
                let rest = req.data.split_off(at);
                let waiting = CapturedRequest {
                    seq: req.seq.wrapping_add(at as u32),
                    payload_len: rest.len() as u32,
                    data: rest,
                    ..req.clone()
                };
                req.payload_len = req.data.len() as u32;
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                self.pending.insert(
                    key,
                    Pending {
                        last_ns: waiting.ts_unix_ns,
                        req: waiting,
                        captured,
                        next_piece,
                        ticket,
                    },
                );
                self.order.push_back((key, ticket));
                if self.order.len() > 2 * MAX_PENDING {
                    // Requests completed out of order leave their entries behind: drop them.
                    let pending = &self.pending;
                    self.order
                        .retain(|(k, t)| pending.get(k).is_some_and(|p| p.ticket == *t));
                }
                (at > 0).then_some(req)
            }
            Tail::Body(end) => {
                let body = Body {
                    end: req.seq.wrapping_add(end as u32),
                    since: req.ts_unix_ns,
                    next_piece: if follows { next_piece } else { 0 },
                    captured,
                };
                self.bodies.insert(key, body, req.ts_unix_ns);
                Some(req)
            }
            _ => Some(req),
        }
    }

    /// Hands on, as they are, the requests whose last piece came more than [`IDLE_NS`] before
    /// `now_ns` (the clock of the records).
    pub fn expire(&mut self, now_ns: u64) -> Vec<CapturedRequest> {
        self.bodies.expire(now_ns);
        let mut out = Vec::new();
        while let Some(&(key, ticket)) = self.order.front() {
            match self.pending.get(&key) {
                Some(p) if p.ticket == ticket => {
                    if now_ns.saturating_sub(p.last_ns) <= IDLE_NS {
                        // Pieces renew a request's wait but not its place in `order`: a
                        // younger request behind an old, still active one waits for the
                        // next call.
                        break;
                    }
                    self.counters.incomplete += 1;
                    out.extend(self.take(&key).map(|p| p.req));
                }
                _ => {
                    self.order.pop_front();
                }
            }
        }
        out
    }

    /// Everything still waiting, handed on as it is (at shutdown, or the end of a replay).
    pub fn flush(&mut self) -> Vec<CapturedRequest> {
        let mut out: Vec<Pending> = self.pending.drain().map(|(_, p)| p).collect();
        self.order.clear();
        self.counters.incomplete += out.len() as u64;
        out.sort_by_key(|p| p.ticket);
        out.into_iter().map(|p| p.req).collect()
    }

    fn take(&mut self, key: &Conn) -> Option<Pending> {
        let p = self.pending.remove(key)?;
        if self.order.front().is_some_and(|(_, t)| *t == p.ticket) {
            self.order.pop_front();
        }
        Some(p)
    }

    /// At [`MAX_PENDING`], the oldest waiting request is handed on to make room.
    fn make_room(&mut self) -> Option<CapturedRequest> {
        if self.pending.len() <= MAX_PENDING {
            return None;
        }
        while let Some((key, ticket)) = self.order.pop_front() {
            if self.pending.get(&key).is_some_and(|p| p.ticket == ticket) {
                self.counters.incomplete += 1;
                return self.pending.remove(&key).map(|p| p.req);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(client_port: u16, piece: u8, ts: u64, data: &[u8]) -> CapturedRequest {
        CapturedRequest {
            ts_unix_ns: ts,
            client: SocketAddr::from(([10, 0, 0, 2], client_port)),
            server: "10.0.0.1:80".parse().unwrap(),
            seq: 0,
            payload_len: data.len() as u32,
            piece,
            data: data.to_vec(),
        }
    }

    /// A record of connection 1 at sequence number `seq`, as the program sends it.
    fn at(seq: u32, piece_no: u8, ts: u64, data: &[u8]) -> CapturedRequest {
        CapturedRequest {
            seq,
            ..piece(1, piece_no, ts, data)
        }
    }

    fn all(r: Ready) -> Vec<Vec<u8>> {
        r.into_iter().map(|r| r.data).collect()
    }

    #[test]
    fn a_whole_request_passes_straight_through() {
        let mut r = Reassembler::new(512);
        let req = piece(1, 0, 5, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(all(r.push(req.clone())), vec![req.data]);
        assert_eq!(r.waiting(), 0);
        assert_eq!(r.counters(), ReassemblyCounters::default());
    }

    #[test]
    fn pieces_are_joined_in_order_and_stamped_with_the_last_one() {
        let mut r = Reassembler::new(512);
        assert!(all(r.push(piece(1, 0, 10, b"G"))).is_empty());
        // Another connection's request in between is not held up.
        let other = b"GET /b HTTP/1.1\r\n\r\n";
        assert_eq!(all(r.push(piece(2, 0, 11, other))), vec![other.to_vec()]);
        assert!(all(r.push(piece(1, 1, 12, b"ET /transferFunds HTTP/1.1\r\n"))).is_empty());
        let done: Vec<CapturedRequest> = r
            .push(piece(1, 2, 13, b"Authorization: Bearer x\r\n\r\n"))
            .into_iter()
            .collect();
        assert_eq!(done.len(), 1);
        assert_eq!(
            done[0].data,
            b"GET /transferFunds HTTP/1.1\r\nAuthorization: Bearer x\r\n\r\n"
        );
        assert_eq!(done[0].ts_unix_ns, 13);
        assert!(!done[0].truncated());
        assert_eq!(r.counters().reassembled, 1);
        assert_eq!(r.waiting(), 0);
    }

    #[test]
    fn the_capture_length_completes_a_request_and_keeps_it_truncated() {
        let mut r = Reassembler::new(16);
        assert!(all(r.push(piece(1, 0, 1, b"GET /items"))).is_empty());
        // The program captured 6 of the piece's 30 bytes: the request is as long as it gets.
        let mut p = piece(1, 1, 2, b"?page=");
        p.payload_len = 30;
        let done: Vec<CapturedRequest> = r.push(p).into_iter().collect();
        assert_eq!(done[0].data, b"GET /items?page=");
        assert!(done[0].truncated());
        assert_eq!(done[0].payload_len, 40);
    }

    #[test]
    fn a_missing_piece_or_a_new_start_hands_on_what_there_is() {
        let mut r = Reassembler::new(512);
        r.push(piece(1, 0, 1, b"GET /a"));
        assert_eq!(
            all(r.push(piece(1, 2, 2, b"x\r\n\r\n"))),
            vec![b"GET /a".to_vec()]
        );
        assert_eq!(r.counters().incomplete, 1);
        assert_eq!(r.counters().stray_pieces, 1);

        r.push(piece(1, 0, 3, b"GET /b"));
        let whole = b"GET /c HTTP/1.1\r\n\r\n";
        assert_eq!(
            all(r.push(piece(1, 0, 4, whole))),
            vec![b"GET /b".to_vec(), whole.to_vec()]
        );
        // A piece for a request that never waited (its first segment held the header).
        assert!(all(r.push(piece(1, 1, 5, b"body"))).is_empty());
        assert_eq!(r.counters().stray_pieces, 2);
    }

    #[test]
    fn quiet_requests_are_handed_on_after_the_idle_time() {
        let mut r = Reassembler::new(512);
        r.push(piece(1, 0, 0, b"POST /a"));
        r.push(piece(2, 0, 10, b"POST /b"));
        assert!(r.expire(IDLE_NS).is_empty());
        let out = r.expire(IDLE_NS + 5);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data, b"POST /a");
        let out = r.expire(IDLE_NS + 20);
        assert_eq!(out[0].data, b"POST /b");
        assert_eq!(r.counters().incomplete, 2);
        assert_eq!(r.waiting(), 0);
    }

    #[test]
    fn a_flood_of_unfinished_requests_stays_bounded() {
        let mut r = Reassembler::new(512);
        let mut handed_on = 0;
        for i in 0..(MAX_PENDING as u32 + 1000) {
            let mut p = piece(0, 0, u64::from(i), b"GET /x");
            p.client = SocketAddr::from((i.to_be_bytes(), 1));
            handed_on += r.push(p).into_iter().count();
        }
        assert_eq!(r.waiting(), MAX_PENDING);
        assert_eq!(handed_on, 1000);
        assert!(r.order.len() <= 2 * MAX_PENDING + 1);
        assert_eq!(r.flush().len(), MAX_PENDING);
        assert_eq!(r.waiting(), 0);
    }

    #[test]
    fn sixty_four_pieces_end_a_request() {
        let mut r = Reassembler::new(4096);
        r.push(piece(1, 0, 0, b"G"));
        let mut out = Vec::new();
        for i in 1..=FOLLOW_MAX_PIECES {
            out.extend(r.push(piece(1, i, u64::from(i), b"E")));
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data.len(), 1 + FOLLOW_MAX_PIECES as usize);
    }
    #[test]
    fn a_retransmitted_request_start_counts_once_and_a_conflicting_one_is_counted() {
        let mut r = Reassembler::new(512);
        let get = b"GET /balance HTTP/1.1\r\n\r\n";
        assert_eq!(all(r.push(at(500, 0, 1, get))), vec![get.to_vec()]);
        // The client resends the segment (it missed the acknowledgement): the same bytes at
        // the same place; the server drops the copy, and so does the reassembler.
        assert!(all(r.push(at(500, 0, 2, get))).is_empty());
        assert_eq!(r.counters().retransmitted, 1);
        // The same bytes on another connection, or further on in this one, are requests.
        let mut other = at(500, 0, 3, get);
        other.client.set_port(2);
        assert_eq!(all(r.push(other)), vec![get.to_vec()]);
        let next = 500 + get.len() as u32;
        assert_eq!(all(r.push(at(next, 0, 4, get))), vec![get.to_vec()]);
        // Other bytes at the place of the last start: the server read at most one of the two.
        // Both go on (which one it read cannot be told), and it is counted.
        let transfer = b"POST /transferFunds HTTP/1.1\r\n\r\n";
        assert_eq!(
            all(r.push(at(next, 0, 5, transfer))),
            vec![transfer.to_vec()]
        );
        assert_eq!(r.counters().start_conflicts, 1);
        // A resent request with a body is a copy too, not a request inside its own body.
        let post = b"POST /notes HTTP/1.1\r\nContent-Length: 100\r\n\r\n";
        let at_post = next + 1000;
        assert_eq!(all(r.push(at(at_post, 0, 6, post))), vec![post.to_vec()]);
        assert!(all(r.push(at(at_post, 0, 7, post))).is_empty());
        assert_eq!(r.counters().retransmitted, 2);
        assert_eq!(r.counters().inside_body, 0);
    }

    #[test]
    fn a_look_alike_request_inside_a_body_is_not_a_request() {
        let mut r = Reassembler::new(512);
        let head = b"POST /notes HTTP/1.1\r\nAuthorization: Bearer x\r\nContent-Length: 64\r\n\r\n";
        assert_eq!(all(r.push(at(1000, 0, 1, head))), vec![head.to_vec()]);
        // The body, in a segment of its own, written to look like the lookup a rule wants.
        let mut fake = b"GET /balance HTTP/1.1\r\nAuthorization: Bearer x\r\n\r\n".to_vec();
        fake.resize(64, b' ');
        let body_at = 1000 + head.len() as u32;
        assert!(all(r.push(at(body_at, 0, 2, &fake))).is_empty());
        assert_eq!(r.counters().inside_body, 1);
        // The next request starts where the body ends, and is one.
        let transfer = b"POST /transferFunds HTTP/1.1\r\n\r\n";
        assert_eq!(
            all(r.push(at(body_at + 64, 0, 3, transfer))),
            vec![transfer.to_vec()]
        );
        // Another connection at those sequence numbers is not in that body.
        let mut elsewhere = at(body_at, 0, 4, &fake);
        elsewhere.client = SocketAddr::from(([10, 0, 0, 3], 1));
        assert_eq!(all(r.push(elsewhere)).len(), 1);
        assert_eq!(r.counters().inside_body, 1);
    }

    #[test]
    fn a_request_after_a_body_is_taken_from_where_the_body_ends() {
        let mut r = Reassembler::new(512);
        let head = b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n";
        r.push(at(0, 0, 1, head));
        // The program captured this segment because it begins like a request; it begins with
        // the body's ten bytes, then a request (after an empty line some clients add).
        let seg = b"GET /fake.\r\nGET /real HTTP/1.1\r\n\r\n";
        let out: Vec<CapturedRequest> = r
            .push(at(head.len() as u32, 0, 2, seg))
            .into_iter()
            .collect();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data, b"GET /real HTTP/1.1\r\n\r\n");
        assert_eq!(out[0].seq, head.len() as u32 + 12);
        assert_eq!(r.counters().inside_body, 1);
    }

    #[test]
    fn a_body_followed_into_the_next_piece_then_a_request() {
        let mut r = Reassembler::new(512);
        // Head and half the body: the segment does not end a header, so it is followed.
        let seg = b"POST /a HTTP/1.1\r\nContent-Length: 8\r\n\r\n0123";
        assert_eq!(all(r.push(at(0, 0, 1, seg))), vec![seg.to_vec()]);
        let out = all(r.push(at(seg.len() as u32, 1, 2, b"4567GET /b HTTP/1.1\r\n\r\n")));
        assert_eq!(out, vec![b"GET /b HTTP/1.1\r\n\r\n".to_vec()]);
        // A piece that is body only is no request either.
        let seg2 = b"POST /c HTTP/1.1\r\nContent-Length: 100\r\n\r\n";
        r.push(at(5000, 0, 3, seg2));
        let more = at(
            5000 + seg2.len() as u32,
            0,
            4,
            b"DELETE /everything HTTP/1.1\r\n\r\n",
        );
        assert!(all(r.push(more)).is_empty());
        // Only that segment looked like a start; the piece was followed body.
        assert_eq!(r.counters().inside_body, 1);
    }

    #[test]
    fn a_request_split_right_after_a_look_alike_that_ends_the_body_is_seen() {
        let mut r = Reassembler::new(512);
        let head = b"POST /notes HTTP/1.1\r\nContent-Length: 20\r\n\r\n";
        r.push(at(0, 0, 0, head));
        // Body that looks like an unfinished request and ends the body exactly: the program
        // follows it, so the real request's pieces come as its pieces 1 and 2.
        let fake = b"GET /balance HTTP/1.";
        let end = (head.len() + fake.len()) as u32;
        assert!(all(r.push(at(head.len() as u32, 0, 1, fake))).is_empty());
        assert!(all(r.push(at(end, 1, 2, b"PO"))).is_empty());
        let out = all(r.push(at(end + 2, 2, 3, b"ST /transferFunds HTTP/1.1\r\n\r\n")));
        assert_eq!(out, vec![b"POST /transferFunds HTTP/1.1\r\n\r\n".to_vec()]);
        assert_eq!(r.counters().inside_body, 1);
    }

    #[test]
    fn a_pipelined_request_cut_by_the_segment_end_is_joined_with_its_piece() {
        let mut r = Reassembler::new(512);
        let first = b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        let mut seg = first.to_vec();
        seg.extend_from_slice(b"PO");
        assert_eq!(all(r.push(at(7, 0, 1, &seg))), vec![first.to_vec()]);
        assert_eq!(r.waiting(), 1);
        let out = all(r.push(at(
            7 + seg.len() as u32,
            1,
            2,
            b"ST /transferFunds HTTP/1.1\r\n\r\n",
        )));
        assert_eq!(out, vec![b"POST /transferFunds HTTP/1.1\r\n\r\n".to_vec()]);
        assert_eq!(r.waiting(), 0);
    }

    #[test]
    fn bodies_are_forgotten_after_their_idle_time_and_bounded_in_number() {
        let mut r = Reassembler::new(512);
        let head = b"POST /a HTTP/1.1\r\nContent-Length: 50\r\n\r\n";
        r.push(at(0, 0, 0, head));
        // A chunked body's end is unknown: nothing is assumed about what follows it.
        let mut chunked = piece(
            2,
            0,
            0,
            b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        chunked.seq = 0;
        r.push(chunked);
        assert_eq!(r.bodies.open.len(), 1);
        r.expire(BODY_IDLE_NS + 1);
        assert!(r.bodies.open.is_empty());
        let late = b"GET /x HTTP/1.1\r\n\r\n";
        assert_eq!(
            all(r.push(at(head.len() as u32, 0, BODY_IDLE_NS + 2, late))).len(),
            1
        );

        for i in 0..(MAX_BODIES as u32 + 100) {
            let mut p = piece(0, 0, u64::from(i), head);
            p.client = SocketAddr::from((i.to_be_bytes(), 1));
            r.push(p);
        }
        assert_eq!(r.bodies.open.len(), MAX_BODIES);
        assert!(r.bodies.order.len() <= 2 * MAX_BODIES + 1);
    }
}
