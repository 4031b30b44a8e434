//! The long-running process. One task owns all engine state and is fed by bounded channels:
//!
//! ```text
//! XDP ring buffer ─► reader task ─► [captured requests] ─► engine owner ─► alerts (stdout writer thread)
//! control socket ─► server task  ─► [control requests]  ─►      │       └► enforcer (BPF block maps)
//! signals, timers ─────────────────────────────────────────►      └► state files (periodic, at exit)
//! ```
//!
//! Nothing blocks the ring buffer reader: when the engine falls behind, requests are counted
//! and dropped, and the count shows in `precedent status` and the periodic counters line.
//! Once a second the interface watcher ([`crate::ifwatch`]) checks that every configured
//! interface still runs the program and re-attaches it where it does not (re-created
//! interface, program detached from outside). A failing state save (full disk) is logged,
//! counted and shown by `status` until a save succeeds; capture and blocking carry on.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc as std_mpsc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use crate::{
    acked::AckGate,
    capture::{self, CapturedRequest, Datapath, LoadOptions},
    clock,
    config::Config,
    control::{
        ControlRequest, Request, Response,
        api::{
            Ack, BlockRow, EndpointRow, InterfaceStatus, ModeReport, ModelReport, ModelSize,
            RuleRow, RuleSource, RuleSuggestions, RulesAdded, SequenceRow, SessionRow,
            StatusReport,
        },
        server::{ControlServer, QUEUE_DEPTH, ServerConfig},
    },
    enforce::Enforcer,
    engine::{Engine, Learned, Outcome, SavedSessions},
    ifwatch::{self, Watcher},
    notify,
    reassemble::Reassembler,
    rules::RuleFile,
    state::{Persist, StateDir},
};

/// Captured requests waiting for the engine; beyond this the reader counts and drops.
const PIPELINE_DEPTH: usize = 8192;
/// Alerts waiting for stdout; beyond this they are counted and dropped (stdout stuck).
const ALERT_DEPTH: usize = 4096;
/// Engine upkeep (idle sessions, model collapse) and block expiry sweeps.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);
const SWEEP_BLOCKS_EVERY: Duration = Duration::from_secs(10);
/// The periodic counters log line.
const COUNTERS_EVERY: Duration = Duration::from_secs(60);

/// How the daemon was asked to run: the configuration and where it came from (for SIGHUP).
pub struct DaemonOptions {
    pub config: Config,
    /// None when running on built-in defaults (SIGHUP then has nothing to re-read).
    pub config_path: Option<PathBuf>,
    /// `--iface` etc. given on the command line; re-applied over a reloaded file.
    pub overrides: Overrides,
}

/// Command-line settings that win over the config file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub interfaces: Vec<String>,
    pub log_requests: bool,
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub mode: Option<crate::decide::Mode>,
}

impl Overrides {
    pub fn apply(&self, cfg: &mut Config) {
        if !self.interfaces.is_empty() {
            cfg.interfaces = self.interfaces.clone();
        }
        if let Some(d) = &self.state_dir {
            cfg.state_dir = d.clone();
        }
        if let Some(s) = &self.socket {
            cfg.socket = s.clone();
        }
        if let Some(m) = self.mode {
            cfg.mode = m;
        }
        cfg.log_requests |= self.log_requests;
    }
}

/// Rules added at run time (`precedent rules add`), kept as TOML text: the rule types skip
/// empty fields when serialised, which a positional binary format cannot read back.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RuntimeRules {
    toml: String,
}

impl Persist for RuntimeRules {
    const KIND: &'static str = "rules";
    const VERSION: u32 = 1;
}

/// A reload's change to the kernel side, as the step that undoes it.
enum Undo {
    CaptureLen(u32),
    Ports(Vec<u16>),
    PassFragments(bool),
    Allow(IpNet),
    Disallow(IpNet),
}

/// Blocks and why they were made; the maps themselves survive restarts only when pinned.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedBlocks {
    blocks: Vec<SavedBlock>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedBlock {
    net: String,
    /// Unix seconds.
    expires: u64,
    reason: String,
}

impl Persist for SavedBlocks {
    const KIND: &'static str = "blocks";
    const VERSION: u32 = 1;
}

/// Userspace counters reported by `status`.
#[derive(Debug, Default)]
struct Counters {
    port_filtered: u64,
    alerts_dropped: u64,
    blocks_failed: u64,
    state_save_failures: u64,
    interfaces_lost: u64,
    interfaces_reattached: u64,
    interface_attach_failures: u64,
}

pub async fn run(opts: DaemonOptions) -> anyhow::Result<()> {
    let mut daemon = Daemon::start(opts).await?;
    let result = daemon.serve().await;
    daemon.stop();
    result
}

struct Daemon {
    config: Config,
    config_path: Option<PathBuf>,
    overrides: Overrides,
    engine: Engine,
    datapath: Datapath,
    /// Puts the program back on interfaces that lost it (deleted and re-created, detached).
    watcher: Watcher,
    enforcer: Enforcer,
    state: StateDir,
    runtime_rules: RuleFile,
    block_reasons: HashMap<IpNet, String>,
    /// JSON lines for stdout (alerts, and requests when `log_requests` is on).
    out: std_mpsc::SyncSender<String>,
    /// Parses requests for `log_requests` only (the engine has its own parser).
    request_log: Option<crate::http::Parser>,
    captured: mpsc::Receiver<CapturedRequest>,
    /// Joins requests whose header the program captured in several pieces.
    reassembler: Reassembler,
    /// Captured records wait here for the server's acknowledgement (see [`crate::acked`]).
    acks: AckGate,
    control: mpsc::Receiver<ControlRequest>,
    reader_overflow: Arc<AtomicU64>,
    counters: Counters,
    /// The last state save's error, until a save succeeds again (shown by `status`).
    state_error: Option<String>,
    shutdown: CancellationToken,
    signals: Signals,
    /// Held for the daemon's life (see [`lock_state_dir`]).
    _lock: std::fs::File,
    started: Instant,
    /// The clock of capture timestamps and of maintenance (see [`clock::Timeline`]).
    timeline: clock::Timeline,
    /// The wall clock's step from the timeline last logged, in whole seconds.
    drift_logged_s: i64,
}

/// The signals the engine owner's loop answers.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }
}

impl Daemon {
    async fn start(opts: DaemonOptions) -> anyhow::Result<Self> {
        let DaemonOptions {
            config,
            config_path,
            overrides,
        } = opts;
        if config.interfaces.is_empty() {
            anyhow::bail!(capture::CaptureError::NoInterface {
                available: capture::available_interfaces()
            });
        }
        // Interface names first: the commonest mistake, and the cheapest to report.
        for iface in &config.interfaces {
            if !std::path::Path::new("/sys/class/net").join(iface).exists() {
                anyhow::bail!(capture::CaptureError::UnknownInterface {
                    name: iface.clone(),
                    available: capture::available_interfaces(),
                });
            }
        }

        // The first thing that touches anything: a second daemon must stop before it cleans
        // the state directory's temp files (the first one's save in progress), writes pinned
        // maps or attaches to an interface.
        let lock = lock_state_dir(&config.state_dir)?;
        let timeline = clock::Timeline::start();
        let state = StateDir::open(&config.state_dir)
            .with_context(|| format!("state directory {}", config.state_dir.display()))?;
        let secret = state
            .load_or_create_secret()
            .context("session-hashing secret")?;
        let runtime_rules = match state.load::<RuntimeRules>()?.into_value() {
            Some(r) => RuleFile::from_toml_str(&r.toml).unwrap_or_else(|e| {
                tracing::error!(error = %e, "saved runtime rules are invalid; starting without them");
                RuleFile::default()
            }),
            None => RuleFile::default(),
        };
        let (rules, shadowed) = merge_rules(&config.rule_file(), &runtime_rules)?;
        warn_shadowed(&shadowed);
        let mut engine = match state.load::<Learned>()?.into_value() {
            Some(learned) => {
                tracing::info!(
                    operations = learned.discovery.operations().len(),
                    contexts = learned.model.contexts(),
                    "model loaded"
                );
                Engine::with_state(
                    &config.engine(),
                    rules,
                    secret,
                    config.mode,
                    learned.model,
                    learned.discovery,
                )?
            }
            None => Engine::new(&config.engine(), rules, secret, config.mode)?,
        };
        if let Some(path) = &config.openapi {
            import_openapi(&mut engine, path, &read_openapi(path)?)?;
        }
        // After the model and the templates, so sessions are renamed to what is loaded. A
        // damaged file costs the sessions only: start without them.
        match state.load::<SavedSessions>() {
            Ok(loaded) => {
                if let Some(saved) = loaded.into_value() {
                    let saved_count = saved.sessions.len();
                    let restored = engine.restore_sessions(saved, timeline.now_ns());
                    tracing::info!(restored, saved = saved_count, "sessions restored");
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "saved sessions not loaded; starting without them")
            }
        }

        let mut datapath = Datapath::load(&LoadOptions {
            capture_len: config.capture_len,
            ring_bytes: config.ring_buffer_bytes,
            pin_dir: config.pin_maps.clone(),
            ports: config.ports.clone(),
            watch_acks: config.wait_for_acks,
        })?;
        datapath.set_pass_fragments(config.pass_tcp_fragments)?;
        // The enforcer tells the kernel which (possibly pinned) maps hold entries: take it
        // before attaching so pinned blocks apply from the first packet.
        let mut enforcer = datapath.take_enforcer()?;
        // Pinned maps hold what an earlier run allowed: an address since taken off the list
        // must not stay allowed (and so unblockable) across the restart.
        for net in enforcer.allowlist()? {
            if !config.allowlist.iter().any(|a| a.trunc() == net) {
                enforcer.disallow(net)?;
                tracing::info!(%net, "no longer in the allowlist: removed from the pinned map");
            }
        }
        for net in &config.allowlist {
            enforcer.allow(*net)?;
        }
        let block_reasons = restore_blocks(&state, &mut enforcer);

        // Bind the control socket before attaching: a daemon on another state directory but
        // this socket fails here, before it touches the interfaces the first one is using.
        let server = ControlServer::bind(ServerConfig {
            socket: config.socket.clone(),
            ..ServerConfig::default()
        })?;
        for iface in &config.interfaces {
            datapath.attach(iface, config.attach_mode)?;
        }
        let watcher = Watcher::new(&mut datapath, config.interfaces.clone(), config.attach_mode)?;
        let ring = datapath.take_events()?;
        let reader_overflow = Arc::new(AtomicU64::new(0));
        let (tx, captured) = mpsc::channel(PIPELINE_DEPTH);
        tokio::spawn(capture::read_events(
            ring,
            tx,
            reader_overflow.clone(),
            timeline,
        ));
        let shutdown = CancellationToken::new();
        let (ctl_tx, control) = mpsc::channel(QUEUE_DEPTH);
        if let Some(addr) = config.metrics_listen {
            let metrics = crate::metrics::serve(addr, ctl_tx.clone(), shutdown.clone());
            tokio::spawn(metrics);
        }
        tokio::spawn(server.run(ctl_tx, shutdown.clone()));

        // Before READY=1: systemd may send SIGHUP (`systemctl reload`) as soon as it has it,
        // and a signal with no handler yet kills the process.
        let signals = Signals::install()?;
        tracing::info!(
            interfaces = ?config.interfaces,
            mode = %config.mode,
            capture_len = config.capture_len,
            socket = %config.socket.display(),
            "precedent daemon running"
        );
        notify::ready(&format!("watching {}", config.interfaces.join(", ")));
        Ok(Self {
            timeline,
            drift_logged_s: 0,
            out: spawn_stdout_writer(),
            request_log: config
                .log_requests
                .then(|| crate::http::Parser::new(config.http.clone())),
            reassembler: Reassembler::new(config.capture_len as usize),
            acks: AckGate::new(datapath.watches_acks()),
            config,
            config_path,
            overrides,
            engine,
            datapath,
            watcher,
            enforcer,
            state,
            runtime_rules,
            block_reasons,
            captured,
            control,
            reader_overflow,
            counters: Counters::default(),
            state_error: None,
            shutdown,
            signals,
            _lock: lock,
            started: Instant::now(),
        })
    }

    /// The engine owner's loop: runs until SIGTERM or SIGINT.
    async fn serve(&mut self) -> anyhow::Result<()> {
        let every = |d: Duration| {
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        };
        let mut maintain = every(MAINTAIN_EVERY);
        let mut sweep = every(SWEEP_BLOCKS_EVERY);
        let mut save = every(self.config.save_every);
        let mut report = every(COUNTERS_EVERY);
        let mut interfaces = every(ifwatch::CHECK_EVERY);
        loop {
            tokio::select! {
                Some(req) = self.captured.recv() => self.on_capture(req),
                Some(req) = self.control.recv() => {
                    let response = self.on_control(&req.request);
                    req.respond(response);
                }
                _ = maintain.tick() => {
                    self.log_clock_step();
                    let now = self.timeline.now_ns();
                    self.acks.expire(now);
                    for req in self.reassembler.expire(now) {
                        self.on_request(req);
                    }
                    self.engine.maintain(now);
                }
                _ = sweep.tick() => match self.enforcer.sweep() {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "expired blocks swept"),
                    Err(e) => tracing::warn!(error = %e, "sweeping expired blocks failed"),
                },
                _ = save.tick() => { let _ = self.save_state(); }
                _ = report.tick() => self.log_counters(),
                _ = interfaces.tick() => self.check_interfaces(),
                _ = self.signals.hup.recv() => self.reload(),
                _ = self.signals.term.recv() => { tracing::info!("SIGTERM received"); break; }
                _ = self.signals.int.recv() => { tracing::info!("SIGINT received"); break; }
            }
        }
        Ok(())
    }

    /// Shutdown: stop serving the socket, save state, detach from every interface.
    fn stop(&mut self) {
        notify::stopping();
        self.shutdown.cancel();
        // Requests still waiting for pieces are learned from as they are.
        for req in self.reassembler.flush() {
            self.on_request(req);
        }
        let _ = self.save_state();
        self.log_counters();
        self.datapath.detach_all();
        tracing::info!("precedent daemon stopped");
    }

    /// Runs the interface watcher and reports what it did, loudly: while an interface is
    /// missing, requests there are neither seen nor blocked.
    fn check_interfaces(&mut self) {
        for event in self.watcher.check(&mut self.datapath) {
            match event {
                ifwatch::Event::Lost { iface } => {
                    self.counters.interfaces_lost += 1;
                    tracing::error!(
                        iface,
                        "interface gone: not capturing or blocking there until it comes back"
                    );
                }
                ifwatch::Event::Reattached {
                    iface,
                    ifindex,
                    mode,
                } => {
                    self.counters.interfaces_reattached += 1;
                    tracing::warn!(iface, ifindex, %mode, "xdp program re-attached");
                }
                ifwatch::Event::AttachFailed { iface, error } => {
                    self.counters.interface_attach_failures += 1;
                    tracing::error!(
                        iface,
                        error,
                        "re-attaching the xdp program failed; retrying every second"
                    );
                }
            }
        }
    }

    /// A record from the ring: requests wait for the server's acknowledgement, and an
    /// acknowledgement hands on the requests it covers.
    fn on_capture(&mut self, rec: CapturedRequest) {
        for req in self.acks.push(rec) {
            self.on_acknowledged(req);
        }
        // After the analysed copy went through the engine, so the alert shows it in the
        // session's history.
        for c in self.acks.take_conflicts() {
            if self.port_captured(c.server.port()) {
                let outcome = self.engine.on_conflicting_copies(&c, self.enforcer.len());
                self.apply(outcome);
            }
        }
    }

    /// The program filters up to KERNEL_PORTS ports itself; this covers longer lists and
    /// records captured just before a reload changed the ports.
    fn port_captured(&self, port: u16) -> bool {
        self.config.ports.is_empty() || self.config.ports.contains(&port)
    }

    fn on_acknowledged(&mut self, req: CapturedRequest) {
        if !self.port_captured(req.server.port()) {
            // Counted per request: the pieces of a filtered request go with it.
            self.counters.port_filtered += u64::from(req.piece == 0);
            return;
        }
        for req in self.reassembler.push(req) {
            self.on_request(req);
        }
    }

    /// A whole request (or all that was captured of it): logged when asked, then the engine.
    fn on_request(&mut self, req: CapturedRequest) {
        if let Some(parser) = &mut self.request_log {
            for line in request_lines(parser, &req) {
                if self.out.try_send(line).is_err() {
                    self.counters.alerts_dropped += 1;
                }
            }
        }
        let Ok(outcome) = self.engine.on_capture(
            req.ts_unix_ns,
            req.client.ip(),
            &req.data,
            self.enforcer.len(),
        ) else {
            return; // counted by the engine under its skip reason
        };
        self.apply(outcome);
    }

    /// Prints the alerts and carries out the block an engine outcome orders.
    fn apply(&mut self, outcome: Outcome) {
        for alert in outcome.alerts {
            let line = serde_json::to_string(&alert).unwrap_or_default();
            if self.out.try_send(line).is_err() {
                self.counters.alerts_dropped += 1;
            }
        }
        if let Some(order) = outcome.block {
            let net = IpNet::from(order.client);
            match self.enforcer.block(net, order.ttl) {
                Ok(()) => {
                    self.block_reasons.insert(net, order.reason);
                }
                Err(e) => {
                    self.counters.blocks_failed += 1;
                    tracing::error!(%net, error = %e, "block failed");
                }
            }
        }
    }

    fn on_control(&mut self, request: &Request) -> Response {
        match self.handle(request) {
            Ok(r) => r,
            Err(e) => Response::error(format!("{e:#}")),
        }
    }

    fn handle(&mut self, request: &Request) -> anyhow::Result<Response> {
        Ok(match request {
            Request::Status => Response::ok(self.status()),
            Request::Endpoints => Response::ok(
                self.engine
                    .discovery()
                    .operations()
                    .into_iter()
                    .filter(|o| o.merged_into.is_none())
                    .map(|o| EndpointRow {
                        operation: o.name,
                        count: o.count,
                        source: Some(format!("{:?}", o.source).to_lowercase()),
                    })
                    .collect::<Vec<_>>(),
            ),
            Request::Sequences { top } => Response::ok(
                self.engine
                    .sequences(*top)
                    .into_iter()
                    .map(|s| SequenceRow {
                        ops: s.ops,
                        occurrences: u64::from(s.occurrences),
                        precedence_score: s.precedence_score,
                        interval: crate::control::api::Interval {
                            lower: s.lower,
                            upper: s.upper,
                        },
                    })
                    .collect::<Vec<_>>(),
            ),
            Request::Sessions { limit } => Response::ok(self.sessions(*limit)),
            Request::Graph { view, top } => {
                Response::ok(crate::graph::build(&self.engine, *view, *top))
            }
            Request::RulesList => Response::ok(self.rule_rows()),
            Request::RulesAdd { toml } => {
                let added = RuleFile::from_toml_str(toml)?;
                let config = self.config.rule_file();
                let in_config = rule_ids(&config);
                if let Some(id) = rule_ids(&added)
                    .into_iter()
                    .find(|id| in_config.contains(id))
                {
                    anyhow::bail!(
                        "rule {id} is defined in the config file: give this one another id, or edit the file and reload (systemctl reload precedent)"
                    );
                }
                let mut runtime = self.runtime_rules.clone();
                runtime.rules.extend(added.rules.iter().cloned());
                runtime.deny.extend(added.deny.iter().cloned());
                self.replace_runtime_rules(runtime)?;
                let ids = added
                    .rules
                    .iter()
                    .map(|r| r.id.clone())
                    .chain(added.deny.iter().map(|d| d.id.clone()))
                    .collect();
                Response::ok(RulesAdded { added: ids })
            }
            Request::RulesRemove { id } => {
                let in_config = rule_ids(&self.config.rule_file()).contains(id.as_str());
                let mut runtime = self.runtime_rules.clone();
                // A runtime rule the config file's shadows goes first: it is the one removable.
                if !runtime.remove(id) {
                    if in_config {
                        anyhow::bail!(
                            "rule {id} is defined in the config file: edit the file and reload (systemctl reload precedent)"
                        );
                    }
                    anyhow::bail!("no rule with id {id}");
                }
                self.replace_runtime_rules(runtime)?;
                Response::ok(Ack {
                    message: if in_config {
                        format!(
                            "runtime rule {id} removed; the config file's rule {id} stays in force"
                        )
                    } else {
                        format!("rule {id} removed")
                    },
                })
            }
            Request::RulesSuggest { min_score } => {
                let rules = self.engine.suggest_rules(*min_score, 200);
                let toml = RuleFile {
                    rules: rules.clone(),
                    deny: Vec::new(),
                }
                .to_toml_string();
                let rows = rules
                    .iter()
                    .map(|r| RuleRow::from_rule(r, RuleSource::Runtime, 0))
                    .collect();
                Response::ok(RuleSuggestions { rules: rows, toml })
            }
            Request::BlocksList => Response::ok(
                self.enforcer
                    .blocks()?
                    .iter()
                    .map(|b| BlockRow::from_block(b, self.block_reasons.get(&b.net).cloned()))
                    .collect::<Vec<_>>(),
            ),
            Request::BlocksAdd { net, ttl } => {
                let ttl = ttl.unwrap_or(self.config.decide.block_ttl);
                self.enforcer.block(*net, ttl)?;
                self.block_reasons.insert(net.trunc(), "manual".into());
                Response::ok(Ack {
                    message: format!(
                        "{} blocked for {}",
                        net.trunc(),
                        humantime::format_duration(ttl)
                    ),
                })
            }
            Request::BlocksRemove { net } => {
                if !self.enforcer.unblock(*net)? {
                    anyhow::bail!("{} is not blocked", net.trunc());
                }
                self.block_reasons.remove(&net.trunc());
                Response::ok(Ack {
                    message: format!("{} unblocked", net.trunc()),
                })
            }
            Request::ModeGet => Response::ok(ModeReport {
                mode: self.engine.mode(),
                previous: None,
            }),
            Request::ModeSet { mode } => {
                let previous = self.engine.mode();
                self.engine.set_mode(*mode);
                tracing::info!(%previous, mode = %mode, "mode changed");
                Response::ok(ModeReport {
                    mode: *mode,
                    previous: Some(previous),
                })
            }
            Request::ModelSave => {
                let bytes = self.state.save_view::<Learned>(&self.engine.learned())?;
                Response::ok(ModelReport {
                    action: "saved".into(),
                    path: Some(self.state.file_path::<Learned>()),
                    bytes: Some(bytes),
                    size: self.model_size(),
                })
            }
            Request::ModelLoad { path } => {
                let (learned, file) = match path {
                    // A file the operator named (`replay --model-out` writes any name): read as
                    // it is, and damage is an error that says why. Nothing is moved aside.
                    Some(p) => {
                        let learned = crate::state::load_from_path::<Learned>(p).map_err(|e| {
                            // The shipped unit runs the daemon with PrivateTmp and ProtectHome:
                            // a file the operator sees under /tmp or /home is not there for it.
                            let hint = match &e {
                                crate::state::StateError::Missing { .. }
                                | crate::state::StateError::Io { .. } => format!(
                                    " (the daemon sees files as its systemd unit lets it: not the \
                                     caller's /tmp nor /home; copy the file into {} and load it \
                                     from there)",
                                    self.state.path().display()
                                ),
                                _ => String::new(),
                            };
                            anyhow::anyhow!("{e}{hint}")
                        })?;
                        (learned, p.clone())
                    }
                    // The state directory's copy, read the way a start reads it.
                    None => {
                        let file = self.state.file_path::<Learned>();
                        let learned = self
                            .state
                            .load::<Learned>()?
                            .into_value()
                            .with_context(|| format!("no usable model in {}", file.display()))?;
                        (learned, file)
                    }
                };
                self.engine.set_learned(learned);
                Response::ok(ModelReport {
                    action: "loaded".into(),
                    path: Some(file),
                    bytes: None,
                    size: self.model_size(),
                })
            }
            Request::ModelReset => {
                self.engine.reset_learned(&self.config.engine())?;
                Response::ok(ModelReport {
                    action: "reset".into(),
                    path: None,
                    bytes: None,
                    size: self.model_size(),
                })
            }
        })
    }

    /// The model's size as `status` and the `model` commands report it.
    fn model_size(&self) -> ModelSize {
        let memory = self.engine.model().memory();
        ModelSize {
            operations: self.engine.discovery().stats().operations as u64,
            contexts: memory.contexts as u64,
            bytes: memory.bytes as u64,
        }
    }

    fn status(&self) -> StatusReport {
        let mut userspace = BTreeMap::new();
        userspace.insert(
            "engine_overflow".into(),
            self.reader_overflow.load(Ordering::Relaxed),
        );
        userspace.insert("requests".into(), self.engine.counters().requests);
        userspace.insert("skipped".into(), self.engine.counters().skipped);
        for (reason, n) in self.engine.skips().iter() {
            userspace.insert(format!("skipped_{reason}"), n);
        }
        userspace.insert("port_filtered".into(), self.counters.port_filtered);
        let rc = self.reassembler.counters();
        userspace.insert("requests_reassembled".into(), rc.reassembled);
        userspace.insert("requests_incomplete".into(), rc.incomplete);
        userspace.insert("stray_pieces".into(), rc.stray_pieces);
        userspace.insert("requests_inside_body".into(), rc.inside_body);
        userspace.insert("requests_retransmitted".into(), rc.retransmitted);
        userspace.insert("request_start_conflicts".into(), rc.start_conflicts);
        let ac = self.acks.counters();
        userspace.insert("requests_acknowledged".into(), ac.acknowledged);
        userspace.insert("requests_unacknowledged".into(), ac.unacknowledged);
        userspace.insert("requests_stale".into(), ac.stale);
        userspace.insert("requests_superseded".into(), ac.superseded);
        userspace.insert("requests_conflicting".into(), ac.conflicting);
        userspace.insert("piece_copies_dropped".into(), ac.piece_copies);
        userspace.insert("ack_wait_overflow".into(), ac.overflow);
        let pc = self.engine.proxy_counters();
        userspace.insert("client_from_header".into(), pc.client_from_header);
        userspace.insert("client_header_missing".into(), pc.client_header_missing);
        userspace.insert("client_header_invalid".into(), pc.client_header_invalid);
        userspace.insert("alerts_dropped".into(), self.counters.alerts_dropped);
        userspace.insert("blocks_failed".into(), self.counters.blocks_failed);
        userspace.insert(
            "state_save_failures".into(),
            self.counters.state_save_failures,
        );
        userspace.insert("interfaces_lost".into(), self.counters.interfaces_lost);
        userspace.insert(
            "interfaces_reattached".into(),
            self.counters.interfaces_reattached,
        );
        userspace.insert(
            "interface_attach_failures".into(),
            self.counters.interface_attach_failures,
        );
        let sc = self.engine.sessions().counters();
        userspace.insert("sessions_created".into(), sc.created);
        userspace.insert("sessions_expired".into(), sc.expired);
        userspace.insert("sessions_evicted".into(), sc.evicted);
        userspace.insert("sessions_evicted_per_client".into(), sc.evicted_per_client);
        let ms = self.engine.model().stats();
        userspace.insert("model_contexts_evicted".into(), ms.contexts_evicted);
        userspace.insert("model_contexts_refused".into(), ms.contexts_refused);
        let d = self.engine.decider().counters();
        userspace.insert("blocks_ordered".into(), d.blocks_ordered);
        userspace.insert("would_block".into(), d.would_block);
        let mut alerts: BTreeMap<String, u64> = d
            .alerts_by_signal
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        alerts.extend(
            d.alerts_by_rule
                .iter()
                .map(|(k, v)| (format!("rule:{k}"), *v)),
        );
        StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            mode: self.engine.mode(),
            uptime_secs: self.started.elapsed().as_secs(),
            interfaces: self
                .datapath
                .attachments()
                .into_iter()
                .map(|a| InterfaceStatus { name: a.iface, ifindex: a.ifindex, attach_mode: a.mode })
                .collect(),
            interfaces_missing: self.watcher.missing(&self.datapath),
            state_save_error: self.state_error.clone(),
            kernel_counters: self
                .datapath
                .counters()
                .map(|c| c.iter().map(|(k, v)| (k.to_string(), v)).collect())
                .unwrap_or_default(),
            userspace_counters: userspace,
            model: self.model_size(),
            endpoints: self.engine.discovery().operations().iter().filter(|o| o.merged_into.is_none()).count() as u64,
            sessions_live: sc.live as u64,
            requests_waiting: (self.reassembler.waiting() + self.acks.waiting()) as u64,
            blocks_active: self.enforcer.len() as u64,
            alerts_by_signal: alerts,
            enforcement_suspended: self
                .engine
                .decider()
                .guard_tripped()
                .then(|| "blocks would exceed decide.max_block_share of active clients; set the mode to enforce again to resume".into()),
        }
    }

    /// Live sessions, most surprising first.
    fn sessions(&self, limit: usize) -> Vec<SessionRow> {
        let d = self.engine.discovery();
        let mut rows: Vec<SessionRow> = self
            .engine
            .sessions()
            .sessions()
            .map(|s| SessionRow {
                key: s.key.short(),
                client: s.client,
                steps: s.step_count,
                last_operation: s
                    .history()
                    .last()
                    .and_then(|st| d.name(d.canonical(st.op)))
                    .map(str::to_owned),
                last_seen: UNIX_EPOCH + Duration::from_nanos(s.last_seen_ns),
                surprise: f64::from(s.surprise.recent),
            })
            .collect();
        rows.sort_by(|a, b| b.surprise.total_cmp(&a.surprise));
        rows.truncate(limit);
        rows
    }

    fn rule_rows(&self) -> Vec<RuleRow> {
        let hits = &self.engine.decider().counters().alerts_by_rule;
        let hit = |id: &str| hits.get(id).copied().unwrap_or(0);
        let config = self.config.rule_file();
        let in_config = rule_ids(&config);
        let mut rows = Vec::new();
        for (file, source) in [
            (&config, RuleSource::Config),
            (&self.runtime_rules, RuleSource::Runtime),
        ] {
            rows.extend(
                file.rules
                    .iter()
                    .map(|r| RuleRow::from_rule(r, source, hit(&r.id))),
            );
            rows.extend(
                file.deny
                    .iter()
                    .map(|r| RuleRow::from_deny(r, source, hit(&r.id))),
            );
        }
        // A runtime rule the config file's shadows: its hits are the other's.
        for row in &mut rows {
            if row.source == RuleSource::Runtime && in_config.contains(row.id.as_str()) {
                row.shadowed = true;
                row.hits = 0;
            }
        }
        rows
    }

    /// Saves what was learned, the runtime rules and the blocks. Failures are logged and
    /// counted; protection carries on (a full disk must not stop blocking).
    fn save_state(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let result = (|| -> anyhow::Result<u64> {
            let bytes = self.state.save_view::<Learned>(&self.engine.learned())?;
            self.state
                .save_view::<SavedSessions>(&self.engine.saved_sessions())?;
            self.save_runtime_rules(&self.runtime_rules)?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let blocks = self
                .enforcer
                .blocks()?
                .into_iter()
                .filter(|b| !b.remaining.is_zero())
                .map(|b| SavedBlock {
                    net: b.net.to_string(),
                    expires: (now + b.remaining).as_secs(),
                    reason: self
                        .block_reasons
                        .get(&b.net)
                        .cloned()
                        .unwrap_or_else(|| "unknown".into()),
                })
                .collect();
            self.state.save(&SavedBlocks { blocks })?;
            Ok(bytes)
        })();
        match &result {
            Ok(bytes) => {
                if self.state_error.take().is_some() {
                    tracing::info!("state saves work again");
                }
                tracing::info!(
                    model_bytes = bytes,
                    took_ms = started.elapsed().as_millis() as u64,
                    "state saved"
                )
            }
            Err(e) => {
                self.counters.state_save_failures += 1;
                let e = format!("{e:#}");
                tracing::error!(error = %e, "saving state failed; protection continues");
                self.state_error = Some(e);
            }
        }
        result.map(|_| ())
    }

    fn save_runtime_rules(&self, runtime: &RuleFile) -> anyhow::Result<()> {
        self.state.save(&RuntimeRules {
            toml: runtime.to_toml_string(),
        })?;
        Ok(())
    }

    /// `rules add` and `rules remove`: checked, saved, and only then in force, so a failed
    /// save (a full disk) changes nothing and the rules in force are those a restart loads.
    fn replace_runtime_rules(&mut self, runtime: RuleFile) -> anyhow::Result<()> {
        let (all, _) = merge_rules(&self.config.rule_file(), &runtime)?;
        self.save_runtime_rules(&runtime)
            .context("saving the runtime rules failed, so the rules in force are unchanged")?;
        // Checked by `merge_rules` as `set_rules` checks them: this does not fail.
        self.engine.set_rules(all)?;
        self.runtime_rules = runtime;
        Ok(())
    }

    /// SIGHUP: re-read the config file; a bad file is rejected and the running one kept.
    fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            tracing::warn!("SIGHUP: running on built-in defaults, no config file to reload");
            return;
        };
        notify::reloading();
        match self.apply_config(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "configuration reloaded");
                notify::ready("configuration reloaded");
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %format!("{e:#}"), "reload rejected; keeping the running configuration");
                notify::ready("reload rejected; running the previous configuration");
            }
        }
    }

    /// Applies the config file at `path` wholly or not at all. Whatever can refuse it is asked
    /// before anything changes: the file's own checks, the rules with the runtime ones, and
    /// the engine on a copy of its discovery (which holds templates a fresh engine, as `config
    /// check` builds, does not). The datapath's settings and the allowlist come next, undone
    /// if one fails; the engine's steps, which cannot be undone, come last.
    fn apply_config(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut new = Config::load(path)?;
        self.overrides.apply(&mut new);
        let (rules, shadowed) = merge_rules(&new.rule_file(), &self.runtime_rules)?;
        let openapi = match new
            .openapi
            .as_ref()
            .filter(|&d| Some(d) != self.config.openapi.as_ref())
        {
            Some(doc) => Some((doc.clone(), read_openapi(doc)?)),
            None => None,
        };
        self.try_engine_changes(&new, &rules, openapi.as_ref())?;
        self.apply_datapath(&new)?;

        // Tried above on the same state, so none of these fails.
        self.engine.reconfigure(&new.engine())?;
        self.engine.set_rules(rules)?;
        warn_shadowed(&shadowed);
        if let Some((doc, text)) = &openapi {
            import_openapi(&mut self.engine, doc, text)?;
        }
        // Only a changed `mode` in the file applies: one set with `precedent mode` stays
        // through a reload that edits something else (a rule, say).
        if new.mode != self.config.mode && new.mode != self.engine.mode() {
            tracing::info!(mode = %new.mode, "mode set by reloaded config");
            self.engine.set_mode(new.mode);
        }
        self.reassembler.set_capture_len(new.capture_len as usize);
        // Read once at the start: the attachments, the ring's size and pinning, the state
        // directory and socket, the log setup, the metrics listener and the save timer
        // ([http], [session], [model] and [discovery] apply above, through `reconfigure`).
        let c = &self.config;
        for (key, changed) in [
            ("interfaces", c.interfaces != new.interfaces),
            ("attach_mode", c.attach_mode != new.attach_mode),
            ("state_dir", c.state_dir != new.state_dir),
            ("socket", c.socket != new.socket),
            ("wait_for_acks", c.wait_for_acks != new.wait_for_acks),
            (
                "ring_buffer_bytes",
                c.ring_buffer_bytes != new.ring_buffer_bytes,
            ),
            ("pin_maps", c.pin_maps != new.pin_maps),
            ("save_every", c.save_every != new.save_every),
            ("log_format", c.log_format != new.log_format),
            ("log_requests", c.log_requests != new.log_requests),
            ("metrics_listen", c.metrics_listen != new.metrics_listen),
        ] {
            if changed {
                tracing::warn!(
                    key,
                    "changed in the config file; takes effect at the next restart"
                );
            }
        }
        self.config = new;
        Ok(())
    }

    /// What `reconfigure`, `set_rules` and the OpenAPI import would do to the engine, done to
    /// an engine built on a copy of the live discovery (with an empty model: the model's
    /// settings cannot fail once the file passed its checks). Silent: the real steps log.
    fn try_engine_changes(
        &self,
        new: &Config,
        rules: &RuleFile,
        openapi: Option<&(PathBuf, String)>,
    ) -> anyhow::Result<()> {
        let cfg = new.engine();
        let discovery = self.engine.discovery().clone();
        tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
            let model = crate::model::Model::new(cfg.model.clone())?;
            let mut trial =
                Engine::with_state(&cfg, rules.clone(), [0; 16], new.mode, model, discovery)?;
            if let Some((doc, text)) = openapi {
                import_openapi(&mut trial, doc, text)?;
            }
            Ok(())
        })
    }

    /// The reload's changes to the XDP program's settings and to the allowlist. On a failure
    /// those already made are undone, so the kernel runs as the running configuration says.
    fn apply_datapath(&mut self, new: &Config) -> anyhow::Result<()> {
        let mut done = Vec::new();
        let result = self.datapath_steps(new, &mut done);
        if result.is_err() {
            for step in done.into_iter().rev() {
                let undone = match step {
                    Undo::CaptureLen(len) => self.datapath.set_capture_len(len).map_err(Into::into),
                    Undo::Ports(ports) => self.datapath.set_ports(&ports).map_err(Into::into),
                    Undo::PassFragments(pass) => {
                        self.datapath.set_pass_fragments(pass).map_err(Into::into)
                    }
                    Undo::Allow(net) => self.enforcer.allow(net).map_err(anyhow::Error::from),
                    Undo::Disallow(net) => self
                        .enforcer
                        .disallow(net)
                        .map(|_| ())
                        .map_err(anyhow::Error::from),
                };
                if let Err(e) = undone {
                    tracing::error!(error = %format!("{e:#}"), "undoing part of a rejected reload failed: the xdp program's settings or the allowlist differ from the running configuration until the next reload");
                }
            }
        }
        result
    }

    fn datapath_steps(&mut self, new: &Config, done: &mut Vec<Undo>) -> anyhow::Result<()> {
        let old = &self.config;
        if new.capture_len != old.capture_len {
            self.datapath.set_capture_len(new.capture_len)?;
            done.push(Undo::CaptureLen(old.capture_len));
        }
        if new.ports != old.ports {
            self.datapath.set_ports(&new.ports)?;
            done.push(Undo::Ports(old.ports.clone()));
        }
        if new.pass_tcp_fragments != old.pass_tcp_fragments {
            self.datapath.set_pass_fragments(new.pass_tcp_fragments)?;
            done.push(Undo::PassFragments(old.pass_tcp_fragments));
        }
        // Removals first: the maps are bounded, and an address on both lists is not touched.
        for net in old.allowlist.iter().filter(|n| !new.allowlist.contains(n)) {
            if self.enforcer.disallow(*net)? {
                done.push(Undo::Allow(*net));
            }
        }
        for net in new.allowlist.iter().filter(|n| !old.allowlist.contains(n)) {
            self.enforcer.allow(*net)?;
            done.push(Undo::Disallow(*net));
        }
        Ok(())
    }

    /// Says so when the wall clock was stepped since the start: the engine keeps to its
    /// timeline (sessions and waiting requests are not expired by the step), so alert and
    /// session times are off wall time by the step until the next restart.
    fn log_clock_step(&mut self) {
        let drift_s = (self.timeline.drift_ns() / 1_000_000_000) as i64;
        if drift_s.abs() >= 2 && (drift_s - self.drift_logged_s).abs() >= 2 {
            tracing::warn!(
                step_secs = drift_s,
                "the wall clock was stepped since the daemon started: times in alerts and sessions stay on the daemon's clock (off wall time by the step) until a restart"
            );
            self.drift_logged_s = drift_s;
        }
    }

    fn log_counters(&self) {
        let kernel = self
            .datapath
            .counters()
            .map(|c| serde_json::to_string(&c).unwrap_or_default())
            .unwrap_or_default();
        tracing::info!(
            kernel = %kernel,
            requests = self.engine.counters().requests,
            skipped = self.engine.counters().skipped,
            engine_overflow = self.reader_overflow.load(Ordering::Relaxed),
            // Requests never acknowledged, and those pushed out of a full wait: a spoofed
            // request flood shows here first.
            unacknowledged = self.acks.counters().unacknowledged,
            ack_wait_overflow = self.acks.counters().overflow,
            alerts_dropped = self.counters.alerts_dropped,
            sessions = self.engine.sessions().counters().live,
            blocks = self.enforcer.len(),
            "counters"
        );
    }
}

/// In the state directory, which two daemons would share destructively (the socket can be
/// set apart with `--socket`, the state directory seldom is).
const LOCK_FILE: &str = "daemon.lock";

/// Takes the state directory's lock (flock: the kernel releases it however the process ends,
/// so a killed daemon leaves no stale lock) and writes our pid in the file for the next one's
/// error message.
fn lock_state_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let context = || format!("state directory {}", dir.display());
    // As `StateDir::open` would create it; the lock comes first.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(context)?;
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            // The holder writes its pid just after locking: a start racing it may read none.
            let pid = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .map(|pid| format!("pid {pid}, "))
                .unwrap_or_default();
            anyhow::bail!(
                "another precedent daemon is running ({pid}holding {}); stop it first",
                path.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    // The pid is only for that message: a full disk must not stop a start (protection goes on
    // without saves, see `save_state`).
    if let Err(e) = file
        .set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
    {
        tracing::warn!(file = %path.display(), error = %e, "could not write our pid in the lock file");
    }
    Ok(file)
}

/// The ids of a rules file, `[[rule]]` and `[[deny]]` alike (they share one namespace).
fn rule_ids(file: &RuleFile) -> HashSet<&str> {
    file.rules
        .iter()
        .map(|r| r.id.as_str())
        .chain(file.deny.iter().map(|d| d.id.as_str()))
        .collect()
}

/// The rules in force, checked together: the config file's, then the runtime ones, except
/// those whose id the config file also uses, which are returned by id. Those are kept (saved,
/// listed, removable) but the file's rule wins: it is what the operator wrote last, as when a
/// rule tried with `rules add` is then written into the file. A clash must not stop a start
/// (systemd would restart the daemon in a loop) nor a reload.
fn merge_rules(config: &RuleFile, runtime: &RuleFile) -> anyhow::Result<(RuleFile, Vec<String>)> {
    let in_config = rule_ids(config);
    let mut shadowed: Vec<String> = rule_ids(runtime)
        .into_iter()
        .filter(|id| in_config.contains(id))
        .map(str::to_owned)
        .collect();
    shadowed.sort();
    let all = RuleFile {
        rules: config
            .rules
            .iter()
            .chain(
                runtime
                    .rules
                    .iter()
                    .filter(|r| !in_config.contains(r.id.as_str())),
            )
            .cloned()
            .collect(),
        deny: config
            .deny
            .iter()
            .chain(
                runtime
                    .deny
                    .iter()
                    .filter(|d| !in_config.contains(d.id.as_str())),
            )
            .cloned()
            .collect(),
    };
    all.validate()?;
    Ok((all, shadowed))
}

fn warn_shadowed(ids: &[String]) {
    if !ids.is_empty() {
        tracing::warn!(
            ids = ids.join(", "),
            "rules added with `precedent rules add` have the ids of rules in the config file: \
             the config file's are in force; `precedent rules remove ID` deletes the runtime copy"
        );
    }
}

fn read_openapi(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading OpenAPI document {}", path.display()))
}

/// `doc` is the text of the document at `path`.
fn import_openapi(engine: &mut Engine, path: &Path, doc: &str) -> anyhow::Result<()> {
    let (added, skipped) = engine
        .import_openapi(doc)
        .with_context(|| format!("OpenAPI document {}", path.display()))?;
    tracing::info!(path = %path.display(), added, skipped = skipped.len(), "OpenAPI templates imported");
    Ok(())
}

/// Re-applies saved blocks when the maps are not pinned (pinned maps kept them already), and
/// returns the reasons either way.
fn restore_blocks(state: &StateDir, enforcer: &mut Enforcer) -> HashMap<IpNet, String> {
    let saved = match state.load::<SavedBlocks>() {
        Ok(l) => l.into_value().unwrap_or_default(),
        Err(e) => {
            tracing::error!(error = %e, "saved blocks unreadable; starting without them");
            SavedBlocks::default()
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // Pinned maps that kept a block keep its drop count and expiry; those emptied since (a
    // reboot clears bpffs, so do pins removed by hand) get the saved blocks back.
    let held: std::collections::HashSet<IpNet> = match enforcer.blocks() {
        Ok(blocks) => blocks
            .into_iter()
            .filter(|b| !b.remaining.is_zero())
            .map(|b| b.net)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "block maps unreadable; saved blocks applied again");
            Default::default()
        }
    };
    let mut reasons = HashMap::new();
    let mut applied = 0;
    for b in saved.blocks {
        let Ok(net) = b.net.parse::<IpNet>() else {
            continue;
        };
        if b.expires <= now {
            continue;
        }
        if !held.contains(&net.trunc()) {
            if let Err(e) = enforcer.block(net, Duration::from_secs(b.expires - now)) {
                tracing::warn!(%net, error = %e, "saved block not restored");
                continue;
            }
            applied += 1;
        }
        reasons.insert(net, b.reason);
    }
    if !reasons.is_empty() {
        tracing::info!(
            blocks = reasons.len(),
            from_pinned_maps = reasons.len() - applied,
            "blocks restored"
        );
    }
    reasons
}

/// One `"kind":"request"` JSON line for `log_requests`.
/// The `--log-requests` lines of a capture: one per request in it, pipelined ones included.
fn request_lines(parser: &mut crate::http::Parser, req: &CapturedRequest) -> Vec<String> {
    #[derive(Serialize)]
    struct RequestLine<'a> {
        kind: &'static str,
        ts: String,
        client: String,
        server: String,
        method: &'a str,
        path: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        query: Option<&'a str>,
        version: &'a str,
        /// The capture ended before the request did (long headers); the request line is whole.
        truncated: bool,
    }
    let mut lines = Vec::new();
    parser.each_request(&req.data, |_, _, parsed| {
        let Ok(parsed) = parsed else { return };
        lines.extend(
            serde_json::to_string(&RequestLine {
                kind: "request",
                ts: crate::decide::rfc3339(req.ts_unix_ns),
                client: req.client.to_string(),
                server: req.server.to_string(),
                method: parsed.method.as_str(),
                path: parsed.path,
                query: parsed.query,
                version: parsed.version,
                truncated: req.truncated(),
            })
            .ok(),
        );
    });
    lines
}

/// Lines go to stdout from their own thread through a bounded queue, so a slow reader of
/// stdout (journald under pressure, a full pipe) never stalls the engine.
fn spawn_stdout_writer() -> std_mpsc::SyncSender<String> {
    let (tx, rx) = std_mpsc::sync_channel::<String>(ALERT_DEPTH);
    std::thread::Builder::new()
        .name("stdout".into())
        .spawn(move || {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            while let Ok(line) = rx.recv() {
                let mut ok = writeln!(out, "{line}").is_ok();
                // Drain what is queued, then flush once.
                while let Ok(more) = rx.try_recv() {
                    ok &= writeln!(out, "{more}").is_ok();
                }
                if !ok || out.flush().is_err() {
                    tracing::error!("writing to stdout failed");
                }
            }
        })
        .expect("spawning the stdout writer thread");
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> RuleFile {
        RuleFile::from_toml_str(text).unwrap()
    }

    #[test]
    fn a_runtime_rule_with_a_config_rules_id_gives_way_to_it() {
        let config = rules(
            r#"
            [[rule]]
            id = "transfer"
            operation = "POST /transfer"
            preceded_by = ["GET /balance"]
            action = "block"
            [[deny]]
            id = "no-export"
            sequence = ["GET /login", "GET /export"]
            "#,
        );
        let runtime = rules(
            r#"
            [[rule]]
            id = "transfer"
            operation = "POST /transfer"
            preceded_by = ["GET /accounts"]
            [[rule]]
            id = "no-export"
            operation = "GET /export"
            preceded_by = ["GET /report"]
            [[deny]]
            id = "own"
            sequence = ["GET /a", "GET /b"]
            "#,
        );
        let (all, shadowed) = merge_rules(&config, &runtime).unwrap();
        assert_eq!(shadowed, ["no-export", "transfer"]);
        assert_eq!(
            all.rules, config.rules,
            "the config file's rules are in force"
        );
        assert_eq!(all.deny.len(), 2);
        assert_eq!(all.deny[0], config.deny[0]);
        assert_eq!(all.deny[1].id, "own", "the others stay in force");
    }

    #[test]
    fn runtime_rules_still_may_not_share_an_id() {
        let one =
            rules("[[rule]]\nid = \"r\"\noperation = \"POST /a\"\npreceded_by = [\"GET /b\"]");
        let runtime = RuleFile {
            rules: vec![one.rules[0].clone(), one.rules[0].clone()],
            deny: Vec::new(),
        };
        let e = merge_rules(&RuleFile::default(), &runtime).unwrap_err();
        assert!(e.to_string().contains("duplicate rule id"), "{e}");
    }
}
