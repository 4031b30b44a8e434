//! The control socket's requests, decoded as the server decodes them (one line, at most
//! `MAX_REQUEST_BYTES`), then answered the way the daemon answers the engine-only ones. A
//! request that decodes must encode back to itself (the CLI and daemon share these types);
//! anything else must be an error reply, never a panic.
#![no_main]

use std::{
    cell::RefCell,
    net::{IpAddr, Ipv4Addr},
};

use libfuzzer_sys::fuzz_target;
use precedent::{
    control::{MAX_REQUEST_BYTES, Request, decode_request, encode_request},
    decide::Mode,
    engine::{Engine, EngineConfig},
    graph,
    rules::{RuleFile, RuleSet},
};

thread_local! {
    /// A small trained engine the read-only requests are answered from (built once).
    static ENGINE: RefCell<Engine> = RefCell::new(trained_engine());
}

fn trained_engine() -> Engine {
    let mut e = Engine::new(
        &EngineConfig::default(),
        RuleFile::default(),
        [7; 16],
        Mode::Detect,
    )
    .expect("default engine");
    let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    for i in 0..300u64 {
        for path in [
            "/login",
            "/users/7/accounts",
            "/accounts/9/balance",
            "/transfer",
        ] {
            let req = format!("GET {path} HTTP/1.1\r\nAuthorization: t{}\r\n\r\n", i % 30);
            let _ = e.on_capture(i * 1_000_000_000, client, req.as_bytes(), 0);
        }
        e.maintain(i * 1_000_000_000);
    }
    e
}

fuzz_target!(|data: &[u8]| {
    // The server reads up to the first newline, refusing anything longer than the limit.
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    if line.len() > MAX_REQUEST_BYTES {
        return;
    }
    let Ok(req) = decode_request(line) else {
        return;
    };
    let wire = encode_request(&req);
    assert_eq!(
        decode_request(&wire).as_ref(),
        Ok(&req),
        "request changed through encode and decode"
    );
    ENGINE.with_borrow(|engine| match &req {
        Request::Sequences { top } => drop(engine.sequences(*top)),
        Request::Graph { view, top } => drop(graph::build(engine, *view, *top)),
        Request::RulesSuggest { min_score } => drop(engine.suggest_rules(*min_score, 200)),
        Request::Endpoints => drop(engine.discovery().operations()),
        Request::RulesAdd { toml } => {
            if let Ok(file) = RuleFile::from_toml_str(toml) {
                RuleSet::new(file).expect("validated rules compile");
            }
        }
        _ => {}
    });
});
