//! The labelled benchmark behind `cargo xtask eval`: real sessions from the 1998 FIFA World Cup
//! site as normal traffic, abusive sessions of several kinds injected, and the engine asked to
//! tell them apart.
//!
//! Pages become operations `GET /p/x/y/z` (the page id in base 16, one letter per segment, so
//! no path position has more than 16 values and discovery keeps pages distinct); one page in
//! seven carries an item id (`/p/x/y/z/123`), the templated operation enumeration abuses.
//! Every benign request to such a page draws a fresh id (the data only names pages), so a
//! benign run of one templated page is a walk through items; an injected replay repeats one
//! identical request, item id included: a page's (as a reload would) or an item page's (as a
//! replayed transfer carries its parameters), counted apart.
//! The engine learns from the first part of the sessions, then scores a shuffled held-out mix
//! of benign and injected sessions while it keeps learning, as a live agent would.
//!
//! Two measurements per session:
//! - scores from a frozen copy of the model at the end of training, one per signal (rarest
//!   transition by its context's tail share, strongest missing precedent, longest run of
//!   identical requests relative to the replay signal's firing point, mean surprise, longest
//!   step of varied requests relative to the enumeration signal's firing point) plus
//!   `combined` (the smallest benign-tail p-value of the five), thresholded on the benign
//!   held-out sessions at 0.1% and 1% false positives;
//! - the engine's own alerts at the default thresholds (what `precedent` would print).
//!
//! Deterministic given the seeds. Usage:
//! `eval [--data PATH] [--seeds N] [--per-kind N] [--train-share F] [--sessions N] [--dump PREFIX]`
//! (`--dump`: every held-out session's scores, one file per seed, to inspect the thresholds).
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Instant,
};

use precedent::{
    decide::{Mode, Signal},
    discovery::Discovery,
    engine::{Engine, EngineConfig},
    http::Method,
    model::{Model, Op, SignalConfig, signals},
    rules::RuleFile,
};

const STEP_NS: u64 = 50_000_000; // 20 requests per second of traffic time
const SECOND: u64 = 1_000_000_000;
const T0: u64 = 1_790_000_000 * SECOND;
/// Sessions of one slow-scraping campaign.
const CAMPAIGN: usize = 8;
/// Continuous per-session scores: rare, precedent, replay, surprise.
const SCORES: [&str; NS] = ["rare", "precedent", "replay", "surprise", "enumeration"];
const NS: usize = 5;

/// splitmix64: small, seedable, good enough for sampling.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Benign,
    SkippedStep,
    ReplayWithId,
    ReplayPage,
    Enumeration,
    RandomWalk,
    SlowScraping,
    Mimicry,
}

impl Kind {
    const ATTACKS: [Kind; 7] = [
        Kind::SkippedStep,
        Kind::ReplayWithId,
        Kind::ReplayPage,
        Kind::Enumeration,
        Kind::RandomWalk,
        Kind::SlowScraping,
        Kind::Mimicry,
    ];
    fn name(self) -> &'static str {
        match self {
            Kind::Benign => "benign",
            Kind::SkippedStep => "skipped step",
            Kind::ReplayWithId => "replay, item id (5-12x)",
            Kind::ReplayPage => "replay, page (5-12x)",
            Kind::Enumeration => "enumeration (20-40 ids)",
            Kind::RandomWalk => "random walk",
            Kind::SlowScraping => "slow scraping",
            Kind::Mimicry => "mimicry walk",
        }
    }
}

/// One request: a page, and for templated pages the item id.
#[derive(Clone, Copy, Debug)]
struct Req {
    page: u32,
    item: Option<u32>,
}

struct Session {
    kind: Kind,
    /// Slow scraping: the campaign it belongs to.
    campaign: Option<usize>,
    reqs: Vec<Req>,
}

fn templated(page: u32) -> bool {
    page % 7 == 3
}

fn page_path(page: u32) -> String {
    let mut digits = Vec::new();
    let mut p = page;
    while p > 0 || digits.len() < 3 {
        digits.push((b'a' + (p % 16) as u8) as char);
        p /= 16;
    }
    let mut s = String::from("/p");
    for d in digits.iter().rev() {
        s.push('/');
        s.push(*d);
    }
    s
}

fn path(r: Req) -> String {
    match r.item {
        Some(i) => format!("{}/{i}", page_path(r.page)),
        None => page_path(r.page),
    }
}

fn op_name(page: u32) -> String {
    if templated(page) {
        format!("GET {}/{{id}}", page_path(page))
    } else {
        format!("GET {}", page_path(page))
    }
}

fn with_items(pages: &[u32], rng: &mut Rng) -> Vec<Req> {
    pages
        .iter()
        .map(|&page| Req {
            page,
            item: templated(page).then(|| rng.range(1, 99_999) as u32),
        })
        .collect()
}

/// What training taught that attack generators use.
struct Knowledge {
    pages: Vec<u32>,
    starts: Vec<u32>,
    /// page → successors by count, most common first.
    successors: HashMap<u32, Vec<(u32, u32)>>,
    /// Pages by popularity, most visited first.
    popular: Vec<u32>,
    /// (B, A): B is nearly always preceded by A.
    precedences: Vec<(u32, u32)>,
}

fn learn_knowledge(
    train: &[Vec<u32>],
    precedences: Vec<(u32, u32)>,
    model: &Model,
    discovery: &Discovery,
) -> Knowledge {
    let mut bigrams: HashMap<u32, HashMap<u32, u32>> = HashMap::new();
    let mut visits: HashMap<u32, u64> = HashMap::new();
    let mut starts = Vec::new();
    for s in train {
        starts.push(s[0]);
        for w in s.windows(2) {
            if w[0] != w[1] {
                *bigrams.entry(w[0]).or_default().entry(w[1]).or_default() += 1;
            }
        }
        for &p in s {
            *visits.entry(p).or_default() += 1;
        }
    }
    let mut pages: Vec<u32> = visits.keys().copied().collect();
    pages.sort_unstable();
    let mut popular = pages.clone();
    popular.sort_by(|a, b| visits[b].cmp(&visits[a]).then(a.cmp(b)));
    let successors = bigrams
        .into_iter()
        .map(|(p, m)| {
            let mut v: Vec<(u32, u32)> = m.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            (p, v)
        })
        .collect();
    let op_of = |page: u32| discovery.resolve(&op_name(page)).map(|id| id.0);
    let known = precedences
        .iter()
        .filter(|(b, a)| {
            op_of(*b).is_some_and(|op| {
                model
                    .required_predecessors(op)
                    .iter()
                    .any(|p| Some(p.op) == op_of(*a))
            })
        })
        .count();
    eprintln!(
        "  {} strong precedences in the traffic, {known} of them among the model's required predecessors",
        precedences.len()
    );
    Knowledge {
        pages,
        starts,
        successors,
        popular,
        precedences,
    }
}

/// Strong precedences as the data shows them: (B, A) when A is among the 8 steps before B in
/// at least 95% of B's 30+ occurrences (the engine's missing-precedent thresholds). The attack
/// is defined by the traffic, not by what the detector happens to know.
fn data_precedences(train: &[Vec<u32>]) -> Vec<(u32, u32)> {
    let cfg = SignalConfig::default();
    let mut occurrences: HashMap<u32, u32> = HashMap::new();
    let mut before: HashMap<(u32, u32), u32> = HashMap::new();
    for s in train {
        let mut steps: Vec<u32> = s.clone();
        steps.dedup();
        for (i, &b) in steps.iter().enumerate() {
            *occurrences.entry(b).or_default() += 1;
            let window: HashSet<u32> = steps[i.saturating_sub(8)..i]
                .iter()
                .copied()
                .filter(|&a| a != b)
                .collect();
            for a in window {
                *before.entry((b, a)).or_default() += 1;
            }
        }
    }
    let mut best: HashMap<u32, (u32, u32)> = HashMap::new();
    for (&(b, a), &k) in &before {
        let e = best.entry(b).or_insert((a, k));
        if k > e.1 || (k == e.1 && a < e.0) {
            *e = (a, k);
        }
    }
    let mut out: Vec<(u32, u32)> = best
        .into_iter()
        .filter(|(b, (_, k))| {
            let n = occurrences[b];
            n >= cfg.precedent_min_support
                && f64::from(*k) >= cfg.precedent_min_score * f64::from(n)
        })
        .map(|(b, (a, _))| (b, a))
        .collect();
    out.sort_unstable();
    out
}

/// Web browsing has few mandatory steps; an API has many (a balance lookup before a
/// transfer). When the data has too few, this plants `n` of them: for popular pages B, a new
/// page A (ids above the data's) is inserted before every visit to B that lacks it among the
/// 8 steps before, in every session, learned and held out alike.
fn plant_precedences(sessions: &mut [Vec<u32>], n: usize) -> Vec<(u32, u32)> {
    let mut visits: HashMap<u32, u64> = HashMap::new();
    for s in sessions.iter() {
        for &p in s {
            *visits.entry(p).or_default() += 1;
        }
    }
    let max_id = visits.keys().copied().max().unwrap_or(0);
    let mut popular: Vec<u32> = visits.keys().copied().filter(|&p| !templated(p)).collect();
    popular.sort_by(|a, b| visits[b].cmp(&visits[a]).then(a.cmp(b)));
    // Popular but not the front page: ranks 20, 40, 60, ...
    let planted: Vec<(u32, u32)> = (0..n)
        .filter_map(|i| popular.get(20 * (i + 1)).copied())
        .enumerate()
        .map(|(i, b)| (b, max_id + 1 + i as u32))
        .collect();
    for s in sessions.iter_mut() {
        let mut out = Vec::with_capacity(s.len() + 2);
        for &p in s.iter() {
            if let Some(&(_, a)) = planted.iter().find(|(b, _)| *b == p) {
                let mut recent = out.clone();
                recent.dedup();
                let from = recent.len().saturating_sub(8);
                if !recent[from..].contains(&a) && out.last() != Some(&p) {
                    out.push(a);
                }
            }
            out.push(p);
        }
        *s = out;
    }
    planted
}

fn inject(k: &Knowledge, holdout: &[Vec<u32>], per_kind: usize, rng: &mut Rng) -> Vec<Session> {
    let mut out = Vec::new();
    let benign = |rng: &mut Rng| &holdout[rng.below(holdout.len())];
    for kind in Kind::ATTACKS {
        match kind {
            Kind::SkippedStep => {
                for _ in 0..per_kind {
                    if k.precedences.is_empty() {
                        break;
                    }
                    let (b, a) = k.precedences[rng.below(k.precedences.len())];
                    let base = benign(rng);
                    let cut = rng.range(1, base.len().min(10));
                    let mut pages: Vec<u32> = base[..cut]
                        .iter()
                        .copied()
                        .filter(|&p| p != a && p != b)
                        .collect();
                    if pages.is_empty() {
                        pages.push(k.starts[rng.below(k.starts.len())]);
                        pages.retain(|&p| p != a && p != b);
                    }
                    pages.push(b);
                    out.push(Session {
                        kind,
                        campaign: None,
                        reqs: with_items(&pages, rng),
                    });
                }
            }
            Kind::ReplayWithId | Kind::ReplayPage => {
                // The request replayed is one the visitor made: a page carrying an item id (as
                // a transfer carries its parameters) or a plain page, each kind in its own row
                // (benign visitors reload plain pages, never an item's with the same id here).
                let with_id = kind == Kind::ReplayWithId;
                let fallback: Vec<u32> = k
                    .popular
                    .iter()
                    .copied()
                    .filter(|&p| templated(p) == with_id)
                    .take(20)
                    .collect();
                for _ in 0..per_kind {
                    let base = benign(rng);
                    let candidates: Vec<usize> = (0..base.len())
                        .filter(|&i| templated(base[i]) == with_id)
                        .collect();
                    // A session without such a page gets one of the popular ones, at a random place.
                    let (at, page) = if candidates.is_empty() {
                        (
                            rng.below(base.len() + 1),
                            fallback[rng.below(fallback.len())],
                        )
                    } else {
                        let at = candidates[rng.below(candidates.len())];
                        (at, base[at])
                    };
                    let times = rng.range(5, 12);
                    // The same request replayed: identical item ids too.
                    let mut reqs = with_items(&base[..at], rng);
                    let item = templated(page).then(|| rng.range(1, 99_999) as u32);
                    reqs.extend(std::iter::repeat_n(Req { page, item }, times));
                    out.push(Session {
                        kind,
                        campaign: None,
                        reqs,
                    });
                }
            }
            Kind::Enumeration => {
                let targets: Vec<u32> = k
                    .popular
                    .iter()
                    .copied()
                    .filter(|&p| templated(p))
                    .take(20)
                    .collect();
                for _ in 0..per_kind {
                    let base = benign(rng);
                    let cut = rng.range(0, base.len().min(5));
                    let mut reqs = with_items(&base[..cut], rng);
                    let page = targets[rng.below(targets.len())];
                    let n = rng.range(20, 40);
                    let first = rng.range(1000, 90_000) as u32;
                    reqs.extend((0..n as u32).map(|i| Req {
                        page,
                        item: Some(first + i),
                    }));
                    out.push(Session {
                        kind,
                        campaign: None,
                        reqs,
                    });
                }
            }
            Kind::RandomWalk => {
                for _ in 0..per_kind {
                    let n = rng.range(10, 30);
                    let pages: Vec<u32> =
                        (0..n).map(|_| k.pages[rng.below(k.pages.len())]).collect();
                    out.push(Session {
                        kind,
                        campaign: None,
                        reqs: with_items(&pages, rng),
                    });
                }
            }
            Kind::SlowScraping => {
                // Each campaign works through a slice of the site, a few pages per session,
                // every session opening on a common entry page like a visitor would.
                let campaigns = per_kind.div_ceil(CAMPAIGN);
                for c in 0..campaigns {
                    let mut todo: Vec<u32> = k.pages.clone();
                    rng.shuffle(&mut todo);
                    let mut next = 0;
                    for _ in 0..CAMPAIGN {
                        let mut pages = vec![k.starts[rng.below(k.starts.len())]];
                        for _ in 0..rng.range(4, 6) {
                            pages.push(todo[next % todo.len()]);
                            next += 1;
                        }
                        out.push(Session {
                            kind,
                            campaign: Some(c),
                            reqs: with_items(&pages, rng),
                        });
                    }
                }
            }
            Kind::Mimicry => {
                for _ in 0..per_kind {
                    let n = rng.range(10, 30);
                    let mut p = k.starts[rng.below(k.starts.len())];
                    let mut pages = vec![p];
                    while pages.len() < n {
                        let Some(succ) = k.successors.get(&p).filter(|s| !s.is_empty()) else {
                            break;
                        };
                        p = succ[rng.below(succ.len().min(3))].0;
                        pages.push(p);
                    }
                    out.push(Session {
                        kind,
                        campaign: None,
                        reqs: with_items(&pages, rng),
                    });
                }
            }
            Kind::Benign => unreachable!(),
        }
    }
    out
}

/// Per-session result.
struct Scored {
    kind: Kind,
    campaign: Option<usize>,
    /// Final scores (one per `SCORES`).
    scores: [f64; NS],
    /// Running scores after each request (attacks only: for requests-until-detection).
    trace: Vec<[f64; NS]>,
    /// Engine alerts: (signal, request index of the first alert of that signal).
    alerts: BTreeMap<&'static str, usize>,
    /// [`PlainRuns::score`]: the in-sample reference for plain-page replays.
    reference: f64,
}

/// A reference for the plain-page replay row, not a detector: how often runs of identical
/// requests to each plain page go on, counted over every session of the data, the held-out
/// ones included. It knows the very benign sessions that set the thresholds, so what it
/// detects at a false-positive rate bounds what any judgement of runs alone can (a model
/// learned from the training share knows less).
struct PlainRuns {
    /// page → number of its runs at least L long, at index L - 1.
    at_least: HashMap<u32, Vec<u32>>,
}

impl PlainRuns {
    fn fit(sessions: &[Vec<u32>]) -> Self {
        let mut at_least: HashMap<u32, Vec<u32>> = HashMap::new();
        for s in sessions {
            for run in s.chunk_by(|a, b| a == b) {
                if templated(run[0]) {
                    continue;
                }
                let counts = at_least.entry(run[0]).or_default();
                if counts.len() < run.len() {
                    counts.resize(run.len(), 0);
                }
                counts[..run.len()].iter_mut().for_each(|c| *c += 1);
            }
        }
        PlainRuns { at_least }
    }

    /// The largest −ln P(a run of the page at least this long) over the session's runs of
    /// identical requests to plain pages; a run longer than any counted scores as 1e-12.
    fn score(&self, reqs: &[Req]) -> f64 {
        reqs.chunk_by(|a, b| a.page == b.page && a.item == b.item)
            .filter(|run| run.len() >= 2 && !templated(run[0].page))
            .map(|run| {
                let counts = self.at_least.get(&run[0].page);
                let runs = counts.and_then(|c| c.first()).copied().unwrap_or(0);
                let longer = counts
                    .and_then(|c| c.get(run.len() - 1))
                    .copied()
                    .unwrap_or(0);
                let p = if runs == 0 {
                    0.0
                } else {
                    f64::from(longer) / f64::from(runs)
                };
                -p.max(1e-12).ln()
            })
            .fold(0.0, f64::max)
    }
}

/// The frozen model's view of one session.
fn frozen_scores(
    model: &mut Model,
    discovery: &Discovery,
    reqs: &[Req],
    keep_trace: bool,
    cfg: &SignalConfig,
    population_bits: f64,
) -> ([f64; NS], Vec<[f64; NS]>) {
    // A page discovery never saw gets an operation id of its own (counting down from the top
    // of the id space, far above any real id), as the live engine would discover it: one
    // shared "unknown" id would make a walk through several new pages look like a run of one
    // operation, and the run signals would judge it.
    let unknown = |page: u32| -> Op { u32::MAX - 1 - page };
    let max_order = model.config().max_order;
    let mut steps: Vec<Op> = Vec::new();
    let mut seen: HashSet<Op> = HashSet::new();
    // The run of identical requests (same page and item: the same path), as the engine
    // counts it.
    let (mut run_op, mut last_req, mut run) = (None, None, 0u32);
    // The step: requests to one operation in a row, and whether they were not all identical.
    let (mut step, mut varied) = (0u32, false);
    let mut s = [0.0f64; NS];
    let (mut bits, mut n_bits) = (0.0, 0u32);
    let mut trace = Vec::new();
    for r in reqs {
        let op = discovery
            .resolve(&op_name(r.page))
            .map_or(unknown(r.page), |id| discovery.canonical(id).0);
        if run_op == Some(op) {
            let req = Some((r.page, r.item));
            run = if last_req == req { run + 1 } else { 1 };
            last_req = req;
            // How far past the firing point (the engine's own judgement, 1 = fires): the
            // run's probability under the operation's learned runs shrunk toward all runs, on
            // the runs the engine judges (at least replay_min_run long).
            if run >= cfg.replay_min_run
                && let Some(r) = signals::replay_judgement(model.runs(), op, run, cfg)
            {
                s[2] = s[2].max(r.excess());
            }
            // The step as the enumeration signal judges it, once its requests differ.
            step += 1;
            varied |= run < step;
            if varied && let Some(r) = signals::long_run_judgement(model.step_runs(), op, step, cfg)
            {
                s[4] = s[4].max(r.excess());
            }
        } else {
            let ctx = &steps[steps.len().saturating_sub(max_order)..];
            let t = model.score(ctx, op);
            if let Some(r) = signals::rare_share(model, ctx, op, &t, cfg) {
                s[0] = s[0].max(-(r.upper.max(1e-12)).log10());
            }
            bits += t.surprise_bits;
            n_bits += 1;
            // Excess surprise over the population's, growing with the evidence (steps):
            // a long walk of unusual steps outranks one odd page in a two-step visit.
            let n = f64::from(n_bits);
            s[3] = s[3].max((bits / n - population_bits) * n.sqrt());
            if let Some(p) = model
                .required_predecessors(op)
                .iter()
                .filter(|p| p.support >= cfg.precedent_min_support)
                .find(|p| !seen.contains(&p.op))
            {
                s[1] = s[1].max(p.score);
            }
            steps.push(op);
            seen.insert(op);
            run_op = Some(op);
            last_req = Some((r.page, r.item));
            run = 1;
            step = 1;
            varied = false;
        }
        if keep_trace {
            trace.push(s);
        }
    }
    (s, trace)
}

/// `--dump PREFIX`: one line per held-out session of a seed in `PREFIX.SEED` (tab-separated),
/// to see which sessions set a threshold and which attacks fall below it.
struct Dump(std::io::BufWriter<std::fs::File>);

impl Dump {
    fn create(prefix: &std::path::Path, seed: u64) -> anyhow::Result<Dump> {
        use std::io::Write as _;
        let path = format!("{}.{seed}", prefix.display());
        let f = std::fs::File::create(&path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
        let mut w = std::io::BufWriter::new(f);
        writeln!(
            w,
            "kind\trequests\tlongest_identical_run_page\ttemplated\tlongest_identical_run\t{}",
            SCORES.join("\t")
        )?;
        Ok(Dump(w))
    }

    fn write(&mut self, s: &Session, scores: &[f64; NS]) -> anyhow::Result<()> {
        use std::io::Write as _;
        // The longest run of identical requests (same page and item) and its page.
        let (mut best, mut page, mut run) = (0usize, 0u32, 0usize);
        for (i, r) in s.reqs.iter().enumerate() {
            let same = i > 0 && (r.page, r.item) == (s.reqs[i - 1].page, s.reqs[i - 1].item);
            run = if same { run + 1 } else { 1 };
            if run > best {
                (best, page) = (run, r.page);
            }
        }
        let scores: Vec<String> = scores.iter().map(|x| format!("{x:.4}")).collect();
        writeln!(
            self.0,
            "{:?}\t{}\t{page}\t{}\t{best}\t{}",
            s.kind,
            s.reqs.len(),
            templated(page),
            scores.join("\t")
        )?;
        Ok(())
    }
}

struct SeedResult {
    scored: Vec<Scored>,
    benign_requests: u64,
    benign_alerts: u64,
    precedences: usize,
}

fn run_seed(
    sessions: &[Vec<u32>],
    precedences: &[(u32, u32)],
    train_share: f64,
    per_kind: usize,
    seed: u64,
    dump: Option<&std::path::Path>,
) -> anyhow::Result<SeedResult> {
    let mut rng = Rng(seed);
    let split = (sessions.len() as f64 * train_share) as usize;
    let (train, holdout) = sessions.split_at(split);
    let mut engine = Engine::new(
        &EngineConfig::default(),
        RuleFile::default(),
        [7; 16],
        Mode::Learn,
    )?;
    let mut t = T0;
    let mut sid = 0u64;
    let feed = |engine: &mut Engine, reqs: &[Req], t: &mut u64, sid: &mut u64| {
        *sid += 1;
        let id = format!("s{sid}");
        let client = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (*sid as u32 & 0xff_ffff)));
        let mut alerts: Vec<(usize, Signal)> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let before = *t / SECOND;
            *t += STEP_NS;
            if *t / SECOND > before {
                engine.maintain(*t);
            }
            let out =
                engine.on_request_in_session(*t, client, Method::Get, None, &path(*r), &id, 0);
            alerts.extend(out.alerts.iter().filter_map(|a| a.signal.map(|s| (i, s))));
        }
        alerts
    };
    let started = Instant::now();
    let mut train_requests = 0;
    for s in train {
        let reqs = with_items(s, &mut rng);
        train_requests += reqs.len();
        feed(&mut engine, &reqs, &mut t, &mut sid);
    }
    eprintln!(
        "  seed {seed}: trained on {} sessions, {train_requests} requests in {:.1}s; {} operations, {} contexts",
        train.len(),
        started.elapsed().as_secs_f64(),
        engine.discovery().len(),
        engine.model().contexts()
    );
    let mut frozen = engine.model().clone();
    let discovery = engine.discovery();
    let knowledge = learn_knowledge(train, precedences.to_vec(), &frozen, discovery);
    let reference = PlainRuns::fit(sessions);

    let mut mix: Vec<Session> = holdout
        .iter()
        .map(|s| Session {
            kind: Kind::Benign,
            campaign: None,
            reqs: with_items(s, &mut rng),
        })
        .collect();
    mix.extend(inject(&knowledge, holdout, per_kind, &mut rng));
    rng.shuffle(&mut mix);

    let cfg = SignalConfig::default();
    let population_bits = frozen.population().mean;
    let mut scored = Vec::with_capacity(mix.len());
    for s in &mix {
        let (scores, trace) = frozen_scores(
            &mut frozen,
            engine.discovery(),
            &s.reqs,
            s.kind != Kind::Benign,
            &cfg,
            population_bits,
        );
        scored.push((scores, trace));
    }
    engine.set_mode(Mode::Detect);
    let (mut benign_requests, mut benign_alerts) = (0, 0);
    let mut out = Vec::with_capacity(mix.len());
    let mut dump = match dump {
        Some(prefix) => Some(Dump::create(prefix, seed)?),
        None => None,
    };
    for (s, (scores, trace)) in mix.iter().zip(scored) {
        if let Some(d) = dump.as_mut() {
            d.write(s, &scores)?;
        }
        let alerts = feed(&mut engine, &s.reqs, &mut t, &mut sid);
        if s.kind == Kind::Benign {
            benign_requests += s.reqs.len() as u64;
            benign_alerts += alerts.len() as u64;
        }
        let mut first = BTreeMap::new();
        for (i, sig) in &alerts {
            first.entry(sig.as_str()).or_insert(*i);
        }
        out.push(Scored {
            kind: s.kind,
            campaign: s.campaign.map(|c| c + seed as usize * 1_000_000),
            scores,
            trace,
            alerts: first,
            reference: reference.score(&s.reqs),
        });
    }
    Ok(SeedResult {
        scored: out,
        benign_requests,
        benign_alerts,
        precedences: knowledge.precedences.len(),
    })
}

/// Benign-tail p-value of each score: share of benign sessions scoring at least as high.
/// Each signal is one test of the combined score. Only ranks count, so the combined score does
/// not depend on where each signal's firing point sits (merging two signals' excesses into one
/// column, as this did before, made the result move with the replay threshold).
struct Tails {
    sorted: [Vec<f64>; NS],
}

impl Tails {
    fn new(benign: &[&Scored]) -> Tails {
        Tails {
            sorted: std::array::from_fn(|j| {
                let mut v: Vec<f64> = benign.iter().map(|s| s.scores[j]).collect();
                v.sort_by(f64::total_cmp);
                v
            }),
        }
    }
    fn tail(v: &[f64], x: f64) -> f64 {
        let below = v.partition_point(|&b| b < x);
        (v.len() - below) as f64 / v.len() as f64
    }
    /// The combined score: 1 − the smallest tail p-value (higher is more anomalous).
    fn combined(&self, s: &[f64; NS]) -> f64 {
        let p = (0..NS)
            .filter(|&j| s[j] > 0.0)
            .map(|j| Self::tail(&self.sorted[j], s[j]))
            .fold(1.0, f64::min);
        1.0 - p
    }
}

/// The smallest threshold with at most `fpr` of benign scores strictly above it.
fn threshold(benign: &mut [f64], fpr: f64) -> f64 {
    benign.sort_by(f64::total_cmp);
    let allowed = (fpr * benign.len() as f64).floor() as usize;
    benign[benign.len() - 1 - allowed.min(benign.len() - 1)]
}

fn quantile(v: &mut [usize], q: f64) -> Option<usize> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1])
}

fn pct(x: usize, n: usize) -> String {
    if n == 0 {
        "-".into()
    } else {
        format!("{:.3}", x as f64 / n as f64)
    }
}

fn main() -> anyhow::Result<()> {
    let mut data = PathBuf::from("../shared/data/fifa-sessions.dat");
    let (mut seeds, mut per_kind, mut train_share) = (3u64, 200usize, 0.7f64);
    let mut limit = usize::MAX;
    let mut dump: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--data" => data = PathBuf::from(val()?),
            "--seeds" => seeds = val()?.parse()?,
            "--per-kind" => per_kind = val()?.parse()?,
            "--train-share" => train_share = val()?.parse()?,
            "--sessions" => limit = val()?.parse()?,
            "--dump" => dump = Some(PathBuf::from(val()?)),
            other => anyhow::bail!(
                "unknown argument {other}; use --data PATH --seeds N --per-kind N --train-share F --sessions N --dump PREFIX"
            ),
        }
    }
    let text = std::fs::read_to_string(&data).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e}; pass --data PATH to fifa-sessions.dat",
            data.display()
        )
    })?;
    let mut sessions: Vec<Vec<u32>> = text
        .lines()
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect::<Vec<u32>>()
        })
        .filter(|s| !s.is_empty())
        .take(limit)
        .collect();
    let split = (sessions.len() as f64 * train_share) as usize;
    let mut precedences = data_precedences(&sessions[..split]);
    let found = precedences.len();
    if found < 5 {
        precedences = plant_precedences(&mut sessions, 5);
        let again = data_precedences(&sessions[..split]);
        precedences.retain(|p| again.contains(p));
    }
    println!(
        "Strong precedences (A before B in >= 95% of B's visits): {found} in the FIFA traffic{}",
        if found < 5 {
            format!(
                "; planted {} (a new page A before popular page B) for the skipped-step attack",
                precedences.len()
            )
        } else {
            String::new()
        }
    );
    eprintln!(
        "eval: {} sessions from {}, {seeds} seeds, {per_kind} injected sessions per kind and seed, first {:.0}% to learn",
        sessions.len(),
        data.display(),
        train_share * 100.0
    );

    let (mut benign_requests, mut benign_alerts) = (0, 0);
    let mut thresholds_by_seed = Vec::new();
    for seed in 1..=seeds {
        let r = run_seed(
            &sessions,
            &precedences,
            train_share,
            per_kind,
            seed,
            dump.as_deref(),
        )?;
        eprintln!(
            "  seed {seed}: {} strong precedences to skip",
            r.precedences
        );
        benign_requests += r.benign_requests;
        benign_alerts += r.benign_alerts;
        thresholds_by_seed.push(r.scored);
    }

    // Thresholds per seed (each seed's own benign held-out set), results pooled.
    struct Row {
        n: usize,
        det: [[usize; 2]; NS + 3], // per score, combined, engine (any), engine (blocking signals)
        delay_combined: Vec<usize>,
        delay_engine: Vec<usize>,
        by_signal: BTreeMap<&'static str, usize>,
        /// Detected by the in-sample reference ([`PlainRuns`]) at 0.1% and 1%.
        reference: [usize; 2],
    }
    let mut rows: BTreeMap<Kind, Row> = BTreeMap::new();
    let mut campaigns: HashMap<usize, [bool; 3]> = HashMap::new();
    let mut means: BTreeMap<Kind, ([f64; NS], usize)> = BTreeMap::new();
    for scored in thresholds_by_seed {
        let benign: Vec<&Scored> = scored.iter().filter(|s| s.kind == Kind::Benign).collect();
        let tails = Tails::new(&benign);
        let mut th = [[0.0f64; 2]; NS + 1];
        for (j, row) in th.iter_mut().enumerate() {
            for (f, fpr) in [0.001, 0.01].into_iter().enumerate() {
                let mut v: Vec<f64> = benign
                    .iter()
                    .map(|s| {
                        if j < NS {
                            s.scores[j]
                        } else {
                            tails.combined(&s.scores)
                        }
                    })
                    .collect();
                row[f] = threshold(&mut v, fpr);
            }
        }
        let reference_th = [0.001, 0.01].map(|fpr| {
            let mut v: Vec<f64> = benign.iter().map(|s| s.reference).collect();
            threshold(&mut v, fpr)
        });
        for s in &scored {
            let row = rows.entry(s.kind).or_insert_with(|| Row {
                n: 0,
                det: [[0; 2]; NS + 3],
                delay_combined: Vec::new(),
                delay_engine: Vec::new(),
                by_signal: BTreeMap::new(),
                reference: [0; 2],
            });
            row.n += 1;
            for (hits, t) in row.reference.iter_mut().zip(reference_th) {
                *hits += usize::from(s.reference > t);
            }
            let m = means.entry(s.kind).or_insert(([0.0; NS], 0));
            for j in 0..NS {
                m.0[j] += s.scores[j];
            }
            m.1 += 1;
            let combined = tails.combined(&s.scores);
            let mut hit = [false; 3];
            for f in 0..2 {
                for (j, (score, t)) in s.scores.iter().zip(&th).enumerate() {
                    if *score > t[f] {
                        row.det[j][f] += 1;
                    }
                }
                if combined > th[NS][f] {
                    row.det[NS][f] += 1;
                    hit[f] = true;
                }
            }
            if !s.alerts.is_empty() {
                row.det[NS + 1][0] += 1;
                row.det[NS + 1][1] += 1;
                hit[2] = true;
                row.delay_engine
                    .push(s.alerts.values().copied().min().unwrap_or(0) + 1);
            }
            if ["missing_precedent", "replay", "enumeration"]
                .iter()
                .any(|k| s.alerts.contains_key(k))
            {
                row.det[NS + 2][0] += 1;
            }
            for sig in s.alerts.keys() {
                *row.by_signal.entry(sig).or_default() += 1;
            }
            if let Some(i) = s
                .trace
                .iter()
                .position(|step| tails.combined(step) > th[NS][1])
            {
                row.delay_combined.push(i + 1);
            }
            if let Some(c) = s.campaign {
                let e = campaigns.entry(c).or_default();
                for k in 0..3 {
                    e[k] |= hit[k];
                }
            }
        }
    }

    println!();
    println!(
        "Detection per attack kind (thresholds set on each seed's benign held-out sessions; pooled over seeds)"
    );
    println!(
        "{:<26} {:>6} {:>10} {:>10} {:>9} {:>9} {:>12} {:>12}",
        "kind", "n", "det@0.1%", "det@1%", "engine", "eng-block", "req med/p90", "eng med/p90"
    );
    for (kind, row) in &rows {
        let (mut dc, mut de) = (row.delay_combined.clone(), row.delay_engine.clone());
        let fmt = |v: &mut Vec<usize>| match (quantile(v, 0.5), quantile(v, 0.9)) {
            (Some(a), Some(b)) => format!("{a}/{b}"),
            _ => "-".into(),
        };
        println!(
            "{:<26} {:>6} {:>10} {:>10} {:>9} {:>9} {:>12} {:>12}",
            kind.name(),
            row.n,
            pct(row.det[NS][0], row.n),
            pct(row.det[NS][1], row.n),
            pct(row.det[NS + 1][0], row.n),
            pct(row.det[NS + 2][0], row.n),
            if *kind == Kind::Benign {
                "-".into()
            } else {
                fmt(&mut dc)
            },
            if *kind == Kind::Benign {
                "-".into()
            } else {
                fmt(&mut de)
            },
        );
    }
    let n_campaigns = campaigns.len();
    let caught = |k: usize| campaigns.values().filter(|c| c[k]).count();
    println!(
        "{:<26} {:>6} {:>10} {:>10} {:>9}   (a campaign counts as caught when any of its {CAMPAIGN} sessions is)",
        "slow scraping campaigns",
        n_campaigns,
        pct(caught(0), n_campaigns),
        pct(caught(1), n_campaigns),
        pct(caught(2), n_campaigns)
    );
    // What bounds page replays: benign visitors reload plain pages too, and at 0.1% false
    // positives the threshold may pass only a handful of them.
    let holdout = &sessions[(sessions.len() as f64 * train_share) as usize..];
    let reloads = |min: usize| {
        holdout
            .iter()
            .filter(|s| {
                s.chunk_by(|a, b| a == b)
                    .any(|run| run.len() >= min && !templated(run[0]))
            })
            .count()
    };
    println!(
        "benign held-out sessions with a run of identical requests to a plain page: {} of {} with 5 or more, {} with 12 or more ({} sessions make 0.1%)",
        reloads(5),
        holdout.len(),
        reloads(12),
        holdout.len() / 1000
    );
    if let Some(row) = rows.get(&Kind::ReplayPage) {
        println!(
            "in-sample reference for page replays: runs of each plain page counted over every session, held-out ones included, detect {} at 0.1% and {} at 1% (what judging runs alone could reach knowing the benign sessions that set the thresholds)",
            pct(row.reference[0], row.n),
            pct(row.reference[1], row.n)
        );
    }
    println!();
    println!(
        "Per signal: detection at 0.1%/1% FPR of each frozen-model score, and sessions with an engine alert of that signal"
    );
    print!("{:<26}", "kind");
    for s in SCORES {
        print!(" {s:>13}");
    }
    for s in Signal::ALL {
        print!(" {:>18}", s.as_str());
    }
    println!();
    for (kind, row) in &rows {
        print!("{:<26}", kind.name());
        for d in &row.det[..NS] {
            print!(
                " {:>13}",
                format!("{}/{}", pct(d[0], row.n), pct(d[1], row.n))
            );
        }
        for s in Signal::ALL {
            print!(
                " {:>18}",
                pct(row.by_signal.get(s.as_str()).copied().unwrap_or(0), row.n)
            );
        }
        println!();
    }
    println!();
    println!(
        "Mean frozen-model scores per kind (rare: -log10 of the upper bound of the rarest transition's tail share in its context; precedent: best missing predecessor's score; replay: the longest run of identical requests' excess over the replay signal's firing point (1 = fires); surprise: max over prefixes of (mean bits - population mean) x sqrt(steps); enumeration: the longest step of varied requests' excess over the enumeration signal's firing point)"
    );
    for (kind, m) in &means {
        let n = m.1.max(1) as f64;
        println!(
            "{:<26} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
            kind.name(),
            m.0[0] / n,
            m.0[1] / n,
            m.0[2] / n,
            m.0[3] / n,
            m.0[4] / n
        );
    }
    let benign = &rows[&Kind::Benign];
    println!();
    println!(
        "Engine at default thresholds on benign held-out traffic: {} alerts on {} requests ({:.4}% of requests), {} of {} sessions alerted ({:.3}%)",
        benign_alerts,
        benign_requests,
        100.0 * benign_alerts as f64 / benign_requests.max(1) as f64,
        benign.det[NS + 1][0],
        benign.n,
        100.0 * benign.det[NS + 1][0] as f64 / benign.n.max(1) as f64
    );
    println!(
        "det@X% = share of sessions whose combined score exceeds the threshold that flags X% of benign sessions; engine = share with any engine alert (default thresholds); eng-block = with a missing_precedent, replay or enumeration alert (the signals that block by default); req med/p90 = requests until the combined score crosses the 1% threshold; eng = requests until the first engine alert."
    );
    Ok(())
}
