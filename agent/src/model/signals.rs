//! Anomaly-signal primitives built on the model: confidently rare transition, missing precedent,
//! replay (a repeat run far beyond the operation's learned run lengths) and session surprise far
//! above the population's. Each check returns the numbers behind it so an alert can show them;
//! `decide` turns them into alerts. Nothing fires before there is enough data (every check has a
//! minimum support).

use serde::{Deserialize, Serialize};

use super::{Model, Op, Transition};

/// Thresholds of the anomaly signals (the `[signals]` table of the config file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignalConfig {
    /// Confidently rare: the 99% upper bound of P(next | context) is below this...
    pub rare_upper_bound: f64,
    /// ... in a context observed at least this many times.
    pub rare_min_context_count: u32,
    /// Missing precedent: a predecessor with precedence score at least this...
    pub precedent_min_score: f64,
    /// ... relative to at least this many occurrences of the operation.
    pub precedent_min_support: u32,
    /// Replay: the run is longer than `replay_factor` × this quantile of the learned run lengths...
    pub replay_quantile: f64,
    pub replay_factor: f64,
    /// ... the operation has at least this many learned runs ...
    pub replay_min_runs: u32,
    /// ... and the run is at least this long.
    pub replay_min_run: u32,
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
            replay_quantile: 0.99,
            replay_factor: 2.0,
            replay_min_runs: 30,
            replay_min_run: 3,
            surprise_z: 4.0,
            surprise_ratio: 2.0,
            surprise_min_steps: 8,
            surprise_min_sessions: 100,
        }
    }
}

/// A transition whose probability is confidently below the threshold.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RareTransition {
    pub context_len: usize,
    pub n: u32,
    pub k: u32,
    pub upper: f64,
    pub threshold: f64,
}

/// Confidently rare transition: the interval's upper bound is below `rare_upper_bound` in a context
/// with at least `rare_min_context_count` observations. Repeats are not transitions.
pub fn confidently_rare(t: &Transition, cfg: &SignalConfig) -> Option<RareTransition> {
    let iv = t.interval?;
    (!t.is_repeat && t.n >= cfg.rare_min_context_count && iv.upper < cfg.rare_upper_bound)
        .then_some(RareTransition {
            context_len: t.context_len,
            n: t.n,
            k: t.k,
            upper: iv.upper,
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

/// Per-operation histograms of successive-repeat run lengths (a run of 1 is "not repeated").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunLengths {
    max_ops: u32,
    hists: Vec<RunHist>,
    /// Runs of operations with ids ≥ max_ops, not recorded.
    pub untracked: u64,
    /// Times a histogram was halved.
    pub halvings: u64,
}

impl RunLengths {
    pub fn new(max_ops: u32) -> Self {
        RunLengths {
            max_ops,
            hists: Vec::new(),
            untracked: 0,
            halvings: 0,
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
        if self.hists.len() <= op as usize {
            self.hists.resize(op as usize + 1, RunHist::default());
        }
        let h = &mut self.hists[op as usize];
        h.bins[run_bin(run_len)] += 1;
        h.total += 1;
        if h.total >= DECAY_AT {
            h.bins.iter_mut().for_each(|b| *b /= 2);
            h.total = h.bins.iter().sum();
            self.halvings += 1;
        }
    }

    /// Runs learned for `op`.
    pub fn support(&self, op: Op) -> u32 {
        self.hists.get(op as usize).map_or(0, |h| h.total)
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

/// A run of repeats far beyond what the operation's learned runs allow.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Replay {
    pub op: Op,
    pub run_len: u32,
    /// The learned `quantile` of run lengths.
    pub learned: u32,
    pub quantile: f64,
    pub factor: f64,
    pub support: u32,
}

/// Replay: `run_len` successive repeats of `op` exceed factor × the learned quantile.
pub fn replay(runs: &RunLengths, op: Op, run_len: u32, cfg: &SignalConfig) -> Option<Replay> {
    let support = runs.support(op);
    if support < cfg.replay_min_runs || run_len < cfg.replay_min_run {
        return None;
    }
    let learned = runs.quantile(op, cfg.replay_quantile)?;
    (f64::from(run_len) > f64::from(learned) * cfg.replay_factor).then_some(Replay {
        op,
        run_len,
        learned,
        quantile: cfg.replay_quantile,
        factor: cfg.replay_factor,
        support,
    })
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
    use crate::model::{ModelConfig, Transition};

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
    fn replay_fires_on_a_run_far_beyond_learned_runs_and_not_within_them() {
        let mut runs = RunLengths::new(100);
        for i in 0..200 {
            runs.learn(5, if i % 10 == 0 { 2 } else { 1 });
        }
        let cfg = SignalConfig::default();
        assert_eq!(runs.quantile(5, 0.99), Some(2));
        assert!(
            replay(&runs, 5, 4, &cfg).is_none(),
            "4 = 2 × learned quantile is allowed"
        );
        let r = replay(&runs, 5, 5, &cfg).expect("5 > 2 × 2");
        assert_eq!((r.learned, r.support), (2, 200));
    }

    #[test]
    fn replay_stays_quiet_without_enough_learned_runs() {
        let mut runs = RunLengths::new(100);
        for _ in 0..10 {
            runs.learn(5, 1);
        }
        assert!(replay(&runs, 5, 50, &SignalConfig::default()).is_none());
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

    fn transition(k: u32, n: u32) -> Transition {
        let mut m = Model::new(ModelConfig::default()).unwrap();
        let interval = Some(m.interval(k, n));
        Transition {
            context_len: 1,
            n,
            k,
            probability: f64::from(k) / f64::from(n),
            interval,
            enough_data: true,
            is_repeat: false,
            predictive: 0.001,
            surprise_bits: 10.0,
        }
    }

    #[test]
    fn rare_fires_only_when_the_upper_bound_is_confidently_below_threshold() {
        let cfg = SignalConfig::default();
        assert_eq!(cfg.rare_upper_bound, 0.002);
        // 0 of 3000: upper ≈ 0.0018 < 0.002.
        let r = confidently_rare(&transition(0, 3000), &cfg).expect("confidently rare");
        assert!(r.upper < 0.002);
        // 0 of 2000: upper ≈ 0.0026, not confident enough at the default threshold...
        assert!(confidently_rare(&transition(0, 2000), &cfg).is_none());
        // ...but it is under a looser one.
        let loose = SignalConfig {
            rare_upper_bound: 0.01,
            ..SignalConfig::default()
        };
        assert!(confidently_rare(&transition(0, 2000), &loose).is_some());
        // 0 of 100: upper ≈ 0.051, not confident enough.
        assert!(confidently_rare(&transition(0, 100), &loose).is_none());
        // 30 of 3000 = 1%: not rare.
        assert!(confidently_rare(&transition(30, 3000), &cfg).is_none());
        let mut rep = transition(0, 3000);
        rep.is_repeat = true;
        assert!(
            confidently_rare(&rep, &cfg).is_none(),
            "a repeat is not a transition"
        );
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
