//! Model benchmark on the FIFA World Cup sessions (../shared/data/fifa-sessions.dat), side by side
//! with the `anomaly-grid` crate's variable-order Markov model at the same maximum order:
//! training and scoring throughput (criterion), held-out log-loss and memory per context (printed
//! first, since criterion does not report them). Both models see the same tokens: page ids with
//! successive repeats collapsed, sessions of at least two steps, first 70% to train, rest to score.
//!
//! Run: `AYA_BUILD_SKIP=1 cargo bench -p precedent --bench model`

use std::hint::black_box;
use std::time::Instant;

use anomaly_grid::{AnomalyGridConfig, MarkovModel};
use criterion::{BatchSize, Criterion, Throughput};
use precedent::model::bench_support::{
    fifa_path, held_out_log_loss, load_sessions, train, train_batch, train_timed,
};
use precedent::model::{Model, ModelConfig, Op};

const MAX_ORDER: usize = 8;
const NOW: u64 = 1_700_000_000_000_000_000;

struct Data {
    train: Vec<Vec<Op>>,
    test: Vec<Vec<Op>>,
    train_str: Vec<Vec<String>>,
    test_str: Vec<Vec<String>>,
    train_steps: u64,
    test_steps: u64,
}

fn load() -> Data {
    let path = fifa_path();
    let sessions = load_sessions(&path).unwrap_or_else(|e| panic!("{e}"));
    let sessions: Vec<Vec<Op>> = sessions.into_iter().filter(|s| s.len() >= 2).collect();
    let cut = sessions.len() * 7 / 10;
    let (train, test) = (sessions[..cut].to_vec(), sessions[cut..].to_vec());
    let to_str = |v: &[Vec<Op>]| -> Vec<Vec<String>> {
        v.iter()
            .map(|s| s.iter().map(ToString::to_string).collect())
            .collect()
    };
    Data {
        train_str: to_str(&train),
        test_str: to_str(&test),
        train_steps: train.iter().map(|s| s.len() as u64).sum(),
        test_steps: test.iter().map(|s| s.len() as u64 - 1).sum(),
        train,
        test,
    }
}

fn precedent_model() -> Model {
    let mut cfg = ModelConfig {
        max_order: MAX_ORDER,
        ..ModelConfig::default()
    };
    // For exploring the memory / log-loss trade-off: PRECEDENT_MIN_COUNT_TO_EXTEND=n.
    if let Some(n) = std::env::var("PRECEDENT_MIN_COUNT_TO_EXTEND")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.min_count_to_extend = n;
    }
    Model::new(cfg).expect("config")
}

fn precedent_trained(d: &Data) -> Model {
    let mut m = precedent_model();
    train(&mut m, &d.train, NOW);
    m
}

fn grid_model() -> MarkovModel {
    // No memory limit: with one, anomaly-grid 0.6 counts its contexts by scanning every trie node
    // once per training window (`ContextTrie::context_count`), which makes training quadratic (it
    // did not finish 70% of FIFA in 10 minutes). Without it, it runs at its best speed and with
    // unbounded memory, which favours it.
    let cfg = AnomalyGridConfig::default()
        .with_max_order(MAX_ORDER)
        .and_then(|c| c.with_memory_limit(None))
        .expect("anomaly-grid config");
    MarkovModel::with_config(cfg).expect("anomaly-grid model")
}

fn grid_trained(d: &Data) -> MarkovModel {
    let mut g = grid_model();
    for s in &d.train_str {
        g.train(s).expect("anomaly-grid train");
    }
    g
}

/// anomaly-grid's bits per symbol over a session averages positions 1..; weight by them.
fn grid_log_loss(g: &MarkovModel, test: &[Vec<String>]) -> f64 {
    let mut bits = 0.0;
    let mut n = 0usize;
    for s in test {
        bits += g.log_likelihood_bits_per_symbol(s) * (s.len() - 1) as f64;
        n += s.len() - 1;
    }
    bits / n as f64
}

fn report(d: &Data) {
    println!(
        "FIFA: {} training sessions ({} steps), {} held-out sessions ({} scored steps), max order {}",
        d.train.len(),
        d.train_steps,
        d.test.len(),
        d.test_steps,
        MAX_ORDER
    );
    let t = Instant::now();
    let mut m = precedent_model();
    let (_, maintain_s) = train_timed(&mut m, &d.train, NOW);
    let learn_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (ours, scored) = held_out_log_loss(&mut m, &d.test);
    let score_s = t.elapsed().as_secs_f64();
    m.maintain_full(NOW);
    let mem = m.memory();
    let t = Instant::now();
    let g = grid_trained(d);
    let grid_learn_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let theirs = grid_log_loss(&g, &d.test_str);
    let grid_score_s = t.elapsed().as_secs_f64();
    assert_eq!(scored, d.test_steps);
    println!("one-shot timings (criterion below is the careful measurement):");
    println!(
        "  precedent    learn {:>10.0} transitions/s   score {:>10.0} transitions/s   held-out log-loss {:.4} bits/op",
        d.train_steps as f64 / learn_s,
        d.test_steps as f64 / score_s,
        ours
    );
    println!(
        "               learn {:>10.0} transitions/s without the {:.0}% of its time in maintain \
         (called every 1024 steps here, about once a second by the daemon)",
        d.train_steps as f64 / (learn_s - maintain_s),
        100.0 * maintain_s / learn_s
    );
    let t = Instant::now();
    let mut b = precedent_model();
    let (_, collapse_s) = train_batch(&mut b, &d.train, NOW);
    let batch_s = t.elapsed().as_secs_f64();
    let (batch_loss, _) = held_out_log_loss(&mut b, &d.test);
    println!(
        "               learn {:>10.0} transitions/s as a batch: learning, then one collapse cycle \
         ({:.0}% of the time); held-out log-loss {:.4} bits/op",
        d.train_steps as f64 / batch_s,
        100.0 * collapse_s / batch_s,
        batch_loss
    );
    println!(
        "  anomaly-grid learn {:>10.0} transitions/s   score {:>10.0} transitions/s   held-out log-loss {:.4} bits/op",
        d.train_steps as f64 / grid_learn_s,
        d.test_steps as f64 / grid_score_s,
        theirs
    );
    println!(
        "  precedent memory: {} contexts ({} retained by the collapse), {} bytes, {:.1} bytes/context; \
         {} contexts evicted; important sequences after collapse: {}",
        mem.contexts,
        mem.retained_contexts,
        mem.bytes,
        mem.bytes_per_context,
        m.stats().contexts_evicted,
        m.important_sequences(usize::MAX).len()
    );
    println!(
        "  anomaly-grid contexts: {}",
        g.context_tree().context_count()
    );
}

fn main() {
    let d = load();
    report(&d);

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(10))
        .configure_from_args();
    {
        let mut g = c.benchmark_group("learn_70pct_fifa");
        g.throughput(Throughput::Elements(d.train_steps));
        g.bench_function("precedent", |b| {
            b.iter_batched(
                precedent_model,
                |mut m| {
                    train(&mut m, &d.train, NOW);
                    m
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("precedent_batch", |b| {
            b.iter_batched(
                precedent_model,
                |mut m| {
                    train_batch(&mut m, &d.train, NOW);
                    m
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("anomaly_grid", |b| {
            b.iter_batched(
                grid_model,
                |mut m| {
                    for s in &d.train_str {
                        m.train(s).expect("train");
                    }
                    m
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }
    {
        let mut m = precedent_trained(&d);
        let gm = grid_trained(&d);
        let mut g = c.benchmark_group("score_30pct_fifa");
        g.throughput(Throughput::Elements(d.test_steps));
        g.bench_function("precedent", |b| {
            b.iter(|| black_box(held_out_log_loss(&mut m, &d.test)))
        });
        g.bench_function("anomaly_grid", |b| {
            b.iter(|| black_box(grid_log_loss(&gm, &d.test_str)))
        });
        g.finish();
    }
    {
        // The engine's per-request path: score then learn in one walk.
        let mut g = c.benchmark_group("observe_fifa");
        g.throughput(Throughput::Elements(d.test_steps + d.test.len() as u64));
        let base = precedent_trained(&d);
        g.bench_function("precedent_score_then_learn", |b| {
            b.iter_batched(
                || base.clone(),
                |mut m| {
                    for s in &d.test {
                        for i in 0..s.len() {
                            black_box(m.observe(&s[..i], s[i], NOW));
                        }
                    }
                    m
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }
    c.final_summary();
}
