//! Shared by the benchmark and tests: loading the FIFA sessions and measuring held-out log-loss.
//! Not part of the engine's API.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{Cursor, Model, Op};

/// ../shared/data/fifa-sessions.dat relative to the repository root.
pub fn fifa_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/fifa-sessions.dat")
}

/// One session per line, space-separated operation ids; successive repeats collapsed, as the
/// session module does before the model sees them.
pub fn load_sessions(path: &Path) -> Result<Vec<Vec<Op>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read {}: {e}; the FIFA sessions are expected at ../shared/data/fifa-sessions.dat \
             next to the repository",
            path.display()
        )
    })?;
    let mut sessions = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut s: Vec<Op> = Vec::new();
        for tok in line.split_whitespace() {
            let op = tok
                .parse::<Op>()
                .map_err(|e| format!("{}:{}: bad page id {tok:?}: {e}", path.display(), i + 1))?;
            if s.last() != Some(&op) {
                s.push(op);
            }
        }
        if !s.is_empty() {
            sessions.push(s);
        }
    }
    Ok(sessions)
}

/// Learns every step of every session (the first with an empty history), calling `maintain` every
/// 1024 steps. Each session keeps a [`Cursor`], as the engine's sessions do. Returns the number
/// of steps learned.
pub fn train(model: &mut Model, sessions: &[Vec<Op>], now_ns: u64) -> u64 {
    train_timed(model, sessions, now_ns).0
}

/// [`train`], also returning the wall seconds spent in `maintain`. Its work per call is bounded
/// (`maintain_budget` entries examined), not proportional to traffic: called every 1024 steps
/// here, about once a second by the daemon, so at a million requests a second the daemon's
/// share per request is a thousandth of this one's. Timed apart so a learning throughput can be
/// read both ways; the call rate stays, so figures remain comparable with earlier runs.
pub fn train_timed(model: &mut Model, sessions: &[Vec<Op>], now_ns: u64) -> (u64, f64) {
    let mut steps = 0u64;
    let mut maintain_secs = 0.0;
    for s in sessions {
        let mut cursor = Cursor::default();
        for i in 0..s.len() {
            model.learn_with(&s[..i], s[i], now_ns, &mut cursor);
            steps += 1;
            if steps.is_multiple_of(1024) {
                let t = Instant::now();
                model.maintain(now_ns);
                maintain_secs += t.elapsed().as_secs_f64();
            }
        }
    }
    (steps, maintain_secs)
}

/// Batch training, as a trainer that sees all its data at once works: learns every step of
/// every session without maintenance, then runs one whole expire + collapse cycle
/// ([`Model::maintain_full`]), so the model ends collapsed exactly as the online path leaves
/// it after a cycle. Returns the steps learned and the wall seconds of the final cycle.
pub fn train_batch(model: &mut Model, sessions: &[Vec<Op>], now_ns: u64) -> (u64, f64) {
    let mut steps = 0u64;
    for s in sessions {
        let mut cursor = Cursor::default();
        for i in 0..s.len() {
            model.learn_with(&s[..i], s[i], now_ns, &mut cursor);
            steps += 1;
        }
    }
    let t = Instant::now();
    model.maintain_full(now_ns);
    (steps, t.elapsed().as_secs_f64())
}

/// Mean −log2 P(step | previous steps) in bits over every step after the first of each session
/// (the positions anomaly-grid's `log_likelihood_bits_per_symbol` scores), and the count scored.
pub fn held_out_log_loss(model: &mut Model, sessions: &[Vec<Op>]) -> (f64, u64) {
    let mut bits = 0.0;
    let mut count = 0u64;
    for s in sessions {
        for i in 1..s.len() {
            bits += model.score(&s[..i], s[i]).surprise_bits;
            count += 1;
        }
    }
    (bits / count.max(1) as f64, count)
}
