//! The daemon's configuration file (`precedent config check` runs the same code): any text
//! must either load or give an error naming the key at fault, and a config that loads must
//! build the engine the daemon would start with.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use precedent::{config::Config, engine::Engine};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = Config::parse(text, Path::new("fuzz.toml")) else {
        return;
    };
    Engine::new(&cfg.engine(), cfg.rule_file(), [7; 16], cfg.mode)
        .expect("a validated config builds its engine");
});
