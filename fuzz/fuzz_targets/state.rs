//! State-file loading: the model and discovered endpoints the daemon restores at start-up
//! (`model.state`, also `replay --model`, `model load`). Every input is decoded twice: as
//! stored (header, length and checksum checks), and with its header repaired so that
//! mutations reach the payload. What decodes must resume an engine that then takes traffic,
//! upkeep and every listing without panicking; what does not must be named damage.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use precedent::{
    decide::Mode,
    engine::{Engine, EngineConfig, Learned},
    graph::{self, GraphView},
    rules::RuleFile,
    state::{self, Persist as _},
};

/// Requests that walk the operations a small API model knows, plus new ones.
const TRAFFIC: &[&str] = &[
    "/login",
    "/users/7/accounts",
    "/accounts/9/balance",
    "/transfer",
    "/accounts/9/balance",
    "/logout",
    "/new/path/1",
];

fuzz_target!(|data: &[u8]| {
    let _ = state::decode_file::<Learned>(data);
    let Some(payload) = data.get(state::HEADER_LEN..) else {
        return;
    };
    let repaired = state::encode_file(Learned::KIND, Learned::VERSION, payload);
    let Ok(learned) = state::decode_file::<Learned>(&repaired) else {
        return;
    };
    // As the daemon resumes (daemon.rs) and the CLI reads a model file (engine_from_model).
    let Ok(mut engine) = Engine::with_state(
        &EngineConfig::default(),
        RuleFile::default(),
        [7; 16],
        Mode::Detect,
        learned.model,
        learned.discovery,
    ) else {
        return;
    };
    let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let mut ts = 1_700_000_000_000_000_000u64;
    for round in 0..3u64 {
        for (i, path) in TRAFFIC.iter().enumerate() {
            let req = format!("GET {path} HTTP/1.1\r\nAuthorization: t{round}\r\n\r\n");
            let _ = engine.on_capture(ts + i as u64, client, req.as_bytes(), 0);
        }
        ts += 3_600_000_000_000;
        engine.maintain(ts);
    }
    let _ = engine.sequences(20);
    let _ = engine.suggest_rules(0.5, 50);
    let _ = engine.discovery().operations();
    let _ = graph::build(&engine, GraphView::Transitions, 20);
    let _ = graph::build(&engine, GraphView::Sequences, 20);
});
