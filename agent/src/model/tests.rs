use super::signals::{self, SignalConfig};
use super::*;

const A: Op = 0;
const B: Op = 1;
const C: Op = 2;
const HOUR: u64 = 3600 * 1_000_000_000;

fn cfg() -> ModelConfig {
    ModelConfig {
        min_count_to_extend: 1,
        sequence_min_occurrences: 1,
        ..ModelConfig::default()
    }
}

fn learn_n(m: &mut Model, history: &[Op], next: Op, times: u32) {
    for _ in 0..times {
        m.learn(history, next, 0);
    }
}

/// Builds a model whose order-0, -1 and -2 counts are exactly the seed's Tables 4, 2 and 3.
fn seed_model() -> Model {
    let t3: [([Op; 2], [u32; 3]); 9] = [
        ([A, A], [173, 1367, 13]),
        ([B, A], [940, 8552, 109]),
        ([C, A], [357, 2945, 35]),
        ([A, B], [272, 7823, 5604]),
        ([B, B], [6067, 122796, 75801]),
        ([C, B], [3279, 74449, 31960]),
        ([A, C], [6, 144, 19]),
        ([B, C], [2326, 87215, 23612]),
        ([C, C], [1008, 22527, 27919]),
    ];
    let t2: [(Op, [u32; 3]); 3] = [
        (A, [1555, 13718, 169]),
        (B, [9618, 205084, 113382]),
        (C, [3340, 109896, 51553]),
    ];
    let t4 = [15466u32, 328732, 165117];
    let mut m = Model::new(cfg()).unwrap();
    // Learning [x, y] → z also counts [y] → z and [] → z; top up the shorter contexts after.
    for (ctx, counts) in t3 {
        for (z, k) in counts.into_iter().enumerate() {
            learn_n(&mut m, &ctx, z as Op, k);
        }
    }
    for (y, counts) in t2 {
        for (z, k) in counts.into_iter().enumerate() {
            let so_far = m.context(&[y]).unwrap().count(z as Op);
            learn_n(
                &mut m,
                &[y],
                z as Op,
                k.checked_sub(so_far).expect("tables consistent"),
            );
        }
    }
    for (z, k) in t4.into_iter().enumerate() {
        let so_far = m.occurrences(z as Op);
        learn_n(
            &mut m,
            &[],
            z as Op,
            k.checked_sub(so_far).expect("tables consistent"),
        );
    }
    m
}

fn retained(m: &Model, ops: &[Op]) -> bool {
    !m.context(ops).expect("context exists").collapsed
}

#[test]
fn seed_model_holds_exactly_the_seed_counts() {
    let m = seed_model();
    assert_eq!(m.context(&[C, A]).unwrap().count(B), 2945);
    assert_eq!(m.context(&[A]).unwrap().count(B), 13718);
    assert_eq!(m.context(&[]).unwrap().n, 15466 + 328732 + 165117);
}

#[test]
fn seed_collapse_aa_ba_ca_fold_into_a_and_table_5_remains() {
    let mut m = seed_model();
    let r = m.maintain_full(0);
    assert!(r.cycle_completed);
    for ctx in [[A, A], [B, A], [C, A]] {
        assert!(!retained(&m, &ctx), "{ctx:?} should collapse into [a]");
    }
    for ctx in [[A, B], [B, B], [C, B], [A, C], [B, C], [C, C]] {
        assert!(retained(&m, &ctx), "{ctx:?} should be kept");
    }
    // Table 5: a, ab, ac, bb, bc, cb, cc are the rows (leaves) of the collapsed table.
    for ctx in [&[A][..], &[B], &[C], &[]] {
        assert!(retained(&m, ctx), "{ctx:?} should be kept");
    }
    let mut leaves: Vec<Vec<Op>> = Vec::new();
    for (slot, n) in m.nodes.iter().enumerate() {
        let has_kept_child = m
            .nodes
            .iter()
            .any(|c| c.live && !c.collapsed && c.parent == slot as u32);
        if n.live && !n.collapsed && !has_kept_child {
            leaves.push(m.context_ops(slot as u32));
        }
    }
    leaves.sort();
    // root, a, b, c and the six kept pairs.
    assert_eq!(m.stats().retained_contexts, 10);
    let table5: Vec<Vec<Op>> = vec![
        vec![A],
        vec![A, B],
        vec![A, C],
        vec![B, B],
        vec![B, C],
        vec![C, B],
        vec![C, C],
    ];
    assert_eq!(leaves, table5);
}

#[test]
fn collapse_keeps_a_collapsible_parent_of_a_distinctive_context() {
    // [x, y] behaves like [y], but [w, x, y] differs: the seed only discards leaves, so [x, y]
    // stays as the parent of a kept context.
    let (w, x, y, p, q) = (10, 11, 12, 13, 14);
    let mut m = Model::new(cfg()).unwrap();
    learn_n(&mut m, &[w, x, y], p, 300);
    learn_n(&mut m, &[x, y], q, 300); // [x, y]: p 300, q 300 — like [y] below
    learn_n(&mut m, &[y], p, 600);
    learn_n(&mut m, &[y], q, 600);
    learn_n(&mut m, &[q], p, 2000); // the root is dominated by p
    m.maintain_full(0);
    assert!(retained(&m, &[w, x, y]), "[w,x,y] → p always, unlike [x,y]");
    assert!(retained(&m, &[x, y]), "kept because its child is kept");
    // Without the distinctive child, [x, y] would have collapsed into [y].
    let mut m2 = Model::new(cfg()).unwrap();
    learn_n(&mut m2, &[x, y], p, 300);
    learn_n(&mut m2, &[x, y], q, 300);
    learn_n(&mut m2, &[y], p, 300);
    learn_n(&mut m2, &[y], q, 300);
    learn_n(&mut m2, &[q], p, 2000);
    m2.maintain_full(0);
    assert!(!retained(&m2, &[x, y]));
    assert!(retained(&m2, &[y]));
}

/// A context with a flat distribution (little data, wide intervals) under a parent dominated by
/// one successor differs from it: the dominant successor's interval in the parent lies above
/// the context's. The collapse's test without the parent's counts must not pass it.
#[test]
fn collapse_keeps_a_flat_context_under_a_dominated_parent() {
    let (x, y) = (20, 21);
    let mut m = Model::new(cfg()).unwrap();
    // [y] → A 181 times of 200 (12 of them through [x, y]); [x, y] → each of 12 operations
    // once, A among them.
    learn_n(&mut m, &[y], A, 180);
    for op in 0..8 {
        learn_n(&mut m, &[y], 100 + op, 1);
    }
    for op in [A, B, C, 3, 4, 5, 6, 7, 8, 9, 10, 11] {
        learn_n(&mut m, &[x, y], op, 1);
    }
    m.maintain_full(0);
    let lower_parent = m
        .interval(
            m.context(&[y]).unwrap().count(A),
            m.context(&[y]).unwrap().n,
        )
        .lower;
    let upper_child = m.interval(1, 12).upper;
    assert!(upper_child < lower_parent, "{upper_child} {lower_parent}");
    assert!(retained(&m, &[x, y]));
}

/// Checks every context's collapse verdict against a reference that computes each interval
/// from scratch, deepest contexts first. Returns (collapsed, kept) counts.
fn assert_verdicts_exact(m: &Model) -> [usize; 2] {
    use super::interval::beta_interval_exact;
    let count = |n: &Node, op: Op| n.entries().iter().find(|e| e.next == op).map_or(0, |e| e.k);
    let mut kept = vec![false; m.nodes.len()];
    let mut checked = [0usize; 2];
    for depth in (1..=m.cfg.max_order as u8).rev() {
        for slot in 0..m.nodes.len() {
            let c = &m.nodes[slot];
            if !c.live || c.depth != depth {
                continue;
            }
            let p = &m.nodes[c.parent as usize];
            let apart_on = |k_c: u32, k_p: u32| {
                let (ic, ip) = (beta_interval_exact(k_c, c.n), beta_interval_exact(k_p, p.n));
                !ic.overlaps(&ip)
            };
            // As the seed's is_collapsible: each of this context's next operations against the
            // parent's count; operations only the parent saw, by the parent's lower bound
            // against this context's upper bound for a count of 0.
            let distinct = c.n > 0
                && (c.entries().iter().any(|e| apart_on(e.k, count(p, e.next)))
                    || p.entries().iter().any(|e| {
                        count(c, e.next) == 0
                            && beta_interval_exact(e.k, p.n).lower
                                > beta_interval_exact(0, c.n).upper
                    }));
            let has_kept_child = (0..m.nodes.len())
                .any(|s| kept[s] && m.nodes[s].parent == slot as u32 && m.nodes[s].live);
            kept[slot] = distinct || has_kept_child;
            assert_eq!(
                !c.collapsed, kept[slot],
                "context {slot} (depth {depth}, n {}): model says collapsed = {}",
                c.n, c.collapsed
            );
            checked[usize::from(kept[slot])] += 1;
        }
    }
    checked
}

/// Random sessions over a skewed alphabet: op 0 is usually followed by 1 (a dominant
/// successor), others mostly walk on by one or two, sometimes anything (skewed to small ids).
fn learn_walks(m: &mut Model, sessions: usize, rng: &mut u64, now: u64) {
    let mut next = |k: u64| {
        *rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*rng >> 33) % k
    };
    for _ in 0..sessions {
        let mut hist: Vec<Op> = Vec::new();
        for _ in 0..(2 + next(12)) {
            let last = hist.last().copied().unwrap_or(0);
            let op = match next(10) {
                0 => (next(25) * next(25) / 24) as Op,
                _ if last == 0 => 1,
                _ => (last + 1 + next(2) as Op) % 12,
            };
            if hist.last() == Some(&op) {
                continue;
            }
            let ctx = &hist[hist.len().saturating_sub(m.cfg.max_order)..];
            m.learn(ctx, op, now);
            hist.push(op);
        }
    }
}

/// The collapse's shortcuts (free intervals, guaranteed bounds, CDFs, the test without the
/// parent's counts) decide exactly what exact intervals decide, on contexts with counts on
/// both sides of the interval table, some with a dominant successor and some without.
#[test]
fn collapse_decisions_match_exact_intervals() {
    let mut m = Model::new(ModelConfig {
        max_order: 4,
        ..cfg()
    })
    .unwrap();
    learn_walks(&mut m, 3000, &mut 0x5eed, 0);
    m.maintain_full(0);
    let checked = assert_verdicts_exact(&m);
    // Both verdicts occur, and counts beyond the table were involved.
    assert!(checked[0] > 20 && checked[1] > 20, "{checked:?}");
    assert!(m.nodes.iter().any(|n| n.live && n.depth >= 1 && n.n > 128));
}

/// Every verdict is what a fresh evaluation gives after each whole cycle, across rounds of
/// learning interleaved with budgeted maintenance (a new kind of walk in one round).
#[test]
fn collapse_verdicts_stay_exact_across_cycles() {
    let mut m = Model::new(ModelConfig {
        max_order: 4,
        maintain_budget: 64,
        ..cfg()
    })
    .unwrap();
    let mut rng = 0xfeed_u64;
    learn_walks(&mut m, 2000, &mut rng, 0);
    m.maintain_full(0);
    assert_verdicts_exact(&m);
    for round in 0..6u32 {
        // Sessions learned between budgeted steps of a cycle (some after their context was
        // judged in it); one round shifts a context's traffic.
        for i in 0..600 {
            if i % 15 == 0 {
                learn_walks(&mut m, 1, &mut rng, 0);
            }
            m.maintain(0);
        }
        if round == 3 {
            learn_n(&mut m, &[4, 5], 9, 200);
        }
        m.maintain_full(0);
        assert_verdicts_exact(&m);
    }
}

/// 30 sessions login → balance → transfer, 10 login → transfer, 60 login → balance.
fn banking_model(c: ModelConfig) -> Model {
    let (login, balance, transfer) = (0, 1, 2);
    let mut m = Model::new(c).unwrap();
    let mut sessions: Vec<Vec<Op>> = Vec::new();
    sessions.extend(std::iter::repeat_n(vec![login, balance, transfer], 30));
    sessions.extend(std::iter::repeat_n(vec![login, transfer], 10));
    sessions.extend(std::iter::repeat_n(vec![login, balance], 60));
    bench_support::train(&mut m, &sessions, 0);
    m.maintain_full(0);
    m
}

#[test]
fn precedence_score_is_sequence_count_over_last_operation_count() {
    let m = banking_model(cfg());
    let seqs = m.important_sequences(100);
    let find = |ops: &[Op]| seqs.iter().find(|s| s.ops == ops).cloned();
    // transfer occurs 40 times; balance → transfer 30 times: 30 / 40.
    let s = find(&[1, 2]).expect("[balance, transfer] is important");
    assert_eq!(s.occurrences, 30);
    assert_eq!(s.precedence_score, 0.75);
    assert_eq!(
        s.context_count, 30,
        "balance is followed by something 30 times"
    );
    // balance occurs 90 times, always right after login: 90 / 90.
    let s = find(&[0, 1]).expect("[login, balance] is important");
    assert_eq!((s.occurrences, s.precedence_score), (90, 1.0));
    // Sorted by score: the 1.0 ones first.
    assert_eq!(seqs[0].precedence_score, 1.0);
    assert!(
        seqs.windows(2)
            .all(|w| w[0].precedence_score >= w[1].precedence_score)
    );
    assert!(m.important_sequences(1).len() == 1);
}

#[test]
fn required_predecessors_and_missing_precedent_find_the_skipped_step() {
    let (login, balance, transfer) = (0, 1, 2);
    let mut m = Model::new(cfg()).unwrap();
    let mut sessions: Vec<Vec<Op>> = Vec::new();
    sessions.extend(std::iter::repeat_n(vec![login, balance, transfer], 100));
    sessions.extend(std::iter::repeat_n(vec![login, balance], 100));
    bench_support::train(&mut m, &sessions, 0);
    m.maintain_full(0);
    let preds: Vec<Op> = m
        .required_predecessors(transfer)
        .iter()
        .map(|p| p.op)
        .collect();
    // [login, balance] → transfer also scores 1.0, but [login, balance] says nothing [balance]
    // does not (balance always follows login), so it collapses and is not an important sequence;
    // login is required of balance instead.
    assert_eq!(preds, vec![balance]);
    assert!(!retained(&m, &[login, balance]));
    let of_balance: Vec<Op> = m
        .required_predecessors(balance)
        .iter()
        .map(|p| p.op)
        .collect();
    assert_eq!(of_balance, vec![login]);
    let sc = SignalConfig::default();
    let seen_login_only = |op: Op| op == login;
    let hit = signals::missing_precedent(&m, transfer, seen_login_only, &sc).expect("fires");
    assert_eq!((hit.predecessor, hit.support), (balance, 100));
    assert!(signals::missing_precedent(&m, transfer, |_| true, &sc).is_none());
    assert!(
        signals::missing_precedent(&m, login, |_| false, &sc).is_none(),
        "login has no predecessor"
    );
}

#[test]
fn rare_transition_fires_only_after_enough_data_in_the_context() {
    let (x, y, z) = (0, 1, 2);
    let mut m = Model::new(cfg()).unwrap();
    let sc = SignalConfig::default();
    learn_n(&mut m, &[x], y, 10);
    let t = m.score(&[x], z);
    assert!(!t.enough_data && signals::rare_transition(&mut m, &[x], z, &t, &sc).is_none());
    learn_n(&mut m, &[x], y, 4000);
    let t = m.score(&[x], z);
    assert_eq!((t.context_len, t.n, t.k), (1, 4010, 0));
    let r = signals::rare_transition(&mut m, &[x], z, &t, &sc)
        .expect("0 of 4010 after a context with one successor is confidently rare");
    assert!(r.upper < 0.002);
    let t = m.score(&[x], y);
    assert!(signals::rare_transition(&mut m, &[x], y, &t, &sc).is_none());
}

#[test]
fn score_uses_the_longest_retained_context_with_enough_data() {
    let (x, y, z) = (0, 1, 2);
    let mut m = Model::new(cfg()).unwrap();
    learn_n(&mut m, &[z, x], y, 100);
    learn_n(&mut m, &[x], z, 5);
    let t = m.score(&[z, x], y);
    assert_eq!((t.context_len, t.n, t.k), (2, 100, 100));
    // Only 5 observations of [y, x] → falls back to [x].
    learn_n(&mut m, &[y, x], z, 5);
    let t = m.score(&[y, x], z);
    assert_eq!((t.context_len, t.n, t.k), (1, 110, 10));
}

#[test]
fn score_does_not_learn_and_observe_scores_before_learning() {
    let mut m = Model::new(cfg()).unwrap();
    learn_n(&mut m, &[0], 1, 50);
    let before = m.score(&[0], 2);
    assert_eq!(m.score(&[0], 2), before);
    let seen = m.observe(&[0], 2, 0);
    assert_eq!(
        seen, before,
        "observe scores with the counts before this request"
    );
    assert_eq!(m.context(&[0]).unwrap().count(2), 1);
}

#[test]
fn predictive_distribution_sums_to_one_and_never_gives_zero() {
    let mut m = Model::new(cfg()).unwrap();
    let sessions = vec![
        vec![0, 1, 2, 3],
        vec![0, 2, 1],
        vec![3, 3, 0, 1, 2],
        vec![1, 0],
    ];
    let sessions: Vec<Vec<Op>> = sessions
        .into_iter()
        .map(|mut s| {
            s.dedup();
            s
        })
        .collect();
    bench_support::train(&mut m, &sessions, 0);
    for history in [&[][..], &[0], &[0, 1], &[9, 9, 0, 1]] {
        let seen: f64 = (0..4).map(|op| m.score(history, op).predictive).sum();
        let unseen = m.score(history, 1000).predictive;
        assert!(unseen > 0.0);
        // All never-seen operations share one unit of the base distribution.
        assert!(
            (seen + unseen - 1.0).abs() < 1e-12,
            "{history:?}: {}",
            seen + unseen
        );
    }
}

#[test]
fn a_next_step_equal_to_the_last_is_flagged_as_a_repeat() {
    let mut m = Model::new(cfg()).unwrap();
    assert!(m.score(&[4, 5], 5).is_repeat);
    assert!(!m.score(&[4, 5], 4).is_repeat);
}

#[test]
fn counts_slide_out_of_the_window_and_empty_contexts_are_freed() {
    let mut m = Model::new(cfg()).unwrap(); // 24 one-hour buckets
    learn_n(&mut m, &[1, 2], 3, 10);
    m.learn(&[7], 8, 20 * HOUR);
    m.maintain_full(20 * HOUR);
    assert_eq!(
        m.context(&[1, 2]).unwrap().count(3),
        10,
        "still inside the window"
    );
    m.maintain_full(24 * HOUR);
    assert!(m.context(&[1, 2]).is_none(), "expired after 24 h");
    assert!(m.context(&[2]).is_none());
    assert_eq!(m.context(&[7]).unwrap().count(8), 1);
    assert_eq!(m.occurrences(3), 0);
    assert_eq!(m.stats().contexts_expired, 2);
    assert_eq!(m.contexts(), 2, "root and [7]");
}

#[test]
fn contexts_stay_under_the_cap_under_a_hostile_stream_and_evictions_are_counted() {
    let c = ModelConfig {
        max_contexts: 500,
        ..cfg()
    };
    let mut m = Model::new(c).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut history: Vec<Op> = Vec::new();
    for i in 0..50_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let op = (x % 5000) as Op;
        m.learn(&history, op, i);
        history.push(op);
        if history.len() > 8 {
            history.remove(0);
        }
        assert!(m.contexts() <= 500);
        if i % 1000 == 0 {
            m.maintain(i);
        }
    }
    assert!(m.stats().contexts_evicted > 0);
    assert_eq!(
        m.index.len() + 1,
        m.contexts(),
        "index and live count agree"
    );
    // Every live non-root context is reachable from its parent through the index.
    for (slot, n) in m.nodes.iter().enumerate().skip(1) {
        if n.live {
            assert_eq!(m.index.get(&n.key), Some(&(slot as u32)));
            let p = &m.nodes[n.parent as usize];
            assert_eq!(n.key, child_key(p.key, n.op));
        }
    }
}

#[test]
fn maintain_work_per_call_is_bounded_by_the_budget() {
    let c = ModelConfig {
        maintain_budget: 64,
        ..cfg()
    };
    let mut m = Model::new(c).unwrap();
    let mut s: Vec<Op> = (0..2000).map(|i| (i * 7 % 13) as Op).collect();
    s.dedup();
    bench_support::train(&mut m, &[s], 0);
    let widest = m.nodes.iter().map(|n| n.entries().len()).max().unwrap();
    let mut calls = 0;
    loop {
        let r = m.maintain(0);
        assert!(r.work <= 64 + 2 * widest + 2, "work {}", r.work);
        calls += 1;
        if r.cycle_completed {
            break;
        }
    }
    assert!(calls > 1, "a cycle is spread over several calls");
}

#[test]
fn model_state_round_trips_through_serde_exactly() {
    let mut m = banking_model(cfg());
    m.learn_run(2, 3);
    m.observe_session_surprise(1.2345678901234567);
    m.observe_session_surprise(0.1);
    m.maintain(5 * HOUR); // leave the maintenance state machine mid-way
    let json = serde_json::to_string(&m).unwrap();
    let mut back: Model = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m);
    for (h, n) in [(&[0][..], 1), (&[0, 1], 2), (&[], 0), (&[1], 0)] {
        assert_eq!(back.score(h, n), m.score(h, n));
    }
    assert_eq!(back.important_sequences(20), m.important_sequences(20));
}

#[test]
fn model_config_validates_and_rejects_unknown_fields() {
    assert_eq!(
        Model::new(ModelConfig {
            max_order: 40,
            ..ModelConfig::default()
        })
        .unwrap_err(),
        ModelError::MaxOrder(40)
    );
    assert!(
        ModelConfig {
            buckets: 0,
            ..ModelConfig::default()
        }
        .validate()
        .is_err()
    );
    assert!(
        ModelConfig {
            max_contexts: 3,
            ..ModelConfig::default()
        }
        .validate()
        .is_err()
    );
    let err = serde_json::from_str::<ModelConfig>(r#"{"max_ordr": 3}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field"));
    let c: ModelConfig = serde_json::from_str(r#"{"max_order": 3}"#).unwrap();
    assert_eq!((c.max_order, c.buckets), (3, 24));
}

#[test]
fn memory_report_counts_every_context() {
    let m = banking_model(cfg());
    let r = m.memory();
    assert_eq!(r.contexts, m.contexts());
    assert!(r.bytes_per_context > std::mem::size_of::<Node>() as f64);
}

/// A model file can pass its checksum and still not be one this code wrote. Each of these would
/// panic (an index out of range, a count going below zero, a cycle gathered for a depth that
/// does not exist) once the loaded model is used.
#[test]
fn loaded_models_with_dangling_contexts_or_counts_are_refused() {
    let mut good = banking_model(cfg());
    good.maintain(HOUR);
    assert_eq!(good.check(), Ok(()));
    assert_eq!(seed_model().check(), Ok(()));
    let deep = (1..good.nodes.len()).find(|&i| good.nodes[i].live && good.nodes[i].depth == 2);
    let deep = deep.expect("a context of two operations");
    type Corrupt = fn(&mut Model, usize);
    let cases: [(&str, Corrupt); 8] = [
        ("no root", |m, _| m.nodes.clear()),
        ("dangling parent", |m, i| m.nodes[i].parent = 999),
        ("parent of the wrong depth", |m, i| m.nodes[i].parent = ROOT),
        ("not indexed", |m, i| {
            let key = m.nodes[i].key;
            m.index.remove(&key);
        }),
        ("child count", |m, _| m.nodes[ROOT as usize].children += 1),
        ("fewer observations than counts", |m, i| m.nodes[i].n = 0),
        ("cycle state past max_order", |m, _| {
            m.phase = Phase::Collapse { depth: 3, pos: 0 };
            m.by_depth.truncate(2);
        }),
        ("invalid config", |m, _| {
            m.cfg.max_order = MAX_ORDER_LIMIT + 1
        }),
    ];
    for (what, corrupt) in cases {
        let mut m = good.clone();
        corrupt(&mut m, deep);
        assert!(m.check().is_err(), "{what} passed the check");
    }
}

/// With the default `min_count_to_extend`, a context of one operation counts from the first
/// request (the precedences of adjacent operations are exact from the start), and a deeper one
/// starts once its parent has that many observations, so it misses fewer than that many.
#[test]
fn contexts_of_one_operation_count_from_the_start_deeper_ones_once_the_parent_has_data() {
    let extend = ModelConfig::default().min_count_to_extend;
    assert!(extend > 1, "the default extends deeper contexts lazily");
    let mut m = Model::new(ModelConfig::default()).unwrap();
    for _ in 0..60 {
        m.learn(&[], A, 0);
        m.learn(&[A], B, 0);
        m.learn(&[A, B], C, 0);
    }
    let t = m.score(&[A], B);
    assert_eq!((t.context_len, t.k, t.n), (1, 60, 60), "{t:?}");
    let t = m.score(&[A, B], C);
    assert_eq!(t.context_len, 2, "{t:?}");
    assert!((60 - extend..60).contains(&t.k), "{t:?}");
}

/// A loaded model carries the settings it was saved with: the configured thresholds and caps
/// take over (a lower context cap is reached over the next maintain calls), the settings its
/// counts are built on stay and are named.
#[test]
fn a_loaded_model_adopts_thresholds_and_caps_and_keeps_what_its_counts_are_built_on() {
    let mut m = Model::new(cfg()).unwrap();
    for i in 0..200u32 {
        let s = [i % 7, (i * 3) % 11, (i * 5) % 13, i % 5];
        for j in 0..s.len() {
            m.learn(&s[..j], s[j], 0);
        }
    }
    let before = m.contexts();
    assert!(before > 100, "{before}");
    let mut loaded: Model = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    let configured = ModelConfig {
        max_contexts: 50,
        min_context_count: 12,
        max_order: 4,
        window_secs: 3600,
        ..cfg()
    };
    assert_eq!(
        loaded.adopt_config(&configured).unwrap(),
        vec!["max_order", "window_secs"]
    );
    assert_eq!(loaded.config().min_context_count, 12);
    assert_eq!(loaded.config().max_contexts, 50);
    assert_eq!(
        (loaded.config().max_order, loaded.config().window_secs),
        (m.config().max_order, m.config().window_secs)
    );
    // Eviction takes leaves first, and a leaf freed can make its parent one: a few calls.
    for _ in 0..20 {
        loaded.maintain(0);
    }
    assert!(loaded.contexts() <= 50, "{} of {before}", loaded.contexts());
    loaded.check().unwrap();
    assert!(matches!(
        loaded.adopt_config(&ModelConfig {
            max_contexts: 1,
            ..cfg()
        }),
        Err(ModelError::MaxContexts(1))
    ));
}
