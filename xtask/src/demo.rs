//! `cargo xtask demo`: a namespace and veth pair, a small API on the host side, a client in
//! the namespace walking through it, and precedent showing every request it captured.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::Context as _;
use precedent_tests::{Daemon, HttpServer, TestNet};

use crate::{build_agent, is_root, setup, step};

const PORT: u16 = 8080;

/// What a customer of a small banking API does: sign in, list accounts, check a balance, move money.
const WALK: &[(&str, &str)] = &[
    ("POST", "/api/v1/auth"),
    ("GET", "/api/v1/users/17/accounts"),
    ("GET", "/api/v1/accounts/1042/balance"),
    ("GET", "/api/v1/accounts/1043/balance"),
    ("POST", "/api/v1/transferFunds"),
    ("GET", "/api/v1/accounts/1042/balance"),
    ("GET", "/api/v1/users/17/accounts?page=2"),
];

pub fn run() -> anyhow::Result<()> {
    setup::ensure()?;
    let bin = build_agent()?;
    if !is_root() {
        anyhow::bail!(
            "the demo attaches XDP to a veth pair and needs root: rerun as root (sudo -E cargo xtask demo)"
        );
    }

    step("creating namespace prec-demo and veth pair prdemoh <-> prdemon (10.231.99.0/24)");
    let net = TestNet::new("demo", 99)?;
    let server = HttpServer::start(SocketAddr::new(net.host_ip.into(), PORT))?;
    step(&format!(
        "API server listening on {}:{PORT} (host side)",
        net.host_ip
    ));
    step(&format!(
        "starting `precedent daemon --iface {}`",
        net.host_if
    ));
    let daemon = Daemon::start(&bin, &["daemon", "--iface", &net.host_if, "--log-requests"])?;

    step(&format!(
        "client {} walks through the API ({} requests, one keep-alive connection)",
        net.ns_ip,
        WALK.len()
    ));
    let target = SocketAddr::new(net.host_ip.into(), PORT);
    net.run_in_ns(move || walk(target))??;

    let lines = daemon.collect_lines(WALK.len(), Duration::from_secs(3));
    println!();
    println!(
        "precedent captured {} of {} requests ({} served):",
        lines.len(),
        WALK.len(),
        server.served()
    );
    println!(
        "  {:<28} {:<20} {:<20} {:<7} path",
        "time", "client", "server", "method"
    );
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).context("daemon printed a non-JSON line")?;
        let path = match v["query"].as_str() {
            Some(q) => format!("{}?{q}", v["path"].as_str().unwrap_or("")),
            None => v["path"].as_str().unwrap_or("").to_string(),
        };
        println!(
            "  {:<28} {:<20} {:<20} {:<7} {path}",
            v["ts"].as_str().unwrap_or(""),
            v["client"].as_str().unwrap_or(""),
            v["server"].as_str().unwrap_or(""),
            v["method"].as_str().unwrap_or(""),
        );
    }
    println!();
    drop(daemon);
    drop(net);
    step("stopped the daemon and removed the namespace and veth pair");
    anyhow::ensure!(
        lines.len() == WALK.len(),
        "expected {} captured requests, got {}",
        WALK.len(),
        lines.len()
    );
    Ok(())
}

fn walk(target: SocketAddr) -> anyhow::Result<()> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    for (method, path) in WALK {
        let body = if *method == "POST" {
            r#"{"demo":true}"#
        } else {
            ""
        };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: bank.demo\r\nAuthorization: Bearer demo-token\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())?;
        let mut resp = Vec::new();
        let mut b = [0u8; 1];
        while !resp.ends_with(b"\r\n\r\nok") {
            s.read_exact(&mut b)?;
            resp.push(b[0]);
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    Ok(())
}
