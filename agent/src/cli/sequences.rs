//! `precedent sequences [--top N]`: the model's important sequences by precedence score.
use clap::Args;
use precedent::control::{DEFAULT_TOP, Request, api::SequenceRow};

use super::{ControlArgs, empty_note, table};

#[derive(Args, Debug)]
pub struct SequencesArgs {
    /// How many sequences to show.
    #[arg(long, default_value_t = DEFAULT_TOP)]
    pub top: usize,
    #[command(flatten)]
    pub control: ControlArgs,
}

pub fn run(args: SequencesArgs) -> anyhow::Result<()> {
    super::run(&args.control, Request::Sequences { top: args.top }, render)
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
