//! Turns findings (model signals and rule hits) into alerts and block orders, according to
//! the mode and the guard that stops enforcement when it would block too many clients.
//!
//! Plain and synchronous like the rest of the engine: the caller passes time and context in.
use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::rules::{Action, RuleHit};

/// What the daemon does with what it sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Model only: no alerts, no blocks.
    #[default]
    Learn,
    /// Alerts, no blocks.
    Detect,
    /// Alerts and blocks.
    Enforce,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Learn, Mode::Detect, Mode::Enforce];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Learn => "learn",
            Mode::Detect => "detect",
            Mode::Enforce => "enforce",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown mode {s:?}: use learn, detect or enforce"))
    }
}

/// The model-based signals (see `model::signals`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// A transition the model is confident is rare in this context.
    RareTransition,
    /// An operation almost always preceded by something this session never did.
    MissingPrecedent,
    /// The same request again and again, far beyond the operation's learned runs of identical
    /// requests.
    Replay,
    /// A session far more surprising than the population's sessions.
    SurprisingSession,
    /// One operation requested with changing ids or queries far more times in a row than its
    /// learned runs allow (walking object ids).
    Enumeration,
    /// Two different versions of the same bytes of a client's TCP stream (see
    /// `acked::Conflict`): not a model judgement, a thing no TCP stack does.
    ConflictingCopies,
}

impl Signal {
    pub const ALL: [Signal; 6] = [
        Signal::RareTransition,
        Signal::MissingPrecedent,
        Signal::Replay,
        Signal::SurprisingSession,
        Signal::Enumeration,
        Signal::ConflictingCopies,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Signal::RareTransition => "rare_transition",
            Signal::MissingPrecedent => "missing_precedent",
            Signal::Replay => "replay",
            Signal::SurprisingSession => "surprising_session",
            Signal::Enumeration => "enumeration",
            Signal::ConflictingCopies => "conflicting_copies",
        }
    }
}

/// The longest a block may last. Blocks always end: without a ceiling a typo such as
/// `999999d` would be a permanent block.
pub const MAX_BLOCK_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// [`MAX_BLOCK_TTL`] as an operator writes it: "365d" (humantime would say "11months
/// 30days 3h 50m 24s", its months being 30.44 days).
pub fn max_block_ttl_text() -> String {
    format!("{}d", MAX_BLOCK_TTL.as_secs() / 86_400)
}

/// Settings of the decision stage (the `[decide]` table of the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecideConfig {
    /// Signals that block in enforce mode (the others only alert). The default leaves out the
    /// two statistical ones that a legitimate but unusual client can trip.
    pub block_signals: Vec<Signal>,
    /// Block length for signal-triggered blocks (rules carry their own).
    #[serde(with = "crate::durations")]
    pub block_ttl: Duration,
    /// Enforcement stops itself (and alerts) if blocks would exceed this share of the
    /// clients active in the session table.
    pub max_block_share: f64,
    /// The share guard applies only with at least this many active clients; below it a
    /// single attacker would already be a large share.
    pub guard_min_clients: usize,
}

impl Default for DecideConfig {
    fn default() -> Self {
        Self {
            block_signals: vec![
                Signal::MissingPrecedent,
                Signal::Replay,
                Signal::Enumeration,
                Signal::ConflictingCopies,
            ],
            block_ttl: Duration::from_secs(15 * 60),
            max_block_share: 0.1,
            guard_min_clients: 20,
        }
    }
}

impl DecideConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.max_block_share > 0.0 && self.max_block_share <= 1.0) {
            return Err(format!(
                "decide.max_block_share must be in (0, 1], got {}",
                self.max_block_share
            ));
        }
        if self.block_ttl.is_zero() || self.block_ttl > MAX_BLOCK_TTL {
            return Err(format!(
                "decide.block_ttl must be positive and at most {}",
                max_block_ttl_text()
            ));
        }
        Ok(())
    }
}

/// What an alert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertAction {
    /// Reported only.
    Log,
    /// The client was blocked.
    Block,
    /// Would have been blocked in enforce mode (detect mode, or the guard stopped it, or the
    /// client is allowlisted).
    WouldBlock,
}

/// What fired.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    Signal {
        signal: Signal,
        numbers: serde_json::Value,
        explanation: String,
    },
    Rule(RuleHit),
}

/// The request a finding is about.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub ts_ns: u64,
    pub client: IpAddr,
    /// Hashed session key (never the raw token).
    pub session: String,
    pub operation: &'a str,
    /// Earlier operations of the session, oldest first (repeats collapsed).
    pub previous: Vec<String>,
    pub allowlisted: bool,
}

/// One alert: a JSON line on stdout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub ts: String,
    /// "anomaly", "rule" or "guard".
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<Signal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub action: AlertAction,
    pub session: String,
    pub client: String,
    pub operation: String,
    pub previous: Vec<String>,
    /// The numbers behind the decision (counts, interval bounds, scores, thresholds).
    pub numbers: serde_json::Value,
    pub explanation: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_ttl: Option<String>,
    pub mode: Mode,
}

/// Block `client` for `ttl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockOrder {
    pub client: IpAddr,
    pub ttl: Duration,
    pub reason: String,
}

/// Counters for `status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DecideCounters {
    pub alerts_by_signal: BTreeMap<&'static str, u64>,
    pub alerts_by_rule: BTreeMap<String, u64>,
    pub blocks_ordered: u64,
    pub would_block: u64,
    pub guard_trips: u64,
}

/// Owner of the mode, the guard, and the decision counters.
#[derive(Debug)]
pub struct Decider {
    cfg: DecideConfig,
    mode: Mode,
    /// Set when the guard stopped enforcement; cleared when the mode is set again.
    guard_tripped: bool,
    counters: DecideCounters,
}

impl Decider {
    pub fn new(cfg: DecideConfig, mode: Mode) -> Self {
        Self {
            cfg,
            mode,
            guard_tripped: false,
            counters: DecideCounters::default(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Switches mode; setting `enforce` again re-arms a tripped guard.
    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
        self.guard_tripped = false;
    }

    pub fn set_config(&mut self, cfg: DecideConfig) {
        self.cfg = cfg;
    }

    pub fn guard_tripped(&self) -> bool {
        self.guard_tripped
    }

    pub fn counters(&self) -> &DecideCounters {
        &self.counters
    }

    /// Decides what `finding` leads to. `active_clients` and `active_blocks` feed the guard.
    /// Returns the alerts (the finding's, plus a guard alert when the guard trips) and the
    /// block to apply, if any. Learn mode never alerts.
    pub fn decide(
        &mut self,
        finding: Finding,
        ctx: &Context<'_>,
        active_clients: usize,
        active_blocks: usize,
    ) -> (Vec<Alert>, Option<BlockOrder>) {
        if self.mode == Mode::Learn {
            return (Vec::new(), None);
        }
        let (kind, signal, rule, wants_block, ttl, numbers, explanation) = match finding {
            Finding::Signal {
                signal,
                numbers,
                explanation,
            } => (
                "anomaly",
                Some(signal),
                None,
                self.cfg.block_signals.contains(&signal),
                self.cfg.block_ttl,
                numbers,
                explanation,
            ),
            Finding::Rule(hit) => {
                // Why it fired and the counts behind it; the rule's id, action, TTL and
                // explanation are the alert's own fields (its action says what this mode did,
                // which the rule's configured action would contradict in detect mode).
                let numbers = serde_json::to_value(&hit.kind).unwrap_or(serde_json::Value::Null);
                (
                    "rule",
                    None,
                    Some(hit.rule.to_string()),
                    hit.action == Action::Block,
                    hit.block_ttl.unwrap_or(crate::rules::DEFAULT_BLOCK_TTL),
                    numbers,
                    hit.explanation,
                )
            }
        };
        match (signal, &rule) {
            (Some(s), _) => {
                *self
                    .counters
                    .alerts_by_signal
                    .entry(s.as_str())
                    .or_default() += 1
            }
            (None, Some(r)) => *self.counters.alerts_by_rule.entry(r.clone()).or_default() += 1,
            _ => {}
        }

        let mut alerts = Vec::with_capacity(1);
        let mut order = None;
        let action = if !wants_block {
            AlertAction::Log
        } else if self.mode != Mode::Enforce || ctx.allowlisted || self.guard_tripped {
            AlertAction::WouldBlock
        } else if active_clients >= self.cfg.guard_min_clients
            && (active_blocks + 1) as f64 > self.cfg.max_block_share * active_clients as f64
        {
            self.guard_tripped = true;
            self.counters.guard_trips += 1;
            alerts.push(self.guard_alert(ctx, active_clients, active_blocks));
            AlertAction::WouldBlock
        } else {
            order = Some(BlockOrder {
                client: ctx.client,
                ttl,
                reason: signal.map_or_else(
                    || rule.clone().unwrap_or_default(),
                    |s| s.as_str().to_string(),
                ),
            });
            AlertAction::Block
        };
        match action {
            AlertAction::Block => self.counters.blocks_ordered += 1,
            AlertAction::WouldBlock => self.counters.would_block += 1,
            AlertAction::Log => {}
        }
        alerts.insert(
            0,
            Alert {
                ts: rfc3339(ctx.ts_ns),
                kind,
                signal,
                rule,
                action,
                session: ctx.session.clone(),
                client: ctx.client.to_string(),
                operation: ctx.operation.to_string(),
                previous: ctx.previous.clone(),
                numbers,
                explanation,
                block_ttl: (action == AlertAction::Block)
                    .then(|| humantime::format_duration(ttl).to_string()),
                mode: self.mode,
            },
        );
        (alerts, order)
    }

    fn guard_alert(&self, ctx: &Context<'_>, active_clients: usize, active_blocks: usize) -> Alert {
        Alert {
            ts: rfc3339(ctx.ts_ns),
            kind: "guard",
            signal: None,
            rule: None,
            action: AlertAction::Log,
            session: ctx.session.clone(),
            client: ctx.client.to_string(),
            operation: ctx.operation.to_string(),
            previous: Vec::new(),
            numbers: serde_json::json!({
                "active_clients": active_clients,
                "active_blocks": active_blocks,
                "max_block_share": self.cfg.max_block_share,
            }),
            explanation: format!(
                "enforcement stopped: blocking {} would exceed {:.0}% of {active_clients} active clients ({active_blocks} already blocked); alerts continue, set the mode to enforce again to resume",
                ctx.client,
                self.cfg.max_block_share * 100.0
            ),
            block_ttl: None,
            mode: self.mode,
        }
    }
}

/// Unix nanoseconds as RFC 3339 with microseconds.
pub fn rfc3339(ts_ns: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_nanos(ts_ns);
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(client: &str) -> Context<'static> {
        Context {
            ts_ns: 1_700_000_000_000_000_000,
            client: client.parse().unwrap(),
            session: "abc123".into(),
            operation: "POST /transfer",
            previous: vec!["POST /login".into()],
            allowlisted: false,
        }
    }

    fn replay() -> Finding {
        Finding::Signal {
            signal: Signal::Replay,
            numbers: serde_json::json!({"run_len": 9}),
            explanation: "x".into(),
        }
    }

    #[test]
    fn learn_mode_never_alerts() {
        let mut d = Decider::new(DecideConfig::default(), Mode::Learn);
        assert_eq!(d.decide(replay(), &ctx("10.0.0.1"), 100, 0), (vec![], None));
    }

    #[test]
    fn detect_mode_alerts_without_blocking() {
        let mut d = Decider::new(DecideConfig::default(), Mode::Detect);
        let (alerts, order) = d.decide(replay(), &ctx("10.0.0.1"), 100, 0);
        assert_eq!(order, None);
        assert_eq!(alerts[0].action, AlertAction::WouldBlock);
        let json = serde_json::to_value(&alerts[0]).unwrap();
        for field in [
            "ts",
            "kind",
            "signal",
            "action",
            "session",
            "client",
            "operation",
            "previous",
            "numbers",
            "explanation",
        ] {
            assert!(json.get(field).is_some(), "alert lacks {field}: {json}");
        }
    }

    #[test]
    fn a_rule_alert_says_what_this_mode_did_and_its_numbers_why() {
        let hit = crate::rules::RuleHit {
            rule: "transfer-needs-balance".into(),
            action: Action::Block,
            block_ttl: Some(Duration::from_secs(120)),
            kind: crate::rules::HitKind::MissingPredecessor {
                missing: "GET /balance".into(),
                position: 0,
            },
            explanation: "POST /transfer without a preceding GET /balance".into(),
        };
        let mut d = Decider::new(DecideConfig::default(), Mode::Detect);
        let (alerts, order) = d.decide(Finding::Rule(hit), &ctx("10.0.0.1"), 100, 0);
        assert_eq!(order, None);
        let json = serde_json::to_value(&alerts[0]).unwrap();
        assert_eq!(json["kind"], "rule");
        assert_eq!(json["rule"], "transfer-needs-balance");
        assert_eq!(json["action"], "would_block");
        // The rule's configured `block` is not repeated inside, contradicting `would_block`.
        assert_eq!(
            json["numbers"],
            serde_json::json!({"kind": "missing_predecessor", "missing": "GET /balance", "position": 0})
        );
    }

    #[test]
    fn enforce_blocks_only_blocking_signals_and_never_allowlisted_clients() {
        let mut d = Decider::new(DecideConfig::default(), Mode::Enforce);
        let (a, order) = d.decide(replay(), &ctx("10.0.0.1"), 100, 0);
        assert_eq!(a[0].action, AlertAction::Block);
        assert_eq!(a[0].block_ttl.as_deref(), Some("15m"));
        assert_eq!(order.unwrap().client, "10.0.0.1".parse::<IpAddr>().unwrap());
        let rare = Finding::Signal {
            signal: Signal::RareTransition,
            numbers: serde_json::Value::Null,
            explanation: String::new(),
        };
        let (a, order) = d.decide(rare, &ctx("10.0.0.2"), 100, 1);
        assert_eq!((a[0].action, order), (AlertAction::Log, None));
        let mut allowed = ctx("10.0.0.3");
        allowed.allowlisted = true;
        let (a, order) = d.decide(replay(), &allowed, 100, 1);
        assert_eq!((a[0].action, order), (AlertAction::WouldBlock, None));
    }

    #[test]
    fn guard_stops_enforcement_past_the_share_and_mode_rearms_it() {
        let mut d = Decider::new(
            DecideConfig {
                max_block_share: 0.1,
                guard_min_clients: 20,
                ..Default::default()
            },
            Mode::Enforce,
        );
        // 100 active clients: the 10th block is allowed, the 11th trips the guard.
        let (_, order) = d.decide(replay(), &ctx("10.0.0.1"), 100, 9);
        assert!(order.is_some());
        let (alerts, order) = d.decide(replay(), &ctx("10.0.0.2"), 100, 10);
        assert!(order.is_none());
        assert_eq!(alerts.len(), 2);
        assert_eq!(alerts[1].kind, "guard");
        assert!(d.guard_tripped());
        // Stays stopped even when the share drops again, until the operator re-arms it.
        assert!(d.decide(replay(), &ctx("10.0.0.3"), 100, 0).1.is_none());
        d.set_mode(Mode::Enforce);
        assert!(d.decide(replay(), &ctx("10.0.0.3"), 100, 0).1.is_some());
        assert_eq!(d.counters().guard_trips, 1);
    }

    #[test]
    fn guard_ignores_small_populations() {
        let mut d = Decider::new(DecideConfig::default(), Mode::Enforce);
        // 3 active clients, 1 already blocked: share is high, but too few clients to judge.
        assert!(d.decide(replay(), &ctx("10.0.0.1"), 3, 1).1.is_some());
    }

    #[test]
    fn config_validation_names_the_key() {
        let bad = DecideConfig {
            max_block_share: 1.5,
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("decide.max_block_share")
        );
        let cfg: DecideConfig =
            toml::from_str("block_ttl = \"1h\"\nblock_signals = [\"replay\"]").unwrap();
        assert_eq!(cfg.block_ttl, Duration::from_secs(3600));
        assert!(toml::from_str::<DecideConfig>("nonsense = 1").is_err());
        assert!(toml::from_str::<DecideConfig>("block_ttl = \"soon\"").is_err());
        for block_ttl in [Duration::ZERO, MAX_BLOCK_TTL + Duration::from_secs(1)] {
            let e = DecideConfig {
                block_ttl,
                ..Default::default()
            }
            .validate()
            .unwrap_err();
            assert!(e.contains("decide.block_ttl"), "{e}");
        }
    }
}
