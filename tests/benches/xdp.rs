//! Nanoseconds per packet for the XDP program, measured in the kernel by BPF_PROG_TEST_RUN
//! with many repeats, next to an empty XDP program built in the same object; and the same for
//! the TC egress program that watches the server's acknowledgements, next to an empty
//! classifier. Needs root. Run with `cargo xtask bench-xdp`.
use std::time::Duration;

use agent_common::Counter;
use precedent::capture::{
    ACK_BASELINE_PROGRAM, ACK_PROGRAM, BASELINE_PROGRAM, Datapath, LoadOptions, PROGRAM,
};
use precedent_tests::Packet;

/// Repeats per BPF_PROG_TEST_RUN call; the ring buffer is drained between calls so captured
/// requests keep taking the capture path (not the ring-full one).
const REPEAT: u32 = 2_000;
const ROUNDS: usize = 41;

fn main() {
    if !precedent_tests::is_root() {
        eprintln!("bench-xdp loads an XDP program and needs root");
        std::process::exit(1);
    }
    let mut dp = Datapath::load(&LoadOptions::default()).expect("load XDP program");
    let mut ring = dp.take_events().unwrap();
    let mut enforcer = dp.take_enforcer().unwrap();

    // Realistic block maps: 999 entries of mixed prefix lengths (two thirds single addresses,
    // a third /24s), plus the two the cases hit: three prefix lengths in the hash table.
    for i in 0..999u32 {
        let net = format!(
            "172.{}.{}.0/{}",
            16 + (i % 16),
            i / 16,
            if i % 3 == 0 { 24 } else { 32 }
        );
        enforcer
            .block(net.parse().unwrap(), Duration::from_secs(3600))
            .unwrap();
    }
    for hit in ["10.66.0.0/16", "10.77.3.4/32"] {
        enforcer
            .block(hit.parse().unwrap(), Duration::from_secs(3600))
            .unwrap();
    }
    // IPv6: 200 single addresses, 100 /64s and the /48 a case hits.
    for i in 0..300u32 {
        let net = if i % 3 == 0 {
            format!("fd00:{:x}:{:x}::/64", 0x100 + i / 256, i % 256)
        } else {
            format!("fd00:{:x}::{:x}/128", 0x200 + i / 256, i % 256)
        };
        enforcer
            .block(net.parse().unwrap(), Duration::from_secs(3600))
            .unwrap();
    }
    enforcer
        .block("fd00:66::/48".parse().unwrap(), Duration::from_secs(3600))
        .unwrap();
    assert_eq!(enforcer.len(), 1302);

    let mut non_http = Packet::tcp("10.9.0.2", "10.9.0.1", &[0x17; 200]); // TLS-like record
    non_http.tcp_options = 12; // timestamps, as on a real connection
    let request = {
        let mut r = format!("POST /api/v1/transferFunds HTTP/1.1\r\nHost: bank.test\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n", "t".repeat(200)).into_bytes();
        r.resize(510, b'x');
        r.extend_from_slice(b"\r\n");
        r
    };
    assert_eq!(request.len(), 512);
    let mut captured = Packet::tcp("10.9.0.2", "10.9.0.1", &request);
    captured.tcp_options = 12;
    // The longest scan: a full segment of empty lines (1,400 bytes) before something that is
    // not a request (a request is captured as soon as it is found).
    let mut blank = b"\r\n".repeat(700);
    blank.push(b'x');
    let mut blank_lines = Packet::tcp("10.9.0.2", "10.9.0.1", &blank);
    blank_lines.tcp_options = 12;
    let mut blocked_exact = Packet::tcp("10.77.3.4", "10.9.0.1", &[0x17; 200]);
    blocked_exact.tcp_options = 12;
    let mut blocked_prefix = Packet::tcp("10.66.3.4", "10.9.0.1", &[0x17; 200]);
    blocked_prefix.tcp_options = 12;
    let mut non_http6 = Packet::tcp("fd00:9::2", "fd00:9::1", &[0x17; 200]);
    non_http6.tcp_options = 12;
    let mut blocked6 = Packet::tcp("fd00:66:0:7::9", "fd00:9::1", &[0x17; 200]);
    blocked6.tcp_options = 12;

    // A second instance whose block maps are empty: the common case on most servers.
    let mut empty = Datapath::load(&LoadOptions::default()).expect("load XDP program");
    let _empty_enforcer = empty.take_enforcer().unwrap();
    // A third whose blocks use all the prefix lengths the hash table serves: the worst case
    // for a packet that is not blocked (one bucket probed per length).
    let mut wide = Datapath::load(&LoadOptions::default()).expect("load XDP program");
    let mut wide_enforcer = wide.take_enforcer().unwrap();
    for (i, len) in [32, 30, 28, 24, 20, 16, 12, 8].into_iter().enumerate() {
        let net = format!("172.{}.0.0/{len}", 16 + i);
        wide_enforcer
            .block(net.parse().unwrap(), Duration::from_secs(3600))
            .unwrap();
    }

    // A fourth capturing port 443 only: other ports' segments stop at the port filter, before
    // the connection lookup a segment that starts no request costs (it may sit behind bytes
    // the server acknowledged: see `overlapping` in agent-ebpf).
    let mut ported = Datapath::load(&LoadOptions::default()).expect("load XDP program");
    let _ported_enforcer = ported.take_enforcer().unwrap();
    ported.set_ports(&[443]).unwrap();

    let cases: [(&str, &str, Vec<u8>); 8] = [
        (
            "baseline (empty XDP program)",
            BASELINE_PROGRAM,
            non_http.build(),
        ),
        ("non-HTTP TCP packet", PROGRAM, non_http.build()),
        ("captured 512-byte request", PROGRAM, captured.build()),
        (
            "1,400 blank bytes, no request",
            PROGRAM,
            blank_lines.build(),
        ),
        (
            "blocked, single address (/32)",
            PROGRAM,
            blocked_exact.build(),
        ),
        ("blocked, inside a /16", PROGRAM, blocked_prefix.build()),
        ("IPv6 non-HTTP TCP packet", PROGRAM, non_http6.build()),
        ("IPv6 blocked, inside a /48", PROGRAM, blocked6.build()),
    ];

    // Interleave the cases round by round so machine noise hits them alike; report medians.
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len() + 3];
    let before = dp.counters().unwrap();
    let frame = non_http.build();
    for _ in 0..ROUNDS {
        for (i, (_, prog, frame)) in cases.iter().enumerate() {
            let (_, per_run) = dp.test_run(prog, frame, REPEAT).unwrap();
            samples[i].push(per_run.as_nanos() as f64);
            while ring.next().is_some() {}
        }
        let (_, per_run) = empty.test_run(PROGRAM, &frame, REPEAT).unwrap();
        samples[cases.len()].push(per_run.as_nanos() as f64);
        let (_, per_run) = wide.test_run(PROGRAM, &frame, REPEAT).unwrap();
        samples[cases.len() + 1].push(per_run.as_nanos() as f64);
        let (_, per_run) = ported.test_run(PROGRAM, &frame, REPEAT).unwrap();
        samples[cases.len() + 2].push(per_run.as_nanos() as f64);
    }
    let delta = dp.counters().unwrap().since(&before);
    let total = (ROUNDS as u64) * u64::from(REPEAT);
    assert_eq!(
        delta.get(Counter::Captured),
        total,
        "every request run must be captured"
    );
    assert_eq!(delta.get(Counter::RingbufFull), 0);
    assert_eq!(delta.get(Counter::Blocked), 3 * total);

    let medians: Vec<f64> = samples.iter_mut().map(|v| median(v)).collect();
    println!(
        "XDP cost per packet (BPF_PROG_TEST_RUN, {ROUNDS} rounds x {REPEAT} repeats, median; IPv4 blocks: 667 /32, 333 /24, one /16; IPv6: 200 /128, 100 /64, one /48)"
    );
    println!("{:<34} {:>10} {:>10}", "case", "ns/packet", "x baseline");
    let names = cases.iter().map(|(n, _, _)| *n).chain([
        "non-HTTP, no block entries at all",
        "non-HTTP, 8 prefix lengths in use",
        "non-HTTP, port not captured",
    ]);
    for (name, ns) in names.zip(&medians) {
        println!("{name:<34} {ns:>10.1} {:>10.2}", ns / medians[0]);
    }
    egress(&mut dp, &mut ring);
}

/// The egress side: every segment the server sends passes `precedent_acks`, most of them on
/// connections it watches (a reply's ACK), so that is the case that matters.
fn egress(dp: &mut Datapath, ring: &mut aya::maps::RingBuf<aya::maps::MapData>) {
    let server = |flags: u8, ack: u32, payload: &[u8]| {
        let mut p = Packet::tcp("10.9.0.1", "10.9.0.2", payload);
        (p.sport, p.dport, p.tcp_flags, p.ack) = (8080, 40_000, flags, ack);
        p.tcp_options = 12;
        p.build()
    };
    // Watch the connection (its SYN-ACK) and capture a request on it; every repeat of the
    // reply then finds the entry and compares (the request was reported by the first one).
    let request = b"GET /api/v1/balance HTTP/1.1\r\nHost: bank.test\r\n\r\n";
    dp.test_run(ACK_PROGRAM, &server(0x12, 1, &[]), 1).unwrap();
    let mut req = Packet::tcp("10.9.0.2", "10.9.0.1", request);
    req.tcp_options = 12;
    dp.test_run(PROGRAM, &req.build(), 1).unwrap();
    let end = 1 + request.len() as u32;
    let reply = server(0x18, end, &[b'x'; 1200]);
    // An instance capturing port 443 only: replies from 8080 stop before the map lookup.
    let mut ported = Datapath::load(&LoadOptions::default()).expect("load XDP program");
    ported.set_ports(&[443]).unwrap();
    let cases: [(&str, &str); 3] = [
        ("baseline (empty TC classifier)", ACK_BASELINE_PROGRAM),
        ("reply on a watched connection", ACK_PROGRAM),
        ("reply from a port not captured", ACK_PROGRAM),
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        for (i, (_, prog)) in cases.iter().enumerate() {
            let on = if i == 2 { &mut ported } else { &mut *dp };
            let (verdict, per_run) = on.test_run(prog, &reply, REPEAT).unwrap();
            assert_eq!(verdict, 0, "the egress program passes every packet");
            samples[i].push(per_run.as_nanos() as f64);
        }
    }
    // The first reply reaching the request's end reported it; later ones add nothing.
    let mut reported = 0;
    while ring.next().is_some() {
        reported += 1;
    }
    assert_eq!(reported, 2, "the request and its one acknowledgement");
    let medians: Vec<f64> = samples.iter_mut().map(|v| median(v)).collect();
    println!(
        "TC egress cost per packet (BPF_PROG_TEST_RUN, {ROUNDS} rounds x {REPEAT} repeats, median; 1,200-byte replies)"
    );
    println!("{:<34} {:>10} {:>10}", "case", "ns/packet", "x baseline");
    for ((name, _), ns) in cases.iter().zip(&medians) {
        println!("{name:<34} {ns:>10.1} {:>10.2}", ns / medians[0]);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
