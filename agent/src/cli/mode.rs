//! `precedent mode [learn|detect|enforce]`: show or switch the mode at run time.
use clap::Args;
use precedent::control::{Mode, Request, api::ModeReport};

use super::ControlArgs;

#[derive(Args, Debug)]
pub struct ModeArgs {
    /// The mode to switch to; without it, show the current one.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(["learn", "detect", "enforce"]))]
    pub mode: Option<String>,
    #[command(flatten)]
    pub control: ControlArgs,
}

pub fn run(args: ModeArgs) -> anyhow::Result<()> {
    let request = match args.mode {
        None => Request::ModeGet,
        Some(m) => Request::ModeSet {
            mode: m.parse::<Mode>().map_err(anyhow::Error::msg)?,
        },
    };
    super::run(&args.control, request, render)
}

fn render(r: ModeReport) -> String {
    match r.previous {
        Some(p) if p != r.mode => format!("mode: {} (was {p})", r.mode),
        Some(_) => format!("mode: {} (unchanged)", r.mode),
        None => format!("mode: {}", r.mode),
    }
}
