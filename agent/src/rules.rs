//! Precedence rules ("transfer needs a balance lookup first") and deny rules ("never A then
//! B"), written by operators or suggested from the model's important sequences.
//!
//! Rules name operations; [`RuleSet`] resolves those names to [`OpId`]s once per discovery
//! generation so that evaluation on the hot path compares integers only.
use std::{collections::HashSet, fmt::Write as _, sync::Arc, time::Duration};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use thiserror::Error;

use crate::{
    discovery::{OpId, OpResolver, validate_template},
    http::Method,
    session::{Occurrence, Session},
};

/// A `block` rule without `block_ttl` blocks for this long.
pub const DEFAULT_BLOCK_TTL: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Log,
    Block,
}

/// `[[rule]]`: `operation` must be preceded, in this order, by every one of `preceded_by`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub id: String,
    /// `METHOD /template`, e.g. `POST /api/v1/transferFunds`.
    pub operation: String,
    pub preceded_by: Vec<String>,
    /// Look back at most this many steps (repeats collapsed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within_ops: Option<u32>,
    /// And at most this far back in time.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    pub within: Option<Duration>,
    /// At most this many successive requests of `operation` in a row (1 = no immediate
    /// repeat); the next one fires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_repeats: Option<u32>,
    #[serde(default)]
    pub action: Action,
    /// For `block`; [`DEFAULT_BLOCK_TTL`] when absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    pub block_ttl: Option<Duration>,
}

/// `[[deny]]`: these operations as consecutive steps must never happen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyRule {
    pub id: String,
    pub sequence: Vec<String>,
    #[serde(default)]
    pub action: Action,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    pub block_ttl: Option<Duration>,
}

/// A rules file (or the `[[rule]]`/`[[deny]]` part of the config).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    #[serde(default, rename = "rule", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<DenyRule>,
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }
}

/// What is wrong with a rules file; every message names the rule and the field.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("rules file is not valid TOML: {0}")]
    Toml(String),
    #[error("unknown top-level key `{0}` in rules file (expected `rule` or `deny`)")]
    UnknownTable(String),
    #[error("{kind} #{index} has no `id` (every rule needs a unique string id)")]
    MissingId { kind: &'static str, index: usize },
    #[error("{kind} {id:?}: unknown field `{field}` (expected one of: {expected})")]
    UnknownField {
        kind: &'static str,
        id: String,
        field: String,
        expected: String,
    },
    #[error(
        "{kind} {id:?}: field `{field}`: invalid duration {value:?}: {reason} (e.g. \"90s\", \"10m\", \"1h\")"
    )]
    BadDuration {
        kind: &'static str,
        id: String,
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "{kind} {id:?}: field `{field}`: {value:?} is not an operation: {reason} (expected \"METHOD /path/{{name}}\")"
    )]
    BadOperation {
        kind: &'static str,
        id: String,
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("{kind} {id:?}: field `{field}` must not be empty")]
    Empty {
        kind: &'static str,
        id: String,
        field: &'static str,
    },
    #[error("{kind} {id:?}: field `{field}` must be at least 1")]
    Zero {
        kind: &'static str,
        id: String,
        field: &'static str,
    },
    #[error("duplicate rule id {0:?} (ids are unique across [[rule]] and [[deny]])")]
    DuplicateId(String),
    #[error("{kind} {id:?}: {message}")]
    Invalid {
        kind: &'static str,
        id: String,
        message: String,
    },
}

const RULE_FIELDS: &[&str] = &[
    "id",
    "operation",
    "preceded_by",
    "within_ops",
    "within",
    "max_repeats",
    "action",
    "block_ttl",
];
const DENY_FIELDS: &[&str] = &["id", "sequence", "action", "block_ttl"];

impl RuleFile {
    /// Parses and validates a rules file.
    pub fn from_toml_str(text: &str) -> Result<RuleFile, RuleError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| RuleError::Toml(e.to_string()))?;
        let mut file = RuleFile::default();
        for (key, value) in table {
            match key.as_str() {
                "rule" => file.rules = entries(&value, "rule", RULE_FIELDS)?,
                "deny" => file.deny = entries(&value, "deny", DENY_FIELDS)?,
                _ => return Err(RuleError::UnknownTable(key)),
            }
        }
        file.validate()?;
        Ok(file)
    }

    pub fn from_path(path: &std::path::Path) -> Result<RuleFile, RuleError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RuleError::Toml(format!("cannot read {}: {e}", path.display())))?;
        RuleFile::from_toml_str(&text)
    }

    pub fn to_toml_string(&self) -> String {
        // Serialising plain strings, numbers and arrays cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks every rule (also run by [`RuleFile::from_toml_str`] and [`RuleFile::add`]).
    pub fn validate(&self) -> Result<(), RuleError> {
        let mut ids = HashSet::new();
        for r in &self.rules {
            let kind = "rule";
            if !ids.insert(r.id.as_str()) {
                return Err(RuleError::DuplicateId(r.id.clone()));
            }
            check_op(kind, &r.id, "operation", &r.operation)?;
            if r.preceded_by.is_empty() {
                return Err(RuleError::Empty {
                    kind,
                    id: r.id.clone(),
                    field: "preceded_by",
                });
            }
            for p in &r.preceded_by {
                check_op(kind, &r.id, "preceded_by", p)?;
                if *p == r.operation {
                    return Err(RuleError::Invalid {
                        kind,
                        id: r.id.clone(),
                        message: format!(
                            "`preceded_by` lists the rule's own operation {p:?}; use `max_repeats` for repeats"
                        ),
                    });
                }
            }
            if r.within_ops == Some(0) {
                return Err(RuleError::Zero {
                    kind,
                    id: r.id.clone(),
                    field: "within_ops",
                });
            }
            if r.max_repeats == Some(0) {
                return Err(RuleError::Zero {
                    kind,
                    id: r.id.clone(),
                    field: "max_repeats",
                });
            }
        }
        for d in &self.deny {
            let kind = "deny";
            if !ids.insert(d.id.as_str()) {
                return Err(RuleError::DuplicateId(d.id.clone()));
            }
            if d.sequence.is_empty() {
                return Err(RuleError::Empty {
                    kind,
                    id: d.id.clone(),
                    field: "sequence",
                });
            }
            for op in &d.sequence {
                check_op(kind, &d.id, "sequence", op)?;
            }
            // Sessions fold successive requests of one operation into one step, so a sequence
            // naming an operation twice in a row would never match: say so instead of loading
            // a rule that silently never fires.
            if let Some(w) = d.sequence.windows(2).find(|w| w[0] == w[1]) {
                return Err(RuleError::Invalid {
                    kind,
                    id: d.id.clone(),
                    message: format!(
                        "`sequence` has {:?} twice in a row, which never matches: successive requests of one operation are one step; limit them with a [[rule]]'s `max_repeats`",
                        w[0]
                    ),
                });
            }
        }
        Ok(())
    }

    /// Adds a rule at runtime (validated; the id must be new).
    pub fn add(&mut self, rule: Rule) -> Result<(), RuleError> {
        self.rules.push(rule);
        let r = self.validate();
        if r.is_err() {
            self.rules.pop();
        }
        r
    }

    /// Removes the rule or deny rule `id`; false when there is none.
    pub fn remove(&mut self, id: &str) -> bool {
        let before = self.rules.len() + self.deny.len();
        self.rules.retain(|r| r.id != id);
        self.deny.retain(|d| d.id != id);
        before != self.rules.len() + self.deny.len()
    }
}

/// Deserialises the array `value` of `kind` entries, checking ids, field names and durations
/// first so that errors name the rule.
fn entries<T: serde::de::DeserializeOwned>(
    value: &toml::Value,
    kind: &'static str,
    fields: &[&str],
) -> Result<Vec<T>, RuleError> {
    let Some(array) = value.as_array() else {
        return Err(RuleError::Toml(format!(
            "`{kind}` must be an array of tables ([[{kind}]])"
        )));
    };
    let mut out = Vec::with_capacity(array.len());
    for (index, entry) in array.iter().enumerate() {
        let Some(table) = entry.as_table() else {
            return Err(RuleError::Toml(format!(
                "`{kind}` #{} must be a table ([[{kind}]])",
                index + 1
            )));
        };
        let Some(id) = table.get("id").and_then(|v| v.as_str()) else {
            return Err(RuleError::MissingId {
                kind,
                index: index + 1,
            });
        };
        for field in table.keys() {
            if !fields.contains(&field.as_str()) {
                return Err(RuleError::UnknownField {
                    kind,
                    id: id.into(),
                    field: field.clone(),
                    expected: fields.join(", "),
                });
            }
        }
        for field in ["within", "block_ttl"] {
            if let Some(v) = table.get(field) {
                let value = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                let parsed = v
                    .as_str()
                    .ok_or_else(|| "must be a string".to_string())
                    .and_then(|s| humantime::parse_duration(s).map_err(|e| e.to_string()))
                    .and_then(|d| {
                        if field == "block_ttl" && (d.is_zero() || d > crate::decide::MAX_BLOCK_TTL)
                        {
                            Err(format!(
                                "must be positive and at most {}",
                                crate::decide::max_block_ttl_text()
                            ))
                        } else {
                            Ok(d)
                        }
                    });
                if let Err(reason) = parsed {
                    return Err(RuleError::BadDuration {
                        kind,
                        id: id.into(),
                        field,
                        value,
                        reason,
                    });
                }
            }
        }
        let parsed: T =
            entry
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| RuleError::Invalid {
                    kind,
                    id: id.into(),
                    message: e.message().to_string(),
                })?;
        out.push(parsed);
    }
    Ok(out)
}

fn check_op(
    kind: &'static str,
    id: &str,
    field: &'static str,
    value: &str,
) -> Result<(), RuleError> {
    validate_op_name(value).map_err(|reason| RuleError::BadOperation {
        kind,
        id: id.into(),
        field,
        value: value.into(),
        reason,
    })
}

/// `METHOD /template`: an uppercase method precedent follows, one space, a template of
/// literal segments and whole-segment `{name}` placeholders.
pub fn validate_op_name(name: &str) -> Result<(), String> {
    let Some((method, template)) = name.split_once(' ') else {
        return Err("missing the space between method and path".into());
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "method {method:?} must be an uppercase token such as GET"
        ));
    }
    if Method::parse(method).is_none() {
        return Err(format!(
            "method {method:?} is not one precedent follows (GET, POST, PUT, …)"
        ));
    }
    validate_template(template)
}

/// Why a rule fired, with the numbers behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HitKind {
    /// A required predecessor never happened in this session.
    MissingPredecessor {
        missing: String,
        position: usize,
    },
    /// It happened, but further back than the rule allows.
    OutsideWindow {
        predecessor: String,
        /// Steps back from the current one; `None` when it is older than the retained history.
        steps_ago: Option<u32>,
        age_ns: Option<u64>,
        within_ops: Option<u32>,
        within_ns: Option<u64>,
    },
    /// All predecessors are in the window, but not in the required order.
    OutOfOrder {
        expected: Vec<String>,
    },
    TooManyRepeats {
        count: u32,
        max: u32,
    },
    DenySequence {
        sequence: Vec<String>,
    },
}

/// A rule that fired on the current request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleHit {
    #[serde(serialize_with = "ser_arc_str")]
    pub rule: Arc<str>,
    pub action: Action,
    /// Set for `block` (the rule's ttl or [`DEFAULT_BLOCK_TTL`]).
    #[serde(
        serialize_with = "opt_duration::serialize",
        skip_serializing_if = "Option::is_none"
    )]
    pub block_ttl: Option<Duration>,
    #[serde(flatten)]
    pub kind: HitKind,
    /// One sentence for humans.
    pub explanation: String,
}

fn ser_arc_str<S: serde::Serializer>(s: &Arc<str>, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s)
}

#[derive(Debug, Clone)]
struct Compiled {
    id: Arc<str>,
    operation: String,
    preds: Vec<String>,
    target: Option<OpId>,
    pred_ids: SmallVec<[Option<OpId>; 4]>,
    within_ops: Option<u32>,
    within_ns: Option<u64>,
    max_repeats: Option<u32>,
    action: Action,
    ttl: Option<Duration>,
}

#[derive(Debug, Clone)]
struct CompiledDeny {
    id: Arc<str>,
    sequence: Vec<String>,
    ids: SmallVec<[Option<OpId>; 4]>,
    action: Action,
    ttl: Option<Duration>,
}

/// Rules ready for evaluation. Call [`RuleSet::refresh`] before evaluating (cheap when
/// nothing changed): it re-resolves names whenever discovery's generation moved, so a rule
/// whose operation was not discovered yet starts firing as soon as it is.
#[derive(Debug, Clone)]
pub struct RuleSet {
    file: RuleFile,
    rules: Vec<Compiled>,
    deny: Vec<CompiledDeny>,
    by_target: FxHashMap<OpId, SmallVec<[u32; 2]>>,
    deny_by_last: FxHashMap<OpId, SmallVec<[u32; 2]>>,
    generation: Option<u64>,
}

fn ttl_for(action: Action, ttl: Option<Duration>) -> Option<Duration> {
    match action {
        Action::Block => Some(ttl.unwrap_or(DEFAULT_BLOCK_TTL)),
        Action::Log => None,
    }
}

impl RuleSet {
    pub fn new(file: RuleFile) -> Result<RuleSet, RuleError> {
        file.validate()?;
        let rules = file
            .rules
            .iter()
            .map(|r| Compiled {
                id: r.id.as_str().into(),
                operation: r.operation.clone(),
                preds: r.preceded_by.clone(),
                target: None,
                pred_ids: SmallVec::new(),
                within_ops: r.within_ops,
                within_ns: r
                    .within
                    .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
                max_repeats: r.max_repeats,
                action: r.action,
                ttl: ttl_for(r.action, r.block_ttl),
            })
            .collect();
        let deny = file
            .deny
            .iter()
            .map(|d| CompiledDeny {
                id: d.id.as_str().into(),
                sequence: d.sequence.clone(),
                ids: SmallVec::new(),
                action: d.action,
                ttl: ttl_for(d.action, d.block_ttl),
            })
            .collect();
        Ok(RuleSet {
            file,
            rules,
            deny,
            by_target: FxHashMap::default(),
            deny_by_last: FxHashMap::default(),
            generation: None,
        })
    }

    pub fn file(&self) -> &RuleFile {
        &self.file
    }

    /// Re-resolves operation names if discovery changed since the last call.
    /// Re-resolves every name against another discovery (a loaded or reset model): its
    /// generation counts its own changes, so equal numbers say nothing across the two.
    pub fn rebind(&mut self, resolver: &impl OpResolver) {
        self.generation = None;
        self.refresh(resolver);
    }

    pub fn refresh(&mut self, resolver: &impl OpResolver) {
        if self.generation == Some(resolver.generation()) {
            return;
        }
        self.generation = Some(resolver.generation());
        self.by_target.clear();
        self.deny_by_last.clear();
        for (i, r) in self.rules.iter_mut().enumerate() {
            r.target = resolver.resolve(&r.operation);
            r.pred_ids = r.preds.iter().map(|p| resolver.resolve(p)).collect();
            if let Some(t) = r.target {
                self.by_target.entry(t).or_default().push(i as u32);
            }
        }
        for (i, d) in self.deny.iter_mut().enumerate() {
            d.ids = d.sequence.iter().map(|p| resolver.resolve(p)).collect();
            if let Some(Some(last)) = d.ids.last() {
                self.deny_by_last.entry(*last).or_default().push(i as u32);
            }
        }
    }

    /// Rules hit by the session's current request (its newest step). Allocates only when
    /// something fires.
    pub fn evaluate(
        &self,
        session: &Session,
        now_ns: u64,
        resolver: &impl OpResolver,
    ) -> Vec<RuleHit> {
        let mut hits = Vec::new();
        let history = session.history();
        let Some(current) = history.last() else {
            return hits;
        };
        let cur = resolver.canonical(current.op);
        // Most requests are no rule's target: say so before gathering the previous steps.
        if !self.by_target.contains_key(&cur) && !self.deny_by_last.contains_key(&cur) {
            return hits;
        }
        if let Some(idx) = self.by_target.get(&cur) {
            for &i in idx {
                let r = &self.rules[i as usize];
                if let Some(max) = r.max_repeats
                    && current.count > max
                {
                    hits.push(RuleHit {
                        rule: r.id.clone(),
                        action: r.action,
                        block_ttl: r.ttl,
                        explanation: format!(
                            "{} requested {} times in a row; rule allows at most {max}",
                            r.operation, current.count
                        ),
                        kind: HitKind::TooManyRepeats {
                            count: current.count,
                            max,
                        },
                    });
                }
                if let Some(kind) = precedence(r, session, now_ns, resolver) {
                    hits.push(RuleHit {
                        rule: r.id.clone(),
                        action: r.action,
                        block_ttl: r.ttl,
                        explanation: explain(r, &kind),
                        kind,
                    });
                }
            }
        }
        if let Some(idx) = self.deny_by_last.get(&cur) {
            // The previous steps, for the forbidden sequences that end here.
            let prev: SmallVec<[OpId; 16]> = history
                .iter()
                .take(history.len() - 1)
                .map(|s| resolver.canonical(s.op))
                .collect();
            for &i in idx {
                let d = &self.deny[i as usize];
                let n = d.ids.len();
                if n > prev.len() + 1 {
                    continue;
                }
                let tail = &prev[prev.len() + 1 - n..];
                if tail.iter().zip(&d.ids).all(|(op, want)| Some(*op) == *want) {
                    hits.push(RuleHit {
                        rule: d.id.clone(),
                        action: d.action,
                        block_ttl: d.ttl,
                        explanation: format!("forbidden sequence {}", d.sequence.join(" → ")),
                        kind: HitKind::DenySequence {
                            sequence: d.sequence.clone(),
                        },
                    });
                }
            }
        }
        hits
    }
}

/// `None` when the predecessors are there, in order, within the window. The session's whole
/// past counts, not only its retained history (see [`Session::occurrence_before`]).
fn precedence(
    r: &Compiled,
    session: &Session,
    now_ns: u64,
    resolver: &impl OpResolver,
) -> Option<HitKind> {
    let canon = |op| resolver.canonical(op);
    let in_window = |o: &Occurrence| {
        r.within_ops.is_none_or(|w| o.steps_ago <= u64::from(w))
            && r.within_ns
                .is_none_or(|w| now_ns.saturating_sub(o.at_ns) <= w)
    };
    // Greedy from the newest step backwards: the latest occurrence of the last predecessor,
    // then the latest of the one before it that is older, and so on. Latest occurrences keep
    // the chain as recent as it can be, so it is within the window if any chain is.
    let mut older_than = 0;
    let mut oldest = None;
    let chain = r.pred_ids.iter().rev().all(|p| {
        let found = p.and_then(|p| session.occurrence_before(p, older_than, canon));
        if let Some(o) = found {
            older_than = o.steps_ago;
            oldest = Some(o);
        }
        found.is_some()
    });
    if chain && oldest.is_none_or(|o| in_window(&o)) {
        return None;
    }
    // What is wrong: the first predecessor with no occurrence in the window, else the order.
    let latest = |p: Option<OpId>| p.and_then(|p| session.occurrence_before(p, 0, canon));
    let Some(position) = r
        .pred_ids
        .iter()
        .position(|p| !latest(*p).is_some_and(|o| in_window(&o)))
    else {
        return Some(HitKind::OutOfOrder {
            expected: r.preds.clone(),
        });
    };
    let predecessor = r.preds[position].clone();
    match latest(r.pred_ids[position]) {
        Some(o) => Some(HitKind::OutsideWindow {
            predecessor,
            steps_ago: Some(u32::try_from(o.steps_ago).unwrap_or(u32::MAX)),
            age_ns: Some(now_ns.saturating_sub(o.at_ns)),
            within_ops: r.within_ops,
            within_ns: r.within_ns,
        }),
        None => Some(HitKind::MissingPredecessor {
            missing: predecessor,
            position,
        }),
    }
}

fn explain(r: &Compiled, kind: &HitKind) -> String {
    let mut s = String::new();
    match kind {
        HitKind::MissingPredecessor { missing, .. } => {
            let _ = write!(
                s,
                "{} without a preceding {missing} in this session",
                r.operation
            );
        }
        HitKind::OutsideWindow {
            predecessor,
            steps_ago,
            age_ns,
            within_ops,
            within_ns,
        } => {
            let _ = write!(s, "{} with {predecessor} last seen ", r.operation);
            match (steps_ago, age_ns) {
                (Some(k), Some(a)) => {
                    let age = humantime::format_duration(Duration::from_secs(a / 1_000_000_000));
                    let _ = write!(s, "{k} steps / {age} ago");
                }
                _ => s.push_str("before the retained history"),
            }
            let _ = write!(s, "; rule requires it within");
            if let Some(w) = within_ops {
                let _ = write!(s, " {w} steps");
            }
            if let Some(w) = within_ns {
                let _ = write!(
                    s,
                    " {}",
                    humantime::format_duration(Duration::from_nanos(*w))
                );
            }
        }
        HitKind::OutOfOrder { expected } => {
            let _ = write!(
                s,
                "{} preceded by {} but not in that order",
                r.operation,
                expected.join(" → ")
            );
        }
        HitKind::TooManyRepeats { .. } | HitKind::DenySequence { .. } => {}
    }
    s
}

/// An important sequence as the model reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceCandidate {
    /// Operation names, oldest first; the last one is the operation to protect.
    pub ops: Vec<String>,
    pub precedence_score: f64,
    pub occurrences: u64,
}

/// Candidate rules for sequences scoring at or above `min_score`, best first. Each has
/// action `log` (an operator promotes it to `block`), the sequence's earlier operations as
/// `preceded_by`, and an id unique against `existing`. Sequences already covered by an
/// existing rule (same operation and predecessors) are left out.
pub fn suggest(sequences: &[SequenceCandidate], min_score: f64, existing: &RuleFile) -> Vec<Rule> {
    let mut ranked: Vec<&SequenceCandidate> = sequences
        .iter()
        .filter(|s| s.precedence_score >= min_score && s.ops.len() >= 2)
        .filter(|s| s.ops.iter().all(|o| validate_op_name(o).is_ok()))
        .collect();
    ranked.sort_by(|a, b| {
        b.precedence_score
            .total_cmp(&a.precedence_score)
            .then(b.occurrences.cmp(&a.occurrences))
    });
    let mut ids: HashSet<String> = existing
        .rules
        .iter()
        .map(|r| r.id.clone())
        .chain(existing.deny.iter().map(|d| d.id.clone()))
        .collect();
    let mut covered: HashSet<(String, Vec<String>)> = existing
        .rules
        .iter()
        .map(|r| (r.operation.clone(), r.preceded_by.clone()))
        .collect();
    let mut out = Vec::new();
    for s in ranked {
        let (op, preds) = s.ops.split_last().expect("len >= 2");
        // Collapsed repeats mean a predecessor equal to the operation is not a precedence.
        let preds: Vec<String> = preds.iter().filter(|p| *p != op).cloned().collect();
        if preds.is_empty() || !covered.insert((op.clone(), preds.clone())) {
            continue;
        }
        let base = format!("suggested-{}", slug(op));
        let mut id = base.clone();
        let mut n = 2;
        while !ids.insert(id.clone()) {
            id = format!("{base}-{n}");
            n += 1;
        }
        out.push(Rule {
            id,
            operation: op.clone(),
            preceded_by: preds,
            within_ops: None,
            within: None,
            max_repeats: None,
            action: Action::Log,
            block_ttl: None,
        });
    }
    out
}

/// `POST /api/v1/transferFunds` → `post-api-v1-transferfunds`.
fn slug(op: &str) -> String {
    let mut s = String::new();
    for c in op.chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c.to_ascii_lowercase());
        } else if !s.ends_with('-') && !s.is_empty() {
            s.push('-');
        }
    }
    s.trim_end_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::{IpAddr, Ipv4Addr},
    };

    use super::*;
    use crate::session::{SessionConfig, SessionKey, SessionTable};

    const SEC: u64 = 1_000_000_000;
    const IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const BAL: &str = "GET /api/v1/accounts/{account_id}/balance";
    const ACC: &str = "GET /api/v1/users/{user_id}/accounts";
    const XFER: &str = "POST /api/v1/transferFunds";
    const HOME: &str = "GET /home";

    /// A resolver over fixed names, with a generation the test can bump.
    struct Names {
        ids: HashMap<String, OpId>,
        generation: u64,
    }

    impl Names {
        fn new(names: &[&str]) -> Self {
            let ids = names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.to_string(), OpId(i as u32)))
                .collect();
            Names { ids, generation: 1 }
        }
        fn id(&self, n: &str) -> OpId {
            self.ids[n]
        }
    }

    impl OpResolver for Names {
        fn resolve(&self, name: &str) -> Option<OpId> {
            self.ids.get(name).copied()
        }
        fn op_name(&self, id: OpId) -> Option<&str> {
            self.ids
                .iter()
                .find(|(_, v)| **v == id)
                .map(|(k, _)| k.as_str())
        }
        fn canonical(&self, id: OpId) -> OpId {
            id
        }
        fn generation(&self) -> u64 {
            self.generation
        }
    }

    const RULES: &str = r#"
        [[rule]]
        id = "transfer-needs-balance"
        operation = "POST /api/v1/transferFunds"
        preceded_by = ["GET /api/v1/users/{user_id}/accounts", "GET /api/v1/accounts/{account_id}/balance"]
        within_ops = 4
        within = "10m"
        max_repeats = 1
        action = "block"
        block_ttl = "15m"

        [[deny]]
        id = "no-home-then-transfer"
        sequence = ["GET /home", "POST /api/v1/transferFunds"]
        action = "log"
    "#;

    /// Runs `walk` (op name, seconds) through one session and returns the last request's hits.
    fn run(walk: &[(&str, u64)]) -> Vec<RuleHit> {
        let names = Names::new(&[ACC, BAL, XFER, HOME, "GET /other"]);
        let mut set = RuleSet::new(RuleFile::from_toml_str(RULES).unwrap()).unwrap();
        set.refresh(&names);
        let mut t = SessionTable::new(SessionConfig::default());
        let mut hits = Vec::new();
        for (op, secs) in walk {
            let (_, s) = t.observe(SessionKey(1), names.id(op), IP, secs * SEC);
            hits = set.evaluate(s, secs * SEC, &names);
        }
        hits
    }

    #[test]
    fn predecessors_in_order_within_window_pass() {
        assert!(run(&[(ACC, 1), (BAL, 2), (BAL, 3), (XFER, 4)]).is_empty());
        // Other steps in between are fine while the window holds them.
        assert!(run(&[(ACC, 1), ("GET /other", 2), (BAL, 3), (XFER, 4)]).is_empty());
    }

    #[test]
    fn missing_predecessor_fires_with_block_and_ttl() {
        let hits = run(&[(ACC, 1), (XFER, 2)]);
        assert_eq!(hits.len(), 1);
        let h = &hits[0];
        assert_eq!(&*h.rule, "transfer-needs-balance");
        assert_eq!(h.action, Action::Block);
        assert_eq!(h.block_ttl, Some(Duration::from_secs(900)));
        assert_eq!(
            h.kind,
            HitKind::MissingPredecessor {
                missing: BAL.into(),
                position: 1
            }
        );
        assert!(
            h.explanation
                .contains("without a preceding GET /api/v1/accounts/{account_id}/balance"),
            "{}",
            h.explanation
        );
        // A transfer as the very first request.
        assert!(matches!(
            run(&[(XFER, 1)])[0].kind,
            HitKind::MissingPredecessor { position: 0, .. }
        ));
    }

    #[test]
    fn out_of_order_predecessors_fire() {
        let hits = run(&[(BAL, 1), (ACC, 2), (XFER, 3)]);
        assert_eq!(
            hits[0].kind,
            HitKind::OutOfOrder {
                expected: vec![ACC.into(), BAL.into()]
            }
        );
    }

    #[test]
    fn predecessor_outside_within_ops_fires_with_steps_ago() {
        let o = "GET /other";
        let hits = run(&[
            (ACC, 1),
            (BAL, 2),
            (o, 3),
            (HOME, 4),
            (o, 5),
            (HOME, 6),
            (XFER, 7),
        ]);
        let HitKind::OutsideWindow {
            predecessor,
            steps_ago,
            within_ops,
            ..
        } = &hits[0].kind
        else {
            panic!("{hits:?}")
        };
        assert_eq!(
            (predecessor.as_str(), *steps_ago, *within_ops),
            (ACC, Some(6), Some(4))
        );
        assert!(
            hits[0].explanation.contains("6 steps"),
            "{}",
            hits[0].explanation
        );
        // Four steps back is still inside.
        assert!(
            run(&[(ACC, 1), (BAL, 2), (o, 3), (HOME, 4), (XFER, 5)])
                .iter()
                .all(|h| h.rule.as_ref() != "transfer-needs-balance")
        );
    }

    #[test]
    fn predecessor_outside_within_time_fires_with_age() {
        // (Gaps stay under the 10-minute idle timeout, or the session would restart.)
        let hits = run(&[(ACC, 0), (BAL, 300), (XFER, 602)]);
        let HitKind::OutsideWindow {
            predecessor,
            age_ns,
            within_ns,
            ..
        } = &hits[0].kind
        else {
            panic!("{hits:?}")
        };
        assert_eq!(predecessor, ACC);
        assert_eq!(*age_ns, Some(602 * SEC));
        assert_eq!(*within_ns, Some(600 * SEC));
        // Exactly 10 minutes is inside.
        assert!(run(&[(ACC, 0), (BAL, 300), (XFER, 600)]).is_empty());
    }

    #[test]
    fn repeats_over_max_fire() {
        let walk = [(ACC, 1), (BAL, 2), (XFER, 3), (XFER, 4)];
        let hits = run(&walk);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].kind, HitKind::TooManyRepeats { count: 2, max: 1 });
        assert!(run(&walk[..3]).is_empty());
    }

    #[test]
    fn deny_sequence_fires_only_on_consecutive_steps() {
        let hits = run(&[(ACC, 1), (BAL, 2), (HOME, 3), (XFER, 4)]);
        assert_eq!(hits.len(), 1);
        assert_eq!(&*hits[0].rule, "no-home-then-transfer");
        assert_eq!(hits[0].block_ttl, None);
        assert_eq!(
            hits[0].kind,
            HitKind::DenySequence {
                sequence: vec![HOME.into(), XFER.into()]
            }
        );
        assert!(run(&[(HOME, 1), (ACC, 2), (BAL, 3), (XFER, 4)]).is_empty());
    }

    #[test]
    fn rule_on_undiscovered_operation_fires_once_discovered() {
        use crate::discovery::{Discovery, DiscoveryConfig};
        let mut d = Discovery::new(DiscoveryConfig::default()).unwrap();
        let file = RuleFile::from_toml_str(
            r#"
            [[rule]]
            id = "pay-after-cart"
            operation = "POST /pay"
            preceded_by = ["GET /cart"]
            "#,
        )
        .unwrap();
        let mut set = RuleSet::new(file).unwrap();
        let mut t = SessionTable::new(SessionConfig::default());
        set.refresh(&d);
        let op = d.observe(None, Method::Get, "/home");
        let (_, s) = t.observe(SessionKey(1), op, IP, SEC);
        assert!(set.evaluate(s, SEC, &d).is_empty());
        // "POST /pay" appears only now; "GET /cart" never did.
        let op = d.observe(None, Method::Post, "/pay");
        set.refresh(&d);
        let (_, s) = t.observe(SessionKey(1), op, IP, 2 * SEC);
        let hits = set.evaluate(s, 2 * SEC, &d);
        assert_eq!(
            hits[0].kind,
            HitKind::MissingPredecessor {
                missing: "GET /cart".into(),
                position: 0
            }
        );
        assert_eq!(hits[0].action, Action::Log);
    }

    fn err(toml: &str) -> String {
        RuleFile::from_toml_str(toml).unwrap_err().to_string()
    }

    #[test]
    fn invalid_rule_files_name_the_rule_and_field() {
        let base = |extra: &str| {
            format!(
                "[[rule]]\nid = \"r1\"\noperation = \"POST /pay\"\npreceded_by = [\"GET /cart\"]\n{extra}"
            )
        };
        assert_eq!(
            err(&base("withn = \"10m\"")),
            "rule \"r1\": unknown field `withn` (expected one of: id, operation, preceded_by, within_ops, within, max_repeats, action, block_ttl)"
        );
        let e = err(&base("within = \"10 minutez\""));
        assert!(
            e.starts_with("rule \"r1\": field `within`: invalid duration \"10 minutez\": "),
            "{e}"
        );
        for ttl in ["0s", "400days"] {
            let e = err(&base(&format!("block_ttl = \"{ttl}\"")));
            assert!(
                e.starts_with(&format!("rule \"r1\": field `block_ttl`: invalid duration \"{ttl}\": must be positive and at most 365d")),
                "{e}"
            );
        }
        let e = err(&base("block_ttl = 15"));
        assert!(
            e.starts_with(
                "rule \"r1\": field `block_ttl`: invalid duration \"15\": must be a string"
            ),
            "{e}"
        );
        let e =
            err("[[rule]]\nid = \"r2\"\noperation = \"post /pay\"\npreceded_by = [\"GET /cart\"]");
        assert!(e.starts_with("rule \"r2\": field `operation`: \"post /pay\" is not an operation: method \"post\" must be an uppercase token"), "{e}");
        let e =
            err("[[rule]]\nid = \"r3\"\noperation = \"POST pay\"\npreceded_by = [\"GET /cart\"]");
        assert!(
            e.contains("field `operation`") && e.contains("must start with /"),
            "{e}"
        );
        let e = err(
            "[[rule]]\nid = \"r4\"\noperation = \"POST /pay\"\npreceded_by = [\"GET /cart/(\\\\d+)\"]",
        );
        assert!(
            e.contains("rule \"r4\": field `preceded_by`") && e.contains("regex"),
            "{e}"
        );
        let e = err(
            "[[rule]]\nid = \"r5\"\noperation = \"POST /pay\"\npreceded_by = [\"GET /cart/{id\"]",
        );
        assert!(
            e.contains("rule \"r5\"") && e.contains("placeholder"),
            "{e}"
        );
        assert_eq!(
            err("[[rule]]\nid = \"r6\"\noperation = \"POST /pay\"\npreceded_by = []"),
            "rule \"r6\": field `preceded_by` must not be empty"
        );
        assert_eq!(
            err(&format!(
                "{}\n[[deny]]\nid = \"r1\"\nsequence = [\"GET /a\", \"GET /b\"]",
                base("")
            )),
            "duplicate rule id \"r1\" (ids are unique across [[rule]] and [[deny]])"
        );
        assert_eq!(
            err("[[rule]]\noperation = \"POST /pay\"\npreceded_by = [\"GET /a\"]"),
            "rule #1 has no `id` (every rule needs a unique string id)"
        );
        let e = err(&base("action = \"drop\""));
        assert!(e.starts_with("rule \"r1\": unknown variant `drop`"), "{e}");
        assert_eq!(
            err("[[deny]]\nid = \"d\"\nsequence = []"),
            "deny \"d\": field `sequence` must not be empty"
        );
        let e =
            err("[[deny]]\nid = \"d2\"\nsequence = [\"GET /a\", \"POST /auth\", \"POST /auth\"]");
        assert!(
            e.starts_with(
                "deny \"d2\": `sequence` has \"POST /auth\" twice in a row, which never matches"
            ),
            "{e}"
        );
        assert_eq!(
            err("[[rules]]\nid = \"x\""),
            "unknown top-level key `rules` in rules file (expected `rule` or `deny`)"
        );
        assert!(err("[[rule]\n").starts_with("rules file is not valid TOML"));
        assert_eq!(
            err(&base("within_ops = 0")),
            "rule \"r1\": field `within_ops` must be at least 1"
        );
    }

    #[test]
    fn block_without_ttl_gets_the_default_and_files_round_trip() {
        let file = RuleFile::from_toml_str(
            "[[rule]]\nid = \"a\"\noperation = \"POST /pay\"\npreceded_by = [\"GET /cart\"]\naction = \"block\"\nwithin = \"90s\"",
        )
        .unwrap();
        assert_eq!(file.rules[0].block_ttl, None);
        let set = RuleSet::new(file.clone()).unwrap();
        assert_eq!(set.rules[0].ttl, Some(DEFAULT_BLOCK_TTL));
        let text = file.to_toml_string();
        assert!(text.contains("within = \"1m 30s\""), "{text}");
        assert_eq!(RuleFile::from_toml_str(&text).unwrap(), file);
        let full = RuleFile::from_toml_str(RULES).unwrap();
        assert_eq!(
            RuleFile::from_toml_str(&full.to_toml_string()).unwrap(),
            full
        );
    }

    #[test]
    fn add_and_remove_at_runtime() {
        let mut file = RuleFile::from_toml_str(RULES).unwrap();
        let mut r = file.rules[0].clone();
        assert_eq!(
            file.add(r.clone()),
            Err(RuleError::DuplicateId("transfer-needs-balance".into()))
        );
        r.id = "second".into();
        file.add(r).unwrap();
        assert_eq!(file.rules.len(), 2);
        assert!(file.remove("no-home-then-transfer"));
        assert!(!file.remove("no-such-rule"));
    }

    #[test]
    fn suggest_emits_rules_for_sequences_at_or_above_threshold() {
        let seq = |ops: &[&str], score, occ| SequenceCandidate {
            ops: ops.iter().map(|s| s.to_string()).collect(),
            precedence_score: score,
            occurrences: occ,
        };
        // An existing id the suggestions must not reuse.
        let existing = RuleFile::from_toml_str(
            "[[rule]]\nid = \"suggested-post-pay\"\noperation = \"POST /x\"\npreceded_by = [\"GET /y\"]",
        )
        .unwrap();
        let out = suggest(
            &[
                seq(&[ACC, BAL, XFER], 0.95, 1000),
                seq(&[HOME, "GET /search"], 0.5, 10_000),
                seq(&["GET /login", "GET /login/verify"], 0.9, 500),
                seq(&[ACC, BAL, XFER], 0.9, 10),
                seq(&["GET /cart", "POST /pay"], 0.9, 500),
                seq(&["not an op", "POST /pay"], 0.99, 5),
            ],
            0.9,
            &existing,
        );
        let got: Vec<(&str, &str, Vec<&str>)> = out
            .iter()
            .map(|r| {
                (
                    r.id.as_str(),
                    r.operation.as_str(),
                    r.preceded_by.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("suggested-post-api-v1-transferfunds", XFER, vec![ACC, BAL]),
                (
                    "suggested-get-login-verify",
                    "GET /login/verify",
                    vec!["GET /login"]
                ),
                ("suggested-post-pay-2", "POST /pay", vec!["GET /cart"]),
            ]
        );
        assert!(out.iter().all(|r| r.action == Action::Log));
        // Suggestions serialise to a valid rules file.
        let file = RuleFile {
            rules: out,
            deny: vec![],
        };
        assert_eq!(
            RuleFile::from_toml_str(&file.to_toml_string()).unwrap(),
            file
        );
        // Already covered by an existing rule: nothing new.
        let again = suggest(
            &[seq(&[ACC, BAL, XFER], 0.95, 1)],
            0.9,
            &RuleFile::from_toml_str(RULES).unwrap(),
        );
        assert!(again.is_empty(), "{again:?}");
    }
}
