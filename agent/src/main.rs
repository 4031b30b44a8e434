//! `precedent`: command-line entry point. Subcommands are thin; the work lives in the library.
//! `daemon` runs the agent; the others (in `cli/`, one file per group) talk to it over the
//! control socket.
use clap::{CommandFactory as _, Parser, Subcommand};
use std::path::PathBuf;

mod cli;

use precedent::{
    config::{Config, DEFAULT_CONFIG_PATH, LogFormat},
    daemon::{self, DaemonOptions, Overrides},
    decide::Mode,
};

#[derive(Parser)]
#[command(
    name = "precedent",
    version,
    about = "Protects HTTP APIs against sequential abuse"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: capture, detect, alert and enforce (what the systemd unit runs).
    Daemon {
        /// Config file; the built-in defaults apply when the default path does not exist.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Interface to watch (repeat for several); replaces `interfaces` from the config.
        #[arg(long = "iface", value_name = "NAME")]
        ifaces: Vec<String>,
        /// Overrides `state_dir`.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Overrides `socket`.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Overrides `mode`: learn, detect or enforce.
        #[arg(long)]
        mode: Option<Mode>,
        /// Also print every captured request as a JSON line on stdout.
        #[arg(long)]
        log_requests: bool,
    },
    /// Validate a config file without starting anything.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Mode, interfaces, uptime, model size, sessions, blocks and every counter.
    Status(cli::status::StatusArgs),
    /// Operations discovered so far.
    Endpoints(cli::endpoints::EndpointsArgs),
    /// The model's important sequences by precedence score.
    Sequences(cli::sequences::SequencesArgs),
    /// Live sessions (hashed keys), most surprising first.
    Sessions(cli::sessions::SessionsArgs),
    /// Precedence and deny rules: list, add, remove, suggest.
    Rules(cli::rules::RulesArgs),
    /// Blocked clients: list, add, remove.
    Blocks(cli::blocks::BlocksArgs),
    /// Show or switch the mode: learn, detect or enforce.
    Mode(cli::mode::ModeArgs),
    /// Save, load or reset the learned model.
    Model(cli::model::ModelArgs),
    /// Run access logs or captures through the engine offline: alerts on stdout, summary on stderr.
    Replay(cli::replay::ReplayArgs),
    /// Print a shell completion script, e.g. `precedent completions bash > /etc/bash_completion.d/precedent`.
    Completions(cli::generate::CompletionsArgs),
    /// Print the man page (roff) on stdout; the package installs it as precedent(8).
    #[command(hide = true)]
    Manpage,
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Parse and validate PATH (default /etc/precedent/precedent.toml); exit 1 with the
    /// offending key named if it is invalid.
    Check {
        #[arg(value_name = "PATH", conflicts_with = "config")]
        path: Option<PathBuf>,
        /// The same PATH, spelled as `precedent daemon` takes it.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
}

/// Operational logs on stderr, JSON or text; `PRECEDENT_LOG` sets the filter (default info).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PRECEDENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

/// The daemon's configuration: the file (explicit, or the default path if it exists, else
/// built-in defaults) with command-line overrides on top.
fn daemon_options(config: Option<PathBuf>, overrides: Overrides) -> anyhow::Result<DaemonOptions> {
    let (mut cfg, path) = match config {
        Some(p) => (Config::load(&p)?, Some(p)),
        None if std::path::Path::new(DEFAULT_CONFIG_PATH).exists() => {
            let p = PathBuf::from(DEFAULT_CONFIG_PATH);
            (Config::load(&p)?, Some(p))
        }
        None => (Config::default(), None),
    };
    overrides.apply(&mut cfg);
    Ok(DaemonOptions {
        config: cfg,
        config_path: path,
        overrides,
    })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Daemon { .. }
        | Command::Config { .. }
        | Command::Completions(_)
        | Command::Manpage => {}
        _ => init_logging(LogFormat::Text),
    }
    let result = match cli.command {
        Command::Status(a) => cli::status::run(a),
        Command::Endpoints(a) => cli::endpoints::run(a),
        Command::Sequences(a) => cli::sequences::run(a),
        Command::Sessions(a) => cli::sessions::run(a),
        Command::Rules(a) => cli::rules::run(a),
        Command::Blocks(a) => cli::blocks::run(a),
        Command::Mode(a) => cli::mode::run(a),
        Command::Model(a) => cli::model::run(a),
        Command::Replay(a) => cli::replay::run(a),
        Command::Completions(a) => {
            cli::generate::completions(a.shell, &mut Cli::command(), &mut std::io::stdout());
            Ok(())
        }
        Command::Manpage => {
            cli::generate::manpage(Cli::command(), &mut std::io::stdout()).map_err(Into::into)
        }
        Command::Config {
            action: ConfigAction::Check { path, config },
        } => {
            let path = path
                .or(config)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
            Config::load(&path)
                .map(|c| {
                    println!(
                        "{}: ok (mode {}, {} interface(s), {} rule(s), {} deny rule(s))",
                        path.display(),
                        c.mode,
                        c.interfaces.len(),
                        c.rules.len(),
                        c.deny.len()
                    );
                })
                .map_err(anyhow::Error::from)
        }
        Command::Daemon {
            config,
            ifaces,
            state_dir,
            socket,
            mode,
            log_requests,
        } => {
            let overrides = Overrides {
                interfaces: ifaces,
                state_dir,
                socket,
                mode,
                log_requests,
            };
            daemon_options(config, overrides).and_then(|opts| {
                init_logging(opts.config.log_format);
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(daemon::run(opts)))
            })
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // Messages like "precedent daemon is not running (...)" are complete as they are.
        Err(e) if e.downcast_ref::<cli::Plain>().is_some() => {
            eprintln!("{e}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("precedent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};
    use clap_complete::Shell;

    use super::{Cli, cli::generate};

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `systemctl reload` runs the unit's ExecReload= lines in order and stops at the first
    /// that fails: the config check must come first, on the file the daemon runs with, spelled
    /// as this CLI takes it, and only then the SIGHUP.
    #[test]
    fn the_unit_checks_the_config_before_it_signals_a_reload() {
        let unit = include_str!("../../dist/precedent.service");
        let values = |key: &str| -> Vec<Vec<&str>> {
            unit.lines()
                .filter_map(|l| l.strip_prefix(key))
                .map(|v| v.split_whitespace().collect())
                .collect()
        };
        let start = &values("ExecStart=")[0];
        let reload = values("ExecReload=");
        assert_eq!(reload.len(), 2, "{reload:?}");
        let (check, signal) = (&reload[0], &reload[1]);
        assert_eq!(check[0], start[0], "the same binary");
        let config = |args: &[&str]| {
            let at = args.iter().position(|a| *a == "--config").unwrap();
            args[at + 1].to_owned()
        };
        assert_eq!(config(check), config(start), "the same file");
        let parsed =
            Cli::try_parse_from(check.iter().copied()).unwrap_or_else(|e| panic!("{check:?}: {e}"));
        assert!(matches!(
            parsed.command,
            super::Command::Config {
                action: super::ConfigAction::Check { .. }
            }
        ));
        assert_eq!(signal, &["/bin/kill", "-HUP", "$MAINPID"]);
    }

    #[test]
    fn completions_offer_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            generate::completions(shell, &mut Cli::command(), &mut out);
            let text = String::from_utf8(out).unwrap();
            for sub in ["daemon", "status", "sequences", "blocks", "completions"] {
                assert!(text.contains(sub), "{shell} completions lack {sub}");
            }
            // Nested subcommands and global options are completed too (fish spells long
            // options `-l socket`).
            assert!(text.contains("socket"), "{shell} completions lack --socket");
            assert!(
                text.contains("suggest"),
                "{shell} completions lack rules suggest"
            );
        }
    }

    #[test]
    fn man_page_is_section_8_and_lists_the_subcommands() {
        let mut out = Vec::new();
        generate::manpage(Cli::command(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(".TH PRECEDENT 8"), "{text}");
        for sub in ["daemon", "status", "rules", "blocks", "mode"] {
            assert!(text.contains(sub), "man page lacks {sub}");
        }
        assert!(
            !text.contains("manpage"),
            "the hidden manpage subcommand leaked into the page"
        );
    }
}
