//! Anomaly-signal primitives built on the model: confidently rare transition, missing precedent,
//! replay (a run of identical requests that the operation's learned runs, shrunk toward all
//! operations' runs, make improbable), long runs of varied requests (enumeration) and session
//! surprise far above the population's. Each check returns
//! the numbers behind it so an alert can show them; `decide` turns them into alerts. Nothing fires
//! before there is enough data (every check has a minimum support).

use serde::{Deserialize, Serialize};

use super::{Model, Op, Transition};

/// Thresholds of the anomaly signals (the `[signals]` table of the config file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignalConfig {
    /// Confidently rare: in the context, next operations as rare as this one (seen as often or
    /// less, new ones included) make up a share whose 99% upper bound is below this...
    pub rare_upper_bound: f64,
    /// ... in a context observed at least this many times.
    pub rare_min_context_count: u32,
    /// Missing precedent: a predecessor with precedence score at least this...
    pub precedent_min_score: f64,
    /// ... relative to at least this many occurrences of the operation.
    pub precedent_min_support: u32,
    /// Replay: a run of identical requests at least `replay_min_run` long whose estimated
    /// probability (see [`replay`]) is below this ...
    pub replay_probability: f64,
    /// ... where at each run length the operation's own learned runs are shrunk toward all
    /// operations' runs as if the latter were this many runs of the operation ...
    pub replay_prior_runs: f64,
    /// ... and the run is at least this long.
    pub replay_min_run: u32,
    /// Enumeration (a step of varied requests to one operation, see [`long_run`]): the step is
    /// longer than `replay_factor` × this quantile of the operation's learned steps...
    pub replay_quantile: f64,
    pub replay_factor: f64,
    /// ... the operation has at least this many learned steps ...
    pub replay_min_runs: u32,
    /// An operation with fewer learned steps is judged against the steps of operations seen
    /// about as rarely: a long run when steps this long are confidently rarer than this there
    /// (99% upper bound of their share) ...
    pub replay_population_upper: f64,
    /// ... once the population has at least this many learned runs (both signals).
    pub replay_population_min_runs: u32,
    /// Session surprise: the session's recent mean surprise is at least this many population
    /// standard deviations above the population mean ...
    pub surprise_z: f64,
    /// ... and at least this multiple of the population mean ...
    pub surprise_ratio: f64,
    /// ... after at least this many steps, once the population has this many sessions.
    pub surprise_min_steps: u32,
    pub surprise_min_sessions: u64,
}

impl Default for SignalConfig {
    fn default() -> Self {
        SignalConfig {
            rare_upper_bound: 0.002,
            rare_min_context_count: 30,
            precedent_min_score: 0.95,
            precedent_min_support: 30,
            replay_probability: 5e-4,
            replay_prior_runs: 10.0,
            replay_min_run: 3,
            replay_quantile: 0.99,
            replay_factor: 2.0,
            replay_min_runs: 30,
            replay_population_upper: 1e-3,
            replay_population_min_runs: 1000,
            surprise_z: 4.0,
            surprise_ratio: 2.0,
            surprise_min_steps: 8,
            surprise_min_sessions: 100,
        }
    }
}

/// A transition that is confidently rare in its context, with the numbers behind the verdict.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RareTransition {
    /// Operations in the context that judged it (the longest reliable one).
    pub context_len: usize,
    /// Observations of the context, and of this next operation in it.
    pub n: u32,
    pub k: u32,
    /// Distinct next operations seen in the context (each was new once).
    pub distinct: u32,
    /// Observations of next operations as rare as this one (seen at most `k` times here),
    /// plus one per distinct next operation for "new" (Witten-Bell)...
    pub as_rare: u32,
    /// ... out of n + distinct.
    pub total: u32,
    /// 99% upper bound of the share `as_rare / total`.
    pub upper: f64,
    pub threshold: f64,
}

/// Cheap pre-check: could this transition be confidently rare at all? Its own probability's 99%
/// upper bound is below the threshold (and the model's `interval_below`) in a context with
/// enough observations. The share of equally rare successors that [`rare_transition`] judges is
/// never smaller than the transition's own probability (adding observations to a Beta
/// posterior's successes only raises its upper bound), so a transition that fails this cannot
/// be confidently rare. Decided without computing the bound where possible: first by the
/// posterior mean (k+1)/(n+2), which a 99% upper bound is never below, then
/// [`Model::upper_below`].
pub fn could_be_rare(model: &mut Model, t: &Transition, cfg: &SignalConfig) -> bool {
    let below = cfg.rare_upper_bound.min(model.cfg.interval_below);
    !t.is_repeat
        && t.enough_data
        && t.n >= cfg.rare_min_context_count
        && t.probability < model.cfg.interval_below
        && (f64::from(t.k) + 1.0) / (f64::from(t.n) + 2.0) < below
        && model.upper_below(t.k, t.n, below)
}

/// Confidently rare transition, judged by how surprising it is *for its context*, not by its own
/// probability alone. On a large API (thousands of operations) a busy context has hundreds of
/// successors, most of them individually rare: some benign session takes one of them every
/// minute, so "P(next | context) is small" says little. What is anomalous is a transition into the
/// tail of a context whose traffic is concentrated: after `GET /balance`, 99.9% of sessions go to
/// `POST /transfer`, so anything else is news.
///
/// The measure is the tail share of the context's next-operation distribution: observations of
/// successors seen at most as often as this one (`k` times or fewer), plus, for successors never
/// seen, the Witten-Bell escape count (one per distinct successor: each was new once). A context
/// with many distinct successors therefore has a large "new" share and a large tail, so its rare
/// transitions are not confident; a context with a handful of successors and thousands of
/// observations has a tiny tail. The 99% upper bound of that share (Beta interval, uniform prior)
/// must be below `rare_upper_bound`. Judged in the longest reliable context of the history (the
/// one [`Model::score`] chose: not collapsed, at least `min_context_count` observations).
///
/// Call it right after the engine's observe (score, then learn) for the same transition: `t` is
/// the score before learning, so the learned observation of `next` is taken back out of the
/// context's counts here.
pub fn rare_transition(
    model: &mut Model,
    context: &[Op],
    next: Op,
    t: &Transition,
    cfg: &SignalConfig,
) -> Option<RareTransition> {
    if !could_be_rare(model, t, cfg) {
        return None;
    }
    share(model, context, next, t, cfg, Some(cfg.rare_upper_bound))
        .filter(|r| r.upper < cfg.rare_upper_bound)
}

/// The tail share [`rare_transition`] judges, whatever its value (the evaluation ranks sessions by
/// it). None for repeats and in contexts with fewer than `rare_min_context_count` observations.
/// `t` is the transition's score before it was learned (if it was): the counts are read from the
/// judging context with `next` at `t.k`, so this gives the same answer before and after learning.
pub fn rare_share(
    model: &mut Model,
    context: &[Op],
    next: Op,
    t: &Transition,
    cfg: &SignalConfig,
) -> Option<RareTransition> {
    share(model, context, next, t, cfg, None)
}

/// [`rare_share`]; with `below`, None as soon as one incomplete-beta evaluation shows the
/// share's upper bound cannot be below it, before its exact (several evaluations) is computed.
fn share(
    model: &mut Model,
    context: &[Op],
    next: Op,
    t: &Transition,
    cfg: &SignalConfig,
    below: Option<f64>,
) -> Option<RareTransition> {
    if t.is_repeat || t.n < cfg.rare_min_context_count || t.context_len > context.len() {
        return None;
    }
    let judge = &context[context.len() - t.context_len..];
    let node = model.context(judge)?;
    if let Some(r) = below {
        // The least the share can be, from counts at hand: `next`'s own observations and one
        // per distinct successor (`next` itself perhaps not among them). The scan below only
        // adds to both (and the upper bound of Beta(a, b) rises with a and as b falls; b stays
        // n − k + 1 or shrinks), so when even this least share is surely not below `r`, the
        // scan of the context's entries (thousands in a busy one) can be skipped.
        let least_distinct = (node.distinct() + u32::from(t.k > 0)).saturating_sub(1);
        let least_total = t.n.saturating_add(least_distinct);
        let least = t.k.saturating_add(least_distinct).min(least_total);
        if !model.upper_could_be_below(least, least_total, r) {
            return None;
        }
    }
    // `next` counts t.k (none when 0, even if it was learned since); the other entries are as
    // they were.
    let mut distinct = u32::from(t.k > 0);
    let mut tail = u64::from(t.k);
    for e in node.entries().iter().filter(|e| e.next != next) {
        distinct += 1;
        if e.k <= t.k {
            tail += u64::from(e.k);
        }
    }
    let total = t.n.saturating_add(distinct);
    let as_rare = u32::try_from(tail + u64::from(distinct))
        .unwrap_or(u32::MAX)
        .min(total);
    if below.is_some_and(|r| !model.upper_could_be_below(as_rare, total, r)) {
        return None;
    }
    let upper = model.upper(as_rare, total);
    Some(RareTransition {
        context_len: t.context_len,
        n: t.n,
        k: t.k,
        distinct,
        as_rare,
        total,
        upper,
        threshold: cfg.rare_upper_bound,
    })
}

/// An operation arrived without an operation that nearly always precedes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MissingPrecedent {
    pub op: Op,
    pub predecessor: Op,
    pub score: f64,
    pub support: u32,
    pub threshold: f64,
}

/// Missing precedent: the strongest learned predecessor of `op` that passes the thresholds and that
/// the session has not seen (`seen(p)` answers "has this session done p?").
pub fn missing_precedent(
    model: &Model,
    op: Op,
    seen: impl Fn(Op) -> bool,
    cfg: &SignalConfig,
) -> Option<MissingPrecedent> {
    model
        .required_predecessors(op)
        .iter()
        .filter(|p| p.score >= cfg.precedent_min_score && p.support >= cfg.precedent_min_support)
        .find(|p| !seen(p.op))
        .map(|p| MissingPrecedent {
            op,
            predecessor: p.op,
            score: p.score,
            support: p.support,
            threshold: cfg.precedent_min_score,
        })
}

/// Run lengths 1..=16 get a bin each; longer runs share power-of-two bins up to 2^20.
const EXACT_BINS: usize = 16;
pub const RUN_BINS: usize = 32;
/// Histograms are halved when their total passes this, so they stay bounded and follow change.
const DECAY_AT: u32 = 1 << 20;

fn run_bin(run: u32) -> usize {
    if run as usize <= EXACT_BINS {
        run.max(1) as usize - 1
    } else {
        // run − 1 in [2^j, 2^(j+1)) with j ≥ 4 → bin 16 + j − 4.
        let j = 31 - (run - 1).leading_zeros() as usize;
        (EXACT_BINS + j - 4).min(RUN_BINS - 1)
    }
}

/// Largest run length that falls in `bin`.
fn bin_upper(bin: usize) -> u32 {
    if bin < EXACT_BINS {
        bin as u32 + 1
    } else {
        1u32 << (bin - 11)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct RunHist {
    total: u32,
    bins: [u32; RUN_BINS],
}

/// Support classes of the pooled run histograms: class c holds operations with 2^(c-1)..2^c - 1
/// learned runs (class 0: none), up to the halving point.
const CLASSES: usize = 22;

fn class_of(support: u32) -> usize {
    (32 - support.leading_zeros() as usize).min(CLASSES - 1)
}

/// Per-operation histograms of the lengths of runs of identical requests (same method, host,
/// path and query in a row; a run of 1 is "not repeated"), and their sums over operations
/// grouped by how many runs each has (its support class). Browsing one template's items
/// (`/items/1`, `/items/2`, ...) is a series of runs of 1, not one long run: the replay signal
/// is about the same request sent again, so that is what is learned and judged.
///
/// The sums are the population an operation with too few runs of its own is judged against,
/// and only the classes of rarely seen operations go into it: a page visited twice a day is
/// more like other pages visited twice a day than like the gallery everyone clicks through ten
/// times, whose long runs would otherwise make every run look ordinary. The sums are derived
/// state: not saved, rebuilt on load, so state files keep their format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "SavedRunLengths", into = "SavedRunLengths")]
pub struct RunLengths {
    max_ops: u32,
    hists: Vec<RunHist>,
    /// Per support class, the sum of its operations' histograms.
    pooled: [[u64; RUN_BINS]; CLASSES],
    /// The sum of all operations' histograms (the replay signal's prior).
    all: [u64; RUN_BINS],
    /// Runs of operations with ids ≥ max_ops, not recorded.
    pub untracked: u64,
    /// Times a histogram was halved.
    pub halvings: u64,
}

/// What is saved of [`RunLengths`].
#[derive(Serialize, Deserialize)]
struct SavedRunLengths {
    max_ops: u32,
    hists: Vec<RunHist>,
    untracked: u64,
    halvings: u64,
}

impl From<SavedRunLengths> for RunLengths {
    fn from(s: SavedRunLengths) -> Self {
        let mut r = RunLengths {
            max_ops: s.max_ops,
            hists: s.hists,
            pooled: [[0; RUN_BINS]; CLASSES],
            all: [0; RUN_BINS],
            untracked: s.untracked,
            halvings: s.halvings,
        };
        for i in 0..r.hists.len() {
            r.pool(i, true);
        }
        r
    }
}

impl From<RunLengths> for SavedRunLengths {
    fn from(r: RunLengths) -> Self {
        SavedRunLengths {
            max_ops: r.max_ops,
            hists: r.hists,
            untracked: r.untracked,
            halvings: r.halvings,
        }
    }
}

impl RunLengths {
    pub fn new(max_ops: u32) -> Self {
        RunLengths {
            max_ops,
            hists: Vec::new(),
            pooled: [[0; RUN_BINS]; CLASSES],
            all: [0; RUN_BINS],
            untracked: 0,
            halvings: 0,
        }
    }

    /// Adds (or takes out) histogram `i` to (from) its support class's sum and the sum of all.
    fn pool(&mut self, i: usize, add: bool) {
        let h = &self.hists[i];
        let class = &mut self.pooled[class_of(h.total)];
        for ((p, a), &c) in class.iter_mut().zip(self.all.iter_mut()).zip(&h.bins) {
            if add {
                *p += u64::from(c);
                *a += u64::from(c);
            } else {
                *p -= u64::from(c);
                *a -= u64::from(c);
            }
        }
    }

    pub fn learn(&mut self, op: Op, run_len: u32) {
        if run_len == 0 {
            return;
        }
        if op >= self.max_ops {
            self.untracked += 1;
            return;
        }
        let i = op as usize;
        if self.hists.len() <= i {
            self.hists.resize(i + 1, RunHist::default());
        }
        let bin = run_bin(run_len);
        let total = self.hists[i].total;
        if class_of(total + 1) == class_of(total) {
            self.pooled[class_of(total)][bin] += 1;
            self.all[bin] += 1;
            let h = &mut self.hists[i];
            h.bins[bin] += 1;
            h.total += 1;
        } else {
            // The operation moves up a support class: its whole histogram moves with it.
            self.pool(i, false);
            let h = &mut self.hists[i];
            h.bins[bin] += 1;
            h.total += 1;
            self.pool(i, true);
        }
        if self.hists[i].total >= DECAY_AT {
            self.pool(i, false);
            let h = &mut self.hists[i];
            h.bins.iter_mut().for_each(|b| *b /= 2);
            h.total = h.bins.iter().sum();
            self.pool(i, true);
            self.halvings += 1;
        }
    }

    /// Runs learned for `op` that were at least `run` long (the whole bin of `run` counted).
    pub fn tail(&self, op: Op, run: u32) -> u32 {
        self.hists
            .get(op as usize)
            .map_or(0, |h| h.bins[run_bin(run.max(1))..].iter().sum())
    }

    /// Runs learned for `op`.
    pub fn support(&self, op: Op) -> u32 {
        self.hists.get(op as usize).map_or(0, |h| h.total)
    }

    /// The population of operations seen rarely: runs of operations in the support classes
    /// that start below `below` runs (the classes are powers of two, so the last one can reach
    /// up to twice `below`). Returns (runs at least `run` long, all runs). A length past the
    /// exact bins shares its bin with shorter runs; the whole bin is counted, which can only
    /// make a run look less rare.
    pub fn rare_population(&self, below: u32, run: u32) -> (u64, u64) {
        let classes = class_of(below.saturating_sub(1)) + 1;
        let (mut at_least, mut total) = (0, 0);
        for class in &self.pooled[..classes.min(CLASSES)] {
            at_least += class[run_bin(run)..].iter().sum::<u64>();
            total += class.iter().sum::<u64>();
        }
        (at_least, total)
    }

    /// Estimated probability that a run of `op` reaches `run` (at least the lower edge of its
    /// bin), from the chance at each length that a run that got there goes on (its hazard):
    /// the operation's own runs, shrunk toward all operations' at that length with `prior`
    /// pseudo-runs. A length where the operation has hundreds of runs is judged by them; one
    /// where it has few leans on how runs of that length go on in general. Returns
    /// (probability, the operation's runs, its runs of at least 2, all runs).
    pub fn run_probability(&self, op: Op, run: u32, prior: f64) -> (f64, u32, u32, u64) {
        // Runs in bin b or later, for the operation and for all.
        let tails = |bins: &[u64; RUN_BINS]| {
            let mut t = [0u64; RUN_BINS + 1];
            for b in (0..RUN_BINS).rev() {
                t[b] = t[b + 1] + bins[b];
            }
            t
        };
        let own: [u64; RUN_BINS] = self
            .hists
            .get(op as usize)
            .map_or([0; RUN_BINS], |h| h.bins.map(u64::from));
        let (own, all) = (tails(&own), tails(&self.all));
        let mut p = 1.0f64;
        for b in 0..run_bin(run.max(1)) {
            // Of the runs that reached bin b, the share that reached b + 1: all operations'
            // (with a half-run floor, so an unseen length is unlikely, not impossible)...
            let general = (all[b + 1] as f64 + 0.5) / (all[b] as f64 + 1.0);
            // ... and the operation's, shrunk toward it.
            p *= (own[b + 1] as f64 + prior * general) / (own[b] as f64 + prior);
        }
        let support = u32::try_from(own[0]).unwrap_or(u32::MAX);
        let repeated = u32::try_from(own[1]).unwrap_or(u32::MAX);
        (p, support, repeated, all[0])
    }

    /// The q-quantile of `op`'s run lengths, rounded up to its bin's upper edge.
    pub fn quantile(&self, op: Op, q: f64) -> Option<u32> {
        let h = self.hists.get(op as usize).filter(|h| h.total > 0)?;
        let target = (q * f64::from(h.total)).ceil().max(1.0);
        let mut cum = 0u64;
        for (b, &c) in h.bins.iter().enumerate() {
            cum += u64::from(c);
            if cum as f64 >= target {
                return Some(bin_upper(b));
            }
        }
        Some(bin_upper(RUN_BINS - 1))
    }
}

/// What a replay was judged against.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "basis", rename_all = "snake_case")]
pub enum RunBasis {
    /// The operation's own learned runs: the run exceeds `factor` × their `quantile`.
    Operation {
        /// The learned `quantile` of the operation's run lengths.
        learned: u32,
        quantile: f64,
        factor: f64,
        /// Runs learned for the operation.
        support: u32,
    },
    /// The operation has fewer than `replay_min_runs` runs of its own: among the learned runs of
    /// operations seen about as rarely (see [`RunLengths::rare_population`]), `at_least` of
    /// `runs` were this long or longer, and the 99% upper bound of that share is below
    /// `threshold`.
    Population {
        at_least: u64,
        runs: u64,
        upper: f64,
        threshold: f64,
        /// Runs learned for the operation itself (too few to judge it alone).
        support: u32,
    },
}

/// A run of identical requests that the learned runs make improbable.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Replay {
    pub op: Op,
    pub run_len: u32,
    /// Estimated probability that a run of the operation is this long (see
    /// [`RunLengths::run_probability`]) ...
    pub probability: f64,
    /// ... and the probability below which it is a replay.
    pub threshold: f64,
    /// The operation's learned runs, and those of at least 2 identical requests.
    pub support: u32,
    pub repeated: u32,
    /// All operations' learned runs (the prior).
    pub population: u64,
}

impl Replay {
    /// How far past the firing point the run is: log of its probability over log of the
    /// threshold (above 1 fires).
    pub fn excess(&self) -> f64 {
        self.probability.max(1e-300).ln() / self.threshold.ln()
    }
}

/// Replay: `run_len` identical requests in a row (to `op`) that the learned runs of identical
/// requests make improbable.
///
/// Benign runs of identical requests are heavy-tailed and depend on the operation: most are
/// never repeated, a live-score page is reloaded by some visitors dozens of times, and once a
/// visitor has reloaded a page three times the next reload is likely. So the run is judged by
/// how runs of this operation go on, length by length (the hazard at each length): where the
/// operation has learned many runs of that length they decide, where it has few (a rarely
/// seen operation, or a length its runs seldom reach) all operations' runs fill in, weighted as
/// `replay_prior_runs` runs. The product over lengths is the probability of a run this long;
/// below `replay_probability` it is a replay. Unlike a multiple of a quantile this grows with
/// the length on every operation, rare ones included, and an operation whose visitors do
/// reload is judged by how far they go.
pub fn replay(runs: &RunLengths, op: Op, run_len: u32, cfg: &SignalConfig) -> Option<Replay> {
    if run_len < cfg.replay_min_run {
        return None;
    }
    replay_judgement(runs, op, run_len, cfg).filter(|r| r.excess() > 1.0)
}

/// The judgement [`replay`] makes of a run, whether or not it fires (it fires when
/// [`Replay::excess`] is above 1 and the run is at least `replay_min_run` long). None when
/// fewer than `replay_population_min_runs` runs were learned in all.
pub fn replay_judgement(
    runs: &RunLengths,
    op: Op,
    run_len: u32,
    cfg: &SignalConfig,
) -> Option<Replay> {
    let (probability, support, repeated, population) =
        runs.run_probability(op, run_len, cfg.replay_prior_runs);
    (population >= u64::from(cfg.replay_population_min_runs)).then_some(Replay {
        op,
        run_len,
        probability,
        threshold: cfg.replay_probability,
        support,
        repeated,
        population,
    })
}

/// A run (of one operation's requests in a row) far beyond what the learned runs allow.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LongRun {
    pub op: Op,
    pub run_len: u32,
    #[serde(flatten)]
    pub basis: RunBasis,
}

impl LongRun {
    /// How far past the firing point the run is: above 1 fires. Operation basis: run length over
    /// factor × learned quantile; population basis: log of the share's upper bound over log of
    /// the threshold.
    pub fn excess(&self) -> f64 {
        match &self.basis {
            RunBasis::Operation {
                learned, factor, ..
            } => f64::from(self.run_len) / (f64::from((*learned).max(1)) * factor),
            RunBasis::Population {
                upper, threshold, ..
            } => upper.max(1e-300).ln() / threshold.ln(),
        }
    }
}

/// A run of `run_len` requests to `op` in a row beyond what the learned runs allow (the
/// enumeration signal judges the steps of varied requests this way; replays have
/// [`replay`]).
///
/// An operation with at least `replay_min_runs` learned runs is judged by its own: the run is
/// longer than `replay_factor` × the `replay_quantile` of its run lengths. Most operations of a
/// large API are visited too rarely for that (a replay of one of them would never fire), so the
/// others are judged against the population of rarely seen operations: the share of their
/// learned runs that were at least this long must be confidently small (99% Beta upper bound
/// below `replay_population_upper`, with at least `replay_population_min_runs` runs in that
/// population). Either way the run is at least `replay_min_run` long.
pub fn long_run(runs: &RunLengths, op: Op, run_len: u32, cfg: &SignalConfig) -> Option<LongRun> {
    if run_len < cfg.replay_min_run {
        return None;
    }
    long_run_judgement(runs, op, run_len, cfg).filter(|r| r.excess() > 1.0)
}

/// The judgement [`long_run`] makes of a run, whether or not it fires (it fires when
/// [`LongRun::excess`] is above 1). None when neither the operation nor the population has
/// enough learned runs.
pub fn long_run_judgement(
    runs: &RunLengths,
    op: Op,
    run_len: u32,
    cfg: &SignalConfig,
) -> Option<LongRun> {
    let support = runs.support(op);
    let basis = if support >= cfg.replay_min_runs {
        RunBasis::Operation {
            learned: runs.quantile(op, cfg.replay_quantile)?,
            quantile: cfg.replay_quantile,
            factor: cfg.replay_factor,
            support,
        }
    } else {
        let (at_least, total) = runs.rare_population(cfg.replay_min_runs, run_len);
        if total < u64::from(cfg.replay_population_min_runs) {
            return None;
        }
        // The Beta interval takes u32 counts; past that both scale down together (same share).
        let scale = total.div_ceil(u64::from(u32::MAX)).max(1);
        let (k, n) = ((at_least / scale) as u32, (total / scale) as u32);
        RunBasis::Population {
            at_least,
            runs: total,
            upper: super::interval::beta_interval_exact(k, n).upper,
            threshold: cfg.replay_population_upper,
            support,
        }
    };
    Some(LongRun { op, run_len, basis })
}

/// Weight of each new session in the population's mean/variance of session surprise.
const POPULATION_ALPHA: f64 = 0.01;
/// Standard deviation floor, so a very uniform population does not make any wobble a z of 100.
const SD_FLOOR_BITS: f64 = 0.25;

/// Exponentially weighted mean and variance of per-session mean surprise (bits per step). Starts
/// as a plain running mean so early sessions are not swamped by the first one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PopulationSurprise {
    pub sessions: u64,
    pub mean: f64,
    pub variance: f64,
}

impl PopulationSurprise {
    pub fn observe(&mut self, mean_bits: f64) {
        if !mean_bits.is_finite() {
            return;
        }
        self.sessions += 1;
        let alpha = POPULATION_ALPHA.max(1.0 / self.sessions as f64);
        let diff = mean_bits - self.mean;
        let incr = alpha * diff;
        self.mean += incr;
        self.variance = (1.0 - alpha) * (self.variance + diff * incr);
    }

    pub fn sd(&self) -> f64 {
        self.variance.sqrt()
    }
}

/// Weight of each new step in a session's recent surprise (about the last 7 steps).
const SESSION_ALPHA: f64 = 0.25;

/// Per-session surprise, kept by the session table (16 bytes a session).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionSurprise {
    pub steps: u32,
    /// Mean over all steps, for the population statistic when the session ends.
    pub mean: f32,
    /// Exponentially weighted recent mean.
    pub recent: f32,
}

impl SessionSurprise {
    pub fn push(&mut self, bits: f64) {
        let bits = bits as f32;
        self.steps = self.steps.saturating_add(1);
        if self.steps == 1 {
            self.mean = bits;
            self.recent = bits;
        } else {
            self.mean += (bits - self.mean) / self.steps as f32;
            self.recent += SESSION_ALPHA as f32 * (bits - self.recent);
        }
    }
}

/// A session whose recent surprise is far above the population's.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SurprisingSession {
    pub recent_bits: f64,
    pub population_mean: f64,
    pub population_sd: f64,
    pub z: f64,
    pub steps: u32,
    pub sessions: u64,
}

pub fn surprising_session(
    s: &SessionSurprise,
    pop: &PopulationSurprise,
    cfg: &SignalConfig,
) -> Option<SurprisingSession> {
    if s.steps < cfg.surprise_min_steps || pop.sessions < cfg.surprise_min_sessions {
        return None;
    }
    let recent = f64::from(s.recent);
    let sd = pop.sd().max(SD_FLOOR_BITS);
    let z = (recent - pop.mean) / sd;
    (z >= cfg.surprise_z && recent >= cfg.surprise_ratio * pop.mean).then_some(SurprisingSession {
        recent_bits: recent,
        population_mean: pop.mean,
        population_sd: pop.sd(),
        z,
        steps: s.steps,
        sessions: pop.sessions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    #[test]
    fn run_bins_cover_lengths_without_gaps() {
        for run in 1..5000u32 {
            let b = run_bin(run);
            assert!(run <= bin_upper(b), "run {run} bin {b}");
            if b > 0 {
                assert!(run > bin_upper(b - 1), "run {run} bin {b}");
            }
        }
    }

    #[test]
    fn long_run_fires_far_beyond_learned_runs_and_not_within_them() {
        let mut runs = RunLengths::new(100);
        for i in 0..200 {
            runs.learn(5, if i % 10 == 0 { 2 } else { 1 });
        }
        let cfg = SignalConfig::default();
        assert_eq!(runs.quantile(5, 0.99), Some(2));
        assert!(
            long_run(&runs, 5, 4, &cfg).is_none(),
            "4 = 2 × learned quantile is allowed"
        );
        let r = long_run(&runs, 5, 5, &cfg).expect("5 > 2 × 2");
        let RunBasis::Operation {
            learned, support, ..
        } = r.basis
        else {
            panic!("judged by the operation's own runs: {r:?}");
        };
        assert_eq!((learned, support), (2, 200));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["basis"], "operation");
        assert_eq!(json["learned"], 2);
    }

    #[test]
    fn long_run_of_a_rarely_seen_operation_is_judged_against_rarely_seen_ones() {
        let cfg = SignalConfig::default();
        let mut runs = RunLengths::new(10_000);
        // 10 runs of op 5: too few to judge it alone.
        for _ in 0..10 {
            runs.learn(5, 1);
        }
        assert!(
            long_run(&runs, 5, 50, &cfg).is_none(),
            "no population to judge against yet"
        );
        // 2,000 rarely seen operations with 10 runs each, 1 run in 1,000 of length 3...
        for i in 0..20_000u32 {
            runs.learn(100 + i % 2000, if i % 1000 == 0 { 3 } else { 1 });
        }
        // ...and a busy operation whose runs are long: not the population of a rare one.
        for _ in 0..5000 {
            runs.learn(9, 20);
        }
        assert_eq!(runs.rare_population(30, 3), (20, 20_010));
        assert!(
            long_run(&runs, 5, 3, &cfg).is_none(),
            "1 run in 1,000 is that long"
        );
        let r = long_run(&runs, 5, 4, &cfg).expect("no run of 4 among 20,010");
        let RunBasis::Population {
            at_least,
            runs: total,
            upper,
            support,
            ..
        } = r.basis
        else {
            panic!("judged by the population: {r:?}");
        };
        assert_eq!((at_least, total, support), (0, 20_010, 10));
        assert!(upper < cfg.replay_population_upper);
        assert!(r.excess() > 1.0);
        assert_eq!(serde_json::to_value(&r).unwrap()["basis"], "population");
    }

    /// 2,000 operations with 10 runs each (1 run in 100 of 2 identical requests, 1 in 1,000
    /// of 3), a page nobody reloads (op 1: 3,000 runs of 1) and a live page visitors reload
    /// (op 2: 3,000 runs, one in ten reloaded, some of those 10 to 20 times).
    fn reload_population() -> RunLengths {
        let mut runs = RunLengths::new(10_000);
        for i in 0..20_000u32 {
            let len = match i % 1000 {
                0 => 3,
                k if k % 100 == 0 => 2,
                _ => 1,
            };
            runs.learn(100 + i % 2000, len);
        }
        for i in 0..3000u32 {
            runs.learn(1, 1);
            runs.learn(
                2,
                match i % 10 {
                    0 => 2 + i % 19,
                    _ => 1,
                },
            );
        }
        runs
    }

    #[test]
    fn replay_is_judged_by_how_the_operations_own_runs_go_on() {
        let cfg = SignalConfig::default();
        let runs = reload_population();
        // Never reloaded in 3,000 runs: five identical requests are a replay...
        let r = replay(&runs, 1, 5, &cfg).expect("op 1 is never reloaded");
        assert_eq!((r.support, r.repeated, r.population), (3000, 0, 26_000));
        assert!(
            r.probability < cfg.replay_probability && r.excess() > 1.0,
            "{r:?}"
        );
        // ... and two are not (too short to judge), though already unusual.
        assert!(replay(&runs, 1, 2, &cfg).is_none());
        // The live page: a run of 12 is what its visitors do.
        let live = replay_judgement(&runs, 2, 12, &cfg).unwrap();
        assert_eq!(live.repeated, 300);
        assert!(live.excess() < 1.0, "{live:?}");
        assert!(replay(&runs, 2, 12, &cfg).is_none());
        // Beyond anything it has learned (its runs stop at 20), the population's hazard takes
        // over and the run becomes a replay once long enough.
        assert!(replay(&runs, 2, 2000, &cfg).is_some());
        // The probability never grows with the length.
        for op in [1, 2, 5, 150] {
            let mut last = 1.0;
            for len in 1..100 {
                let p = replay_judgement(&runs, op, len, &cfg).unwrap().probability;
                assert!(p <= last && p > 0.0, "op {op} len {len}: {p} after {last}");
                last = p;
            }
        }
    }

    #[test]
    fn replay_of_a_rarely_seen_operation_leans_on_all_runs() {
        let cfg = SignalConfig::default();
        let mut runs = RunLengths::new(10_000);
        for _ in 0..3 {
            runs.learn(5, 1);
        }
        assert!(
            replay_judgement(&runs, 5, 50, &cfg).is_none(),
            "nothing to judge against yet"
        );
        let runs = {
            let mut r = reload_population();
            for _ in 0..3 {
                r.learn(5, 1);
            }
            r
        };
        // 3 runs of its own: about all operations' (1 run in 100 repeated, a third of those
        // went on to 3), a little lower for its 3 unrepeated runs.
        let two = replay_judgement(&runs, 5, 2, &cfg).unwrap();
        let general = (runs.all[1..].iter().sum::<u64>() as f64 + 0.5) / (26_003.0 + 1.0);
        let expect = (0.0 + cfg.replay_prior_runs * general) / (3.0 + cfg.replay_prior_runs);
        assert!(
            (two.probability - expect).abs() < 1e-12,
            "{two:?} vs {expect}"
        );
        // Runs that got to 3 mostly go on (the live page's visitors reload up to 20 times), so
        // for an operation known too little to say otherwise, 6 is not yet a replay...
        assert!(replay(&runs, 5, 6, &cfg).is_none());
        // ... but past every learned length it is.
        let r = replay(&runs, 5, 40, &cfg).expect("no run of 33 or more was ever learned");
        assert_eq!((r.support, r.repeated), (3, 0));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["run_len"], 40);
        assert!(json["probability"].as_f64().unwrap() < cfg.replay_probability);
    }

    #[test]
    fn pooled_runs_follow_support_classes_halving_and_a_reload() {
        let mut runs = RunLengths::new(10);
        for i in 0..50 {
            runs.learn(i % 3, 1 + i % 4);
        }
        let bytes = postcard::to_allocvec(&runs).unwrap();
        let back: RunLengths = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, runs, "the pools are rebuilt on load");
        for _ in 0..DECAY_AT {
            runs.learn(1, 1);
        }
        let pooled: u64 = runs.pooled.iter().flatten().sum();
        let learned: u64 = runs.hists.iter().map(|h| u64::from(h.total)).sum();
        assert_eq!(pooled, learned);
        // The sum of all histograms (the replay prior) follows the halving bin by bin.
        for b in 0..RUN_BINS {
            let sum: u64 = runs.hists.iter().map(|h| u64::from(h.bins[b])).sum();
            assert_eq!(runs.all[b], sum, "bin {b}");
        }
        let bytes = postcard::to_allocvec(&runs).unwrap();
        let back: RunLengths = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.all, runs.all, "rebuilt on load");
        // Ops 0 and 2 have 17 and 16 runs (class 16..31); op 1 left the rare classes.
        assert_eq!(runs.rare_population(30, 1).1, 33);
        assert_eq!(runs.rare_population(16, 1).1, 0);
    }

    #[test]
    fn run_histograms_are_bounded_by_max_ops_and_halving() {
        let mut runs = RunLengths::new(10);
        runs.learn(10, 3);
        runs.learn(u32::MAX, 3);
        assert_eq!(runs.untracked, 2);
        assert!(runs.hists.is_empty());
        for _ in 0..(DECAY_AT + 5) {
            runs.learn(1, 1);
        }
        assert_eq!(runs.halvings, 1);
        assert!(runs.support(1) < DECAY_AT);
    }

    /// A model whose context [7] has seen `spread` (next, count) pairs: all of them, as it is
    /// created on its parent's first observation.
    fn model_with(spread: &[(Op, u32)]) -> Model {
        let cfg = ModelConfig {
            min_count_to_extend: 1,
            ..ModelConfig::default()
        };
        let mut m = Model::new(cfg).unwrap();
        for &(next, count) in spread {
            for _ in 0..count {
                m.learn(&[7], next, 0);
            }
        }
        m
    }

    #[test]
    fn rare_fires_in_a_concentrated_context_and_not_in_a_spread_one() {
        let cfg = SignalConfig::default();
        // After 7, operation 8 in 5,000 of 5,000 observations: anything else is news.
        let mut funnel = model_with(&[(8, 5000)]);
        let t = funnel.score(&[7], 9);
        assert!(could_be_rare(&mut funnel, &t, &cfg), "{t:?}");
        let r = rare_transition(&mut funnel, &[7], 9, &t, &cfg).expect("rare after a funnel");
        assert!(r.n >= 4999, "{r:?}");
        assert_eq!((r.k, r.distinct, r.as_rare, r.total), (0, 1, 1, r.n + 1));
        assert!(r.upper < cfg.rare_upper_bound, "{r:?}");
        // The same 5,000 observations spread over 500 successors: a new one is unremarkable
        // (Witten-Bell: 500 of 5,500 observations were "new"), though its own probability is
        // just as small.
        let spread: Vec<(Op, u32)> = (100..600).map(|op| (op, 10)).collect();
        let mut wide = model_with(&spread);
        let t = wide.score(&[7], 9);
        assert!(
            could_be_rare(&mut wide, &t, &cfg),
            "own probability is small: {t:?}"
        );
        assert!(rare_transition(&mut wide, &[7], 9, &t, &cfg).is_none());
        let share = rare_share(&mut wide, &[7], 9, &t, &cfg).unwrap();
        assert_eq!((share.distinct, share.as_rare), (500, 500));
        // A seen but rare successor counts every successor as rare as it (10 times or fewer).
        let t = wide.score(&[7], 599);
        assert_eq!(t.k, 10);
        let share = rare_share(&mut wide, &[7], 599, &t, &cfg).unwrap();
        assert_eq!((share.as_rare, share.total), (share.n + 500, share.n + 500));
    }

    /// The screens `rare_transition` runs before the exact share (the least share from counts
    /// at hand, then the share's own CDF) never change its verdict: across contexts from one
    /// dominant successor to hundreds of even ones, seen, unseen and just-learned successors,
    /// it fires exactly when the exact share's upper bound is below the threshold.
    #[test]
    fn rare_screens_never_change_the_verdict() {
        let mut fired = (0, 0);
        for (dominant, spread, each) in [
            (20_000, 0, 0),
            (20_000, 3, 2),
            (9_000, 40, 1),
            (50_000, 12, 30),
            (3_000, 200, 5),
            (400, 2, 1),
        ] {
            let mut pairs = vec![(8, dominant)];
            pairs.extend((100..100 + spread).map(|op| (op, each)));
            let mut m = model_with(&pairs);
            for threshold in [2e-3, 5e-3, 2e-2, 0.2] {
                let cfg = SignalConfig {
                    rare_upper_bound: threshold,
                    ..SignalConfig::default()
                };
                for next in [9, 100, 101, 8] {
                    let t = m.score(&[7], next);
                    let fires = rare_transition(&mut m, &[7], next, &t, &cfg);
                    let exact = could_be_rare(&mut m, &t, &cfg)
                        .then(|| rare_share(&mut m, &[7], next, &t, &cfg))
                        .flatten()
                        .filter(|r| r.upper < threshold);
                    assert_eq!(fires, exact, "{pairs:?} next {next} threshold {threshold}");
                    if fires.is_some() {
                        fired.0 += 1;
                    } else if could_be_rare(&mut m, &t, &cfg) {
                        fired.1 += 1;
                    }
                }
            }
        }
        // Both verdicts were reached past the first screen.
        assert!(fired.0 > 0 && fired.1 > 0, "{fired:?}");
    }

    #[test]
    fn rare_gives_the_same_answer_before_and_after_learning() {
        let cfg = SignalConfig::default();
        let mut m = model_with(&[(8, 4000), (9, 3)]);
        let t = m.score(&[7], 10);
        let before = rare_share(&mut m, &[7], 10, &t, &cfg).unwrap();
        m.learn(&[7], 10, 0);
        let after = rare_share(&mut m, &[7], 10, &t, &cfg).unwrap();
        assert_eq!(before, after);
        // 10 was never seen: no successor was seen as rarely (0 times), so the share is the
        // "new" count alone, one per distinct successor.
        assert_eq!((before.distinct, before.as_rare), (2, 2));
    }

    #[test]
    fn rare_stays_quiet_for_repeats_and_thin_contexts() {
        let cfg = SignalConfig::default();
        let mut thin = model_with(&[(8, 10)]);
        let t = thin.score(&[7], 9);
        assert!(rare_share(&mut thin, &[7], 9, &t, &cfg).is_none());
        let mut m = model_with(&[(8, 5000)]);
        let t = m.score(&[3, 7], 7);
        assert!(t.is_repeat);
        assert!(rare_transition(&mut m, &[3, 7], 7, &t, &cfg).is_none());
    }

    #[test]
    fn session_surprise_fires_far_above_population_and_not_near_it() {
        let mut pop = PopulationSurprise::default();
        for i in 0..500 {
            pop.observe(2.0 + f64::from(i % 5) * 0.1);
        }
        assert!((pop.mean - 2.2).abs() < 0.1, "mean {}", pop.mean);
        let cfg = SignalConfig::default();
        let mut normal = SessionSurprise::default();
        let mut weird = SessionSurprise::default();
        for _ in 0..20 {
            normal.push(2.3);
            weird.push(12.0);
        }
        assert!(surprising_session(&normal, &pop, &cfg).is_none());
        let s = surprising_session(&weird, &pop, &cfg).expect("far above");
        assert!(s.z > 4.0 && s.steps == 20);
        let few = PopulationSurprise {
            sessions: 10,
            ..pop
        };
        assert!(
            surprising_session(&weird, &few, &cfg).is_none(),
            "population too small"
        );
    }

    #[test]
    fn signal_config_rejects_unknown_fields_and_fills_defaults() {
        let cfg: SignalConfig = serde_json::from_str(r#"{"replay_factor": 3.0}"#).unwrap();
        assert_eq!(cfg.replay_factor, 3.0);
        assert_eq!(cfg.replay_min_run, SignalConfig::default().replay_min_run);
        let err = serde_json::from_str::<SignalConfig>(r#"{"replay_factr": 3.0}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
