//! `precedent endpoints`: the operations discovery has learned, busiest first.
use clap::Args;
use precedent::control::{Request, api::EndpointRow};

use super::{ControlArgs, empty_note, table};

#[derive(Args, Debug)]
pub struct EndpointsArgs {
    #[command(flatten)]
    pub control: ControlArgs,
}

pub fn run(args: EndpointsArgs) -> anyhow::Result<()> {
    super::run(&args.control, Request::Endpoints, render)
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
