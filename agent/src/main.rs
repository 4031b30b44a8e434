//! `precedent`: command-line entry point. Subcommands are thin; the work lives in the library.
use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
        Err(e) => {
            eprintln!("precedent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
