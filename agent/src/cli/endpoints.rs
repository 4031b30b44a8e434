//! `precedent endpoints [--format table|dot|mermaid] [--model PATH]`: the operations
//! discovery has learned, busiest first, or a picture of their strongest transitions.
use std::path::PathBuf;

use clap::Args;
use precedent::{
    control::{Request, api::EndpointRow},
    graph::{DEFAULT_EDGES, GraphView},
};

use super::{ControlArgs, OutputFormat, empty_note, table};

#[derive(Args, Debug)]
pub struct EndpointsArgs {
    /// table, or a picture of operations and their strongest transitions: dot or mermaid.
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
    /// Edges drawn in a picture (the most probable transitions).
    #[arg(long, default_value_t = DEFAULT_EDGES)]
    pub top: usize,
    /// Read a saved model file instead of asking the daemon.
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub control: ControlArgs,
}

pub fn run(args: EndpointsArgs) -> anyhow::Result<()> {
    if args.format != OutputFormat::Table {
        return super::picture(
            &args.control,
            args.model.as_deref(),
            GraphView::Transitions,
            args.top,
            args.format,
        );
    }
    match &args.model {
        None => super::run(&args.control, Request::Endpoints, render),
        Some(path) => {
            // A model file keeps counts but not first/last-seen times.
            let engine = super::engine_from_model(path)?;
            let mut ops: Vec<_> = engine
                .discovery()
                .operations()
                .into_iter()
                .filter(|o| o.merged_into.is_none())
                .collect();
            ops.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));
            if args.control.json {
                println!("{}", serde_json::to_string_pretty(&ops)?);
                return Ok(());
            }
            if ops.is_empty() {
                println!("{}", empty_note("endpoints in this model"));
                return Ok(());
            }
            let mut t = table(&["OPERATION", "COUNT", "SOURCE"], &[1]);
            for o in ops {
                t.add_row(vec![
                    o.name,
                    o.count.to_string(),
                    format!("{:?}", o.source).to_lowercase(),
                ]);
            }
            println!("{}", t.to_string().trim_end());
            Ok(())
        }
    }
}

fn render(mut rows: Vec<EndpointRow>) -> String {
    if rows.is_empty() {
        return empty_note("endpoints discovered yet");
    }
    rows.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.operation.cmp(&b.operation))
    });
    let mut t = table(&["OPERATION", "COUNT", "SOURCE"], &[1]);
    for r in rows {
        t.add_row(vec![
            r.operation,
            r.count.to_string(),
            r.source.unwrap_or_default(),
        ]);
    }
    t.to_string()
}
