//! `precedent replay FILE...`: what precedent would have done with these access logs or
//! captures. No daemon, no root: the work is in `precedent::replay::run`.
use std::{
    io::{self, BufWriter, Write as _},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::Args;
use precedent::{
    config::Config,
    decide::Mode,
    discovery::Discovery,
    engine::{Engine, Learned},
    model::Model,
    replay::{
        Format, Progress, Replay, ReplayOptions,
        run::{Driver, RunSummary, default_warmup},
    },
    session::SessionKeyer,
    state,
};

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Access logs (combined, common), jsonl exports or pcap/pcapng captures; .gz allowed.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Input format for every file (default: detected per file).
    #[arg(long)]
    pub format: Option<Format>,
    /// Config file for the engine settings and rules (default: built-in defaults).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// learn, detect or enforce (default: the config's mode).
    #[arg(long)]
    pub mode: Option<Mode>,
    /// Requests before alerts may fire. Default: 10% of the input's estimated request count,
    /// at most 10,000; 0 when starting from --model.
    #[arg(long, value_name = "N")]
    pub warmup: Option<u64>,
    /// Start from a saved model (the daemon's model.state or an earlier --model-out).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Write what was learned here at the end, in the daemon's state-file format
    /// (e.g. /var/lib/precedent/model.state).
    #[arg(long, value_name = "PATH")]
    pub model_out: Option<PathBuf>,
    /// Hash session identifiers with this secret (the daemon's `secret` file in its state
    /// directory) instead of a fresh random one, so alert session ids match the daemon's.
    #[arg(long, value_name = "PATH")]
    pub session_secret: Option<PathBuf>,
    /// Print the end summary on stderr as JSON instead of text.
    #[arg(long)]
    pub summary_json: bool,
    /// Disorder tolerated within one file before a record counts as late.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub reorder_window: Duration,
    /// Never draw the progress bar (it is drawn only when stderr is a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
}

pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let mode = args.mode.unwrap_or(config.mode);
    if let Some(path) = &args.model_out {
        state::check_writable_path(path)
            .with_context(|| format!("--model-out {} cannot be written", path.display()))?;
    }
    let cfg = config.engine();
    let (mut discovery, model) = match &args.model {
        Some(p) => {
            let l = state::load_from_path::<Learned>(p)
                .with_context(|| format!("loading the model given with --model {}", p.display()))?;
            (l.discovery, l.model)
        }
        None => (
            Discovery::new(cfg.discovery.clone())?,
            Model::new(cfg.model.clone())?,
        ),
    };
    if let Some(doc) = &config.openapi {
        let text = std::fs::read_to_string(doc)
            .with_context(|| format!("reading the OpenAPI document {}", doc.display()))?;
        discovery
            .import_openapi(&text)
            .with_context(|| format!("importing {}", doc.display()))?;
    }
    // Sessions only live for the replay and nothing about them is saved, so a fresh random
    // key per run is enough unless the ids are to be compared with the daemon's: alert session
    // ids are then stable within a run, not across runs.
    let secret = match &args.session_secret {
        Some(p) => state::load_secret_from_path(p)
            .with_context(|| format!("loading the session secret {}", p.display()))?,
        None => SessionKeyer::random_secret().context("reading /dev/urandom")?,
    };
    let engine = Engine::with_state(&cfg, config.rule_file(), secret, mode, model, discovery)?;

    let opts = ReplayOptions {
        format: args.format,
        // The headers the engine reads (session identifiers, a trusted proxy's client
        // header) are the ones records keep, as the live parser keeps them.
        http: engine.http_config(),
        reorder_window: args.reorder_window,
        capture_len: config.capture_len as usize,
        wait_for_acks: config.wait_for_acks,
        progress: if args.no_progress {
            Progress::Hidden
        } else {
            Progress::Auto
        },
        ..ReplayOptions::default()
    };
    let mut replay = Replay::open(&args.files, &opts)?;
    let warmup = args
        .warmup
        .unwrap_or_else(|| default_warmup(&replay.summary(), args.model.is_some()));
    let mut driver = Driver::new(engine, warmup);

    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for rec in replay.by_ref() {
        match driver.feed(&rec, &mut out) {
            Ok(()) => {}
            // `precedent replay log | head`: the reader left; stop quietly.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing alerts to stdout"),
        }
    }
    match out.flush() {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
        r => r.context("writing alerts to stdout")?,
    }
    drop(out);

    let stats = driver.finish();
    let summary = RunSummary {
        engine: stats,
        input: replay.finish(),
    };
    if args.summary_json {
        eprintln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        eprint!("{}", summary.render());
    }
    if let Some(path) = &args.model_out {
        let bytes = state::save_view_to_path::<Learned>(path, &driver.engine().learned())
            .with_context(|| format!("writing the model to {}", path.display()))?;
        eprintln!("model written to {} ({bytes} bytes)", path.display());
    }
    if !summary.input.errors.is_empty() {
        anyhow::bail!(super::Plain(format!(
            "precedent replay: {} input file(s) could not be read to the end (see FILE ERROR above)",
            summary.input.errors.len()
        )));
    }
    Ok(())
}
