//! Packet captures (pcap and pcapng): each TCP payload that starts like an HTTP/1.x request
//! (the XDP program's test) goes through the live path's [`http::Parser`], cut to the capture
//! length the daemon would copy; the client is the source address, the time the packet's.
//!
//! Like the XDP path there is no TCP reassembly: a request split over segments yields the
//! part in its first segment (the parser tolerates truncation), later segments are ignored.
//! Requests pipelined in one segment are each read, as far as the capture length goes.
use etherparse::{EtherType, LaxNetSlice, LaxSlicedPacket, TransportSlice};
use pcap_parser::{
    Block, Linktype, PcapBlockOwned, PcapError, create_reader,
    traits::{PcapNGPacketBlock as _, PcapReaderIterator},
};

use super::{Origin, ReplayRecord, formats::Skip, input::Input};
use crate::http;

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
        }
    }

    pub fn next_event(&mut self) -> Event {
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
    let payload = tcp.payload();
    // The XDP program's test, byte for byte: at least 4 bytes, a method token and a space.
    if payload.len() < 4 {
        return Event::Ignored("no_payload");
    }
    let mut head = [0u8; 8];
    let n = payload.len().min(8);
    head[..n].copy_from_slice(&payload[..n]);
    if !is_http_method(head) {
        return Event::Ignored("not_http_request");
    }
    if cut {
        // The request bytes may end early; the parser copes, as with a live prefix.
        *ctx.snaplen_cut += 1;
    }
    let captured = &payload[..payload.len().min(ctx.capture_len)];
    let origin = Origin {
        file: ctx.file,
        pos: packet_no,
    };
    // Requests pipelined behind the first are read as the live path reads them
    // (`Engine::on_capture`): the first is this packet's event, the others wait in `pending`.
    let mut first = None;
    let mut later = Vec::new();
    let Ctx {
        http,
        keep,
        pending,
        ..
    } = ctx;
    http.each_request(captured, |i, bytes, parsed| {
        let event = match parsed {
            Ok(req) => {
                let mut headers = Vec::new();
                for name in keep.iter() {
                    for v in req.headers.get_all(name) {
                        headers.push((name.clone(), v.to_owned()));
                    }
                }
                Event::Record(ReplayRecord {
                    ts_ns,
                    client,
                    method: req.method,
                    path: req.path.to_owned(),
                    query: req.query.map(str::to_owned),
                    host: req.host.map(str::to_owned),
                    headers,
                    session: None,
                    origin,
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
        };
        if i == 0 {
            first = Some(event);
        } else {
            later.push(event);
        }
    });
    // `pending` is popped from its end.
    pending.extend(later.into_iter().rev());
    // `each_request` always reports the first request, parsed or not.
    first.unwrap_or(Event::Ignored("not_http_request"))
}

/// Does the payload start with an HTTP/1.x request method followed by a space? The same
/// test as the XDP program (`agent-ebpf/src/parse.rs`), so replay sees what capture sees.
fn is_http_method(h: [u8; 8]) -> bool {
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
    METHODS.iter().any(|m| h.starts_with(m))
}
