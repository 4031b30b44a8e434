//! API discovery: request path → operation (host, method, path template) with a dense [`OpId`].
//!
//! Operator templates (config, OpenAPI) win; otherwise a per-level cardinality trie learns
//! which path positions are variables, with type heuristics for ids, UUIDs, hex and tokens.
//! Every structure is capped; what does not fit is counted and mapped to an overflow operation.
use std::{borrow::Cow, collections::HashMap, fmt};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use thiserror::Error;

use crate::http::Method;

mod path_cache;
use path_cache::PathCache;

/// Dense operation id (index into the operation table). Stable for the life of the state:
/// ids are never reused, even when an operation is merged into a template (see
/// [`Discovery::canonical`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpId(pub u32);

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op#{}", self.0)
    }
}

/// Name ↔ id resolution, implemented by [`Discovery`]; rules and the engine only need this.
pub trait OpResolver {
    /// The canonical operation an operation name refers to (see [`Discovery::resolve`]).
    fn resolve(&self, name: &str) -> Option<OpId>;
    /// The name an id was issued under.
    fn op_name(&self, id: OpId) -> Option<&str>;
    /// The operation `id` is now part of (itself unless it was merged into a template).
    fn canonical(&self, id: OpId) -> OpId;
    /// Changes whenever an operation is created or merged: re-resolve names when it moves.
    fn generation(&self) -> u64;
}

/// Placeholder names the type heuristics and the learner produce.
pub const PH_ID: &str = "{id}";
pub const PH_UUID: &str = "{uuid}";
pub const PH_HEX: &str = "{hex}";
pub const PH_TOKEN: &str = "{token}";
/// A position whose distinct values passed the cardinality threshold.
pub const PH_PARAM: &str = "{param}";
/// What did not fit under a cap.
pub const PH_OVERFLOW: &str = "{overflow}";
/// Segments beyond the depth cap.
pub const PH_REST: &str = "{rest}";

const TYPED: [&str; 4] = [PH_ID, PH_UUID, PH_HEX, PH_TOKEN];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Put the host in operation names (`GET api.example.com/x`). Off by default so a
    /// single-host API gets clean `GET /x` names; requests for every host then share one trie.
    pub include_host: bool,
    /// A position becomes `{param}` when the number of distinct values seen at it under the
    /// same parent passes this (the 21st distinct value with the default 20), and not before.
    pub cardinality_threshold: usize,
    /// Trie nodes (learned path positions) at most, not counting the root of each host (at
    /// most `max_hosts` + 1 more).
    pub max_nodes: usize,
    /// Operations at most (plus one overflow operation per method beyond it).
    pub max_ops: usize,
    /// Path segments looked at; deeper paths end in `{rest}`.
    pub max_depth: usize,
    /// Distinct hosts when `include_host` is on; more share the host `{overflow}`.
    pub max_hosts: usize,
    /// Operator path templates such as `/api/v1/accounts/{account_id}/balance`.
    pub templates: Vec<String>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            include_host: false,
            cardinality_threshold: 20,
            max_nodes: 50_000,
            max_ops: 10_000,
            max_depth: 16,
            max_hosts: 64,
            templates: Vec::new(),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DiscoveryError {
    #[error(
        "template {template:?}: {reason} (templates look like /api/v1/accounts/{{account_id}}/balance)"
    )]
    BadTemplate { template: String, reason: String },
    #[error("OpenAPI document could not be read: {0}")]
    OpenApi(String),
    #[error("too many templates ({0}); raise max_nodes or trim the document")]
    TooManyTemplates(usize),
}

/// Where an operation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpSource {
    Learned,
    Template,
    Overflow,
}

/// One row of `precedent endpoints`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OperationInfo {
    pub id: OpId,
    pub name: String,
    pub method: Method,
    pub count: u64,
    pub source: OpSource,
    /// Set when this operation was merged into a template: the operation it now counts as.
    pub merged_into: Option<OpId>,
}

/// Counters for `precedent status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveryStats {
    pub live_nodes: usize,
    pub operations: usize,
    /// Requests mapped to an overflow operation because a cap was reached.
    pub overflow_hits: u64,
    /// Paths deeper than `max_depth`.
    pub depth_capped: u64,
    /// Positions turned into `{param}` by the cardinality threshold.
    pub generalisations: u64,
    /// Hosts that did not fit under `max_hosts`.
    pub host_overflow_hits: u64,
}

/// How a path ends at a node: normally, in the node's `{overflow}`, or in its `{rest}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Tail {
    End,
    Overflow,
    Rest,
}

impl Tail {
    fn suffix(self) -> &'static str {
        match self {
            Tail::End => "",
            Tail::Overflow => PH_OVERFLOW,
            Tail::Rest => PH_REST,
        }
    }
}

/// Where an operation lives, enough to recompute its name and rebuild the indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Origin {
    Learned {
        node: u32,
        tail: Tail,
    },
    Template {
        host_root: u32,
        template: u32,
    },
    /// Per-method catch-all once the operation table is full.
    TableFull,
}

/// Maps keyed by path segments and hosts, which clients choose, looked up for every segment
/// of every request: foldhash with a per-process random seed (hashbrown's default hasher)
/// rather than std's SipHash, several times faster on short keys. A flood aimed at one map
/// is bounded anyway: a path position stops taking children at the cardinality threshold.
type SegMap<V> = HashMap<Box<str>, V, hashbrown::DefaultHashBuilder>;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OpEntry {
    name: Box<str>,
    method: Method,
    count: u64,
    origin: Origin,
    merged_into: Option<OpId>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Node {
    /// Segment text or placeholder, for names.
    label: Box<str>,
    parent: u32,
    depth: u16,
    live: bool,
    /// Concrete child segments (while the position is not a variable).
    children: SegMap<u32>,
    /// Children for `{id}`, `{uuid}`, `{hex}`, `{token}`.
    typed: [Option<u32>; 4],
    /// Once set, every value at this position goes here (children and typed are empty).
    var: Option<u32>,
    /// Operations ending here, by (method, tail); a handful at most.
    ops: SmallVec<[(Method, Tail, OpId); 2]>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TplNode {
    literals: SegMap<u32>,
    param: Option<u32>,
    terminal: Option<u32>,
}

/// The persisted part of [`Discovery`]; indexes are rebuilt from it on load.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    config: DiscoveryConfig,
    nodes: Vec<Node>,
    free: Vec<u32>,
    /// Host → root node (one root, key "", when hosts are not in names).
    roots: SegMap<u32>,
    ops: Vec<OpEntry>,
    templates: Vec<Box<str>>,
    tpl_nodes: Vec<TplNode>,
    stats: DiscoveryStats,
    generation: u64,
}

/// Path → operation mapper. See the module docs; serialise it to persist what was learned.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "State", into = "State")]
pub struct Discovery {
    s: State,
    by_name: HashMap<Box<str>, OpId>,
    /// Name with every `{…}` emptied to `{}`, so a rule's `{account_id}` finds a learned `{id}`.
    by_shape: HashMap<Box<str>, OpId>,
    template_ops: FxHashMap<(u32, u32, Method), OpId>,
    table_full_ops: [Option<OpId>; Method::ALL.len()],
    /// Requests whose walk is known, by raw path (see `path_cache`); off only in tests that
    /// compare it with the walk.
    paths: PathCache,
    use_path_cache: bool,
}

impl From<State> for Discovery {
    fn from(s: State) -> Self {
        let mut d = Discovery {
            s,
            by_name: HashMap::new(),
            by_shape: HashMap::new(),
            template_ops: FxHashMap::default(),
            table_full_ops: [None; Method::ALL.len()],
            paths: PathCache::default(),
            use_path_cache: true,
        };
        for i in 0..d.s.ops.len() {
            d.index_op(OpId(i as u32));
        }
        d
    }
}

impl State {
    /// What every state built by [`Discovery`] satisfies and the code relies on: indexes in
    /// range, the trie a tree (each live node reached once from the roots, through its parent),
    /// merge chains without cycles (so `canonical` ends), the live count right.
    fn check(&self) -> Result<(), String> {
        let c = &self.config;
        if c.cardinality_threshold == 0 || c.max_depth == 0 || c.max_nodes < 2 {
            return Err("discovery config with a zero threshold, depth or node cap".into());
        }
        let (nodes, ops) = (self.nodes.len(), self.ops.len());
        let mut seen = vec![false; nodes];
        let mut stack: Vec<(u32, u32)> = self.roots.values().map(|&r| (r, u32::MAX)).collect();
        while let Some((n, parent)) = stack.pop() {
            let Some(node) = self.nodes.get(n as usize) else {
                return Err(format!("trie node {n} out of range ({nodes} nodes)"));
            };
            if std::mem::replace(&mut seen[n as usize], true) {
                return Err(format!("trie node {n} reached twice"));
            }
            if !node.live || node.parent != parent {
                return Err(format!(
                    "trie node {n}: not live, or not its parent's child"
                ));
            }
            if let Some((_, _, op)) = node.ops.iter().find(|(_, _, op)| op.0 as usize >= ops) {
                return Err(format!("trie node {n} names operation {op} of {ops}"));
            }
            let kids = node.children.values().chain(node.typed.iter().flatten());
            stack.extend(kids.chain(&node.var).map(|&k| (k, n)));
        }
        let reached = seen.iter().filter(|&&s| s).count();
        let live = self.nodes.iter().filter(|n| n.live).count();
        if reached != live || live != self.stats.live_nodes {
            return Err(format!(
                "{live} live trie nodes, {reached} reachable, {} counted",
                self.stats.live_nodes
            ));
        }
        let mut free = vec![false; nodes];
        for &f in &self.free {
            match free.get_mut(f as usize) {
                Some(slot) if !*slot && !self.nodes[f as usize].live => *slot = true,
                _ => {
                    return Err(format!(
                        "free slot {f} is out of range, live or listed twice"
                    ));
                }
            }
        }
        for (i, o) in self.ops.iter().enumerate() {
            let ok = match o.origin {
                Origin::Learned { node, .. } => (node as usize) < nodes,
                Origin::Template {
                    host_root,
                    template,
                } => {
                    (host_root as usize) < nodes.max(1)
                        && (template as usize) < self.templates.len()
                }
                Origin::TableFull => true,
            };
            if !ok || o.merged_into.is_some_and(|m| m.0 as usize >= ops) {
                return Err(format!(
                    "operation {i} ({:?}) points outside the state",
                    o.name
                ));
            }
        }
        // Merge chains must end, or canonical() loops: walk each once (0 new, 1 on the walk in
        // progress, 2 known to end).
        let mut mark = vec![0u8; ops];
        for start in 0..ops {
            let mut walk = Vec::new();
            let mut at = Some(start);
            while let Some(i) = at.filter(|&i| mark[i] != 2) {
                if mark[i] == 1 {
                    return Err(format!(
                        "operation {i} is merged into itself through a cycle"
                    ));
                }
                mark[i] = 1;
                walk.push(i);
                at = self.ops[i].merged_into.map(|m| m.0 as usize);
            }
            walk.into_iter().for_each(|i| mark[i] = 2);
        }
        let tpls = self.tpl_nodes.len();
        if tpls == 0 {
            return Err("no template root".into());
        }
        for (i, t) in self.tpl_nodes.iter().enumerate() {
            let kids_ok = t
                .literals
                .values()
                .chain(&t.param)
                .all(|&k| (k as usize) < tpls);
            if !kids_ok
                || t.terminal
                    .is_some_and(|x| x as usize >= self.templates.len())
            {
                return Err(format!("template node {i} points outside the state"));
            }
        }
        Ok(())
    }
}

impl From<Discovery> for State {
    fn from(d: Discovery) -> Self {
        d.s
    }
}

impl Discovery {
    /// A fresh mapper with the config's operator templates compiled in.
    pub fn new(mut config: DiscoveryConfig) -> Result<Self, DiscoveryError> {
        // A threshold of 0 would make every position a variable; depth 0 would learn nothing.
        config.cardinality_threshold = config.cardinality_threshold.max(1);
        config.max_depth = config.max_depth.max(1);
        config.max_nodes = config.max_nodes.max(2);
        let templates = config.templates.clone();
        let mut d = Discovery::from(State {
            config,
            nodes: Vec::new(),
            free: Vec::new(),
            roots: SegMap::default(),
            ops: Vec::new(),
            templates: Vec::new(),
            tpl_nodes: vec![TplNode::default()],
            stats: DiscoveryStats::default(),
            generation: 0,
        });
        for t in &templates {
            d.add_template(t)?;
        }
        Ok(d)
    }

    pub fn config(&self) -> &DiscoveryConfig {
        &self.s.config
    }

    /// Applies the configured settings to endpoints loaded from a file, which carry the
    /// settings they were saved with: the threshold, caps and depth govern what is learned from
    /// now on (what was learned stays, within a lower cap too), and configured templates not
    /// compiled in yet are added (a template dropped from the config stays: operations were
    /// named after it). Whether names carry the host (`include_host`) stays as saved, and is
    /// returned when `cfg` differs (`precedent model reset` applies it).
    pub fn adopt_config(
        &mut self,
        cfg: &DiscoveryConfig,
    ) -> Result<Vec<&'static str>, DiscoveryError> {
        let saved_host = self.s.config.include_host;
        let mut templates = self.s.config.templates.clone();
        for t in &cfg.templates {
            self.add_template(t)?;
            if !templates.contains(t) {
                templates.push(t.clone());
            }
        }
        // Paths already walked may walk differently under the new threshold or depth.
        self.paths.invalidate();
        self.s.config = DiscoveryConfig {
            include_host: saved_host,
            cardinality_threshold: cfg.cardinality_threshold.max(1),
            max_depth: cfg.max_depth.max(1),
            max_nodes: cfg.max_nodes.max(2),
            templates,
            ..cfg.clone()
        };
        Ok(if cfg.include_host != saved_host {
            vec!["include_host"]
        } else {
            Vec::new()
        })
    }

    /// Whether a loaded state is one this code could have built (see `State::check`): the state
    /// file's loader refuses anything else as damaged instead of panicking or looping later.
    pub fn check(&self) -> Result<(), String> {
        self.s.check()
    }

    pub fn stats(&self) -> DiscoveryStats {
        let mut st = self.s.stats;
        st.operations = self.s.ops.len();
        st
    }

    /// Adds an operator template (path only; it applies to every method). Templates take
    /// precedence over learning and keep their placeholder names. Adding one does not move
    /// operations already learned: requests map to the template from now on.
    pub fn add_template(&mut self, template: &str) -> Result<(), DiscoveryError> {
        let segs = parse_template(template)?;
        if self.s.templates.len() >= self.s.config.max_nodes {
            return Err(DiscoveryError::TooManyTemplates(self.s.templates.len()));
        }
        // Templates win over learning: paths learned so far may now map to this one.
        self.paths.invalidate();
        let mut n = 0usize;
        for seg in &segs {
            let next = match seg {
                TplSeg::Param(_) => self.s.tpl_nodes[n].param,
                TplSeg::Literal(l) => self.s.tpl_nodes[n].literals.get(*l).copied(),
            };
            n = match next {
                Some(x) => x as usize,
                None => {
                    let id = self.s.tpl_nodes.len() as u32;
                    self.s.tpl_nodes.push(TplNode::default());
                    match seg {
                        TplSeg::Param(_) => self.s.tpl_nodes[n].param = Some(id),
                        TplSeg::Literal(l) => {
                            self.s.tpl_nodes[n].literals.insert((*l).into(), id);
                        }
                    }
                    id as usize
                }
            };
        }
        if self.s.tpl_nodes[n].terminal.is_none() {
            let canonical = canonical_template(&segs);
            self.s.tpl_nodes[n].terminal = Some(self.s.templates.len() as u32);
            self.s.templates.push(canonical.into());
        }
        Ok(())
    }

    /// Imports the path templates of an OpenAPI 3 document (JSON or YAML). Returns how many
    /// were added; paths the trie cannot express (a placeholder inside a segment, such as
    /// `/files/{name}.{ext}`) are skipped and listed in the second value.
    pub fn import_openapi(&mut self, doc: &str) -> Result<(usize, Vec<String>), DiscoveryError> {
        let spec = if doc.trim_start().starts_with('{') {
            oas3::from_json(doc).map_err(|e| DiscoveryError::OpenApi(e.to_string()))?
        } else {
            oas3::from_yaml(doc).map_err(|e| DiscoveryError::OpenApi(e.to_string()))?
        };
        // Paths are relative to the server URL: keep its path part when all servers agree.
        let base = server_base_path(spec.servers.iter().map(|s| s.url.as_str()));
        let (mut added, mut skipped) = (0, Vec::new());
        for path in spec.paths.iter().flat_map(|p| p.keys()) {
            let full = format!("{base}{path}");
            match self.add_template(&full) {
                Ok(()) => added += 1,
                Err(DiscoveryError::BadTemplate { .. }) => skipped.push(full),
                Err(e) => return Err(e),
            }
        }
        Ok((added, skipped))
    }

    /// Maps a request to its operation, learning from it and counting it. `host` is as sent
    /// (case and port are normalised away).
    pub fn observe(&mut self, host: Option<&str>, method: Method, path: &str) -> OpId {
        // The host only takes part in the mapping when it is in names.
        let cache_host = if self.s.config.include_host {
            host.unwrap_or("")
        } else {
            ""
        };
        if self.use_path_cache
            && let Some(id) = self.paths.get(method, cache_host, path)
        {
            self.s.ops[id.0 as usize].count += 1;
            return id;
        }
        let caps_hit =
            |st: &DiscoveryStats| (st.overflow_hits, st.host_overflow_hits, st.depth_capped);
        let before = caps_hit(&self.s.stats);
        let root = self.host_root(host);
        let segs = split_path(path);
        let (segs, deep) = if segs.len() > self.s.config.max_depth {
            self.s.stats.depth_capped += 1;
            (&segs[..self.s.config.max_depth], true)
        } else {
            (&segs[..], false)
        };
        let (id, literal) = if let Some(t) = self.match_template(segs, deep) {
            (self.template_op(root, t, method), false)
        } else {
            self.learn(root, segs, deep, method)
        };
        let id = self.canonical(id);
        self.s.ops[id.0 as usize].count += 1;
        // Cached only when the next walk of this path is sure to end at the same operation
        // and to count nothing else: through literal positions only (a variable position's
        // values are unbounded), and without a cap's overflow (counted on every request).
        if self.use_path_cache && literal && caps_hit(&self.s.stats) == before {
            self.paths.insert(method, cache_host, path, id);
        }
        id
    }

    /// The operation `id` now counts as: itself, or the template it was merged into when a
    /// position became a placeholder. Already-issued ids stay valid (their names still
    /// resolve), but new requests only ever get canonical ids; callers holding old ids (session
    /// histories, model contexts) should compare through this.
    pub fn canonical(&self, mut id: OpId) -> OpId {
        // Chains are short (one link per generalisation above the op) and acyclic (merging
        // never makes a cycle, and a loaded state is checked for one).
        while let Some(next) = self.s.ops.get(id.0 as usize).and_then(|o| o.merged_into) {
            id = next;
        }
        id
    }

    /// Canonical operation for a name: exact name first (including names of merged
    /// operations), then the same shape with any placeholder names.
    pub fn resolve(&self, name: &str) -> Option<OpId> {
        if let Some(&id) = self.by_name.get(name) {
            return Some(self.canonical(id));
        }
        self.by_shape
            .get(shape(name).as_ref())
            .map(|&id| self.canonical(id))
    }

    pub fn name(&self, id: OpId) -> Option<&str> {
        self.s.ops.get(id.0 as usize).map(|o| &*o.name)
    }

    pub fn len(&self) -> usize {
        self.s.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.s.ops.is_empty()
    }

    /// Every operation ever issued, by id; filter on `merged_into.is_none()` for the live map.
    pub fn operations(&self) -> Vec<OperationInfo> {
        self.s
            .ops
            .iter()
            .enumerate()
            .map(|(i, o)| OperationInfo {
                id: OpId(i as u32),
                name: o.name.to_string(),
                method: o.method,
                count: o.count,
                source: match o.origin {
                    Origin::Learned {
                        tail: Tail::End, ..
                    } => OpSource::Learned,
                    Origin::Learned { .. } | Origin::TableFull => OpSource::Overflow,
                    Origin::Template { .. } => OpSource::Template,
                },
                merged_into: o.merged_into,
            })
            .collect()
    }

    // ---- internals ----

    fn host_root(&mut self, host: Option<&str>) -> u32 {
        let key: Cow<'_, str> = if self.s.config.include_host {
            normalise_host(host.unwrap_or(""))
        } else {
            Cow::Borrowed("")
        };
        if let Some(&r) = self.s.roots.get(key.as_ref()) {
            return r;
        }
        let key: Cow<'_, str> = if self.s.roots.len() >= self.s.config.max_hosts {
            self.s.stats.host_overflow_hits += 1;
            Cow::Borrowed(PH_OVERFLOW)
        } else {
            key
        };
        if let Some(&r) = self.s.roots.get(key.as_ref()) {
            return r;
        }
        let label: Box<str> = key.as_ref().into();
        let r = self.alloc(Node {
            label,
            parent: u32::MAX,
            ..Node::default()
        });
        self.s.roots.insert(key.as_ref().into(), r);
        r
    }

    /// The path-position nodes (every live node but the host roots) have reached `max_nodes`.
    /// Roots are bounded apart (at most `max_hosts` + the overflow host): counting them against
    /// the cap let a new host's root push the trie one node past it (found by fuzzing).
    fn positions_full(&self) -> bool {
        self.s.stats.live_nodes.saturating_sub(self.s.roots.len()) >= self.s.config.max_nodes
    }

    fn alloc(&mut self, mut node: Node) -> u32 {
        node.live = true;
        self.s.stats.live_nodes += 1;
        if let Some(i) = self.s.free.pop() {
            self.s.nodes[i as usize] = node;
            i
        } else {
            self.s.nodes.push(node);
            (self.s.nodes.len() - 1) as u32
        }
    }

    fn release(&mut self, i: u32) {
        self.paths.invalidate();
        self.s.nodes[i as usize] = Node::default();
        self.s.stats.live_nodes -= 1;
        self.s.free.push(i);
    }

    fn match_template(&self, segs: &[Cow<'_, str>], deep: bool) -> Option<u32> {
        if self.s.templates.is_empty() || deep {
            return None;
        }
        fn walk(t: &[TplNode], n: usize, segs: &[Cow<'_, str>]) -> Option<u32> {
            let Some((first, rest)) = segs.split_first() else {
                return t[n].terminal;
            };
            if let Some(&c) = t[n].literals.get(first.as_ref())
                && let Some(hit) = walk(t, c as usize, rest)
            {
                return Some(hit);
            }
            t[n].param.and_then(|c| walk(t, c as usize, rest))
        }
        walk(&self.s.tpl_nodes, 0, segs)
    }

    fn template_op(&mut self, root: u32, template: u32, method: Method) -> OpId {
        let host_root = if self.s.config.include_host { root } else { 0 };
        if let Some(&id) = self.template_ops.get(&(host_root, template, method)) {
            return id;
        }
        let name = format!(
            "{} {}{}",
            method,
            self.host_prefix(root),
            self.s.templates[template as usize]
        );
        self.new_op(
            name,
            method,
            Origin::Template {
                host_root,
                template,
            },
        )
    }

    fn host_prefix(&self, root: u32) -> &str {
        if self.s.config.include_host {
            &self.s.nodes[root as usize].label
        } else {
            ""
        }
    }

    /// The operation for `segs` under `root`, and whether the walk went through literal
    /// positions only (see `observe`).
    fn learn(
        &mut self,
        root: u32,
        segs: &[Cow<'_, str>],
        deep: bool,
        method: Method,
    ) -> (OpId, bool) {
        let mut n = root;
        let mut tail = if deep { Tail::Rest } else { Tail::End };
        let mut literal = true;
        for seg in segs {
            match self.descend(n, seg) {
                Some((c, lit)) => {
                    n = c;
                    literal &= lit;
                }
                None => {
                    tail = Tail::Overflow;
                    self.s.stats.overflow_hits += 1;
                    literal = false;
                    break;
                }
            }
        }
        (self.node_op(n, tail, method), literal)
    }

    /// Child of `n` for `seg`, creating or generalising as needed, and whether it is the
    /// segment's own literal child; `None` when the node cap leaves no room (the caller ends
    /// the path in `{overflow}`).
    fn descend(&mut self, n: u32, seg: &str) -> Option<(u32, bool)> {
        let node = &self.s.nodes[n as usize];
        if let Some(v) = node.var {
            return Some((v, false));
        }
        let depth = node.depth + 1;
        if let Some(kind) = classify(seg) {
            if let Some(c) = node.typed[kind] {
                return Some((c, false));
            }
            if self.positions_full() {
                return None;
            }
            let c = self.alloc(Node {
                label: TYPED[kind].into(),
                parent: n,
                depth,
                ..Node::default()
            });
            self.s.nodes[n as usize].typed[kind] = Some(c);
            return Some((c, false));
        }
        if let Some(&c) = node.children.get(seg) {
            return Some((c, true));
        }
        if node.children.len() >= self.s.config.cardinality_threshold {
            return Some((self.generalise(n), false));
        }
        if self.positions_full() {
            return None;
        }
        let c = self.alloc(Node {
            label: seg.into(),
            parent: n,
            depth,
            ..Node::default()
        });
        self.s.nodes[n as usize].children.insert(seg.into(), c);
        Some((c, true))
    }

    /// Turns position `n`'s children into one `{param}` child: their subtrees are merged into
    /// it and every operation under them is re-issued under its new name, the old id marked
    /// `merged_into` the new one.
    fn generalise(&mut self, n: u32) -> u32 {
        // Paths through `n` now map elsewhere.
        self.paths.invalidate();
        self.s.stats.generalisations += 1;
        let depth = self.s.nodes[n as usize].depth + 1;
        // One extra node while merging; the merge frees at least as many as it adds.
        let var = self.alloc(Node {
            label: PH_PARAM.into(),
            parent: n,
            depth,
            ..Node::default()
        });
        let node = &mut self.s.nodes[n as usize];
        node.var = Some(var);
        let children = sorted_children(&mut node.children);
        let typed: Vec<u32> = node.typed.iter_mut().filter_map(Option::take).collect();
        for c in children.into_iter().chain(typed) {
            self.merge(var, c);
        }
        self.rename_subtree(var);
        var
    }

    /// Moves `src`'s subtree and operations into `dst`, then frees `src`.
    fn merge(&mut self, dst: u32, src: u32) {
        let mut s = std::mem::take(&mut self.s.nodes[src as usize]);
        for (key_method, key_tail, op) in s.ops.drain(..) {
            let existing = self.s.nodes[dst as usize]
                .ops
                .iter()
                .find(|(m, t, _)| *m == key_method && *t == key_tail)
                .map(|e| e.2);
            match existing {
                Some(keep) => self.merge_op(op, keep),
                None => {
                    self.s.ops[op.0 as usize].origin = Origin::Learned {
                        node: dst,
                        tail: key_tail,
                    };
                    self.s.nodes[dst as usize]
                        .ops
                        .push((key_method, key_tail, op));
                }
            }
        }
        if let Some(v) = s.var {
            self.merge_child(dst, None, v);
        }
        for (k, c) in s.typed.iter().enumerate() {
            if let Some(c) = *c {
                self.merge_child(dst, Some(TYPED[k]), c);
            }
        }
        let mut children: Vec<(Box<str>, u32)> = s.children.drain().collect();
        children.sort_unstable();
        for (seg, c) in children {
            self.merge_child(dst, Some(&seg), c);
        }
        // `src`'s slot was emptied by the take above; return it to the free list.
        self.release(src);
    }

    /// Re-attaches child `c` (labelled `seg`, or a `{param}` when `None`) under `dst`.
    fn merge_child(&mut self, dst: u32, seg: Option<&str>, c: u32) {
        if let Some(v) = self.s.nodes[dst as usize].var {
            return self.merge(v, c);
        }
        let typed_kind = seg.and_then(|s| TYPED.iter().position(|t| *t == s));
        let d = &mut self.s.nodes[dst as usize];
        match (seg, typed_kind) {
            (None, _) => {
                // A variable position merged into a concrete one: dst becomes variable too.
                d.var = Some(c);
                let children = sorted_children(&mut d.children);
                let typed: Vec<u32> = d.typed.iter_mut().filter_map(Option::take).collect();
                self.s.nodes[c as usize].parent = dst;
                for x in children.into_iter().chain(typed) {
                    self.merge(c, x);
                }
            }
            (Some(_), Some(k)) => match d.typed[k] {
                Some(existing) => self.merge(existing, c),
                None => {
                    d.typed[k] = Some(c);
                    self.s.nodes[c as usize].parent = dst;
                }
            },
            (Some(seg), None) => match d.children.get(seg).copied() {
                Some(existing) => self.merge(existing, c),
                None => {
                    d.children.insert(seg.into(), c);
                    self.s.nodes[c as usize].parent = dst;
                    if self.s.nodes[dst as usize].children.len()
                        > self.s.config.cardinality_threshold
                    {
                        self.generalise(dst);
                    }
                }
            },
        }
    }

    fn merge_op(&mut self, from: OpId, into: OpId) {
        // Already one operation: a name reached again from another node (the table-full
        // operation, a literal segment spelled like a placeholder) leads a merge back to where it
        // started, and merging an operation into its own chain would make `canonical` loop.
        if self.canonical(from) == self.canonical(into) {
            return;
        }
        let count = std::mem::take(&mut self.s.ops[from.0 as usize].count);
        self.s.ops[into.0 as usize].count += count;
        self.s.ops[from.0 as usize].merged_into = Some(into);
        self.s.generation += 1;
        self.paths.invalidate();
    }

    /// After a merge, operations under `root` carry names of paths that no longer exist:
    /// re-issue each under the name its node has now.
    fn rename_subtree(&mut self, root: u32) {
        let mut stack = vec![root];
        while let Some(n) = stack.pop() {
            let node = &self.s.nodes[n as usize];
            let mut kids: Vec<(&Box<str>, &u32)> = node.children.iter().collect();
            kids.sort_unstable();
            stack.extend(kids.into_iter().map(|(_, c)| *c));
            stack.extend(node.typed.iter().flatten().copied());
            stack.extend(node.var);
            let ops: SmallVec<[(Method, Tail, OpId); 2]> = node.ops.clone();
            for (i, (method, tail, op)) in ops.into_iter().enumerate() {
                let name = self.learned_name(n, method, tail);
                if *self.s.ops[op.0 as usize].name == *name {
                    continue;
                }
                let new = match self
                    .by_name
                    .get(name.as_str())
                    .map(|&id| self.canonical(id))
                {
                    Some(id) if id != op => id,
                    _ => self.new_op(name, method, Origin::Learned { node: n, tail }),
                };
                self.merge_op(op, new);
                self.s.nodes[n as usize].ops[i].2 = new;
            }
        }
    }

    fn node_op(&mut self, n: u32, tail: Tail, method: Method) -> OpId {
        if let Some(&(_, _, id)) = self.s.nodes[n as usize]
            .ops
            .iter()
            .find(|(m, t, _)| *m == method && *t == tail)
        {
            return id;
        }
        let name = self.learned_name(n, method, tail);
        let id = self.new_op(name, method, Origin::Learned { node: n, tail });
        if matches!(self.s.ops[id.0 as usize].origin, Origin::Learned { .. }) {
            self.s.nodes[n as usize].ops.push((method, tail, id));
        }
        id
    }

    fn learned_name(&self, n: u32, method: Method, tail: Tail) -> String {
        let mut labels: SmallVec<[&str; 16]> = SmallVec::new();
        let mut cur = n;
        while self.s.nodes[cur as usize].parent != u32::MAX {
            labels.push(&self.s.nodes[cur as usize].label);
            cur = self.s.nodes[cur as usize].parent;
        }
        let mut name = format!("{method} {}", self.host_prefix(cur));
        for l in labels.iter().rev() {
            name.push('/');
            name.push_str(l);
        }
        if tail != Tail::End {
            name.push('/');
            name.push_str(tail.suffix());
        }
        if labels.is_empty() && tail == Tail::End {
            name.push('/');
        }
        name
    }

    /// Interns a new operation, or the per-method table-full operation past `max_ops`.
    fn new_op(&mut self, name: String, method: Method, origin: Origin) -> OpId {
        if let Some(&id) = self.by_name.get(name.as_str()) {
            // Same name from another origin (e.g. a learned path equal to a template).
            return self.canonical(id);
        }
        if self.s.ops.len() >= self.s.config.max_ops {
            self.s.stats.overflow_hits += 1;
            if let Some(id) = self.table_full_ops[method.index()] {
                return id;
            }
            return self.push_op(
                format!("{method} /{PH_OVERFLOW}"),
                method,
                Origin::TableFull,
            );
        }
        self.push_op(name, method, origin)
    }

    fn push_op(&mut self, name: String, method: Method, origin: Origin) -> OpId {
        let id = OpId(self.s.ops.len() as u32);
        self.s.ops.push(OpEntry {
            name: name.into(),
            method,
            count: 0,
            origin,
            merged_into: None,
        });
        self.s.generation += 1;
        self.index_op(id);
        id
    }

    fn index_op(&mut self, id: OpId) {
        let o = &self.s.ops[id.0 as usize];
        self.by_name.insert(o.name.clone(), id);
        if o.merged_into.is_none() {
            self.by_shape.insert(shape(&o.name).into(), id);
        }
        match o.origin {
            Origin::Template {
                host_root,
                template,
            } => {
                self.template_ops
                    .insert((host_root, template, o.method), id);
            }
            Origin::TableFull => self.table_full_ops[o.method.index()] = Some(id),
            Origin::Learned { .. } => {}
        }
    }
}

impl OpResolver for Discovery {
    fn resolve(&self, name: &str) -> Option<OpId> {
        Discovery::resolve(self, name)
    }
    fn op_name(&self, id: OpId) -> Option<&str> {
        self.name(id)
    }
    fn canonical(&self, id: OpId) -> OpId {
        Discovery::canonical(self, id)
    }
    fn generation(&self) -> u64 {
        self.s.generation
    }
}

/// Children in segment order: HashMap order is random per process, and merges must issue
/// operation ids in the same order on every run.
fn sorted_children(children: &mut SegMap<u32>) -> Vec<u32> {
    let mut v: Vec<(Box<str>, u32)> = children.drain().collect();
    v.sort_unstable();
    v.into_iter().map(|(_, c)| c).collect()
}

/// Lowercase, without the port (`API.example.com:8443` → `api.example.com`).
fn normalise_host(h: &str) -> Cow<'_, str> {
    let h = if h.starts_with('[') {
        // IPv6 literal: keep the brackets, drop the port after them.
        h.find(']').map_or(h, |i| &h[..=i])
    } else {
        h.rsplit_once(':').map_or(h, |(a, _)| a)
    };
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    }
}

/// Splits a path into normalised segments:
/// - empty segments go (`//`, trailing `/`): servers route `/a//b/` like `/a/b`;
/// - `.` and `..` are resolved (RFC 3986 §5.2.4), so `/a/../admin` is `/admin`;
/// - percent-escapes of unreserved characters are decoded and the hex of the others
///   uppercased (RFC 3986 §6.2.2): `/%7Euser` is `/~user`, but `%2F` stays an escape and
///   never creates a new segment.
fn split_path(path: &str) -> SmallVec<[Cow<'_, str>; 16]> {
    let mut out: SmallVec<[Cow<'_, str>; 16]> = SmallVec::new();
    // A byte scan: segments are short, and a searcher call per segment costs more than it.
    // '/' is ASCII, so every cut falls on a character boundary.
    let mut start = 0;
    let cuts = path
        .bytes()
        .enumerate()
        .filter(|&(_, b)| b == b'/')
        .map(|(i, _)| i)
        .chain(std::iter::once(path.len()));
    for end in cuts {
        let raw = &path[start..end];
        start = end + 1;
        let seg = if raw.contains('%') {
            normalise_escapes(raw)
        } else {
            Cow::Borrowed(raw)
        };
        match seg.as_ref() {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(seg),
        }
    }
    out
}

fn normalise_escapes(seg: &str) -> Cow<'_, str> {
    let b = seg.as_bytes();
    let mut out = String::with_capacity(seg.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2]))
        {
            let c = (h << 4) | l;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c as char);
            } else {
                out.push('%');
                out.push(b[i + 1].to_ascii_uppercase() as char);
                out.push(b[i + 2].to_ascii_uppercase() as char);
            }
            i += 3;
            continue;
        }
        // Copy one whole UTF-8 character.
        let ch = seg[i..].chars().next().unwrap_or('\u{FFFD}');
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    Cow::Owned(out)
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Type heuristics: index into [`TYPED`] for values that are variables on sight.
fn classify(seg: &str) -> Option<usize> {
    let b = seg.as_bytes();
    let n = b.len();
    if n == 36
        && b.iter().enumerate().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                *c == b'-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
    {
        return Some(1);
    }
    if (1..=20).contains(&n) && b.iter().all(u8::is_ascii_digit) {
        return Some(0);
    }
    let digits = b.iter().filter(|c| c.is_ascii_digit()).count();
    if n >= 16 && digits > 0 && b.iter().all(u8::is_ascii_hexdigit) {
        return Some(2);
    }
    // base64 / base64url tokens: long, from that alphabet, and with letters and digits
    // interleaved (slugs like `annual-report-2023` have one switch; random tokens many).
    if n >= 20
        && digits >= 2
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'=' | b'_' | b'-'))
    {
        let switches = b
            .windows(2)
            .filter(|w| w[0].is_ascii_digit() != w[1].is_ascii_digit())
            .count();
        if switches >= 3 {
            return Some(3);
        }
    }
    None
}

enum TplSeg<'a> {
    Literal(&'a str),
    Param(&'a str),
}

/// Validates a path template: starts with `/`, segments are literals or a whole `{name}`
/// (`name` = letters, digits, `_`), no regex characters. Shared with the rules module.
pub fn validate_template(template: &str) -> Result<(), String> {
    parse_template(template).map(|_| ()).map_err(|e| match e {
        DiscoveryError::BadTemplate { reason, .. } => reason,
        other => other.to_string(),
    })
}

fn parse_template(template: &str) -> Result<Vec<TplSeg<'_>>, DiscoveryError> {
    let bad = |reason: &str| DiscoveryError::BadTemplate {
        template: template.into(),
        reason: reason.into(),
    };
    if !template.starts_with('/') {
        return Err(bad("must start with /"));
    }
    let mut segs = Vec::new();
    for seg in template.split('/').filter(|s| !s.is_empty()) {
        if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(bad(&format!(
                    "placeholder {seg:?} must be {{name}} with letters, digits or _"
                )));
            }
            segs.push(TplSeg::Param(name));
        } else if seg.contains(['{', '}']) {
            return Err(bad(&format!(
                "segment {seg:?} mixes a placeholder with text; use a whole segment"
            )));
        } else if seg.contains(['*', '(', ')', '[', ']', '^', '$', '|', '\\', '+', '?', ' ']) {
            return Err(bad(&format!(
                "segment {seg:?} has regex or reserved characters; use {{name}}"
            )));
        } else if seg == "." || seg == ".." {
            return Err(bad("dot segments are not allowed"));
        } else {
            segs.push(TplSeg::Literal(seg));
        }
    }
    Ok(segs)
}

fn canonical_template(segs: &[TplSeg<'_>]) -> String {
    if segs.is_empty() {
        return "/".into();
    }
    let mut s = String::new();
    for seg in segs {
        s.push('/');
        match seg {
            TplSeg::Literal(l) => s.push_str(l),
            TplSeg::Param(p) => {
                s.push('{');
                s.push_str(p);
                s.push('}');
            }
        }
    }
    s
}

/// `GET /a/{account_id}/b` → `GET /a/{}/b`.
fn shape(name: &str) -> Cow<'_, str> {
    if !name.contains('{') {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len());
    let mut skipping = false;
    for c in name.chars() {
        match c {
            '{' => {
                skipping = true;
                out.push('{');
            }
            '}' => {
                skipping = false;
                out.push('}');
            }
            _ if skipping => {}
            _ => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The common path of the servers' URLs (`https://h/api/v1` → `/api/v1`), or "".
fn server_base_path<'a>(urls: impl Iterator<Item = &'a str>) -> String {
    let mut base: Option<String> = None;
    for url in urls {
        let after_scheme = url.split_once("://").map_or(url, |(_, r)| r);
        let path = if url.contains("://") {
            after_scheme.find('/').map_or("", |i| &after_scheme[i..])
        } else {
            after_scheme
        };
        let path = path.trim_end_matches('/');
        if path.contains('{') {
            return String::new();
        }
        match &base {
            None => base = Some(path.to_string()),
            Some(b) if b == path => {}
            Some(_) => return String::new(),
        }
    }
    base.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Discovery {
        Discovery::new(DiscoveryConfig::default()).unwrap()
    }

    fn name(d: &Discovery, id: OpId) -> String {
        d.name(id).unwrap().to_string()
    }

    /// A state file can pass its checksum and still not be one this code wrote. Each of these
    /// would panic (an index out of range, `live_nodes` going below zero) or loop for ever
    /// (`canonical` around a merge cycle, a trie walk around a node cycle) once used.
    #[test]
    fn loaded_states_with_cycles_or_dangling_indexes_are_refused() {
        let mut d = Discovery::new(DiscoveryConfig {
            cardinality_threshold: 2,
            templates: vec!["/api/{v}".into()],
            ..DiscoveryConfig::default()
        })
        .unwrap();
        for p in [
            "/shop/apples",
            "/shop/pears",
            "/shop/figs",
            "/login",
            "/api/x",
        ] {
            d.observe(None, Method::Get, p);
        }
        assert!(d.stats().generalisations > 0);
        assert_eq!(d.check(), Ok(()));
        let good = State::from(d);
        type Corrupt = fn(&mut State);
        let cases: [(&str, Corrupt); 9] = [
            ("merged into itself", |s| {
                s.ops[0].merged_into = Some(OpId(0))
            }),
            ("merge cycle", |s| {
                s.ops[0].merged_into = Some(OpId(1));
                s.ops[1].merged_into = Some(OpId(0));
            }),
            ("dangling child", |s| {
                s.nodes[0].children.insert("x".into(), 999);
            }),
            ("node cycle", |s| {
                s.nodes[1].children.insert("again".into(), 0);
            }),
            ("live count", |s| s.stats.live_nodes += 1),
            ("dangling op", |s| {
                s.nodes[1].ops.push((Method::Get, Tail::End, OpId(999)))
            }),
            ("free slot in use", |s| s.free.push(0)),
            ("no template root", |s| s.tpl_nodes.clear()),
            ("zero threshold", |s| s.config.cardinality_threshold = 0),
        ];
        for (what, corrupt) in cases {
            let mut s = good.clone();
            corrupt(&mut s);
            assert!(
                Discovery::from(s).check().is_err(),
                "{what} passed the check"
            );
        }
    }

    /// Found by the `discovery` fuzz target (fuzz/, minimised): these requests merged an
    /// operation into its own chain, and the next `canonical` looped for ever: one request could
    /// hang the engine. Lines are `METHOD PATH [HOST]`, a whole-line `GET` path otherwise, and
    /// `T TEMPLATE`, as in the target.
    #[test]
    fn merges_never_make_a_cycle_that_canonical_would_loop_on() {
        const INPUT: &[u8] = b"T /api/vs/logcounba+\npi/v0/users/{user}\n`ET /v1/accounts/01/bGET\xef\xbf\xbd\nPUT ers{user_id}\nGET /api/v1/accounts/42/balance\nPsere\nG\x00/api/v1/users/7/exT\xff\xff\n\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff /api/v1/u\xd9\x00\x00\x00\x00\x00\x00\x00sers/7 other.example\nGET \xd9\x00\x00\x00\x00\x00\x00\x00/apu1i/v/sersQ7/extra\n";
        let mut d = Discovery::new(DiscoveryConfig {
            include_host: true,
            cardinality_threshold: 3,
            max_nodes: 40,
            max_ops: 24,
            max_depth: 5,
            max_hosts: 3,
            templates: Vec::new(),
        })
        .unwrap();
        for line in String::from_utf8_lossy(INPUT).lines() {
            if let Some(t) = line.strip_prefix("T ") {
                let _ = d.add_template(t);
                continue;
            }
            let mut parts = line.splitn(3, ' ');
            let (method, path, host) = match (parts.next().and_then(Method::parse), parts.next()) {
                (Some(m), Some(p)) => (m, p, parts.next()),
                _ => (Method::Get, line, None),
            };
            let id = d.observe(host, method, path);
            assert_eq!(d.canonical(id), id);
        }
        assert_eq!(d.check(), Ok(()));
    }

    /// Found by the `discovery` fuzz target's 10-minute run (fuzz/): hosts first seen once the
    /// trie was full got a root past the node cap (41 live nodes, cap 40). Roots are now bounded
    /// apart: path positions stay within `max_nodes`, roots within `max_hosts` + 1.
    #[test]
    fn new_hosts_on_a_full_trie_keep_the_node_cap() {
        const INPUT: &[u8] = b"2/GET/lgo\n@GET /useGapi/v1/transfrs/{us_edir}\nGET /api/v1/{cco\x03\x00\x00\x00\x00\x00\x00\x00apkpi.euntsj/2/4alance\nPUT /api/v0/uwe\x95\x8c\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd0\xc8\xdf\x90\x8b\x97er.ei/v1/transfrsogin\nGET /7/ac/acE/22e%/2/{us_edir}xamplid}\nGET /Gapi/v1/transfrs/{us_eapi/v1/use\x95\x8c\xd0\xc8\xdf\x90\x8b\x97erUT /api/v0/uwe\x95\x8c\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd1\xd0\xc8\xdf\x90\x8b\x97er.ei/v1/transfrsogin\nGET /7/ac/acE/22e%/2/{us_edir}xamplid}\nGET /Gapi/v1/transfrs/{us_eapi/v1/use\x95\x8c\xd0\xc8\xdf\x90\x8b\x97er.examplid}\nGET /api/v1/accounts/42/ir}\nGET /api/v2u/a/v0/accounts/4\x00\x00\x00\x00\x00\x00\x00\x00e\nPUT /aT /api/v1rs/{user_id}\nGse\x95\x8c\xd0\xc8\xdf\x90\x8be\x95\x8c\xd0\xc8v/1xampb\xef\xbf\xbdlanplETe.c/mbce /";
        let config = DiscoveryConfig {
            include_host: true,
            cardinality_threshold: 3,
            max_nodes: 40,
            max_ops: 24,
            max_depth: 5,
            max_hosts: 3,
            templates: Vec::new(),
        };
        let mut d = Discovery::new(config.clone()).unwrap();
        for line in String::from_utf8_lossy(INPUT).lines() {
            let mut parts = line.splitn(3, ' ');
            let (method, path, host) = match (parts.next().and_then(Method::parse), parts.next()) {
                (Some(m), Some(p)) => (m, p, parts.next()),
                _ => (Method::Get, line, None),
            };
            d.observe(host, method, path);
            let roots = d.s.roots.len();
            assert!(roots <= config.max_hosts + 1, "{roots} roots");
            assert!(
                d.stats().live_nodes - roots <= config.max_nodes,
                "{:?} with {roots} roots",
                d.stats()
            );
        }
        assert_eq!(d.check(), Ok(()));
    }

    #[test]
    fn integer_ids_become_id_placeholder_immediately() {
        let mut d = d();
        let a = d.observe(None, Method::Get, "/login/237");
        let b = d.observe(None, Method::Get, "/login/415");
        assert_eq!(a, b);
        assert_eq!(name(&d, a), "GET /login/{id}");
        assert_eq!(
            d.observe(None, Method::Post, "/login/9"),
            d.resolve("POST /login/{id}").unwrap()
        );
    }

    #[test]
    fn slugs_become_param_past_the_threshold_and_not_before() {
        let mut d = Discovery::new(DiscoveryConfig {
            cardinality_threshold: 20,
            ..Default::default()
        })
        .unwrap();
        let users = [
            "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
        ];
        let mut ids = Vec::new();
        for i in 0..20 {
            let slug = format!("{}{}", users[i % 10], if i >= 10 { "x" } else { "" });
            ids.push(d.observe(None, Method::Get, &format!("/users/{slug}/profile")));
        }
        // 20 distinct values: still concrete.
        assert_eq!(name(&d, ids[0]), "GET /users/alice/profile");
        assert_eq!(
            ids.iter().collect::<std::collections::HashSet<_>>().len(),
            20
        );
        assert_eq!(d.stats().generalisations, 0);
        // The 21st distinct value turns the position into a placeholder.
        let t = d.observe(None, Method::Get, "/users/mallory/profile");
        assert_eq!(name(&d, t), "GET /users/{param}/profile");
        assert_eq!(d.stats().generalisations, 1);
        // Earlier concrete ops now alias the template op, and their counts moved there.
        for id in &ids {
            assert_eq!(d.canonical(*id), t);
        }
        assert_eq!(d.resolve("GET /users/alice/profile"), Some(t));
        assert_eq!(d.observe(None, Method::Get, "/users/alice/profile"), t);
        let info = d.operations().into_iter().find(|o| o.id == t).unwrap();
        assert_eq!(info.count, 22);
        // Nodes of the 20 merged subtrees were freed.
        assert!(d.stats().live_nodes <= 5, "{:?}", d.stats());
    }

    #[test]
    fn typed_heuristics_uuid_hex_token() {
        let mut d = d();
        let u = d.observe(
            None,
            Method::Get,
            "/files/3f2504e0-4f89-11d3-9a0c-0305e82c3301",
        );
        assert_eq!(name(&d, u), "GET /files/{uuid}");
        let h = d.observe(
            None,
            Method::Get,
            "/commits/9fceb02d0ae598e95dc970b74767f19372d61af8",
        );
        assert_eq!(name(&d, h), "GET /commits/{hex}");
        let t = d.observe(
            None,
            Method::Get,
            "/reset/dGhpcyBpcyBh3Rva2VuIXk9Zm9vYmFy4w",
        );
        assert_eq!(name(&d, t), "GET /reset/{token}");
        // Words and slugs are not variables on sight.
        let w = d.observe(None, Method::Get, "/reports/annual-report-2023-final");
        assert_eq!(name(&d, w), "GET /reports/annual-report-2023-final");
        let v = d.observe(None, Method::Get, "/api/v1/status");
        assert_eq!(name(&d, v), "GET /api/v1/status");
    }

    #[test]
    fn operator_templates_win_and_keep_their_names() {
        let cfg = DiscoveryConfig {
            templates: vec![
                "/api/v1/accounts/{account_id}/balance".into(),
                "/api/v1/accounts/me/balance".into(),
            ],
            ..Default::default()
        };
        let mut d = Discovery::new(cfg).unwrap();
        let a = d.observe(None, Method::Get, "/api/v1/accounts/42/balance");
        let b = d.observe(None, Method::Get, "/api/v1/accounts/acc-xyz/balance");
        assert_eq!(a, b);
        assert_eq!(name(&d, a), "GET /api/v1/accounts/{account_id}/balance");
        // A literal template beats a placeholder at the same position.
        let me = d.observe(None, Method::Get, "/api/v1/accounts/me/balance");
        assert_eq!(name(&d, me), "GET /api/v1/accounts/me/balance");
        // Resolution by shape: `{id}` in a rule finds `{account_id}`.
        assert_eq!(d.resolve("GET /api/v1/accounts/{id}/balance"), Some(a));
        assert!(matches!(
            Discovery::new(DiscoveryConfig {
                templates: vec!["/a/(\\d+)".into()],
                ..Default::default()
            }),
            Err(DiscoveryError::BadTemplate { .. })
        ));
    }

    #[test]
    fn openapi_import_from_json_and_yaml() {
        let json = r#"{
          "openapi": "3.1.0",
          "info": {"title": "bank", "version": "1"},
          "servers": [{"url": "https://bank.example/api/v1"}],
          "paths": {
            "/accounts/{accountId}/balance": {"get": {"responses": {"200": {"description": "ok"}}}},
            "/transferFunds": {"post": {"responses": {"200": {"description": "ok"}}}},
            "/files/{name}.{ext}": {"get": {"responses": {"200": {"description": "ok"}}}}
          }
        }"#;
        let mut d = d();
        let (added, skipped) = d.import_openapi(json).unwrap();
        assert_eq!(added, 2);
        assert_eq!(skipped, vec!["/api/v1/files/{name}.{ext}".to_string()]);
        let id = d.observe(None, Method::Get, "/api/v1/accounts/ab-cd/balance");
        assert_eq!(name(&d, id), "GET /api/v1/accounts/{accountId}/balance");

        let yaml = "openapi: 3.0.3\ninfo:\n  title: t\n  version: '1'\npaths:\n  /pets/{petId}:\n    get:\n      responses:\n        '200':\n          description: ok\n";
        let mut d = self::d();
        assert_eq!(d.import_openapi(yaml).unwrap().0, 1);
        let id = d.observe(None, Method::Delete, "/pets/rex");
        assert_eq!(name(&d, id), "DELETE /pets/{petId}");
        assert!(matches!(
            d.import_openapi("{not json"),
            Err(DiscoveryError::OpenApi(_))
        ));
    }

    #[test]
    fn trailing_slash_double_slash_dots_and_percent_encoding() {
        let mut d = d();
        let a = d.observe(None, Method::Get, "/api/v1/status");
        assert_eq!(d.observe(None, Method::Get, "/api/v1/status/"), a);
        assert_eq!(d.observe(None, Method::Get, "//api//v1/status"), a);
        assert_eq!(d.observe(None, Method::Get, "/api/./v1/x/../status"), a);
        assert_eq!(d.observe(None, Method::Get, "/api/v1/st%61tus"), a);
        // An encoded slash is data, not a separator.
        let e = d.observe(None, Method::Get, "/api/v1/a%2fb");
        assert_eq!(name(&d, e), "GET /api/v1/a%2Fb");
        let root = d.observe(None, Method::Get, "/");
        assert_eq!(name(&d, root), "GET /");
        assert_eq!(
            d.observe(None, Method::Get, ""),
            d.observe(None, Method::Get, "/")
        );
    }

    #[test]
    fn very_deep_paths_are_capped() {
        let mut d = Discovery::new(DiscoveryConfig {
            max_depth: 4,
            ..Default::default()
        })
        .unwrap();
        let id = d.observe(None, Method::Get, "/a/b/c/d/e/f/g/h/i/j");
        assert_eq!(name(&d, id), "GET /a/b/c/d/{rest}");
        assert_eq!(d.stats().depth_capped, 1);
    }

    #[test]
    fn host_in_names_when_configured() {
        let mut d = Discovery::new(DiscoveryConfig {
            include_host: true,
            ..Default::default()
        })
        .unwrap();
        let a = d.observe(Some("API.Example.com:8443"), Method::Get, "/x");
        assert_eq!(name(&d, a), "GET api.example.com/x");
        let b = d.observe(Some("other.example"), Method::Get, "/x");
        assert_ne!(a, b);
        let mut single = self::d();
        let c = single.observe(Some("api.example.com"), Method::Get, "/x");
        assert_eq!(name(&single, c), "GET /x");
    }

    /// A million random paths (about a second in a debug build).
    #[test]
    fn hostile_flood_of_random_paths_stays_under_caps() {
        let cfg = DiscoveryConfig {
            max_nodes: 2_000,
            max_ops: 500,
            ..Default::default()
        };
        let mut d = Discovery::new(cfg).unwrap();
        let mut s: u64 = 0x2545F4914F6CDD1D;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
        let mut path = String::new();
        for _ in 0..1_000_000 {
            path.clear();
            let depth = 1 + rnd() % 6;
            for _ in 0..depth {
                path.push('/');
                let len = 3 + rnd() % 8;
                for _ in 0..len {
                    path.push(ALPHA[(rnd() % 26) as usize] as char);
                }
            }
            let m = Method::ALL[(rnd() % 3) as usize];
            d.observe(None, m, &path);
        }
        let st = d.stats();
        assert!(st.live_nodes <= 2_000, "{st:?}");
        assert!(d.len() <= 500 + Method::ALL.len(), "{}", d.len());
        assert!(st.generalisations > 0);
        // A flood of random slugs generalises; still, everything maps somewhere countable.
        let total: u64 = d.operations().iter().map(|o| o.count).sum();
        assert_eq!(total, 1_000_000);
    }

    /// The path cache changes nothing: a discovery with it and one without map every request
    /// of a mixed stream to the same operation and end in the same state, through
    /// generalisations, merges, templates added midway, typed segments, deep paths, several
    /// hosts, and every cap (nodes, operations, hosts) reached.
    #[test]
    fn the_path_cache_maps_every_request_as_the_walk_does() {
        let mut generalisations = 0;
        for (include_host, max_nodes, max_ops) in [
            (false, 50_000, 10_000),
            (true, 60, 40),
            (false, 30, 1_000),
            (true, 2_000, 25),
        ] {
            let cfg = DiscoveryConfig {
                include_host,
                max_nodes,
                max_ops,
                max_hosts: 3,
                max_depth: 5,
                cardinality_threshold: 6,
                ..Default::default()
            };
            let mut cached = Discovery::new(cfg.clone()).unwrap();
            let mut walked = Discovery::new(cfg).unwrap();
            walked.use_path_cache = false;
            let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
            let mut rnd = move |n: u64| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s % n
            };
            let words = [
                "a", "b", "c", "d", "e", "f", "g", "h", "list", "..", "%7Ex", "",
            ];
            for i in 0..60_000u32 {
                if i == 20_000 {
                    cached.add_template("/a/{x}/c").unwrap();
                    walked.add_template("/a/{x}/c").unwrap();
                }
                let mut path = String::new();
                for _ in 0..1 + rnd(7) {
                    path.push('/');
                    match rnd(10) {
                        0 => path.push_str(&rnd(100_000).to_string()),
                        // Few enough values to be revisited, more than the threshold in all.
                        _ => path.push_str(words[rnd(if i < 30_000 { 5 } else { 12 }) as usize]),
                    }
                }
                let host = ["h1", "H2:80", "h3", "h4", "h5"][rnd(5) as usize];
                let m = Method::ALL[rnd(2) as usize];
                assert_eq!(
                    cached.observe(Some(host), m, &path),
                    walked.observe(Some(host), m, &path),
                    "request {i}: {m} {host}{path}"
                );
                assert!(cached.paths.len() <= path_cache::MAX_ENTRIES);
            }
            generalisations += cached.stats().generalisations;
            assert_eq!(cached.stats(), walked.stats());
            assert_eq!(cached.operations(), walked.operations());
        }
        assert!(generalisations > 0);
    }

    /// Random paths (some literal, so they are cached while their positions stay under the
    /// threshold) keep the cache under its caps, and the trie under its own.
    #[test]
    fn a_flood_of_random_paths_keeps_the_path_cache_under_its_caps() {
        let mut d = Discovery::new(DiscoveryConfig {
            cardinality_threshold: 1_000,
            max_nodes: 200_000,
            max_ops: 200_000,
            ..Default::default()
        })
        .unwrap();
        let mut s: u64 = 0x2545_F491_4F6C_DD1D;
        let mut fullest = 0;
        for _ in 0..300_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let path = format!("/{:x}/q{:x}/z", s % 997, s >> 40);
            d.observe(None, Method::Get, &path);
            assert!(d.paths.len() <= path_cache::MAX_ENTRIES);
            assert!(d.paths.text_bytes() <= path_cache::MAX_TEXT_BYTES);
            fullest = fullest.max(d.paths.len());
        }
        // The flood did fill it (so the caps were what held it).
        assert_eq!(fullest, path_cache::MAX_ENTRIES);
    }

    #[test]
    fn node_cap_maps_excess_to_overflow_operation_and_counts_it() {
        let cfg = DiscoveryConfig {
            max_nodes: 8,
            cardinality_threshold: 1000,
            ..Default::default()
        };
        let mut d = Discovery::new(cfg).unwrap();
        for i in 0..50 {
            d.observe(None, Method::Get, &format!("/api/x{i}y"));
        }
        let o = d.observe(None, Method::Get, "/api/another");
        assert_eq!(name(&d, o), "GET /api/{overflow}");
        assert!(d.stats().overflow_hits > 0);
        // Eight path positions plus the one root (no hosts in names).
        assert_eq!(d.stats().live_nodes, 8 + 1);
    }

    #[test]
    fn op_cap_maps_excess_to_table_full_operation() {
        let cfg = DiscoveryConfig {
            max_ops: 3,
            ..Default::default()
        };
        let mut d = Discovery::new(cfg).unwrap();
        for p in ["/a", "/b", "/c", "/d", "/e"] {
            d.observe(None, Method::Get, p);
        }
        assert_eq!(d.len(), 4);
        let f = d.observe(None, Method::Get, "/f");
        assert_eq!(name(&d, f), "GET /{overflow}");
    }

    #[test]
    fn state_round_trips_through_serde() {
        let mut d = Discovery::new(DiscoveryConfig {
            templates: vec!["/t/{x}".into()],
            cardinality_threshold: 3,
            ..Default::default()
        })
        .unwrap();
        for p in ["/u/a", "/u/b", "/u/c", "/u/d", "/t/1", "/n/5"] {
            d.observe(None, Method::Get, p);
        }
        let json = serde_json::to_string(&d).unwrap();
        let mut back: Discovery = serde_json::from_str(&json).unwrap();
        assert_eq!(back.operations(), d.operations());
        assert_eq!(
            back.observe(None, Method::Get, "/u/zz"),
            d.resolve("GET /u/{param}").unwrap()
        );
        assert_eq!(
            back.observe(None, Method::Get, "/t/q"),
            d.resolve("GET /t/{x}").unwrap()
        );
        assert_eq!(back.resolve("GET /u/a"), d.resolve("GET /u/{param}"));
    }

    /// Loaded endpoints carry the settings they were saved with; the configured ones take over
    /// (a new template maps from now on, a new threshold governs learning), except whether
    /// names carry the host, which is kept and reported.
    #[test]
    fn loaded_endpoints_adopt_the_configured_settings_but_keep_host_naming() {
        let mut d = Discovery::new(DiscoveryConfig::default()).unwrap();
        d.observe(None, Method::Get, "/api/v1/accounts/acc-xyz/balance");
        let mut back: Discovery =
            serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        let configured = DiscoveryConfig {
            templates: vec!["/api/v1/accounts/{account_id}/balance".into()],
            cardinality_threshold: 2,
            include_host: true,
            ..Default::default()
        };
        assert_eq!(
            back.adopt_config(&configured).unwrap(),
            vec!["include_host"]
        );
        assert_eq!(back.config().cardinality_threshold, 2);
        assert!(!back.config().include_host);
        // The path walked before now maps to the template (the path cache was invalidated).
        let a = back.observe(None, Method::Get, "/api/v1/accounts/acc-xyz/balance");
        assert_eq!(name(&back, a), "GET /api/v1/accounts/{account_id}/balance");
        // Adopting again changes nothing and adds the template once.
        assert!(
            back.adopt_config(&DiscoveryConfig {
                include_host: false,
                ..configured.clone()
            })
            .unwrap()
            .is_empty()
        );
        assert_eq!(back.config().templates, configured.templates);
        back.check().unwrap();
    }
}
