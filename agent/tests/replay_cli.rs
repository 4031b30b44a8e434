//! `precedent replay` as an operator runs it: the built binary on generated access logs of a
//! small banking API (normal customers, then the announcement's attacks), no root.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

const T0: u64 = 1_790_000_000;

/// A small deterministic generator (the tests must not depend on luck).
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Requests as (unix seconds, client, session, method, path).
type Req = (u64, String, String, &'static str, String);

/// One customer per client address: sign in, accounts, balances, maybe a transfer (always
/// after a balance lookup), maybe transactions, sign out.
fn normal_walks(from: u64, to: u64, t: &mut u64, rng: &mut Lcg) -> Vec<Req> {
    let mut out = Vec::new();
    for i in from..to {
        let client = format!("10.1.{}.{}", i / 200, i % 200 + 1);
        let sid = format!("customer-{i}");
        let (user, acct) = (100 + i, 5000 + i * 3);
        let mut push = |t: &mut u64, m: &'static str, p: String| {
            *t += 1;
            out.push((*t, client.clone(), sid.clone(), m, p));
        };
        push(t, "POST", "/api/v1/auth".into());
        push(t, "GET", format!("/api/v1/users/{user}/accounts"));
        for a in 0..=rng.below(2) {
            push(t, "GET", format!("/api/v1/accounts/{}/balance", acct + a));
        }
        if rng.below(10) < 6 {
            push(t, "POST", "/api/v1/transferFunds".into());
            push(t, "GET", format!("/api/v1/accounts/{acct}/balance"));
        }
        if rng.below(10) < 4 {
            push(t, "GET", format!("/api/v1/accounts/{acct}/transactions"));
        }
        push(t, "POST", "/api/v1/logout".into());
        *t += 30;
    }
    out
}

/// The attacker: a transfer with no balance lookup, then a transfer replayed 4 times, then
/// more transfers (which enforcement should hold back).
fn attack(t: &mut u64, client: &str, sid: &str) -> Vec<Req> {
    let mut out = Vec::new();
    let mut push = |m: &'static str, p: &str| {
        *t += 1;
        out.push((*t, client.to_string(), sid.to_string(), m, p.to_string()));
    };
    push("POST", "/api/v1/auth");
    push("GET", "/api/v1/users/77/accounts");
    push("POST", "/api/v1/transferFunds");
    push("GET", "/api/v1/accounts/9001/balance");
    for _ in 0..4 {
        push("POST", "/api/v1/transferFunds");
    }
    push("GET", "/api/v1/accounts/9001/transactions");
    push("POST", "/api/v1/logout");
    out
}

fn combined(reqs: &[Req]) -> String {
    let mut s = String::new();
    for (ts, client, _, m, p) in reqs {
        let dt = jiff_like_clf(*ts);
        let _ = writeln!(
            s,
            r#"{client} - - [{dt}] "{m} {p} HTTP/1.1" 200 512 "-" "Mozilla/5.0 (X11; Linux x86_64)""#
        );
    }
    s
}

/// `dd/Mon/yyyy:HH:MM:SS +0000` for a Unix time (civil-from-days, UTC).
fn jiff_like_clf(ts: u64) -> String {
    let days = (ts / 86_400) as i64;
    let secs = ts % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{d:02}/{}/{y}:{:02}:{:02}:{:02} +0000",
        MONTHS[(m - 1) as usize],
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn jsonl(reqs: &[Req]) -> String {
    let mut s = String::new();
    for (ts, client, sid, m, p) in reqs {
        let v =
            serde_json::json!({"ts": ts, "client": client, "session": sid, "method": m, "path": p});
        let _ = writeln!(s, "{v}");
    }
    s
}

fn precedent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_precedent"))
        .args(args)
        .env("PRECEDENT_LOG", "warn")
        .output()
        .expect("run precedent")
}

fn alerts(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn summary_json(out: &Output) -> Value {
    let err = String::from_utf8_lossy(&out.stderr);
    let start = err
        .find('{')
        .unwrap_or_else(|| panic!("no JSON summary: {err}"));
    let end = err.rfind('}').unwrap();
    serde_json::from_str(&err[start..=end]).unwrap_or_else(|e| panic!("{e}: {err}"))
}

fn signals_of(alerts: &[Value]) -> Vec<String> {
    alerts
        .iter()
        .filter_map(|a| a["signal"].as_str().map(str::to_string))
        .collect()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// 400 customers to learn from, 150 more, then the attacker; returns (requests, warm-up).
fn banking_day() -> (Vec<Req>, usize) {
    let (mut t, mut rng) = (T0, Lcg(42));
    let mut reqs = normal_walks(0, 400, &mut t, &mut rng);
    let warmup = reqs.len();
    reqs.extend(normal_walks(400, 550, &mut t, &mut rng));
    reqs.extend(attack(&mut t, "203.0.113.9", "stolen"));
    reqs.extend(normal_walks(550, 560, &mut t, &mut rng));
    (reqs, warmup)
}

#[test]
fn replay_of_a_combined_log_alerts_on_the_attacker_and_not_the_customers() {
    let dir = tempfile::tempdir().unwrap();
    let (reqs, warmup) = banking_day();
    let log = write(dir.path(), "access.log", &combined(&reqs));
    let out = precedent(&[
        "replay",
        log.to_str().unwrap(),
        "--warmup",
        &warmup.to_string(),
        "--summary-json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let a = alerts(&out);
    assert!(!a.is_empty(), "no alerts: {out:?}");
    for alert in &a {
        assert_eq!(alert["client"], "203.0.113.9", "customer alerted: {alert}");
        assert_eq!(alert["mode"], "detect");
    }
    let s = signals_of(&a);
    assert!(s.contains(&"missing_precedent".into()), "{a:#?}");
    assert!(s.contains(&"replay".into()), "{a:#?}");
    let skipped = a
        .iter()
        .find(|x| x["signal"] == "missing_precedent")
        .unwrap();
    assert_eq!(skipped["operation"], "POST /api/v1/transferFunds");
    assert_eq!(
        skipped["numbers"]["predecessor"],
        "GET /api/v1/accounts/{id}/balance"
    );

    let sum = summary_json(&out);
    assert_eq!(sum["engine"]["requests"], reqs.len());
    assert_eq!(sum["input"]["records"], reqs.len());
    assert_eq!(sum["engine"]["sessions"], 561);
    assert_eq!(sum["engine"]["alerts"], a.len());
    assert_eq!(sum["engine"]["alerts_by_signal"]["missing_precedent"], 1);
    assert_eq!(
        sum["engine"]["blocked_requests"], 0,
        "detect mode blocks nothing"
    );
}

#[test]
fn model_out_then_model_detects_without_warmup_and_feeds_the_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let (mut t, mut rng) = (T0, Lcg(9));
    let history = normal_walks(0, 500, &mut t, &mut rng);
    t += 3600;
    let mut today = normal_walks(500, 520, &mut t, &mut rng);
    today.extend(attack(&mut t, "203.0.113.20", "x"));
    let hist = write(dir.path(), "last-month.log", &combined(&history));
    let day = write(dir.path(), "today.log", &combined(&today));
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let model = state.join("model.state");

    let out = precedent(&[
        "replay",
        hist.to_str().unwrap(),
        "--mode",
        "learn",
        "--model-out",
        model.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(alerts(&out).is_empty(), "learn mode is silent");
    // The daemon's own loader reads it from its state directory as model.state.
    let learned = precedent::state::StateDir::open(&state)
        .unwrap()
        .load::<precedent::engine::Learned>()
        .unwrap()
        .into_value()
        .expect("the daemon can load the replay's model");
    assert!(
        learned
            .discovery
            .resolve("POST /api/v1/transferFunds")
            .is_some()
    );

    // Today's log is small: without the model its default warm-up would swallow the attack.
    let out = precedent(&[
        "replay",
        day.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let a = alerts(&out);
    assert!(
        signals_of(&a).contains(&"missing_precedent".into()),
        "{out:?}"
    );
    assert!(a.iter().all(|x| x["client"] == "203.0.113.20"), "{a:#?}");
    let cold = precedent(&["replay", day.to_str().unwrap()]);
    assert!(cold.status.success());
    assert!(
        !signals_of(&alerts(&cold)).contains(&"missing_precedent".into()),
        "a fresh engine cannot know the precedence from today's 20 customers"
    );

    // Pictures straight from the model file, no daemon.
    let dot = precedent(&[
        "endpoints",
        "--model",
        model.to_str().unwrap(),
        "--format",
        "dot",
    ]);
    assert!(dot.status.success(), "{dot:?}");
    let dot = String::from_utf8(dot.stdout).unwrap();
    assert!(dot.starts_with("digraph transitions {"), "{dot}");
    assert!(dot.trim_end().ends_with('}'));
    assert!(dot.contains("GET /api/v1/accounts/{id}/balance"), "{dot}");
    let mermaid = precedent(&[
        "sequences",
        "--model",
        model.to_str().unwrap(),
        "--format",
        "mermaid",
    ]);
    assert!(mermaid.status.success(), "{mermaid:?}");
    let mermaid = String::from_utf8(mermaid.stdout).unwrap();
    assert!(mermaid.starts_with("flowchart LR\n"), "{mermaid}");
    assert!(mermaid.contains("-->|"), "{mermaid}");
}

#[test]
fn malformed_lines_are_counted_by_reason_with_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let (mut t, mut rng) = (T0, Lcg(3));
    let reqs = normal_walks(0, 20, &mut t, &mut rng);
    let mut text = combined(&reqs);
    text.insert_str(0, "this is not a log line\n");
    text.push_str("10.0.0.1 - - [garbage] \"GET / HTTP/1.1\" 200 1 \"-\" \"-\"\n");
    text.push_str("10.0.0.2 - - [01/Jan/2026:00:00:00 +0000] \"-\" 400 0 \"-\" \"-\"\n");
    let log = write(dir.path(), "mixed.log", &text);
    let out = precedent(&["replay", log.to_str().unwrap(), "--summary-json"]);
    assert!(out.status.success(), "{out:?}");
    let sum = summary_json(&out);
    assert_eq!(sum["input"]["skipped_total"], 3, "{sum}");
    assert_eq!(sum["engine"]["requests"], reqs.len());
    let examples = sum["input"]["examples"].as_array().unwrap();
    assert_eq!(examples[0]["pos"], 1, "{examples:?}");
    assert_eq!(examples[0]["reason"], "bad_line");
    // The human summary names the reasons and where to look.
    let text_out = precedent(&["replay", log.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&text_out.stderr);
    assert!(err.contains("unparseable    3"), "{err}");
    assert!(err.contains("mixed.log:1 bad_line"), "{err}");
}

#[test]
fn jsonl_session_ids_keep_customers_behind_one_address_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut reqs, warmup) = banking_day();
    // Everyone behind one NAT address: only the session ids tell customers apart.
    for r in &mut reqs {
        r.1 = "198.51.100.1".into();
    }
    let file = write(dir.path(), "export.jsonl", &jsonl(&reqs));
    let out = precedent(&[
        "replay",
        file.to_str().unwrap(),
        "--warmup",
        &warmup.to_string(),
        "--summary-json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let sum = summary_json(&out);
    assert_eq!(sum["engine"]["sessions"], 561, "one session per id");
    let a = alerts(&out);
    let s = signals_of(&a);
    assert!(s.contains(&"missing_precedent".into()), "{a:#?}");
    let sessions: std::collections::BTreeSet<&str> =
        a.iter().filter_map(|x| x["session"].as_str()).collect();
    assert_eq!(sessions.len(), 1, "only the attacker's session: {a:#?}");
    assert!(
        !out.stdout.windows(6).any(|w| w == b"stolen"),
        "raw session id leaked"
    );
}

#[test]
fn enforce_mode_holds_back_the_blocked_clients_later_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (reqs, warmup) = banking_day();
    let log = write(dir.path(), "access.log", &combined(&reqs));
    let out = precedent(&[
        "replay",
        log.to_str().unwrap(),
        "--mode",
        "enforce",
        "--warmup",
        &warmup.to_string(),
        "--summary-json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let a = alerts(&out);
    let blocking: Vec<&Value> = a.iter().filter(|x| x["action"] == "block").collect();
    assert_eq!(blocking.len(), 1, "{a:#?}");
    assert_eq!(blocking[0]["signal"], "missing_precedent");
    assert_eq!(blocking[0]["block_ttl"], "15m");
    let sum = summary_json(&out);
    assert_eq!(sum["engine"]["blocks"], 1);
    assert_eq!(sum["engine"]["blocked_clients"], 1);
    // The attack has 10 requests; the block came at the 3rd, the other 7 never reach the engine.
    assert_eq!(sum["engine"]["blocked_requests"], 7, "{sum}");
    assert_eq!(
        sum["engine"]["requests"].as_u64().unwrap() + 7,
        reqs.len() as u64
    );
    assert!(
        signals_of(&a).iter().all(|s| s != "replay"),
        "the replayed transfers were dropped, so never seen"
    );
}

#[test]
fn missing_input_file_fails_naming_it() {
    let out = precedent(&["replay", "/nonexistent/access.log"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/access.log"), "{err}");
}

#[test]
fn an_unwritable_model_out_fails_before_the_replay_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (reqs, _) = banking_day();
    let log = write(dir.path(), "access.log", &combined(&reqs));
    let target = dir.path().join("missing-dir/model.state");
    let out = precedent(&[
        "replay",
        "--model-out",
        target.to_str().unwrap(),
        log.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--model-out") && err.contains("missing-dir"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "alerts were written: nothing should have run"
    );
    assert!(!err.contains("replay summary"), "{err}");
    // Nothing is left behind where it could write.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

/// The headers a jsonl record carries are read as the daemon reads them from a capture: a
/// configured identifier header keys the session, and behind a trusted proxy the client it
/// names is the one alerted on.
#[test]
fn jsonl_headers_key_sessions_and_name_clients_behind_a_trusted_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "precedent.toml",
        r#"
[session]
identifiers = [{ kind = "header", name = "x-api-key" }]
[proxy]
trusted = ["127.0.0.1/32"]
[[rule]]
id = "transfer-needs-balance"
operation = "POST /api/v1/transferFunds"
preceded_by = ["GET /api/v1/accounts/{id}/balance"]
"#,
    );
    let mut lines = String::new();
    // Two customers behind the proxy, told apart by their API keys; then one who skips the
    // lookup, named by the proxy.
    let mut t = T0;
    for (key, client, paths) in [
        (
            "k-alice",
            "198.51.100.1",
            &["/api/v1/accounts/1/balance", "/api/v1/transferFunds"][..],
        ),
        (
            "k-bob",
            "198.51.100.2",
            &["/api/v1/accounts/2/balance", "/api/v1/transferFunds"],
        ),
        ("k-mallory", "203.0.113.9", &["/api/v1/transferFunds"]),
    ] {
        for p in paths {
            t += 1;
            let method = if p.ends_with("transferFunds") {
                "POST"
            } else {
                "GET"
            };
            let v = serde_json::json!({"ts": t, "client": "127.0.0.1", "method": method, "path": p,
                "headers": {"X-Api-Key": key, "X-Forwarded-For": format!("10.9.9.9, {client}")}});
            let _ = writeln!(lines, "{v}");
        }
    }
    let file = write(dir.path(), "proxied.jsonl", &lines);
    let out = precedent(&[
        "replay",
        file.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--warmup",
        "0",
        "--summary-json",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        summary_json(&out)["engine"]["sessions"],
        3,
        "one session per API key"
    );
    let a = alerts(&out);
    assert_eq!(a.len(), 1, "{a:#?}");
    assert_eq!(a[0]["rule"], "transfer-needs-balance");
    assert_eq!(a[0]["client"], "203.0.113.9");
}
