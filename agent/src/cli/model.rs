//! `precedent model save|load [PATH]|reset`.
use std::path::PathBuf;

use clap::{Args, Subcommand};
use precedent::control::{Request, api::ModelReport};

use super::ControlArgs;

#[derive(Args, Debug)]
pub struct ModelArgs {
    #[command(subcommand)]
    pub command: ModelCommand,
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Write the model to the state directory now.
    Save,
    /// Replace the model with a saved one (default: the state directory's copy).
    Load {
        /// A model state file; relative paths are taken from the current directory.
        path: Option<PathBuf>,
    },
    /// Forget everything learned and start learning again.
    Reset,
}

pub fn run(args: ModelArgs) -> anyhow::Result<()> {
    let request = match args.command {
        ModelCommand::Save => Request::ModelSave,
        ModelCommand::Load { path } => Request::ModelLoad {
            // The daemon's working directory is not ours.
            path: path.map(|p| std::path::absolute(&p).unwrap_or(p)),
        },
        ModelCommand::Reset => Request::ModelReset,
    };
    super::run(&args.control, request, render)
}

fn render(r: ModelReport) -> String {
    let mut out = format!("model {}", r.action);
    if let Some(p) = &r.path {
        out.push_str(&format!(" ({})", p.display()));
    }
    out.push_str(&format!(
        ": {} operations, {} contexts",
        r.size.operations, r.size.contexts
    ));
    if let Some(b) = r.bytes {
        out.push_str(&format!(", {b} bytes on disk"));
    }
    out
}
