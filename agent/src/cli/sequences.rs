//! `precedent sequences [--top N] [--format table|dot|mermaid] [--model PATH]`: the model's
//! important sequences by precedence score, as a table or as a graph picture.
use std::path::PathBuf;

use clap::Args;
use precedent::{
    control::{
        DEFAULT_TOP, Request,
        api::{Interval, SequenceRow},
    },
    graph::GraphView,
};

use super::{ControlArgs, OutputFormat, empty_note, table};

#[derive(Args, Debug)]
pub struct SequencesArgs {
    /// How many sequences to show (edges, for pictures).
    #[arg(long, default_value_t = DEFAULT_TOP)]
    pub top: usize,
    /// table, or a picture of the sequences' transitions: dot or mermaid.
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
    /// Read a saved model file instead of asking the daemon.
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub control: ControlArgs,
}

pub fn run(args: SequencesArgs) -> anyhow::Result<()> {
    if args.format != OutputFormat::Table {
        return super::picture(
            &args.control,
            args.model.as_deref(),
            GraphView::Sequences,
            args.top,
            args.format,
        );
    }
    match &args.model {
        None => super::run(&args.control, Request::Sequences { top: args.top }, render),
        Some(path) => {
            let engine = super::engine_from_model(path)?;
            let rows: Vec<SequenceRow> = engine
                .sequences(args.top)
                .into_iter()
                .map(|s| SequenceRow {
                    ops: s.ops,
                    occurrences: u64::from(s.occurrences),
                    precedence_score: s.precedence_score,
                    interval: Interval {
                        lower: s.lower,
                        upper: s.upper,
                    },
                })
                .collect();
            if args.control.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{}", render(rows).trim_end());
            }
            Ok(())
        }
    }
}

fn render(rows: Vec<SequenceRow>) -> String {
    if rows.is_empty() {
        return empty_note("important sequences yet: the model is still learning");
    }
    let mut t = table(&["SCORE", "COUNT", "INTERVAL", "SEQUENCE"], &[0, 1]);
    for r in rows {
        t.add_row(vec![
            format!("{:.2}", r.precedence_score),
            r.occurrences.to_string(),
            format!("{:.2}–{:.2}", r.interval.lower, r.interval.upper),
            r.ops.join(" → "),
        ]);
    }
    t.to_string()
}
