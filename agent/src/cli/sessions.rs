//! `precedent sessions [--limit N]`: live sessions, most surprising first.
use clap::Args;
use precedent::control::{DEFAULT_SESSIONS_LIMIT, Request, api::SessionRow};

use super::{ControlArgs, ago, empty_note, table};

#[derive(Args, Debug)]
pub struct SessionsArgs {
    /// How many sessions to show.
    #[arg(long, default_value_t = DEFAULT_SESSIONS_LIMIT)]
    pub limit: usize,
    #[command(flatten)]
    pub control: ControlArgs,
}

pub fn run(args: SessionsArgs) -> anyhow::Result<()> {
    super::run(
        &args.control,
        Request::Sessions { limit: args.limit },
        render,
    )
}

fn render(rows: Vec<SessionRow>) -> String {
    if rows.is_empty() {
        return empty_note("live sessions");
    }
    let mut t = table(
        &[
            "SESSION",
            "CLIENT",
            "STEPS",
            "SURPRISE",
            "LAST SEEN",
            "LAST OPERATION",
        ],
        &[2, 3],
    );
    for r in rows {
        t.add_row(vec![
            r.key,
            r.client.to_string(),
            r.steps.to_string(),
            // A tiny negative value would print as "-0.00".
            format!(
                "{:.2}",
                if r.surprise.abs() < 0.005 {
                    0.0
                } else {
                    r.surprise
                }
            ),
            ago(r.last_seen),
            r.last_operation.unwrap_or_default(),
        ]);
    }
    t.to_string()
}
