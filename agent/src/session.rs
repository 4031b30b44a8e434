//! Sessions: who is making the requests, and what they did in which order.
//!
//! A session key comes from the configured identifier (header, cookie, JWT claim, else the
//! client address) and is hashed with a per-install secret before anything stores it. Each
//! session keeps a short history of steps (successive repeats collapsed) in a bounded table.
use std::{fmt, hash::BuildHasher as _, net::IpAddr, time::Duration};

use base64::Engine as _;
use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;
use serde::{Deserialize, Serialize};
use siphasher::{
    sip,
    sip128::{Hash128, Hasher128 as _, SipHasher13},
};
use smallvec::SmallVec;
use std::hash::Hasher as _;

use crate::{discovery::OpId, http::SelectedHeaders};

/// Where a session key may come from, in the order they are tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum IdentifierSource {
    /// The whole value of a header, e.g. `authorization` or `x-api-key`.
    Header { name: String },
    /// One cookie by name, e.g. `session_id`.
    Cookie { name: String },
    /// One claim of the JWT in `Authorization: Bearer <jwt>` (read, not verified: it only has
    /// to tell clients apart, and a forged token still names one attacker's session).
    JwtClaim {
        claim: String,
        #[serde(default = "default_jwt_header")]
        header: String,
    },
}

fn default_jwt_header() -> String {
    "authorization".into()
}

/// Which identifier produced a key (the client address when none of the configured ones did).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// Index into the configured identifiers.
    Identifier(u8),
    ClientAddress,
}

/// A hashed session key. Never holds or prints the identifier it came from.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionKey(pub u128);

impl SessionKey {
    /// First 12 hex digits, for listings and alerts.
    pub fn short(&self) -> String {
        format!("{:032x}", self.0)[..12].to_string()
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKey({})", self.short())
    }
}

/// JWT payloads larger than this are not decoded (the claim is then unavailable).
const MAX_JWT_PAYLOAD: usize = 8192;

/// Turns request identifiers into [`SessionKey`]s: SipHash-1-3 (128-bit) keyed with the
/// per-install secret, so keys cannot be linked to tokens without the secret.
#[derive(Clone)]
pub struct SessionKeyer {
    secret: [u8; 16],
    sources: Vec<IdentifierSource>,
}

/// The secret stays out of logs.
impl fmt::Debug for SessionKeyer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeyer")
            .field("secret", &"<redacted>")
            .field("sources", &self.sources)
            .finish()
    }
}

impl SessionKeyer {
    pub fn new(secret: [u8; 16], sources: Vec<IdentifierSource>) -> Self {
        SessionKeyer { secret, sources }
    }

    /// Applies a reloaded identifier list (the secret stays): requests are keyed by it from
    /// the next one on. A visitor whose key changes with it starts a new session; the one it
    /// leaves idles out.
    pub fn set_identifiers(&mut self, sources: Vec<IdentifierSource>) {
        self.sources = sources;
    }

    /// A fresh per-install secret from the kernel's CSPRNG (store it with the state, mode 0600).
    pub fn random_secret() -> std::io::Result<[u8; 16]> {
        use std::io::Read as _;
        let mut s = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut s)?;
        Ok(s)
    }

    /// The key for a request: the first configured identifier present, else the client address.
    /// A malformed JWT (or a missing claim) falls through to the next source.
    pub fn key(&self, headers: &SelectedHeaders<'_>, client: IpAddr) -> (SessionKey, KeySource) {
        for (i, src) in self.sources.iter().enumerate() {
            let tag = i as u8;
            let key = match src {
                IdentifierSource::Header { name } => headers
                    .get(name)
                    .filter(|v| !v.is_empty())
                    .map(|v| self.hash(tag, v.as_bytes())),
                IdentifierSource::Cookie { name } => headers
                    .get_all("cookie")
                    .find_map(|c| cookie_value(c, name))
                    .map(|v| self.hash(tag, v.as_bytes())),
                IdentifierSource::JwtClaim { claim, header } => headers
                    .get(header)
                    .and_then(|v| jwt_claim(v, claim))
                    .map(|v| self.hash(tag, v.as_bytes())),
            };
            if let Some(k) = key {
                return (k, KeySource::Identifier(tag));
            }
        }
        let addr = match client {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        (self.hash(u8::MAX, &addr), KeySource::ClientAddress)
    }

    /// Domain-separated by source, so an identifier equal to another source's value (or to an
    /// address) cannot land in the same session.
    /// The key for an explicit session identifier (a replayed log's session column), hashed
    /// in its own domain so it can never collide with a header- or address-derived key.
    pub fn key_for_value(&self, value: &str) -> SessionKey {
        self.hash(u8::MAX - 1, value.as_bytes())
    }

    /// A keyed 64-bit hash of one request's method, host and raw target (path, then `?query`
    /// when given separately), so a session can tell "the same request again" (a replay)
    /// without storing paths. A target with its query inline hashes like the split form.
    pub fn request_hash(
        &self,
        method: crate::http::Method,
        host: Option<&str>,
        path: &str,
        query: Option<&str>,
    ) -> u64 {
        let host = host.unwrap_or("").as_bytes();
        // Length-prefixed so host and path cannot trade bytes.
        let host_len = host.len().to_le_bytes();
        let (mark, query): (&[u8], &[u8]) = match query {
            Some(q) => (b"?", q.as_bytes()),
            None => (b"", b""),
        };
        self.sip64(&[
            &[u8::MAX - 2],
            method.as_str().as_bytes(),
            b" ",
            &host_len,
            host,
            path.as_bytes(),
            mark,
            query,
        ])
    }

    fn hash(&self, tag: u8, value: &[u8]) -> SessionKey {
        SessionKey(self.sip(&[&[tag], value]).as_u128())
    }

    /// Keyed SipHash-1-3 (128-bit) of `parts` as one message.
    fn sip(&self, parts: &[&[u8]]) -> Hash128 {
        let hasher = SipHasher13::new_with_key(&self.secret);
        as_one(parts, hasher, |h, m| h.hash(m), |h| h.finish128())
    }

    /// [`SessionKeyer::sip`] with a 64-bit result, for what needs no more.
    fn sip64(&self, parts: &[&[u8]]) -> u64 {
        let hasher = sip::SipHasher13::new_with_key(&self.secret);
        as_one(parts, hasher, |h, m| h.hash(m), |h| h.finish())
    }
}

/// Messages up to this long are hashed from a stack copy (nearly all of them).
const STACK_MESSAGE: usize = 256;

/// Hashes `parts` as one message with `hasher`: `one_shot` over a stack copy of them when
/// they fit, else fed piece by piece and `finish`ed. Fed piece by piece, SipHash buffers every
/// piece that does not end on an 8-byte boundary byte by byte, which cost more than the hash;
/// in one call it reads whole words. Both give the same value (SipHash reads a byte stream,
/// however it is cut).
fn as_one<H: std::hash::Hasher, R>(
    parts: &[&[u8]],
    mut hasher: H,
    one_shot: impl FnOnce(&H, &[u8]) -> R,
    finish: impl FnOnce(&H) -> R,
) -> R {
    let mut buf = [0u8; STACK_MESSAGE];
    let mut at = 0;
    for p in parts {
        let Some(room) = buf.get_mut(at..at + p.len()) else {
            parts.iter().for_each(|p| hasher.write(p));
            return finish(&hasher);
        };
        room.copy_from_slice(p);
        at += p.len();
    }
    one_shot(&hasher, &buf[..at])
}

/// `name`'s value in one `Cookie` header (`a=1; b="2"`), quotes removed.
fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (n, v) = pair.trim().split_once('=')?;
        (n.trim() == name)
            .then(|| v.trim().trim_matches('"'))
            .filter(|v| !v.is_empty())
    })
}

/// The claim `claim` of a `Bearer` JWT, as text (strings as is, numbers and booleans printed).
fn jwt_claim(header_value: &str, claim: &str) -> Option<String> {
    let (scheme, token) = header_value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut parts = token.trim().split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > MAX_JWT_PAYLOAD {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match value.get(claim)? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => Some(v.to_string()),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Tried in order; the client address is the last resort.
    pub identifiers: Vec<IdentifierSource>,
    /// A session with no request for this long is over.
    #[serde(with = "crate::durations")]
    pub idle_timeout: Duration,
    /// Live sessions at most; beyond, the least recently active one is evicted (counted).
    pub max_sessions: usize,
    /// Live sessions started from one client address (an IPv6 address's /64) at most; beyond,
    /// that client's oldest session is evicted (counted in `evicted` and `evicted_per_client`).
    /// Without it, one client minting session keys (random tokens or cookies) would push
    /// everyone else's sessions out of the table, and with them the balance lookup a
    /// precedence rule needs to see before a customer's transfer.
    pub max_sessions_per_client: usize,
    /// Longest context the model uses; sessions keep `n_max + 1` steps.
    pub n_max: usize,
    /// Distinct operations remembered per session for "ever did X" questions.
    pub max_ops_seen: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            identifiers: vec![IdentifierSource::Header {
                name: "authorization".into(),
            }],
            idle_timeout: Duration::from_secs(600),
            max_sessions: 100_000,
            max_sessions_per_client: 10_000,
            n_max: 8,
            max_ops_seen: 64,
        }
    }
}

/// One step of a session: an operation and how many times in a row it was requested.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub op: OpId,
    /// Successive requests collapsed into this step (1 = not repeated).
    pub count: u32,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// A session's retained steps, oldest to newest (the newest is the current request's step).
#[derive(Debug, Clone, Copy)]
pub struct History<'a> {
    front: &'a [Step],
    back: &'a [Step],
}

impl<'a> History<'a> {
    pub fn len(&self) -> usize {
        self.front.len() + self.back.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `i`-th oldest retained step.
    pub fn get(&self, i: usize) -> Option<&'a Step> {
        if i < self.front.len() {
            self.front.get(i)
        } else {
            self.back.get(i - self.front.len())
        }
    }

    pub fn last(&self) -> Option<&'a Step> {
        self.back.last().or(self.front.last())
    }

    /// Oldest to newest.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &'a Step> + Clone + 'a {
        self.front.iter().chain(self.back.iter())
    }
}

/// A session's retained steps: a ring of the last `n_max + 1`, stored inline for the default
/// `n_max` (8), so a session owns no heap memory of its own and a new one allocates nothing.
#[derive(Debug, Clone, Default)]
struct StepRing {
    buf: SmallVec<[Step; INLINE_STEPS]>,
    /// Position of the oldest step once the ring is full (0 while it fills).
    head: usize,
}

/// Steps kept inline: `n_max + 1` for the default `n_max`; larger histories spill once.
const INLINE_STEPS: usize = 9;

impl StepRing {
    /// Oldest first: the part from the oldest to the end of the buffer, then the wrapped part.
    fn as_slices(&self) -> (&[Step], &[Step]) {
        (&self.buf[self.head..], &self.buf[..self.head])
    }

    fn back_mut(&mut self) -> Option<&mut Step> {
        let len = self.buf.len();
        if len == 0 {
            return None;
        }
        // The newest is just before the oldest (or at the end while the ring fills).
        let i = (self.head + len - 1) % len;
        self.buf.get_mut(i)
    }

    /// Appends `step`, replacing the oldest once `cap` steps are held; returns the one it
    /// replaced.
    fn push(&mut self, step: Step, cap: usize) -> Option<Step> {
        if self.buf.len() < cap {
            self.buf.push(step);
            None
        } else if let Some(slot) = self.buf.get_mut(self.head) {
            let old = std::mem::replace(slot, step);
            self.head = (self.head + 1) % self.buf.len();
            Some(old)
        } else {
            None
        }
    }
}

/// Saved and listed as the steps oldest first.
impl Serialize for StepRing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (a, b) = self.as_slices();
        s.collect_seq(a.iter().chain(b))
    }
}

impl<'de> Deserialize<'de> for StepRing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let steps = Vec::<Step>::deserialize(d)?;
        Ok(StepRing {
            buf: steps.into(),
            head: 0,
        })
    }
}

/// One client's session. Holds no identifier, only the hashed key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub key: SessionKey,
    pub client: IpAddr,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Steps ever started (the retained history holds only the last `n_max + 1`).
    pub step_count: u64,
    pub request_count: u64,
    /// The model's surprise at this session's steps; the engine updates it.
    pub surprise: crate::model::SessionSurprise,
    /// Bits the engine sets for once-per-session alerts (so a signal does not fire on every
    /// later step of the same session).
    pub alerted: u8,
    /// [`SessionKeyer::request_hash`] of the last request, and how many identical requests in
    /// a row ended with it (0 before the first): the replay signal's run.
    pub last_request: u64,
    pub identical_run: u32,
    /// Where the model's walk for this session's next step starts (a cache of slots, not state).
    #[serde(skip)]
    pub cursor: crate::model::Cursor,
    steps: StepRing,
    /// Operations seen in this session, sorted by id, capped; with where each last occurred
    /// before the retained history.
    ops_seen: SmallVec<[SeenOp; 8]>,
    ops_seen_full: bool,
}

/// An operation a session requested. Its steps that have left the retained history are
/// summed up as the first and the last of them, so a precedence rule looks back past the
/// history (`n_max + 1` steps): a balance lookup twenty steps before a transfer still counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenOp {
    pub op: OpId,
    /// Step numbers (the session's first step is 1); 0 while no step of it left the history.
    first_step: u32,
    last_step: u32,
    /// When those steps' last requests came, in milliseconds after the session's first
    /// request (rounded up; saturating after 49 days).
    first_ms: u32,
    last_ms: u32,
}

/// Where an operation occurred in a session: steps back from the current step (1 = the one
/// just before it) and the time of that step's last request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occurrence {
    pub steps_ago: u64,
    pub at_ns: u64,
}

impl Session {
    fn new(key: SessionKey, client: IpAddr, now_ns: u64) -> Self {
        Session {
            key,
            client,
            first_seen_ns: now_ns,
            last_seen_ns: now_ns,
            step_count: 0,
            request_count: 0,
            surprise: crate::model::SessionSurprise::default(),
            alerted: 0,
            last_request: 0,
            identical_run: 0,
            cursor: crate::model::Cursor::default(),
            steps: StepRing::default(),
            ops_seen: SmallVec::new(),
            ops_seen_full: false,
        }
    }

    pub fn history(&self) -> History<'_> {
        let (front, back) = self.steps.as_slices();
        History { front, back }
    }

    /// Did this session ever request `op`? Ids are compared through `canon` (discovery's
    /// canonical id: operations merged since a step was taken, or since the model learned
    /// `op`, are one). `None` when the bounded set overflowed and `op` is not in it (unknown).
    pub fn has_seen(&self, op: OpId, canon: impl Fn(OpId) -> OpId) -> Option<bool> {
        let op = canon(op);
        if self.ops_seen.iter().any(|s| canon(s.op) == op) {
            Some(true)
        } else if self.ops_seen_full {
            None
        } else {
            Some(false)
        }
    }

    /// The latest step of `op` (compared through `canon`, as in [`Session::has_seen`]) more
    /// than `older_than` steps back. Exact within the retained history; past it, the last
    /// step of `op` that left the history if that one is far enough back, else the first.
    /// `None` when there is none or the bounded set of operations overflowed before `op`.
    pub fn occurrence_before(
        &self,
        op: OpId,
        older_than: u64,
        canon: impl Fn(OpId) -> OpId,
    ) -> Option<Occurrence> {
        let op = canon(op);
        let in_history = self
            .history()
            .iter()
            .rev()
            .enumerate()
            .skip(
                usize::try_from(older_than)
                    .unwrap_or(usize::MAX)
                    .saturating_add(1),
            )
            .find(|(_, step)| canon(step.op) == op)
            .map(|(ago, step)| Occurrence {
                steps_ago: ago as u64,
                at_ns: step.last_ns,
            });
        if in_history.is_some() {
            return in_history;
        }
        let at = |ms: u32| self.first_seen_ns.saturating_add(u64::from(ms) * 1_000_000);
        let ago = |step: u32| self.step_count.saturating_sub(u64::from(step));
        self.ops_seen
            .iter()
            .filter(|s| s.first_step != 0 && canon(s.op) == op)
            .filter_map(|s| {
                [(s.last_step, s.last_ms), (s.first_step, s.first_ms)]
                    .into_iter()
                    .map(|(step, ms)| Occurrence {
                        steps_ago: ago(step),
                        at_ns: at(ms),
                    })
                    .find(|o| o.steps_ago > older_than)
            })
            .min_by_key(|o| o.steps_ago)
    }

    /// Counts a request (its [`SessionKeyer::request_hash`]) into the run of identical
    /// requests; `same_step` is whether it repeated the last step's operation (a run never
    /// spans two operations). Returns the length of the run it ended, if any.
    pub fn note_request(&mut self, request: u64, same_step: bool) -> Option<u32> {
        if same_step && self.identical_run > 0 && request == self.last_request {
            self.identical_run = self.identical_run.saturating_add(1);
            return None;
        }
        let ended = (self.identical_run > 0).then_some(self.identical_run);
        self.last_request = request;
        self.identical_run = 1;
        ended
    }

    pub fn ops_seen(&self) -> impl Iterator<Item = OpId> + '_ {
        self.ops_seen.iter().map(|s| s.op)
    }

    /// Renames this session's operations through `map` (another discovery took over);
    /// false, and the session unchanged, when `map` has no counterpart for one of them. Steps
    /// that become the same operation in a row join into one, as repeats always do; at most
    /// the newest `cap` are kept. The cursor (slots of the old names) is dropped.
    fn remap(&mut self, map: &impl Fn(OpId) -> Option<OpId>, cap: usize) -> bool {
        let (older, newer) = self.steps.as_slices();
        let mut steps = StepRing::default();
        let mut retired: SmallVec<[Step; 2]> = SmallVec::new();
        for step in older.iter().chain(newer) {
            let Some(op) = map(step.op) else {
                return false;
            };
            match steps.back_mut() {
                Some(last) if last.op == op => {
                    last.count = last.count.saturating_add(step.count);
                    last.last_ns = step.last_ns;
                }
                _ => retired.extend(steps.push(Step { op, ..*step }, cap)),
            }
        }
        let Some(mut ops_seen) = self
            .ops_seen
            .iter()
            .map(|s| {
                Some(SeenOp {
                    op: map(s.op)?,
                    ..*s
                })
            })
            .collect::<Option<SmallVec<[SeenOp; 8]>>>()
        else {
            return false;
        };
        ops_seen.sort_unstable_by_key(|s| s.op);
        // Operations that became one: their earliest and latest steps past the history.
        ops_seen.dedup_by(|later, kept| {
            if later.op != kept.op {
                return false;
            }
            if later.first_step != 0 && (kept.first_step == 0 || later.first_step < kept.first_step)
            {
                (kept.first_step, kept.first_ms) = (later.first_step, later.first_ms);
            }
            if later.last_step > kept.last_step {
                (kept.last_step, kept.last_ms) = (later.last_step, later.last_ms);
            }
            true
        });
        self.steps = steps;
        self.ops_seen = ops_seen;
        // Steps the cap left out (a shorter history) are summed up like any that leave it.
        let first_retained = self.step_count.saturating_sub(self.steps.buf.len() as u64);
        let count = retired.len() as u64;
        for (i, old) in retired.into_iter().enumerate() {
            self.retire(&old, (first_retained + 1 + i as u64).saturating_sub(count));
        }
        self.cursor = crate::model::Cursor::default();
        true
    }

    fn record_op(&mut self, op: OpId, cap: usize) {
        if let Err(pos) = self.ops_seen.binary_search_by_key(&op, |s| s.op) {
            if self.ops_seen.len() < cap {
                let seen = SeenOp {
                    op,
                    first_step: 0,
                    last_step: 0,
                    first_ms: 0,
                    last_ms: 0,
                };
                self.ops_seen.insert(pos, seen);
            } else {
                self.ops_seen_full = true;
            }
        }
    }

    /// Notes `step` (number `number`) leaving the retained history.
    fn retire(&mut self, step: &Step, number: u64) {
        let Ok(i) = self.ops_seen.binary_search_by_key(&step.op, |s| s.op) else {
            return; // not recorded: the set was full
        };
        let number = u32::try_from(number).unwrap_or(u32::MAX).max(1);
        let since = step.last_ns.saturating_sub(self.first_seen_ns);
        let ms = u32::try_from(since.div_ceil(1_000_000)).unwrap_or(u32::MAX);
        let seen = &mut self.ops_seen[i];
        if seen.first_step == 0 {
            (seen.first_step, seen.first_ms) = (number, ms);
        }
        (seen.last_step, seen.last_ms) = (number, ms);
    }
}

/// What [`SessionTable::observe`] did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObserveResult {
    pub kind: StepKind,
    /// The current step's count after this request (1 for a new step).
    pub count: u32,
    /// A session under this key had idled out and was replaced by a fresh one.
    pub restarted_after_idle: bool,
    /// Making room for a new session evicted the least recently active one.
    pub evicted_other: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// First request of a session (also a new step).
    NewSession,
    NewStep,
    /// Same operation as the previous request: the last step's count went up.
    Repeat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SessionCounters {
    pub live: usize,
    pub created: u64,
    pub expired: u64,
    /// Sessions ended to make room, for either cap.
    pub evicted: u64,
    /// Of those, sessions ended because their client had `max_sessions_per_client`.
    pub evicted_per_client: u64,
}

/// One row of `precedent sessions`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionInfo {
    /// Truncated hashed key.
    pub session: String,
    pub client: IpAddr,
    pub steps: u64,
    pub requests: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
}

/// "No slot": the end of the recency list.
const NIL: u32 = u32::MAX;

/// A session and its neighbours in the recency list and in its client's list.
#[derive(Debug, Clone)]
struct Slot {
    session: Session,
    /// The next more recently active slot (`NIL` for the most recent).
    newer: u32,
    /// The next less recently active slot (`NIL` for the least recent).
    older: u32,
    /// The client the session started from.
    group: ClientGroup,
    /// The client's next newer and older sessions, in the order they started.
    group_newer: u32,
    group_older: u32,
}

/// What the per-client cap counts sessions by: an IPv4 address, or an IPv6 address's /64
/// (one host is routinely given a whole /64, so its addresses are one client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientGroup {
    V4(u32),
    V6(u64),
}

impl ClientGroup {
    fn of(ip: IpAddr) -> Self {
        let ip = ip.to_canonical();
        match ip {
            IpAddr::V4(a) => ClientGroup::V4(a.to_bits()),
            IpAddr::V6(a) => ClientGroup::V6((a.to_bits() >> 64) as u64),
        }
    }
}

/// One client's live sessions: a list through their slots, oldest started first (after a
/// compaction, least recently active first).
#[derive(Debug, Clone, Copy)]
struct ClientSessions {
    oldest: u32,
    newest: u32,
    count: u32,
}

/// Bounded table of live sessions, least recently active evicted first.
///
/// Flat storage: sessions live in one `Vec` of slots (reused, never more than `max_sessions`),
/// ordered by recency through slot indexes, and found through a hash table of slot indexes.
/// A request costs one probe and a few index writes; nothing is allocated once the table has
/// grown, and a session's history is inline (see [`StepRing`]).
pub struct SessionTable {
    config: SessionConfig,
    idle_ns: u64,
    slots: Vec<Slot>,
    /// Slots of sessions that ended, for reuse.
    free: Vec<u32>,
    /// Slot indexes, hashed by their session's key.
    index: HashTable<u32>,
    /// Each client's sessions, for the per-client cap. Seeded hashing: clients choose their
    /// addresses (a whole IPv6 /64 of them), so a fixed hash could be steered into collisions.
    clients: hashbrown::HashMap<ClientGroup, ClientSessions>,
    /// Most and least recently active slots (`NIL` when empty).
    newest: u32,
    oldest: u32,
    counters: SessionCounters,
}

/// Keys are already secret-keyed hashes (uniform, unpredictable without the secret), so the
/// fast FxHash mix of their bits is enough; it also spreads test keys such as `SessionKey(3)`.
fn key_hash(key: &SessionKey) -> u64 {
    FxBuildHasher.hash_one(key)
}

impl fmt::Debug for SessionTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionTable")
            .field("config", &self.config)
            .field("counters", &self.counters)
            .field("sessions", &self.sessions().collect::<Vec<_>>())
            .finish()
    }
}

impl SessionTable {
    pub fn new(config: SessionConfig) -> Self {
        SessionTable {
            idle_ns: u64::try_from(config.idle_timeout.as_nanos()).unwrap_or(u64::MAX),
            slots: Vec::new(),
            free: Vec::new(),
            index: HashTable::new(),
            clients: hashbrown::HashMap::new(),
            newest: NIL,
            oldest: NIL,
            counters: SessionCounters::default(),
            config,
        }
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    fn cap(&self) -> usize {
        self.config.max_sessions.max(1)
    }

    /// Applies a reloaded configuration. The idle timeout and the per-session limit of
    /// remembered operations apply from the next request (a session already holding more keeps
    /// them). A lower `max_sessions` evicts the least recently active sessions down to it, as
    /// the cap always does (counted in `evicted`), and gives back their slots' memory.
    /// Returns how many sessions were evicted.
    pub fn reconfigure(&mut self, config: SessionConfig) -> usize {
        self.idle_ns = u64::try_from(config.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
        self.config = config;
        let mut evicted = 0;
        while self.index.len() > self.cap() && self.oldest != NIL {
            self.remove(self.oldest);
            evicted += 1;
        }
        self.counters.evicted += evicted as u64;
        self.counters.live = self.index.len();
        if self.slots.len() > self.cap() {
            self.compact();
        }
        evicted
    }

    /// Renames the operations of every live session through `map`, for another discovery
    /// that took over (a loaded or reset model), so histories keep meaning what was
    /// requested. A session with an operation `map` cannot name ends, as if it had idled out
    /// (counted in `expired`). Returns how many ended.
    pub fn remap_ops(&mut self, map: impl Fn(OpId) -> Option<OpId>) -> usize {
        let history_cap = self.config.n_max + 1;
        let mut ended = Vec::new();
        let mut i = self.oldest;
        while i != NIL {
            let slot = &mut self.slots[i as usize];
            if !slot.session.remap(&map, history_cap) {
                ended.push(i);
            }
            i = slot.newer;
        }
        for &i in &ended {
            self.remove(i);
        }
        self.counters.expired += ended.len() as u64;
        self.counters.live = self.index.len();
        ended.len()
    }

    /// Puts back sessions saved by an earlier run (oldest first, as a restart finds them),
    /// their operations renamed through `map` (the discovery now loaded numbers them its own
    /// way). Sessions idle at `now_ns`, already live, or holding an operation `map` cannot
    /// name are left out, and so are the least recent beyond the room left under the cap:
    /// a restored session never evicts a live one. Returns how many were put back.
    pub fn restore(
        &mut self,
        saved: impl IntoIterator<Item = Session>,
        map: impl Fn(OpId) -> Option<OpId>,
        now_ns: u64,
    ) -> usize {
        let history_cap = self.config.n_max + 1;
        let mut back: Vec<Session> = saved
            .into_iter()
            .filter(|s| {
                now_ns.saturating_sub(s.last_seen_ns) <= self.idle_ns && self.find(&s.key).is_none()
            })
            .filter_map(|mut s| s.remap(&map, history_cap).then_some(s))
            .map(|mut s| {
                // Stamped after now (the clock stepped back since the save, or a damaged
                // file): as seen now. Left in the future it would head the idle list
                // unexpired and stop the sweep of every session behind it.
                s.last_seen_ns = s.last_seen_ns.min(now_ns);
                s
            })
            .collect();
        let room = self.cap().saturating_sub(self.index.len());
        let back = back.split_off(back.len().saturating_sub(room));
        let restored = back.len();
        for session in back {
            self.insert(session);
        }
        self.counters.live = self.index.len();
        restored
    }

    /// Moves the live sessions into a table of just their size, keeping their recency order.
    fn compact(&mut self) {
        let mut order = Vec::with_capacity(self.index.len());
        let mut i = self.oldest;
        while i != NIL {
            order.push(i);
            i = self.slots[i as usize].newer;
        }
        let mut old: Vec<Option<(Session, ClientGroup)>> = std::mem::take(&mut self.slots)
            .into_iter()
            .map(|slot| Some((slot.session, slot.group)))
            .collect();
        self.free = Vec::new();
        self.index = HashTable::with_capacity(order.len());
        self.clients = hashbrown::HashMap::new();
        self.newest = NIL;
        self.oldest = NIL;
        self.slots.reserve_exact(order.len());
        for i in order {
            // Each keeps the client it started from (its address may have changed since).
            if let Some((session, group)) = old[i as usize].take() {
                self.place(session, group);
            }
        }
    }

    fn find(&self, key: &SessionKey) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(key_hash(key), |&i| slots[i as usize].session.key == *key)
            .copied()
    }

    /// Takes slot `i` out of the recency list.
    fn unlink(&mut self, i: u32) {
        let Slot { newer, older, .. } = self.slots[i as usize];
        match newer {
            NIL => self.newest = older,
            n => self.slots[n as usize].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.slots[o as usize].newer = newer,
        }
    }

    /// Puts slot `i` (not in the list) at the most recent end.
    fn link_newest(&mut self, i: u32) {
        let old_newest = self.newest;
        let s = &mut self.slots[i as usize];
        s.newer = NIL;
        s.older = old_newest;
        match old_newest {
            NIL => self.oldest = i,
            n => self.slots[n as usize].newer = i,
        }
        self.newest = i;
    }

    /// Puts slot `i` (in no client's list) at the newest end of its client's list.
    fn group_link(&mut self, i: u32) {
        let group = self.slots[i as usize].group;
        let list = self.clients.entry(group).or_insert(ClientSessions {
            oldest: NIL,
            newest: NIL,
            count: 0,
        });
        let old_newest = list.newest;
        list.newest = i;
        list.count += 1;
        if old_newest == NIL {
            list.oldest = i;
        } else {
            self.slots[old_newest as usize].group_newer = i;
        }
        let s = &mut self.slots[i as usize];
        s.group_newer = NIL;
        s.group_older = old_newest;
    }

    /// Takes slot `i` out of its client's list.
    fn group_unlink(&mut self, i: u32) {
        let Slot {
            group,
            group_newer: newer,
            group_older: older,
            ..
        } = self.slots[i as usize];
        let Some(list) = self.clients.get_mut(&group) else {
            return;
        };
        list.count -= 1;
        if list.count == 0 {
            self.clients.remove(&group);
            return;
        }
        match newer {
            NIL => list.newest = older,
            n => self.slots[n as usize].group_older = older,
        }
        match older {
            NIL => list.oldest = newer,
            o => self.slots[o as usize].group_newer = newer,
        }
    }

    /// Drops slot `i`'s session from the index and the recency list; the slot is then free.
    fn remove(&mut self, i: u32) {
        self.unlink(i);
        self.group_unlink(i);
        let hash = key_hash(&self.slots[i as usize].session.key);
        if let Ok(entry) = self.index.find_entry(hash, |&j| j == i) {
            entry.remove();
        }
        self.free.push(i);
    }

    /// A slot for a new session, after making room: a client at its cap loses its oldest
    /// session, else a full table its least recently active one. Returns the slot and whether
    /// a session was evicted (counted here).
    fn insert(&mut self, session: Session) -> (u32, bool) {
        let per_client = self.config.max_sessions_per_client.max(1);
        let group = ClientGroup::of(session.client);
        let victim = match self.clients.get(&group) {
            Some(list) if list.count as usize >= per_client => {
                self.counters.evicted_per_client += 1;
                Some(list.oldest)
            }
            _ if self.index.len() >= self.cap() && self.oldest != NIL => Some(self.oldest),
            _ => None,
        };
        if let Some(i) = victim {
            self.remove(i);
            self.counters.evicted += 1;
        }
        (self.place(session, group), victim.is_some())
    }

    /// Stores a session of client `group` in a free slot or a new one; the caller made room.
    fn place(&mut self, session: Session, group: ClientGroup) -> u32 {
        let hash = key_hash(&session.key);
        let slot = Slot {
            group,
            session,
            newer: NIL,
            older: NIL,
            group_newer: NIL,
            group_older: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                if self.slots.len() == self.slots.capacity() {
                    // Grow by an eighth (at least 64 slots), not the doubling `push` would do:
                    // a slot is ~0.5 KB, so doubling left up to half the table's memory unused.
                    // Still amortised O(1) per insert. Never past the cap, which is never exceeded.
                    let room = self.cap().saturating_sub(self.slots.len());
                    let step = (self.slots.len() / 8).max(64).min(room.max(1));
                    self.slots.reserve_exact(step);
                }
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        let slots = &self.slots;
        self.index
            .insert_unique(hash, i, |&j| key_hash(&slots[j as usize].session.key));
        self.link_newest(i);
        self.group_link(i);
        i
    }

    /// Records that `key` requested `op` at `now_ns`: starts a session if needed (evicting the
    /// least recently active at the cap), restarts one that idled out, and either opens a new
    /// step or counts a repeat. Returns what happened and the session.
    pub fn observe(
        &mut self,
        key: SessionKey,
        op: OpId,
        client: IpAddr,
        now_ns: u64,
    ) -> (ObserveResult, &mut Session) {
        let history_cap = self.config.n_max + 1;
        let mut restarted = false;
        let mut evicted = false;
        let mut new_session = false;
        let i = match self.find(&key) {
            Some(i) => {
                self.unlink(i);
                self.link_newest(i);
                let s = &mut self.slots[i as usize].session;
                if now_ns.saturating_sub(s.last_seen_ns) > self.idle_ns {
                    *s = Session::new(key, client, now_ns);
                    restarted = true;
                    new_session = true;
                    self.counters.expired += 1;
                    self.counters.created += 1;
                    // A new session: it belongs to the client it starts from now.
                    self.group_unlink(i);
                    self.slots[i as usize].group = ClientGroup::of(client);
                    self.group_link(i);
                }
                i
            }
            None => {
                let (i, ev) = self.insert(Session::new(key, client, now_ns));
                evicted = ev;
                new_session = true;
                self.counters.created += 1;
                i
            }
        };
        self.counters.live = self.index.len();
        let max_ops_seen = self.config.max_ops_seen;
        let s = &mut self.slots[i as usize].session;
        s.last_seen_ns = s.last_seen_ns.max(now_ns);
        s.client = client;
        s.request_count += 1;
        let (kind, count) = match s.steps.back_mut() {
            Some(last) if last.op == op => {
                last.count = last.count.saturating_add(1);
                last.last_ns = now_ns;
                (StepKind::Repeat, last.count)
            }
            _ => {
                s.record_op(op, max_ops_seen);
                let step = Step {
                    op,
                    count: 1,
                    first_ns: now_ns,
                    last_ns: now_ns,
                };
                if let Some(old) = s.steps.push(step, history_cap) {
                    // The ring held steps `step_count - cap + 1 ..= step_count`; the oldest left.
                    let number = (s.step_count + 1).saturating_sub(history_cap as u64);
                    s.retire(&old, number);
                }
                s.step_count += 1;
                (
                    if new_session {
                        StepKind::NewSession
                    } else {
                        StepKind::NewStep
                    },
                    1,
                )
            }
        };
        (
            ObserveResult {
                kind,
                count,
                restarted_after_idle: restarted,
                evicted_other: evicted,
            },
            s,
        )
    }

    /// The session for `key` without touching its recency.
    pub fn get(&self, key: &SessionKey) -> Option<&Session> {
        self.find(key).map(|i| &self.slots[i as usize].session)
    }

    pub fn get_mut(&mut self, key: &SessionKey) -> Option<&mut Session> {
        self.find(key).map(|i| &mut self.slots[i as usize].session)
    }

    /// Ends sessions idle for longer than the timeout. The least recently active session is
    /// checked first and the sweep stops at the first live one, so it costs O(expired).
    /// (Exact while `now_ns` never goes backwards, which the engine's clock guarantees.)
    pub fn sweep(&mut self, now_ns: u64) -> usize {
        self.sweep_with(now_ns, |_| {})
    }

    /// Like [`SessionTable::sweep`], handing each ended session to `ended` first (the engine
    /// learns from a session's last run and its overall surprise when it ends).
    pub fn sweep_with(&mut self, now_ns: u64, mut ended: impl FnMut(&Session)) -> usize {
        let mut n = 0;
        while self.oldest != NIL {
            let i = self.oldest;
            let s = &self.slots[i as usize].session;
            if now_ns.saturating_sub(s.last_seen_ns) <= self.idle_ns {
                break;
            }
            ended(s);
            self.remove(i);
            n += 1;
        }
        self.counters.expired += n as u64;
        self.counters.live = self.index.len();
        n
    }

    pub fn counters(&self) -> SessionCounters {
        SessionCounters {
            live: self.index.len(),
            ..self.counters
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Most recently active first, at most `limit`.
    pub fn list(&self, limit: usize) -> Vec<SessionInfo> {
        self.sessions()
            .take(limit)
            .map(|s| SessionInfo {
                session: s.key.short(),
                client: s.client,
                steps: s.step_count,
                requests: s.request_count,
                first_seen_ns: s.first_seen_ns,
                last_seen_ns: s.last_seen_ns,
            })
            .collect()
    }

    /// Every live session, most recently active first (for snapshots; holds no raw identifier).
    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        let mut i = self.newest;
        std::iter::from_fn(move || {
            let slot = self.slots.get(i as usize)?;
            i = slot.older;
            Some(&slot.session)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::http::{HttpConfig, Method, Parser};

    const SECRET: [u8; 16] = *b"0123456789abcdef";
    const SEC: u64 = 1_000_000_000;
    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

    fn jwt(payload: &str) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.{}",
            e.encode(r#"{"alg":"HS256"}"#),
            e.encode(payload),
            e.encode("sig")
        )
    }

    fn key_for(keyer: &SessionKeyer, raw: &str) -> (SessionKey, KeySource) {
        let cfg = HttpConfig {
            session_headers: vec!["authorization".into(), "x-api-key".into()],
            ..Default::default()
        };
        let mut p = Parser::new(cfg);
        let r = p.parse(raw.as_bytes()).unwrap();
        keyer.key(&r.headers, IP)
    }

    #[test]
    fn raw_token_never_appears_in_state_listing_or_debug() {
        let token = "Bearer sk_live_SUPERSECRET_abc123";
        let claim_value = "user-4242-alice";
        let keyer = SessionKeyer::new(
            SECRET,
            vec![
                IdentifierSource::JwtClaim {
                    claim: "sub".into(),
                    header: "authorization".into(),
                },
                IdentifierSource::Header {
                    name: "authorization".into(),
                },
            ],
        );
        let mut t = SessionTable::new(SessionConfig::default());
        let (k1, _) = key_for(
            &keyer,
            &format!("GET / HTTP/1.1\r\nAuthorization: {token}\r\n\r\n"),
        );
        let bearer_jwt = format!("Bearer {}", jwt(&format!(r#"{{"sub":"{claim_value}"}}"#)));
        let (k2, src) = key_for(
            &keyer,
            &format!("GET / HTTP/1.1\r\nAuthorization: {bearer_jwt}\r\n\r\n"),
        );
        assert_eq!(src, KeySource::Identifier(0));
        t.observe(k1, OpId(1), IP, SEC);
        t.observe(k2, OpId(2), IP, SEC);
        let dumps = [
            serde_json::to_string(&t.sessions().collect::<Vec<_>>()).unwrap(),
            serde_json::to_string(&t.list(10)).unwrap(),
            format!("{t:?}"),
            format!("{keyer:?}"),
            format!("{k1:?} {k2} {}", k1.short()),
        ];
        for d in &dumps {
            for secret in [
                "SUPERSECRET",
                "sk_live",
                claim_value,
                &bearer_jwt[7..],
                "0123456789abcdef",
            ] {
                assert!(!d.contains(secret), "{secret:?} leaked into {d}");
            }
        }
        // And the hash depends on the secret.
        let other = SessionKeyer::new(
            [9; 16],
            vec![IdentifierSource::Header {
                name: "authorization".into(),
            }],
        );
        let (k3, _) = key_for(
            &other,
            &format!("GET / HTTP/1.1\r\nAuthorization: {token}\r\n\r\n"),
        );
        assert_ne!(k1, k3);
    }

    #[test]
    fn jwt_claim_is_extracted_and_malformed_jwt_falls_back_to_next_source() {
        let keyer = SessionKeyer::new(
            SECRET,
            vec![
                IdentifierSource::JwtClaim {
                    claim: "sub".into(),
                    header: "authorization".into(),
                },
                IdentifierSource::Header {
                    name: "x-api-key".into(),
                },
            ],
        );
        // Same subject, different signatures/issued-at: same session.
        let a = jwt(r#"{"sub":"alice","iat":1}"#);
        let b = jwt(r#"{"sub":"alice","iat":2}"#);
        let (ka, sa) = key_for(
            &keyer,
            &format!("GET / HTTP/1.1\r\nAuthorization: Bearer {a}\r\n\r\n"),
        );
        let (kb, _) = key_for(
            &keyer,
            &format!("GET / HTTP/1.1\r\nAuthorization: bearer {b}\r\n\r\n"),
        );
        assert_eq!((ka, sa), (kb, KeySource::Identifier(0)));
        let n = jwt(r#"{"sub":12345}"#);
        let (kn, _) = key_for(
            &keyer,
            &format!("GET / HTTP/1.1\r\nAuthorization: Bearer {n}\r\n\r\n"),
        );
        assert_ne!(kn, ka);
        for bad in [
            "Bearer not-a-jwt",
            "Bearer a.!!!.c",
            "Bearer a.e30.c",
            "Basic YWxhZGRpbjpvcGVu",
        ] {
            let raw = format!("GET / HTTP/1.1\r\nAuthorization: {bad}\r\nX-Api-Key: k1\r\n\r\n");
            assert_eq!(key_for(&keyer, &raw).1, KeySource::Identifier(1), "{bad}");
        }
        let raw = "GET / HTTP/1.1\r\nAuthorization: Bearer junk\r\n\r\n";
        assert_eq!(key_for(&keyer, raw).1, KeySource::ClientAddress);
    }

    #[test]
    fn cookie_by_name_among_several() {
        let keyer = SessionKeyer::new(
            SECRET,
            vec![IdentifierSource::Cookie { name: "sid".into() }],
        );
        let (k1, s1) = key_for(
            &keyer,
            "GET / HTTP/1.1\r\nCookie: theme=dark; sid=abc; x=1\r\n\r\n",
        );
        let (k2, _) = key_for(
            &keyer,
            "GET / HTTP/1.1\r\nCookie: a=b\r\nCookie: sid=\"abc\"\r\n\r\n",
        );
        let (k3, _) = key_for(&keyer, "GET / HTTP/1.1\r\nCookie: sidx=abc\r\n\r\n");
        assert_eq!(s1, KeySource::Identifier(0));
        assert_eq!(k1, k2);
        assert_ne!(k1, k3);
        let (_, s4) = key_for(&keyer, "GET / HTTP/1.1\r\nCookie: sid=\r\n\r\n");
        assert_eq!(
            s4,
            KeySource::ClientAddress,
            "an empty cookie is no identifier"
        );
    }

    #[test]
    fn successive_repeats_collapse_into_one_step() {
        let mut t = SessionTable::new(SessionConfig::default());
        let k = SessionKey(7);
        assert_eq!(t.observe(k, OpId(1), IP, SEC).0.kind, StepKind::NewSession);
        assert_eq!(t.observe(k, OpId(2), IP, 2 * SEC).0.kind, StepKind::NewStep);
        let (r, _) = t.observe(k, OpId(2), IP, 3 * SEC);
        assert_eq!((r.kind, r.count), (StepKind::Repeat, 2));
        let (r, s) = t.observe(k, OpId(2), IP, 4 * SEC);
        assert_eq!(r.count, 3);
        let steps: Vec<_> = s.history().iter().map(|s| (s.op.0, s.count)).collect();
        assert_eq!(steps, vec![(1, 1), (2, 3)]);
        assert_eq!(s.history().last().unwrap().first_ns, 2 * SEC);
        assert_eq!((s.step_count, s.request_count), (2, 4));
        assert_eq!(s.has_seen(OpId(1), |o| o), Some(true));
        assert_eq!(s.has_seen(OpId(9), |o| o), Some(false));
    }

    #[test]
    fn history_keeps_n_max_plus_one_steps() {
        let mut t = SessionTable::new(SessionConfig {
            n_max: 3,
            ..Default::default()
        });
        let k = SessionKey(1);
        for i in 0..10 {
            t.observe(k, OpId(i), IP, SEC + i as u64);
        }
        let s = t.get(&k).unwrap();
        assert_eq!(
            s.history().iter().map(|s| s.op.0).collect::<Vec<_>>(),
            vec![6, 7, 8, 9]
        );
        assert_eq!(s.step_count, 10);
    }

    #[test]
    fn idle_timeout_restarts_lazily_and_sweep_expires() {
        let mut t = SessionTable::new(SessionConfig {
            idle_timeout: Duration::from_secs(600),
            ..Default::default()
        });
        let (a, b) = (SessionKey(1), SessionKey(2));
        t.observe(a, OpId(1), IP, 0);
        t.observe(b, OpId(1), IP, 100 * SEC);
        // Exactly at the timeout is still the same session.
        assert_eq!(
            t.observe(a, OpId(2), IP, 600 * SEC).0.kind,
            StepKind::NewStep
        );
        // Past it: a fresh session, counted as expired.
        let (r, s) = t.observe(a, OpId(3), IP, 1201 * SEC);
        assert!(r.restarted_after_idle);
        assert_eq!(r.kind, StepKind::NewSession);
        assert_eq!(s.history().len(), 1);
        assert_eq!(t.counters().expired, 1);
        // b was last seen at 100 s: a sweep at 701 s ends it, a is still live.
        assert_eq!(t.sweep(701 * SEC), 1);
        assert!(t.get(&b).is_none() && t.get(&a).is_some());
        assert_eq!(
            t.counters(),
            SessionCounters {
                live: 1,
                created: 3,
                expired: 2,
                evicted: 0,
                evicted_per_client: 0,
            }
        );
    }

    /// A million distinct keys (about a second in a debug build) never grow the table past
    /// its cap, and every eviction is counted.
    #[test]
    fn flood_of_distinct_keys_is_evicted_and_counted_under_cap() {
        let mut t = SessionTable::new(SessionConfig {
            max_sessions: 1_000,
            ..Default::default()
        });
        let keyer = SessionKeyer::new(SECRET, vec![]);
        for i in 0..1_000_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(i));
            let (k, _) = keyer.key(&SelectedHeaders::default(), ip);
            t.observe(k, OpId(i % 7), ip, u64::from(i));
            assert!(t.len() <= 1_000);
        }
        let c = t.counters();
        assert_eq!(c.live, 1_000);
        assert_eq!(c.created, 1_000_000);
        assert_eq!(c.evicted, 999_000);
        // The survivors are the most recent ones.
        let newest = keyer
            .key(
                &SelectedHeaders::default(),
                IpAddr::V4(Ipv4Addr::from(999_999u32)),
            )
            .0;
        assert!(t.get(&newest).is_some());
    }

    /// A reload that lowers the cap evicts the least recently active sessions down to it and
    /// shrinks the table; the survivors keep their histories and order, and a new idle
    /// timeout applies from the next request.
    #[test]
    fn reconfigure_lowers_the_cap_keeping_the_newest_and_applies_the_new_timeout() {
        let mut t = SessionTable::new(SessionConfig {
            max_sessions: 100,
            ..Default::default()
        });
        for i in 0..100u64 {
            t.observe(SessionKey(u128::from(i)), OpId(1), IP, i * SEC);
            t.observe(SessionKey(u128::from(i)), OpId(2), IP, i * SEC);
        }
        let evicted = t.reconfigure(SessionConfig {
            max_sessions: 10,
            idle_timeout: std::time::Duration::from_secs(30),
            ..Default::default()
        });
        assert_eq!(evicted, 90);
        assert_eq!(t.counters().evicted, 90);
        assert_eq!(t.len(), 10);
        assert!(t.slots.len() <= 10, "slots kept: {}", t.slots.len());
        // The ten most recent, newest first, histories intact.
        let keys: Vec<u128> = t.sessions().map(|s| s.key.0).collect();
        assert_eq!(keys, (90..100).rev().collect::<Vec<_>>());
        let s = t.get(&SessionKey(95)).unwrap();
        assert_eq!(
            s.history().iter().map(|st| st.op).collect::<Vec<_>>(),
            [OpId(1), OpId(2)]
        );
        // Still a working table: a new session evicts the oldest survivor.
        t.observe(SessionKey(1_000), OpId(1), IP, 100 * SEC);
        assert_eq!(t.len(), 10);
        assert!(t.get(&SessionKey(90)).is_none());
        // 31 s of quiet is past the new 30 s timeout (the old one was 10 minutes).
        let (r, _) = t.observe(SessionKey(99), OpId(3), IP, 99 * SEC + 31 * SEC);
        assert_eq!(r.kind, StepKind::NewSession);
    }

    /// Restored sessions keep the cap (the most recent win, as for new ones), are renamed
    /// through the map, and never replace a live one.
    #[test]
    fn restore_keeps_the_cap_renames_and_leaves_live_sessions_alone() {
        let mut before = SessionTable::new(SessionConfig::default());
        for i in 0..3u64 {
            before.observe(SessionKey(u128::from(i)), OpId(1), IP, i * SEC);
        }
        let saved: Vec<Session> = before.sessions().cloned().collect();
        let mut t = SessionTable::new(SessionConfig {
            max_sessions: 2,
            ..Default::default()
        });
        let rename = |op: OpId| Some(OpId(op.0 + 10));
        let restored = t.restore(saved.iter().rev().cloned(), rename, 5 * SEC);
        assert_eq!(restored, 2);
        let keys: Vec<u128> = t.sessions().map(|s| s.key.0).collect();
        assert_eq!(keys, [2, 1], "the cap of 2 keeps the most recent");
        let ops: Vec<OpId> = t
            .get(&SessionKey(1))
            .unwrap()
            .history()
            .iter()
            .map(|s| s.op)
            .collect();
        assert_eq!(ops, [OpId(11)]);
        t.observe(SessionKey(2), OpId(7), IP, 6 * SEC);
        assert_eq!(
            t.restore(saved.iter().rev().cloned(), rename, 6 * SEC),
            0,
            "both live"
        );
        let ops: Vec<OpId> = t
            .get(&SessionKey(2))
            .unwrap()
            .history()
            .iter()
            .map(|s| s.op)
            .collect();
        assert_eq!(ops, [OpId(11), OpId(7)], "the live one is untouched");
    }

    /// Walks every client's list and checks it against the table: each live session is in
    /// its client's list exactly once, in the order the sessions started, with the count right.
    fn assert_client_lists(t: &SessionTable) {
        let mut listed = 0;
        for (group, list) in &t.clients {
            let (mut i, mut n, mut prev) = (list.oldest, 0, NIL);
            while i != NIL {
                let slot = &t.slots[i as usize];
                assert_eq!(slot.group, *group);
                assert_eq!(slot.group_older, prev);
                assert!(t.find(&slot.session.key) == Some(i), "listed but not live");
                (prev, i, n) = (i, slot.group_newer, n + 1);
            }
            assert_eq!((prev, n), (list.newest, list.count));
            listed += n as usize;
        }
        assert_eq!(listed, t.len());
    }

    /// One client minting session keys (random bearer tokens) evicts its own oldest sessions
    /// at the per-client cap, never another client's; an IPv6 /64 is one client.
    #[test]
    fn a_client_minting_session_keys_evicts_only_its_own_sessions() {
        let mut t = SessionTable::new(SessionConfig {
            max_sessions: 100,
            max_sessions_per_client: 10,
            ..Default::default()
        });
        let customer: IpAddr = "192.0.2.7".parse().unwrap();
        let flooder: IpAddr = "198.51.100.9".parse().unwrap();
        t.observe(SessionKey(1), OpId(1), customer, SEC);
        for k in 0..1000u128 {
            t.observe(SessionKey(1000 + k), OpId(2), flooder, 2 * SEC);
        }
        assert!(
            t.get(&SessionKey(1)).is_some(),
            "the customer's session stays"
        );
        assert_eq!(t.len(), 11);
        let keys: Vec<u128> = t.sessions().take(10).map(|s| s.key.0).collect();
        assert!(
            keys.iter().all(|&k| k >= 1990),
            "the flooder keeps its newest: {keys:?}"
        );
        let c = t.counters();
        assert_eq!((c.evicted, c.evicted_per_client), (990, 990));
        assert_client_lists(&t);
        // The addresses of one IPv6 /64 are one client; another /64 is another.
        for k in 0..30u128 {
            let ip: IpAddr = format!("2001:db8:0:1::{:x}", k + 1).parse().unwrap();
            t.observe(SessionKey(5000 + k), OpId(3), ip, 3 * SEC);
        }
        let other: IpAddr = "2001:db8:0:2::1".parse().unwrap();
        t.observe(SessionKey(9000), OpId(3), other, 3 * SEC);
        assert_eq!(t.len(), 11 + 10 + 1);
        assert_eq!(t.counters().evicted_per_client, 990 + 20);
        assert_client_lists(&t);
        // The table's own cap still evicts the least recently active, whoever it is.
        t.reconfigure(SessionConfig {
            max_sessions: 5,
            max_sessions_per_client: 10,
            ..Default::default()
        });
        assert_eq!(t.len(), 5);
        assert_client_lists(&t);
        // A session that idled out and restarts from another address moves to that client.
        t.observe(SessionKey(9000), OpId(3), flooder, 3 * SEC + 3600 * SEC);
        assert_eq!(t.get(&SessionKey(9000)).unwrap().client, flooder);
        assert_client_lists(&t);
        while !t.is_empty() {
            let oldest = t.oldest;
            t.remove(oldest);
            assert_client_lists(&t);
        }
        assert!(t.clients.is_empty());
    }

    /// A session saved with a time after the restart's (the clock stepped back) is restored as
    /// seen then: it expires in its turn, and sessions behind it are swept.
    #[test]
    fn a_session_saved_in_the_future_is_restored_as_seen_now() {
        let mut before = SessionTable::new(SessionConfig::default());
        before.observe(SessionKey(1), OpId(1), IP, 100 * SEC);
        before.observe(SessionKey(2), OpId(1), IP, 3600 * SEC);
        let saved: Vec<Session> = before.sessions().cloned().collect();
        let mut t = SessionTable::new(SessionConfig::default());
        assert_eq!(t.restore(saved.into_iter().rev(), Some, 100 * SEC), 2);
        let idle = SessionConfig::default().idle_timeout.as_nanos() as u64;
        assert_eq!(t.sweep(100 * SEC + idle + 1), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn ops_seen_is_bounded_and_says_when_it_does_not_know() {
        let mut t = SessionTable::new(SessionConfig {
            max_ops_seen: 4,
            ..Default::default()
        });
        let k = SessionKey(3);
        for i in 0..10 {
            t.observe(k, OpId(i), IP, SEC);
        }
        let s = t.get(&k).unwrap();
        assert_eq!(s.ops_seen().count(), 4);
        assert_eq!(s.has_seen(OpId(0), |o| o), Some(true));
        assert_eq!(s.has_seen(OpId(9), |o| o), None);
    }

    #[test]
    fn config_reads_from_toml_with_durations() {
        let cfg: SessionConfig = toml::from_str(
            r#"
            idle_timeout = "15m"
            identifiers = [
              { kind = "jwt_claim", claim = "sub" },
              { kind = "cookie", name = "sid" },
            ]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.idle_timeout, Duration::from_secs(900));
        assert_eq!(
            cfg.identifiers[0],
            IdentifierSource::JwtClaim {
                claim: "sub".into(),
                header: "authorization".into()
            }
        );
        assert!(toml::from_str::<SessionConfig>("idle_timeout = \"10 parsecs\"").is_err());
    }

    #[test]
    fn keys_are_the_keyed_siphash_of_the_tagged_value_however_long() {
        // The one-shot stack copy and the streaming path for long values must give what
        // feeding the tag and the value to the hasher gives (state files keep session keys).
        let secret = [9; 16];
        let keyer = SessionKeyer::new(secret, vec![]);
        for len in [0, 1, 7, 8, 45, 255, 256, 257, 4000] {
            let value: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut h = SipHasher13::new_with_key(&secret);
            h.write_u8(3);
            h.write(&value);
            assert_eq!(
                keyer.hash(3, &value),
                SessionKey(h.finish128().as_u128()),
                "{len} bytes"
            );
        }
        let mut h = sip::SipHasher13::new_with_key(&secret);
        h.write_u8(u8::MAX - 2);
        h.write(b"GET");
        h.write_u8(b' ');
        h.write_usize(1);
        h.write(b"h");
        h.write(b"/a/1");
        h.write_u8(b'?');
        h.write(b"x=2");
        assert_eq!(
            keyer.request_hash(Method::Get, Some("h"), "/a/1", Some("x=2")),
            h.finish()
        );
    }

    #[test]
    fn identical_requests_make_a_run_and_anything_else_ends_it() {
        let keyer = SessionKeyer::new([5; 16], vec![]);
        let get = |p: &str, q: Option<&str>| keyer.request_hash(Method::Get, None, p, q);
        // An inline query hashes like the split form the parser gives; other fields differ.
        assert_eq!(get("/a/1?x=2", None), get("/a/1", Some("x=2")));
        for other in [
            get("/a/1", None),
            get("/a/1", Some("x=3")),
            get("/a/2", Some("x=2")),
            keyer.request_hash(Method::Post, None, "/a/1", Some("x=2")),
            keyer.request_hash(Method::Get, Some("h"), "/a/1", Some("x=2")),
            SessionKeyer::new([6; 16], vec![]).request_hash(Method::Get, None, "/a/1?x=2", None),
        ] {
            assert_ne!(other, get("/a/1?x=2", None));
        }

        let mut s = Session::new(SessionKey(1), IP, 0);
        let (a, b) = (get("/a/1", None), get("/a/2", None));
        assert_eq!(
            s.note_request(a, false),
            None,
            "the first request ends nothing"
        );
        assert_eq!(s.note_request(a, true), None);
        assert_eq!(s.note_request(a, true), None);
        assert_eq!(s.identical_run, 3);
        assert_eq!(
            s.note_request(b, true),
            Some(3),
            "another id of the same operation"
        );
        assert_eq!(
            s.note_request(b, false),
            Some(1),
            "a new step always ends the run"
        );
        assert_eq!(s.identical_run, 1);
    }
}
