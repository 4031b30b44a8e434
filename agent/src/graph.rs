//! Pictures of what the engine learned: operations as nodes and their strongest transitions
//! as weighted edges, rendered as Graphviz dot or a Mermaid flowchart.
//!
//! Two views. `transitions`: every first-order transition (A then B), weighted by
//! P(B | A) from the model's order-1 counts. `sequences`: the model's important sequences
//! drawn as paths, each edge weighted by the best precedence score of a sequence it is part
//! of. Both keep only the top edges so the picture stays readable.
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::{discovery::OpId, engine::Engine};

/// Default number of edges drawn.
pub const DEFAULT_EDGES: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GraphView {
    /// First-order transitions by probability (`precedent endpoints --format dot`).
    Transitions,
    /// Edges of the important sequences by precedence score (`precedent sequences --format dot`).
    Sequences,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub view: GraphView,
    pub nodes: Vec<GraphNode>,
    pub edges: Vec<GraphEdge>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphNode {
    pub operation: String,
    /// Requests seen for the operation (discovery's count).
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphEdge {
    pub from: String,
    pub to: String,
    /// Transitions: times B followed A. Sequences: occurrences of the best sequence.
    pub count: u64,
    /// Transitions: P(to | from). Sequences: the best precedence score.
    pub weight: f64,
}

/// The graph of `view` with at most `top` edges, strongest first.
pub fn build(engine: &Engine, view: GraphView, top: usize) -> Graph {
    let edges = match view {
        GraphView::Transitions => transition_edges(engine, top),
        GraphView::Sequences => sequence_edges(engine, top),
    };
    let counts: HashMap<String, u64> = engine
        .discovery()
        .operations()
        .into_iter()
        .filter(|o| o.merged_into.is_none())
        .map(|o| (o.name, o.count))
        .collect();
    let mut nodes: Vec<GraphNode> = Vec::new();
    for e in &edges {
        for op in [&e.from, &e.to] {
            if !nodes.iter().any(|n| &n.operation == op) {
                nodes.push(GraphNode {
                    operation: op.clone(),
                    count: counts.get(op).copied().unwrap_or(0),
                });
            }
        }
    }
    Graph { view, nodes, edges }
}

fn transition_edges(engine: &Engine, top: usize) -> Vec<GraphEdge> {
    let d = engine.discovery();
    let model = engine.model();
    // Operations merged into a template left contexts under their old ids: fold them in.
    let mut pairs: BTreeMap<(OpId, OpId), u64> = BTreeMap::new();
    let mut totals: BTreeMap<OpId, u64> = BTreeMap::new();
    for info in d.operations() {
        let Some(ctx) = model.context(&[info.id.0]) else {
            continue;
        };
        let from = d.canonical(info.id);
        *totals.entry(from).or_default() += u64::from(ctx.n);
        for e in ctx.entries() {
            *pairs.entry((from, d.canonical(OpId(e.next)))).or_default() += u64::from(e.k);
        }
    }
    let name = |id: OpId| d.name(id).unwrap_or("?").to_string();
    let mut edges: Vec<GraphEdge> = pairs
        .into_iter()
        .filter(|&(_, k)| k > 0)
        .map(|((from, to), k)| GraphEdge {
            from: name(from),
            to: name(to),
            count: k,
            weight: k as f64 / totals[&from].max(1) as f64,
        })
        .collect();
    // Strongest first: probability, then support, then names (deterministic output).
    edges.sort_by(|a, b| {
        b.weight
            .total_cmp(&a.weight)
            .then(b.count.cmp(&a.count))
            .then_with(|| (&a.from, &a.to).cmp(&(&b.from, &b.to)))
    });
    edges.truncate(top);
    edges
}

fn sequence_edges(engine: &Engine, top: usize) -> Vec<GraphEdge> {
    // Enough sequences that `top` distinct edges are likely among them.
    let seqs = engine.sequences(top.saturating_mul(4).max(top));
    let mut best: Vec<GraphEdge> = Vec::new();
    for s in &seqs {
        for w in s.ops.windows(2) {
            match best.iter_mut().find(|e| e.from == w[0] && e.to == w[1]) {
                Some(e) => {
                    if s.precedence_score > e.weight {
                        e.weight = s.precedence_score;
                        e.count = u64::from(s.occurrences);
                    }
                }
                None => best.push(GraphEdge {
                    from: w[0].clone(),
                    to: w[1].clone(),
                    count: u64::from(s.occurrences),
                    weight: s.precedence_score,
                }),
            }
        }
    }
    best.sort_by(|a, b| {
        b.weight
            .total_cmp(&a.weight)
            .then(b.count.cmp(&a.count))
            .then_with(|| (&a.from, &a.to).cmp(&(&b.from, &b.to)))
    });
    best.truncate(top);
    best
}

/// A dot string literal: quotes and backslashes escaped, line breaks as `\n`.
fn dot_quote(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => {}
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Mermaid label text: everything that could end the quoted label or be read as markup is
/// written as an entity code (`#quot;`, `#35;`, ...).
fn mermaid_text(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => o.push_str("#quot;"),
            '#' => o.push_str("#35;"),
            '<' => o.push_str("#lt;"),
            '>' => o.push_str("#gt;"),
            '|' => o.push_str("#124;"),
            '`' => o.push_str("#96;"),
            '\n' | '\r' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

fn edge_label(g: &Graph, e: &GraphEdge) -> String {
    match g.view {
        GraphView::Transitions => format!("{:.2} ({})", e.weight, e.count),
        GraphView::Sequences => format!("{:.2} ({}x)", e.weight, e.count),
    }
}

fn node_index(g: &Graph) -> HashMap<&str, usize> {
    g.nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.operation.as_str(), i))
        .collect()
}

/// Graphviz dot: `digraph`, nodes `n0..` labelled with the operation, edges labelled with
/// their weight and count, pen width growing with the weight.
pub fn to_dot(g: &Graph) -> String {
    use std::fmt::Write as _;
    let ix = node_index(g);
    let mut o = String::new();
    let name = match g.view {
        GraphView::Transitions => "transitions",
        GraphView::Sequences => "sequences",
    };
    let _ = writeln!(o, "digraph {name} {{");
    let _ = writeln!(o, "  rankdir=LR;");
    let _ = writeln!(o, "  node [shape=box, fontname=\"monospace\"];");
    for (i, n) in g.nodes.iter().enumerate() {
        let _ = writeln!(
            o,
            "  n{i} [label={}];",
            dot_quote(&format!("{}\n{} requests", n.operation, n.count))
        );
    }
    for e in &g.edges {
        let _ = writeln!(
            o,
            "  n{} -> n{} [label={}, penwidth={:.1}];",
            ix[e.from.as_str()],
            ix[e.to.as_str()],
            dot_quote(&edge_label(g, e)),
            1.0 + 4.0 * e.weight.clamp(0.0, 1.0)
        );
    }
    o.push_str("}\n");
    o
}

/// Mermaid `flowchart LR`: nodes `n0..` with quoted labels, one `-->|"label"|` line per edge.
pub fn to_mermaid(g: &Graph) -> String {
    use std::fmt::Write as _;
    let ix = node_index(g);
    let mut o = String::from("flowchart LR\n");
    for (i, n) in g.nodes.iter().enumerate() {
        let _ = writeln!(o, "  n{i}[\"{}\"]", mermaid_text(&n.operation));
    }
    for e in &g.edges {
        let _ = writeln!(
            o,
            "  n{} -->|\"{}\"| n{}",
            ix[e.from.as_str()],
            mermaid_text(&edge_label(g, e)),
            ix[e.to.as_str()]
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{decide::Mode, engine::EngineConfig, http::Method, rules::RuleFile};

    /// Every customer logs in, lists accounts, looks at a balance, then transfers (2 in 3)
    /// or logs out.
    fn trained() -> Engine {
        let mut e = Engine::new(
            &EngineConfig::default(),
            RuleFile::default(),
            [3; 16],
            Mode::Learn,
        )
        .unwrap();
        let client: IpAddr = "10.0.0.1".parse().unwrap();
        let mut t = 1_000_000_000_000u64;
        for i in 0..300u64 {
            let sid = format!("s{i}");
            let mut walk = vec![
                (Method::Post, "/login".to_string()),
                (Method::Get, format!("/users/{}/accounts", 1000 + i)),
                (Method::Get, format!("/accounts/{}/balance", 5000 + i)),
            ];
            walk.push(if i % 3 == 0 {
                (Method::Post, "/logout".to_string())
            } else {
                (Method::Post, "/transfer \"now\"".to_string())
            });
            for (m, p) in walk {
                t += 1_000_000_000;
                e.on_request_in_session(t, client, m, None, &p, &sid, 0);
            }
            t += 700_000_000_000;
            e.maintain(t);
        }
        e
    }

    /// Balanced braces outside quoted strings, and no unterminated string.
    fn dot_is_balanced(s: &str) -> bool {
        let (mut depth, mut in_str, mut esc) = (0i32, false, false);
        for c in s.chars() {
            if in_str {
                match (esc, c) {
                    (true, _) => esc = false,
                    (false, '\\') => esc = true,
                    (false, '"') => in_str = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => in_str = true,
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if depth < 0 {
                return false;
            }
        }
        depth == 0 && !in_str
    }

    #[test]
    fn transitions_carry_the_learned_probabilities() {
        let e = trained();
        let g = build(&e, GraphView::Transitions, 10);
        let edge = |from: &str, to: &str| {
            g.edges
                .iter()
                .find(|x| x.from == from && x.to == to)
                .unwrap_or_else(|| panic!("no edge {from} -> {to}: {g:#?}"))
        };
        let login_accounts = edge("POST /login", "GET /users/{id}/accounts");
        assert!(login_accounts.weight > 0.99, "{login_accounts:?}");
        let to_transfer = edge("GET /accounts/{id}/balance", "POST /transfer \"now\"");
        assert!(
            (to_transfer.weight - 2.0 / 3.0).abs() < 0.02,
            "{to_transfer:?}"
        );
        assert!(g.edges.windows(2).all(|w| w[0].weight >= w[1].weight));
        assert_eq!(build(&e, GraphView::Transitions, 2).edges.len(), 2);
    }

    #[test]
    fn dot_output_is_structurally_valid_with_escaped_names() {
        let e = trained();
        for view in [GraphView::Transitions, GraphView::Sequences] {
            let g = build(&e, view, 10);
            assert!(!g.edges.is_empty(), "{view:?} has edges");
            let dot = to_dot(&g);
            assert!(dot.starts_with("digraph "), "{dot}");
            assert!(dot_is_balanced(&dot), "{dot}");
            let edge_lines = dot.lines().filter(|l| l.contains(" -> ")).count();
            assert_eq!(edge_lines, g.edges.len(), "{dot}");
            assert_eq!(
                dot.lines().filter(|l| l.contains("[label=")).count(),
                g.nodes.len() + g.edges.len()
            );
            if view == GraphView::Transitions {
                assert!(dot.contains(r#"POST /transfer \"now\""#), "{dot}");
                assert!(dot.contains("GET /accounts/{id}/balance"), "{dot}");
            }
        }
    }

    #[test]
    fn mermaid_output_has_one_line_per_edge_and_no_raw_quotes_in_labels() {
        let e = trained();
        let g = build(&e, GraphView::Transitions, 10);
        let m = to_mermaid(&g);
        assert!(m.starts_with("flowchart LR\n"));
        assert_eq!(
            m.lines().filter(|l| l.contains("-->")).count(),
            g.edges.len()
        );
        for line in m.lines().skip(1) {
            // Every label is exactly one quoted string: two quotes per line.
            assert_eq!(line.matches('"').count(), 2, "{line}");
        }
        assert!(m.contains("POST /transfer #quot;now#quot;"), "{m}");
        assert!(m.contains("GET /users/{id}/accounts"), "{m}");
    }

    #[test]
    fn graph_round_trips_through_json() {
        let g = build(&trained(), GraphView::Sequences, 5);
        let back: Graph = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(back, g);
    }
}
