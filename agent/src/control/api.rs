//! Typed payloads of control responses: the daemon fills these, the CLI renders them.
//!
//! Times are RFC 3339 strings and durations whole seconds (`*_secs`) so `--json` output is
//! easy to use from scripts; every type round-trips through serde.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::SystemTime};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{capture::AttachMode, rules::Action};

pub use crate::decide::Mode;

/// `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// precedent version of the running daemon.
    pub version: String,
    pub pid: u32,
    pub mode: Mode,
    pub uptime_secs: u64,
    pub interfaces: Vec<InterfaceStatus>,
    /// Configured interfaces the program is not on (deleted; re-attached when they return).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces_missing: Vec<String>,
    /// Why the last state save failed (a full disk, ...), until one succeeds again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_save_error: Option<String>,
    /// The XDP program's counters by name (see `capture::Counters::iter`).
    pub kernel_counters: BTreeMap<String, u64>,
    /// Userspace counters by name: ring-buffer reader overflow, parse skips by reason
    /// (`skipped_<reason>`), sessions evicted, state save failures, ...
    pub userspace_counters: BTreeMap<String, u64>,
    pub model: ModelSize,
    pub endpoints: u64,
    pub sessions_live: u64,
    /// Requests whose header is still arriving in pieces (see `reassemble`).
    #[serde(default)]
    pub requests_waiting: u64,
    pub blocks_active: u64,
    /// Alerts since start by signal or rule id.
    pub alerts_by_signal: BTreeMap<String, u64>,
    /// Set while enforcement is suspended by the block-share guard, with the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement_suspended: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    /// Kernel index of the interface attached to (changes when it is re-created).
    #[serde(default)]
    pub ifindex: u32,
    /// What the kernel accepted (`native` or `generic`).
    pub attach_mode: AttachMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSize {
    pub operations: u64,
    pub contexts: u64,
    /// Approximate heap bytes held by the model.
    pub bytes: u64,
}

/// `endpoints`: one discovered operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRow {
    /// `METHOD /template` (with the host when the daemon sees several).
    pub operation: String,
    pub count: u64,
    /// Where the template came from: `learned`, `template`, `openapi`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// `sequences`: one important sequence of the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceRow {
    /// Operations oldest first, repeats collapsed; the last one is the one preceded.
    pub ops: Vec<String>,
    pub occurrences: u64,
    /// Occurrences of the sequence / occurrences of its last operation.
    pub precedence_score: f64,
    /// 99% credible interval of the last transition's probability in its context.
    pub interval: Interval,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub lower: f64,
    pub upper: f64,
}

/// `sessions`: one live session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRow {
    /// Leading hex digits of the keyed session hash (never the raw identifier).
    pub key: String,
    pub client: IpAddr,
    /// Steps so far (repeats collapsed).
    pub steps: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_operation: Option<String>,
    #[serde(with = "rfc3339")]
    pub last_seen: SystemTime,
    /// Recent average surprise (bits).
    pub surprise: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    /// `[[rule]]`: operation must be preceded by others.
    Precedence,
    /// `[[deny]]`: a sequence that must never happen.
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleSource {
    /// The config file (changed by editing it and sending SIGHUP).
    Config,
    /// Added with `precedent rules add` (persisted in the state directory).
    Runtime,
}

/// `rules list` (and the rules inside `rules suggest`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleRow {
    pub id: String,
    pub kind: RuleKind,
    /// Precedence rules: the protected operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// Precedence rules: required predecessors, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preceded_by: Vec<String>,
    /// Deny rules: the forbidden consecutive steps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sequence: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within_ops: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_repeats: Option<u32>,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_ttl_secs: Option<u64>,
    pub source: RuleSource,
    /// A runtime rule whose id the config file also uses: the config file's rule is in force,
    /// this one is not (until `rules remove` deletes it or the file drops its rule).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadowed: bool,
    /// Times the rule fired since start.
    #[serde(default)]
    pub hits: u64,
}

impl RuleRow {
    pub fn from_rule(rule: &crate::rules::Rule, source: RuleSource, hits: u64) -> Self {
        RuleRow {
            id: rule.id.clone(),
            kind: RuleKind::Precedence,
            operation: Some(rule.operation.clone()),
            preceded_by: rule.preceded_by.clone(),
            sequence: Vec::new(),
            within_ops: rule.within_ops,
            within_secs: rule.within.map(|d| d.as_secs()),
            max_repeats: rule.max_repeats,
            action: rule.action,
            block_ttl_secs: rule.block_ttl.map(|d| d.as_secs()),
            source,
            shadowed: false,
            hits,
        }
    }

    pub fn from_deny(rule: &crate::rules::DenyRule, source: RuleSource, hits: u64) -> Self {
        RuleRow {
            id: rule.id.clone(),
            kind: RuleKind::Deny,
            operation: None,
            preceded_by: Vec::new(),
            sequence: rule.sequence.clone(),
            within_ops: None,
            within_secs: None,
            max_repeats: None,
            action: rule.action,
            block_ttl_secs: rule.block_ttl.map(|d| d.as_secs()),
            source,
            shadowed: false,
            hits,
        }
    }
}

/// `rules add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesAdded {
    pub added: Vec<String>,
}

/// `rules suggest`: the candidates, and the same as a TOML rules file ready for `rules add`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleSuggestions {
    pub rules: Vec<RuleRow>,
    pub toml: String,
}

/// `blocks list` / `blocks add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRow {
    pub net: IpNet,
    pub remaining_secs: u64,
    /// Packets dropped by this entry.
    pub dropped: u64,
    /// Rule id or anomaly signal that caused it, or `manual`; unknown for blocks found in
    /// pinned maps from an earlier run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl BlockRow {
    pub fn from_block(b: &crate::enforce::Block, reason: Option<String>) -> Self {
        BlockRow {
            net: b.net,
            remaining_secs: b.remaining.as_secs(),
            dropped: b.dropped,
            reason,
        }
    }
}

/// `mode` / `mode set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeReport {
    pub mode: Mode,
    /// The mode before a `mode_set`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Mode>,
}

/// `model save|load|reset`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelReport {
    /// `saved`, `loaded` or `reset`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    pub size: ModelSize,
}

/// A plain acknowledgement (`rules_remove`, `blocks_remove`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub message: String,
}

/// `SystemTime` as an RFC 3339 string with second precision.
pub mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_seconds(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s).map_err(serde::de::Error::custom)
    }
}
