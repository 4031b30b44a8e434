//! `precedent`: command-line entry point. Subcommands are thin; the work lives in the library.
//! `daemon` runs the agent; the others (in `cli/`, one file per group) talk to it over the
//! control socket.
use clap::{Parser, Subcommand};
use std::path::PathBuf;

mod cli;

use precedent::{
    capture::{AttachMode, LoadOptions},
    daemon::{self, DaemonOptions},
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
    /// Attach to interfaces and report every HTTP/1.x request seen (runs until SIGTERM/Ctrl-C).
    Daemon {
        /// Interface to watch; repeat for several.
        #[arg(long = "iface", value_name = "NAME", required = true)]
        ifaces: Vec<String>,
        /// XDP attach mode: auto (native, falling back to generic), native, or generic.
        #[arg(long, default_value = "auto")]
        xdp_mode: AttachMode,
        /// Payload bytes captured per request (1..=4096).
        #[arg(long, default_value_t = agent_common::CAPTURE_DEFAULT)]
        capture_len: u32,
        /// Pin the block and allow maps here (on bpffs) so blocks survive restarts.
        #[arg(long, value_name = "DIR")]
        pin_dir: Option<PathBuf>,
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
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PRECEDENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let cli = Cli::parse();
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
        Command::Daemon {
            ifaces,
            xdp_mode,
            capture_len,
            pin_dir,
        } => {
            let opts = DaemonOptions {
                ifaces,
                attach_mode: xdp_mode,
                load: LoadOptions {
                    capture_len,
                    pin_dir,
                    ..LoadOptions::default()
                },
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(daemon::run(opts)))
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
