//! End-to-end tests of the replay input: files written to a temporary directory, records and
//! summaries out.
use std::{io::Write as _, net::IpAddr, path::PathBuf};

use etherparse::PacketBuilder;
use flate2::{Compression, write::GzEncoder};

use super::*;

const T0: u64 = 971_211_336; // 10/Oct/2000:20:55:36 +0000

fn clf_line(client: &str, secs_after_t0: u64, path: &str) -> String {
    let ts = T0 + secs_after_t0;
    let t = jiff::Timestamp::from_second(ts as i64).unwrap();
    format!(
        "{client} - - [{}] \"GET {path} HTTP/1.1\" 200 12 \"-\" \"test\"\n",
        t.strftime("%d/%b/%Y:%H:%M:%S +0000")
    )
}

fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn replay(paths: &[PathBuf], opts: &ReplayOptions) -> (Vec<ReplayRecord>, ReplaySummary) {
    let mut r = Replay::open(paths, opts).unwrap();
    let records: Vec<_> = r.by_ref().collect();
    (records, r.finish())
}

fn paths_of(records: &[ReplayRecord]) -> Vec<&str> {
    records.iter().map(|r| r.path.as_str()).collect()
}

#[test]
fn combined_file_with_crlf_blank_and_bad_lines_counts_every_skip() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    text += &clf_line("10.0.0.1", 0, "/a").replace('\n', "\r\n");
    text += "\n   \n";
    text += "this is not a log line\n";
    text += &clf_line("10.0.0.2", 1, "/b");
    text += &clf_line("not-an-ip", 2, "/c");
    text += &clf_line("2001:db8::1", 3, "/d");
    let p = write(&dir, "access.log", text.as_bytes());
    let (records, s) = replay(std::slice::from_ref(&p), &ReplayOptions::default());
    assert_eq!(paths_of(&records), ["/a", "/b", "/d"]);
    assert_eq!(records[0].ts_ns, T0 * 1_000_000_000);
    assert_eq!(records[2].client, "2001:db8::1".parse::<IpAddr>().unwrap());
    assert_eq!(
        records.iter().map(|r| r.origin.pos).collect::<Vec<_>>(),
        [1, 5, 7],
        "line numbers count blank lines"
    );
    assert_eq!(s.records, 3);
    assert_eq!(s.records_by_format.get(&Format::Combined), Some(&3));
    assert_eq!(s.skipped.get("bad_line"), Some(&1));
    assert_eq!(s.skipped.get("bad_client"), Some(&1));
    assert_eq!(s.skipped_total, 2);
    assert_eq!(s.files[0].format, Some(Format::Combined));
    assert_eq!(s.files[0].units, 7);
    assert_eq!(s.files[0].bytes_read, text.len() as u64);
    let ex: Vec<_> = s.examples.iter().map(|e| (e.pos, e.reason)).collect();
    assert_eq!(ex, [(4, "bad_line"), (6, "bad_client")]);
    assert_eq!(s.examples[0].file, p);
    assert!(s.errors.is_empty());
    // The summary is what the caller prints with --json.
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["skipped"]["bad_client"], 1);
    assert_eq!(json["records_by_format"]["combined"], 3);
}

#[test]
fn examples_are_capped_per_reason() {
    let dir = tempfile::tempdir().unwrap();
    let text = "junk\n".repeat(50) + &"1.2.3.4 - - [bad] \"GET / HTTP/1.1\" 200 1\n".repeat(50);
    let p = write(&dir, "a.log", text.as_bytes());
    let opts = ReplayOptions {
        format: Some(Format::Common),
        examples_per_reason: 2,
        ..ReplayOptions::default()
    };
    let (records, s) = replay(&[p], &opts);
    assert!(records.is_empty());
    assert_eq!(s.skipped.get("bad_line"), Some(&50));
    assert_eq!(s.skipped.get("bad_timestamp"), Some(&50));
    assert_eq!(s.examples.len(), 4);
}

#[test]
fn multi_member_gzip_is_detected_by_magic_not_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let a: String = (0..100)
        .map(|i| clf_line("10.0.0.1", i, &format!("/a{i}")))
        .collect();
    let b: String = (100..200)
        .map(|i| clf_line("10.0.0.1", i, &format!("/b{i}")))
        .collect();
    let mut bytes = gzip(a.as_bytes());
    bytes.extend(gzip(b.as_bytes()));
    // No .gz in the name on purpose.
    let p = write(&dir, "access.log.1", &bytes);
    let (records, s) = replay(&[p], &ReplayOptions::default());
    assert_eq!(records.len(), 200, "both members are read");
    assert_eq!(records[199].path, "/b199");
    assert!(s.files[0].gzip);
    assert_eq!(
        s.files[0].bytes_read,
        bytes.len() as u64,
        "progress counts compressed bytes"
    );
}

#[test]
fn truncated_gzip_delivers_records_before_the_cut_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // Big enough that the cut lands after the format sample, and a small one where it doesn't.
    for lines in [20_000u64, 50] {
        let text: String = (0..lines)
            .map(|i| clf_line("10.0.0.1", i, &format!("/p{i}")))
            .collect();
        let gz = gzip(text.as_bytes());
        let cut = &gz[..gz.len() * 3 / 4];
        let p = write(&dir, &format!("cut{lines}.log.gz"), cut);
        let (records, s) = replay(std::slice::from_ref(&p), &ReplayOptions::default());
        assert!(
            !records.is_empty() && (records.len() as u64) < lines,
            "{lines}: got {} records",
            records.len()
        );
        // Records are whole and in order up to the cut.
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.path, format!("/p{i}"));
        }
        assert_eq!(s.errors.len(), 1, "{lines}: {:?}", s.errors);
        assert_eq!(s.errors[0].file, p);
        assert!(s.errors[0].bytes_read > 0);
        assert!(s.errors[0].pos >= records.len() as u64);
    }
}

#[test]
fn long_line_over_the_cap_is_skipped_and_the_next_one_parses() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = clf_line("10.0.0.1", 0, "/before");
    text += &clf_line("10.0.0.1", 1, &format!("/{}", "x".repeat(200_000)));
    text += &clf_line("10.0.0.1", 2, "/after");
    let p = write(&dir, "long.log", text.as_bytes());
    let (records, s) = replay(&[p], &ReplayOptions::default());
    assert_eq!(paths_of(&records), ["/before", "/after"]);
    assert_eq!(s.skipped.get("line_too_long"), Some(&1));
    assert_eq!(s.examples[0].pos, 2);
}

#[test]
fn jsonl_file_with_headers_sessions_and_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let text = concat!(
        r#"{"ts":"2024-05-01T12:00:01Z","client":"10.0.0.1","method":"GET","path":"/b","session":"s1"}"#,
        "\n",
        r#"{"ts":1714564800,"client":"10.0.0.1","method":"GET","path":"/a?x=1","headers":{"Authorization":"Bearer t"}}"#,
        "\n",
        "{\"ts\":\n",
        r#"{"ts":1714564802,"client":"10.0.0.1","method":"get","path":"/c"}"#,
        "\n"
    );
    let p = write(&dir, "export.jsonl", text.as_bytes());
    let (records, s) = replay(&[p], &ReplayOptions::default());
    assert_eq!(paths_of(&records), ["/a", "/b"], "sorted by ts");
    assert_eq!(
        records[0].headers,
        [("authorization".to_string(), "Bearer t".to_string())]
    );
    assert_eq!(records[1].session.as_deref(), Some("s1"));
    assert_eq!(s.skipped.get("bad_json"), Some(&1));
    assert_eq!(s.skipped.get("unknown_method"), Some(&1));
    let e = s.examples.iter().find(|e| e.reason == "bad_json").unwrap();
    assert_eq!(e.pos, 3);
}

#[test]
fn out_of_order_lines_are_sorted_within_the_window_and_late_ones_counted() {
    let dir = tempfile::tempdir().unwrap();
    let order = [0u64, 3, 1, 2, 8, 5, 30, 9, 31];
    let text: String = order
        .iter()
        .map(|&t| clf_line("10.0.0.1", t, &format!("/t{t}")))
        .collect();
    let p = write(&dir, "ooo.log", text.as_bytes());
    let opts = ReplayOptions {
        reorder_window: Duration::from_secs(10),
        ..ReplayOptions::default()
    };
    let (records, s) = replay(std::slice::from_ref(&p), &opts);
    // t=30 releases everything up to t=20 (0..8); t=9 is behind none of them, so in order.
    assert_eq!(
        paths_of(&records),
        [
            "/t0", "/t1", "/t2", "/t3", "/t5", "/t8", "/t9", "/t30", "/t31"
        ]
    );
    assert_eq!(s.late, 0);

    // A record behind one already released is late: dropped by default...
    let text: String = [0u64, 8, 30, 5, 31]
        .iter()
        .map(|&t| clf_line("10.0.0.1", t, &format!("/t{t}")))
        .collect();
    let p = write(&dir, "late.log", text.as_bytes());
    let (records, s) = replay(std::slice::from_ref(&p), &opts);
    assert_eq!(paths_of(&records), ["/t0", "/t8", "/t30", "/t31"]);
    assert_eq!((s.late, s.late_policy), (1, LatePolicy::Drop));
    // ...or passed on with its time raised, keeping the stream ordered.
    let clamp = ReplayOptions {
        late: LatePolicy::Clamp,
        ..opts.clone()
    };
    let (records, s) = replay(&[p], &clamp);
    assert_eq!(paths_of(&records), ["/t0", "/t8", "/t5", "/t30", "/t31"]);
    assert_eq!(records[2].ts_ns, (T0 + 8) * 1_000_000_000);
    assert_eq!(s.late, 1);
    // Out of order but behind nothing released yet: not late, just sorted.
    let text: String = [0u64, 30, 5]
        .iter()
        .map(|&t| clf_line("10.0.0.1", t, &format!("/t{t}")))
        .collect();
    let p = write(&dir, "ooo2.log", text.as_bytes());
    let (records, s) = replay(&[p], &opts);
    assert_eq!(paths_of(&records), ["/t0", "/t5", "/t30"]);
    assert_eq!(s.late, 0);
}

#[test]
fn several_files_merge_into_one_timestamp_ordered_stream() {
    let dir = tempfile::tempdir().unwrap();
    let a: String = [0u64, 2, 4, 6]
        .iter()
        .map(|&t| clf_line("10.0.0.1", t, &format!("/a{t}")))
        .collect();
    let b: String = [1u64, 2, 5]
        .iter()
        .map(|&t| clf_line("10.0.0.2", t, &format!("/b{t}")))
        .collect();
    let c = format!(
        "{{\"ts\":{},\"client\":\"10.0.0.3\",\"method\":\"GET\",\"path\":\"/c3\"}}\n",
        T0 + 3
    );
    let pa = write(&dir, "a.log", a.as_bytes());
    let pb = write(&dir, "b.log.gz", &gzip(b.as_bytes()));
    let pc = write(&dir, "c.jsonl", c.as_bytes());
    let (records, s) = replay(&[pa, pb, pc], &ReplayOptions::default());
    assert_eq!(
        paths_of(&records),
        ["/a0", "/b1", "/a2", "/b2", "/c3", "/a4", "/b5", "/a6"]
    );
    assert_eq!(records[3].origin, Origin { file: 1, pos: 2 });
    assert_eq!(
        s.files.iter().map(|f| f.records).collect::<Vec<_>>(),
        [4, 3, 1]
    );
    assert_eq!(s.records_by_format.get(&Format::Combined), Some(&7));
    assert_eq!(s.records_by_format.get(&Format::Jsonl), Some(&1));
}

#[test]
fn auto_detection_per_file_and_errors_that_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let common = write(
        &dir,
        "common.log",
        b"10.0.0.1 - - [10/Oct/2000:13:55:36 -0700] \"GET /x HTTP/1.0\" 200 1\n",
    );
    let empty = write(&dir, "empty.log", b"");
    let (records, s) = replay(&[common.clone(), empty], &ReplayOptions::default());
    assert_eq!(records.len(), 1);
    assert_eq!(s.files[0].format, Some(Format::Common));
    assert_eq!(s.files[1].format, None, "an empty file is no error");

    let unknown = write(&dir, "notes.txt", b"hello\nworld\n");
    let err = Replay::open(std::slice::from_ref(&unknown), &ReplayOptions::default())
        .err()
        .unwrap();
    assert!(matches!(&err, ReplayError::UnknownFormat { path, .. } if *path == unknown));
    assert!(
        err.to_string().contains("notes.txt") && err.to_string().contains("--format"),
        "{err}"
    );

    let missing = dir.path().join("nope.log");
    let err = Replay::open(&[missing], &ReplayOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("nope.log"), "{err}");

    let cap = write(&dir, "cap.pcap", &pcap_file(1, &[]));
    let forced = ReplayOptions {
        format: Some(Format::Combined),
        ..ReplayOptions::default()
    };
    let err = Replay::open(&[cap], &forced).err().unwrap();
    assert!(
        matches!(
            err,
            ReplayError::FormatMismatch {
                found: Format::Pcap,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        Replay::open::<PathBuf>(&[], &forced),
        Err(ReplayError::NoInput)
    ));
}

// ---- captures ----

const SRC4: [u8; 4] = [192, 0, 2, 10];
const SRC6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x42,
];

fn eth_v4_tcp(payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([1; 6], [2; 6])
        .ipv4(SRC4, [192, 0, 2, 1], 64)
        .tcp(40000, 80, 1, 1024);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

fn eth_vlan_v4_tcp(payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([1; 6], [2; 6])
        .single_vlan(etherparse::VlanId::try_new(42).unwrap())
        .ipv4([198, 51, 100, 7], [192, 0, 2, 1], 64)
        .tcp(40001, 80, 1, 1024);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

fn eth_v6_tcp(payload: &[u8]) -> Vec<u8> {
    let mut dst = SRC6;
    dst[15] = 1;
    let b = PacketBuilder::ethernet2([1; 6], [2; 6])
        .ipv6(SRC6, dst, 64)
        .tcp(40002, 8080, 1, 1024);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

fn eth_v4_udp(payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([1; 6], [2; 6])
        .ipv4(SRC4, [192, 0, 2, 1], 64)
        .udp(5353, 53);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

/// (seconds, microseconds, captured bytes, original length)
type Pkt = (u32, u32, Vec<u8>, u32);

/// A little-endian microsecond pcap, written by hand (the format is 24 + 16 bytes of header).
fn pcap_file(linktype: u32, packets: &[Pkt]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    v.extend_from_slice(&2u16.to_le_bytes());
    v.extend_from_slice(&4u16.to_le_bytes());
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(&65535u32.to_le_bytes());
    v.extend_from_slice(&linktype.to_le_bytes());
    for (s, us, data, orig) in packets {
        for x in [*s, *us, data.len() as u32, *orig] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(data);
    }
    v
}

fn ng_block(kind: u32, body: &[u8]) -> Vec<u8> {
    let mut body = body.to_vec();
    while !body.len().is_multiple_of(4) {
        body.push(0);
    }
    let len = (body.len() + 12) as u32;
    let mut v = Vec::new();
    v.extend_from_slice(&kind.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&body);
    v.extend_from_slice(&len.to_le_bytes());
    v
}

/// A pcapng with one Ethernet interface at nanosecond resolution (`if_tsresol` = 9).
fn pcapng_file(packets: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut shb = Vec::new();
    shb.extend_from_slice(&0x1a2b_3c4du32.to_le_bytes());
    shb.extend_from_slice(&1u16.to_le_bytes());
    shb.extend_from_slice(&0u16.to_le_bytes());
    shb.extend_from_slice(&(-1i64).to_le_bytes());
    let mut idb = Vec::new();
    idb.extend_from_slice(&1u16.to_le_bytes()); // Ethernet
    idb.extend_from_slice(&0u16.to_le_bytes());
    idb.extend_from_slice(&65535u32.to_le_bytes());
    idb.extend_from_slice(&[9, 0, 1, 0, 9, 0, 0, 0]); // if_tsresol = 10^-9, padded
    idb.extend_from_slice(&[0, 0, 0, 0]); // opt_endofopt
    let mut v = ng_block(0x0a0d_0d0a, &shb);
    v.extend(ng_block(1, &idb));
    for (ts_ns, data) in packets {
        let mut epb = Vec::new();
        epb.extend_from_slice(&0u32.to_le_bytes());
        epb.extend_from_slice(&((ts_ns >> 32) as u32).to_le_bytes());
        epb.extend_from_slice(&(*ts_ns as u32).to_le_bytes());
        epb.extend_from_slice(&(data.len() as u32).to_le_bytes());
        epb.extend_from_slice(&(data.len() as u32).to_le_bytes());
        epb.extend_from_slice(data);
        v.extend(ng_block(6, &epb));
    }
    v
}

const REQ: &[u8] = b"GET /api/v1/accounts/7/balance?x=1 HTTP/1.1\r\nHost: bank.example\r\nAuthorization: Bearer abc\r\nCookie: sid=9\r\nAccept: */*\r\n\r\n";

#[test]
fn pcap_with_vlan_ipv6_non_http_and_truncated_packets() {
    let dir = tempfile::tempdir().unwrap();
    let full = |d: Vec<u8>| {
        let n = d.len() as u32;
        (d, n)
    };
    let mut pkts: Vec<Pkt> = Vec::new();
    let mut push = |s: u32, (d, n): (Vec<u8>, u32)| pkts.push((1_700_000_000 + s, 250, d, n));
    push(0, full(eth_v4_tcp(REQ)));
    push(
        1,
        full(eth_vlan_v4_tcp(
            b"POST /api/v1/transferFunds HTTP/1.1\r\nHost: bank.example\r\n\r\n",
        )),
    );
    push(2, full(eth_v6_tcp(b"DELETE /api/v1/x HTTP/1.0\r\n\r\n")));
    push(3, full(eth_v4_tcp(b""))); // a bare ACK
    push(4, full(eth_v4_tcp(b"HTTP/1.1 200 OK\r\n\r\n"))); // a response
    push(5, full(eth_v4_udp(b"GET / HTTP/1.1\r\n\r\n"))); // not TCP
    push(6, full(eth_v4_tcp(b"BREW /pot HTTP/1.1\r\n\r\n"))); // starts unlike a method: ignored like XDP
    push(7, full(eth_v4_tcp(b"GET /a\x00b HTTP/1.1\r\n\r\n"))); // parser skip
    // Cut by snaplen inside the TCP header: nothing to parse.
    let p = eth_v4_tcp(REQ);
    let orig = p.len() as u32;
    push(8, (p[..14 + 20 + 8].to_vec(), orig));
    // Cut by snaplen inside the HTTP headers: parsed like a live prefix.
    push(9, (p[..14 + 20 + 20 + 50].to_vec(), orig));
    let path = write(&dir, "cap.pcap", &pcap_file(1, &pkts));
    let (records, s) = replay(&[path], &ReplayOptions::default());

    assert_eq!(
        paths_of(&records),
        [
            "/api/v1/accounts/7/balance",
            "/api/v1/transferFunds",
            "/api/v1/x",
            "/api/v1/accounts/7/balance"
        ]
    );
    let r = &records[0];
    assert_eq!(r.ts_ns, 1_700_000_000 * 1_000_000_000 + 250_000);
    assert_eq!(r.client, IpAddr::from(SRC4));
    assert_eq!(
        (r.method, r.query.as_deref(), r.host.as_deref()),
        (Method::Get, Some("x=1"), Some("bank.example"))
    );
    let mut h = r.headers.clone();
    h.sort();
    assert_eq!(
        h,
        [
            ("authorization".into(), "Bearer abc".into()),
            ("cookie".into(), "sid=9".into())
        ]
    );
    assert_eq!(r.origin, Origin { file: 0, pos: 1 });
    assert_eq!(
        records[1].client,
        "198.51.100.7".parse::<IpAddr>().unwrap(),
        "VLAN-tagged"
    );
    assert_eq!(records[2].client, IpAddr::from(SRC6));
    assert_eq!(records[2].method, Method::Delete);
    assert_eq!(records[3].origin.pos, 10);
    assert!(
        records[3].headers.is_empty(),
        "headers after the cut are not invented"
    );

    assert_eq!(s.records_by_format.get(&Format::Pcap), Some(&4));
    assert_eq!(s.packets_ignored.get("no_payload"), Some(&1));
    assert_eq!(s.packets_ignored.get("not_http_request"), Some(&2));
    assert_eq!(s.packets_ignored.get("not_tcp"), Some(&1));
    // A NUL in the request line: the live parser's reason, unchanged.
    assert_eq!(
        s.skipped.get("header_injection"),
        Some(&1),
        "{:?}",
        s.skipped
    );
    assert_eq!(s.skipped.get("truncated_packet"), Some(&1));
    assert_eq!(s.snaplen_cut, 1);
    assert_eq!(s.files[0].units, 10);
    assert!(s.errors.is_empty());
}

/// A segment of the connection 192.0.2.10:`port` → 192.0.2.1:80 at sequence number `seq`.
fn segment(port: u16, seq: u32, payload: &[u8]) -> Pkt {
    let b = PacketBuilder::ethernet2([1; 6], [2; 6])
        .ipv4(SRC4, [192, 0, 2, 1], 64)
        .tcp(port, 80, seq, 1024);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    let n = v.len() as u32;
    (1_700_000_000, seq, v, n)
}

/// A capture of both directions, at millisecond `ms`: a segment from the client
/// 192.0.2.10:`port` to the server 192.0.2.1:80, or (`from_server`) the other way, with
/// `flags` ("S" for SYN, "A" for ACK, "R" for RST) and `ack`.
fn two_way(
    ms: u32,
    port: u16,
    from_server: bool,
    seq: u32,
    flags: &str,
    ack: u32,
    payload: &[u8],
) -> Pkt {
    let (src, dst, sport, dport) = if from_server {
        ([192, 0, 2, 1], SRC4, 80, port)
    } else {
        (SRC4, [192, 0, 2, 1], port, 80)
    };
    let mut b = PacketBuilder::ethernet2([1; 6], [2; 6])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, seq, 1024);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('A') {
        b = b.ack(ack);
    }
    if flags.contains('R') {
        b = b.rst();
    }
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    let n = v.len() as u32;
    (1_700_000_000 + ms / 1000, (ms % 1000) * 1000, v, n)
}

#[test]
fn in_a_capture_of_both_directions_only_what_the_server_acknowledged_counts() {
    let dir = tempfile::tempdir().unwrap();
    let lookup = b"GET /api/v1/accounts/7/balance HTTP/1.1\r\nAuthorization: Bearer abc\r\n\r\n";
    let transfer = b"POST /api/v1/transferFunds HTTP/1.1\r\nAuthorization: Bearer abc\r\n\r\n";
    let end1 = 100 + lookup.len() as u32;
    let end2 = end1 + transfer.len() as u32;
    let pkts = [
        // The server accepts the connection: requests to it wait for its acknowledgement.
        two_way(0, 40000, true, 0, "SA", 100, b""),
        two_way(1, 40000, false, 100, "A", 1, lookup),
        two_way(30, 40000, true, 1, "A", end1, b""),
        // A transfer on a connection that does not exist (a forged source): the server
        // answers with a reset, which acknowledges nothing.
        two_way(1000, 40001, false, 5000, "A", 1, transfer),
        two_way(
            1001,
            40001,
            true,
            0,
            "RA",
            5000 + transfer.len() as u32,
            b"",
        ),
        // The real transfer, and the server's acknowledgement 40 ms later (delayed ACK).
        two_way(2000, 40000, false, end1, "A", 1, transfer),
        two_way(2040, 40000, true, 1, "A", end2, b""),
        // A request the server never acknowledges before the capture ends.
        two_way(4500, 40002, false, 9, "A", 1, lookup),
    ];
    let path = write(&dir, "both.pcap", &pcap_file(1, &pkts));
    let (records, s) = replay(std::slice::from_ref(&path), &ReplayOptions::default());
    assert_eq!(
        paths_of(&records),
        ["/api/v1/accounts/7/balance", "/api/v1/transferFunds"]
    );
    assert!(records.iter().all(|r| r.client == IpAddr::from(SRC4)));
    // Stamped with its own packet's time, not the acknowledgement's.
    assert_eq!(
        records[1].ts_ns,
        1_700_000_002 * 1_000_000_000,
        "the transfer keeps its capture time"
    );
    assert_eq!(
        s.acks,
        ReplayAcks {
            files_waited: 1,
            acknowledged: 2,
            unacknowledged: 2,
            ..ReplayAcks::default()
        }
    );
    // With the wait off (`wait_for_acks = false`), every request counts.
    let opts = ReplayOptions {
        wait_for_acks: false,
        ..ReplayOptions::default()
    };
    let (records, s) = replay(std::slice::from_ref(&path), &opts);
    assert_eq!(records.len(), 4);
    assert_eq!(s.acks, ReplayAcks::default());
    // Without the handshake in the capture, the first request passes: nothing has shown the
    // server's side yet. The server's acknowledgement of it starts the wait for the rest.
    let later = write(&dir, "later.pcap", &pcap_file(1, &pkts[1..]));
    let (records, s) = replay(&[later], &ReplayOptions::default());
    assert_eq!(records.len(), 2);
    assert_eq!((s.acks.acknowledged, s.acks.unacknowledged), (1, 2));
}

#[test]
fn requests_behind_empty_lines_and_behind_acknowledged_bytes_are_read_as_the_daemon_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let lookup = b"GET /api/v1/accounts/7/balance HTTP/1.1\r\nAuthorization: Bearer abc\r\n\r\n";
    let transfer = b"POST /api/v1/transferFunds HTTP/1.1\r\nAuthorization: Bearer abc\r\n\r\n";
    let cat = |a: &[u8], b: &[u8]| [a, b].concat();
    let end1 = 100 + lookup.len() as u32;
    let end2 = end1 + transfer.len() as u32;
    let end3 = end2 + 2 + lookup.len() as u32;
    let end4 = end3 + 4 + transfer.len() as u32;
    let pkts = [
        two_way(0, 40000, true, 0, "SA", 100, b""),
        two_way(1, 40000, false, 100, "A", 1, lookup),
        two_way(30, 40000, true, 1, "A", end1, b""),
        // The transfer one byte early, behind a byte the server has: it reads the transfer.
        two_way(1000, 40000, false, end1 - 1, "A", 1, &cat(b"X", transfer)),
        two_way(1030, 40000, true, 1, "A", end2, b""),
        // The same with an empty line at the acknowledged point, which servers skip.
        two_way(2000, 40000, false, end2 - 1, "A", 1, &cat(b"Y\r\n", lookup)),
        two_way(2030, 40000, true, 1, "A", end3, b""),
        // And empty lines at a segment's start, no overlap.
        two_way(
            3000,
            40000,
            false,
            end3,
            "A",
            1,
            &cat(b"\r\n\r\n", transfer),
        ),
        two_way(3030, 40000, true, 1, "A", end4, b""),
        // Bytes at the acknowledged point that start no request: nothing.
        two_way(4000, 40000, false, end4 - 1, "A", 1, b"Z{\"amount\": 100}"),
        two_way(4030, 40000, true, 1, "A", end4 + 16, b""),
    ];
    let path = write(&dir, "overlap.pcap", &pcap_file(1, &pkts));
    let (records, s) = replay(std::slice::from_ref(&path), &ReplayOptions::default());
    assert_eq!(
        paths_of(&records),
        [
            "/api/v1/accounts/7/balance",
            "/api/v1/transferFunds",
            "/api/v1/accounts/7/balance",
            "/api/v1/transferFunds"
        ]
    );
    assert_eq!((s.acks.acknowledged, s.acks.stale), (4, 0));
    // Without the wait for acknowledgements nothing tells which bytes the server has (live,
    // the egress program is not attached then): the segments starting with `X` and `Y` are
    // no requests.
    let opts = ReplayOptions {
        wait_for_acks: false,
        ..ReplayOptions::default()
    };
    let (records, _) = replay(std::slice::from_ref(&path), &opts);
    assert_eq!(
        paths_of(&records),
        ["/api/v1/accounts/7/balance", "/api/v1/transferFunds"]
    );
}

#[test]
fn a_request_split_over_segments_is_followed_and_joined_as_the_daemon_does() {
    let dir = tempfile::tempdir().unwrap();
    let parts: [&[u8]; 3] = [
        b"PO",
        b"ST /api/v1/transferFunds HTTP/1.1\r\nHost: bank.example\r\n",
        b"Authorization: Bearer abc\r\n\r\n",
    ];
    let (a, b) = (100, 100 + parts[0].len() as u32);
    let c = b + parts[1].len() as u32;
    let pkts = [
        segment(40000, a, parts[0]),
        // Another connection starts a request it never finishes.
        segment(40001, 7, b"GET /accounts"),
        segment(40000, b, parts[1]),
        segment(40000, b, parts[1]), // retransmitted
        segment(40000, c, parts[2]),
        segment(40000, c + parts[2].len() as u32, b"{\"amount\": 1}"), // the body
    ];
    let path = write(&dir, "split.pcap", &pcap_file(1, &pkts));
    let (records, s) = replay(&[path], &ReplayOptions::default());
    assert_eq!(paths_of(&records), ["/api/v1/transferFunds"]);
    assert_eq!(records[0].method, Method::Post);
    assert_eq!(records[0].host.as_deref(), Some("bank.example"));
    assert_eq!(
        records[0].headers,
        [("authorization".to_string(), "Bearer abc".to_string())]
    );
    // Stamped when its header was complete (the third piece's packet).
    assert_eq!(
        records[0].ts_ns,
        1_700_000_000 * 1_000_000_000 + u64::from(c) * 1000
    );
    // The unfinished one is read as it is at the end of the file: a request line cut short.
    assert_eq!(
        s.skipped.get("incomplete_request_line"),
        Some(&1),
        "{:?}",
        s.skipped
    );
    // The retransmitted piece is captured again as a copy (and dropped: with no
    // acknowledgements in the capture, the first copy stands).
    assert_eq!(s.packets_ignored.get("request_piece"), Some(&4));
    assert_eq!(
        s.packets_ignored.get("not_http_request"),
        Some(&1),
        "the body"
    );
}

#[test]
fn a_request_written_into_a_body_is_body_in_replay_as_live() {
    let dir = tempfile::tempdir().unwrap();
    let fake = b"GET /api/v1/accounts/17/balance HTTP/1.1\r\nAuthorization: Bearer abc\r\n\r\n";
    let head = format!(
        "POST /api/v1/notes HTTP/1.1\r\nAuthorization: Bearer abc\r\nContent-Length: {}\r\n\r\n",
        fake.len()
    );
    let body_at = 500 + head.len() as u32;
    let pkts = [
        segment(40000, 500, head.as_bytes()),
        segment(40000, body_at, fake),
        segment(
            40000,
            body_at + fake.len() as u32,
            b"POST /api/v1/transferFunds HTTP/1.1\r\nAuthorization: Bearer abc\r\n\r\n",
        ),
    ];
    let path = write(&dir, "body.pcap", &pcap_file(1, &pkts));
    let (records, _) = replay(&[path], &ReplayOptions::default());
    assert_eq!(
        paths_of(&records),
        ["/api/v1/notes", "/api/v1/transferFunds"]
    );
}

#[test]
fn a_resent_segment_is_one_request_in_replay_as_live() {
    // A capture taken on a lossy path holds the client's resent segment twice: the server
    // read the transfer once, and so does the replay.
    let dir = tempfile::tempdir().unwrap();
    let transfer = b"POST /api/v1/transferFunds HTTP/1.1\r\nAuthorization: Bearer abc\r\n\r\n";
    let lookup = b"GET /api/v1/accounts/17/balance HTTP/1.1\r\nAuthorization: Bearer abc\r\n\r\n";
    let pkts = [
        segment(40000, 500, transfer),
        segment(40000, 500, transfer),
        segment(40000, 500 + transfer.len() as u32, lookup),
    ];
    let path = write(&dir, "resent.pcap", &pcap_file(1, &pkts));
    let (records, _) = replay(&[path], &ReplayOptions::default());
    assert_eq!(
        paths_of(&records),
        ["/api/v1/transferFunds", "/api/v1/accounts/17/balance"]
    );
}

#[test]
fn capture_length_limits_what_the_parser_sees_like_live() {
    let dir = tempfile::tempdir().unwrap();
    let p = eth_v4_tcp(REQ);
    let path = write(
        &dir,
        "c.pcap",
        &pcap_file(1, &[(1, 0, p.clone(), p.len() as u32)]),
    );
    let opts = ReplayOptions {
        capture_len: 70, // request line and Host only
        ..ReplayOptions::default()
    };
    let (records, _) = replay(&[path], &opts);
    assert_eq!(records[0].host.as_deref(), Some("bank.example"));
    assert!(records[0].headers.is_empty());
}

#[test]
fn pcapng_gives_nanosecond_timestamps_and_ipv6_clients() {
    let dir = tempfile::tempdir().unwrap();
    let t = 1_700_000_000_123_456_789u64;
    let file = pcapng_file(&[
        (t + 5, eth_v6_tcp(b"GET /second HTTP/1.1\r\n\r\n")),
        (t, eth_v4_tcp(b"GET /first HTTP/1.1\r\n\r\n")),
        (t + 9, eth_v4_udp(b"junk")),
    ]);
    let path = write(&dir, "cap.pcapng.gz", &gzip(&file));
    let (records, s) = replay(&[path], &ReplayOptions::default());
    assert_eq!(
        paths_of(&records),
        ["/first", "/second"],
        "reordered by time"
    );
    assert_eq!(records[0].ts_ns, t);
    assert_eq!(records[1].ts_ns, t + 5);
    assert_eq!(records[1].client, IpAddr::from(SRC6));
    assert_eq!(records[0].origin.pos, 2);
    assert_eq!(s.files[0].format, Some(Format::Pcap));
    assert!(s.files[0].gzip);
    assert_eq!(s.packets_ignored.get("not_tcp"), Some(&1));
}

#[test]
fn requests_pipelined_in_one_packet_are_each_read_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let two = eth_v4_tcp(b"GET /first HTTP/1.1\r\n\r\nGET /second HTTP/1.1\r\n\r\nGE");
    let one = eth_v4_tcp(b"GET /third HTTP/1.1\r\n\r\n");
    let path = write(
        &dir,
        "pipelined.pcap",
        &pcap_file(
            1,
            &[
                (1, 0, two.clone(), two.len() as u32),
                (2, 0, one.clone(), one.len() as u32),
            ],
        ),
    );
    let (records, s) = replay(&[path], &ReplayOptions::default());
    assert_eq!(paths_of(&records), ["/first", "/second", "/third"]);
    // The request cut by the end of the packet is counted, as the live path counts it.
    assert_eq!(
        s.skipped.get("incomplete_request_line"),
        Some(&1),
        "{:?}",
        s.skipped
    );
}

#[test]
fn capture_cut_mid_packet_keeps_earlier_packets_and_counts_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let pkts: Vec<Pkt> = (0..3)
        .map(|i| {
            let d = eth_v4_tcp(format!("GET /p{i} HTTP/1.1\r\n\r\n").as_bytes());
            let n = d.len() as u32;
            (i, 0, d, n)
        })
        .collect();
    let mut file = pcap_file(1, &pkts);
    file.truncate(file.len() - 10);
    let path = write(&dir, "cut.pcap", &file);
    let (records, s) = replay(&[path], &ReplayOptions::default());
    assert_eq!(paths_of(&records), ["/p0", "/p1"]);
    assert_eq!(s.skipped.get("truncated_packet"), Some(&1));
    assert!(
        s.errors.is_empty(),
        "a cut capture is counted, not an error: {:?}",
        s.errors
    );

    // The same for pcapng, and a file that ends inside its header.
    let mut ng = pcapng_file(&[
        (1, eth_v4_tcp(b"GET /ng HTTP/1.1\r\n\r\n")),
        (2, eth_v4_tcp(b"GET /ng2 HTTP/1.1\r\n\r\n")),
    ]);
    ng.truncate(ng.len() - 7);
    let path = write(&dir, "cut.pcapng", &ng);
    let (records, s) = replay(&[path], &ReplayOptions::default());
    assert_eq!(paths_of(&records), ["/ng"]);
    assert_eq!(s.skipped.get("truncated_packet"), Some(&1));
    let path = write(&dir, "stub.pcap", &pcap_file(1, &[])[..10]);
    let (records, s) = replay(&[path], &ReplayOptions::default());
    assert!(records.is_empty());
    assert_eq!(s.skipped.get("truncated_packet"), Some(&1));
}

#[test]
fn linux_cooked_and_raw_ip_captures_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let eth = eth_v4_tcp(b"GET /sll HTTP/1.1\r\n\r\n");
    let ip = eth[14..].to_vec();
    let mut sll = vec![0, 0, 0, 1, 0, 6, 1, 1, 1, 1, 1, 1, 0, 0, 0x08, 0x00];
    sll.extend_from_slice(&ip);
    let p1 = write(
        &dir,
        "sll.pcap",
        &pcap_file(113, &[(1, 0, sll.clone(), sll.len() as u32)]),
    );
    let p2 = write(
        &dir,
        "raw.pcap",
        &pcap_file(101, &[(2, 0, ip.clone(), ip.len() as u32)]),
    );
    let p3 = write(
        &dir,
        "odd.pcap",
        &pcap_file(147, &[(3, 0, ip.clone(), ip.len() as u32)]),
    );
    let (records, s) = replay(&[p1, p2, p3], &ReplayOptions::default());
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r.client == IpAddr::from(SRC4)));
    assert_eq!(s.packets_ignored.get("unsupported_linktype"), Some(&1));
}

#[test]
fn packets_larger_than_the_initial_buffer_are_read() {
    let dir = tempfile::tempdir().unwrap();
    // A frame bigger than the reader's initial 64 KiB buffer (jumbo/GRO captures): here the
    // IP length covers the request and the rest of the frame is trailer.
    let mut big = eth_v4_tcp(b"POST /upload HTTP/1.1\r\nHost: h\r\n\r\n");
    big.resize(150_000, 0);
    let small = eth_v4_tcp(b"GET /next HTTP/1.1\r\n\r\n");
    let file = pcap_file(
        1,
        &[
            (1, 0, big.clone(), big.len() as u32),
            (2, 0, small.clone(), small.len() as u32),
        ],
    );
    let path = write(&dir, "big.pcap", &file);
    let (records, s) = replay(&[path], &ReplayOptions::default());
    assert_eq!(paths_of(&records), ["/upload", "/next"], "{:?}", s.errors);
}

// ---- never panic ----

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn mutate(&mut self, mut v: Vec<u8>) -> Vec<u8> {
        for _ in 0..(self.next() % 6) {
            let r = self.next();
            let at = (r >> 8) as usize % (v.len() + 1);
            match r % 3 {
                0 if at < v.len() => v[at] = (r >> 32) as u8,
                1 => v.truncate(at),
                _ => v.insert(at, (r >> 32) as u8),
            }
        }
        v
    }
}

#[test]
fn random_and_mutated_captures_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut failures = 0;
    let base_pcap = pcap_file(
        1,
        &[
            (1, 0, eth_v4_tcp(REQ), 0),
            (2, 0, eth_vlan_v4_tcp(REQ), 0),
            (3, 0, eth_v6_tcp(REQ), 0),
        ],
    );
    let base_ng = pcapng_file(&[(1, eth_v4_tcp(REQ)), (2, eth_v6_tcp(REQ))]);
    for i in 0..10_000u32 {
        let bytes = match i % 3 {
            0 => rng.mutate(base_pcap.clone()),
            1 => rng.mutate(base_ng.clone()),
            _ => {
                let mut v = base_pcap[..24].to_vec();
                v.extend((0..rng.next() % 300).map(|_| rng.next() as u8));
                v
            }
        };
        let input: input::Input = std::io::BufReader::new(Box::new(std::io::Cursor::new(bytes)));
        let mut src = pcap::PcapSource::new(
            input,
            0,
            HttpConfig::default(),
            vec!["cookie".into()],
            512,
            true,
        );
        for _ in 0..10_000 {
            match src.next_event() {
                pcap::Event::End => break,
                pcap::Event::Failed(message) => {
                    // A report line, not a dump of the bytes the parser choked on.
                    assert!(message.len() < 120, "{message}");
                    failures += 1;
                    break;
                }
                _ => {}
            }
        }
    }
    assert!(failures > 0, "the mutations reach the parser's errors");
}

#[test]
fn random_files_never_panic_a_replay() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let seeds: [Vec<u8>; 4] = [
        clf_line("10.0.0.1", 0, "/a").repeat(3).into_bytes(),
        b"{\"ts\":1,\"client\":\"::1\",\"method\":\"GET\",\"path\":\"/\"}\n".repeat(3),
        gzip(clf_line("10.0.0.1", 0, "/a").as_bytes()),
        pcapng_file(&[(1, eth_v4_tcp(REQ))]),
    ];
    let path = dir.path().join("fuzz");
    for i in 0..400 {
        let bytes = rng.mutate(seeds[i % seeds.len()].clone());
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(mut r) = Replay::open(&[&path], &ReplayOptions::default()) {
            r.by_ref().for_each(drop);
            let _ = r.finish();
        }
    }
}

/// Throughput, not correctness: `AYA_BUILD_SKIP=1 cargo test --release -p precedent --lib
/// replay::tests::throughput -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark; run in release"]
fn throughput_of_combined_logs() {
    let dir = tempfile::tempdir().unwrap();
    let lines = 2_000_000u64;
    let mut text = String::with_capacity(lines as usize * 160);
    for i in 0..lines {
        // Slightly out of order, like real logs.
        let t = i / 20 + (i % 7);
        text += &clf_line(
            &format!("10.{}.{}.{}", i % 7, i % 251, i % 13),
            t,
            &format!("/api/v1/accounts/{}/balance?page={}", i % 977, i % 5),
        );
    }
    let plain = write(&dir, "bench.log", text.as_bytes());
    let gz = write(&dir, "bench.log.gz", &gzip(text.as_bytes()));
    for p in [plain, gz] {
        let start = std::time::Instant::now();
        let (n, s) = {
            let mut r = Replay::open(std::slice::from_ref(&p), &ReplayOptions::default()).unwrap();
            let n = r.by_ref().count();
            (n, r.finish())
        };
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(n as u64, lines, "{:?}", s.skipped);
        eprintln!(
            "{}: {n} lines in {secs:.2} s = {:.0} lines/s, {:.0} MB/s of log text",
            p.display(),
            n as f64 / secs,
            text.len() as f64 / secs / 1e6
        );
    }
}

#[test]
fn two_versions_of_one_place_are_a_conflict_record_after_the_analysed_request() {
    // The race past the server's delayed ACK, in a capture of both directions: the transfer,
    // then a lookup of the same length at the same place, then the acknowledgement.
    let dir = tempfile::tempdir().unwrap();
    let transfer = b"POST /api/v1/transferFunds HTTP/1.1\r\nAuthorization: Bearer abc\r\n\r\n";
    let lookup = b"GET /api/v1/balance HTTP/1.1\r\nAuthorization: Bearer abc\r\nX: 12\r\n\r\n";
    assert_eq!(transfer.len(), lookup.len());
    let end = 100 + transfer.len() as u32;
    let pkts = [
        two_way(0, 40000, true, 0, "SA", 100, b""),
        two_way(1, 40000, false, 100, "A", 1, transfer),
        two_way(2, 40000, false, 100, "A", 1, lookup),
        two_way(40, 40000, true, 1, "A", end, b""),
    ];
    let path = write(&dir, "race.pcap", &pcap_file(1, &pkts));
    let (records, s) = replay(std::slice::from_ref(&path), &ReplayOptions::default());
    assert_eq!(paths_of(&records), ["/api/v1/balance", ""]);
    let c = records[1].conflict.as_deref().expect("a conflict record");
    assert_eq!(
        (c.replaced.as_slice(), c.analysed.as_slice()),
        (&transfer[..], &lookup[..])
    );
    assert_eq!(
        (s.records, s.acks.superseded, s.acks.conflicting),
        (1, 1, 1)
    );
    // Driven through the engine as the daemon drives it: the alert names both copies.
    let engine = crate::engine::Engine::new(
        &crate::engine::EngineConfig::default(),
        crate::rules::RuleFile::default(),
        [1; 16],
        crate::decide::Mode::Enforce,
    )
    .unwrap();
    let mut driver = run::Driver::new(engine, 0);
    let mut out = Vec::new();
    for r in &records {
        driver.feed(r, &mut out).unwrap();
    }
    let alert: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(alert["signal"], "conflicting_copies");
    assert_eq!(alert["numbers"]["replaced"], "POST /api/v1/transferFunds");
    assert_eq!(alert["action"], "block");
    assert_eq!(driver.finish().requests, 1);
}

#[test]
fn a_forged_piece_of_a_split_header_gives_way_to_the_real_one_with_a_conflict() {
    // `POST /api/v1/` + `transferFunds ...`, the second piece first forged (a bad checksum:
    // the server's stack drops it, which a capture does not show) and then sent for real.
    let dir = tempfile::tempdir().unwrap();
    let start = b"POST /api/v1/";
    let forged = b"accounts HTTP/1.1\r\nAuthorization: Bearer abc\r\n\r\n";
    let real = b"transfer HTTP/1.1\r\nAuthorization: Bearer abc\r\n\r\n";
    assert_eq!(forged.len(), real.len());
    let b = 100 + start.len() as u32;
    let end = b + real.len() as u32;
    let pkts = [
        two_way(0, 40000, true, 0, "SA", 100, b""),
        two_way(1, 40000, false, 100, "A", 1, start),
        two_way(2, 40000, false, b, "A", 1, forged),
        two_way(3, 40000, false, b, "A", 1, real),
        two_way(40, 40000, true, 1, "A", end, b""),
    ];
    let path = write(&dir, "split-insertion.pcap", &pcap_file(1, &pkts));
    let (records, s) = replay(std::slice::from_ref(&path), &ReplayOptions::default());
    assert_eq!(paths_of(&records), ["/api/v1/transfer", ""]);
    let c = records[1].conflict.as_deref().expect("a conflict record");
    assert_eq!((c.piece, c.seq), (1, b));
    assert_eq!(
        (c.replaced.as_slice(), c.analysed.as_slice()),
        (&forged[..], &real[..])
    );
    assert_eq!((s.acks.superseded, s.acks.conflicting), (1, 1));
}
