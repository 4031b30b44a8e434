//! `precedent replay` on a real access log: the first 211 lines of the Apache combined-format
//! sample in elastic/examples (see tests/data/README.md), replayed by the binary an operator
//! runs. No root needed, but like the other tests here it runs the built `precedent` binary,
//! so it is ignored by a plain `cargo test` and run by `cargo xtask test`.
use std::{collections::BTreeSet, path::Path, process::Command};

use precedent_tests::{precedent_bin, precedent_ok};

fn real_log() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/apache_logs_head.log");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The pretty JSON summary `--summary-json` prints on stderr (logs may surround it).
fn summary_json(stderr: &str) -> serde_json::Value {
    let lines: Vec<&str> = stderr.lines().collect();
    let start = lines.iter().position(|l| *l == "{").expect("summary JSON");
    let end = start + lines[start..].iter().position(|l| *l == "}").expect("end");
    serde_json::from_str(&lines[start..=end].join("\n")).unwrap()
}

#[test]
#[ignore = "runs the precedent binary: run with `cargo xtask test`"]
fn a_real_combined_log_replays_end_to_end() {
    let log = real_log();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 211, "the committed sample");
    // Three damaged lines of the kinds real logs hold, between real ones (lines 51-53 of the
    // replayed file): a torn write, a bad timestamp, and a connection that sent no request.
    let damaged = [
        "83.149.9.216 - - [17/May/2015:10:05:0",
        "83.149.9.216 - - [17/Mai/2015:10:05:03 +0000] \"GET / HTTP/1.1\" 200 1 \"-\" \"-\"",
        "83.149.9.216 - - [17/May/2015:10:05:03 +0000] \"-\" 408 0 \"-\" \"-\"",
    ];
    let mut input: Vec<&str> = lines[..50].to_vec();
    input.extend(damaged);
    input.extend(&lines[50..]);
    let dir = std::env::temp_dir().join(format!("precedent-replay-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("access.log");
    std::fs::write(&file, input.join("\n") + "\n").unwrap();
    let model = dir.join("model.state");
    // An operator's rule that real browsers break now and then: the page's second stylesheet
    // without the first one before it (this log's entries are not in time order within a
    // minute either, see below).
    let config = dir.join("precedent.toml");
    std::fs::write(
        &config,
        "[[rule]]\nid = \"style-after-reset\"\noperation = \"GET /style2.css\"\npreceded_by = [\"GET /reset.css\"]\naction = \"log\"\n",
    )
    .unwrap();
    let replay = |extra: &[&str]| {
        let out = Command::new(precedent_bin())
            .arg("replay")
            .arg(&file)
            .arg("--config")
            .arg(&config)
            .args(["--mode", "detect", "--warmup", "50", "--summary-json"])
            .arg("--no-progress")
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "replay failed: {stderr}");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            summary_json(&stderr),
        )
    };

    // This server logged entries up to a minute out of order (the seconds within each minute
    // are shuffled): with the default 10 s reorder window the stragglers are late, counted and
    // dropped, never silently lost.
    let (_, s) = replay(&[]);
    let late = s["input"]["late"].as_u64().unwrap();
    assert!(late > 0, "{}", s["input"]);
    assert_eq!(s["input"]["records"].as_u64().unwrap() + late, 211);

    let (stdout, s) = replay(&[
        "--reorder-window",
        "60s",
        "--model-out",
        &model.display().to_string(),
    ]);

    // Input: auto-detected as combined; every real line is a request, the damaged ones are
    // counted by reason and skipped.
    let input = &s["input"];
    assert_eq!(input["late"], 0, "{input}");
    assert_eq!(input["files"][0]["format"], "combined", "{input}");
    assert_eq!(input["records"], 211);
    assert_eq!(input["skipped_total"], 3, "{input}");
    for reason in ["bad_line", "bad_timestamp", "no_request_line"] {
        assert_eq!(input["skipped"][reason], 1, "{reason}: {input}");
    }
    let examples: BTreeSet<u64> = input["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pos"].as_u64().unwrap())
        .collect();
    assert_eq!(examples, BTreeSet::from([51, 52, 53]), "line numbers shown");

    // Engine: all 211 requests processed; sessions are per client (no identifier headers in an
    // access log) and split when a client is idle past the timeout, so at least one per client.
    let engine = &s["engine"];
    assert_eq!(engine["requests"], 211);
    let clients: BTreeSet<&str> = lines.iter().map(|l| l.split(' ').next().unwrap()).collect();
    let sessions = engine["sessions"].as_u64().unwrap();
    assert!(
        sessions >= clients.len() as u64 && sessions <= 211,
        "{sessions} sessions for {} clients",
        clients.len()
    );
    assert_eq!(engine["warmup"], 50);
    assert_eq!(engine["mode"], "detect");

    // Alerts: one JSON line each on stdout, the daemon's format, counted in the summary. The
    // model's signals stay quiet on 200 requests of ordinary browsing; the rule fires.
    let alerts: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(alerts.len() as u64, engine["alerts"].as_u64().unwrap());
    assert!(!alerts.is_empty(), "the rule never fired");
    for a in &alerts {
        assert_eq!(a["kind"], "rule", "{a}");
        assert_eq!(a["rule"], "style-after-reset", "{a}");
        assert_eq!(a["operation"], "GET /style2.css", "{a}");
        // Its client did fetch the stylesheet in this log.
        let needle = format!("{} - - ", a["client"].as_str().unwrap());
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&needle) && l.contains("\"GET /style2.css ")),
            "{a}"
        );
        for field in [
            "ts",
            "kind",
            "action",
            "session",
            "client",
            "operation",
            "numbers",
        ] {
            assert!(a.get(field).is_some(), "alert lacks {field}: {a}");
        }
        assert_eq!(a["mode"], "detect");
        assert!(clients.contains(a["client"].as_str().unwrap()), "{a}");
        assert!(!a["explanation"].as_str().unwrap().is_empty(), "{a}");
    }

    // Discovery, read back from the model file replay wrote: the site's fixed assets are
    // operations of their own, with exactly as many requests as the log has for them.
    let stdout = precedent_ok(&[
        "endpoints".as_ref(),
        "--json".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
    ]);
    let ops: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        engine["operations"].as_u64().unwrap(),
        ops.len() as u64,
        "{ops:?}"
    );
    let requests_for = |path: &str| {
        let needle = format!("\"GET {path} HTTP/");
        lines.iter().filter(|l| l.contains(&needle)).count() as u64
    };
    for path in ["/favicon.ico", "/reset.css", "/style2.css", "/robots.txt"] {
        let name = format!("GET {path}");
        let op = ops
            .iter()
            .find(|o| o["name"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} not discovered: {ops:?}"));
        assert_eq!(op["count"].as_u64(), Some(requests_for(path)), "{op}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
