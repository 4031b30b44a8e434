//! Sessions: who is making the requests, and what they did in which order.
//!
//! A session key comes from the configured identifier (header, cookie, JWT claim, else the
//! client address) and is hashed with a per-install secret before anything stores it. Each
//! session keeps a short history of steps (successive repeats collapsed) in a bounded table.
use std::{collections::VecDeque, fmt, net::IpAddr, num::NonZeroUsize, time::Duration};

use base64::Engine as _;
use lru::LruCache;
use rustc_hash::FxBuildHasher;
use serde::{Deserialize, Serialize};
use siphasher::sip128::{Hasher128 as _, SipHasher13};
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
        let mut h = SipHasher13::new_with_key(&self.secret);
        h.write_u8(u8::MAX - 2);
        h.write(method.as_str().as_bytes());
        h.write_u8(b' ');
        // Length-prefixed so host and path cannot trade bytes.
        let host = host.unwrap_or("").as_bytes();
        h.write_usize(host.len());
        h.write(host);
        h.write(path.as_bytes());
        if let Some(q) = query {
            h.write_u8(b'?');
            h.write(q.as_bytes());
        }
        h.finish128().h1
    }

    fn hash(&self, tag: u8, value: &[u8]) -> SessionKey {
        let mut h = SipHasher13::new_with_key(&self.secret);
        h.write_u8(tag);
        h.write(value);
        SessionKey(h.finish128().as_u128())
    }
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
    steps: VecDeque<Step>,
    /// Sorted, capped set of operations seen in this session.
    ops_seen: SmallVec<[OpId; 16]>,
    ops_seen_full: bool,
}

impl Session {
    fn new(key: SessionKey, client: IpAddr, now_ns: u64, history_cap: usize) -> Self {
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
            steps: VecDeque::with_capacity(history_cap),
            ops_seen: SmallVec::new(),
            ops_seen_full: false,
        }
    }

    pub fn history(&self) -> History<'_> {
        let (front, back) = self.steps.as_slices();
        History { front, back }
    }

    /// Did this session ever request `op`? `None` when the bounded set overflowed and `op`
    /// is not in it (unknown).
    pub fn has_seen(&self, op: OpId) -> Option<bool> {
        match self.ops_seen.binary_search(&op) {
            Ok(_) => Some(true),
            Err(_) if self.ops_seen_full => None,
            Err(_) => Some(false),
        }
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

    pub fn ops_seen(&self) -> &[OpId] {
        &self.ops_seen
    }

    fn record_op(&mut self, op: OpId, cap: usize) {
        if let Err(pos) = self.ops_seen.binary_search(&op) {
            if self.ops_seen.len() < cap {
                self.ops_seen.insert(pos, op);
            } else {
                self.ops_seen_full = true;
            }
        }
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
    pub evicted: u64,
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

/// Bounded table of live sessions, least recently active evicted first.
pub struct SessionTable {
    config: SessionConfig,
    idle_ns: u64,
    sessions: LruCache<SessionKey, Session, FxBuildHasher>,
    counters: SessionCounters,
}

impl fmt::Debug for SessionTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionTable")
            .field("config", &self.config)
            .field("counters", &self.counters)
            .field(
                "sessions",
                &self.sessions.iter().map(|(_, s)| s).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl SessionTable {
    pub fn new(config: SessionConfig) -> Self {
        let cap = NonZeroUsize::new(config.max_sessions.max(1)).unwrap_or(NonZeroUsize::MIN);
        SessionTable {
            idle_ns: u64::try_from(config.idle_timeout.as_nanos()).unwrap_or(u64::MAX),
            // Keys are secret-keyed hashes, so a fast non-DoS-resistant hasher is safe here.
            sessions: LruCache::with_hasher(cap, FxBuildHasher),
            counters: SessionCounters::default(),
            config,
        }
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
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
        let idle_ns = self.idle_ns;
        match self.sessions.get_mut(&key) {
            Some(s) if now_ns.saturating_sub(s.last_seen_ns) > idle_ns => {
                *s = Session::new(key, client, now_ns, history_cap);
                restarted = true;
                new_session = true;
                self.counters.expired += 1;
                self.counters.created += 1;
            }
            Some(_) => {}
            None => {
                let s = Session::new(key, client, now_ns, history_cap);
                if self.sessions.push(key, s).is_some() {
                    evicted = true;
                    self.counters.evicted += 1;
                }
                new_session = true;
                self.counters.created += 1;
            }
        }
        self.counters.live = self.sessions.len();
        let max_ops_seen = self.config.max_ops_seen;
        let s = self
            .sessions
            .get_mut(&key)
            .expect("session was just looked up or inserted");
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
                if s.steps.len() == history_cap {
                    s.steps.pop_front();
                }
                s.steps.push_back(Step {
                    op,
                    count: 1,
                    first_ns: now_ns,
                    last_ns: now_ns,
                });
                s.step_count += 1;
                s.record_op(op, max_ops_seen);
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
        self.sessions.peek(key)
    }

    pub fn get_mut(&mut self, key: &SessionKey) -> Option<&mut Session> {
        self.sessions.peek_mut(key)
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
        while let Some((_, s)) = self.sessions.peek_lru() {
            if now_ns.saturating_sub(s.last_seen_ns) <= self.idle_ns {
                break;
            }
            if let Some((_, s)) = self.sessions.pop_lru() {
                ended(&s);
            }
            n += 1;
        }
        self.counters.expired += n as u64;
        self.counters.live = self.sessions.len();
        n
    }

    pub fn counters(&self) -> SessionCounters {
        SessionCounters {
            live: self.sessions.len(),
            ..self.counters
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Most recently active first, at most `limit`.
    pub fn list(&self, limit: usize) -> Vec<SessionInfo> {
        self.sessions
            .iter()
            .take(limit)
            .map(|(_, s)| SessionInfo {
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
        self.sessions.iter().map(|(_, s)| s)
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
        assert_eq!(s.has_seen(OpId(1)), Some(true));
        assert_eq!(s.has_seen(OpId(9)), Some(false));
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
                evicted: 0
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
        assert_eq!(s.ops_seen().len(), 4);
        assert_eq!(s.has_seen(OpId(0)), Some(true));
        assert_eq!(s.has_seen(OpId(9)), None);
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

        let mut s = Session::new(SessionKey(1), IP, 0, 4);
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
