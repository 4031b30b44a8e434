//! The XDP program (and the TC egress program that reports the server's acknowledgements)
//! against crafted packets, through BPF_PROG_TEST_RUN: no network needed, but loading a
//! program needs root. Each test checks the verdict, the counters and the bytes of any event
//! the program emitted.
use std::{net::IpAddr, time::Duration};

use agent_common::{COPY_PIECE, Counter, EVENT_HEADER_LEN, EventHeader};
use aya::maps::{MapData, RingBuf};
use precedent::{
    capture::{ACK_PROGRAM, CapturedRequest, Counters, Datapath, LoadOptions, PROGRAM},
    enforce::{EnforceError, Enforcer},
};
use precedent_tests::Packet;

mod common;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// The egress program's only verdict: it watches and never changes or drops a packet.
const TC_ACT_OK: u32 = 0;

struct Harness {
    dp: Datapath,
    ring: RingBuf<MapData>,
    enforcer: Enforcer,
}

/// What one packet did.
struct Outcome {
    verdict: u32,
    counters: Counters,
    events: Vec<Vec<u8>>,
}

impl Outcome {
    /// Asserts exactly these counters moved, by these amounts.
    fn assert_counters(&self, expected: &[(Counter, u64)]) {
        for c in Counter::ALL {
            let want = expected
                .iter()
                .find(|(e, _)| *e == c)
                .map_or(0, |(_, n)| *n);
            assert_eq!(self.counters.get(c), want, "counter {}", c.name());
        }
    }

    fn header(&self) -> EventHeader {
        assert_eq!(self.events.len(), 1, "expected one event");
        // SAFETY: EventHeader is plain repr(C) data; the record is at least its size.
        unsafe { std::ptr::read_unaligned(self.events[0].as_ptr().cast()) }
    }

    /// Each event's piece number and captured bytes.
    fn pieces(&self) -> Vec<(u8, Vec<u8>)> {
        self.events
            .iter()
            .map(|e| {
                // SAFETY: as in `header`.
                let hdr: EventHeader = unsafe { std::ptr::read_unaligned(e.as_ptr().cast()) };
                let len = hdr.captured_len as usize;
                (
                    hdr.piece,
                    e[EVENT_HEADER_LEN..EVENT_HEADER_LEN + len].to_vec(),
                )
            })
            .collect()
    }

    /// The captured bytes (records come in size buckets; bytes past captured_len are noise).
    fn payload(&self) -> &[u8] {
        let len = self.header().captured_len as usize;
        &self.events[0][EVENT_HEADER_LEN..EVENT_HEADER_LEN + len]
    }
}

impl Harness {
    fn new() -> Self {
        Self::with(LoadOptions::default())
    }

    fn with(opts: LoadOptions) -> Self {
        let mut dp = Datapath::load(&opts).expect("load XDP program (needs root)");
        let ring = dp.take_events().unwrap();
        let enforcer = dp.take_enforcer().unwrap();
        Self { dp, ring, enforcer }
    }

    fn run(&mut self, pkt: &Packet) -> Outcome {
        self.run_bytes(&pkt.build())
    }

    fn run_bytes(&mut self, frame: &[u8]) -> Outcome {
        self.run_program(PROGRAM, frame)
    }

    /// Runs a segment the server sends through the TC egress program.
    fn run_egress(&mut self, pkt: &Packet) -> Outcome {
        self.run_program(ACK_PROGRAM, &pkt.build())
    }

    fn run_program(&mut self, program: &str, frame: &[u8]) -> Outcome {
        let before = self.dp.counters().unwrap();
        let (verdict, _) = self.dp.test_run(program, frame, 1).unwrap();
        let counters = self.dp.counters().unwrap().since(&before);
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            events.push(item.to_vec());
        }
        Outcome {
            verdict,
            counters,
            events,
        }
    }
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: api.test\r\nUser-Agent: t\r\n\r\n").into_bytes()
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn ipv4_request_is_captured_with_addresses_ports_and_bytes() {
    let mut h = Harness::new();
    let mut pkt = Packet::tcp("10.9.0.2", "10.9.0.1", &get("/accounts/7/balance"));
    pkt.sport = 51_234;
    pkt.dport = 8080;
    let o = h.run(&pkt);
    assert_eq!(o.verdict, XDP_PASS);
    o.assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
    let hdr = o.header();
    assert_eq!(hdr.family, 4);
    assert_eq!(&hdr.saddr[..4], &[10, 9, 0, 2]);
    assert_eq!(&hdr.daddr[..4], &[10, 9, 0, 1]);
    assert_eq!(&hdr.saddr[4..], &[0; 12]);
    assert_eq!((hdr.sport, hdr.dport), (51_234, 8080));
    assert_eq!(hdr.payload_len as usize, pkt.payload.len());
    assert_eq!(hdr.captured_len as usize, pkt.payload.len());
    assert!(hdr.ts_ns > 0);
    assert_eq!(o.payload(), &pkt.payload[..]);
    // And userspace decodes the same record.
    let req = CapturedRequest::decode(&o.events[0], 0).unwrap();
    assert_eq!(req.client.to_string(), "10.9.0.2:51234");
    assert!(!req.truncated());
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn every_header_byte_is_written_over_earlier_records() {
    // The program writes event headers field by field into ring memory that is not zeroed.
    // In the smallest ring, records soon land on bytes of earlier ones: IPv6 requests (all
    // address bytes set) alternate with IPv4 ones (12 address bytes that must read zero).
    let mut h = Harness::with(LoadOptions {
        ring_bytes: 64 * 1024,
        ..LoadOptions::default()
    });
    let mut v6 = Packet::tcp(
        "fdff:ffff:ffff:ffff:ffff:ffff:ffff:fff2",
        "fdff::1",
        &get("/six"),
    );
    v6.sport = 0xffff;
    let v4 = Packet::tcp("10.9.0.2", "10.9.0.1", &get("/four"));
    // 64 KiB holds 341 records of 192 bytes (header and 128 payload bytes): 1,200 go round it
    // more than three times, each lap a third of a record further along.
    for i in 0..1200 {
        let (pkt, family) = if i % 2 == 0 { (&v6, 6) } else { (&v4, 4) };
        let o = h.run(pkt);
        let hdr = o.header();
        assert_eq!(hdr.family, family, "record {i}");
        assert_eq!(hdr.piece, 0, "record {i}");
        assert_eq!(hdr.sport, pkt.sport, "record {i}");
        assert_eq!(hdr.captured_len as usize, pkt.payload.len(), "record {i}");
        if family == 4 {
            assert_eq!(&hdr.saddr[..4], &[10, 9, 0, 2], "record {i}");
            assert_eq!(&hdr.saddr[4..], &[0; 12], "record {i}");
            assert_eq!(&hdr.daddr[4..], &[0; 12], "record {i}");
        } else {
            assert_eq!(
                IpAddr::from(hdr.saddr),
                "fdff:ffff:ffff:ffff:ffff:ffff:ffff:fff2"
                    .parse::<IpAddr>()
                    .unwrap()
            );
        }
        assert_eq!(o.payload(), &pkt.payload[..], "record {i}");
    }
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn ipv6_request_is_captured() {
    let mut h = Harness::new();
    let pkt = Packet::tcp("fd00:9::2", "fd00:9::1", &get("/v6"));
    let o = h.run(&pkt);
    assert_eq!(o.verdict, XDP_PASS);
    o.assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
    let hdr = o.header();
    assert_eq!(hdr.family, 6);
    assert_eq!(
        IpAddr::from(hdr.saddr),
        "fd00:9::2".parse::<IpAddr>().unwrap()
    );
    assert_eq!(
        IpAddr::from(hdr.daddr),
        "fd00:9::1".parse::<IpAddr>().unwrap()
    );
    assert_eq!(o.payload(), &pkt.payload[..]);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn vlan_tagged_requests_are_captured() {
    let mut h = Harness::new();
    for tpid in [0x8100, 0x88a8] {
        for (src, dst) in [("10.9.0.2", "10.9.0.1"), ("fd00:9::2", "fd00:9::1")] {
            let mut pkt = Packet::tcp(src, dst, &get("/tagged"));
            pkt.vlan = Some(tpid);
            let o = h.run(&pkt);
            assert_eq!(o.verdict, XDP_PASS);
            o.assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
            assert_eq!(o.payload(), &pkt.payload[..], "tpid {tpid:#x} {src}");
        }
    }
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn ip_and_tcp_options_move_the_payload_and_are_skipped() {
    let mut h = Harness::new();
    for (ip_opts, tcp_opts) in [(4, 0), (0, 12), (40, 40), (8, 20)] {
        let mut pkt = Packet::tcp("10.9.0.2", "10.9.0.1", &get("/opts"));
        pkt.ip_options = ip_opts;
        pkt.tcp_options = tcp_opts;
        let o = h.run(&pkt);
        o.assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
        assert_eq!(o.payload(), &pkt.payload[..], "ip {ip_opts} tcp {tcp_opts}");
    }
    // The same with IPv6 and TCP options.
    let mut pkt = Packet::tcp("fd00:9::2", "fd00:9::1", &get("/opts6"));
    pkt.tcp_options = 32;
    let o = h.run(&pkt);
    assert_eq!(o.payload(), &pkt.payload[..]);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn every_http_method_is_captured() {
    let mut h = Harness::new();
    for m in [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ] {
        let payload = format!("{m} /x HTTP/1.1\r\n\r\n");
        let o = h.run(&Packet::tcp("10.9.0.2", "10.9.0.1", payload.as_bytes()));
        o.assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
        assert_eq!(o.payload(), payload.as_bytes(), "{m}");
    }
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn non_http_and_lookalike_payloads_pass_without_event() {
    let mut h = Harness::new();
    let payloads: &[&[u8]] = &[
        b"hello world\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", // TLS ClientHello
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"GETS /x HTTP/1.1\r\n\r\n",
        b"get /x HTTP/1.1\r\n\r\n",
        b"POSTX /x HTTP/1.1\r\n\r\n",
        b"DELETE\t/x HTTP/1.1\r\n\r\n",
        b"OPTIONS/ HTTP/1.1\r\n\r\n",
        b"PUTT / HTTP/1.1\r\n\r\n",
        b"GEX",
        b"HE\0",
    ];
    for p in payloads {
        let o = h.run(&Packet::tcp("10.9.0.2", "10.9.0.1", p));
        assert_eq!(o.verdict, XDP_PASS, "{:?}", String::from_utf8_lossy(p));
        o.assert_counters(&[(Counter::Passed, 1)]);
        assert!(
            o.events.is_empty(),
            "{:?} produced an event",
            String::from_utf8_lossy(p)
        );
    }
    // Not TCP at all: UDP carrying a request-looking payload.
    let mut udp = Packet::tcp("10.9.0.2", "10.9.0.1", &get("/udp"));
    udp.protocol = 17;
    let o = h.run(&udp);
    o.assert_counters(&[(Counter::Passed, 1)]);
    assert!(o.events.is_empty());
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn zero_length_payload_passes_quietly() {
    let mut h = Harness::new();
    for flags in [0x10u8, 0x02] {
        let mut ack = Packet::tcp("10.9.0.2", "10.9.0.1", b"");
        ack.tcp_flags = flags;
        let o = h.run(&ack);
        assert_eq!(o.verdict, XDP_PASS);
        o.assert_counters(&[(Counter::Passed, 1)]);
        assert!(o.events.is_empty());
    }
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn truncated_headers_give_up_and_pass() {
    let mut h = Harness::new();
    let full = Packet::tcp("10.9.0.2", "10.9.0.1", &get("/t")).build();
    // Cut inside the IPv4 header, inside the TCP header, and a frame of only Ethernet.
    for cut in [14 + 10, 14 + 20 + 8, 14] {
        let o = h.run_bytes(&full[..cut]);
        assert_eq!(o.verdict, XDP_PASS, "cut at {cut}");
        o.assert_counters(&[(Counter::Passed, 1), (Counter::ParseGaveUp, 1)]);
        assert!(o.events.is_empty());
    }
    // An IPv4 header whose total length is shorter than its own header length.
    let mut lying = full.clone();
    lying[16..18].copy_from_slice(&10u16.to_be_bytes());
    let o = h.run_bytes(&lying);
    o.assert_counters(&[(Counter::Passed, 1), (Counter::ParseGaveUp, 1)]);
    // A TCP data offset below 5 words.
    let mut bad_doff = full.clone();
    bad_doff[14 + 20 + 12] = 0x30;
    let o = h.run_bytes(&bad_doff);
    o.assert_counters(&[(Counter::Passed, 1), (Counter::ParseGaveUp, 1)]);
    // The IP header says the payload is longer than the frame: what is there is unreadable
    // past the end, so the capture gives up rather than reading beyond the packet.
    let mut long = full.clone();
    let claimed = (full.len() - 14 + 200) as u16;
    long[16..18].copy_from_slice(&claimed.to_be_bytes());
    let o = h.run_bytes(&long);
    assert_eq!(o.verdict, XDP_PASS);
    o.assert_counters(&[(Counter::Passed, 1), (Counter::ParseGaveUp, 1)]);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn ipv6_extension_headers_pass_uncaptured_and_counted() {
    let mut h = Harness::new();
    let mut pkt = Packet::tcp("fd00:9::2", "fd00:9::1", &get("/ext"));
    pkt.ipv6_hop_by_hop = true;
    let o = h.run(&pkt);
    assert_eq!(o.verdict, XDP_PASS);
    o.assert_counters(&[(Counter::Passed, 1), (Counter::Ipv6ExtHeader, 1)]);
    assert!(o.events.is_empty());
}

/// A request split over IP fragments would reach the server unread: fragments of TCP
/// segments (the first with the request line too) are dropped and counted, or passed and
/// counted when the operator says so; other protocols' fragments are not touched.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn ip_fragments_of_tcp_segments_are_dropped_and_counted() {
    let mut h = Harness::new();
    let mut cases = Vec::new();
    for (src, dst) in [("10.9.0.2", "10.9.0.1"), ("fd00:9::2", "fd00:9::1")] {
        for fragment in [(0, true), (3, true), (3, false)] {
            let mut pkt = Packet::tcp(src, dst, &get("/transferFunds"));
            pkt.fragment = Some(fragment);
            cases.push(pkt);
        }
    }
    for pkt in &cases {
        let o = h.run(pkt);
        assert_eq!(o.verdict, XDP_DROP, "{pkt:?}");
        o.assert_counters(&[(Counter::TcpFragment, 1)]);
        assert!(o.events.is_empty());
    }
    h.dp.set_pass_fragments(true).unwrap();
    for pkt in &cases {
        let o = h.run(pkt);
        assert_eq!(o.verdict, XDP_PASS, "{pkt:?}");
        o.assert_counters(&[(Counter::Passed, 1), (Counter::TcpFragment, 1)]);
        assert!(o.events.is_empty());
    }
    h.dp.set_pass_fragments(false).unwrap();
    // A UDP fragment is none of the program's business.
    let mut udp = Packet::tcp("10.9.0.2", "10.9.0.1", b"datagram");
    (udp.protocol, udp.fragment) = (17, Some((0, true)));
    let o = h.run(&udp);
    assert_eq!(o.verdict, XDP_PASS);
    o.assert_counters(&[(Counter::Passed, 1)]);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn long_requests_are_truncated_to_the_configured_capture_length() {
    let mut h = Harness::new();
    let mut long = format!(
        "POST /upload HTTP/1.1\r\nHost: api.test\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(1200)
    )
    .into_bytes();
    long.truncate(1000);
    let pkt = Packet::tcp("10.9.0.2", "10.9.0.1", &long);

    let o = h.run(&pkt);
    o.assert_counters(&[
        (Counter::Passed, 1),
        (Counter::Captured, 1),
        (Counter::Truncated, 1),
    ]);
    assert_eq!(
        (o.header().payload_len, o.header().captured_len),
        (1000, 512)
    );
    assert_eq!(o.payload(), &long[..512]);

    h.dp.set_capture_len(100).unwrap();
    let o = h.run(&pkt);
    assert_eq!(o.header().captured_len, 100);
    assert_eq!(o.payload(), &long[..100]);

    h.dp.set_capture_len(4096).unwrap();
    let o = h.run(&pkt);
    o.assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
    assert_eq!(o.payload(), &long[..]);

    assert!(h.dp.set_capture_len(0).is_err());
    assert!(h.dp.set_capture_len(4097).is_err());
}

/// A segment of the connection `Packet::tcp` builds (client 10.9.0.2:40000), at `seq`.
fn segment(seq: u32, payload: &[u8]) -> Packet {
    let mut p = Packet::tcp("10.9.0.2", "10.9.0.1", payload);
    p.seq = seq;
    p
}

const TCP_ACK: u8 = 0x10;
const TCP_SYN_ACK: u8 = 0x12;
const TCP_RST_ACK: u8 = 0x14;

/// A payload-less segment the server (10.9.0.1:8080) sends back on `segment`'s connection.
fn server_segment(flags: u8, ack: u32) -> Packet {
    let mut p = Packet::tcp("10.9.0.1", "10.9.0.2", &[]);
    (p.sport, p.dport) = (8080, 40_000);
    p.tcp_flags = flags;
    p.seq = 90_000;
    p.ack = ack;
    p
}

/// The one acknowledgement record an egress segment produced; the segment passed untouched
/// and moved no counter.
fn ack_record(o: &Outcome) -> CapturedRequest {
    assert_eq!(o.verdict, TC_ACT_OK);
    o.assert_counters(&[]);
    let hdr = o.header();
    assert_eq!(hdr.piece, agent_common::ACK_RECORD);
    assert_eq!((hdr.payload_len, hdr.captured_len), (0, 0));
    let rec = CapturedRequest::decode(&o.events[0], 0).unwrap();
    assert!(rec.is_ack());
    rec
}

/// Asserts the outcome of an egress segment: passed untouched, no counter moved, and either
/// nothing reported or one acknowledgement record for the client 10.9.0.2:40000 at `ack`.
fn assert_egress(o: &Outcome, reported: Option<u32>) {
    match reported {
        None => {
            assert_eq!(o.verdict, TC_ACT_OK);
            o.assert_counters(&[]);
            assert!(o.events.is_empty(), "nothing reported");
        }
        Some(ack) => {
            let rec = ack_record(o);
            assert_eq!(rec.client.to_string(), "10.9.0.2:40000");
            assert_eq!(rec.server.to_string(), "10.9.0.1:8080");
            assert_eq!(rec.seq, ack);
        }
    }
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_servers_acknowledgement_of_a_captured_request_is_reported_once() {
    let mut h = Harness::new();
    // With ports configured, the egress program watches replies from those ports only.
    h.dp.set_ports(&[443, 8080]).unwrap();
    // The handshake: the server's SYN-ACK starts watching the connection at the client's
    // first byte (1000). Nothing to report yet.
    assert_egress(&h.run_egress(&server_segment(TCP_SYN_ACK, 1_000)), None);
    let first = get("/accounts/7/balance");
    let end = 1_000 + first.len() as u32;
    let o = h.run(&segment(1_000, &first));
    o.assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
    // An acknowledgement short of the request's end is reported (userspace releases nothing
    // on it: the server lacks some of the request); a duplicate of it adds nothing.
    assert_egress(
        &h.run_egress(&server_segment(TCP_ACK, end - 1)),
        Some(end - 1),
    );
    assert_egress(&h.run_egress(&server_segment(TCP_ACK, end - 1)), None);
    // The one that reaches the end is reported, once: a duplicate ACK (the server saying it
    // again, or acknowledging later segments of no request) adds nothing.
    assert_egress(&h.run_egress(&server_segment(TCP_ACK, end)), Some(end));
    assert_egress(&h.run_egress(&server_segment(TCP_ACK, end)), None);
    // The client resends the request (it missed the ACK): the server already has those bytes
    // and drops the copy, so the capture skips it.
    let o = h.run(&segment(1_000, &first));
    o.assert_counters(&[(Counter::Passed, 1), (Counter::Stale, 1)]);
    assert!(o.events.is_empty());
    // The next request is waited for and reported in its turn.
    let second = get("/transferFunds");
    let end2 = end + second.len() as u32;
    h.run(&segment(end, &second))
        .assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
    assert_egress(&h.run_egress(&server_segment(TCP_ACK, end2)), Some(end2));
    // Once nothing waits, acknowledgements of bytes not captured (a request's body, an
    // upload) are not reported.
    assert_egress(&h.run_egress(&server_segment(TCP_ACK, end2 + 500)), None);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_segment_the_stack_drops_does_not_hold_back_the_request_before_it() {
    let mut h = Harness::new();
    assert_egress(&h.run_egress(&server_segment(TCP_SYN_ACK, 1_000)), None);
    let transfer = get("/transferFunds");
    let end = 1_000 + transfer.len() as u32;
    h.run(&segment(1_000, &transfer))
        .assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
    // The client follows its transfer with a request far beyond the server's receive window:
    // the stack drops it, the capture (before the stack) records it, and it is the newest
    // capture of the connection.
    h.run(&segment(end + 200_000, &get("/accounts/7/balance")))
        .assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
    // The server acknowledges the transfer and never the dropped bytes: that acknowledgement
    // must still reach userspace, or the transfer is dropped there as never acknowledged.
    assert_egress(&h.run_egress(&server_segment(TCP_ACK, end)), Some(end));
    // Later acknowledgements that move on are reported while the dropped bytes wait.
    assert_egress(&h.run_egress(&server_segment(TCP_ACK, end)), None);
    assert_egress(
        &h.run_egress(&server_segment(TCP_ACK, end + 40)),
        Some(end + 40),
    );
}

/// Runs `bytes` at `seq` on the connection and asserts what the program made of it: passed, the
/// counters `moved` (besides `passed`), and either nothing captured or one request record at
/// `captured.0` holding exactly `captured.1`.
fn assert_capture(
    h: &mut Harness,
    seq: u32,
    bytes: &[u8],
    moved: &[Counter],
    captured: Option<(u32, &[u8])>,
) {
    let o = h.run(&segment(seq, bytes));
    assert_eq!(o.verdict, XDP_PASS);
    let mut counters = vec![(Counter::Passed, 1)];
    counters.extend(moved.iter().map(|&c| (c, 1)));
    o.assert_counters(&counters);
    match captured {
        None => assert!(o.events.is_empty(), "nothing captured"),
        Some((at, data)) => {
            assert_eq!(o.header().seq, at);
            assert_eq!(o.payload(), data);
        }
    }
}

/// A request longer than the capture, acknowledged, then resent with the next request joined
/// to it: the bytes past the captured length go on past the acknowledged point, so the
/// segment is read from there, not skipped as stale (its captured part is all old bytes).
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_long_request_resent_with_the_next_one_joined_is_read_from_the_acknowledged_point() {
    let mut h = Harness::new();
    assert_egress(&h.run_egress(&server_segment(TCP_SYN_ACK, 1_000)), None);
    let mut first = b"GET /x HTTP/1.1\r\nX-Pad: ".to_vec();
    first.extend(std::iter::repeat_n(b'a', 700));
    first.extend_from_slice(b"\r\n\r\n");
    let end = 1_000 + first.len() as u32;
    let o = h.run(&segment(1_000, &first));
    assert_eq!(o.events.len(), 1, "the long request is captured");
    assert_egress(&h.run_egress(&server_segment(TCP_ACK, end)), Some(end));
    let transfer = b"POST /transferFunds HTTP/1.1\r\nHost: api.test\r\nContent-Length: 0\r\n\r\n";
    let mut joined = first.clone();
    joined.extend_from_slice(transfer);
    let overlap = [Counter::Overlapping, Counter::Captured];
    assert_capture(&mut h, 1_000, &joined, &overlap, Some((end, transfer)));
    // The same long request alone is old bytes all through: stale.
    assert_capture(&mut h, 1_000, &first, &[Counter::Stale], None);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_request_behind_bytes_the_server_acknowledged_is_read_from_where_the_server_reads() {
    let mut h = Harness::new();
    assert_egress(&h.run_egress(&server_segment(TCP_SYN_ACK, 1_000)), None);
    let first = get("/accounts/7/balance");
    let end = 1_000 + first.len() as u32;
    assert_capture(
        &mut h,
        1_000,
        &first,
        &[Counter::Captured],
        Some((1_000, &first)),
    );
    assert_egress(&h.run_egress(&server_segment(TCP_ACK, end)), Some(end));
    let transfer = b"POST /transferFunds HTTP/1.1\r\nHost: api.test\r\nContent-Length: 0\r\n\r\n";
    // One byte the server already has, then the transfer: the stack keeps its own copy of
    // that byte and reads the transfer. Starting with `X`, the segment starts no request;
    // before, it went uncaptured, and the transfer unseen.
    let mut evasive = b"X".to_vec();
    evasive.extend_from_slice(transfer);
    let overlap = [Counter::Overlapping, Counter::Captured];
    assert_capture(&mut h, end - 1, &evasive, &overlap, Some((end, transfer)));
    // Starting with a method token of its own changes nothing: `GET ` is old bytes there.
    let mut posing = b"GET ".to_vec();
    posing.extend_from_slice(transfer);
    assert_capture(&mut h, end - 4, &posing, &overlap, Some((end, transfer)));
    // A client resending its acknowledged request with the next one behind it (TCP joins
    // them after a lost acknowledgement): the next one is captured where it starts. Before,
    // the whole copy was captured from its start and dropped in userspace as stale.
    let mut joined = first.clone();
    joined.extend_from_slice(transfer);
    assert_capture(&mut h, 1_000, &joined, &overlap, Some((end, transfer)));
    // Empty lines at the acknowledged point are skipped, as at a segment's start.
    let mut blank = b"X\r\n".to_vec();
    blank.extend_from_slice(transfer);
    assert_capture(&mut h, end - 1, &blank, &overlap, Some((end + 2, transfer)));
    // What the server reads there is no request (a body, say): counted, nothing captured.
    let body = b"X{\"amount\": 100}";
    assert_capture(&mut h, end - 1, body, &[Counter::Overlapping], None);
    // Wholly acknowledged bytes are stale, as before; bytes at or past the acknowledged point
    // are an ordinary segment.
    assert_capture(&mut h, 1_000, &first, &[Counter::Stale], None);
    assert_capture(
        &mut h,
        end,
        transfer,
        &[Counter::Captured],
        Some((end, transfer)),
    );
    // On a connection the table does not hold, the acknowledged point is unknown: a segment
    // that starts no request stays uncaptured (the table learns connections at their
    // handshake, and from their first captured request).
    let mut unknown = segment(end - 1, &evasive);
    unknown.sport = 40_123;
    let o = h.run(&unknown);
    o.assert_counters(&[(Counter::Passed, 1)]);
    assert!(o.events.is_empty());
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn resets_and_segments_without_the_ack_flag_acknowledge_nothing() {
    let mut h = Harness::new();
    // A connection older than the programs (no SYN-ACK seen): the capture itself starts
    // watching it.
    let req = get("/older");
    let end = 7_000 + req.len() as u32;
    h.run(&segment(7_000, &req))
        .assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
    // A stack answers a segment of no connection (a forged one) with a reset that acknowledges
    // it: not an acknowledgement of anything kept.
    assert_egress(&h.run_egress(&server_segment(TCP_RST_ACK, end)), None);
    // A segment without the ACK flag acknowledges nothing either.
    assert_egress(&h.run_egress(&server_segment(0x02, end)), None);
    // Not TCP at all: passed, ignored.
    let mut udp = server_segment(TCP_ACK, end);
    udp.protocol = 17;
    assert_egress(&h.run_egress(&udp), None);
    // The real acknowledgement, VLAN-tagged as it leaves, is reported.
    let mut tagged = server_segment(TCP_ACK, end);
    tagged.vlan = Some(0x8100);
    assert_egress(&h.run_egress(&tagged), Some(end));
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn an_acknowledgement_on_a_connection_the_table_lost_is_still_reported() {
    let mut h = Harness::new();
    // The server acknowledges on a connection `ACKS` does not hold: one older than the
    // programs, or one whose entry spoofed traffic pushed out of the LRU. Its requests must
    // not wait in vain: reported once, for that connection (another client port, or another
    // server address, is another connection), then watched as usual.
    let mut other_port = server_segment(TCP_ACK, 500);
    other_port.dport = 40_001;
    let rec = ack_record(&h.run_egress(&other_port));
    assert_eq!(rec.client.to_string(), "10.9.0.2:40001");
    assert_eq!(rec.seq, 500);
    assert!(h.run_egress(&other_port).events.is_empty(), "reported once");
    let mut other_server = server_segment(TCP_ACK, 700);
    other_server.src = "10.9.0.3".parse().unwrap();
    let rec = ack_record(&h.run_egress(&other_server));
    assert_eq!(rec.server.to_string(), "10.9.0.3:8080");
    // Watched from there on: a request on the first connection is reported when acknowledged.
    let req = get("/later");
    let mut pkt = Packet::tcp("10.9.0.2", "10.9.0.1", &req);
    (pkt.sport, pkt.seq) = (40_001, 500);
    h.run(&pkt)
        .assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
    let end = 500 + req.len() as u32;
    other_port.ack = end - 1;
    let rec = ack_record(&h.run_egress(&other_port));
    assert_eq!((rec.client.port(), rec.seq), (40_001, end - 1));
    assert!(h.run_egress(&other_port).events.is_empty());
    other_port.ack = end;
    let rec = ack_record(&h.run_egress(&other_port));
    assert_eq!((rec.client.port(), rec.seq), (40_001, end));
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_request_in_a_fast_open_syn_is_acknowledged_by_the_syn_ack() {
    let mut h = Harness::new();
    // TCP Fast Open: the client's SYN (sequence 1000) carries the request, whose bytes start
    // at 1001; the server's SYN-ACK acknowledges them all.
    let req = get("/fast");
    let mut syn = segment(1_000, &req);
    syn.tcp_flags = 0x02;
    h.run(&syn)
        .assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
    let end = 1_001 + req.len() as u32;
    assert_egress(&h.run_egress(&server_segment(TCP_SYN_ACK, end)), Some(end));
    // An ordinary SYN-ACK reports nothing: no request came with its SYN.
    let mut other = server_segment(TCP_SYN_ACK, 1);
    other.dport = 40_001;
    assert!(h.run_egress(&other).events.is_empty());
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn ipv6_acknowledgements_are_reported() {
    let mut h = Harness::new();
    let req = get("/v6");
    let mut pkt = Packet::tcp("fd00:9::2", "fd00:9::1", &req);
    pkt.seq = 55;
    let end = 55 + req.len() as u32;
    h.run(&pkt)
        .assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
    let mut ack = Packet::tcp("fd00:9::1", "fd00:9::2", &[]);
    (ack.sport, ack.dport) = (8080, 40_000);
    (ack.tcp_flags, ack.ack) = (TCP_ACK, 55);
    let o = h.run_egress(&ack);
    assert_eq!(o.verdict, TC_ACT_OK);
    assert!(o.events.is_empty(), "nothing of the request acknowledged");
    ack.ack = end;
    let rec = ack_record(&h.run_egress(&ack));
    assert_eq!(rec.client.to_string(), "[fd00:9::2]:40000");
    assert_eq!(rec.seq, end);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_request_header_split_over_segments_is_captured_piece_by_piece() {
    let mut h = Harness::new();
    let parts: [&[u8]; 3] = [
        b"POST /transf",
        b"erFunds HTTP/1.1\r\nHost: bank.test\r\n",
        b"Authorization: Bearer t0k3n\r\n\r\n",
    ];
    let mut seq = 1_000u32;
    let o = h.run(&segment(seq, parts[0]));
    o.assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
    assert_eq!(o.pieces(), vec![(0, parts[0].to_vec())]);
    // Each record says where its bytes sit in the stream (the agent places bodies by it).
    assert_eq!(o.header().seq, seq);
    seq += parts[0].len() as u32;

    let o = h.run(&segment(seq, parts[1]));
    o.assert_counters(&[(Counter::Passed, 1), (Counter::Continued, 1)]);
    assert_eq!(o.pieces(), vec![(1, parts[1].to_vec())]);
    assert_eq!(o.header().seq, seq);
    assert_eq!(
        (o.header().sport, o.header().dport, &o.header().saddr[..4]),
        (40_000, 8080, &[10u8, 9, 0, 2][..])
    );
    // Another copy of the piece just seen (a retransmission, or the real piece after a
    // forged one the stack refused) is captured again for the agent to compare, and does not
    // end the following. Bytes inside the start are the start's (not a piece's) copy.
    let o = h.run(&segment(seq, parts[1]));
    o.assert_counters(&[(Counter::Passed, 1), (Counter::PieceCopies, 1)]);
    assert_eq!(o.pieces(), vec![(COPY_PIECE, parts[1].to_vec())]);
    assert_eq!(o.header().seq, seq);
    let o = h.run(&segment(seq - 4, &parts[0][parts[0].len() - 4..]));
    o.assert_counters(&[(Counter::Passed, 1)]);
    assert!(o.events.is_empty());
    seq += parts[1].len() as u32;

    // Another connection at the same sequence number is not this one.
    let mut other = segment(seq, parts[2]);
    other.sport = 40_001;
    let o = h.run(&other);
    assert!(o.events.is_empty());

    // The piece that ends the header ends the following: the body after it is not captured.
    let o = h.run(&segment(seq, parts[2]));
    o.assert_counters(&[(Counter::Passed, 1), (Counter::Continued, 1)]);
    assert_eq!(o.pieces(), vec![(2, parts[2].to_vec())]);
    let last = seq;
    seq += parts[2].len() as u32;
    let o = h.run(&segment(seq, b"{\"amount\": 100}"));
    o.assert_counters(&[(Counter::Passed, 1)]);
    assert!(o.events.is_empty());
    // Copies of its pieces still are, for a moment: the last one's too.
    let o = h.run(&segment(last, parts[2]));
    o.assert_counters(&[(Counter::Passed, 1), (Counter::PieceCopies, 1)]);
    assert_eq!(o.pieces(), vec![(COPY_PIECE, parts[2].to_vec())]);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_method_token_split_in_two_still_starts_a_request() {
    let mut h = Harness::new();
    for (first, rest) in [
        (&b"G"[..], &b"ET /accounts/7 HTTP/1.1\r\n\r\n"[..]),
        (b"DELET", b"E /accounts/7 HTTP/1.1\r\n\r\n"),
        (b"OPTIONS", b" * HTTP/1.1\r\n\r\n"),
    ] {
        let o = h.run(&segment(500, first));
        o.assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
        assert_eq!(o.pieces(), vec![(0, first.to_vec())]);
        let o = h.run(&segment(500 + first.len() as u32, rest));
        o.assert_counters(&[(Counter::Passed, 1), (Counter::Continued, 1)]);
        assert_eq!(o.pieces(), vec![(1, rest.to_vec())]);
    }
    // Dripped a byte per segment: the `T` after `GE` is the third piece of a GET, not the start
    // of a TRACE, and the `P`s of `HTTP` are not POSTs.
    let drip = b"GET /x HTTP/1.1\r\n\r\n";
    let mut starts = 0;
    let mut pieces = Vec::new();
    for (i, b) in drip.iter().enumerate() {
        let o = h.run(&segment(9_000 + i as u32, &[*b]));
        starts += o.counters.get(Counter::Captured);
        pieces.extend(o.pieces().into_iter().map(|(n, _)| n));
    }
    assert_eq!(starts, 1);
    assert_eq!(pieces, (0..drip.len() as u8).collect::<Vec<_>>());
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_request_behind_empty_lines_is_captured_from_its_method() {
    let mut h = Harness::new();
    // Servers skip empty lines before a request line (RFC 9112 §2.2; nginx any number), so
    // `\r\nPOST /transferFunds` is a request: captured from its method, its sequence number
    // and length those of the request itself.
    let req = get("/accounts/7");
    for blank in [
        b"\r\n".to_vec(),
        b"\n".to_vec(),
        b"\r\n\r\n\n\r\n".to_vec(),
        b"\r\n".repeat(700),
    ] {
        let o = h.run(&segment(7_000, &[&blank[..], &req].concat()));
        o.assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
        assert_eq!(o.payload(), &req[..], "{} blank bytes", blank.len());
        assert_eq!(o.header().seq, 7_000 + blank.len() as u32);
        assert_eq!(o.header().payload_len as usize, req.len());
    }
    // A method token cut short behind them starts a request the next segment completes.
    let o = h.run(&segment(8_000, b"\r\nPO"));
    o.assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
    assert_eq!(o.pieces(), vec![(0, b"PO".to_vec())]);
    assert_eq!(o.header().seq, 8_002);
    let o = h.run(&segment(8_004, b"ST /transferFunds HTTP/1.1\r\n\r\n"));
    o.assert_counters(&[(Counter::Passed, 1), (Counter::Continued, 1)]);
    // Empty lines before nothing, or before anything but a request, are not one.
    for payload in [
        &b"\r\n\r\n"[..],
        b"\r\n{\"amount\": 100}",
        b"\n\n\x16\x03\x01",
        b"\r\nGETS",
    ] {
        let o = h.run(&segment(9_000, payload));
        o.assert_counters(&[(Counter::Passed, 1)]);
        assert!(o.events.is_empty(), "{payload:?}");
    }
    // More blank bytes than the program reads: it gives up, counted.
    let o = h.run(&segment(
        9_500,
        &[&b"\r\n".repeat(1_100)[..], &req].concat(),
    ));
    o.assert_counters(&[(Counter::Passed, 1), (Counter::ParseGaveUp, 1)]);
    assert!(o.events.is_empty());
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_complete_request_is_not_followed_and_a_gap_ends_the_following() {
    let mut h = Harness::new();
    // A whole request: the next segment of its connection is a body, not a piece.
    let req = get("/balance");
    h.run(&segment(1, &req));
    let o = h.run(&segment(1 + req.len() as u32, b"trailing bytes"));
    assert!(o.events.is_empty());

    // A start that is followed, then a segment further on than the next one expected: the
    // bytes between are missing, the request cannot be put together, following ends.
    h.run(&segment(100, b"GET /a"));
    let o = h.run(&segment(150, b"HTTP/1.1\r\n\r\n"));
    o.assert_counters(&[(Counter::Passed, 1), (Counter::FollowLost, 1)]);
    assert!(o.events.is_empty());
    let o = h.run(&segment(106, b" HTTP/1.1\r\n\r\n"));
    assert!(o.events.is_empty());

    // A new request on a followed connection replaces the following: a whole one ends it.
    h.run(&segment(300, b"GET /b"));
    h.run(&segment(306, &get("/c")));
    let o = h.run(&segment(306 + get("/c").len() as u32, b"more"));
    assert!(o.events.is_empty());
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn pieces_stop_at_the_capture_length() {
    let mut h = Harness::new();
    h.dp.set_capture_len(32).unwrap();
    let start = b"GET /items?page=1";
    let rest = b"&sort=asc HTTP/1.1\r\nHost: a.test\r\n\r\n";
    h.run(&segment(7, start));
    let o = h.run(&segment(7 + start.len() as u32, rest));
    o.assert_counters(&[
        (Counter::Passed, 1),
        (Counter::Continued, 1),
        (Counter::Truncated, 1),
    ]);
    assert_eq!(o.pieces(), vec![(1, rest[..32 - start.len()].to_vec())]);
    // The budget is spent: nothing further is captured.
    let o = h.run(&segment(
        7 + (start.len() + rest.len()) as u32,
        b"X-More: 1\r\n",
    ));
    assert!(o.events.is_empty());
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn http2_preface_is_counted_not_captured() {
    let mut h = Harness::new();
    let o = h.run(&Packet::tcp(
        "10.9.0.2",
        "10.9.0.1",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ));
    assert_eq!(o.verdict, XDP_PASS);
    o.assert_counters(&[(Counter::Passed, 1), (Counter::Http2Preface, 1)]);
    assert!(o.events.is_empty());
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn blocked_ipv4_sources_are_dropped_exact_and_by_prefix() {
    let mut h = Harness::new();
    h.enforcer
        .block(net("10.9.0.2/32"), Duration::from_secs(60))
        .unwrap();
    h.enforcer
        .block(net("10.8.0.0/16"), Duration::from_secs(60))
        .unwrap();

    let o = h.run(&Packet::tcp("10.9.0.2", "10.9.0.1", &get("/x")));
    assert_eq!(o.verdict, XDP_DROP);
    o.assert_counters(&[(Counter::Blocked, 1)]);
    assert!(
        o.events.is_empty(),
        "a blocked request must not be captured"
    );

    // Inside the /16, a SYN and a UDP packet: everything from the source is dropped.
    let mut syn = Packet::tcp("10.8.200.7", "10.9.0.1", b"");
    syn.tcp_flags = 0x02;
    assert_eq!(h.run(&syn).verdict, XDP_DROP);
    let mut udp = Packet::tcp("10.8.0.1", "10.9.0.1", b"dns?");
    udp.protocol = 17;
    assert_eq!(h.run(&udp).verdict, XDP_DROP);

    // Neighbours outside both prefixes pass.
    let o = h.run(&Packet::tcp("10.9.0.3", "10.9.0.1", &get("/x")));
    assert_eq!(o.verdict, XDP_PASS);
    o.assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);

    let blocks = h.enforcer.blocks().unwrap();
    let b16 = blocks.iter().find(|b| b.net == net("10.8.0.0/16")).unwrap();
    assert_eq!(b16.dropped, 2);
    assert!(b16.remaining > Duration::from_secs(50));
    assert_eq!(
        blocks
            .iter()
            .find(|b| b.net == net("10.9.0.2/32"))
            .unwrap()
            .dropped,
        1
    );

    // Unblocking lets it through again.
    assert!(h.enforcer.unblock(net("10.9.0.2/32")).unwrap());
    assert!(!h.enforcer.unblock(net("10.9.0.2/32")).unwrap());
    assert_eq!(
        h.run(&Packet::tcp("10.9.0.2", "10.9.0.1", &get("/x")))
            .verdict,
        XDP_PASS
    );
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn blocked_ipv6_sources_are_dropped_exact_and_by_prefix() {
    let mut h = Harness::new();
    h.enforcer
        .block(net("fd00:9::2/128"), Duration::from_secs(60))
        .unwrap();
    h.enforcer
        .block(net("fd00:8:0:1::/64"), Duration::from_secs(60))
        .unwrap();
    let o = h.run(&Packet::tcp("fd00:9::2", "fd00:9::1", &get("/x")));
    assert_eq!(o.verdict, XDP_DROP);
    o.assert_counters(&[(Counter::Blocked, 1)]);
    // The exact entry matches that one address only.
    assert_eq!(
        h.run(&Packet::tcp("fd00:9::3", "fd00:9::1", &get("/x")))
            .verdict,
        XDP_PASS
    );
    let o = h.run(&Packet::tcp("fd00:8:0:1::abcd", "fd00:9::1", &get("/x")));
    assert_eq!(o.verdict, XDP_DROP);
    o.assert_counters(&[(Counter::Blocked, 1)]);
    let blocks = h.enforcer.blocks().unwrap();
    let nets: Vec<String> = blocks.iter().map(|b| b.net.to_string()).collect();
    assert_eq!(nets, ["fd00:8:0:1::/64", "fd00:9::2/128"]);
    assert!(blocks.iter().all(|b| b.dropped == 1));
    assert_eq!(
        h.run(&Packet::tcp("fd00:8:0:2::1", "fd00:9::1", &get("/x")))
            .verdict,
        XDP_PASS
    );
    // Blocking applies even when extension headers stop the capture.
    let mut ext = Packet::tcp("fd00:9::2", "fd00:9::1", &get("/x"));
    ext.ipv6_hop_by_hop = true;
    assert_eq!(h.run(&ext).verdict, XDP_DROP);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn expired_blocks_stop_applying_in_the_kernel_and_are_swept() {
    let mut h = Harness::new();
    // Exact addresses (hash maps) and prefixes (tries), both families.
    let cases = [
        ("10.9.0.2/32", "10.9.0.2", "10.9.0.1"),
        ("10.4.0.0/16", "10.4.9.9", "10.9.0.1"),
        ("fd00:9::2/128", "fd00:9::2", "fd00:9::1"),
        ("fd00:4::/64", "fd00:4::99", "fd00:9::1"),
    ];
    // Long enough that the first packets surely arrive before expiry, even under QEMU TCG
    // on a loaded machine (50 ms was not).
    const TTL: Duration = Duration::from_secs(2);
    for (block, _, _) in cases {
        h.enforcer.block(net(block), TTL).unwrap();
    }
    for (_, src, dst) in cases {
        assert_eq!(h.run(&Packet::tcp(src, dst, &get("/x"))).verdict, XDP_DROP);
    }
    // The kernel's coarse clock, cached per CPU until jiffies move, may end a block a tick late.
    std::thread::sleep(TTL + Duration::from_millis(100));
    for (block, src, dst) in cases {
        let o = h.run(&Packet::tcp(src, dst, &get("/x")));
        assert_eq!(o.verdict, XDP_PASS, "{block}");
        o.assert_counters(&[
            (Counter::Passed, 1),
            (Counter::Captured, 1),
            (Counter::BlockExpired, 1),
        ]);
    }
    assert_eq!(h.enforcer.sweep().unwrap(), 4);
    assert!(h.enforcer.blocks().unwrap().is_empty());
    assert!(h.enforcer.is_empty());
    assert_eq!(
        h.enforcer.block(net("10.9.0.2/32"), Duration::ZERO),
        Err(EnforceError::ZeroTtl)
    );
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn an_expired_exact_block_does_not_hide_a_live_prefix_block() {
    let mut h = Harness::new();
    h.enforcer
        .block(net("10.8.0.0/16"), Duration::from_secs(60))
        .unwrap();
    h.enforcer
        .block(net("10.8.0.5/32"), Duration::from_millis(50))
        .unwrap();
    std::thread::sleep(Duration::from_millis(120));
    let o = h.run(&Packet::tcp("10.8.0.5", "10.9.0.1", &get("/x")));
    assert_eq!(o.verdict, XDP_DROP);
    // Dropped by the live prefix; the expired entry let nothing through, so it is not counted.
    o.assert_counters(&[(Counter::Blocked, 1)]);
    let blocks = h.enforcer.blocks().unwrap();
    assert_eq!(blocks[0].net, net("10.8.0.0/16"));
    assert_eq!(blocks[0].dropped, 1);
    assert_eq!((blocks[1].net, blocks[1].dropped), (net("10.8.0.5/32"), 0));
    assert!(blocks[1].remaining.is_zero());
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn allowlist_wins_over_an_exact_block() {
    let mut h = Harness::new();
    // The blocks come first; the allowlist entries added afterwards cover them.
    h.enforcer
        .block(net("10.7.3.3/32"), Duration::from_secs(60))
        .unwrap();
    h.enforcer
        .block(net("10.7.4.4/32"), Duration::from_secs(60))
        .unwrap();
    h.enforcer
        .block(net("fd00:7::3/128"), Duration::from_secs(60))
        .unwrap();
    h.enforcer.allow(net("10.7.3.0/24")).unwrap();
    h.enforcer.allow(net("fd00:7::/64")).unwrap();
    let o = h.run(&Packet::tcp("10.7.3.3", "10.9.0.1", &get("/x")));
    assert_eq!(o.verdict, XDP_PASS);
    o.assert_counters(&[
        (Counter::Passed, 1),
        (Counter::Captured, 1),
        (Counter::Allowlisted, 1),
    ]);
    let o = h.run(&Packet::tcp("fd00:7::3", "fd00:9::1", &get("/x")));
    assert_eq!(o.verdict, XDP_PASS);
    o.assert_counters(&[
        (Counter::Passed, 1),
        (Counter::Captured, 1),
        (Counter::Allowlisted, 1),
    ]);
    // An exact block outside the allowlist still drops.
    let o = h.run(&Packet::tcp("10.7.4.4", "10.9.0.1", &get("/x")));
    assert_eq!(o.verdict, XDP_DROP);
    o.assert_counters(&[(Counter::Blocked, 1)]);
    // Once the allowlist entry goes, the exact block applies again.
    assert!(h.enforcer.disallow(net("10.7.3.0/24")).unwrap());
    assert_eq!(
        h.run(&Packet::tcp("10.7.3.3", "10.9.0.1", &get("/x")))
            .verdict,
        XDP_DROP
    );
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn allowlist_inside_a_blocked_prefix_wins() {
    let mut h = Harness::new();
    h.enforcer
        .block(net("10.7.0.0/16"), Duration::from_secs(60))
        .unwrap();
    h.enforcer.allow(net("10.7.1.0/24")).unwrap();
    let o = h.run(&Packet::tcp("10.7.1.9", "10.9.0.1", &get("/x")));
    assert_eq!(o.verdict, XDP_PASS);
    o.assert_counters(&[
        (Counter::Passed, 1),
        (Counter::Captured, 1),
        (Counter::Allowlisted, 1),
    ]);
    assert_eq!(
        h.run(&Packet::tcp("10.7.2.9", "10.9.0.1", &get("/x")))
            .verdict,
        XDP_DROP
    );
    // A block entirely inside the allowlist is refused outright.
    assert!(matches!(
        h.enforcer
            .block(net("10.7.1.5/32"), Duration::from_secs(60)),
        Err(EnforceError::Allowlisted { .. })
    ));
    assert!(h.enforcer.is_allowlisted("10.7.1.200".parse().unwrap()));
    assert_eq!(h.enforcer.allowlist().unwrap(), vec![net("10.7.1.0/24")]);
    // IPv6 the same way.
    h.enforcer
        .block(net("fd00:7::/48"), Duration::from_secs(60))
        .unwrap();
    h.enforcer.allow(net("fd00:7:0:1::/64")).unwrap();
    assert_eq!(
        h.run(&Packet::tcp("fd00:7:0:1::5", "fd00:9::1", &get("/x")))
            .verdict,
        XDP_PASS
    );
    assert_eq!(
        h.run(&Packet::tcp("fd00:7:0:2::5", "fd00:9::1", &get("/x")))
            .verdict,
        XDP_DROP
    );
    assert!(h.enforcer.disallow(net("fd00:7:0:1::/64")).unwrap());
    assert_eq!(
        h.run(&Packet::tcp("fd00:7:0:1::5", "fd00:9::1", &get("/x")))
            .verdict,
        XDP_DROP
    );
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_full_ring_buffer_is_counted_not_fatal() {
    // The smallest ring (64 KiB) holds about 100 events of 600 bytes; send more undrained.
    let mut dp = Datapath::load(&LoadOptions {
        ring_bytes: 64 * 1024,
        ..LoadOptions::default()
    })
    .unwrap();
    let long = format!("GET /fill HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "p".repeat(600));
    let frame = Packet::tcp("10.9.0.2", "10.9.0.1", long.as_bytes()).build();
    let before = dp.counters().unwrap();
    let (verdict, _) = dp.test_run(PROGRAM, &frame, 300).unwrap();
    assert_eq!(verdict, XDP_PASS);
    let c = dp.counters().unwrap().since(&before);
    assert_eq!(c.get(Counter::Passed), 300);
    assert!(c.get(Counter::RingbufFull) > 0, "{c:?}");
    assert_eq!(c.get(Counter::Captured) + c.get(Counter::RingbufFull), 300);
}

/// An acknowledgement that finds the ring full is reported by the next one, a duplicate
/// too: otherwise the request it covers would wait out its time and be dropped.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn an_acknowledgement_lost_to_a_full_ring_is_reported_by_the_next() {
    let mut h = Harness::with(LoadOptions {
        ring_bytes: 64 * 1024,
        ..LoadOptions::default()
    });
    assert_egress(&h.run_egress(&server_segment(TCP_SYN_ACK, 1_000)), None);
    let req = get("/accounts/7/balance");
    let end = 1_000 + req.len() as u32;
    h.run(&segment(1_000, &req))
        .assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
    // Other connections' requests fill the ring, undrained.
    let long = format!("GET /fill HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "p".repeat(600));
    let mut filler = Packet::tcp("10.9.0.3", "10.9.0.1", long.as_bytes());
    filler.sport = 41_000;
    h.dp.test_run(PROGRAM, &filler.build(), 300).unwrap();
    // Then acknowledgement records of connections the table does not hold (one each), the
    // size of the one to come, until one finds no room.
    let full = |dp: &Datapath| dp.counters().unwrap().get(Counter::RingbufFull);
    let before = full(&h.dp);
    for port in 20_000..30_000 {
        let mut other = server_segment(TCP_ACK, 5);
        other.dport = port;
        h.dp.test_run(ACK_PROGRAM, &other.build(), 1).unwrap();
        if full(&h.dp) > before {
            break;
        }
    }
    assert!(full(&h.dp) > before, "the ring never filled");
    let o = h.run_egress(&server_segment(TCP_ACK, end));
    assert_eq!(o.counters.get(Counter::RingbufFull), 1, "{:?}", o.counters);
    assert!(
        o.events.iter().all(|e| {
            // SAFETY: every event starts with an EventHeader.
            let hdr: EventHeader = unsafe { std::ptr::read_unaligned(e.as_ptr().cast()) };
            hdr.piece != agent_common::ACK_RECORD || hdr.sport != 40_000
        }),
        "the acknowledgement found no room"
    );
    // The ring was drained: the server's next acknowledgement, the same number, gets in.
    assert_egress(&h.run_egress(&server_segment(TCP_ACK, end)), Some(end));
    assert_egress(&h.run_egress(&server_segment(TCP_ACK, end)), None);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn batch_updates_report_each_result() {
    use precedent::enforce::BlockOp;
    let mut h = Harness::new();
    h.enforcer.allow(net("10.6.0.0/24")).unwrap();
    let results = h.enforcer.apply(&[
        BlockOp::Block {
            net: net("10.5.0.0/24"),
            ttl: Duration::from_secs(30),
        },
        BlockOp::Block {
            net: net("10.6.0.9/32"),
            ttl: Duration::from_secs(30),
        },
        BlockOp::Block {
            net: net("fd00:5::/64"),
            ttl: Duration::from_secs(30),
        },
        BlockOp::Unblock {
            net: net("10.5.0.0/24"),
        },
    ]);
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(EnforceError::Allowlisted { .. })));
    assert!(results[2].is_ok() && results[3].is_ok());
    let nets: Vec<_> = h
        .enforcer
        .blocks()
        .unwrap()
        .into_iter()
        .map(|b| b.net)
        .collect();
    assert_eq!(nets, vec![net("fd00:5::/64")]);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_full_exact_bucket_spills_into_the_trie_transparently() {
    use agent_common::{EXACT_WAYS, exact_bucket_v4};
    let mut h = Harness::new();
    // EXACT_WAYS + 2 addresses that hash to the same bucket of the exact table.
    let bucket = |a: std::net::Ipv4Addr| exact_bucket_v4(u32::from_ne_bytes(a.octets()), 0);
    let first: std::net::Ipv4Addr = "10.3.0.1".parse().unwrap();
    let same: Vec<std::net::Ipv4Addr> = (u32::from(first)..)
        .map(std::net::Ipv4Addr::from)
        .filter(|a| bucket(*a) == bucket(first))
        .take(EXACT_WAYS as usize + 2)
        .collect();
    for a in &same {
        h.enforcer
            .block(net(&format!("{a}/32")), Duration::from_secs(60))
            .unwrap();
    }
    // Every one of them is dropped, whether its block sits in the table or in the trie.
    for a in &same {
        let o = h.run(&Packet::tcp(&a.to_string(), "10.9.0.1", &get("/x")));
        assert_eq!(o.verdict, XDP_DROP, "{a}");
        o.assert_counters(&[(Counter::Blocked, 1)]);
    }
    let blocks = h.enforcer.blocks().unwrap();
    assert_eq!(blocks.len(), same.len());
    assert!(
        blocks
            .iter()
            .all(|b| b.dropped == 1 && b.net.prefix_len() == 32)
    );
    // Re-blocking one in place does not duplicate it; unblocking frees the slot for another.
    h.enforcer
        .block(net(&format!("{}/32", same[0])), Duration::from_secs(90))
        .unwrap();
    assert_eq!(h.enforcer.len(), same.len());
    for a in &same {
        assert!(h.enforcer.unblock(net(&format!("{a}/32"))).unwrap(), "{a}");
        let o = h.run(&Packet::tcp(&a.to_string(), "10.9.0.1", &get("/x")));
        assert_eq!(o.verdict, XDP_PASS, "{a} after unblock");
    }
    assert!(h.enforcer.is_empty());
    assert!(h.enforcer.blocks().unwrap().is_empty());
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn an_expired_narrow_block_does_not_hide_a_live_wider_one() {
    // A longest-prefix match alone would find the expired /24 and stop there.
    let mut h = Harness::new();
    h.enforcer
        .block(net("10.8.0.0/16"), Duration::from_secs(60))
        .unwrap();
    h.enforcer
        .block(net("10.8.5.0/24"), Duration::from_millis(50))
        .unwrap();
    h.enforcer
        .block(net("fd00:8::/48"), Duration::from_secs(60))
        .unwrap();
    h.enforcer
        .block(net("fd00:8:0:5::/64"), Duration::from_millis(50))
        .unwrap();
    std::thread::sleep(Duration::from_millis(120));
    for src in ["10.8.5.9", "fd00:8:0:5::9"] {
        let dst = if src.contains(':') {
            "fd00:9::1"
        } else {
            "10.9.0.1"
        };
        let o = h.run(&Packet::tcp(src, dst, &get("/x")));
        assert_eq!(o.verdict, XDP_DROP, "{src}");
        o.assert_counters(&[(Counter::Blocked, 1)]);
    }
    let dropped = common::dropped_by_block(&h.enforcer.blocks().unwrap());
    assert_eq!(
        dropped,
        [
            ("10.8.0.0/16".to_string(), 1),
            ("10.8.5.0/24".to_string(), 0),
            ("fd00:8::/48".to_string(), 1),
            ("fd00:8:0:5::/64".to_string(), 0),
        ]
    );
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn prefix_lengths_beyond_those_hashed_are_blocked_through_the_trie() {
    use agent_common::HASHED_LENGTHS;
    let mut h = Harness::new();
    // One block per length from /32 down: the first HASHED_LENGTHS go to the hash table,
    // the rest to the trie; every one of them drops, the narrowest live block counting it.
    let lens: Vec<u8> = (0..HASHED_LENGTHS as u8 + 3).map(|i| 32 - 2 * i).collect();
    let blocks: Vec<(String, String)> = lens
        .iter()
        .enumerate()
        .map(|(i, len)| {
            // Disjoint networks (first octets differ, lengths exceed 8); the source is the
            // last address of each.
            let base = format!("{}.1.2.3", 20 + i);
            let net = ipnet::Ipv4Net::new(base.parse().unwrap(), *len)
                .unwrap()
                .trunc();
            (net.to_string(), net.broadcast().to_string())
        })
        .collect();
    for (b, _) in &blocks {
        h.enforcer.block(net(b), Duration::from_secs(60)).unwrap();
    }
    for (b, src) in &blocks {
        let o = h.run(&Packet::tcp(src, "10.9.0.1", &get("/x")));
        assert_eq!(o.verdict, XDP_DROP, "{b} via {src}");
    }
    assert!(h.enforcer.blocks().unwrap().iter().all(|b| b.dropped == 1));
    // Freeing a hashed length makes room for another; everything still applies.
    assert!(h.enforcer.unblock(net(&blocks[0].0)).unwrap());
    h.enforcer
        .block(net("10.250.0.0/23"), Duration::from_secs(60))
        .unwrap();
    for src in ["10.250.1.1", blocks[5].1.as_str()] {
        assert_eq!(
            h.run(&Packet::tcp(src, "10.9.0.1", &get("/x"))).verdict,
            XDP_DROP,
            "{src}"
        );
    }
    assert_eq!(
        h.run(&Packet::tcp(&blocks[0].1, "10.9.0.1", &get("/x")))
            .verdict,
        XDP_PASS
    );
    for (b, _) in &blocks[1..] {
        assert!(h.enforcer.unblock(net(b)).unwrap(), "{b}");
    }
    assert!(h.enforcer.unblock(net("10.250.0.0/23")).unwrap());
    assert!(h.enforcer.is_empty());
    assert_eq!(
        h.run(&Packet::tcp(&blocks[5].1, "10.9.0.1", &get("/x")))
            .verdict,
        XDP_PASS
    );
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn only_requests_to_the_configured_ports_are_captured() {
    let mut h = Harness::with(LoadOptions {
        ports: vec![8080, 443],
        ..LoadOptions::default()
    });
    let to = |port: u16| {
        let mut p = Packet::tcp("10.9.0.2", "10.9.0.1", &get("/x"));
        p.dport = port;
        p
    };
    for port in [8080, 443] {
        let o = h.run(&to(port));
        assert_eq!(o.verdict, XDP_PASS);
        o.assert_counters(&[(Counter::Passed, 1), (Counter::Captured, 1)]);
        assert_eq!(o.events.len(), 1, "{port}");
    }
    let o = h.run(&to(9090));
    assert_eq!(o.verdict, XDP_PASS);
    o.assert_counters(&[(Counter::Passed, 1), (Counter::OtherPort, 1)]);
    assert!(o.events.is_empty());
    // Blocking does not depend on the port.
    h.enforcer
        .block(net("10.9.0.2/32"), Duration::from_secs(60))
        .unwrap();
    assert_eq!(h.run(&to(9090)).verdict, XDP_DROP);
    h.enforcer.unblock(net("10.9.0.2/32")).unwrap();
    // Changed at runtime: more ports than the program compares means all, filtered upstream.
    let many: Vec<u16> = (1..=agent_common::KERNEL_PORTS as u16 + 1).collect();
    h.dp.set_ports(&many).unwrap();
    assert_eq!(h.run(&to(9090)).events.len(), 1);
    h.dp.set_ports(&[9090]).unwrap();
    assert_eq!(h.run(&to(9090)).events.len(), 1);
    assert!(h.run(&to(8080)).events.is_empty());
    h.dp.set_ports(&[]).unwrap();
    assert_eq!(h.run(&to(8080)).events.len(), 1);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_program_verifies_with_half_the_verifiers_budget_to_spare() {
    let mut h = Harness::new();
    // The verifier walks every path of the program; past 1,000,000 instructions it refuses
    // it. Changes that bring it near (a second copy of the empty-line scan did) fail here,
    // on each kernel the tests run on, before they fail on a user's.
    if let Some(n) = h.dp.verified_instructions().unwrap() {
        eprintln!("the XDP program verified in {n} instructions");
        assert!(n < 500_000, "{n} instructions verified");
    }
}
