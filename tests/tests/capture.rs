//! End-to-end capture: real TCP from a network namespace through a veth pair into the XDP
//! program, out of the ring buffer and the daemon as JSON lines.
//!
//! Needs root; run with `cargo xtask test` (which runs ignored tests single-threaded as root).
use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use precedent_tests::{Daemon, HttpServer, TestNet, precedent_bin};

const PORT: u16 = 8080;

/// One request/response on `stream`; returns the response status line.
fn roundtrip(stream: &mut TcpStream, method: &str, path: &str, close: bool) -> String {
    let body = if method == "POST" || method == "PUT" || method == "PATCH" {
        "x=1"
    } else {
        ""
    };
    let conn = if close { "close" } else { "keep-alive" };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: api.test\r\nConnection: {conn}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).unwrap();
    // Our server always answers with a 2-byte body: read the head, then exactly 2 bytes.
    let mut resp = Vec::new();
    let mut byte = [0u8; 1];
    while !resp.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        resp.push(byte[0]);
    }
    let mut rest = [0u8; 2];
    stream.read_exact(&mut rest).unwrap();
    String::from_utf8_lossy(&resp)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn captures_every_request_on_fresh_and_keepalive_connections() {
    let net = TestNet::new("cap1", 1).unwrap();
    let server = HttpServer::start(SocketAddr::new(net.host_ip.into(), PORT)).unwrap();
    let mut daemon = Daemon::start(
        &precedent_bin(),
        &["daemon", "--iface", &net.host_if, "--log-requests"],
    )
    .unwrap();

    let target = SocketAddr::new(net.host_ip.into(), PORT);
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];
    // (method, path) -> client port used, for all 100 requests.
    let sent: Vec<(String, String, u16)> = net
        .run_in_ns(move || {
            let mut sent = Vec::new();
            // 50 requests, each on a fresh connection.
            for i in 0..50 {
                let method = methods[i % methods.len()];
                let path = format!("/fresh/{i}");
                let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
                let status = roundtrip(&mut s, method, &path, true);
                assert!(status.contains("200"), "{status}");
                sent.push((method.to_string(), path, s.local_addr().unwrap().port()));
            }
            // 50 requests on one keep-alive connection.
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
            let port = s.local_addr().unwrap().port();
            for i in 0..50 {
                let method = methods[(i + 3) % methods.len()];
                let path = format!("/keepalive/{i}?n={i}");
                let status = roundtrip(&mut s, method, &path, false);
                assert!(status.contains("200"), "{status}");
                sent.push((method.to_string(), path, port));
            }
            sent
        })
        .unwrap();
    assert_eq!(server.served(), 100);

    let lines = daemon.collect_lines(100, Duration::from_secs(5));
    let mut seen: HashMap<String, serde_json::Value> = HashMap::new();
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}"));
        let full = match v["query"].as_str() {
            Some(q) => format!("{}?{q}", v["path"].as_str().unwrap()),
            None => v["path"].as_str().unwrap().to_string(),
        };
        assert!(
            seen.insert(full.clone(), v).is_none(),
            "request {full} reported twice"
        );
    }
    assert_eq!(
        lines.len(),
        100,
        "expected 100 request lines; log:\n{}",
        daemon.log_text()
    );
    for (method, path, port) in &sent {
        let v = seen
            .get(path)
            .unwrap_or_else(|| panic!("{method} {path} not captured"));
        assert_eq!(v["method"], method.as_str(), "{path}");
        assert_eq!(v["client"], format!("{}:{port}", net.ns_ip), "{path}");
        assert_eq!(v["server"], format!("{}:{PORT}", net.host_ip), "{path}");
        assert_eq!(v["version"], "HTTP/1.1");
        assert_eq!(v["truncated"], false);
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
    }
    let status = daemon.stop(Duration::from_secs(5)).unwrap();
    assert!(
        status.success(),
        "daemon exit {status}; log:\n{}",
        daemon.log_text()
    );
    assert!(daemon.log_text().contains("xdp program detached"));
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn requests_pipelined_in_one_segment_are_each_reported() {
    let net = TestNet::new("cap3", 3).unwrap();
    // A raw sink on the HTTP port: the requests only have to arrive, not be answered.
    let sink = std::net::TcpListener::bind(SocketAddr::new(net.host_ip.into(), PORT)).unwrap();
    std::thread::spawn(move || {
        for conn in sink.incoming().flatten() {
            let mut conn = conn;
            let mut buf = [0u8; 4096];
            while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
    let daemon = Daemon::start(
        &precedent_bin(),
        &["daemon", "--iface", &net.host_if, "--log-requests"],
    )
    .unwrap();
    let target = SocketAddr::new(net.host_ip.into(), PORT);
    net.run_in_ns(move || {
        // One write, one segment: a transfer hidden between two innocuous requests.
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
        s.write_all(
            b"GET /news HTTP/1.1\r\nHost: api.test\r\n\r\n\
              POST /transferFunds HTTP/1.1\r\nHost: api.test\r\nContent-Length: 3\r\n\r\nx=1\
              GET /after HTTP/1.1\r\nHost: api.test\r\n\r\n",
        )
        .unwrap();
        s.flush().unwrap();
    })
    .unwrap();
    let lines = daemon.collect_lines(3, Duration::from_secs(3));
    let paths: Vec<String> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["path"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(
        paths,
        ["/news", "/transferFunds", "/after"],
        "log:\n{}",
        daemon.log_text()
    );
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn plain_tcp_data_produces_no_event() {
    let net = TestNet::new("cap2", 2).unwrap();
    // A raw TCP sink: accepts and reads whatever arrives.
    let sink = std::net::TcpListener::bind(SocketAddr::new(net.host_ip.into(), 9000)).unwrap();
    std::thread::spawn(move || {
        for conn in sink.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    let server = HttpServer::start(SocketAddr::new(net.host_ip.into(), PORT)).unwrap();
    let daemon = Daemon::start(
        &precedent_bin(),
        &["daemon", "--iface", &net.host_if, "--log-requests"],
    )
    .unwrap();

    let sink_addr = SocketAddr::new(net.host_ip.into(), 9000);
    let http_addr = SocketAddr::new(net.host_ip.into(), PORT);
    net.run_in_ns(move || {
        let payloads: [&[u8]; 6] = [
            b"hello, this is not http\n",
            b"GETX /not-a-method HTTP/1.1\r\n\r\n",
            b"get /lowercase HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"POS",
            b"SSH-2.0-OpenSSH_9.2\r\n",
        ];
        for p in payloads {
            let mut s = TcpStream::connect_timeout(&sink_addr, Duration::from_secs(5)).unwrap();
            s.write_all(p).unwrap();
            s.flush().unwrap();
        }
        // A sentinel HTTP request proves the pipeline was live while the junk went by.
        let mut s = TcpStream::connect_timeout(&http_addr, Duration::from_secs(5)).unwrap();
        roundtrip(&mut s, "GET", "/sentinel", true);
    })
    .unwrap();
    assert_eq!(server.served(), 1);

    let lines = daemon.collect_lines(10, Duration::from_secs(3));
    assert_eq!(
        lines.len(),
        1,
        "only the sentinel should be reported, got {lines:#?}"
    );
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["path"], "/sentinel");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn unknown_interface_is_a_one_line_error() {
    let out = std::process::Command::new(precedent_bin())
        .args(["daemon", "--iface", "nosuch0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("precedent: interface nosuch0 not found; available:"),
        "{err}"
    );
    assert!(last.contains("lo"), "{err}");
}
