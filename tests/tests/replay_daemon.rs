//! Replay and the daemon give identical alerts for identical request streams.
//!
//! Customers and attackers talk to a small bank API over real TCP from a namespace; the daemon
//! watches the host end of the veth pair (XDP capture, detect mode, no rules: every alert comes
//! from the learned model) and logs every request it captured (`--log-requests`). Those request
//! lines, with the session header each request carried, become a jsonl file that `precedent
//! replay` runs through with the same config, the same mode, no warm-up (the daemon has none)
//! and the daemon's session secret. The two alert streams must then be equal field by field,
//! timestamps included: replay stamps an alert with its record's time, the record carries the
//! capture time the daemon stamped it with, and both are printed to the microsecond.
//!
//! What the two paths cannot share is the moment of the periodic upkeep (the daemon's 1 s timer
//! against replay's traffic-time seconds), which publishes learned precedences. So the story
//! runs in two acts separated by a pause of a few seconds: customers teach the model, then, once
//! both paths have run their upkeep on the same counts, the attackers act. Needs root.
use std::{collections::BTreeMap, net::SocketAddr, process::Command, time::Duration};

use precedent_tests::{
    Daemon, HttpServer, TestNet,
    fixtures::{self, Scratch},
    precedent_bin,
};

const PORT: u16 = 8080;

/// One request; nothing here is blocked (detect mode), so it must succeed.
fn request(target: SocketAddr, token: &str, method: &str, path: &str) {
    let status = fixtures::request(target, token, method, path);
    assert!(
        status.as_ref().is_ok_and(|s| s.starts_with("HTTP/1.1 200")),
        "{method} {path}: {status:?}"
    );
}

/// A customer's visit: sign in, list accounts, check a balance, transfer, check again.
fn customer(i: u32) -> Vec<(&'static str, String)> {
    let account = 1000 + i;
    vec![
        ("POST", "/api/v1/auth".into()),
        ("GET", format!("/api/v1/users/{}/accounts", 50 + i)),
        ("GET", format!("/api/v1/accounts/{account}/balance")),
        ("POST", "/api/v1/transferFunds".into()),
        ("GET", format!("/api/v1/accounts/{account}/balance")),
    ]
}

/// The seeds' attacks: a transfer without the lookups before it, a replayed transfer, and an
/// enumeration of account balances.
fn attacks() -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    let skipper = vec![
        ("POST", "/api/v1/auth".into()),
        ("POST", "/api/v1/transferFunds".into()),
    ];
    let mut replayer = customer(999);
    replayer.truncate(4);
    replayer.extend(std::iter::repeat_n(
        ("POST", "/api/v1/transferFunds".into()),
        7,
    ));
    let mut enumerator = vec![("POST", "/api/v1/auth".into())];
    enumerator.extend((0..25).map(|i| ("GET", format!("/api/v1/accounts/{}/balance", 7000 + i))));
    vec![
        ("skipper", skipper),
        ("replayer", replayer),
        ("enumerator", enumerator),
    ]
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn replay_and_daemon_alert_alike_on_the_same_requests() {
    let net = TestNet::new("rpd1", 31).unwrap();
    let _server = HttpServer::start(SocketAddr::new(net.host_ip.into(), PORT)).unwrap();
    let dir = Scratch::new("rpd1");
    // 40 visits teach about 200 runs, fewer than the 1,000 the replay signal waits for by
    // default before it judges anything: lower that floor, the rest stays at its defaults.
    let config = fixtures::write_config(
        &dir,
        "mode = \"detect\"\n[signals]\nreplay_population_min_runs = 100\n",
    );
    let daemon = Daemon::start(
        &precedent_bin(),
        &[
            "daemon",
            "--iface",
            &net.host_if,
            "--config",
            &config,
            "--log-requests",
        ],
    )
    .unwrap();
    let target = SocketAddr::new(net.host_ip.into(), PORT);

    // The token of every request, in the order sent (one at a time, so capture order is send
    // order).
    let tokens: Vec<String> = net
        .run_in_ns(move || {
            let mut tokens = Vec::new();
            let mut send = |token: &str, steps: &[(&str, String)]| {
                for (m, p) in steps {
                    request(target, token, m, p);
                    tokens.push(token.to_string());
                }
            };
            for i in 0..40 {
                send(&format!("customer-{i}"), &customer(i));
            }
            // Both paths run their upkeep (the daemon every second, replay as traffic time
            // passes each second) on the same counts before anyone misbehaves.
            std::thread::sleep(Duration::from_millis(2500));
            for (who, steps) in attacks() {
                send(who, &steps);
            }
            tokens
        })
        .unwrap();

    // The daemon's stdout: a request line per captured request, alert lines among them.
    let lines = daemon.collect_lines(usize::MAX, Duration::from_secs(3));
    let (requests, daemon_alerts): (Vec<_>, Vec<_>) = json_lines(&lines.join("\n"))
        .into_iter()
        .partition(|l| l["kind"] == "request");
    assert_eq!(
        requests.len(),
        tokens.len(),
        "every request captured once: {requests:?}"
    );

    // The same stream as jsonl: time, client, request and the session header it carried.
    let mut jsonl = String::new();
    for (r, token) in requests.iter().zip(&tokens) {
        let path = match r["query"].as_str() {
            Some(q) => format!("{}?{q}", r["path"].as_str().unwrap()),
            None => r["path"].as_str().unwrap().to_string(),
        };
        // The request line names the client's socket; a record names the client.
        let client: SocketAddr = r["client"].as_str().unwrap().parse().unwrap();
        let rec = serde_json::json!({
            "ts": r["ts"],
            "client": client.ip().to_string(),
            "method": r["method"],
            "path": path,
            "host": "bank.test",
            "headers": {"authorization": format!("Bearer {token}")},
        });
        jsonl.push_str(&rec.to_string());
        jsonl.push('\n');
    }
    let stream = dir.join("stream.jsonl");
    std::fs::write(&stream, jsonl).unwrap();
    let state = daemon.dir().unwrap().join("state");
    let secret = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("secret"))
        })
        .unwrap_or_else(|| panic!("no secret file in {}", state.display()));
    let out = Command::new(precedent_bin())
        .arg("replay")
        .arg(&stream)
        .args(["--format", "jsonl", "--config", &config, "--mode", "detect"])
        .args([
            "--warmup",
            "0",
            "--no-progress",
            "--summary-json",
            "--session-secret",
        ])
        .arg(&secret)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "replay failed: {stderr}");
    let summary_start = stderr.find("{\n").expect("summary JSON");
    let summary: serde_json::Value = serde_json::Deserializer::from_str(&stderr[summary_start..])
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(
        summary["engine"]["requests"].as_u64(),
        Some(tokens.len() as u64),
        "replay processed every request: {summary}"
    );
    let replay_alerts = json_lines(&String::from_utf8_lossy(&out.stdout));
    drop(daemon);

    // The attacks were seen, by signal...
    let by_who = |alerts: &[serde_json::Value]| {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for a in alerts {
            m.entry(a["session"].as_str().unwrap().to_string())
                .or_default()
                .push(a["signal"].as_str().unwrap_or("-").to_string());
        }
        m
    };
    let signals: Vec<String> = daemon_alerts
        .iter()
        .map(|a| a["signal"].as_str().unwrap_or("-").to_string())
        .collect();
    for expected in ["missing_precedent", "replay", "enumeration"] {
        assert!(
            signals.iter().any(|s| s == expected),
            "no {expected} alert from the daemon: {daemon_alerts:#?}"
        );
    }
    assert!(
        by_who(&daemon_alerts).len() >= 3,
        "each attacker's session alerted: {daemon_alerts:#?}"
    );
    // ...and replay printed the very same lines: every field, in the same order.
    assert_eq!(
        replay_alerts.len(),
        daemon_alerts.len(),
        "daemon: {daemon_alerts:#?}\nreplay: {replay_alerts:#?}"
    );
    for (d, r) in daemon_alerts.iter().zip(&replay_alerts) {
        let (d, r) = (d.as_object().unwrap(), r.as_object().unwrap());
        assert_eq!(
            d.keys().collect::<Vec<_>>(),
            r.keys().collect::<Vec<_>>(),
            "same fields"
        );
        for (field, value) in d {
            assert_eq!(
                Some(value),
                r.get(field),
                "field {field} differs:\ndaemon {d:?}\nreplay {r:?}"
            );
        }
    }
}
