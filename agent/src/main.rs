//! `precedent`: command-line entry point. Subcommands are thin; the work lives in the library.
use clap::{Parser, Subcommand};
use precedent::daemon::{self, DaemonOptions};

#[derive(Parser)]
#[command(name = "precedent", version, about = "Protects HTTP APIs against sequential abuse")]
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
        Command::Daemon { ifaces } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(daemon::run(DaemonOptions { ifaces }))),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("precedent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
