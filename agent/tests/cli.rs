//! The control subcommands as an operator runs them: the built `precedent` binary against a
//! stand-in daemon (the real control server with canned engine answers). No root needed.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use precedent::control::{
    ControlRequest, ControlServer, Mode, Request, Response, ServerConfig,
    api::{BlockRow, Interval, ModeReport, RuleRow, RuleSource, RuleSuggestions, SequenceRow},
};
use precedent::graph::{Graph, GraphEdge, GraphNode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn answer(req: &Request) -> Response {
    match req {
        Request::Sequences { top } => Response::ok(
            (0..*top.min(&2))
                .map(|i| SequenceRow {
                    ops: vec!["GET /balance".into(), format!("POST /transfer{i}")],
                    occurrences: 100 + i as u64,
                    precedence_score: 0.97,
                    interval: Interval {
                        lower: 0.95,
                        upper: 0.99,
                    },
                })
                .collect::<Vec<_>>(),
        ),
        Request::BlocksList => Response::ok(vec![BlockRow {
            net: "192.0.2.7/32".parse().unwrap(),
            remaining_secs: 600,
            dropped: 12,
            reason: Some("transfer-needs-balance".into()),
        }]),
        Request::ModeSet { mode } => Response::ok(ModeReport {
            mode: *mode,
            previous: Some(Mode::Learn),
        }),
        Request::RulesRemove { id } => Response::error(format!("no rule with id {id:?}")),
        Request::RulesSuggest { .. } => {
            let rule = precedent::rules::Rule {
                id: "suggested-post-transfer".into(),
                operation: "POST /transfer".into(),
                preceded_by: vec!["GET /balance".into()],
                within_ops: None,
                within: None,
                max_repeats: None,
                action: precedent::rules::Action::Log,
                block_ttl: None,
            };
            Response::ok(RuleSuggestions {
                rules: vec![RuleRow::from_rule(&rule, RuleSource::Runtime, 0)],
                toml: "[[rule]]\nid = \"suggested-post-transfer\"\n".into(),
            })
        }
        Request::Graph { view, top } => Response::ok(Graph {
            view: *view,
            nodes: ["GET /accounts/{id}/balance", "POST /transfer"]
                .map(|op| GraphNode {
                    operation: op.into(),
                    count: 10,
                })
                .to_vec(),
            edges: vec![GraphEdge {
                from: "GET /accounts/{id}/balance".into(),
                to: "POST /transfer".into(),
                count: 9,
                weight: 0.9,
            }]
            .into_iter()
            .take(*top)
            .collect(),
        }),
        _ => Response::error("not in this test"),
    }
}

struct FakeDaemon {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    stop: CancellationToken,
    /// Runs the stand-in; dropping it stops the server.
    _rt: tokio::runtime::Runtime,
}

impl FakeDaemon {
    fn start() -> FakeDaemon {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let stop = CancellationToken::new();
        let server = rt
            .block_on(async {
                ControlServer::bind(ServerConfig {
                    socket: socket.clone(),
                    ..ServerConfig::default()
                })
            })
            .unwrap();
        let (tx, mut rx) = mpsc::channel::<ControlRequest>(4);
        rt.spawn(server.run(tx, stop.clone()));
        rt.spawn(async move {
            while let Some(r) = rx.recv().await {
                let resp = answer(&r.request);
                r.respond(resp);
            }
        });
        FakeDaemon {
            _dir: dir,
            socket,
            stop,
            _rt: rt,
        }
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn precedent(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_precedent"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn not_running_daemon_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    for args in [
        &["status"][..],
        &["rules", "list"],
        &["blocks", "list", "--json"],
        &["mode"],
    ] {
        let (code, out, err) = precedent(&socket, args);
        assert_eq!(code, 1, "{args:?}");
        assert_eq!(out, "");
        assert_eq!(
            err,
            format!(
                "precedent daemon is not running (socket {} not found)\n",
                socket.display()
            ),
            "{args:?}"
        );
    }
}

#[test]
fn tables_by_default_and_data_with_json() {
    let d = FakeDaemon::start();
    let (code, out, err) = precedent(&d.socket, &["sequences", "--top", "5"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].contains("SCORE") && lines[0].contains("SEQUENCE"),
        "{out}"
    );
    assert!(
        lines[1].contains("0.97") && lines[1].contains("GET /balance → POST /transfer0"),
        "{out}"
    );

    let (code, out, _) = precedent(&d.socket, &["blocks", "list", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["net"], "192.0.2.7/32");
    assert_eq!(v[0]["remaining_secs"], 600);

    let (code, out, _) = precedent(&d.socket, &["blocks", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("192.0.2.7/32")
            && out.contains("10m")
            && out.contains("transfer-needs-balance"),
        "{out}"
    );

    let (code, out, _) = precedent(&d.socket, &["mode", "enforce"]);
    assert_eq!(code, 0);
    assert_eq!(out, "mode: enforce (was learn)\n");
}

#[test]
fn suggestions_show_the_rule_and_the_toml_to_save_without_hits_or_source() {
    let d = FakeDaemon::start();
    let (code, out, err) = precedent(&d.socket, &["rules", "suggest"]);
    assert_eq!(code, 0, "{err}");
    let header = out.lines().next().unwrap();
    assert!(header.contains("ID") && header.contains("RULE"), "{out}");
    assert!(
        !header.contains("HITS") && !header.contains("SOURCE"),
        "{out}"
    );
    assert!(out.contains("POST /transfer after GET /balance"), "{out}");
    assert!(out.contains("precedent rules add FILE\n[[rule]]"), "{out}");
}

#[test]
fn daemon_refusal_is_reported_with_exit_1() {
    let d = FakeDaemon::start();
    let (code, out, err) = precedent(&d.socket, &["rules", "remove", "nope"]);
    assert_eq!(code, 1);
    assert_eq!(out, "");
    assert_eq!(err, "precedent rules remove: no rule with id \"nope\"\n");
}

#[test]
fn pictures_come_from_the_daemon_graph_request() {
    let d = FakeDaemon::start();
    let (code, out, err) = precedent(&d.socket, &["sequences", "--format", "dot"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("digraph sequences {"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains(" -> ")).count(),
        1,
        "{out}"
    );
    assert!(out.contains("label=\"0.90 (9x)\""), "{out}");
    let (code, out, err) = precedent(&d.socket, &["endpoints", "--format", "mermaid"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("flowchart LR\n"), "{out}");
    assert!(out.contains("n0 -->|\"0.90 (9)\"| n1"), "{out}");
    assert!(out.contains("n0[\"GET /accounts/{id}/balance\"]"), "{out}");
}
