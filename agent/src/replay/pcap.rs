//! Packet captures (pcap and pcapng): each TCP payload that starts like an HTTP/1.x request
//! (the XDP program's test) goes through the live path's [`http::Parser`], cut to the capture
//! length the daemon would copy; the client is the source address, the time the packet's.
//!
//! A request whose header is split over segments is followed as the XDP program follows it
//! ([`Follower`], the program's rules in userspace) and joined by the daemon's
//! [`Reassembler`], so replay sees the requests the daemon sees; there is no other TCP
//! reassembly. Requests pipelined in one segment are each read, as far as the capture length
//! goes.
//!
//! Requests count only once the server acknowledged them, as live ([`Acks`]), when the capture
//! shows the servers' side: a capture of one direction only has no acknowledgements to wait for.
use etherparse::{EtherType, LaxNetSlice, LaxSlicedPacket, TransportSlice};
use pcap_parser::{
    Block, Linktype, PcapBlockOwned, PcapError, create_reader,
    traits::{PcapNGPacketBlock as _, PcapReaderIterator},
};

use std::net::{IpAddr, SocketAddr};

use agent_common::{
    BLANK_MAX, COPY_PIECE, COPY_WINDOW_NS, FOLLOW_FLOWS, FOLLOW_IDLE_NS, FOLLOW_MAX_PIECES,
    OVERLAP_MAX, seq_reaches,
};
use rustc_hash::FxHashMap;

use super::{Origin, ReplayRecord, formats::Skip, input::Input};
use crate::{
    acked::{AckCounters, AckGate, Conflict},
    capture::CapturedRequest,
    http,
    reassemble::Reassembler,
};

/// Initial read buffer; grown (up to [`MAX_BLOCK`]) for captures of jumbo/GRO packets.
const BUF: usize = 64 * 1024;
/// A block bigger than this is treated as corruption, not buffered.
const MAX_BLOCK: usize = 4 * 1024 * 1024;

/// What one step of the capture produced.
#[derive(Debug)]
pub(crate) enum Event {
    Record(ReplayRecord),
    Skip {
        reason: Skip,
        packet: u64,
        excerpt: String,
    },
    /// A packet that is not an HTTP request at all (the XDP program would pass it): counted
    /// by kind, not a problem.
    Ignored(&'static str),
    /// A non-packet block (headers, interface descriptions, statistics).
    Meta,
    /// A request packet held until the server's acknowledgement of it shows up.
    Held,
    End,
    Failed(String),
}

#[derive(Debug, Clone, Copy)]
struct Iface {
    linktype: Linktype,
    /// Timestamp units per second.
    resolution: u64,
    offset: u64,
}

pub(crate) struct PcapSource {
    reader: Option<Box<dyn PcapReaderIterator + Send>>,
    file: u32,
    legacy: Option<(Linktype, bool)>,
    ifaces: Vec<Iface>,
    http: http::Parser,
    keep: Vec<String>,
    capture_len: usize,
    packet_no: u64,
    pending: Vec<Event>,
    /// HTTP request packets the capture's snaplen cut short (their request may be partial).
    pub snaplen_cut: u64,
    buf_size: usize,
    follower: Follower,
    reassembler: Reassembler,
    /// Boxed to keep a capture's source about the size of a log file's.
    acks: Box<Acks>,
}

/// [`crate::acked`]'s gate over a capture. The daemon counts a request only once the server's
/// TCP stack acknowledged it (a forged source address, a bad checksum, bytes outside the
/// window: the XDP program sees them, the server never reads them). A capture taken on the
/// server holds the same evidence, the server's own segments, so replay waits the same way,
/// from the moment the capture shows a segment sent from an address and port that receives
/// requests (its SYN-ACK, usually, before the first request): before that (or in a capture of
/// one direction only, which never shows one), requests pass as they are. A request still
/// waiting when the capture ends is dropped, as the daemon drops one its wait ran out on.
struct Acks {
    /// `wait_for_acks` in the configuration.
    allowed: bool,
    gate: AckGate,
    /// Addresses and ports that received requests, at most [`MAX_SERVERS`].
    servers: std::collections::HashSet<SocketAddr>,
    /// Addresses and ports that accepted connections (sent a SYN-ACK), at most [`MAX_SERVERS`].
    accepting: std::collections::HashSet<SocketAddr>,
    /// Capture time of the next expiry pass over the waiting records.
    next_expire_ns: u64,
}

/// Server endpoints remembered to tell a capture shows the servers' side.
const MAX_SERVERS: usize = 4_096;

impl Acks {
    fn new(allowed: bool) -> Self {
        Acks {
            allowed,
            gate: AckGate::new(false),
            servers: Default::default(),
            accepting: Default::default(),
            next_expire_ns: 0,
        }
    }

    /// Whether requests wait for acknowledgements (the capture showed a server's segment).
    fn waiting_for_acks(&self) -> bool {
        self.gate.enabled()
    }

    fn counters(&self) -> AckCounters {
        self.gate.counters()
    }

    /// The server's newest acknowledgement on the connection, once it sent one.
    fn acknowledged(&self, flow: (SocketAddr, SocketAddr)) -> Option<u32> {
        self.gate.acknowledged(flow.0, flow.1)
    }

    /// A TCP segment from `flow.0` to `flow.1`, looked at as the server's: the requests of
    /// the connection it acknowledges, released in order.
    fn segment(
        &mut self,
        flow: (SocketAddr, SocketAddr),
        syn: bool,
        ack: Option<u32>,
        ts_ns: u64,
    ) -> Vec<CapturedRequest> {
        if !self.allowed {
            return Vec::new();
        }
        if !self.gate.enabled() {
            if self.servers.contains(&flow.0) {
                self.gate = AckGate::new(true);
            } else if syn && ack.is_some() && self.accepting.len() < MAX_SERVERS {
                self.accepting.insert(flow.0);
            }
        }
        if !self.gate.enabled() {
            return Vec::new();
        }
        if ts_ns >= self.next_expire_ns {
            self.gate.expire(ts_ns);
            self.next_expire_ns = ts_ns.saturating_add(1_000_000_000);
        }
        let Some(ack) = ack else {
            return Vec::new();
        };
        self.gate.push(CapturedRequest {
            ts_unix_ns: ts_ns,
            client: flow.1,
            server: flow.0,
            seq: ack,
            payload_len: 0,
            piece: agent_common::ACK_RECORD,
            data: Vec::new(),
        })
    }

    /// A captured request record: handed on at once, or held for its acknowledgement.
    fn request(&mut self, rec: CapturedRequest) -> Vec<CapturedRequest> {
        if self.allowed && !self.gate.enabled() {
            if self.accepting.contains(&rec.server) {
                self.gate = AckGate::new(true);
            } else if self.servers.len() < MAX_SERVERS {
                self.servers.insert(rec.server);
            }
        }
        // Off, the gate hands the record straight back.
        self.gate.push(rec)
    }

    /// Conflicts acknowledged since the last call (see [`AckGate::take_conflicts`]).
    fn conflicts(&mut self) -> Vec<Conflict> {
        self.gate.take_conflicts()
    }

    /// The capture ended: whatever still waits was never acknowledged in it.
    fn finish(&mut self) {
        self.gate.expire(u64::MAX);
    }
}

/// A parser error in a line of its own: pcap-parser's messages carry the unparsed input
/// (up to a whole block of `MAX_BLOCK` bytes), which has no place in a report.
fn describe<I>(e: &PcapError<I>) -> String {
    match e {
        PcapError::NomError(_, kind) | PcapError::OwnedNomError(_, kind) => {
            format!("malformed block ({})", kind.description())
        }
        PcapError::HeaderNotRecognized => "the file header is neither pcap nor pcapng".into(),
        PcapError::ReadError => "read error".into(),
        PcapError::Eof | PcapError::UnexpectedEof | PcapError::Incomplete(_) => {
            "unexpected end of file".into()
        }
        PcapError::BufferTooSmall => "a block larger than the read buffer".into(),
    }
}

impl PcapSource {
    pub fn new(
        input: Input,
        file: u32,
        http_config: http::HttpConfig,
        keep: Vec<String>,
        capture_len: usize,
        wait_for_acks: bool,
    ) -> Self {
        let mut pending = Vec::new();
        let reader = match create_reader(BUF, input) {
            Ok(r) => Some(r),
            Err(PcapError::Eof) => None,
            Err(PcapError::Incomplete(_) | PcapError::UnexpectedEof) => {
                pending.push(Event::Skip {
                    reason: Skip::TruncatedPacket,
                    packet: 0,
                    excerpt: "capture ends inside its file header".into(),
                });
                None
            }
            Err(e) => {
                pending.push(Event::Failed(format!(
                    "not a readable capture: {}",
                    describe(&e)
                )));
                None
            }
        };
        PcapSource {
            reader,
            file,
            legacy: None,
            ifaces: Vec::new(),
            http: http::Parser::new(http_config),
            keep,
            capture_len: capture_len.max(1),
            packet_no: 0,
            pending,
            snaplen_cut: 0,
            buf_size: BUF,
            follower: Follower::default(),
            reassembler: Reassembler::new(capture_len.max(1)),
            acks: Box::new(Acks::new(wait_for_acks)),
        }
    }

    /// What the acknowledgement gate did (see [`Acks`]), and whether it was on.
    pub fn acks(&self) -> (bool, AckCounters) {
        (self.acks.waiting_for_acks(), self.acks.counters())
    }

    pub fn next_event(&mut self) -> Event {
        match self.next_packet_event() {
            Event::End => {
                // Requests still waiting for pieces are read as they are, as the daemon does
                // when it stops; those still waiting for an acknowledgement never got one.
                self.acks.finish();
                let file = self.file;
                for req in self.reassembler.flush() {
                    let packet = self.packet_no;
                    let events = requests(&req, packet, file, &mut self.http, &self.keep);
                    self.pending.extend(events.into_iter().rev());
                }
                self.pending.pop().unwrap_or(Event::End)
            }
            e => e,
        }
    }

    fn next_packet_event(&mut self) -> Event {
        if let Some(e) = self.pending.pop() {
            return e;
        }
        let Some(reader) = self.reader.as_mut() else {
            return Event::End;
        };
        loop {
            // Borrowed blocks must be dropped before consume/refill, hence this shape.
            let step = match reader.next() {
                Ok((offset, block)) => {
                    let ev = handle_block(
                        block,
                        &mut self.legacy,
                        &mut self.ifaces,
                        &mut self.packet_no,
                        &mut Ctx {
                            http: &mut self.http,
                            pending: &mut self.pending,
                            keep: &self.keep,
                            capture_len: self.capture_len,
                            file: self.file,
                            snaplen_cut: &mut self.snaplen_cut,
                            follower: &mut self.follower,
                            reassembler: &mut self.reassembler,
                            acks: &mut self.acks,
                        },
                    );
                    Ok((offset, ev))
                }
                Err(PcapError::Eof) => Err(Step::End),
                Err(PcapError::Incomplete(_)) => Err(Step::Refill),
                Err(PcapError::UnexpectedEof) => Err(Step::Truncated),
                Err(PcapError::BufferTooSmall) => Err(Step::Grow),
                Err(e) => Err(Step::Corrupt(describe(&e))),
            };
            match step {
                Ok((offset, ev)) => {
                    reader.consume(offset);
                    return ev;
                }
                Err(Step::Refill) => {
                    if reader.refill().is_err() {
                        self.reader = None;
                        return Event::Failed(format!(
                            "read error after packet {} (a truncated .gz?)",
                            self.packet_no
                        ));
                    }
                }
                Err(Step::Truncated) => {
                    // pcap-parser reports a clean end this way when the buffer is empty.
                    let clean = reader.data().is_empty();
                    self.reader = None;
                    if clean {
                        return Event::End;
                    }
                    self.packet_no += 1;
                    return Event::Skip {
                        reason: Skip::TruncatedPacket,
                        packet: self.packet_no,
                        excerpt: "capture file ends mid-packet".into(),
                    };
                }
                Err(Step::Grow) => {
                    self.buf_size *= 2;
                    if self.buf_size > MAX_BLOCK || !reader.grow(self.buf_size) {
                        self.reader = None;
                        return Event::Failed(format!(
                            "block after packet {} is larger than {MAX_BLOCK} bytes (corrupt capture?)",
                            self.packet_no
                        ));
                    }
                }
                Err(Step::End) => {
                    self.reader = None;
                    return Event::End;
                }
                Err(Step::Corrupt(e)) => {
                    self.reader = None;
                    return Event::Failed(format!(
                        "corrupt capture after packet {}: {e}",
                        self.packet_no
                    ));
                }
            }
        }
    }
}

enum Step {
    End,
    Refill,
    Truncated,
    Grow,
    Corrupt(String),
}

struct Ctx<'a> {
    http: &'a mut http::Parser,
    /// Events of this packet after the one returned (pipelined requests), in reverse order.
    pending: &'a mut Vec<Event>,
    keep: &'a [String],
    capture_len: usize,
    file: u32,
    snaplen_cut: &'a mut u64,
    follower: &'a mut Follower,
    reassembler: &'a mut Reassembler,
    acks: &'a mut Acks,
}

/// The XDP program's following of split request headers (`FOLLOW` in agent-ebpf), over the
/// packets of a capture: which connections are followed and where their next piece starts.
#[derive(Default)]
struct Follower {
    flows: FxHashMap<(SocketAddr, SocketAddr), Followed>,
}

struct Followed {
    next_seq: u32,
    /// Where the first piece started: a segment from here to `next_seq` is a copy.
    first_seq: u32,
    captured: usize,
    pieces: u8,
    /// The header ended: only copies of its pieces are captured, until `until_ns`.
    ended: bool,
    until_ns: u64,
}

impl Follower {
    /// A request start of `len` bytes at `seq` that did not hold its whole header.
    fn start(&mut self, flow: (SocketAddr, SocketAddr), seq: u32, len: usize, ts_ns: u64) {
        if self.flows.len() >= FOLLOW_FLOWS as usize {
            self.flows.retain(|_, f| f.until_ns > ts_ns);
        }
        if self.flows.len() < FOLLOW_FLOWS as usize || self.flows.contains_key(&flow) {
            self.flows.insert(
                flow,
                Followed {
                    next_seq: seq.wrapping_add(len as u32),
                    first_seq: seq.wrapping_add(len as u32),
                    captured: len,
                    pieces: 0,
                    ended: false,
                    until_ns: ts_ns + FOLLOW_IDLE_NS,
                },
            );
        }
    }

    fn end(&mut self, flow: &(SocketAddr, SocketAddr)) {
        self.flows.remove(flow);
    }

    /// A segment that starts no request: its piece number (or [`COPY_PIECE`], another copy of
    /// bytes captured as pieces) and how many of its bytes the program would capture, if it
    /// continues a followed request (`continuation` in agent-ebpf).
    fn piece(
        &mut self,
        flow: (SocketAddr, SocketAddr),
        seq: u32,
        payload: &[u8],
        ts_ns: u64,
        limit: usize,
    ) -> Option<(u8, usize)> {
        let f = self.flows.get_mut(&flow)?;
        if ts_ns >= f.until_ns {
            self.flows.remove(&flow);
            return None;
        }
        let ahead = seq.wrapping_sub(f.next_seq) as i32;
        if ahead < 0 {
            // Before the first piece is the start's: its copies start requests of their own.
            return ((seq.wrapping_sub(f.first_seq) as i32) >= 0)
                .then(|| (COPY_PIECE, payload.len().min(limit)));
        }
        if f.ended {
            return None;
        }
        if ahead > 0 {
            self.flows.remove(&flow);
            return None;
        }
        let take = payload.len().min(limit.saturating_sub(f.captured));
        let piece = f.pieces.wrapping_add(1);
        if take == 0 || piece > FOLLOW_MAX_PIECES {
            self.flows.remove(&flow);
            return None;
        }
        let last =
            take < payload.len() || piece >= FOLLOW_MAX_PIECES || payload.ends_with(b"\r\n\r\n");
        f.next_seq = f.next_seq.wrapping_add(payload.len() as u32);
        f.captured += take;
        f.pieces = piece;
        f.ended = last;
        f.until_ns = ts_ns + if last { COPY_WINDOW_NS } else { FOLLOW_IDLE_NS };
        Some((piece, take))
    }
}

fn handle_block(
    block: PcapBlockOwned<'_>,
    legacy: &mut Option<(Linktype, bool)>,
    ifaces: &mut Vec<Iface>,
    packet_no: &mut u64,
    ctx: &mut Ctx<'_>,
) -> Event {
    match block {
        PcapBlockOwned::LegacyHeader(h) => {
            *legacy = Some((h.network, h.is_nanosecond_precision()));
            Event::Meta
        }
        PcapBlockOwned::Legacy(b) => {
            *packet_no += 1;
            let Some((linktype, nanos)) = *legacy else {
                return Event::Ignored("no_header");
            };
            let frac_ns = if nanos {
                u64::from(b.ts_usec)
            } else {
                u64::from(b.ts_usec) * 1000
            };
            let ts_ns = u64::from(b.ts_sec) * 1_000_000_000 + frac_ns;
            let cut = b.caplen < b.origlen;
            packet(linktype, b.data, ts_ns, cut, *packet_no, ctx)
        }
        PcapBlockOwned::NG(Block::SectionHeader(_)) => {
            // Interface ids are per section.
            ifaces.clear();
            Event::Meta
        }
        PcapBlockOwned::NG(Block::InterfaceDescription(idb)) => {
            ifaces.push(Iface {
                linktype: idb.linktype,
                resolution: idb.ts_resolution().unwrap_or(1_000_000),
                offset: u64::try_from(idb.ts_offset()).unwrap_or(0),
            });
            Event::Meta
        }
        PcapBlockOwned::NG(Block::EnhancedPacket(epb)) => {
            *packet_no += 1;
            let Some(iface) = ifaces.get(epb.if_id as usize).copied() else {
                return Event::Ignored("unknown_interface");
            };
            let (secs, frac) = epb.decode_ts(iface.offset, iface.resolution);
            let frac_ns =
                (u128::from(frac) * 1_000_000_000 / u128::from(iface.resolution.max(1))) as u64;
            let ts_ns = u64::from(secs) * 1_000_000_000 + frac_ns;
            let cut = epb.truncated();
            packet(
                iface.linktype,
                epb.packet_data(),
                ts_ns,
                cut,
                *packet_no,
                ctx,
            )
        }
        PcapBlockOwned::NG(Block::SimplePacket(_)) => {
            *packet_no += 1;
            // No timestamp: nothing to order it by.
            Event::Ignored("no_timestamp")
        }
        PcapBlockOwned::NG(_) => Event::Meta,
    }
}

fn packet(
    linktype: Linktype,
    data: &[u8],
    ts_ns: u64,
    cut: bool,
    packet_no: u64,
    ctx: &mut Ctx<'_>,
) -> Event {
    let truncated = |what: &str| Event::Skip {
        reason: Skip::TruncatedPacket,
        packet: packet_no,
        excerpt: format!("{what} cut after {} bytes", data.len()),
    };
    let sliced = match linktype {
        Linktype::ETHERNET => match LaxSlicedPacket::from_ethernet(data) {
            Ok(p) => p,
            Err(_) => return truncated("ethernet header"),
        },
        Linktype::RAW | Linktype::IPV4 | Linktype::IPV6 => match LaxSlicedPacket::from_ip(data) {
            Ok(p) => p,
            Err(_) if data.len() < 40 => return truncated("IP header"),
            Err(_) => return Event::Ignored("not_ip"),
        },
        // Linux "any" device captures: the protocol is an ether type at a fixed offset.
        Linktype::LINUX_SLL | Linktype::LINUX_SLL2 => {
            let (proto_at, header) = if linktype == Linktype::LINUX_SLL {
                (14, 16)
            } else {
                (0, 20)
            };
            if data.len() < header {
                return truncated("SLL header");
            }
            let proto = u16::from_be_bytes([data[proto_at], data[proto_at + 1]]);
            LaxSlicedPacket::from_ether_type(EtherType(proto), &data[header..])
        }
        // BSD loopback: a 4-byte address family, then IP (whose version nibble says which).
        Linktype::NULL | Linktype::LOOP => {
            if data.len() < 4 {
                return truncated("loopback header");
            }
            match LaxSlicedPacket::from_ip(&data[4..]) {
                Ok(p) => p,
                Err(_) => return Event::Ignored("not_ip"),
            }
        }
        _ => return Event::Ignored("unsupported_linktype"),
    };
    let client = match &sliced.net {
        Some(LaxNetSlice::Ipv4(s)) => s.header().source_addr().into(),
        Some(LaxNetSlice::Ipv6(s)) => s.header().source_addr().into(),
        Some(LaxNetSlice::Arp(_)) => return Event::Ignored("not_ip"),
        None if sliced.stop_err.is_some() => return truncated("IP header"),
        None => return Event::Ignored("not_ip"),
    };
    let ip_payload = sliced.net.as_ref().and_then(LaxNetSlice::ip_payload_ref);
    if ip_payload.is_some_and(|p| p.fragmented) {
        return Event::Ignored("ip_fragment");
    }
    let tcp = match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => t,
        Some(_) => return Event::Ignored("not_tcp"),
        None if ip_payload.is_some_and(|p| p.ip_number == etherparse::IpNumber::TCP) => {
            return truncated("TCP header");
        }
        None => return Event::Ignored("not_tcp"),
    };
    let server: IpAddr = match &sliced.net {
        Some(LaxNetSlice::Ipv4(s)) => s.header().destination_addr().into(),
        Some(LaxNetSlice::Ipv6(s)) => s.header().destination_addr().into(),
        _ => return Event::Ignored("not_ip"),
    };
    let flow = (
        SocketAddr::new(client, tcp.source_port()),
        SocketAddr::new(server, tcp.destination_port()),
    );
    // As the server's segment: the requests it acknowledges. Resets acknowledge nothing the
    // stack kept (it answers segments of no connection with them), as live.
    let ack = (tcp.ack() && !tcp.rst()).then(|| tcp.acknowledgment_number());
    let mut arrived = ctx.acks.segment(flow, tcp.syn(), ack, ts_ns);
    // As the client's: a request (or a piece of one) to capture, or nothing of interest.
    let own = match request_record(tcp.payload(), flow, tcp.sequence_number(), ts_ns, cut, ctx) {
        Err(kind) if arrived.is_empty() => return Event::Ignored(kind),
        Ok(captured) => {
            let before = arrived.len();
            arrived.extend(ctx.acks.request(captured));
            if arrived.len() == before && ctx.acks.waiting_for_acks() {
                Event::Held
            } else {
                Event::Ignored("request_piece")
            }
        }
        Err(kind) => Event::Ignored(kind),
    };
    let mut ready = ctx.reassembler.expire(ts_ns);
    for rec in arrived {
        ready.extend(ctx.reassembler.push(rec));
    }
    let mut events: Vec<Event> = ready
        .iter()
        .flat_map(|req| requests(req, packet_no, ctx.file, ctx.http, ctx.keep))
        .collect();
    // After the analysed copy's request, as the daemon takes them.
    let origin = Origin {
        file: ctx.file,
        pos: packet_no,
    };
    events.extend(
        ctx.acks
            .conflicts()
            .into_iter()
            .map(|c| Event::Record(ReplayRecord::of_conflict(c, origin))),
    );
    if events.is_empty() {
        return own;
    }
    let first = events.remove(0);
    // `pending` is popped from its end.
    ctx.pending.extend(events.into_iter().rev());
    first
}

/// The record the XDP program would capture from a TCP payload from `flow.0` to `flow.1`, or
/// why it captures none.
fn request_record(
    payload: &[u8],
    flow: (SocketAddr, SocketAddr),
    seq: u32,
    ts_ns: u64,
    cut: bool,
    ctx: &mut Ctx<'_>,
) -> Result<CapturedRequest, &'static str> {
    if payload.is_empty() {
        return Err("no_payload");
    }
    // The XDP program's tests, byte for byte (`capture` in agent-ebpf): a method token and a
    // space; else a piece of a followed request, whatever it starts with; else a request behind
    // empty lines, or fewer than 8 bytes that begin a method token; and a segment that begins
    // among bytes the server acknowledged and goes on past them is read from there.
    let limit = ctx.capture_len;
    let acked = ctx.acks.acknowledged(flow);
    let end = seq.wrapping_add(payload.len() as u32);
    let overlaps = |from: u32| acked.filter(|&a| !seq_reaches(from, a) && !seq_reaches(a, end));
    let followed = if is_http_method(head_of(payload)) {
        None
    } else {
        ctx.follower.piece(flow, seq, payload, ts_ns, limit)
    };
    let (payload, seq, piece) = match followed {
        Some(p) => (payload, seq, Some(p)),
        None => {
            let (payload, seq) = match request_start(payload) {
                Some(skip) => match overlaps(seq.wrapping_add(skip as u32)) {
                    Some(a) => overlapping(payload, seq, a)?,
                    None => (&payload[skip..], seq.wrapping_add(skip as u32)),
                },
                None => match overlaps(seq) {
                    Some(a) => overlapping(payload, seq, a)?,
                    None => return Err("not_http_request"),
                },
            };
            (payload, seq, None)
        }
    };
    let (piece, take) = piece.unwrap_or_else(|| {
        // A packet the snaplen cut is not followed: what it lacks was never captured.
        if !cut && payload.len() < limit && !payload.ends_with(b"\r\n\r\n") {
            ctx.follower.start(flow, seq, payload.len(), ts_ns);
        } else {
            ctx.follower.end(&flow);
        }
        (0, payload.len().min(limit))
    });
    if cut {
        // The request bytes may end early; the parser copes, as with a live prefix.
        *ctx.snaplen_cut += 1;
    }
    Ok(CapturedRequest {
        ts_unix_ns: ts_ns,
        client: flow.0,
        server: flow.1,
        seq,
        // One more than captured when cut: the request is truncated, not waiting for pieces.
        payload_len: (payload.len() + usize::from(cut)) as u32,
        piece,
        data: payload[..take].to_vec(),
    })
}

/// The events of one captured request: each request in its bytes (requests pipelined behind
/// the first are read as the live path reads them, `Engine::on_capture`), parsed or skipped.
fn requests(
    captured: &CapturedRequest,
    packet_no: u64,
    file: u32,
    http: &mut http::Parser,
    keep: &[String],
) -> Vec<Event> {
    let origin = Origin {
        file,
        pos: packet_no,
    };
    let mut events = Vec::new();
    http.each_request(&captured.data, |_, bytes, parsed| {
        events.push(match parsed {
            Ok(req) => {
                let mut headers = Vec::new();
                for name in keep {
                    for v in req.headers.get_all(name) {
                        headers.push((name.clone(), v.to_owned()));
                    }
                }
                Event::Record(ReplayRecord {
                    ts_ns: captured.ts_unix_ns,
                    client: captured.client.ip(),
                    method: req.method,
                    path: req.path.to_owned(),
                    query: req.query.map(str::to_owned),
                    host: req.host.map(str::to_owned),
                    headers,
                    session: None,
                    origin,
                    conflict: None,
                })
            }
            Err(reason) => {
                let line_end = memchr::memmem::find(bytes, b"\r\n").unwrap_or(bytes.len());
                Event::Skip {
                    reason: Skip::Http(reason),
                    packet: packet_no,
                    excerpt: super::formats::excerpt(&bytes[..line_end]),
                }
            }
        });
    });
    events
}

/// The first 8 bytes of `payload`, zero-padded, as the XDP program loads them.
fn head_of(payload: &[u8]) -> [u8; 8] {
    let mut head = [0u8; 8];
    let n = payload.len().min(8);
    head[..n].copy_from_slice(&payload[..n]);
    head
}

/// Where a request starts in `payload`, as the XDP program finds it: at its start or behind
/// up to [`BLANK_MAX`] bytes of empty lines (servers skip them), a method token and a space,
/// or fewer than 8 bytes that begin one.
fn request_start(payload: &[u8]) -> Option<usize> {
    let skip = http::blank_lines(&payload[..payload.len().min(BLANK_MAX + 1)]);
    let rest = &payload[skip..];
    (skip <= BLANK_MAX
        && !rest.is_empty()
        && (is_http_method(head_of(rest)) || is_method_prefix(rest)))
    .then_some(skip)
}

/// A segment from `seq` that begins among bytes the server acknowledged up to `acked` and goes
/// on past them, read from there as the XDP program reads it (`overlapping_at`): the request
/// at `acked`, behind up to 7 bytes of empty lines (more, and the record keeps them), or none.
fn overlapping(payload: &[u8], seq: u32, acked: u32) -> Result<(&[u8], u32), &'static str> {
    let into = acked.wrapping_sub(seq);
    if into > OVERLAP_MAX {
        return Err("not_http_request");
    }
    let rest = &payload[into as usize..];
    let blank = http::blank_lines(&rest[..rest.len().min(8)]);
    let skip = if blank == 8 { 0 } else { blank };
    let rest = &rest[skip..];
    if blank < 8 && !is_http_method(head_of(rest)) && !is_method_prefix(rest) {
        return Err("not_http_request");
    }
    Ok((rest, acked.wrapping_add(skip as u32)))
}

/// Fewer than 8 bytes that begin a method token and its space (`G`, `PO`, `DELETE`): the
/// start of a request whose next segment completes the token, as the XDP program reads it.
fn is_method_prefix(payload: &[u8]) -> bool {
    payload.len() < 8 && METHODS.iter().any(|m| m.starts_with(payload))
}

/// Does the payload start with an HTTP/1.x request method followed by a space? The same
/// test as the XDP program (`agent-ebpf/src/parse.rs`), so replay sees what capture sees.
fn is_http_method(h: [u8; 8]) -> bool {
    METHODS.iter().any(|m| h.starts_with(m))
}

/// The methods the XDP program captures, each with the space after it.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"PATCH ",
    b"OPTIONS ",
    b"CONNECT ",
    b"TRACE ",
];
