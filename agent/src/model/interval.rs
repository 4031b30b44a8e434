//! Equal-tailed 99% credible intervals of Beta(k + 1, n − k + 1): the posterior of a next-operation
//! probability after seeing it k times out of n under a uniform prior, as the seed specifies. Exact
//! quantiles are costly (a few µs), so small n come from a lazily built table, k = 0 and k = n use
//! closed forms, and everything else goes through a bounded memo.

use std::sync::OnceLock;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

/// Credibility of every interval in the model (the seed's tables use 99%).
pub const CREDIBILITY: f64 = 0.99;
/// Lower / upper tail probabilities of the equal-tailed interval.
const TAIL: f64 = (1.0 - CREDIBILITY) / 2.0;

/// Counts n up to this are answered from a table computed once per process (n·(n+1)/2 cells).
const TABLE_MAX_N: u32 = 128;
/// Memo entries kept for larger n before the memo is cleared (bounded memory, counted).
const MEMO_CAP: usize = 1 << 16;

/// A credible interval for a probability.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub lower: f64,
    pub upper: f64,
}

impl Interval {
    /// Two intervals overlap when neither lies strictly above the other; this is the seed's test
    /// for "no discernible difference" between a context and its parent.
    pub fn overlaps(&self, other: &Interval) -> bool {
        self.lower <= other.upper && other.lower <= self.upper
    }
}

/// Exact equal-tailed 99% interval of Beta(k + 1, n − k + 1), computed from scratch.
///
/// statrs' `inv_beta_reg` (AS 64 start + AS 109 Newton refinement on the regularized incomplete
/// beta) is used rather than a hand-rolled inverse: statrs is the most widely used statistics crate
/// in Rust, is maintained, and its inverse stays accurate at the large shape parameters the seed's
/// tables need (n = 328,732). Tests check every cell of the seed's Tables 2–4.
pub fn beta_interval_exact(k: u32, n: u32) -> Interval {
    let k = k.min(n);
    if k == 0 || k == n {
        return closed_form(k, n);
    }
    let a = f64::from(k) + 1.0;
    let b = f64::from(n - k) + 1.0;
    Interval {
        lower: statrs::function::beta::inv_beta_reg(a, b, TAIL),
        upper: statrs::function::beta::inv_beta_reg(a, b, 1.0 - TAIL),
    }
}

/// k = 0: Beta(1, n + 1) has CDF 1 − (1 − x)^(n+1), so its quantiles are closed-form; k = n mirrors it.
/// This is the common case for "never seen this transition here", so it must be cheap.
fn closed_form(k: u32, n: u32) -> Interval {
    let m = f64::from(n) + 1.0;
    let q = |p: f64| 1.0 - (1.0 - p).powf(1.0 / m);
    if k == 0 {
        Interval {
            lower: q(TAIL),
            upper: q(1.0 - TAIL),
        }
    } else {
        Interval {
            lower: 1.0 - q(1.0 - TAIL),
            upper: 1.0 - q(TAIL),
        }
    }
}

fn table() -> &'static [Interval] {
    static TABLE: OnceLock<Vec<Interval>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Vec::with_capacity(table_index(TABLE_MAX_N + 1, 0));
        for n in 0..=TABLE_MAX_N {
            for k in 0..=n {
                t.push(beta_interval_exact(k, n));
            }
        }
        t
    })
}

/// Row n starts after rows 0..n, which hold 1 + 2 + … + n cells.
fn table_index(n: u32, k: u32) -> usize {
    (n as usize * (n as usize + 1)) / 2 + k as usize
}

/// Interval lookups with a bounded memo; not persisted (it is a cache, rebuilt on demand).
#[derive(Debug, Default, Clone)]
pub struct IntervalCache {
    memo: FxHashMap<(u32, u32), Interval>,
    /// Upper bounds computed alone (see [`IntervalCache::upper`]).
    uppers: FxHashMap<(u32, u32), f64>,
    /// Per threshold, where the upper bound falls below it (see [`Crossings`]).
    crossings: Vec<Crossings>,
    /// Exact computations done (cache misses beyond the table and closed forms).
    pub exact_computations: u64,
    /// Times the memo reached its cap and was cleared.
    pub memo_clears: u64,
}

/// For one threshold x, per k: the least n at which the upper bound of k out of n is below x.
/// With k fixed the bound falls as n grows (Beta(k + 1, n − k + 1) moves left), so "is the
/// upper bound of k out of n below x?" is then `n >= first_below[k]`: one load where it took an
/// incomplete beta, for the rare-transition checks that ask it of a new n nearly every time
/// (a busy context's count grows with every visit). Each k's crossing is found once, by a
/// search over n made of the same exact decisions ([`IntervalCache::upper_at_least`]).
#[derive(Debug, Clone)]
struct Crossings {
    x: f64,
    /// None until found; `u32::MAX` when the bound stays at least x for every n.
    first_below: Vec<Option<u32>>,
}

/// Counts up to this get a crossing (larger ones are decided directly).
const CROSSING_MAX_K: u32 = 1 << 12;
/// Thresholds with crossings at once (the signals use one or two).
const CROSSING_THRESHOLDS: usize = 4;

/// A cache carries no model state: two models with different caches are the same model.
impl PartialEq for IntervalCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl IntervalCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The 99% interval for k out of n, exact, as cheaply as possible.
    pub fn interval(&mut self, k: u32, n: u32) -> Interval {
        let k = k.min(n);
        if n <= TABLE_MAX_N {
            return table()[table_index(n, k)];
        }
        if k == 0 || k == n {
            return closed_form(k, n);
        }
        if let Some(iv) = self.memo.get(&(k, n)) {
            return *iv;
        }
        if self.memo.len() >= MEMO_CAP {
            self.memo.clear();
            self.memo_clears += 1;
        }
        let iv = beta_interval_exact(k, n);
        self.exact_computations += 1;
        self.memo.insert((k, n), iv);
        iv
    }

    /// The upper bound of k out of n alone, exact: the value `interval(k, n).upper` has. When it
    /// must be computed, one inverse incomplete beta instead of the interval's two, for the
    /// callers that use no lower bound (scoring a transition, the rare-transition share).
    pub fn upper(&mut self, k: u32, n: u32) -> f64 {
        let k = k.min(n);
        if let Some(iv) = self.free(k, n) {
            return iv.upper;
        }
        if let Some(&u) = self.uppers.get(&(k, n)) {
            return u;
        }
        if self.uppers.len() >= MEMO_CAP {
            self.uppers.clear();
            self.memo_clears += 1;
        }
        // As in `beta_interval_exact` (k is strictly between 0 and n here: `free` has the rest).
        let (a, b) = (f64::from(k) + 1.0, f64::from(n - k) + 1.0);
        let u = statrs::function::beta::inv_beta_reg(a, b, 1.0 - TAIL);
        self.exact_computations += 1;
        self.uppers.insert((k, n), u);
        u
    }

    /// False only when the upper bound of k out of n is surely at least `r`, found without
    /// computing the interval: the upper bound is the 99.5% quantile, so it lies below r exactly
    /// when more than 99.5% of Beta(k + 1, n − k + 1) does, which one regularized incomplete
    /// beta says (an inverse takes several). Intervals that cost nothing (table, closed forms,
    /// memo) always say true, and so does a CDF within rounding of the edge: there the exact
    /// interval decides.
    pub fn upper_could_be_below(&self, k: u32, n: u32, r: f64) -> bool {
        let k = k.min(n);
        if n <= TABLE_MAX_N
            || k == 0
            || k == n
            || self.memo.contains_key(&(k, n))
            || self.uppers.contains_key(&(k, n))
        {
            return true;
        }
        // The guaranteed range of the bound decides most cases in nanoseconds.
        let bounds = Bounds::new(k, n);
        if bounds.upper_min >= r {
            return false;
        }
        if bounds.upper_max < r {
            return true;
        }
        let (a, b) = (f64::from(k) + 1.0, f64::from(n - k) + 1.0);
        statrs::function::beta::checked_beta_reg(a, b, r.clamp(0.0, 1.0))
            .map_or(true, |cdf| cdf >= 1.0 - TAIL - 1e-9)
    }

    /// Is the upper bound of k out of n below x? Exactly `!upper_at_least(k, n, x)`, answered
    /// from the threshold's crossings (see [`Crossings`]) for counts up to `CROSSING_MAX_K`.
    pub fn upper_below(&mut self, k: u32, n: u32, x: f64) -> bool {
        let k = k.min(n);
        if k > CROSSING_MAX_K {
            return !self.upper_at_least(k, n, x);
        }
        let t = match self
            .crossings
            .iter()
            .position(|c| c.x.to_bits() == x.to_bits())
        {
            Some(t) => t,
            None => {
                if self.crossings.len() >= CROSSING_THRESHOLDS {
                    self.crossings.remove(0);
                }
                self.crossings.push(Crossings {
                    x,
                    first_below: Vec::new(),
                });
                self.crossings.len() - 1
            }
        };
        let found = self.crossings[t]
            .first_below
            .get(k as usize)
            .copied()
            .flatten();
        let first_below = match found {
            Some(m) => m,
            None => {
                let m = self.first_below(k, x);
                let v = &mut self.crossings[t].first_below;
                if v.len() <= k as usize {
                    v.resize(k as usize + 1, None);
                }
                v[k as usize] = Some(m);
                m
            }
        };
        n >= first_below
    }

    /// The least n ≥ k at which the upper bound of k out of n is below x (`u32::MAX` if none
    /// is below it): doubling, then bisection, over exact decisions.
    fn first_below(&mut self, k: u32, x: f64) -> u32 {
        let below = |c: &mut Self, n: u32| !c.upper_at_least(k, n, x);
        if below(self, k) {
            return k;
        }
        // Not below at `lo`; find a `hi` where it is.
        let (mut lo, mut hi) = (k, k.max(1));
        loop {
            hi = hi.saturating_mul(2);
            if below(self, hi) {
                break;
            }
            if hi == u32::MAX {
                return u32::MAX;
            }
            lo = hi;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if below(self, mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        hi
    }

    /// Do the intervals of k1/n1 and k2/n2 overlap? Skips the exact computation when the point
    /// estimates are equal: both intervals contain their mode k/n (the 0.5% quantile of
    /// Beta(k+1, n−k+1) never exceeds its mode, nor the 99.5% quantile fall below it).
    /// Otherwise the two conditions of overlapping (each lower bound at most the other's upper
    /// bound) are decided one by one, each as cheaply as it can be exactly: see
    /// [`IntervalCache::lower_at_most_upper`].
    pub fn overlap(&mut self, k1: u32, n1: u32, k2: u32, n2: u32) -> bool {
        if u64::from(k1) * u64::from(n2) == u64::from(k2) * u64::from(n1) {
            return true;
        }
        self.lower_at_most_upper(k1, n1, k2, n2) && self.lower_at_most_upper(k2, n2, k1, n1)
    }

    /// Is the lower bound of kl/nl at most the upper bound of ku/nu? In order of cost: the
    /// bounds where they are free (table, closed forms, memo) and [`Bounds`] where they are not
    /// (nanoseconds); then one bound, free or computed, asked of the other side's regularized
    /// incomplete beta (a quantile costs several). Exact either way: a bound is a quantile of a
    /// continuous, strictly increasing CDF, so comparing the CDF at x with the tail probability
    /// says which side of x the quantile lies on.
    fn lower_at_most_upper(&mut self, kl: u32, nl: u32, ku: u32, nu: u32) -> bool {
        let (l, u) = (self.free(kl, nl), self.free(ku, nu));
        let (bl, bu) = (Bounds::of(l, kl, nl), Bounds::of(u, ku, nu));
        if bl.lower_max <= bu.upper_min {
            return true;
        }
        if bl.lower_min > bu.upper_max {
            return false;
        }
        // Undecided, so at least one side is not free (free bounds are exact). A free side's
        // bound is asked of the other side's CDF; with neither free, one exact interval
        // (memoised: a parent's serves all its children) and the other side through its CDF.
        match (l, u) {
            (Some(l), _) => self.upper_at_least(ku, nu, l.lower),
            (None, Some(u)) => self.lower_at_most(kl, nl, u.upper),
            (None, None) => {
                let u = self.interval(ku, nu).upper;
                self.lower_at_most(kl, nl, u)
            }
        }
    }

    /// Where the bounds of k out of n surely lie, as cheaply as possible: exactly when the
    /// interval is free, else within [`Bounds`].
    pub(super) fn range(&self, k: u32, n: u32) -> Bounds {
        Bounds::of(self.free(k, n), k, n)
    }

    /// The interval when it costs nothing: the table, the closed forms, or the memo.
    fn free(&self, k: u32, n: u32) -> Option<Interval> {
        let k = k.min(n);
        if n <= TABLE_MAX_N {
            Some(table()[table_index(n, k)])
        } else if k == 0 || k == n {
            Some(closed_form(k, n))
        } else {
            self.memo.get(&(k, n)).copied()
        }
    }

    /// Is the lower bound of k out of n at most `x`? The lower bound is the `TAIL` quantile, so
    /// it is at most x exactly when the CDF at x is at least `TAIL`: one regularized incomplete
    /// beta instead of an inverse. Within rounding of the edge the bound itself decides, as
    /// [`IntervalCache::interval`] would.
    pub fn lower_at_most(&mut self, k: u32, n: u32, x: f64) -> bool {
        if let Some(iv) = self.free(k, n) {
            return iv.lower <= x;
        }
        match beta_cdf(k, n, x) {
            Some(c) if (c - TAIL).abs() > CDF_EDGE => c >= TAIL,
            _ => self.interval(k, n).lower <= x,
        }
    }

    /// Is the upper bound of k out of n at least `x`? It is the `1 − TAIL` quantile: at least x
    /// exactly when the CDF at x is at most `1 − TAIL` (see [`IntervalCache::lower_at_most`]).
    pub fn upper_at_least(&mut self, k: u32, n: u32, x: f64) -> bool {
        if let Some(iv) = self.free(k, n) {
            return iv.upper >= x;
        }
        let b = Bounds::new(k, n);
        if b.upper_min >= x {
            return true;
        }
        if b.upper_max < x {
            return false;
        }
        match beta_cdf(k, n, x) {
            Some(c) if (c - (1.0 - TAIL)).abs() > CDF_EDGE => c <= 1.0 - TAIL,
            _ => self.interval(k, n).upper >= x,
        }
    }
}

/// How close to a tail probability a CDF value must be for the comparison to be left to the
/// quantile itself: far above the CDF's rounding error, far below any gap that matters.
const CDF_EDGE: f64 = 1e-7;

/// P(X ≤ x) for X ~ Beta(k + 1, n − k + 1); None if statrs refuses the arguments (it does not
/// for these, but then the caller falls back to the quantile).
fn beta_cdf(k: u32, n: u32, x: f64) -> Option<f64> {
    let k = k.min(n);
    let (a, b) = (f64::from(k) + 1.0, f64::from(n - k) + 1.0);
    statrs::function::beta::checked_beta_reg(a, b, x.clamp(0.0, 1.0)).ok()
}

/// Guaranteed ranges for the bounds of the 99% interval of k out of n, from two theorems about
/// Beta(a, b) with a, b ≥ 1 (every interval here: a = k + 1, b = n − k + 1):
/// - each bound is at least 0.495 σ away from the median: a log-concave density never exceeds
///   1/σ (Bobkov & Chistyakov), and 49.5% of the mass lies between the median and each bound;
///   the median lies between the mode k/n and the mean (k + 1)/(n + 2) (Groeneveld & Meeden);
/// - each bound is within sqrt(ln(1/0.005) / (2(n + 3))) of the mean: Beta(a, b) is
///   sub-Gaussian with variance proxy 1/(4(a + b + 1)) (Marchal & Arbel 2017).
///
/// The tests check decisions made from them against exact intervals.
#[derive(Clone, Copy, Debug)]
pub(super) struct Bounds {
    /// lower ∈ [lower_min, lower_max], upper ∈ [upper_min, upper_max].
    pub(super) lower_min: f64,
    pub(super) lower_max: f64,
    pub(super) upper_min: f64,
    pub(super) upper_max: f64,
}

/// Slack for rounding in the bounds' arithmetic (far below any width they decide on).
const BOUNDS_SLACK: f64 = 1e-9;

impl Bounds {
    /// The exact bounds when `free` has the interval (each range a single point), else
    /// [`Bounds::new`].
    fn of(free: Option<Interval>, k: u32, n: u32) -> Self {
        match free {
            Some(iv) => Bounds {
                lower_min: iv.lower,
                lower_max: iv.lower,
                upper_min: iv.upper,
                upper_max: iv.upper,
            },
            None => Bounds::new(k, n),
        }
    }

    fn new(k: u32, n: u32) -> Self {
        let (k, n) = (f64::from(k.min(n)), f64::from(n));
        let (a, b) = (k + 1.0, n - k + 1.0);
        let mean = a / (a + b);
        // n ≥ 1 here (a count above the table); k/n is the mode of Beta(k+1, n-k+1).
        let mode = k / n.max(1.0);
        let sigma = (a * b / ((a + b) * (a + b) * (a + b + 1.0))).sqrt();
        let inner = (0.5 - TAIL) * sigma;
        let outer = ((1.0 / TAIL).ln() / (2.0 * (n + 3.0))).sqrt();
        Bounds {
            lower_min: mean - outer - BOUNDS_SLACK,
            lower_max: mode.max(mean) - inner + BOUNDS_SLACK,
            upper_min: mode.min(mean) + inner - BOUNDS_SLACK,
            upper_max: mean + outer + BOUNDS_SLACK,
        }
    }

    /// Each interval's lower bound is surely at most the other's upper bound.
    #[cfg(test)]
    fn surely_overlap(&self, o: &Bounds) -> bool {
        self.lower_max <= o.upper_min && o.lower_max <= self.upper_min
    }

    /// One interval surely lies above the other.
    #[cfg(test)]
    fn surely_apart(&self, o: &Bounds) -> bool {
        self.lower_min > o.upper_max || o.lower_min > self.upper_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic generator of numbers below `m` (an LCG), for the randomised checks.
    fn below_from(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut rng = seed;
        move |m| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % m
        }
    }

    /// Rounds to two decimals the way the seed's tables print them.
    fn r2(x: f64) -> f64 {
        (x * 100.0).round() / 100.0
    }

    /// (counts for a, b, c; printed (lower, upper) for a, b, c) for every row of Tables 2, 3 and 4.
    type Row = ([u32; 3], [(f64, f64); 3]);
    const SEED_TABLES: &[Row] = &[
        // Table 2 (order 1)
        (
            [1555, 13718, 169],
            [(0.09, 0.11), (0.88, 0.89), (0.01, 0.01)],
        ),
        (
            [9618, 205084, 113382],
            [(0.03, 0.03), (0.62, 0.63), (0.34, 0.35)],
        ),
        (
            [3340, 109896, 51553],
            [(0.02, 0.02), (0.66, 0.67), (0.31, 0.32)],
        ),
        // Table 3 (order 2)
        ([173, 1367, 13], [(0.09, 0.13), (0.86, 0.90), (0.00, 0.02)]),
        ([940, 8552, 109], [(0.09, 0.11), (0.88, 0.90), (0.01, 0.01)]),
        ([357, 2945, 35], [(0.09, 0.12), (0.87, 0.90), (0.01, 0.02)]),
        (
            [272, 7823, 5604],
            [(0.02, 0.02), (0.56, 0.58), (0.40, 0.42)],
        ),
        (
            [6067, 122796, 75801],
            [(0.03, 0.03), (0.60, 0.60), (0.37, 0.37)],
        ),
        (
            [3279, 74449, 31960],
            [(0.03, 0.03), (0.68, 0.68), (0.29, 0.29)],
        ),
        ([6, 144, 19], [(0.01, 0.09), (0.77, 0.91), (0.06, 0.19)]),
        (
            [2326, 87215, 23612],
            [(0.02, 0.02), (0.77, 0.77), (0.21, 0.21)],
        ),
        (
            [1008, 22527, 27919],
            [(0.02, 0.02), (0.43, 0.44), (0.54, 0.55)],
        ),
        // Table 4 (order 0)
        (
            [15466, 328732, 165117],
            [(0.03, 0.03), (0.64, 0.65), (0.32, 0.33)],
        ),
    ];

    /// `upper` is `interval(..).upper` to the bit, through each of its paths: the table, the
    /// closed forms, a whole interval already memoised, and its own computation and memo.
    #[test]
    fn upper_alone_is_the_intervals_upper_bound() {
        let cases = [
            (0, 50),
            (50, 50),
            (3, 100),
            (0, 5_000),
            (5_000, 5_000),
            (1, 5_000),
            (17, 40_000),
            (39_000, 40_000),
            (250, 328_732),
        ];
        let mut alone = IntervalCache::new();
        let mut whole = IntervalCache::new();
        for (k, n) in cases {
            let exact = beta_interval_exact(k, n).upper;
            assert_eq!(alone.upper(k, n).to_bits(), exact.to_bits(), "{k}/{n}");
            // Again, from its memo.
            assert_eq!(alone.upper(k, n).to_bits(), exact.to_bits(), "{k}/{n}");
            whole.interval(k, n);
            assert_eq!(whole.upper(k, n).to_bits(), exact.to_bits(), "{k}/{n}");
        }
        // Whole intervals were computed only where no table or closed form has them, once each.
        assert_eq!(alone.exact_computations, 4);
        assert_eq!(whole.exact_computations, 4);
    }

    #[test]
    fn intervals_reproduce_every_cell_of_seed_tables_2_3_4() {
        let mut cache = IntervalCache::new();
        for (counts, expected) in SEED_TABLES {
            let n: u32 = counts.iter().sum();
            for (k, (lo, hi)) in counts.iter().zip(expected) {
                for iv in [beta_interval_exact(*k, n), cache.interval(*k, n)] {
                    assert_eq!(
                        (r2(iv.lower), r2(iv.upper)),
                        (*lo, *hi),
                        "k={k} n={n}: got {iv:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn table_lookup_matches_exact_for_small_counts() {
        let mut cache = IntervalCache::new();
        for n in [0, 1, 2, 7, 64, TABLE_MAX_N] {
            for k in 0..=n {
                assert_eq!(
                    cache.interval(k, n),
                    beta_interval_exact(k, n),
                    "k={k} n={n}"
                );
            }
        }
    }

    #[test]
    fn closed_forms_for_zero_and_all_agree_with_incomplete_beta_inverse() {
        for n in [1u32, 5, 200, 13718] {
            let zero = closed_form(0, n);
            let a = 1.0;
            let b = f64::from(n) + 1.0;
            let upper = statrs::function::beta::inv_beta_reg(a, b, 1.0 - TAIL);
            assert!(
                (zero.upper - upper).abs() < 1e-9,
                "n={n}: {} vs {upper}",
                zero.upper
            );
            let all = closed_form(n, n);
            let lower = statrs::function::beta::inv_beta_reg(b, a, TAIL);
            assert!(
                (all.lower - lower).abs() < 1e-9,
                "n={n}: {} vs {lower}",
                all.lower
            );
        }
    }

    #[test]
    fn more_data_narrows_the_interval() {
        let small = beta_interval_exact(10, 100);
        let large = beta_interval_exact(1000, 10_000);
        assert!(large.upper - large.lower < small.upper - small.lower);
        assert!(small.lower < 0.1 && 0.1 < small.upper);
    }

    /// The bounds are theorems; this checks them (and the decisions drawn from them) against
    /// exact intervals over counts shaped like a context and its parent, and that they decide
    /// most pairs (else they would not be worth having).
    #[test]
    fn overlap_bounds_agree_with_exact_intervals() {
        let mut next = below_from(0x9e37_79b9_7f4a_7c15);
        let (mut decided, mut pairs) = (0, 0);
        for _ in 0..3000 {
            let n1 = 129 + next(200_000) as u32;
            let k1 = next(u64::from(n1) + 1) as u32;
            // The parent: more data, a probability near the child's.
            let n2 = n1 + next(u64::from(n1) * 4 + 1) as u32;
            let p = f64::from(k1) / f64::from(n1);
            let jitter = (next(2001) as f64 - 1000.0) / 1000.0 * 0.2 * p.max(0.01);
            let k2 = (((p + jitter).clamp(0.0, 1.0)) * f64::from(n2)) as u32;
            for (k, n) in [(k1, n1), (k2, n2)] {
                let b = Bounds::new(k, n);
                let iv = beta_interval_exact(k, n);
                assert!(
                    b.lower_min <= iv.lower && iv.lower <= b.lower_max,
                    "{k}/{n}: {b:?} {iv:?}"
                );
                assert!(
                    b.upper_min <= iv.upper && iv.upper <= b.upper_max,
                    "{k}/{n}: {b:?} {iv:?}"
                );
            }
            let exact = beta_interval_exact(k1, n1).overlaps(&beta_interval_exact(k2, n2));
            let (b1, b2) = (Bounds::new(k1, n1), Bounds::new(k2, n2));
            if b1.surely_overlap(&b2) {
                assert!(exact, "{k1}/{n1} vs {k2}/{n2}");
                decided += 1;
            } else if b1.surely_apart(&b2) {
                assert!(!exact, "{k1}/{n1} vs {k2}/{n2}");
                decided += 1;
            }
            assert_eq!(IntervalCache::new().overlap(k1, n1, k2, n2), exact);
            pairs += 1;
        }
        assert!(
            decided * 2 > pairs,
            "bounds decided only {decided} of {pairs}"
        );
    }

    /// The crossings answer what the direct decision answers, for every k on both sides of
    /// each crossing and at random counts, for the thresholds the signals use.
    #[test]
    fn upper_below_from_crossings_is_the_direct_decision() {
        let mut c = IntervalCache::new();
        let mut direct = IntervalCache::new();
        let mut next = below_from(0x9e37_79b9_7f4a_7c15);
        let (mut below, mut not) = (0, 0);
        for x in [0.0005, 0.001, 0.01, 0.05, 0.3] {
            for k in (0..40).chain([100, 1_000, CROSSING_MAX_K, CROSSING_MAX_K + 1]) {
                let first = c.first_below(k, x);
                for n in [first.saturating_sub(1), first, first.saturating_add(1)] {
                    if n >= k {
                        assert_eq!(c.upper_below(k, n, x), !direct.upper_at_least(k, n, x));
                    }
                }
            }
            for _ in 0..2_000 {
                let n = next(2_000_000) as u32;
                let k = next(u64::from(n.min(3 * CROSSING_MAX_K)) + 1) as u32;
                let b = c.upper_below(k, n, x);
                assert_eq!(b, !direct.upper_at_least(k, n, x), "{k}/{n} {x}");
                if b { below += 1 } else { not += 1 }
            }
        }
        assert!(below > 500 && not > 500, "{below} {not}");
        // One list of crossings per threshold, however many are asked for.
        assert!(c.crossings.len() <= CROSSING_THRESHOLDS);
    }

    /// Never false where the exact upper bound is below r.
    #[test]
    fn upper_could_be_below_never_rules_out_a_lower_upper_bound() {
        let cache = IntervalCache::new();
        let (mut ruled_out, mut cases) = (0, 0);
        for n in [129u32, 500, 1_000, 5_000, 20_000, 100_000, 400_000] {
            for k in [1u32, 2, 3, 5, 10, 30, 100, 300] {
                let upper = beta_interval_exact(k, n).upper;
                for r in [0.0005, 0.001, 0.002, 0.005, 0.01, 0.05] {
                    cases += 1;
                    if !cache.upper_could_be_below(k, n, r) {
                        assert!(upper >= r, "k={k} n={n} r={r}: upper {upper}");
                        ruled_out += 1;
                    } else if k < n && n > TABLE_MAX_N {
                        // Said "could be": then it is (up to rounding at the edge).
                        assert!(upper < r * (1.0 + 1e-6), "k={k} n={n} r={r}: upper {upper}");
                    }
                }
            }
        }
        assert!(ruled_out * 4 > cases, "{ruled_out} of {cases}");
    }

    /// The CDF questions answer what the exact bounds say, on both sides of each bound, and
    /// overlap decisions built from them match exact intervals for counts on both sides of the
    /// table (a child in it, its parent beyond it, and both beyond it).
    #[test]
    fn cdf_decisions_agree_with_exact_intervals() {
        let mut next = below_from(0x0123_4567_89ab_cdef);
        let (mut overlapping, mut apart) = (0, 0);
        for _ in 0..3000 {
            let range = if next(2) == 0 { 128 } else { 50_000 };
            let n1 = 1 + next(range) as u32;
            let k1 = next(u64::from(n1) + 1) as u32;
            let n2 = n1 + 1 + next(u64::from(n1) * 4 + 200) as u32;
            let p = f64::from(k1) / f64::from(n1);
            let jitter = (next(2001) as f64 - 1000.0) / 1000.0 * 0.3 * p.max(0.02);
            let k2 = (((p + jitter).clamp(0.0, 1.0)) * f64::from(n2)) as u32;
            let (i1, i2) = (beta_interval_exact(k1, n1), beta_interval_exact(k2, n2));
            let exact = i1.overlaps(&i2);
            assert_eq!(
                IntervalCache::new().overlap(k1, n1, k2, n2),
                exact,
                "{k1}/{n1} {i1:?} vs {k2}/{n2} {i2:?}"
            );
            if exact {
                overlapping += 1;
            } else {
                apart += 1;
            }
            // Just either side of each bound, and somewhere else.
            for x in [
                i1.lower * (1.0 - 1e-6),
                i1.lower * (1.0 + 1e-6),
                i1.upper * (1.0 - 1e-6),
                i1.upper * (1.0 + 1e-6),
                next(1001) as f64 / 1000.0,
            ] {
                let mut c = IntervalCache::new();
                assert_eq!(c.lower_at_most(k1, n1, x), i1.lower <= x, "{k1}/{n1} {x}");
                assert_eq!(c.upper_at_least(k1, n1, x), i1.upper >= x, "{k1}/{n1} {x}");
            }
        }
        // Both answers were exercised.
        assert!(overlapping > 100 && apart > 100, "{overlapping} {apart}");
    }

    #[test]
    fn overlap_shortcut_agrees_with_exact_intervals() {
        let mut cache = IntervalCache::new();
        // Equal point estimates: the shortcut.
        assert!(cache.overlap(1, 10, 100, 1000));
        // Clearly different with lots of data.
        assert!(!cache.overlap(100, 1000, 500, 1000));
        let (a, b) = (
            beta_interval_exact(100, 1000),
            beta_interval_exact(500, 1000),
        );
        assert!(!a.overlaps(&b));
    }
}
