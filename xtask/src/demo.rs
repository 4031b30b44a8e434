//! `cargo xtask demo`: the whole story on a private network. Customers of a small banking API
//! walk through it while precedent learns; then an attacker runs the attacks from the
//! Sequence Analytics announcement (a transfer with no balance lookup, a replayed transfer,
//! account enumeration) and is blocked while the customers carry on.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use precedent_tests::{Daemon, HttpServer, TestNet, connect_from};

use crate::{build_agent, is_root, setup, step};

const PORT: u16 = 8080;
const LEARNING_CUSTOMERS: u64 = 400;

/// An attack: what it is, and its requests (method, path).
type Attack = (&'static str, Vec<(&'static str, String)>);

/// The announcement's three attacks, shared by the live demo and the replay.
fn attacks() -> [Attack; 3] {
    [
        (
            "a transfer with no balance lookup before it",
            vec![
                ("POST", "/api/v1/auth".into()),
                ("GET", "/api/v1/users/77/accounts".into()),
                ("POST", "/api/v1/transferFunds".into()),
            ],
        ),
        (
            "the same transfer replayed three times",
            vec![
                ("POST", "/api/v1/auth".into()),
                ("GET", "/api/v1/users/78/accounts".into()),
                ("GET", "/api/v1/accounts/9001/balance".into()),
                ("POST", "/api/v1/transferFunds".into()),
                ("POST", "/api/v1/transferFunds".into()),
                ("POST", "/api/v1/transferFunds".into()),
            ],
        ),
        (
            "enumerating account balances one id after another",
            std::iter::once(("POST", "/api/v1/auth".to_string()))
                .chain((7000..7030).map(|id| ("GET", format!("/api/v1/accounts/{id}/balance"))))
                .collect(),
        ),
    ]
}

/// The banking API the customers use (the seeds' endpoints).
fn bank(method: &str, path: &str) -> (u16, String) {
    let segs: Vec<&str> = path
        .split('?')
        .next()
        .unwrap_or("")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match (method, segs.as_slice()) {
        ("POST", ["api", "v1", "auth"]) => (200, r#"{"token":"issued"}"#.into()),
        ("POST", ["api", "v1", "logout"]) => (200, "{}".into()),
        ("GET", ["api", "v1", "users", id, "accounts"]) => {
            (200, format!(r#"{{"user":{id},"accounts":[1]}}"#))
        }
        ("GET", ["api", "v1", "accounts", id, "balance"]) => {
            (200, format!(r#"{{"account":{id},"balance":1200}}"#))
        }
        ("GET", ["api", "v1", "accounts", id, "transactions"]) => {
            (200, format!(r#"{{"account":{id},"transactions":[]}}"#))
        }
        ("POST", ["api", "v1", "transferFunds"]) => (200, r#"{"status":"done"}"#.into()),
        _ => (404, r#"{"error":"not found"}"#.into()),
    }
}

pub fn run(offline: bool) -> anyhow::Result<()> {
    setup::ensure()?;
    let bin = build_agent()?;
    if offline {
        return replay_story(&bin);
    }
    if !is_root() {
        eprintln!(
            "not root: the live demo attaches XDP in private network namespaces; running the same story through `precedent replay` instead"
        );
        return replay_story(&bin);
    }

    step(
        "network: customers in namespace prec-demo (10.231.99.2), attackers in prec-demoatk (10.231.98.2-4)",
    );
    let customers = TestNet::new("demo", 99)?;
    let attackers = TestNet::new("demoatk", 98)?;
    for a in ["10.231.98.3", "10.231.98.4"] {
        attackers.add_ns_address(a.parse()?)?;
    }
    let server = HttpServer::start_with(SocketAddr::from(([0, 0, 0, 0], PORT)), bank)?;
    step(&format!(
        "banking API on port {PORT} (host side): auth, users/{{id}}/accounts, accounts/{{id}}/balance, transferFunds"
    ));

    let dir = std::env::temp_dir().join(format!("precedent-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("precedent.toml");
    std::fs::write(
        &config,
        format!(
            "mode = \"learn\"\ninterfaces = [\"{}\", \"{}\"]\nports = [{PORT}]\nlog_format = \"text\"\n",
            customers.host_if, attackers.host_if
        ),
    )?;
    step(&format!(
        "precedent daemon --config {} (mode learn, two interfaces)",
        config.display()
    ));
    let daemon = Daemon::start(&bin, &["daemon", "--config", &config.display().to_string()])?;
    let socket = daemon.socket().context("daemon socket")?;
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(&bin)
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "precedent {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };

    let target = SocketAddr::new(customers.host_ip.into(), PORT);
    step(&format!(
        "phase 1: {LEARNING_CUSTOMERS} customers sign in, check balances, transfer money, sign out"
    ));
    let served = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    walk_customers(
        &customers.ns,
        target,
        0..LEARNING_CUSTOMERS,
        served.clone(),
        failed.clone(),
    )?;
    println!(
        "    {} requests served, {} failed",
        served.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    // Give the model a few upkeep rounds (sessions end, contexts collapse).
    std::thread::sleep(Duration::from_secs(3));

    println!(
        "\nWhat precedent discovered (precedent endpoints):\n{}",
        indent(&cli(&["endpoints"])?)
    );
    println!(
        "How customers walk through it (precedent sequences --top 8):\n{}",
        indent(&cli(&["sequences", "--top", "8"])?)
    );

    step("phase 2: precedent mode enforce; customers keep coming while an attacker strikes");
    cli(&["mode", "enforce"])?;
    let (served2, failed2) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let background = {
        let (ns, s, f) = (customers.ns.clone(), served2.clone(), failed2.clone());
        std::thread::spawn(move || {
            walk_customers(
                &ns,
                target,
                LEARNING_CUSTOMERS..LEARNING_CUSTOMERS + 150,
                s,
                f,
            )
        })
    };

    let attack_target = SocketAddr::new(attackers.host_ip.into(), PORT);
    let sources = ["10.231.98.2", "10.231.98.3", "10.231.98.4"];
    let attacks = attacks()
        .into_iter()
        .zip(sources)
        .map(|((what, requests), source)| (what, source, requests));
    let mut blocked_attackers = 0;
    let mut alert_count = 0;
    for (i, (what, source, requests)) in attacks.enumerate() {
        println!("\n  attack {}: {what} (from {source})", i + 1);
        let src: IpAddr = source.parse()?;
        let token = format!("stolen-{i}");
        let outcome = attackers.run_in_ns(move || {
            let mut answered = 0;
            for (m, p) in &requests {
                if request_from(src, attack_target, &token, m, p).is_ok() {
                    answered += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(300));
            // One more, innocent-looking request: does it still get through?
            let after = request_from(
                src,
                attack_target,
                &token,
                "GET",
                "/api/v1/users/77/accounts",
            );
            (answered, requests.len(), after.is_ok())
        })?;
        let (answered, sent, still_served) = outcome;
        for line in drain(&daemon) {
            alert_count += 1;
            print_alert(&line);
        }
        if still_served {
            println!("    attacker still served ({answered}/{sent} attack requests answered)");
        } else {
            blocked_attackers += 1;
            println!(
                "    {answered}/{sent} attack requests answered before the block; {source} is now dropped in the kernel"
            );
        }
    }
    background
        .join()
        .map_err(|_| anyhow::anyhow!("customer traffic thread panicked"))??;

    println!(
        "\nBlocked clients (precedent blocks list):\n{}",
        indent(&cli(&["blocks", "list"])?)
    );
    let status: serde_json::Value = serde_json::from_str(&cli(&["status", "--json"])?)?;
    println!("Summary");
    println!(
        "  customers in phase 2: {} requests served, {} failed",
        served2.load(Ordering::Relaxed),
        failed2.load(Ordering::Relaxed)
    );
    println!("  attackers blocked: {blocked_attackers} of 3; alerts: {alert_count}");
    println!(
        "  requests analysed: {}, operations: {}, sessions live: {}, packets dropped in XDP: {}",
        status["userspace_counters"]["requests"],
        status["endpoints"],
        status["sessions_live"],
        status["kernel_counters"]["blocked"]
    );
    println!("  API requests served in total: {}", server.served());
    drop(daemon);
    drop(customers);
    drop(attackers);
    let _ = std::fs::remove_dir_all(&dir);
    step("stopped the daemon, removed the namespaces and veth pairs");
    anyhow::ensure!(
        failed2.load(Ordering::Relaxed) == 0,
        "customers were refused during the attack"
    );
    anyhow::ensure!(blocked_attackers == 3, "not every attacker was blocked");
    Ok(())
}

/// The story without root: the same customers and attacks written as an access log (combined
/// format, one address per client) and run through `precedent replay` in enforce mode.
fn replay_story(bin: &std::path::Path) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("precedent-demo-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("access.log");
    let mut lines = Vec::new();
    let mut t: u64 = 1_795_000_000; // traffic time, Unix seconds
    let customer_walk = |lines: &mut Vec<String>, i: u64, t: &mut u64| {
        let client = format!("10.1.{}.{}", i / 200, i % 200 + 1);
        for (m, p) in customer_requests(i) {
            *t += 1;
            log_line(lines, &client, m, &p, *t);
        }
        *t += 30;
    };
    for i in 0..LEARNING_CUSTOMERS {
        customer_walk(&mut lines, i, &mut t);
    }
    let learning = lines.len();
    let clients = ["203.0.113.2", "203.0.113.3", "203.0.113.4"];
    for (k, ((_, requests), client)) in attacks().iter().zip(clients).enumerate() {
        for i in 0..50 {
            customer_walk(&mut lines, LEARNING_CUSTOMERS + k as u64 * 50 + i, &mut t);
        }
        for (m, p) in requests {
            t += 1;
            log_line(&mut lines, client, m, p, t);
        }
    }
    std::fs::write(&log, lines.join("\n") + "\n")?;
    step(&format!(
        "precedent replay {} --mode enforce --warmup {learning}  ({} lines: {LEARNING_CUSTOMERS} customers to learn from, then customers and three attackers)",
        log.display(),
        lines.len()
    ));
    let out = Command::new(bin)
        .arg("replay")
        .arg(&log)
        .args([
            "--mode",
            "enforce",
            "--warmup",
            &learning.to_string(),
            "--no-progress",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(out.status.success(), "precedent replay failed");
    let alerts: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    println!("\nAlerts ({}):", alerts.len());
    for a in &alerts {
        print_alert(a);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let blocked: std::collections::BTreeSet<&str> = alerts
        .iter()
        .filter(|a| a["action"] == "block")
        .filter_map(|a| a["client"].as_str())
        .collect();
    println!(
        "\nblocked in enforce mode: {}",
        blocked.iter().copied().collect::<Vec<_>>().join(", ")
    );
    anyhow::ensure!(
        blocked.iter().all(|c| c.starts_with("203.0.113.")),
        "a customer would have been blocked"
    );
    anyhow::ensure!(
        blocked.len() == 3,
        "not every attacker would have been blocked"
    );
    Ok(())
}

/// One combined-format access log line at Unix second `t`.
fn log_line(lines: &mut Vec<String>, client: &str, method: &str, path: &str, t: u64) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (days, rem) = (t / 86_400, t % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    lines.push(format!(
        "{client} - - [{d:02}/{}/{y}:{:02}:{:02}:{:02} +0000] \"{method} {path} HTTP/1.1\" 200 42 \"-\" \"demo\"",
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ));
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Customers `ids` walk the API (4 at a time), each on its own keep-alive connection.
fn walk_customers(
    ns: &str,
    target: SocketAddr,
    ids: std::ops::Range<u64>,
    served: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let ids: Vec<u64> = ids.collect();
    let chunks: Vec<Vec<u64>> = ids
        .chunks(ids.len().div_ceil(4).max(1))
        .map(<[u64]>::to_vec)
        .collect();
    precedent_tests::netns::run_in(ns, move || {
        let threads: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let (s, f) = (served.clone(), failed.clone());
                std::thread::spawn(move || {
                    for i in chunk {
                        match customer(target, i) {
                            Ok(n) => s.fetch_add(n, Ordering::Relaxed),
                            Err(_) => f.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
    })
}

/// One customer's visit; returns the number of requests served.
fn customer(target: SocketAddr, i: u64) -> std::io::Result<u64> {
    let walk = customer_requests(i);
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let token = format!("customer-{i}");
    for (m, p) in &walk {
        exchange(&mut s, &token, m, p, false)?;
    }
    Ok(walk.len() as u64)
}

/// What customer `i` requests: sign in, list accounts, look at balances, maybe transfer (always
/// after a balance lookup), maybe look at transactions, sign out.
fn customer_requests(i: u64) -> Vec<(&'static str, String)> {
    let mut rng = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut roll = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let (user, acct) = (100 + i, 5000 + i * 3);
    let mut walk = vec![
        ("POST", "/api/v1/auth".to_string()),
        ("GET", format!("/api/v1/users/{user}/accounts")),
    ];
    for a in 0..=roll(2) {
        walk.push(("GET", format!("/api/v1/accounts/{}/balance", acct + a)));
    }
    if roll(10) < 6 {
        walk.push(("POST", "/api/v1/transferFunds".into()));
        walk.push(("GET", format!("/api/v1/accounts/{acct}/balance")));
    }
    if roll(10) < 4 {
        walk.push(("GET", format!("/api/v1/accounts/{acct}/transactions")));
    }
    walk.push(("POST", "/api/v1/logout".into()));
    walk
}

fn request_from(
    src: IpAddr,
    target: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
) -> std::io::Result<String> {
    let mut s = connect_from(src, target, Duration::from_millis(700))?;
    exchange(&mut s, token, method, path, true)
}

/// Sends one request and reads the whole response; returns its status line.
fn exchange(
    s: &mut TcpStream,
    token: &str,
    method: &str,
    path: &str,
    close: bool,
) -> std::io::Result<String> {
    let body = if method == "POST" {
        r#"{"amount":100}"#
    } else {
        ""
    };
    let conn = if close { "close" } else { "keep-alive" };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: bank.demo\r\nAuthorization: Bearer {token}\r\nConnection: {conn}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b)?;
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let len: usize = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    s.read_exact(&mut body)?;
    Ok(text.lines().next().unwrap_or_default().to_string())
}

/// Alert lines the daemon printed so far.
fn drain(daemon: &Daemon) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while let Some(line) = daemon.next_line(Duration::from_millis(500)) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            out.push(v);
        }
    }
    out
}

fn print_alert(a: &serde_json::Value) {
    let what = a["signal"].as_str().or(a["rule"].as_str()).unwrap_or("?");
    let action = a["action"].as_str().unwrap_or("?");
    let ttl = a["block_ttl"]
        .as_str()
        .map(|t| format!(" for {t}"))
        .unwrap_or_default();
    println!(
        "    ALERT {what} -> {action}{ttl}  client {}  session {}",
        a["client"].as_str().unwrap_or("?"),
        a["session"].as_str().unwrap_or("?")
    );
    println!(
        "      {} after [{}]",
        a["operation"].as_str().unwrap_or("?"),
        a["previous"]
            .as_array()
            .map(|p| p
                .iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(" -> "))
            .unwrap_or_default()
    );
    println!("      {}", a["explanation"].as_str().unwrap_or(""));
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
