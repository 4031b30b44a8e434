//! End to end through the engine, no root: clients walk a banking API the way real customers
//! do, then an attacker runs the attacks of the Sequence Analytics announcement (a transfer
//! with no balance lookup before it, the transfer replayed, account enumeration). Each attack
//! must be caught by the right signal, and the normal walks must raise no alert.
use std::net::IpAddr;

use precedent::{
    decide::{Alert, Mode, Signal},
    engine::{Engine, EngineConfig},
    proxy::{ClientHeader, ProxyConfig},
    rules::RuleFile,
};

const SECOND: u64 = 1_000_000_000;
const T0: u64 = 1_790_000_000 * SECOND;

/// A small deterministic generator (the test must not depend on luck).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Traffic {
    engine: Engine,
    now: u64,
    alerts: Vec<Alert>,
}

impl Traffic {
    fn new(rules: &str) -> Self {
        let engine = Engine::new(
            &EngineConfig::default(),
            RuleFile::from_toml_str(rules).unwrap(),
            [7; 16],
            Mode::Learn,
        )
        .unwrap();
        Self {
            engine,
            now: T0,
            alerts: Vec::new(),
        }
    }

    /// Sends one request; returns the alerts it raised.
    fn send(&mut self, client: IpAddr, token: &str, method: &str, path: &str) -> Vec<Alert> {
        self.now += SECOND;
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: bank.test\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        let out = self
            .engine
            .on_capture(self.now, client, raw.as_bytes(), 0)
            .expect("parsable request");
        self.alerts.extend(out.alerts.iter().cloned());
        out.alerts
    }

    /// One customer's visit: sign in, list accounts, look at balances, maybe transfer (always
    /// after a balance lookup), maybe look at transactions, sign out.
    fn normal_walk(&mut self, rng: &mut Lcg, i: u64) -> Vec<Alert> {
        let client: IpAddr = format!("10.1.{}.{}", i / 200, i % 200 + 1).parse().unwrap();
        let token = format!("customer-{i}");
        let user = 100 + i;
        let acct = 5000 + i * 3;
        let mut alerts = Vec::new();
        alerts.extend(self.send(client, &token, "POST", "/api/v1/auth"));
        alerts.extend(self.send(
            client,
            &token,
            "GET",
            &format!("/api/v1/users/{user}/accounts"),
        ));
        for a in 0..=rng.below(2) {
            alerts.extend(self.send(
                client,
                &token,
                "GET",
                &format!("/api/v1/accounts/{}/balance", acct + a),
            ));
        }
        if rng.below(10) < 6 {
            alerts.extend(self.send(client, &token, "POST", "/api/v1/transferFunds"));
            alerts.extend(self.send(
                client,
                &token,
                "GET",
                &format!("/api/v1/accounts/{acct}/balance"),
            ));
        }
        if rng.below(10) < 4 {
            alerts.extend(self.send(
                client,
                &token,
                "GET",
                &format!("/api/v1/accounts/{acct}/transactions"),
            ));
        }
        alerts.extend(self.send(client, &token, "POST", "/api/v1/logout"));
        // Sessions end (idle timeout) and the model does its upkeep between visits.
        self.now += 30 * SECOND;
        self.engine.maintain(self.now);
        alerts
    }
}

fn signals(alerts: &[Alert]) -> Vec<Signal> {
    alerts.iter().filter_map(|a| a.signal).collect()
}

#[test]
fn attacks_are_caught_by_the_right_signal_and_normal_walks_raise_nothing() {
    let mut t = Traffic::new("");
    let mut rng = Lcg(42);
    // Learn from 400 customers, then detect.
    for i in 0..400 {
        t.normal_walk(&mut rng, i);
    }
    t.engine.maintain(t.now + 3600 * SECOND);
    t.engine.set_mode(Mode::Detect);

    let mut false_alarms = Vec::new();
    for i in 400..600 {
        false_alarms.extend(t.normal_walk(&mut rng, i));
    }
    assert!(
        false_alarms.is_empty(),
        "normal walks raised alerts: {false_alarms:#?}"
    );

    let attacker: IpAddr = "203.0.113.9".parse().unwrap();
    // 1. Straight to the transfer, no balance lookup.
    let mut a = Vec::new();
    a.extend(t.send(attacker, "stolen-1", "POST", "/api/v1/auth"));
    a.extend(t.send(attacker, "stolen-1", "GET", "/api/v1/users/77/accounts"));
    a.extend(t.send(attacker, "stolen-1", "POST", "/api/v1/transferFunds"));
    assert!(
        signals(&a).contains(&Signal::MissingPrecedent),
        "skipped balance lookup not caught: {a:#?}"
    );
    let alert = a
        .iter()
        .find(|x| x.signal == Some(Signal::MissingPrecedent))
        .unwrap();
    assert_eq!(alert.operation, "POST /api/v1/transferFunds");
    assert_eq!(
        alert.previous,
        vec!["POST /api/v1/auth", "GET /api/v1/users/{id}/accounts"]
    );
    assert_eq!(
        alert.numbers["predecessor"],
        "GET /api/v1/accounts/{id}/balance"
    );
    assert_eq!(alert.client, "203.0.113.9");
    assert!(
        !format!("{alert:?}").contains("stolen-1"),
        "raw token leaked into an alert"
    );

    // 2. The transfer replayed three times in a row.
    let mut b = Vec::new();
    b.extend(t.send(attacker, "stolen-2", "POST", "/api/v1/auth"));
    b.extend(t.send(attacker, "stolen-2", "GET", "/api/v1/users/78/accounts"));
    b.extend(t.send(attacker, "stolen-2", "GET", "/api/v1/accounts/9001/balance"));
    for _ in 0..3 {
        b.extend(t.send(attacker, "stolen-2", "POST", "/api/v1/transferFunds"));
    }
    assert_eq!(
        signals(&b),
        vec![Signal::Replay],
        "replayed transfer: {b:#?}"
    );
    assert_eq!(b[0].numbers["run_len"], 3);

    // 3. Enumerating account ids one by one.
    let mut c = Vec::new();
    c.extend(t.send(attacker, "stolen-3", "POST", "/api/v1/auth"));
    for id in 7000..7040 {
        c.extend(t.send(
            attacker,
            "stolen-3",
            "GET",
            &format!("/api/v1/accounts/{id}/balance"),
        ));
    }
    // Changing ids are enumeration, not a replay of one request.
    assert!(
        signals(&c).contains(&Signal::Enumeration),
        "enumeration not caught: {c:#?}"
    );
    assert!(!signals(&c).contains(&Signal::Replay), "{c:#?}");
    assert_eq!(
        c.iter()
            .filter(|x| x.signal == Some(Signal::Enumeration))
            .count(),
        1,
        "one alert per run, not one per request"
    );
}

#[test]
fn precedence_rule_fires_on_the_skipped_lookup_and_blocks_in_enforce_mode() {
    let rules = r#"
        [[rule]]
        id = "transfer-needs-balance"
        operation = "POST /api/v1/transferFunds"
        preceded_by = ["GET /api/v1/accounts/{account_id}/balance"]
        within_ops = 10
        action = "block"
        block_ttl = "15m"
    "#;
    let mut t = Traffic::new(rules);
    let mut rng = Lcg(7);
    for i in 0..50 {
        t.normal_walk(&mut rng, i);
    }
    t.engine.set_mode(Mode::Enforce);
    for i in 50..100 {
        let alerts = t.normal_walk(&mut rng, i);
        assert!(
            alerts.iter().all(|a| a.rule.is_none()),
            "rule fired on a normal walk: {alerts:#?}"
        );
    }
    let attacker: IpAddr = "203.0.113.10".parse().unwrap();
    t.send(attacker, "x", "POST", "/api/v1/auth");
    t.now += SECOND;
    let raw =
        "POST /api/v1/transferFunds HTTP/1.1\r\nHost: bank.test\r\nAuthorization: Bearer x\r\n\r\n";
    let out = t
        .engine
        .on_capture(t.now, attacker, raw.as_bytes(), 0)
        .unwrap();
    let hit = out
        .alerts
        .iter()
        .find(|a| a.rule.as_deref() == Some("transfer-needs-balance"))
        .expect("rule alert");
    assert_eq!(hit.kind, "rule");
    let order = out.block.expect("enforce mode blocks");
    assert_eq!(order.client, attacker);
    assert_eq!(order.ttl, std::time::Duration::from_secs(900));
    assert_eq!(hit.block_ttl.as_deref(), Some("15m"));
}

#[test]
fn learn_mode_is_silent_even_for_attacks() {
    let mut t = Traffic::new("");
    let mut rng = Lcg(1);
    for i in 0..300 {
        t.normal_walk(&mut rng, i);
    }
    let attacker: IpAddr = "203.0.113.11".parse().unwrap();
    t.send(attacker, "s", "POST", "/api/v1/auth");
    for _ in 0..10 {
        t.send(attacker, "s", "POST", "/api/v1/transferFunds");
    }
    assert!(t.alerts.is_empty());
}

#[test]
fn junk_bytes_are_counted_not_fatal() {
    let mut t = Traffic::new("");
    let client: IpAddr = "10.9.9.9".parse().unwrap();
    for junk in [
        &b"\x00\x01\x02"[..],
        b"GET",
        b"GET /x HTTP/9.9\r\n\r\n",
        b"\xff\xfe / HTTP/1.1\r\n\r\n",
    ] {
        assert!(t.engine.on_capture(T0, client, junk, 0).is_err());
    }
    assert_eq!(t.engine.counters().skipped, 4);
    assert_eq!(t.engine.counters().requests, 0);
}

/// Behind a reverse proxy every request comes from the proxy: the client it names is the one
/// alerted, keyed and blocked; what an untrusted peer claims is not believed.
#[test]
fn behind_a_trusted_proxy_the_forwarded_client_is_alerted_and_blocked() {
    let cfg = EngineConfig {
        proxy: ProxyConfig {
            trusted: vec!["127.0.0.1/32".parse().unwrap()],
            header: ClientHeader::XForwardedFor,
        },
        ..EngineConfig::default()
    };
    let rules = RuleFile::from_toml_str(
        r#"
        [[rule]]
        id = "transfer-needs-balance"
        operation = "POST /api/v1/transferFunds"
        preceded_by = ["GET /api/v1/accounts/{id}/balance"]
        action = "block"
        "#,
    )
    .unwrap();
    let mut e = Engine::new(&cfg, rules, [7; 16], Mode::Enforce).unwrap();
    let proxy: IpAddr = "127.0.0.1".parse().unwrap();
    let transfer = |xff: &str| {
        format!(
            "POST /api/v1/transferFunds HTTP/1.1\r\nHost: bank.test\r\nX-Forwarded-For: {xff}\r\n\r\n"
        )
    };
    // The client the proxy appended (rightmost), not the one the client wrote itself.
    let out = e
        .on_capture(T0, proxy, transfer("10.9.9.9, 203.0.113.10").as_bytes(), 0)
        .unwrap();
    let hit = out
        .alerts
        .iter()
        .find(|a| a.rule.is_some())
        .expect("rule alert");
    assert_eq!(hit.client, "203.0.113.10");
    assert_eq!(
        out.block.expect("enforce mode blocks").client,
        "203.0.113.10".parse::<IpAddr>().unwrap()
    );
    // Sessions without an identifier are the forwarded clients', not one for the proxy.
    let other = e
        .on_capture(T0 + SECOND, proxy, transfer("198.51.100.4").as_bytes(), 0)
        .unwrap();
    assert_eq!(
        other.block.expect("a second client, blocked too").client,
        "198.51.100.4".parse::<IpAddr>().unwrap()
    );
    assert_eq!(e.sessions().counters().created, 2);
    // An untrusted peer names whoever it likes: it is the client itself.
    let peer: IpAddr = "192.0.2.77".parse().unwrap();
    let out = e
        .on_capture(
            T0 + 2 * SECOND,
            peer,
            transfer("198.51.100.200").as_bytes(),
            0,
        )
        .unwrap();
    assert_eq!(out.block.expect("blocked").client, peer);
    // A health check from the proxy without the header: the proxy stands in, counted...
    e.on_capture(
        T0 + 3 * SECOND,
        proxy,
        b"GET /healthz HTTP/1.1\r\nHost: bank.test\r\n\r\n",
        0,
    )
    .unwrap();
    // ... and is never blocked itself, whatever its stand-in session does.
    let out = e
        .on_capture(
            T0 + 4 * SECOND,
            proxy,
            b"POST /api/v1/transferFunds HTTP/1.1\r\nHost: bank.test\r\n\r\n",
            0,
        )
        .unwrap();
    assert!(out.alerts.iter().any(|a| a.rule.is_some()), "still alerted");
    assert_eq!(out.block, None);
    let c = e.proxy_counters();
    assert_eq!(
        (
            c.client_from_header,
            c.client_header_missing,
            c.client_header_invalid
        ),
        (2, 2, 0)
    );
    // A reload (SIGHUP) that stops trusting it: the proxy is the client again (its own
    // session goes on; no new client is read from the header).
    e.reconfigure(&EngineConfig::default()).unwrap();
    let created = e.sessions().counters().created;
    e.on_capture(
        T0 + 5 * SECOND,
        proxy,
        transfer("198.51.100.9").as_bytes(),
        0,
    )
    .unwrap();
    assert_eq!(e.sessions().counters().created, created);
    assert_eq!(e.proxy_counters().client_from_header, 2);
}
