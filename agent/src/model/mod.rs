//! The variable-order Markov chain of ../shared/seeds/vomc-important-sequences.txt, learned online:
//! next-operation counts for every context of length 0..=max_order over a sliding window of time
//! buckets, credible intervals, the seed's context collapse, important sequences and scoring.
//!
//! Contexts live in a hashed trie: slot ids in a `Vec<Node>`, found through one map keyed by
//! (parent slot, oldest operation). A context's parent is the context minus its oldest operation,
//! which is both the trie parent and the seed's collapse parent, so one walk from the root along the
//! newest operations of a history visits every context the request touches. Memory is capped by
//! `max_contexts` with CLOCK eviction of leaf contexts (counted), and the collapse runs in
//! `maintain` with a bounded amount of work per call.

mod collapse;
mod counts;
mod interval;
pub mod signals;

#[doc(hidden)]
pub mod bench_support;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use counts::{Entry, Node};
pub use interval::{CREDIBILITY, Interval, IntervalCache, beta_interval_exact};
pub use signals::{PopulationSurprise, RunLengths, SessionSurprise, SignalConfig};

/// A dense operation id (the glue converts discovery's `OpId(u32)`).
pub type Op = u32;

/// Slot id meaning "none" (the root's parent).
pub const NO_SLOT: u32 = u32::MAX;
const ROOT: u32 = 0;
/// Hard limit on `max_order`: depths are stored in a byte and walks use a stack array.
pub const MAX_ORDER_LIMIT: usize = 32;
/// Depths a session's [`Cursor`] covers (contexts of 1..=8 operations, the default `max_order`);
/// deeper contexts are looked up.
pub const CURSOR_DEPTH: usize = 8;
/// Slots the CLOCK hand may inspect to find a victim before giving up on creating a context.
const EVICT_SCAN: u32 = 512;
/// Predecessors kept per operation (the strongest ones).
const MAX_PREDECESSORS: usize = 8;

#[derive(Debug, Error, PartialEq)]
pub enum ModelError {
    #[error("model.max_order = {0} is out of range; use 0..={MAX_ORDER_LIMIT}")]
    MaxOrder(usize),
    #[error(
        "model.window_secs = {0} must be at least 1 and model.buckets = {1} between 1 and 10000"
    )]
    Window(u64, u32),
    #[error("model.max_contexts = {0} is too small; use at least 16")]
    MaxContexts(usize),
    #[error("model.{0} = {1} must be within [0, 1]")]
    Fraction(&'static str, f64),
    #[error("model.maintain_budget must be at least 1")]
    Budget,
}

/// Model settings (the `[model]` table of the config file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Longest context, in operations (sequences are up to max_order + 1 long). The seed uses 8.
    pub max_order: usize,
    /// Length of the sliding learning window.
    pub window_secs: u64,
    /// Buckets the window is divided into; counts leave the window one bucket at a time.
    pub buckets: u32,
    /// Cap on stored contexts; beyond it leaf contexts are evicted (counted).
    pub max_contexts: usize,
    /// A context of two or more operations is created only once its parent context has been
    /// seen this many times (one of a single operation on sight), so one-off walks do not spawn
    /// max_order contexts each. A context with fewer observations mostly has 99% intervals too
    /// wide to differ from its parent's, and the collapse discards it. The price: such a context
    /// misses its parent's first observations, so in its first window a sequence of three or
    /// more operations counts at most this many occurrences short (and its precedence score is
    /// that much lower). On FIFA (benches/model.rs), 16 instead of 4 keeps about half the
    /// contexts (54 MB instead of 89 MB; the collapse retains 57.0k instead of 58.2k), learns
    /// 1.1-1.3x as fast (interleaved runs) and lowers held-out log-loss from 5.83 to 5.74
    /// bits/op (deep contexts with few observations mostly add noise); the eval's detection is
    /// unchanged.
    pub min_count_to_extend: u32,
    /// A context is used to judge a transition only with at least this many observations.
    pub min_context_count: u32,
    /// Exact interval bounds are computed when scoring only if the point estimate is below this
    /// (an upper bound is never below its point estimate, so higher estimates cannot be "rare").
    pub interval_below: f64,
    /// Units of work (context entries examined) per `maintain` call.
    pub maintain_budget: usize,
    /// Predecessor lists keep sequences whose precedence score is at least this.
    pub predecessor_min_score: f64,
    /// ... and whose last operation occurred at least this many times.
    pub predecessor_min_support: u32,
    /// `important_sequences` lists sequences seen at least this many times.
    pub sequence_min_occurrences: u32,
    /// Operation ids at or above this are not tracked in per-operation tables (run lengths).
    pub max_ops: u32,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            max_order: 8,
            window_secs: 24 * 3600,
            buckets: 24,
            max_contexts: 1_000_000,
            min_count_to_extend: 16,
            min_context_count: 30,
            interval_below: 0.05,
            maintain_budget: 4096,
            predecessor_min_score: 0.9,
            predecessor_min_support: 20,
            sequence_min_occurrences: 5,
            max_ops: 65_536,
        }
    }
}

impl ModelConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.max_order > MAX_ORDER_LIMIT {
            return Err(ModelError::MaxOrder(self.max_order));
        }
        if self.window_secs == 0 || self.buckets == 0 || self.buckets > 10_000 {
            return Err(ModelError::Window(self.window_secs, self.buckets));
        }
        if self.max_contexts < 16 {
            return Err(ModelError::MaxContexts(self.max_contexts));
        }
        for (name, v) in [
            ("interval_below", self.interval_below),
            ("predecessor_min_score", self.predecessor_min_score),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(ModelError::Fraction(name, v));
            }
        }
        if self.maintain_budget == 0 {
            return Err(ModelError::Budget);
        }
        Ok(())
    }

    fn bucket_ns(&self) -> u64 {
        (self.window_secs.saturating_mul(1_000_000_000) / u64::from(self.buckets)).max(1)
    }
}

/// Counters behind "never silent growth".
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelStats {
    /// Transitions learned.
    pub learned: u64,
    pub contexts_created: u64,
    /// Leaf contexts evicted to stay under `max_contexts`.
    pub contexts_evicted: u64,
    /// Contexts not created because no victim was found within the eviction scan.
    pub contexts_refused: u64,
    /// Contexts freed because all their counts left the window.
    pub contexts_expired: u64,
    /// Context keys that matched a different context (expected never; such a context is skipped).
    pub key_collisions: u64,
    /// Completed expire + collapse cycles.
    pub collapse_cycles: u64,
    /// Contexts kept by the last completed collapse (the rows of the seed's table T, root included).
    pub retained_contexts: u64,
}

/// Scoring of one transition (history → next), computed before it is learned.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Transition {
    /// Length of the context used to judge the transition: the longest retained (not collapsed)
    /// context on the history with at least `min_context_count` observations, else the longest
    /// with any data.
    pub context_len: usize,
    /// Observations of that context (n) and of this next operation in it (k).
    pub n: u32,
    pub k: u32,
    /// k / n (0 when n = 0).
    pub probability: f64,
    /// n ≥ min_context_count.
    pub enough_data: bool,
    /// The next operation repeats the last step: a repeat, not a transition (see replay signal).
    pub is_repeat: bool,
    /// Smoothed predictive probability (Witten-Bell interpolation over all context lengths).
    pub predictive: f64,
    /// −log2(predictive).
    pub surprise_bits: f64,
}

/// One important sequence (a retained context followed by a next operation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImportantSequence {
    /// Oldest first; the last element is the operation the sequence leads to.
    pub ops: Vec<Op>,
    /// Occurrences of the whole sequence in the window.
    pub occurrences: u32,
    /// occurrences / occurrences of the last operation.
    pub precedence_score: f64,
    /// Observations of the context (the sequence minus its last operation).
    pub context_count: u32,
    /// 99% credible interval of P(last | context).
    pub interval: Interval,
}

/// An operation that learned sequences say nearly always comes before another.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Predecessor {
    pub op: Op,
    /// Best precedence score of a retained sequence ending in the operation and containing `op`.
    pub score: f64,
    /// Occurrences of the operation the score is relative to.
    pub support: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Phase {
    /// Expiring old buckets slot by slot, and gathering slots by depth for the collapse.
    Expire { cursor: u32 },
    /// Evaluating contexts of one depth, deepest first (children before parents).
    Collapse { depth: u8, pos: u32 },
}

/// What one `maintain` call did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MaintainReport {
    pub work: usize,
    pub cycle_completed: bool,
}

/// Memory use, for `precedent status` and the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct MemoryReport {
    /// Contexts stored (all of them are counted, retained or not: collapsed ones keep learning).
    pub contexts: usize,
    /// Of which kept by the last completed collapse.
    pub retained_contexts: u64,
    pub bytes: usize,
    pub bytes_per_context: f64,
}

/// The model: all learned state, serialisable for the state file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Model {
    cfg: ModelConfig,
    nodes: Vec<Node>,
    index: FxHashMap<u64, u32>,
    free: Vec<u32>,
    live: usize,
    clock_hand: u32,
    /// Newest time bucket seen (time never runs backwards for the model).
    epoch: u32,
    phase: Phase,
    /// Slots per depth gathered by the current cycle's expire pass.
    by_depth: Vec<Vec<u32>>,
    pending_predecessors: FxHashMap<Op, Vec<Predecessor>>,
    /// Contexts kept so far by the collapse in progress.
    pending_retained: u64,
    predecessors: FxHashMap<Op, Vec<Predecessor>>,
    /// Runs of identical requests (the replay signal's).
    runs: RunLengths,
    /// Runs of one operation, whatever its parameters (the enumeration signal's).
    step_runs: RunLengths,
    population: PopulationSurprise,
    stats: ModelStats,
    #[serde(skip)]
    cache: IntervalCache,
}

/// Per-session walk state: the slots of the contexts (lengths 1..=`CURSOR_DEPTH`) the session's
/// next walk visits, so a request needs no hash lookups. Hints only, checked before use; 32 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    slots: [u32; CURSOR_DEPTH],
}

impl Default for Cursor {
    fn default() -> Self {
        Cursor {
            slots: [NO_SLOT; CURSOR_DEPTH],
        }
    }
}

/// Hints the CPU to start loading every cache line of `bytes` bytes from `p` (no effect on
/// results). A context spans two or three lines, and its entries more: prefetching only the
/// first left the others to miss one after another.
#[inline(always)]
pub(crate) fn prefetch_lines<T>(p: *const T, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let start = p.cast::<i8>();
        let first_line = (start as usize) & !63;
        let mut off = first_line.wrapping_sub(start as usize);
        while (off as isize) < bytes as isize {
            // SAFETY: prefetching is a hint with no memory effects; any address is allowed
            // (wrapping_add: the pointer is never dereferenced).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(off)) };
            off = off.wrapping_add(64);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

/// Hints the CPU to start loading all of `node`.
#[inline(always)]
fn prefetch(node: &Node) {
    prefetch_lines(node as *const Node, std::mem::size_of::<Node>());
}

/// Key of the empty context; a context's key is folded from it along its operations, newest first.
const ROOT_KEY: u64 = 0x243f_6a88_85a3_08d3;

/// Key of the context `parent` extended by one older operation. Keys depend only on the operations,
/// not on where contexts are stored, so every lookup of a walk can be issued at once and their
/// cache misses overlap (a walk is up to max_order + 1 lookups). The splitmix64 finaliser is a
/// bijection, so distinct (parent key, op) pairs collide only by chance (≈ 2^-64 per pair), and
/// each found node is checked against its expected parent and operation anyway.
fn child_key(parent: u64, op: Op) -> u64 {
    let mut z = parent.rotate_left(17)
        ^ (u64::from(op).wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Model {
    pub fn new(cfg: ModelConfig) -> Result<Self, ModelError> {
        cfg.validate()?;
        let runs = RunLengths::new(cfg.max_ops);
        let step_runs = RunLengths::new(cfg.max_ops);
        Ok(Model {
            nodes: vec![Node::new(NO_SLOT, 0, 0, ROOT_KEY)],
            index: FxHashMap::default(),
            free: Vec::new(),
            live: 1,
            clock_hand: 0,
            epoch: 0,
            phase: Phase::Expire { cursor: 0 },
            by_depth: Vec::new(),
            pending_predecessors: FxHashMap::default(),
            pending_retained: 0,
            predecessors: FxHashMap::default(),
            runs,
            step_runs,
            population: PopulationSurprise::default(),
            stats: ModelStats::default(),
            cache: IntervalCache::new(),
            cfg,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Applies the configured settings to a model loaded from a file, which carries the
    /// settings it was saved with: thresholds, caps and budgets take effect (a lower
    /// `max_contexts` is reached by eviction over the next `maintain` calls). The settings the
    /// learned counts are built on stay as saved: context depth (`max_order`), the buckets of
    /// the window (`window_secs`, `buckets`) and the per-operation tables (`max_ops`); those
    /// that differ from `cfg` are returned by name (`precedent model reset` applies them).
    pub fn adopt_config(&mut self, cfg: &ModelConfig) -> Result<Vec<&'static str>, ModelError> {
        cfg.validate()?;
        let saved = &self.cfg;
        let kept = [
            ("max_order", cfg.max_order != saved.max_order),
            ("window_secs", cfg.window_secs != saved.window_secs),
            ("buckets", cfg.buckets != saved.buckets),
            ("max_ops", cfg.max_ops != saved.max_ops),
        ]
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect();
        self.cfg = ModelConfig {
            max_order: saved.max_order,
            window_secs: saved.window_secs,
            buckets: saved.buckets,
            max_ops: saved.max_ops,
            ..cfg.clone()
        };
        Ok(kept)
    }

    pub fn stats(&self) -> &ModelStats {
        &self.stats
    }

    /// Whether a loaded model is one this code could have built: a valid config, a root, every
    /// context indexed under its key with a live parent one shorter, child and live counts
    /// right, counts that cover their buckets, and maintenance state within range. The state
    /// file's loader refuses anything else as damaged, instead of a panic or wrong arithmetic
    /// later.
    pub fn check(&self) -> Result<(), String> {
        self.cfg.validate().map_err(|e| e.to_string())?;
        let len = self.nodes.len();
        let root = self.nodes.first().ok_or("no root context")?;
        if !root.live || root.parent != NO_SLOT || root.depth != 0 {
            return Err("context 0 is not the root".into());
        }
        let mut children = vec![0u32; len];
        let mut live = 0usize;
        for (i, node) in self.nodes.iter().enumerate().filter(|(_, n)| n.live) {
            live += 1;
            node.check().map_err(|e| format!("context {i}: {e}"))?;
            if i == ROOT as usize {
                continue;
            }
            let parent_ok = self
                .nodes
                .get(node.parent as usize)
                .is_some_and(|p| p.live && usize::from(p.depth) + 1 == usize::from(node.depth));
            if !parent_ok || usize::from(node.depth) > self.cfg.max_order {
                return Err(format!("context {i}: no live parent one operation shorter"));
            }
            if self.index.get(&node.key) != Some(&(i as u32)) {
                return Err(format!("context {i} is not indexed under its key"));
            }
            children[node.parent as usize] += 1;
        }
        if live != self.live || self.index.len() + 1 != live {
            return Err(format!(
                "{live} live contexts, {} counted, {} indexed",
                self.live,
                self.index.len()
            ));
        }
        if let Some(i) =
            (0..len).find(|&i| self.nodes[i].live && self.nodes[i].children != children[i])
        {
            return Err(format!(
                "context {i}: child count {} is not {}",
                self.nodes[i].children, children[i]
            ));
        }
        let mut free = vec![false; len];
        for &f in &self.free {
            match free.get_mut(f as usize) {
                Some(seen) if !*seen && !self.nodes[f as usize].live => *seen = true,
                _ => {
                    return Err(format!(
                        "free slot {f} is out of range, live or listed twice"
                    ));
                }
            }
        }
        if self.by_depth.iter().flatten().any(|&s| s as usize >= len) {
            return Err("a gathered slot is out of range".into());
        }
        // A cycle in progress reads by_depth up to max_order (a new one sizes it first).
        let cycle_ok = match self.phase {
            Phase::Expire { cursor: 0 } => true,
            Phase::Expire { .. } => self.by_depth.len() == self.cfg.max_order + 1,
            Phase::Collapse { depth, .. } => {
                self.by_depth.len() == self.cfg.max_order + 1
                    && usize::from(depth) <= self.cfg.max_order
            }
        };
        if !cycle_ok {
            return Err("maintenance cycle state does not fit max_order".into());
        }
        Ok(())
    }

    /// Contexts currently stored (including the empty one).
    pub fn contexts(&self) -> usize {
        self.live
    }

    fn advance_epoch(&mut self, now_ns: u64) {
        let e = u32::try_from(now_ns / self.cfg.bucket_ns()).unwrap_or(u32::MAX);
        self.epoch = self.epoch.max(e);
    }

    /// Learns one transition: `history` is the session's steps, oldest first (only the last
    /// `max_order` are used), `next` the step that follows. The engine passes collapsed steps, so
    /// `next` never equals the last step there; the model itself learns whatever it is given (the
    /// seed's own tables count self-transitions such as b → b).
    pub fn learn(&mut self, history: &[Op], next: Op, now_ns: u64) {
        self.advance_epoch(now_ns);
        self.walk(history, next, true, false);
    }

    /// [`Model::learn`] for a session that keeps a [`Cursor`] (see [`Model::observe_with`]).
    pub fn learn_with(&mut self, history: &[Op], next: Op, now_ns: u64, cursor: &mut Cursor) {
        self.advance_epoch(now_ns);
        self.walk_with(history, next, true, false, Some(cursor));
    }

    /// Scores `next` after `history` without learning it.
    pub fn score(&mut self, history: &[Op], next: Op) -> Transition {
        self.walk(history, next, false, true)
    }

    /// Scores, then learns, in one walk of the trie (what the engine does per request).
    pub fn observe(&mut self, history: &[Op], next: Op, now_ns: u64) -> Transition {
        self.advance_epoch(now_ns);
        self.walk(history, next, true, true)
    }

    /// Like [`Model::observe`], for a session that keeps a [`Cursor`] between its requests: the
    /// walk starts from the contexts the cursor names (checked against their keys) instead of
    /// looking each one up, and leaves the cursor naming the contexts of the session's next walk
    /// (through the links of the transitions it learns). Same counts, same scores.
    pub fn observe_with(
        &mut self,
        history: &[Op],
        next: Op,
        now_ns: u64,
        cursor: &mut Cursor,
    ) -> Transition {
        self.advance_epoch(now_ns);
        self.walk_with(history, next, true, true, Some(cursor))
    }

    fn walk(&mut self, history: &[Op], next: Op, learn: bool, score: bool) -> Transition {
        self.walk_with(history, next, learn, score, None)
    }

    fn walk_with(
        &mut self,
        history: &[Op],
        next: Op,
        learn: bool,
        score: bool,
        cursor: Option<&mut Cursor>,
    ) -> Transition {
        let is_repeat = history.last() == Some(&next);
        if learn {
            self.stats.learned += 1;
        }
        let max_depth = history.len().min(self.cfg.max_order);
        let newest = |d: usize| history[history.len() - d];
        // Phase 1: keys and lookups for every depth, independent of one another.
        let mut keys = [ROOT_KEY; MAX_ORDER_LIMIT + 1];
        for d in 1..=max_depth {
            keys[d] = child_key(keys[d - 1], newest(d));
        }
        let mut path = [NO_SLOT; MAX_ORDER_LIMIT + 1];
        path[0] = ROOT;
        let mut found = max_depth;
        if let Some(c) = cursor.as_deref() {
            // The cursor's slots are hints: a live context with the expected key is the one the
            // index would return (keys are unique among live contexts). Past the first missing
            // context there are none (a context's parent is on the same path).
            for d in 1..=max_depth {
                let hint = c.slots.get(d - 1).copied().unwrap_or(NO_SLOT);
                let valid = self
                    .nodes
                    .get(hint as usize)
                    .is_some_and(|n| n.live && n.key == keys[d]);
                path[d] = if valid {
                    hint
                } else {
                    self.index.get(&keys[d]).copied().unwrap_or(NO_SLOT)
                };
                if path[d] == NO_SLOT {
                    found = d - 1;
                    break;
                }
            }
        } else {
            // No early exit: a lookup's outcome does not decide whether the next one is issued, so
            // the CPU overlaps their cache misses (a walk is memory-latency bound).
            for d in 1..=max_depth {
                path[d] = self.index.get(&keys[d]).copied().unwrap_or(NO_SLOT);
            }
            found = path[1..=max_depth]
                .iter()
                .position(|&s| s == NO_SLOT)
                .unwrap_or(max_depth);
        }
        // Prefetch every found context before using any, so their misses overlap too; then
        // what each one's search for `next` reads (its entries or index, another miss each).
        for &slot in &path[1..=found] {
            prefetch(&self.nodes[slot as usize]);
        }
        for &slot in &path[..=found] {
            self.nodes[slot as usize].prefetch_search(next);
        }
        // The session's next walk: contexts `next`, then `next` preceded by the newest
        // operations, one per depth; `next_key` is the key of the one at depth + 1.
        let mut next_cursor = Cursor::default();
        let mut next_key = child_key(ROOT_KEY, next);
        let mut linking = cursor.is_some();
        // Witten-Bell: start uniform over the operations seen plus one for "never seen".
        let mut predictive = 1.0 / (f64::from(self.nodes[ROOT as usize].distinct()) + 1.0);
        // (depth, k, n) of the context judging the transition, and of the deepest with any data.
        let mut judge: Option<(usize, u32, u32)> = None;
        let mut fallback = (0usize, 0u32, 0u32);
        // Phase 2: visit the contexts found, root first.
        let mut depth = 0;
        loop {
            let node = &mut self.nodes[path[depth] as usize];
            if depth > 0 && (node.parent != path[depth - 1] || node.op != newest(depth)) {
                self.stats.key_collisions += 1;
                break;
            }
            // One search of the entries serves both scoring and learning.
            let at = if (score && node.n > 0) || learn {
                node.position(next)
            } else {
                None
            };
            if score && node.n > 0 {
                let k = node.count_at(at);
                let t = f64::from(node.distinct());
                let n = f64::from(node.n);
                predictive = (f64::from(k) + t * predictive) / (n + t);
                fallback = (depth, k, node.n);
                if node.n >= self.cfg.min_context_count && !node.collapsed {
                    judge = Some((depth, k, node.n));
                }
            }
            if learn {
                let i = node.record_at(at, next, self.epoch, self.cfg.buckets);
                node.referenced = true;
                if linking && depth < CURSOR_DEPTH {
                    let mut to = node.link(i);
                    if to == NO_SLOT {
                        to = self.index.get(&next_key).copied().unwrap_or(NO_SLOT);
                        node.set_link(i, to);
                    }
                    next_cursor.slots[depth] = to;
                    // Deeper contexts of the next walk extend this one: none if it is missing.
                    linking = to != NO_SLOT && depth < max_depth;
                    if linking {
                        next_key = child_key(next_key, newest(depth + 1));
                    }
                }
            }
            if depth == max_depth {
                break;
            }
            if depth == found {
                // Phase 3 (learning only): create the next context once its parent has enough
                // data. Contexts of one operation are created on sight: there is one per
                // operation, and the precedences of adjacent operations, the strongest a
                // small API has, are then counted from the first request.
                if !learn || (depth > 0 && node.n < self.cfg.min_count_to_extend) {
                    break;
                }
                match self.alloc(
                    path[depth],
                    newest(depth + 1),
                    keys[depth + 1],
                    &path[..=depth],
                ) {
                    Some(child) => {
                        path[depth + 1] = child;
                        found += 1;
                    }
                    None => break,
                }
            }
            depth += 1;
        }
        let (context_len, k, n) = judge.unwrap_or(fallback);
        let enough_data = n >= self.cfg.min_context_count;
        let probability = if n > 0 {
            f64::from(k) / f64::from(n)
        } else {
            0.0
        };
        if let Some(c) = cursor {
            *c = next_cursor;
        }
        Transition {
            context_len,
            n,
            k,
            probability,
            enough_data,
            is_repeat,
            predictive,
            surprise_bits: -predictive.log2(),
        }
    }

    /// Creates the context (parent, op), evicting a leaf first if at the cap. `path` holds the
    /// contexts of the walk in progress, which must not be evicted under it.
    fn alloc(&mut self, parent: u32, op: Op, key: u64, path: &[u32]) -> Option<u32> {
        if self.index.contains_key(&key) {
            // Another context already has this key (a 2^-64 chance): leave the slot to it.
            self.stats.key_collisions += 1;
            return None;
        }
        if self.live >= self.cfg.max_contexts && !self.evict_one(path) {
            self.stats.contexts_refused += 1;
            return None;
        }
        let depth = self.nodes[parent as usize].depth + 1;
        let node = Node::new(parent, op, depth, key);
        let slot = match self.free.pop() {
            Some(s) => {
                self.nodes[s as usize] = node;
                s
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.index.insert(key, slot);
        self.nodes[parent as usize].children += 1;
        self.live += 1;
        self.stats.contexts_created += 1;
        Some(slot)
    }

    fn evict_one(&mut self, path: &[u32]) -> bool {
        let len = self.nodes.len() as u32;
        for _ in 0..EVICT_SCAN.min(2 * len) {
            let s = self.clock_hand % len;
            self.clock_hand = (s + 1) % len;
            let node = &mut self.nodes[s as usize];
            if s == ROOT || !node.live || node.children > 0 || path.contains(&s) {
                continue;
            }
            if node.referenced {
                node.referenced = false;
                continue;
            }
            self.free_slot(s);
            self.stats.contexts_evicted += 1;
            return true;
        }
        false
    }

    fn free_slot(&mut self, s: u32) {
        self.unlink(s);
        let (parent, key) = {
            let n = &self.nodes[s as usize];
            (n.parent, n.key)
        };
        self.index.remove(&key);
        self.nodes[parent as usize].children -= 1;
        self.nodes[s as usize].clear();
        self.free.push(s);
        self.live -= 1;
    }

    /// Clears the link to context `s` (o1 .. od, oldest first), held by entry od of context
    /// (o1 .. od-1), so links never name a freed or reused slot.
    fn unlink(&mut self, s: u32) {
        // The operations, oldest first, from the parent chain (depth ≤ MAX_ORDER_LIMIT).
        let mut ops = [0 as Op; MAX_ORDER_LIMIT + 1];
        let mut len = 0;
        let mut slot = s;
        while slot != ROOT && len < ops.len() {
            let n = &self.nodes[slot as usize];
            ops[len] = n.op;
            len += 1;
            slot = n.parent;
        }
        let Some((&newest, older)) = ops[..len].split_last() else {
            return;
        };
        let from = if older.is_empty() {
            ROOT
        } else {
            let key = older.iter().rev().fold(ROOT_KEY, |k, &op| child_key(k, op));
            match self.index.get(&key) {
                Some(&f) => f,
                None => return,
            }
        };
        let node = &mut self.nodes[from as usize];
        if let Some(i) = node.position(newest)
            && node.link(i) == s
        {
            node.set_link(i, NO_SLOT);
        }
    }

    /// The context's operations, oldest first.
    fn context_ops(&self, mut slot: u32) -> Vec<Op> {
        let mut ops = Vec::with_capacity(self.nodes[slot as usize].depth as usize);
        while slot != ROOT {
            let n = &self.nodes[slot as usize];
            ops.push(n.op);
            slot = n.parent;
        }
        ops
    }

    /// Looks up the context with these operations (oldest first).
    pub fn context(&self, ops: &[Op]) -> Option<&Node> {
        let (mut slot, mut key) = (ROOT, ROOT_KEY);
        for &op in ops.iter().rev() {
            key = child_key(key, op);
            let child = *self.index.get(&key)?;
            let node = &self.nodes[child as usize];
            if node.parent != slot || node.op != op {
                return None;
            }
            slot = child;
        }
        Some(&self.nodes[slot as usize])
    }

    /// Occurrences of `op` in the window (its order-0 count).
    pub fn occurrences(&self, op: Op) -> u32 {
        self.nodes[ROOT as usize].count(op)
    }

    /// 99% interval for k out of n (memoised).
    pub fn interval(&mut self, k: u32, n: u32) -> Interval {
        self.cache.interval(k, n)
    }

    /// Its upper bound alone, at half the cost when it must be computed (memoised).
    pub fn upper(&mut self, k: u32, n: u32) -> f64 {
        self.cache.upper(k, n)
    }

    /// Is the 99% upper bound of k out of n below `r`? Exact, and as cheap as it can be: for
    /// counts up to a few thousand, one load once `r`'s crossing for k is known (see
    /// `IntervalCache::upper_below`); else the bound when it is free, its guaranteed range,
    /// one incomplete beta, and the bound itself only within rounding of `r`.
    pub fn upper_below(&mut self, k: u32, n: u32, r: f64) -> bool {
        self.cache.upper_below(k, n, r)
    }

    /// False only when the 99% upper bound of k/n is surely not below `r` (one incomplete-beta
    /// evaluation instead of the exact interval's several): see `IntervalCache`.
    pub fn upper_could_be_below(&self, k: u32, n: u32, r: f64) -> bool {
        self.cache.upper_could_be_below(k, n, r)
    }

    /// Periodic upkeep with bounded work (`maintain_budget` entries examined): expires buckets that
    /// left the window, frees empty contexts, and advances the context collapse. Call it regularly
    /// (e.g. every few hundred requests or every 100 ms); a full cycle takes about
    /// (total entries × (1 + depths)) / budget calls.
    pub fn maintain(&mut self, now_ns: u64) -> MaintainReport {
        self.advance_epoch(now_ns);
        self.shrink_to_cap(self.cfg.maintain_budget);
        self.maintain_step(self.cfg.maintain_budget)
    }

    /// Evicts up to `budget` contexts while more are live than `max_contexts` allows (a cap
    /// lowered on a loaded model; learning alone only keeps the count where it is).
    fn shrink_to_cap(&mut self, budget: usize) {
        for _ in 0..budget {
            if self.live <= self.cfg.max_contexts || !self.evict_one(&[]) {
                break;
            }
        }
    }

    /// Runs maintenance until a whole expire + collapse cycle that started in this call completes
    /// (for tests, the CLI and before saving).
    pub fn maintain_full(&mut self, now_ns: u64) -> MaintainReport {
        self.advance_epoch(now_ns);
        let mut total = MaintainReport::default();
        let mut fresh = self.phase == Phase::Expire { cursor: 0 };
        loop {
            let r = self.maintain_step(usize::MAX);
            total.work += r.work;
            if r.cycle_completed {
                if fresh {
                    total.cycle_completed = true;
                    return total;
                }
                fresh = true;
            }
        }
    }

    /// The strongest predecessors of `op` (precedence score ≥ `predecessor_min_score`, support ≥
    /// `predecessor_min_support`), best first, as of the last completed collapse cycle.
    pub fn required_predecessors(&self, op: Op) -> &[Predecessor] {
        self.predecessors.get(&op).map_or(&[], Vec::as_slice)
    }

    /// The top `top_n` important sequences (retained context + next operation, seen at least
    /// `sequence_min_occurrences` times), by precedence score then occurrences.
    pub fn important_sequences(&self, top_n: usize) -> Vec<ImportantSequence> {
        let root = &self.nodes[ROOT as usize];
        let mut cand: Vec<(f64, u32, u32, Op)> = Vec::new();
        for (slot, node) in self.nodes.iter().enumerate() {
            if !node.live || node.depth == 0 || node.collapsed {
                continue;
            }
            for e in node.entries() {
                let total = root.count(e.next);
                if e.k >= self.cfg.sequence_min_occurrences && total > 0 {
                    let score = f64::from(e.k.min(total)) / f64::from(total);
                    cand.push((score, e.k, slot as u32, e.next));
                }
            }
        }
        let mut seqs: Vec<ImportantSequence> = cand
            .into_iter()
            .map(|(score, k, slot, next)| {
                let mut ops = self.context_ops(slot);
                ops.push(next);
                ops.dedup();
                let n = self.nodes[slot as usize].n;
                ImportantSequence {
                    ops,
                    occurrences: k,
                    precedence_score: score,
                    context_count: n,
                    interval: Interval {
                        lower: 0.0,
                        upper: 1.0,
                    },
                }
            })
            .collect();
        seqs.sort_by(|a, b| {
            b.precedence_score
                .total_cmp(&a.precedence_score)
                .then(b.occurrences.cmp(&a.occurrences))
                .then_with(|| a.ops.cmp(&b.ops))
        });
        seqs.truncate(top_n);
        let mut cache = IntervalCache::new();
        for s in &mut seqs {
            s.interval = cache.interval(s.occurrences, s.context_count);
        }
        seqs
    }

    /// Records the length of a finished run of identical requests to `op`.
    pub fn learn_run(&mut self, op: Op, run_len: u32) {
        self.runs.learn(op, run_len);
    }

    /// Runs of identical requests, per operation (the replay signal's).
    pub fn runs(&self) -> &RunLengths {
        &self.runs
    }

    /// Records the length of a finished step: a run of requests to `op`, ids and queries aside.
    pub fn learn_step_run(&mut self, op: Op, run_len: u32) {
        self.step_runs.learn(op, run_len);
    }

    /// Runs of requests to one operation, per operation (the enumeration signal's).
    pub fn step_runs(&self) -> &RunLengths {
        &self.step_runs
    }

    pub fn population(&self) -> &PopulationSurprise {
        &self.population
    }

    /// Feeds a finished session's mean surprise into the population statistic.
    pub fn observe_session_surprise(&mut self, mean_bits: f64) {
        self.population.observe(mean_bits);
    }

    /// Approximate bytes held by the model's context storage.
    pub fn memory(&self) -> MemoryReport {
        let node_bytes = self.nodes.capacity() * std::mem::size_of::<Node>();
        let heap: usize = self.nodes.iter().map(Node::heap_bytes).sum();
        let index = self.index.capacity() * (std::mem::size_of::<(u64, u32)>() + 1) * 8 / 7;
        let other = self.free.capacity() * 4
            + self
                .by_depth
                .iter()
                .map(|v| v.capacity() * 4)
                .sum::<usize>();
        let bytes = node_bytes + heap + index + other;
        MemoryReport {
            contexts: self.live,
            retained_contexts: self.stats.retained_contexts,
            bytes,
            bytes_per_context: bytes as f64 / self.live as f64,
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod cursor_tests {
    use super::*;

    /// The cursor is only a shortcut: with it, every transition scores the same and the model
    /// ends up the same as without, through evictions (a tiny context cap) and expiry (a window
    /// the clock runs past).
    #[test]
    fn walks_from_session_cursors_score_and_learn_exactly_like_hashed_walks() {
        let cfg = ModelConfig {
            max_contexts: 64,
            min_count_to_extend: 1,
            min_context_count: 2,
            window_secs: 60,
            buckets: 6,
            maintain_budget: 16,
            ..ModelConfig::default()
        };
        let mut plain = Model::new(cfg.clone()).unwrap();
        let mut cursed = Model::new(cfg).unwrap();
        let mut rng = 0x1234_5678_u64;
        let mut next = |n: u64| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % n
        };
        let mut sessions: Vec<(Vec<Op>, Cursor)> = vec![(Vec::new(), Cursor::default()); 12];
        let mut now = 0u64;
        for step in 0..20_000 {
            let s = next(sessions.len() as u64) as usize;
            let (hist, cursor) = &mut sessions[s];
            let op = if hist.len() > 30 || next(40) == 0 {
                hist.clear();
                *cursor = Cursor::default();
                next(6) as Op
            } else {
                // Mostly a small walk, sometimes anything.
                let last = hist.last().copied().unwrap_or(0);
                if next(5) == 0 {
                    next(9) as Op
                } else {
                    (last + 1 + next(2) as Op) % 9
                }
            };
            if hist.last() == Some(&op) {
                continue;
            }
            let ctx = &hist[hist.len().saturating_sub(8)..];
            let a = plain.observe(ctx, op, now);
            let b = cursed.observe_with(ctx, op, now, cursor);
            assert_eq!(a, b, "step {step}");
            hist.push(op);
            now += 7_000_000;
            if step % 50 == 0 {
                plain.maintain(now);
                cursed.maintain(now);
            }
            if step % 5000 == 0 {
                // A quiet spell: everything leaves the window and is freed.
                now += 120_000_000_000;
                plain.maintain_full(now);
                cursed.maintain_full(now);
            }
        }
        let st = plain.stats();
        assert!(st.contexts_evicted > 0 && st.contexts_expired > 0, "{st:?}");
        assert!(plain == cursed);
    }
}
