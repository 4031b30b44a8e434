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
    Daemon, HttpServer, Packet, TestNet,
    fixtures::{self, Scratch},
    hostile::{FrameSender, control, counter},
    precedent_bin,
    recorder::FrameRecorder,
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

/// A capture of both directions, taken on the interface while the daemon watched it, replays
/// to exactly the requests the daemon analysed: the real ones, not two forged ones the server
/// never acknowledged (a transfer from a bystander's address, and a balance lookup in a
/// segment the host's stack drops after XDP, as it drops a bad checksum).
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_capture_of_both_directions_replays_to_what_the_daemon_analysed() {
    let net = TestNet::new("rpd2", 32).unwrap();
    let target = SocketAddr::new(net.host_ip.into(), PORT);
    let _server = HttpServer::start(target).unwrap();
    let dir = Scratch::new("rpd2");
    let config = fixtures::write_config(&dir, "mode = \"learn\"\n");
    let daemon = Daemon::start_discarding_stdout(
        &precedent_bin(),
        &["daemon", "--iface", &net.host_if, "--config", &config],
    )
    .unwrap();
    let socket = daemon.socket().unwrap();
    // What `tcpdump -i <host end> -w` would record, both directions.
    let recorder = FrameRecorder::start(&net.host_if).unwrap();
    let visits = |from: u32| {
        net.run_in_ns(move || {
            for i in from..from + 3 {
                for (m, p) in customer(i) {
                    request(target, &format!("customer-{i}"), m, &p);
                }
            }
        })
        .unwrap()
    };
    visits(0);
    let forged = |src: std::net::IpAddr, sport: u16, payload: &str| {
        let mut p = Packet::tcp(
            &src.to_string(),
            &target.ip().to_string(),
            payload.as_bytes(),
        );
        (p.sport, p.dport, p.seq) = (sport, PORT, 77_777);
        p.build()
    };
    let mut sender = FrameSender::open(&net).unwrap();
    let [a, b, c, _] = net.ns_ip.octets();
    sender
        .send(&forged(
            [a, b, c, 99].into(),
            41_000,
            "POST /api/v1/transferFunds HTTP/1.1\r\nHost: bank.test\r\n\r\n",
        ))
        .unwrap();
    sender
        .send(&forged(
            net.ns_ip.into(),
            41_001,
            "GET /api/v1/accounts/7/balance HTTP/1.1\r\nAuthorization: Bearer customer-9\r\n\r\n",
        ))
        .unwrap();
    visits(3);
    let real = 6 * customer(0).len() as u64;
    let counters = || control(&socket, "status").unwrap().0;
    assert!(
        fixtures::wait_until(Duration::from_secs(20), || {
            let s = counters();
            counter(&s, "userspace_counters", "requests") == real
                && counter(&s, "userspace_counters", "requests_unacknowledged") == 2
        }),
        "{}",
        counters()
    );
    let capture = dir.join("both.pcap");
    std::fs::write(&capture, recorder.finish()).unwrap();

    let out = Command::new(precedent_bin())
        .arg("replay")
        .arg(&capture)
        .arg("--config")
        .arg(&config)
        .args(["--summary-json", "--no-progress"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "replay failed: {stderr}");
    // The pretty summary: from a line "{" to the next line "}" (log lines may surround it).
    let lines: Vec<&str> = stderr.lines().collect();
    let from = lines.iter().position(|l| *l == "{").expect("summary JSON");
    let to = from + lines[from..].iter().position(|l| *l == "}").unwrap();
    let s: serde_json::Value = serde_json::from_str(&lines[from..=to].join("\n")).unwrap();
    let input = &s["input"];
    assert_eq!(input["files"][0]["format"], "pcap", "{input}");
    assert_eq!(input["records"], real, "{input}");
    assert_eq!(s["engine"]["requests"], real, "{s}");
    // The capture starts with the server accepting the first connection, so every request
    // waited for its acknowledgement; the forged two never got one.
    let acks = &input["acks"];
    assert_eq!(acks["files_waited"], 1, "{input}");
    assert_eq!(acks["acknowledged"], real, "{input}");
    assert_eq!(acks["unacknowledged"], 2, "{input}");
    drop(daemon);
}
