//! Incremental maintenance: bucket expiry and the seed's context collapse, run as a resumable
//! state machine so each call does bounded work. The collapse evaluates contexts deepest first, so a
//! context is judged after all its children: it is kept iff it is the root, has a kept child, or some
//! next operation's interval does not overlap its parent's. That is the fixed point of the seed's
//! loop (only leaves are ever discarded, and discarding never changes a parent's counts).

use super::{MAX_PREDECESSORS, MaintainReport, Model, Op, Phase, Predecessor, ROOT, prefetch};

impl Model {
    pub(super) fn maintain_step(&mut self, budget: usize) -> MaintainReport {
        let mut work = 0usize;
        while work < budget {
            match self.phase.clone() {
                Phase::Expire { cursor } => {
                    if cursor == 0 {
                        self.by_depth.iter_mut().for_each(Vec::clear);
                        self.by_depth.resize(self.cfg.max_order + 1, Vec::new());
                    }
                    let mut c = cursor as usize;
                    while c < self.nodes.len() && work < budget {
                        work += 1 + self.expire_slot(c as u32);
                        c += 1;
                    }
                    self.phase = if c < self.nodes.len() {
                        Phase::Expire { cursor: c as u32 }
                    } else {
                        Phase::Collapse {
                            depth: self.cfg.max_order as u8,
                            pos: 0,
                        }
                    };
                }
                Phase::Collapse { depth: 0, .. } => {
                    self.nodes[ROOT as usize].collapsed = false;
                    self.publish_predecessors();
                    self.stats.retained_contexts = std::mem::take(&mut self.pending_retained) + 1;
                    self.stats.collapse_cycles += 1;
                    self.phase = Phase::Expire { cursor: 0 };
                    return MaintainReport {
                        work,
                        cycle_completed: true,
                    };
                }
                Phase::Collapse { depth, pos } => {
                    let d = depth as usize;
                    let mut p = pos as usize;
                    while p < self.by_depth[d].len() && work < budget {
                        let slot = self.by_depth[d][p];
                        // Each context evaluated is a few cache misses (it, its entries, its
                        // parent): start loading the one 8 places ahead, and the entries and
                        // parent of the one 4 ahead (whose node has arrived by then).
                        let ahead = |k: usize| self.by_depth[d].get(p + k).map(|&s| s as usize);
                        if let Some(far) = ahead(8) {
                            prefetch(&self.nodes[far]);
                        }
                        if let Some(near) = ahead(4) {
                            let node = &self.nodes[near];
                            node.prefetch_entries();
                            if let Some(parent) = self.nodes.get(node.parent as usize) {
                                prefetch(parent);
                            }
                        }
                        work += 1 + self.evaluate(slot, depth);
                        p += 1;
                    }
                    self.phase = if p < self.by_depth[d].len() {
                        Phase::Collapse {
                            depth,
                            pos: p as u32,
                        }
                    } else {
                        Phase::Collapse {
                            depth: depth - 1,
                            pos: 0,
                        }
                    };
                }
            }
        }
        MaintainReport {
            work,
            cycle_completed: false,
        }
    }

    /// Expires one slot; frees it when empty and childless. Returns entries examined.
    fn expire_slot(&mut self, slot: u32) -> usize {
        let (epoch, window) = (self.epoch, self.cfg.buckets);
        let node = &mut self.nodes[slot as usize];
        if !node.live {
            return 0;
        }
        let work = node.expire(epoch, window);
        if node.n == 0 && node.children == 0 && slot != ROOT {
            // Free it, and any ancestors it leaves empty and childless (they may have been visited
            // earlier in this pass while they still had this child).
            let mut s = slot;
            while s != ROOT {
                let parent = self.nodes[s as usize].parent;
                self.free_slot(s);
                self.stats.contexts_expired += 1;
                let p = &self.nodes[parent as usize];
                if p.n != 0 || p.children != 0 {
                    break;
                }
                s = parent;
            }
        } else {
            node.retained_children = 0;
            if let Some(v) = self.by_depth.get_mut(node.depth as usize) {
                v.push(slot);
            }
        }
        work
    }

    /// Decides whether the context in `slot` is kept, records it, and harvests predecessors from
    /// kept contexts. Returns entries examined.
    fn evaluate(&mut self, slot: u32, depth: u8) -> usize {
        let node = &self.nodes[slot as usize];
        // The slot may have been freed and reused since it was gathered.
        if !node.live || node.depth != depth || slot == ROOT {
            return 0;
        }
        let parent = node.parent;
        let (kept, work) = if node.retained_children > 0 {
            (true, 0)
        } else {
            let (collapsible, work) = self.collapsible(slot);
            (!collapsible, work)
        };
        self.nodes[slot as usize].collapsed = !kept;
        if kept {
            self.pending_retained += 1;
            self.nodes[parent as usize].retained_children += 1;
            return work + self.harvest_predecessors(slot);
        }
        work
    }

    /// The seed's is_collapsible: every next operation's interval overlaps the parent's. Operations
    /// seen in neither context have the interval [0, u] in both, which always overlap.
    fn collapsible(&mut self, slot: u32) -> (bool, usize) {
        let c = &self.nodes[slot as usize];
        let p = &self.nodes[c.parent as usize];
        let mut work = c.entries().len();
        if c.n == 0 {
            return (true, work);
        }
        // First without the parent's counts, which cost cache misses to find: whatever the
        // parent's count of an operation, its interval's upper bound is at least that of 0 out
        // of p.n, and its lower bound at most that of p.max_k out of p.n (both bounds rise with
        // the count). An entry whose lower bound is at most the first and whose upper bound is
        // at least the second overlaps its parent's interval, whatever that is. A context with
        // little data (wide intervals) under a parent without a dominant successor passes whole.
        let parent_upper_least = self.cache.range(0, p.n).upper_min;
        let parent_lower_most = self.cache.range(p.max_k, p.n).lower_max;
        let all_overlap = c.entries().iter().all(|e| {
            let r = self.cache.range(e.k, c.n);
            r.lower_max <= parent_upper_least && r.upper_min >= parent_lower_most
        });
        // The parent's count of each next operation is two dependent cache misses (its index
        // slot, then its entry) on a context that is rarely in cache: a chunk's lookups are
        // started together, so their misses overlap instead of following one another.
        const CHUNK: usize = 16;
        if !all_overlap {
            for chunk in c.entries().chunks(CHUNK) {
                for e in chunk {
                    p.prefetch_search(e.next);
                }
                let mut at = [None; CHUNK];
                for (a, e) in at.iter_mut().zip(chunk) {
                    *a = p.position(e.next);
                    if let Some(i) = *a {
                        p.prefetch_entry(i);
                    }
                }
                for (e, a) in chunk.iter().zip(at) {
                    if !self.cache.overlap(e.k, c.n, p.count_at(a), p.n) {
                        return (false, work);
                    }
                }
            }
        }
        // Operations the parent saw but this context never did: this context's interval is
        // [l0, u0] with l0 tiny; they stay apart only if the parent's lower bound exceeds u0. A lower
        // bound never exceeds its point estimate, so the largest k in the parent screens cheaply.
        let u0 = self.cache.interval(0, c.n).upper;
        if p.n > 0 && f64::from(p.max_k) / f64::from(p.n) > u0 {
            work += p.entries().len();
            for e in p.entries() {
                if f64::from(e.k) / f64::from(p.n) > u0
                    && c.count(e.next) == 0
                    && !self.cache.lower_at_most(e.k, p.n, u0)
                {
                    return (false, work);
                }
            }
        }
        (true, work)
    }

    /// For each well-supported next operation X of a kept context whose precedence score passes the
    /// threshold, every operation of the context is a predecessor of X.
    fn harvest_predecessors(&mut self, slot: u32) -> usize {
        let node = &self.nodes[slot as usize];
        let root = &self.nodes[ROOT as usize];
        let mut found: Vec<(Op, Predecessor)> = Vec::new();
        for e in node.entries() {
            let total = root.count(e.next);
            if e.k < self.cfg.predecessor_min_support || total < self.cfg.predecessor_min_support {
                continue;
            }
            let score = f64::from(e.k.min(total)) / f64::from(total);
            if score >= self.cfg.predecessor_min_score {
                for op in self.context_ops(slot) {
                    if op != e.next {
                        found.push((
                            e.next,
                            Predecessor {
                                op,
                                score,
                                support: total,
                            },
                        ));
                    }
                }
            }
        }
        let work = node.entries().len();
        for (next, pred) in found {
            let list = self.pending_predecessors.entry(next).or_default();
            match list.iter_mut().find(|p| p.op == pred.op) {
                Some(p) if p.score >= pred.score => {}
                Some(p) => *p = pred,
                None => list.push(pred),
            }
            list.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.op.cmp(&b.op)));
            list.truncate(MAX_PREDECESSORS);
        }
        work
    }

    fn publish_predecessors(&mut self) {
        self.predecessors = std::mem::take(&mut self.pending_predecessors);
    }
}
