//! The detection engine: one request in, alerts and block orders out. It chains the stages
//! (`http` → `discovery` → `session` → `model` + `rules` → `decide`) and owns all their state.
//!
//! Synchronous and deterministic: time comes in with each request, so the daemon (live
//! captures) and `precedent replay` (access logs) drive exactly the same code.
use std::net::IpAddr;

use ipnet::IpNet;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use thiserror::Error;

use crate::{
    acked::Conflict,
    decide::{Alert, BlockOrder, Context, DecideConfig, Decider, Finding, Mode, Signal},
    discovery::{Discovery, DiscoveryConfig, DiscoveryError, OpId},
    http::{HttpConfig, Method, Parser, SelectedHeaders, SkipCounters, SkipReason},
    model::{
        Model, ModelConfig, ModelError, Op, SignalConfig,
        signals::{
            RunBasis, long_run, missing_precedent, rare_transition, replay, surprising_session,
        },
    },
    proxy::{ProxyConfig, ProxyCounters},
    rules::{HitKind, RuleError, RuleFile, RuleSet, SequenceCandidate},
    session::{IdentifierSource, Session, SessionConfig, SessionKeyer, SessionTable, StepKind},
};

/// Everything the engine needs to know (the engine part of the config file).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    pub http: HttpConfig,
    pub discovery: DiscoveryConfig,
    pub session: SessionConfig,
    pub model: ModelConfig,
    pub signals: SignalConfig,
    pub decide: DecideConfig,
    /// Clients that are never blocked (alerts still say what would have happened).
    pub allowlist: Vec<IpNet>,
    /// Reverse proxies and load balancers whose requests name their client in a header.
    pub proxy: ProxyConfig,
}

/// The messages carry the stage's error, which is therefore not also its `source()`: a
/// report that prints the chain would say it twice.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("discovery: {0}")]
    Discovery(DiscoveryError),
    #[error("model: {0}")]
    Model(ModelError),
    #[error("rules: {0}")]
    Rules(RuleError),
    #[error("{0}")]
    Config(String),
}

impl From<DiscoveryError> for EngineError {
    fn from(e: DiscoveryError) -> Self {
        EngineError::Discovery(e)
    }
}

impl From<ModelError> for EngineError {
    fn from(e: ModelError) -> Self {
        EngineError::Model(e)
    }
}

impl From<RuleError> for EngineError {
    fn from(e: RuleError) -> Self {
        EngineError::Rules(e)
    }
}

/// What one request led to.
#[derive(Debug, Default)]
pub struct Outcome {
    pub alerts: Vec<Alert>,
    pub block: Option<BlockOrder>,
}

/// Bits of `Session::alerted` for once-per-session signals.
const ALERTED_SURPRISE: u8 = 1;
/// A session's first confidently rare transition is news; on a large API a long benign session
/// can hold several, and repeating the alert for each adds noise, not information.
const ALERTED_RARE: u8 = 2;
/// The session's current run of identical requests was alerted as a replay. It is not learned
/// when it ends: the replay judgement rests on how rarely runs go on, and a handful of learned
/// replays would teach it that they do (the threshold length would creep up with every attack
/// it saw). Runs that stay below the threshold are learned as ever, so an operation whose
/// visitors start reloading more raises its own threshold.
const IN_REPLAY: u8 = 4;

/// Counters for `status` and the replay summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineCounters {
    pub requests: u64,
    pub skipped: u64,
}

pub struct Engine {
    /// Apart from the rest so a parsed request (which borrows the parser's buffers) can be
    /// fed to the other stages without copying.
    parser: Parser,
    /// The parser's configuration before the proxy header is added (a reload may change it).
    http: HttpConfig,
    core: Core,
}

/// `http` plus the header trusted proxies name the client in.
fn with_proxy_header(http: &HttpConfig, proxy: &ProxyConfig) -> HttpConfig {
    let mut http = http.clone();
    if !proxy.trusted.is_empty() {
        http.session_headers.push(proxy.header.name().into());
    }
    http
}

/// The parser's configuration: `[http]`, keeping every header a session identifier reads
/// (the header trusted proxies name the client in is added by [`parser_for`]).
fn http_config(cfg: &EngineConfig) -> HttpConfig {
    let mut http = cfg.http.clone();
    for source in &cfg.session.identifiers {
        let name = match source {
            IdentifierSource::Header { name } => name,
            IdentifierSource::JwtClaim { header, .. } => header,
            IdentifierSource::Cookie { .. } => continue,
        };
        if !http
            .session_headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
        {
            http.session_headers.push(name.to_ascii_lowercase());
        }
    }
    http
}

fn parser_for(http: &HttpConfig, proxy: &ProxyConfig) -> Parser {
    Parser::new(with_proxy_header(http, proxy))
}

/// Every stage after parsing.
struct Core {
    discovery: Discovery,
    keyer: SessionKeyer,
    sessions: SessionTable,
    model: Model,
    rules: RuleSet,
    decider: Decider,
    signals: SignalConfig,
    allowlist: Vec<IpNet>,
    proxy: ProxyConfig,
    proxy_counters: ProxyCounters,
    skips: SkipCounters,
    counters: EngineCounters,
    /// Requests processed before alerts may fire (replay's warm-up); 0 in the daemon, where
    /// the model's own per-context minimum decides when it knows enough.
    quiet_until: u64,
    n_max: usize,
    /// The configured model and discovery settings, applied to whatever is learned or loaded
    /// (a loaded model carries the settings it was saved with; see [`adopt_config`]).
    model_cfg: ModelConfig,
    discovery_cfg: DiscoveryConfig,
}

impl Engine {
    /// A fresh engine. `secret` keys the session hashes (see `state::load_or_create_secret`).
    pub fn new(
        cfg: &EngineConfig,
        rules: RuleFile,
        secret: [u8; 16],
        mode: Mode,
    ) -> Result<Self, EngineError> {
        let model = Model::new(cfg.model.clone())?;
        let discovery = Discovery::new(cfg.discovery.clone())?;
        Self::with_state(cfg, rules, secret, mode, model, discovery)
    }

    /// An engine resuming from a saved model and discovered endpoints.
    pub fn with_state(
        cfg: &EngineConfig,
        rules: RuleFile,
        secret: [u8; 16],
        mode: Mode,
        model: Model,
        discovery: Discovery,
    ) -> Result<Self, EngineError> {
        cfg.decide.validate().map_err(EngineError::Config)?;
        if cfg.session.n_max != cfg.model.max_order {
            return Err(EngineError::Config(format!(
                "session.n_max ({}) must equal model.max_order ({}): sessions keep the context the model reads",
                cfg.session.n_max, cfg.model.max_order
            )));
        }
        let http = http_config(cfg);
        let (mut model, mut discovery) = (model, discovery);
        adopt_config(&mut model, &mut discovery, &cfg.model, &cfg.discovery)?;
        let n_max = model.config().max_order;
        register_rule_templates(&mut discovery, &rules);
        let mut rules = RuleSet::new(rules)?;
        rules.refresh(&discovery);
        Ok(Self {
            parser: parser_for(&http, &cfg.proxy),
            http,
            core: Core {
                keyer: SessionKeyer::new(secret, cfg.session.identifiers.clone()),
                // Sessions keep the context the model reads: a loaded model keeps its depth.
                sessions: SessionTable::new(SessionConfig {
                    n_max,
                    ..cfg.session.clone()
                }),
                discovery,
                model,
                rules,
                decider: Decider::new(cfg.decide.clone(), mode),
                signals: cfg.signals.clone(),
                allowlist: cfg.allowlist.clone(),
                proxy: cfg.proxy.clone(),
                proxy_counters: ProxyCounters::default(),
                skips: SkipCounters::default(),
                counters: EngineCounters::default(),
                quiet_until: 0,
                n_max,
                model_cfg: cfg.model.clone(),
                discovery_cfg: cfg.discovery.clone(),
            },
        })
    }

    /// No alerts until this many requests have been processed (replay's warm-up).
    pub fn set_warmup(&mut self, requests: u64) {
        self.core.quiet_until = requests;
    }

    /// A request as captured by XDP: raw bytes, possibly truncated. Requests pipelined behind
    /// it in the same bytes are processed too, in order, and their outcomes merged: a request
    /// hidden behind an innocuous one must not go unseen. Only the first request's parse
    /// failure is the capture's error; a later one is counted like any skipped request.
    pub fn on_capture(
        &mut self,
        ts_ns: u64,
        client: IpAddr,
        bytes: &[u8],
        active_blocks: usize,
    ) -> Result<Outcome, SkipReason> {
        let core = &mut self.core;
        let mut merged = Outcome::default();
        let mut first_failure = None;
        self.parser.each_request(bytes, |i, _, parsed| {
            let req = match parsed {
                Ok(r) => r,
                Err(reason) => {
                    core.skips.record(reason);
                    core.counters.skipped += 1;
                    if i == 0 {
                        first_failure = Some(reason);
                    }
                    return;
                }
            };
            let client = core.client(client, &req.headers);
            let (key, _) = core.keyer.key(&req.headers, client);
            let request = core
                .keyer
                .request_hash(req.method, req.host, req.path, req.query);
            let outcome = core.step(
                ts_ns,
                client,
                key,
                request,
                req.method,
                req.host,
                req.path,
                active_blocks,
            );
            merged.alerts.extend(outcome.alerts);
            merged.block = merged.block.take().or(outcome.block);
        });
        match first_failure {
            Some(reason) => Err(reason),
            None => Ok(merged),
        }
    }

    /// Two disagreeing copies of one place in a client's stream, the place acknowledged by the
    /// server (see [`Conflict`]): the server read one of them, precedent analysed the later
    /// (it went through [`Engine::on_capture`] like any request, or as a piece of one), and
    /// which one the server read cannot be told from outside its TCP stack. No TCP stack sends
    /// two versions of the same bytes, so it is evasion or insertion (or, rarely, a copy
    /// corrupted on the way): alerted as `conflicting_copies`, naming both copies of a
    /// request's start by method and path as sent (without the query), and copies of a piece
    /// by their length only (a piece holds header values). Learns nothing; alerts when
    /// `on_capture` would.
    pub fn on_conflicting_copies(&mut self, c: &Conflict, active_blocks: usize) -> Outcome {
        let core = &mut self.core;
        if core.decider.mode() == Mode::Learn || core.counters.requests <= core.quiet_until {
            return Outcome::default();
        }
        let ts_ns = c.ts_unix_ns;
        let peer = c.client.ip();
        let piece =
            |bytes: &[u8]| format!("{} bytes of piece {} of a request", bytes.len(), c.piece);
        // A piece holds no request line, and not necessarily the session's header.
        let by_address = || core.keyer.key(&SelectedHeaders::default(), peer).0;
        let (analysed_line, client, key) = if c.piece > 0 {
            (piece(&c.analysed), peer, by_address())
        } else {
            match self.parser.parse(&c.analysed) {
                Ok(req) => {
                    let (client, _) = core.proxy.client(peer, &req.headers);
                    let (key, _) = core.keyer.key(&req.headers, client);
                    (request_line(req.method, req.path), client, key)
                }
                Err(reason) => (format!("({reason})"), peer, by_address()),
            }
        };
        let replaced_line = if c.piece > 0 {
            piece(&c.replaced)
        } else {
            match self.parser.parse(&c.replaced) {
                Ok(req) => request_line(req.method, req.path),
                Err(reason) => format!("({reason})"),
            }
        };
        let previous = core.sessions.get(&key).map_or_else(Vec::new, |s| {
            let history = s.history();
            let skip = history.len().saturating_sub(core.n_max);
            history
                .iter()
                .skip(skip)
                .map(|st| op_name(&core.discovery, st.op))
                .collect()
        });
        let finding = Finding::Signal {
            signal: Signal::ConflictingCopies,
            explanation: format!(
                "the client sent two different versions of the same bytes of its TCP stream: {replaced_line} and then {analysed_line}; the server read one of them and precedent analysed the second, which no TCP stack does by accident (an insertion or evasion attempt, or a copy corrupted on the way)"
            ),
            numbers: serde_json::json!({
                "replaced": replaced_line,
                "analysed": analysed_line,
                "piece": c.piece,
            }),
        };
        let ctx = Context {
            ts_ns,
            client,
            session: key.short(),
            operation: &analysed_line,
            previous,
            allowlisted: core.never_blocked(client),
        };
        let active_clients = core.sessions.counters().live;
        let (alerts, block) = core
            .decider
            .decide(finding, &ctx, active_clients, active_blocks);
        Outcome { alerts, block }
    }

    /// A request from another source (access log, JSON line), already split into fields.
    #[allow(clippy::too_many_arguments)]
    pub fn on_request(
        &mut self,
        ts_ns: u64,
        client: IpAddr,
        method: Method,
        host: Option<&str>,
        path: &str,
        headers: &SelectedHeaders<'_>,
        active_blocks: usize,
    ) -> Outcome {
        let client = self.core.client(client, headers);
        let (key, _) = self.core.keyer.key(headers, client);
        let request = self.core.keyer.request_hash(method, host, path, None);
        self.core.step(
            ts_ns,
            client,
            key,
            request,
            method,
            host,
            path,
            active_blocks,
        )
    }

    /// Like [`Engine::on_request`] with an explicit session identifier (hashed here like any
    /// other identifier).
    #[allow(clippy::too_many_arguments)]
    pub fn on_request_in_session(
        &mut self,
        ts_ns: u64,
        client: IpAddr,
        method: Method,
        host: Option<&str>,
        path: &str,
        session: &str,
        active_blocks: usize,
    ) -> Outcome {
        let key = self.core.keyer.key_for_value(session);
        let request = self.core.keyer.request_hash(method, host, path, None);
        self.core.step(
            ts_ns,
            client,
            key,
            request,
            method,
            host,
            path,
            active_blocks,
        )
    }

    /// Periodic upkeep: ends idle sessions (learning from them) and lets the model collapse
    /// contexts within its work budget. Call about once a second of traffic time.
    pub fn maintain(&mut self, now_ns: u64) {
        let Core {
            sessions,
            model,
            discovery,
            ..
        } = &mut self.core;
        sessions.sweep_with(now_ns, |s: &Session| {
            // The session's last runs (of identical requests, of its last step) are over.
            if let Some(last) = s.history().last() {
                let op = discovery.canonical(last.op).0;
                if s.alerted & IN_REPLAY == 0 {
                    model.learn_run(op, s.identical_run);
                }
                model.learn_step_run(op, last.count);
            }
            if s.surprise.steps > 0 {
                model.observe_session_surprise(f64::from(s.surprise.mean));
            }
        });
        model.maintain(now_ns);
    }

    pub fn mode(&self) -> Mode {
        self.core.decider.mode()
    }

    pub fn set_mode(&mut self, mode: Mode) {
        self.core.decider.set_mode(mode);
    }

    pub fn decider(&self) -> &Decider {
        &self.core.decider
    }

    pub fn model(&self) -> &Model {
        &self.core.model
    }

    pub fn discovery(&self) -> &Discovery {
        &self.core.discovery
    }

    pub fn sessions(&self) -> &SessionTable {
        &self.core.sessions
    }

    pub fn rules(&self) -> &RuleSet {
        &self.core.rules
    }

    pub fn skips(&self) -> &SkipCounters {
        &self.core.skips
    }

    pub fn counters(&self) -> &EngineCounters {
        &self.core.counters
    }

    /// The parser's configuration: every header it keeps (the session identifiers', the
    /// trusted proxies' client header). Replay keeps the same headers from its records.
    pub fn http_config(&self) -> HttpConfig {
        with_proxy_header(&self.http, &self.core.proxy)
    }

    /// How the clients of requests from trusted proxies were found.
    pub fn proxy_counters(&self) -> &ProxyCounters {
        &self.core.proxy_counters
    }

    /// Replaces the rules (validated first; on error the old ones stay).
    pub fn set_rules(&mut self, file: RuleFile) -> Result<(), RuleError> {
        register_rule_templates(&mut self.core.discovery, &file);
        let mut rules = RuleSet::new(file)?;
        rules.refresh(&self.core.discovery);
        self.core.rules = rules;
        Ok(())
    }

    /// Swaps in another model (loaded from disk or fresh); the sessions keep going.
    pub fn set_model(&mut self, model: Model) {
        self.core.model = model;
    }

    /// Applies settings that can change at run time (SIGHUP): decisions, signal thresholds,
    /// the allowlist, the trusted proxies, `[http]`, `[session]` (live sessions stay; see
    /// [`SessionTable::reconfigure`]), and the model and discovery settings a learned model
    /// can take (see `adopt_config`).
    pub fn reconfigure(&mut self, cfg: &EngineConfig) -> Result<(), EngineError> {
        cfg.decide.validate().map_err(EngineError::Config)?;
        cfg.model.validate()?;
        adopt_config(
            &mut self.core.model,
            &mut self.core.discovery,
            &cfg.model,
            &cfg.discovery,
        )?;
        self.core.model_cfg = cfg.model.clone();
        self.core.discovery_cfg = cfg.discovery.clone();
        self.core.rules.refresh(&self.core.discovery);
        self.core.decider.set_config(cfg.decide.clone());
        self.core.signals = cfg.signals.clone();
        self.core.allowlist = cfg.allowlist.clone();
        let http = http_config(cfg);
        if http != self.http || cfg.proxy != self.core.proxy {
            self.parser = parser_for(&http, &cfg.proxy);
            self.http = http;
            self.core.proxy = cfg.proxy.clone();
        }
        self.core
            .keyer
            .set_identifiers(cfg.session.identifiers.clone());
        // Sessions keep the context the model reads, whose depth a reload does not change.
        self.core.sessions.reconfigure(SessionConfig {
            n_max: self.core.n_max,
            ..cfg.session.clone()
        });
        Ok(())
    }

    /// The model's important sequences with operation names, strongest first.
    pub fn sequences(&self, top: usize) -> Vec<NamedSequence> {
        self.core
            .model
            .important_sequences(top)
            .into_iter()
            .map(|s| NamedSequence {
                ops: s
                    .ops
                    .iter()
                    .map(|o| op_name(&self.core.discovery, OpId(*o)))
                    .collect(),
                occurrences: s.occurrences,
                precedence_score: s.precedence_score,
                lower: s.interval.lower,
                upper: s.interval.upper,
            })
            .collect()
    }

    /// Candidate precedence rules from the important sequences.
    pub fn suggest_rules(&self, min_score: f64, top: usize) -> Vec<crate::rules::Rule> {
        let candidates: Vec<SequenceCandidate> = self
            .sequences(top)
            .into_iter()
            .map(|s| SequenceCandidate {
                ops: s.ops,
                precedence_score: s.precedence_score,
                occurrences: u64::from(s.occurrences),
            })
            .collect();
        crate::rules::suggest(&candidates, min_score, self.core.rules.file())
    }
}

impl Core {
    /// The request's client: its peer, or the client a trusted proxy names (see [`crate::proxy`]).
    fn client(&mut self, peer: IpAddr, headers: &SelectedHeaders<'_>) -> IpAddr {
        if self.proxy.trusted.is_empty() {
            return peer;
        }
        let (client, source) = self.proxy.client(peer, headers);
        self.proxy_counters.record(source);
        client
    }

    /// Allowlisted, or a trusted proxy: one stands in for its clients only when it names
    /// none, and blocking it would cut off every client behind it.
    fn never_blocked(&self, client: IpAddr) -> bool {
        self.allowlist.iter().any(|n| n.contains(&client)) || self.proxy.trusts(client)
    }

    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        ts_ns: u64,
        client: IpAddr,
        key: crate::session::SessionKey,
        request: u64,
        method: Method,
        host: Option<&str>,
        path: &str,
        active_blocks: usize,
    ) -> Outcome {
        self.counters.requests += 1;
        let op = self.discovery.observe(host, method, path);
        let alerting =
            self.decider.mode() != Mode::Learn && self.counters.requests > self.quiet_until;
        let Core {
            sessions,
            model,
            discovery,
            signals,
            rules,
            ..
        } = self;
        let (res, session) = sessions.observe(key, op, client, ts_ns);
        // A run of identical requests (same method, host, path and query) that this request
        // ended is learned: the replay signal judges runs of identical requests, so that is
        // what the model learns. Browsing one template's items is not a run.
        let same_step = res.kind == StepKind::Repeat;
        if let Some(ended) = session.note_request(request, same_step) {
            let replayed = session.alerted & IN_REPLAY != 0;
            session.alerted &= !IN_REPLAY;
            let history = session.history();
            let prev = if same_step {
                history.last()
            } else {
                history.len().checked_sub(2).and_then(|i| history.get(i))
            };
            if let Some(prev) = prev
                && !replayed
            {
                model.learn_run(discovery.canonical(prev.op).0, ended);
            }
        }
        let run = session.identical_run;
        let history = session.history();
        // The context: earlier steps, oldest first, under their current (canonical) ids.
        let context: SmallVec<[Op; 16]> = history
            .iter()
            .take(history.len().saturating_sub(1))
            .map(|s| discovery.canonical(s.op).0)
            .collect();

        let mut findings: SmallVec<[Finding; 2]> = SmallVec::new();
        match res.kind {
            StepKind::NewSession | StepKind::NewStep => {
                // The previous step is over: learn its length (the enumeration signal's run).
                if let Some(prev) = history.len().checked_sub(2).and_then(|i| history.get(i)) {
                    model.learn_step_run(discovery.canonical(prev.op).0, prev.count);
                }
                // Score first, then learn (one walk of the context trie). The session's cursor
                // spares the walk its hash lookups. Intervals are asked for below, only where
                // the rare-transition alert can still fire: never in learn mode, nor once the
                // session has had it.
                let t = model.observe_with(&context, op.0, ts_ns, &mut session.cursor);
                session.surprise.push(t.surprise_bits);
                if alerting {
                    if session.alerted & ALERTED_RARE == 0
                        && let Some(r) = rare_transition(model, &context, op.0, &t, signals)
                    {
                        session.alerted |= ALERTED_RARE;
                        let prev = context
                            .last()
                            .map(|p| op_name(discovery, OpId(*p)))
                            .unwrap_or_default();
                        findings.push(Finding::Signal {
                            signal: Signal::RareTransition,
                            explanation: format!(
                                "{} after {prev} is confidently rare: {} of {} times in this context of {} operations, where next operations this rare (or new: {} distinct seen) make up {} of {} observations (99% upper bound {:.4} < {})",
                                op_name(discovery, op),
                                r.k,
                                r.n,
                                r.context_len,
                                r.distinct,
                                r.as_rare,
                                r.total,
                                r.upper,
                                r.threshold
                            ),
                            numbers: serde_json::to_value(&r).unwrap_or_default(),
                        });
                    }
                    let seen = |p: Op| {
                        session
                            .has_seen(OpId(p), |o| discovery.canonical(o))
                            .unwrap_or(true)
                    };
                    if let Some(m) = missing_precedent(model, op.0, seen, signals) {
                        findings.push(Finding::Signal {
                            signal: Signal::MissingPrecedent,
                            explanation: format!(
                                "{} is preceded by {} in {:.0}% of learned sessions ({} occurrences), but this session never requested it",
                                op_name(discovery, op),
                                op_name(discovery, OpId(m.predecessor)),
                                m.score * 100.0,
                                m.support
                            ),
                            numbers: serde_json::json!({
                                "predecessor": op_name(discovery, OpId(m.predecessor)),
                                "precedence_score": m.score,
                                "support": m.support,
                                "threshold": m.threshold,
                            }),
                        });
                    }
                    if session.alerted & ALERTED_SURPRISE == 0
                        && let Some(s) =
                            surprising_session(&session.surprise, model.population(), signals)
                    {
                        session.alerted |= ALERTED_SURPRISE;
                        findings.push(Finding::Signal {
                            signal: Signal::SurprisingSession,
                            explanation: format!(
                                "this session's recent steps average {:.1} bits of surprise, {:.1} standard deviations above the population's {:.1}",
                                s.recent_bits, s.z, s.population_mean
                            ),
                            numbers: serde_json::to_value(&s).unwrap_or_default(),
                        });
                    }
                }
            }
            StepKind::Repeat => {
                // Fire once per run of identical requests: when it first crosses what was
                // learned (its probability only falls as the run grows).
                if alerting
                    && let Some(r) = replay(model.runs(), op.0, run, signals)
                    && replay(model.runs(), op.0, run - 1, signals).is_none()
                {
                    session.alerted |= IN_REPLAY;
                    findings.push(Finding::Signal {
                        signal: Signal::Replay,
                        explanation: format!(
                            "the same {} request repeated {} times in a row; of its {} learned runs of identical requests {} were repeated, and with how runs go on in general that makes a run this long a {:.1e} chance (< {:.0e})",
                            op_name(discovery, op),
                            r.run_len,
                            r.support,
                            r.repeated,
                            r.probability,
                            r.threshold
                        ),
                        numbers: serde_json::to_value(&r).unwrap_or_default(),
                    });
                }
                // Enumeration: the step (requests to this operation in a row, not all the
                // same request) first crosses what its learned steps allow. Judged like a
                // replay, against the step runs.
                let count = res.count;
                if alerting
                    && run < count
                    && let Some(r) = long_run(model.step_runs(), op.0, count, signals)
                    && long_run(model.step_runs(), op.0, count - 1, signals).is_none()
                {
                    findings.push(Finding::Signal {
                        signal: Signal::Enumeration,
                        explanation: match &r.basis {
                            RunBasis::Operation {
                                learned, quantile, ..
                            } => format!(
                                "{} requested {} times in a row with changing ids or queries; its learned runs reach {} at the {:.0}th percentile",
                                op_name(discovery, op),
                                r.run_len,
                                learned,
                                quantile * 100.0
                            ),
                            RunBasis::Population {
                                at_least,
                                runs,
                                upper,
                                support,
                                ..
                            } => format!(
                                "{} requested {} times in a row with changing ids or queries; it has too few learned runs ({}) to judge alone, and among the {} learned runs of operations seen about as rarely {} were this long (99% upper bound of the share {:.2e})",
                                op_name(discovery, op),
                                r.run_len,
                                support,
                                runs,
                                at_least,
                                upper
                            ),
                        },
                        numbers: serde_json::to_value(&r).unwrap_or_default(),
                    });
                }
            }
        }

        if alerting {
            rules.refresh(&*discovery);
            for hit in rules.evaluate(session, ts_ns, &*discovery) {
                // On a repeat only the repeat limit is news, and only when first exceeded;
                // the other checks already ran when the step began.
                let fire = match (&hit.kind, res.kind) {
                    (HitKind::TooManyRepeats { count, max }, StepKind::Repeat) => *count == max + 1,
                    (_, StepKind::Repeat) => false,
                    _ => true,
                };
                if fire {
                    findings.push(Finding::Rule(hit));
                }
            }
        }
        if findings.is_empty() {
            return Outcome::default();
        }

        let session_id = session.key.short();
        let previous: Vec<String> = context
            .iter()
            .rev()
            .take(self.n_max)
            .rev()
            .map(|p| op_name(discovery, OpId(*p)))
            .collect();
        let operation = op_name(discovery, op);
        let ctx = Context {
            ts_ns,
            client,
            session: session_id,
            operation: &operation,
            previous,
            allowlisted: self.never_blocked(client),
        };
        let active_clients = self.sessions.counters().live;
        let mut out = Outcome::default();
        for f in findings {
            let blocks = active_blocks + usize::from(out.block.is_some());
            let (alerts, order) = self.decider.decide(f, &ctx, active_clients, blocks);
            out.alerts.extend(alerts);
            if out.block.is_none() {
                out.block = order;
            }
        }
        out
    }
}

/// An important sequence with names instead of ids.
#[derive(Debug, Clone, Serialize)]
pub struct NamedSequence {
    pub ops: Vec<String>,
    pub occurrences: u32,
    pub precedence_score: f64,
    pub lower: f64,
    pub upper: f64,
}

/// The templates rules name (`/accounts/{account_id}/balance`) become discovery templates, so
/// operations carry the operator's placeholder names in listings and alerts.
/// Applies the configured model and discovery settings to what was learned, which may have
/// been loaded with the settings it was saved with. Settings the learned state is built on stay
/// as saved (see [`Model::adopt_config`], [`Discovery::adopt_config`]), with a warning naming
/// them.
fn adopt_config(
    model: &mut Model,
    discovery: &mut Discovery,
    model_cfg: &ModelConfig,
    discovery_cfg: &DiscoveryConfig,
) -> Result<(), EngineError> {
    let kept_model = model.adopt_config(model_cfg)?;
    let kept_discovery = discovery.adopt_config(discovery_cfg)?;
    let kept: Vec<String> = kept_model
        .iter()
        .map(|k| format!("model.{k}"))
        .chain(kept_discovery.iter().map(|k| format!("discovery.{k}")))
        .collect();
    if !kept.is_empty() {
        tracing::warn!(
            settings = kept.join(", "),
            "the learned model was built with other values of these settings and keeps them; \
             `precedent model reset` starts over with the configured ones"
        );
    }
    Ok(())
}

fn register_rule_templates(discovery: &mut Discovery, rules: &RuleFile) {
    let names = rules
        .rules
        .iter()
        .flat_map(|r| std::iter::once(&r.operation).chain(&r.preceded_by))
        .chain(rules.deny.iter().flat_map(|d| &d.sequence));
    // Literal paths too: registered, they are pinned, so a level of the API that generalises
    // (twenty made-up paths next to them are enough) keeps them apart rather than folding
    // them into `{param}` with everything else there.
    for name in names {
        if let Some((_, path)) = name.split_once(' ')
            && let Err(e) = discovery.add_template(path)
        {
            tracing::warn!(template = path, error = %e, "rule template not registered with discovery");
        }
    }
}

/// A request as an alert names it when discovery has not: method and path as sent, the path
/// cut to 200 bytes (at a character boundary).
fn request_line(method: Method, path: &str) -> String {
    let mut end = path.len().min(200);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{method} {}", &path[..end])
}

fn op_name(d: &Discovery, id: OpId) -> String {
    d.name(d.canonical(id)).unwrap_or("?").to_string()
}

/// What the engine has learned: the operations it discovered and the model over them. One
/// state file, because model contexts are sequences of operation ids that only discovery can
/// name. The daemon saves it, `precedent replay --model-out` writes it, and both start from it.
#[derive(Serialize, Deserialize)]
pub struct Learned {
    pub discovery: Discovery,
    pub model: Model,
}

impl crate::state::Persist for Learned {
    const KIND: &'static str = "model";
    /// 2: the run histograms hold runs of identical requests (1 held runs of an operation,
    /// which would misjudge replays if read as the former), and the step runs are new.
    const VERSION: u32 = 2;

    fn check(&self) -> Result<(), String> {
        self.discovery
            .check()
            .map_err(|e| format!("endpoints: {e}"))?;
        self.model.check().map_err(|e| format!("model: {e}"))
    }
}

/// A borrowing twin of [`Learned`] for saving without a copy (same fields, same order).
#[derive(Serialize)]
pub struct LearnedRef<'a> {
    pub discovery: &'a Discovery,
    pub model: &'a Model,
}

/// Live sessions, saved so a restart (an upgrade, a crash) does not forget what visitors did
/// just before it: without them, a visitor who looked up a balance a minute before the restart
/// and transfers a minute after would break the precedence rule. Operations are saved by name
/// and renamed to the ids of whatever discovery the next start loads. Sessions hold hashed keys
/// only, never an identifier.
#[derive(Serialize, Deserialize)]
pub struct SavedSessions {
    /// The name of every operation id the sessions hold.
    pub names: Vec<(OpId, String)>,
    /// Most recently active first.
    pub sessions: Vec<Session>,
}

impl crate::state::Persist for SavedSessions {
    const KIND: &'static str = "sessions";
    /// 2: each operation a session saw carries its steps past the retained history.
    const VERSION: u32 = 2;
}

/// A borrowing twin of [`SavedSessions`] for saving without a copy (same fields, same order).
#[derive(Serialize)]
pub struct SavedSessionsRef<'a> {
    pub names: Vec<(OpId, &'a str)>,
    pub sessions: Vec<&'a Session>,
}

impl Engine {
    /// The live sessions to save: see [`SavedSessions`].
    pub fn saved_sessions(&self) -> SavedSessionsRef<'_> {
        let d = &self.core.discovery;
        let sessions: Vec<&Session> = self.core.sessions.sessions().collect();
        let mut ids: Vec<OpId> = Vec::new();
        for s in &sessions {
            ids.extend(s.history().iter().map(|st| st.op));
            ids.extend(s.ops_seen());
        }
        ids.sort_unstable();
        ids.dedup();
        let names = ids
            .into_iter()
            .filter_map(|id| Some((id, d.name(d.canonical(id))?)))
            .collect();
        SavedSessionsRef { names, sessions }
    }

    /// Puts back sessions an earlier run saved (see [`SessionTable::restore`]): those not idle
    /// at `now_ns` whose operations the loaded discovery knows. Returns how many.
    pub fn restore_sessions(&mut self, saved: SavedSessions, now_ns: u64) -> usize {
        let names: FxHashMap<OpId, String> = saved.names.into_iter().collect();
        let d = &self.core.discovery;
        self.core.sessions.restore(
            saved.sessions.into_iter().rev(),
            |op| d.resolve(names.get(&op)?),
            now_ns,
        )
    }

    /// What to save: see [`crate::state::StateDir::save_view`].
    pub fn learned(&self) -> LearnedRef<'_> {
        LearnedRef {
            discovery: &self.core.discovery,
            model: &self.core.model,
        }
    }

    /// Replaces what was learned (a loaded model file); live sessions carry on, their
    /// histories renamed to the loaded discovery's operations (see
    /// [`SessionTable::remap_ops`]), and the rules' templates are registered with it.
    pub fn set_learned(&mut self, learned: Learned) {
        let Learned {
            mut model,
            mut discovery,
        } = learned;
        let core = &mut self.core;
        // The configured settings were valid when the engine was built; what can still fail
        // is a configured template that no longer fits the loaded trie.
        if let Err(e) = adopt_config(
            &mut model,
            &mut discovery,
            &core.model_cfg,
            &core.discovery_cfg,
        ) {
            tracing::warn!(error = %e, "configured settings not all applied to the loaded model");
        }
        register_rule_templates(&mut discovery, core.rules.file());
        // Live sessions go on under the new discovery's ids for the operations they requested.
        let old = &core.discovery;
        let ended = core
            .sessions
            .remap_ops(|op| discovery.resolve(old.name(old.canonical(op))?));
        if ended > 0 {
            tracing::info!(
                sessions = ended,
                "sessions whose operations the loaded model does not know start over"
            );
        }
        core.discovery = discovery;
        core.model = model;
        core.rules.rebind(&core.discovery);
    }

    /// Imports operation templates from an OpenAPI 3 document: (templates added, paths skipped).
    pub fn import_openapi(&mut self, doc: &str) -> Result<(usize, Vec<String>), DiscoveryError> {
        let r = self.core.discovery.import_openapi(doc)?;
        self.core.rules.refresh(&self.core.discovery);
        Ok(r)
    }

    /// Forgets everything learned (`precedent model reset`).
    pub fn reset_learned(&mut self, cfg: &EngineConfig) -> Result<(), EngineError> {
        self.set_learned(Learned {
            discovery: Discovery::new(cfg.discovery.clone())?,
            model: Model::new(cfg.model.clone())?,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateDir;
    use serde_json::Value;

    const SECOND: u64 = 1_000_000_000;

    /// The rule "POST /transferFunds must be preceded by `predecessor`", alerting only.
    /// An engine on the default configuration.
    fn engine(rules: RuleFile, mode: Mode) -> Engine {
        Engine::new(&EngineConfig::default(), rules, [3; 16], mode).unwrap()
    }

    fn transfer_rule(predecessor: &str) -> RuleFile {
        RuleFile::from_toml_str(&format!(
            "[[rule]]\nid = \"transfer-needs-balance\"\noperation = \"POST /transferFunds\"\n\
             preceded_by = [\"{predecessor}\"]\naction = \"log\"\n"
        ))
        .unwrap()
    }

    /// An engine that learned 300 sessions browsing a catalogue: each looks at a few items
    /// (different ids of `GET /items/{id}`, some reloaded once) and pays once.
    fn catalogue_engine() -> Engine {
        let mut e = engine(RuleFile::default(), Mode::Learn);
        let client: IpAddr = "10.0.0.1".parse().unwrap();
        let mut t = SECOND;
        for s in 0..300u64 {
            let id = format!("s{s}");
            let mut paths = vec!["/catalogue".to_string()];
            for i in 0..(3 + s % 9) {
                let item = format!("/items/{}", 1000 + (s * 31 + i * 7) % 5000);
                if i % 4 == 1 {
                    paths.push(item.clone()); // a reload
                }
                paths.push(item);
            }
            paths.push("/checkout".into());
            for p in &paths {
                t += SECOND / 10;
                e.on_request_in_session(t, client, Method::Get, None, p, &id, 0);
            }
            e.maintain(t);
        }
        e.set_mode(Mode::Detect);
        e
    }

    /// Requests `paths` in a fresh session; the replay alerts' (request index, numbers).
    fn replay_alerts(e: &mut Engine, session: &str, paths: &[String]) -> Vec<(usize, Value)> {
        let client: IpAddr = "10.0.0.2".parse().unwrap();
        let mut out = Vec::new();
        for (i, p) in paths.iter().enumerate() {
            let t = 10_000 * SECOND + i as u64 * SECOND / 10;
            let o = e.on_request_in_session(t, client, Method::Get, None, p, session, 0);
            out.extend(
                o.alerts
                    .into_iter()
                    .filter(|a| a.signal == Some(Signal::Replay))
                    .map(|a| (i, a.numbers)),
            );
        }
        out
    }

    /// A reload applies `[session]` and `[http]` to the next request: a new identifier keys
    /// sessions by a header the parser did not keep before, a lower cap evicts, a shorter
    /// `max_path_len` refuses what it allowed.
    #[test]
    fn reconfigure_applies_session_identifiers_the_cap_and_http_limits() {
        let mut cfg = EngineConfig::default();
        let mut e = Engine::new(&cfg, RuleFile::default(), [3; 16], Mode::Detect).unwrap();
        let client: IpAddr = "10.0.0.9".parse().unwrap();
        let request = |path: &str, key: &str| {
            format!("GET {path} HTTP/1.1\r\nHost: api\r\nX-Api-Key: {key}\r\n\r\n")
        };
        let mut t = SECOND;
        let mut send = |e: &mut Engine, path: &str, key: &str| {
            t += SECOND;
            e.on_capture(t, client, request(path, key).as_bytes(), 0)
        };
        // Keyed by Authorization, absent here: both keys are the one client's session.
        send(&mut e, "/a", "alice").unwrap();
        send(&mut e, "/b", "bob").unwrap();
        assert_eq!(e.sessions().len(), 1);

        cfg.session.identifiers = vec![IdentifierSource::Header {
            name: "X-Api-Key".into(),
        }];
        cfg.http.max_path_len = 16;
        e.reconfigure(&cfg).unwrap();
        send(&mut e, "/a", "alice").unwrap();
        send(&mut e, "/b", "bob").unwrap();
        send(&mut e, "/c", "alice").unwrap();
        let mut steps: Vec<usize> = e.sessions().sessions().map(|s| s.history().len()).collect();
        steps.sort();
        assert_eq!(
            steps,
            [1, 2, 2],
            "bob's (/b), alice's (/a, /c), the client's (/a, /b)"
        );
        assert_eq!(
            send(&mut e, "/a-path-longer-than-16", "alice").err(),
            Some(SkipReason::PathTooLong)
        );
        assert_eq!(e.skips().get(SkipReason::PathTooLong), 1);

        cfg.session.max_sessions = 1;
        e.reconfigure(&cfg).unwrap();
        assert_eq!(e.sessions().len(), 1);
        assert_eq!(e.sessions().counters().evicted, 2);
        let c = e.discovery().resolve("GET /c").unwrap();
        let newest = e.sessions().sessions().next().unwrap();
        assert_eq!(
            newest.history().last().map(|s| s.op),
            Some(c),
            "alice's stays"
        );
    }

    /// A loaded model comes with its own discovery, numbering operations its own way: live
    /// sessions keep their histories under its ids, and the rules' templates are registered
    /// with it. A reset (an empty discovery) ends the sessions, as a restart would.
    #[test]
    fn a_loaded_model_renames_live_sessions_and_keeps_rule_templates() {
        let rules = transfer_rule("GET /accounts/{id}/balance");
        let cfg = EngineConfig::default();
        let client: IpAddr = "10.0.0.3".parse().unwrap();
        let request = |e: &mut Engine, t: u64, m: Method, path: &str, who: &str| {
            e.on_request_in_session(t * SECOND, client, m, None, path, who, 0)
                .alerts
                .into_iter()
                .filter_map(|a| a.rule)
                .collect::<Vec<_>>()
        };
        // The model to load saw the operations in another order (other ids), and no
        // `{id}` template: the balances became one by cardinality.
        let mut other = Engine::new(&cfg, RuleFile::default(), [3; 16], Mode::Learn).unwrap();
        request(&mut other, 1, Method::Post, "/transferFunds", "x");
        for i in 0..30 {
            request(
                &mut other,
                2 + i,
                Method::Get,
                &format!("/accounts/{i}/balance"),
                "x",
            );
        }
        request(&mut other, 40, Method::Get, "/home", "x");

        let mut e = Engine::new(&cfg, rules, [3; 16], Mode::Detect).unwrap();
        request(&mut e, 1, Method::Get, "/home", "bob");
        request(&mut e, 2, Method::Get, "/accounts/7/balance", "bob");
        request(&mut e, 3, Method::Get, "/home", "carol");
        request(&mut e, 4, Method::Get, "/news", "carol");
        e.set_learned(Learned {
            discovery: other.discovery().clone(),
            model: other.model().clone(),
        });
        assert_eq!(
            request(&mut e, 5, Method::Post, "/transferFunds", "bob"),
            Vec::<String>::new(),
            "bob's lookup, made before the load, still counts"
        );
        let bob = e.core.keyer.key_for_value("bob");
        let names: Vec<String> = e
            .sessions()
            .get(&bob)
            .unwrap()
            .history()
            .iter()
            .map(|s| op_name(e.discovery(), s.op))
            .collect();
        assert_eq!(
            names,
            [
                "GET /home",
                "GET /accounts/{id}/balance",
                "POST /transferFunds"
            ]
        );
        // Carol requested /news, which the loaded model does not know: she starts over.
        let carol = e.core.keyer.key_for_value("carol");
        assert!(e.sessions().get(&carol).is_none());
        // The rule still judges sessions after the load.
        assert_eq!(
            request(&mut e, 6, Method::Post, "/transferFunds", "eve"),
            ["transfer-needs-balance"]
        );

        // Reset: the rule's template comes with the empty discovery, so a lookup of any
        // account's balance is the rule's predecessor from its first request; the lookups
        // before the reset are gone.
        e.reset_learned(&cfg).unwrap();
        assert!(e.sessions().is_empty());
        request(&mut e, 7, Method::Get, "/accounts/savings/balance", "alice");
        assert_eq!(
            request(&mut e, 8, Method::Post, "/transferFunds", "alice"),
            Vec::<String>::new()
        );
        assert_eq!(
            request(&mut e, 9, Method::Post, "/transferFunds", "bob"),
            ["transfer-needs-balance"]
        );
    }

    #[test]
    fn a_run_of_identical_requests_is_a_replay() {
        let mut e = catalogue_engine();
        let op = e.discovery().resolve("GET /items/{id}").expect("templated");
        let op = e.discovery().canonical(op).0;
        // Learned: runs of identical requests (1, sometimes 2), not the runs of the template.
        assert!(
            e.model().runs().support(op) >= 300,
            "{:?}",
            e.model().runs().support(op)
        );
        assert_eq!(e.model().runs().quantile(op, 0.99), Some(2));

        let mut paths = vec!["/catalogue".to_string()];
        paths.extend(std::iter::repeat_n("/items/4242".to_string(), 8));
        let alerts = replay_alerts(&mut e, "replayer", &paths);
        assert_eq!(alerts.len(), 1, "fires once per run: {alerts:?}");
        let (at, numbers) = &alerts[0];
        // Hundreds of learned reloads, none went on to a third identical request: the third
        // is the first the learned runs make improbable.
        assert_eq!(*at, 3, "{numbers}");
        assert_eq!(numbers["run_len"], 3);
        assert!(numbers["support"].as_u64().unwrap() >= 300);
        assert!(numbers["repeated"].as_u64().unwrap() >= 100, "{numbers}");
        assert!(numbers["probability"].as_f64().unwrap() < numbers["threshold"].as_f64().unwrap());
    }

    #[test]
    fn conflicting_copies_are_alerted_with_both_and_blocked_in_enforce_mode() {
        let client: IpAddr = "10.0.0.9".parse().unwrap();
        let lookup = b"GET /balance?acct=7 HTTP/1.1\r\nAuthorization: Bearer secret-token\r\n\r\n";
        let transfer =
            b"POST /transferFunds HTTP/1.1\r\nAuthorization: Bearer secret-token\r\n\r\n";
        let mut e = engine(RuleFile::default(), Mode::Detect);
        // The analysed copy went through the engine first, as the daemon hands it on.
        e.on_capture(
            SECOND,
            client,
            b"GET /login HTTP/1.1\r\nAuthorization: Bearer secret-token\r\n\r\n",
            0,
        )
        .unwrap();
        e.on_capture(2 * SECOND, client, lookup, 0).unwrap();
        let requests = e.counters().requests;
        let conflict = |ts: u64, piece: u8, analysed: &[u8], replaced: &[u8]| Conflict {
            ts_unix_ns: ts,
            client: std::net::SocketAddr::new(client, 40_000),
            server: "10.0.0.1:8080".parse().unwrap(),
            seq: 1000,
            piece,
            replaced: replaced.to_vec(),
            analysed: analysed.to_vec(),
        };
        let out = e.on_conflicting_copies(&conflict(3 * SECOND, 0, lookup, transfer), 0);
        assert_eq!(e.counters().requests, requests, "not a request of its own");
        assert_eq!(out.alerts.len(), 1);
        assert!(out.block.is_none(), "detect mode");
        let a = &out.alerts[0];
        assert_eq!(a.signal, Some(Signal::ConflictingCopies));
        assert_eq!(a.action, crate::decide::AlertAction::WouldBlock);
        assert_eq!(a.operation, "GET /balance", "the query is left out");
        assert_eq!(a.numbers["replaced"], "POST /transferFunds");
        assert_eq!(a.numbers["analysed"], "GET /balance");
        assert_eq!(a.previous, vec!["GET /login", "GET /balance"]);
        let line = serde_json::to_string(a).unwrap();
        assert!(line.contains("conflicting_copies"), "{line}");
        assert!(!line.contains("secret-token"), "{line}");
        assert!(!line.contains("acct=7"), "{line}");
        // Enforce: blocked. Learn: nothing. Bytes that are no request are named by why.
        e.set_mode(Mode::Enforce);
        let out =
            e.on_conflicting_copies(&conflict(4 * SECOND, 0, b"\x16\x03\x01junk", transfer), 0);
        assert_eq!(out.block.map(|b| b.client), Some(client));
        assert!(
            out.alerts[0].numbers["analysed"]
                .as_str()
                .unwrap()
                .starts_with('(')
        );
        // Copies of a piece (which holds header values) are named by their length only.
        let out = e.on_conflicting_copies(
            &conflict(
                5 * SECOND,
                2,
                b"erFunds HTTP/1.1\r\nCookie: s=1\r\n",
                b"xx HTTP/1.1\r\n",
            ),
            0,
        );
        let a = &out.alerts[0];
        assert_eq!(a.numbers["piece"], 2);
        assert_eq!(a.numbers["replaced"], "13 bytes of piece 2 of a request");
        assert!(!serde_json::to_string(a).unwrap().contains("s=1"));
        e.set_mode(Mode::Learn);
        let out = e.on_conflicting_copies(&conflict(6 * SECOND, 0, lookup, transfer), 0);
        assert!(out.alerts.is_empty() && out.block.is_none());
    }

    #[test]
    fn a_run_alerted_as_a_replay_is_not_learned_and_others_are() {
        let mut e = catalogue_engine();
        let op = e.discovery().resolve("GET /items/{id}").unwrap();
        let op = e.discovery().canonical(op).0;
        let (support, repeated) = (e.model().runs().support(op), e.model().runs().tail(op, 2));
        // A reload (a run of 2) ended by another item: learned.
        let paths: Vec<String> = ["/items/1", "/items/1", "/items/2"]
            .map(String::from)
            .to_vec();
        assert_eq!(replay_alerts(&mut e, "reloader", &paths), vec![]);
        assert_eq!(e.model().runs().support(op), support + 1);
        assert_eq!(e.model().runs().tail(op, 2), repeated + 1);
        // A replay ended the same way: alerted, and not learned (only the item after it
        // starts a run).
        let mut paths = vec!["/items/3".to_string(); 6];
        paths.push("/items/4".into());
        assert_eq!(replay_alerts(&mut e, "replayer", &paths).len(), 1);
        assert_eq!(e.model().runs().support(op), support + 1);
        // Nor when the session ends on it: the sweep learns the open runs of /items/2 and
        // /items/4, not the replay of /items/5.
        let paths = vec!["/items/5".to_string(); 6];
        assert_eq!(replay_alerts(&mut e, "ender", &paths).len(), 1);
        e.maintain(1_000_000 * SECOND);
        assert_eq!(e.model().runs().support(op), support + 3);
        assert_eq!(e.model().runs().tail(op, 2), repeated + 1);
    }

    #[test]
    fn browsing_many_ids_of_one_template_is_not_a_replay() {
        let mut e = catalogue_engine();
        let mut paths = vec!["/catalogue".to_string()];
        paths.extend((0..8).map(|i| format!("/items/{}", 7000 + i)));
        assert_eq!(replay_alerts(&mut e, "browser", &paths), vec![]);
        // The same ids with a query that differs are different requests too...
        let paths: Vec<String> = (0..8).map(|i| format!("/items/77?page={i}")).collect();
        assert_eq!(replay_alerts(&mut e, "pager", &paths), vec![]);
        // ... and one different request among them starts the run afresh (two reloads in a
        // row are what was learned; four would be a replay).
        let mut paths = vec!["/items/5".to_string(); 2];
        paths.push("/items/6".into());
        paths.extend(vec!["/items/5".to_string(); 2]);
        assert_eq!(replay_alerts(&mut e, "alternator", &paths), vec![]);
    }

    #[test]
    fn a_long_walk_through_ids_is_an_enumeration_not_a_replay() {
        let mut e = catalogue_engine();
        let client: IpAddr = "10.0.0.3".parse().unwrap();
        let mut signals = Vec::new();
        for i in 0..30u64 {
            let p = format!("/items/{}", 9000 + i);
            let t = 20_000 * SECOND + i * SECOND / 10;
            let o = e.on_request_in_session(t, client, Method::Get, None, &p, "walker", 0);
            signals.extend(o.alerts.iter().filter_map(|a| a.signal.map(|s| (i, s))));
        }
        let enumerations: Vec<_> = signals
            .iter()
            .filter(|(_, s)| *s == Signal::Enumeration)
            .collect();
        assert_eq!(enumerations.len(), 1, "{signals:?}");
        assert!(
            !signals.iter().any(|(_, s)| *s == Signal::Replay),
            "{signals:?}"
        );
    }

    /// The rule alerts of `o`, as "rule: explanation".
    fn rule_alerts(o: &Outcome) -> Vec<String> {
        o.alerts
            .iter()
            .filter_map(|a| Some(format!("{}: {}", a.rule.as_ref()?, a.explanation)))
            .collect()
    }

    /// A session's steps past the retained history (`n_max + 1` = 9) still satisfy a rule: a
    /// rule with no window looks at the whole session, `within_ops` may reach past the
    /// history (the documented example says 10), and `within` and the order hold there too.
    #[test]
    fn precedence_rules_look_back_past_the_retained_history() {
        let rules = |extra: &str, preds: &str| {
            RuleFile::from_toml_str(&format!(
                "[[rule]]\nid = \"xfer\"\noperation = \"POST /transferFunds\"\n\
                 preceded_by = [{preds}]\n{extra}action = \"block\"\n"
            ))
            .unwrap()
        };
        let c: IpAddr = "10.0.0.1".parse().unwrap();
        // `before`, then `pages` other operations a second apart, then the transfer.
        let run = |rules: RuleFile, before: &[&str], pages: usize, gap_s: u64| {
            let mut e = engine(rules, Mode::Enforce);
            let mut t = SECOND;
            for p in before {
                t += SECOND;
                e.on_request_in_session(t, c, Method::Get, None, p, "alice", 0);
            }
            t += gap_s * SECOND;
            for i in 0..pages {
                t += SECOND;
                let page = format!("/page{}", char::from(b'a' + i as u8));
                e.on_request_in_session(t, c, Method::Get, None, &page, "alice", 0);
            }
            t += SECOND;
            let o = e.on_request_in_session(t, c, Method::Post, None, "/transferFunds", "alice", 0);
            rule_alerts(&o)
        };
        let balance = r#""GET /balance""#;
        assert_eq!(
            run(rules("", balance), &["/balance"], 12, 0),
            Vec::<String>::new()
        );
        let ten = rules("within_ops = 10\n", balance);
        assert_eq!(run(ten.clone(), &["/balance"], 9, 0), Vec::<String>::new());
        let late = run(ten, &["/balance"], 10, 0);
        assert!(
            late.len() == 1 && late[0].contains("11 steps"),
            "11 steps back is outside 10: {late:?}"
        );
        let minute = rules("within = \"1m\"\n", balance);
        assert_eq!(
            run(minute.clone(), &["/balance"], 12, 0),
            Vec::<String>::new()
        );
        let stale = run(minute, &["/balance"], 12, 120);
        assert!(stale.len() == 1 && stale[0].contains("ago"), "{stale:?}");
        // Order, past the history: the latest /b has an /a before it.
        let both = rules("", r#""GET /a", "GET /b""#);
        assert_eq!(
            run(both.clone(), &["/a", "/b"], 12, 0),
            Vec::<String>::new()
        );
        assert_eq!(
            run(both.clone(), &["/a", "/b", "/a"], 12, 0),
            Vec::<String>::new()
        );
        let reversed = run(both, &["/b", "/a"], 12, 0);
        assert!(
            reversed.len() == 1 && reversed[0].contains("order"),
            "{reversed:?}"
        );
    }

    /// The operations rules name are pinned: a client requesting twenty made-up paths next to
    /// them generalises that level of the API, but not into the rule's operation (which then
    /// matched every request there: `POST /login` "was" a transfer).
    #[test]
    fn rule_operations_survive_a_generalised_level() {
        let mut e = engine(transfer_rule("GET /balance"), Mode::Enforce);
        let c: IpAddr = "10.0.0.1".parse().unwrap();
        let mut t = SECOND;
        let mut go = |e: &mut Engine, m: Method, p: &str, who: &str| {
            t += SECOND;
            rule_alerts(&e.on_request_in_session(t, c, m, None, p, who, 0))
        };
        go(&mut e, Method::Get, "/balance", "u");
        go(&mut e, Method::Post, "/transferFunds", "u");
        assert!(go(&mut e, Method::Post, "/login", "v").is_empty());
        for ch in b'a'..=b'u' {
            go(
                &mut e,
                Method::Post,
                &format!("/junk{}", char::from(ch)),
                "attacker",
            );
        }
        assert!(
            e.discovery().resolve("POST /{param}").is_some(),
            "generalised"
        );
        assert_eq!(
            go(&mut e, Method::Post, "/login", "w"),
            Vec::<String>::new()
        );
        let skipped = go(&mut e, Method::Post, "/transferFunds", "x");
        assert_eq!(skipped.len(), 1, "the rule still applies: {skipped:?}");
    }

    /// Operations merged by discovery (here by a client requesting 21 made-up paths next to
    /// the balance lookup) stay the operations sessions and the model already know: the
    /// model's "transfer follows the balance lookup" and a session's lookup under its new
    /// name are one, so customers are not told they skipped it.
    #[test]
    fn a_merge_does_not_make_sessions_miss_their_predecessors() {
        let mut e = engine(RuleFile::default(), Mode::Learn);
        let c: IpAddr = "10.0.0.1".parse().unwrap();
        let walk = [
            (Method::Get, "/home"),
            (Method::Get, "/accounts/balance"),
            (Method::Post, "/transfer"),
        ];
        let mut t = SECOND;
        for s in 0..200 {
            for (m, p) in walk {
                t += SECOND / 100;
                e.on_request_in_session(t, c, m, None, p, &format!("s{s}"), 0);
            }
        }
        for _ in 0..50 {
            e.maintain(t);
        }
        let transfer = e.discovery().resolve("POST /transfer").unwrap();
        assert!(!e.model().required_predecessors(transfer.0).is_empty());
        e.set_mode(Mode::Enforce);
        let customer = |e: &mut Engine, t: &mut u64, who: &str| {
            let mut alerts = Vec::new();
            for (m, p) in walk {
                *t += SECOND;
                let o =
                    e.on_request_in_session(*t, "10.0.0.7".parse().unwrap(), m, None, p, who, 0);
                alerts.extend(o.alerts.iter().map(|a| a.explanation.clone()));
            }
            alerts
        };
        assert_eq!(customer(&mut e, &mut t, "before"), Vec::<String>::new());
        let attacker: IpAddr = "192.0.2.9".parse().unwrap();
        for ch in b'a'..=b'u' {
            t += 1;
            let junk = format!("/accounts/junk{}", char::from(ch));
            e.on_request_in_session(t, attacker, Method::Get, None, &junk, "attacker", 0);
        }
        assert!(
            e.discovery().resolve("GET /accounts/{param}").is_some(),
            "the level was generalised"
        );
        assert_eq!(customer(&mut e, &mut t, "after"), Vec::<String>::new());
        for _ in 0..50 {
            e.maintain(t);
        }
        assert_eq!(customer(&mut e, &mut t, "later"), Vec::<String>::new());
    }

    #[test]
    fn a_request_pipelined_behind_another_is_seen() {
        let rules = transfer_rule("GET /balance");
        let mut e = Engine::new(&EngineConfig::default(), rules, [1; 16], Mode::Detect).unwrap();
        let client: IpAddr = "10.0.0.9".parse().unwrap();
        // An innocuous request with the transfer hidden behind it, in one segment.
        let capture = b"GET /news HTTP/1.1\r\nHost: bank\r\nAuthorization: Bearer m\r\n\r\n\
            POST /transferFunds HTTP/1.1\r\nHost: bank\r\nAuthorization: Bearer m\r\n\
            Content-Length: 9\r\n\r\n{\"to\":42}";
        let out = e.on_capture(SECOND, client, capture, 0).unwrap();
        assert_eq!(e.counters().requests, 2);
        let rules: Vec<_> = out.alerts.iter().filter_map(|a| a.rule.clone()).collect();
        assert_eq!(rules, ["transfer-needs-balance"], "{:?}", out.alerts);
        // A cut request behind a whole one is counted, and the whole one still counts.
        let out = e.on_capture(2 * SECOND, client, b"GET /news HTTP/1.1\r\n\r\nPOS", 0);
        assert!(out.is_ok());
        assert_eq!(e.counters().requests, 3);
        assert_eq!(e.counters().skipped, 1);
    }

    /// Live sessions survive a restart through their state file: a lookup made before it
    /// satisfies a rule after it, under the ids of the discovery the restart loaded. Idle
    /// sessions stay behind, and the file holds no raw token.
    #[test]
    fn live_sessions_survive_a_restart_through_a_state_file() {
        let rules = || transfer_rule("GET /accounts/{id}/balance");
        let cfg = EngineConfig::default();
        let client: IpAddr = "10.0.0.5".parse().unwrap();
        let send = |e: &mut Engine, t: u64, line: &str, token: &str| {
            let raw = format!("{line} HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\r\n");
            e.on_capture(t * SECOND, client, raw.as_bytes(), 0)
                .unwrap()
                .alerts
                .into_iter()
                .filter_map(|a| a.rule)
                .collect::<Vec<_>>()
        };
        let mut e = Engine::new(&cfg, rules(), [1; 16], Mode::Detect).unwrap();
        send(&mut e, 1, "GET /news", "tok-carol-LEAKCHECK");
        send(&mut e, 1_000, "GET /home", "tok-bob-LEAKCHECK");
        send(
            &mut e,
            1_001,
            "GET /accounts/7/balance",
            "tok-bob-LEAKCHECK",
        );
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        state.save_view::<Learned>(&e.learned()).unwrap();
        state
            .save_view::<SavedSessions>(&e.saved_sessions())
            .unwrap();
        let bytes = std::fs::read(state.file_path::<SavedSessions>()).unwrap();
        assert!(!bytes.windows(9).any(|w| w == b"LEAKCHECK"));

        let learned = state.load::<Learned>().unwrap().into_value().unwrap();
        let mut e = Engine::with_state(
            &cfg,
            rules(),
            [1; 16],
            Mode::Detect,
            learned.model,
            learned.discovery,
        )
        .unwrap();
        let saved = state.load::<SavedSessions>().unwrap().into_value().unwrap();
        assert_eq!(saved.sessions.len(), 2);
        // Carol's last request was 1,001 s before the restart (the idle timeout is 600 s).
        assert_eq!(e.restore_sessions(saved, 1_002 * SECOND), 1);
        assert_eq!(
            send(&mut e, 1_003, "POST /transferFunds", "tok-bob-LEAKCHECK"),
            Vec::<String>::new(),
            "bob's lookup before the restart counts"
        );
        assert_eq!(
            send(&mut e, 1_004, "POST /transferFunds", "tok-carol-LEAKCHECK"),
            ["transfer-needs-balance"]
        );
        assert_eq!(e.sessions().len(), 2);
    }

    #[test]
    fn learned_state_round_trips_through_a_state_file() {
        let mut e = Engine::new(
            &EngineConfig::default(),
            RuleFile::default(),
            [1; 16],
            Mode::Learn,
        )
        .unwrap();
        let client: IpAddr = "10.0.0.1".parse().unwrap();
        for i in 0..200u64 {
            for path in [
                "/login",
                "/users/7/accounts",
                "/accounts/9/balance",
                "/transfer",
            ] {
                let raw = format!("GET {path} HTTP/1.1\r\nAuthorization: t{}\r\n\r\n", i % 20);
                e.on_capture(i * 1_000_000_000, client, raw.as_bytes(), 0)
                    .unwrap();
            }
            e.maintain(i * 1_000_000_000);
        }
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        state.save_view::<Learned>(&e.learned()).unwrap();
        let loaded = state
            .load::<Learned>()
            .unwrap()
            .into_value()
            .expect("saved state loads");
        assert_eq!(
            loaded.discovery.operations().len(),
            e.discovery().operations().len()
        );
        assert_eq!(loaded.model.contexts(), e.model().contexts());
        let mut e2 = Engine::new(
            &EngineConfig::default(),
            RuleFile::default(),
            [1; 16],
            Mode::Learn,
        )
        .unwrap();
        e2.set_learned(loaded);
        assert_eq!(e2.sequences(10).len(), e.sequences(10).len());
        assert_eq!(
            e2.discovery().resolve("GET /accounts/{id}/balance"),
            e.discovery().resolve("GET /accounts/{id}/balance")
        );

        // A restart with an edited config: the loaded state takes the new template and the
        // new thresholds (it was saved with the old ones), keeps the depth it was built with,
        // and so do the sessions.
        let mut edited = EngineConfig::default();
        edited.discovery.templates = vec!["/transfer/{kind}".into()];
        edited.model.min_context_count = 50;
        edited.model.max_order = 4;
        edited.session.n_max = 4;
        let loaded = state.load::<Learned>().unwrap().into_value().unwrap();
        let mut e3 = Engine::with_state(
            &edited,
            RuleFile::default(),
            [1; 16],
            Mode::Learn,
            loaded.model,
            loaded.discovery,
        )
        .unwrap();
        assert_eq!(e3.model().config().min_context_count, 50);
        assert_eq!(e3.model().config().max_order, 8);
        let raw = b"GET /transfer/wire HTTP/1.1\r\nAuthorization: t1\r\n\r\n";
        e3.on_capture(300 * 1_000_000_000, client, raw, 0).unwrap();
        assert!(e3.discovery().resolve("GET /transfer/{kind}").is_some());
        // The same through a control-socket `model load` into a running engine.
        let mut e4 = Engine::new(&edited, RuleFile::default(), [1; 16], Mode::Learn).unwrap();
        e4.set_learned(state.load::<Learned>().unwrap().into_value().unwrap());
        assert_eq!(e4.model().config().min_context_count, 50);
        assert_eq!(
            e4.discovery().config().templates,
            edited.discovery.templates
        );
    }
}
