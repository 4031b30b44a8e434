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
//! It is plain state, with time passed in: the daemon and the pcap replay drive the same code.
use std::{collections::VecDeque, net::SocketAddr};

use agent_common::FOLLOW_MAX_PIECES;
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::capture::CapturedRequest;

/// How long a request waits for its next piece before it is handed on as it is: a little
/// longer than the XDP program follows a quiet connection, so that a piece the program still
/// captures is never one the reassembler has given up on.
pub const IDLE_NS: u64 = agent_common::FOLLOW_IDLE_NS + 5_000_000_000;

/// Requests waiting for pieces at once; beyond it the oldest is handed on as it is. Each holds
/// at most the capture length.
pub const MAX_PENDING: usize = 4_096;

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
}

/// A request waiting for its next piece.
struct Pending {
    req: CapturedRequest,
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
    pending: FxHashMap<(SocketAddr, SocketAddr), Pending>,
    /// Waiting requests, oldest first, by ticket; entries of requests already handed on are
    /// skipped when met (their ticket no longer matches).
    order: VecDeque<((SocketAddr, SocketAddr), u64)>,
    next_ticket: u64,
    counters: ReassemblyCounters,
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

/// Does this request's header go on in pieces the program will capture (`limit`: the capture
/// length)?
fn wants_more(req: &CapturedRequest, limit: usize) -> bool {
    !req.truncated()
        && req.data.len() < limit
        && memchr::memmem::find(&req.data, HEADER_END).is_none()
}

impl Reassembler {
    /// `capture_len`: the program's capture length in bytes.
    pub fn new(capture_len: usize) -> Self {
        Self {
            limit: capture_len.max(1),
            pending: FxHashMap::default(),
            order: VecDeque::new(),
            next_ticket: 0,
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
    pub fn push(&mut self, req: CapturedRequest) -> Ready {
        let key = (req.client, req.server);
        if req.piece == 0 {
            // A new request on the connection: one still waiting there will get no more.
            let earlier = self.take(&key).map(|p| {
                self.counters.incomplete += 1;
                p.req
            });
            if !wants_more(&req, self.limit) {
                return Ready {
                    earlier,
                    now: Some(req),
                };
            }
            let earlier = earlier.or_else(|| self.make_room());
            let ticket = self.next_ticket;
            self.next_ticket += 1;
            self.pending.insert(
                key,
                Pending {
                    last_ns: req.ts_unix_ns,
                    req,
                    next_piece: 1,
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
            return Ready { earlier, now: None };
        }
        let Some(p) = self.pending.get_mut(&key) else {
            self.counters.stray_pieces += 1;
            return Ready::default();
        };
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
        let room = self.limit.saturating_sub(p.req.data.len());
        let take = req.data.len().min(room);
        p.req.data.extend_from_slice(&req.data[..take]);
        // Truncated when this piece was not taken whole (the capture length was spent on it);
        // the earlier pieces were, or the request would not have waited for this one.
        let left_out = (req.payload_len as usize).saturating_sub(take);
        p.req.payload_len = (p.req.data.len() + left_out) as u32;
        p.req.ts_unix_ns = req.ts_unix_ns;
        p.last_ns = req.ts_unix_ns;
        p.next_piece = p.next_piece.saturating_add(1);
        let done = p.next_piece > FOLLOW_MAX_PIECES || !wants_more(&p.req, self.limit);
        if !done {
            return Ready::default();
        }
        self.counters.reassembled += 1;
        Ready {
            earlier: None,
            now: self.take(&key).map(|p| p.req),
        }
    }

    /// Hands on, as they are, the requests whose last piece came more than [`IDLE_NS`] before
    /// `now_ns` (the clock of the records).
    pub fn expire(&mut self, now_ns: u64) -> Vec<CapturedRequest> {
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

    fn take(&mut self, key: &(SocketAddr, SocketAddr)) -> Option<Pending> {
        let p = self.pending.remove(key)?;
        if self.order.front().is_some_and(|(_, t)| *t == p.ticket) {
            self.order.pop_front();
        }
        Some(p)
    }

    /// At [`MAX_PENDING`], the oldest waiting request is handed on to make room.
    fn make_room(&mut self) -> Option<CapturedRequest> {
        if self.pending.len() < MAX_PENDING {
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
            ifindex: 1,
            payload_len: data.len() as u32,
            piece,
            data: data.to_vec(),
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
}
