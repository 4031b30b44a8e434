//! Discovery on arbitrary request paths (and hosts, and operator templates), with small caps so
//! a short input reaches them. Every cap must hold after every request, every id handed out
//! must be canonical and named, and what was learned must survive the state file's encoding.
//!
//! Input: lines of `METHOD PATH [HOST]` (other lines are a `GET` of the whole line), and
//! `T TEMPLATE` lines that add an operator template.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precedent::{
    discovery::{Discovery, DiscoveryConfig},
    http::Method,
};

fuzz_target!(|data: &[u8]| {
    let config = DiscoveryConfig {
        include_host: true,
        cardinality_threshold: 3,
        max_nodes: 40,
        max_ops: 24,
        max_depth: 5,
        max_hosts: 3,
        templates: Vec::new(),
    };
    let mut d = Discovery::new(config.clone()).expect("valid config");
    let text = String::from_utf8_lossy(data);
    for line in text.lines().take(500) {
        if let Some(t) = line.strip_prefix("T ") {
            let _ = d.add_template(t);
            continue;
        }
        let mut parts = line.splitn(3, ' ');
        let (method, path, host) = match (parts.next().and_then(Method::parse), parts.next()) {
            (Some(m), Some(p)) => (m, p, parts.next()),
            _ => (Method::Get, line, None),
        };
        let id = d.observe(host, method, path);
        assert_eq!(d.canonical(id), id, "observe returned a merged id");
        let name = d.name(id).expect("an issued id has a name").to_owned();
        assert_eq!(
            d.resolve(&name),
            Some(id),
            "{name:?} does not resolve to its id"
        );
        let stats = d.stats();
        // The cap counts path positions; each host's root comes on top (at most max_hosts + 1).
        assert!(
            stats.live_nodes <= config.max_nodes + config.max_hosts + 1,
            "{} live nodes over the cap {} (+ {} roots)",
            stats.live_nodes,
            config.max_nodes,
            config.max_hosts + 1
        );
        assert!(
            d.len() <= config.max_ops + Method::ALL.len(),
            "{} operations over the cap",
            d.len()
        );
    }
    let bytes = postcard::to_allocvec(&d).expect("discovery serialises");
    let back: Discovery = postcard::from_bytes(&bytes).expect("saved discovery loads");
    assert_eq!(back.operations(), d.operations());
});
