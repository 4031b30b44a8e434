//! Control subcommands: each file turns its arguments into one control request and renders
//! the daemon's answer, as a table by default or as the raw `data` payload with `--json`.
//! `generate` is the exception: completions and the man page, which need no daemon.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use comfy_table::{CellAlignment, Table, presets};
use precedent::control::{ControlClient, DEFAULT_SOCKET, Request};
use serde::de::DeserializeOwned;
use serde_json::Value;

pub mod blocks;
pub mod endpoints;
pub mod generate;
pub mod mode;
pub mod model;
pub mod replay;
pub mod rules;
pub mod sequences;
pub mod sessions;
pub mod status;

/// Options every control subcommand takes.
#[derive(Args, Debug, Clone)]
pub struct ControlArgs {
    /// Control socket of the running daemon.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET, global = true)]
    pub socket: PathBuf,
    /// Print the reply's data as JSON (for scripts) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// An error whose message is already the whole story (daemon not running, refused, ...):
/// main prints it alone on one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Plain(pub String);

/// Sends `request` and returns the reply's data; transport failures and daemon refusals
/// become one-line errors.
pub fn call(args: &ControlArgs, request: Request) -> anyhow::Result<Value> {
    let response = ControlClient::new(&args.socket)
        .request(&request)
        .map_err(|e| Plain(e.to_string()))?;
    response
        .into_result()
        .map_err(|e| Plain(format!("precedent {}: {e}", typed_as(&request))).into())
}

/// The command as the user typed it (`blocks add`), not its wire name (`blocks_add`).
fn typed_as(request: &Request) -> String {
    match request {
        Request::ModeGet | Request::ModeSet { .. } => "mode".into(),
        other => other.cmd().replace('_', " "),
    }
}

/// [`call`], then `--json` prints the data as is; otherwise it is decoded as `T` for `render`.
pub fn run<T: DeserializeOwned>(
    args: &ControlArgs,
    request: Request,
    render: impl FnOnce(T) -> String,
) -> anyhow::Result<()> {
    let data = call(args, request)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    let typed: T = serde_json::from_value(data)
        .context("the daemon's reply does not match this precedent version")?;
    let out = render(typed);
    if !out.is_empty() {
        println!("{}", out.trim_end());
    }
    Ok(())
}

/// A borderless table with aligned columns; `right` lists the numeric columns.
pub fn table(header: &[&str], right: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_header(header.to_vec());
    for &i in right {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// `12m 5s` style, for TTLs and uptimes.
pub fn secs(s: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(s)).to_string()
}

/// `3m ago`, coarse, for last-seen columns.
pub fn ago(t: std::time::SystemTime) -> String {
    match std::time::SystemTime::now().duration_since(t) {
        Ok(d) => {
            let s = d.as_secs();
            let rounded = match s {
                0..60 => s,
                60..3600 => s / 60 * 60,
                _ => s / 3600 * 3600,
            };
            format!("{} ago", secs(rounded))
        }
        Err(_) => "just now".into(),
    }
}

pub fn empty_note(what: &str) -> String {
    format!("(no {what})")
}

/// How `sequences` and `endpoints` print.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// Aligned columns.
    #[default]
    Table,
    /// Graphviz dot: operations and their strongest transitions (`| dot -Tsvg`).
    Dot,
    /// A Mermaid `flowchart LR` of the same graph (renders in Markdown on GitHub/GitLab).
    Mermaid,
}

/// A saved model (the daemon's `model.state` or `replay --model-out`) loaded into an engine
/// with default settings, for the commands that read it without a daemon.
pub fn engine_from_model(path: &std::path::Path) -> anyhow::Result<precedent::engine::Engine> {
    use precedent::engine::{Engine, EngineConfig, Learned};
    let learned = precedent::state::load_from_path::<Learned>(path)
        .with_context(|| format!("loading the model {}", path.display()))?;
    // Sessions are never created here, so the session key does not matter.
    Ok(Engine::with_state(
        &EngineConfig::default(),
        precedent::rules::RuleFile::default(),
        [0; 16],
        precedent::decide::Mode::Learn,
        learned.model,
        learned.discovery,
    )?)
}

/// The graph picture of `view`, from the model file if given, else from the daemon.
pub fn picture(
    control: &ControlArgs,
    model: Option<&std::path::Path>,
    view: precedent::graph::GraphView,
    top: usize,
    format: OutputFormat,
) -> anyhow::Result<()> {
    use precedent::graph;
    let g: graph::Graph = match model {
        Some(p) => graph::build(&engine_from_model(p)?, view, top),
        None => serde_json::from_value(call(control, Request::Graph { view, top })?)
            .context("the daemon's reply does not match this precedent version")?,
    };
    let out = match format {
        OutputFormat::Dot => graph::to_dot(&g),
        OutputFormat::Mermaid => graph::to_mermaid(&g),
        OutputFormat::Table if control.json => serde_json::to_string_pretty(&g)?,
        OutputFormat::Table => unreachable!("tables are rendered by the subcommand"),
    };
    print!("{out}");
    Ok(())
}
