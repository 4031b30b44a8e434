//! `precedent rules list|add FILE|remove ID|suggest [--min-score X]`.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use precedent::{
    control::{
        DEFAULT_MIN_SCORE, Request,
        api::{Ack, RuleKind, RuleRow, RuleSuggestions, RulesAdded},
    },
    rules::RuleFile,
};

use super::{ControlArgs, empty_note, secs, table};

#[derive(Args, Debug)]
pub struct RulesArgs {
    #[command(subcommand)]
    pub command: RulesCommand,
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Subcommand, Debug)]
pub enum RulesCommand {
    /// Rules in force (config and run-time), with hits since start.
    List,
    /// Add the `[[rule]]`/`[[deny]]` entries of a TOML file (`-` reads stdin).
    Add { file: PathBuf },
    /// Remove a run-time rule by id.
    Remove { id: String },
    /// Rules proposed from the model's important sequences, as TOML ready for `rules add`.
    Suggest {
        /// Minimum precedence score (0..=1).
        #[arg(long, default_value_t = DEFAULT_MIN_SCORE)]
        min_score: f64,
    },
}

pub fn run(args: RulesArgs) -> anyhow::Result<()> {
    match args.command {
        RulesCommand::List => super::run(&args.control, Request::RulesList, render_list),
        RulesCommand::Add { file } => {
            let toml = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading rules from stdin")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            // Catch mistakes here, with the file name, before bothering the daemon.
            RuleFile::from_toml_str(&toml)
                .with_context(|| format!("{} is not a valid rules file", file.display()))?;
            super::run(
                &args.control,
                Request::RulesAdd { toml },
                |r: RulesAdded| format!("added {}", r.added.join(", ")),
            )
        }
        RulesCommand::Remove { id } => {
            super::run(&args.control, Request::RulesRemove { id }, |a: Ack| {
                a.message
            })
        }
        RulesCommand::Suggest { min_score } => {
            if !(0.0..=1.0).contains(&min_score) {
                anyhow::bail!("--min-score must be between 0 and 1");
            }
            super::run(
                &args.control,
                Request::RulesSuggest { min_score },
                |s: RuleSuggestions| {
                    if s.rules.is_empty() {
                        return empty_note("suggestions at this score");
                    }
                    format!(
                        "{}\n\n# Save as a file, edit, then: precedent rules add FILE\n{}",
                        render_rows(s.rules, false),
                        s.toml
                    )
                },
            )
        }
    }
}

fn render_list(rows: Vec<RuleRow>) -> String {
    if rows.is_empty() {
        return empty_note("rules");
    }
    render_rows(rows, true)
}

/// `in_force`: rules the daemon enforces, with where they come from and their hits; else
/// suggestions, which have neither yet.
fn render_rows(rows: Vec<RuleRow>, in_force: bool) -> String {
    let mut t = if in_force {
        table(&["ID", "ACTION", "SOURCE", "HITS", "RULE"], &[3])
    } else {
        table(&["ID", "ACTION", "RULE"], &[])
    };
    for r in rows {
        let what = match r.kind {
            RuleKind::Precedence => {
                let mut s = format!(
                    "{} after {}",
                    r.operation.as_deref().unwrap_or("?"),
                    r.preceded_by.join(" → ")
                );
                if let Some(n) = r.within_ops {
                    s.push_str(&format!(" within {n} ops"));
                }
                if let Some(w) = r.within_secs {
                    s.push_str(&format!(" within {}", secs(w)));
                }
                if let Some(m) = r.max_repeats {
                    s.push_str(&format!(", max {m} repeats"));
                }
                s
            }
            RuleKind::Deny => format!("never {}", r.sequence.join(" → ")),
        };
        let action = match (r.action, r.block_ttl_secs) {
            (precedent::rules::Action::Block, Some(t)) => format!("block {}", secs(t)),
            (precedent::rules::Action::Block, None) => "block".into(),
            (precedent::rules::Action::Log, _) => "log".into(),
        };
        let mut source = serde_json::to_value(r.source)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        if r.shadowed {
            source.push_str(" (not in force: the config's wins)");
        }
        if in_force {
            t.add_row(vec![r.id, action, source, r.hits.to_string(), what]);
        } else {
            t.add_row(vec![r.id, action, what]);
        }
    }
    t.to_string()
}
