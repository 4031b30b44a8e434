//! One context of the trie and its next-operation counts, kept per time bucket so the learning
//! window slides. An entry stores its window total plus the (bucket, count) pairs behind it; most
//! entries live in one bucket, so the first pair is stored inline.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use super::Op;

/// Above this many distinct next operations a context gets a hash index instead of a linear scan.
const INDEX_ABOVE: usize = 8;

/// Count of one next operation in one context over the window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub next: Op,
    /// Occurrences in the window (sum of `buckets`).
    pub k: u32,
    /// Slot of the context this transition leads to (this context extended by `next`), so a
    /// session's next walk needs no hash lookups. A hint: checked against the slot's key before use.
    #[serde(skip)]
    pub(super) link: Link,
    /// (bucket epoch, count), oldest first.
    buckets: SmallVec<[(u32, u32); 1]>,
}

/// A cached slot id (`NO_SLOT` when unknown). Not model state: not saved, not compared.
#[derive(Clone, Copy, Debug)]
pub(super) struct Link(pub(super) u32);

impl Default for Link {
    fn default() -> Self {
        Link(super::NO_SLOT)
    }
}

impl PartialEq for Link {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// A context: the operations on the path from the root, newest first (the root is the empty context).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Slot of the parent context (this context minus its oldest operation); `NO_SLOT` for the root.
    pub parent: u32,
    /// The oldest operation of this context: the trie edge from the parent.
    pub op: Op,
    /// Key in the model's index (a hash of the context's operations).
    pub key: u64,
    pub depth: u8,
    pub live: bool,
    /// CLOCK bit for eviction: set on learning, cleared as the hand passes.
    pub referenced: bool,
    /// Result of the last collapse evaluation: true means "discarded, same as its parent".
    pub collapsed: bool,
    /// Retained children found during the current collapse sweep.
    pub retained_children: u32,
    /// Live child contexts (only leaves are evicted, so slot ids in keys stay valid).
    pub children: u32,
    /// Total observations in the window.
    pub n: u32,
    /// Largest entry count, a cheap upper bound used by the collapse test.
    pub max_k: u32,
    entries: SmallVec<[Entry; 1]>,
    /// next op → position in `entries`, only for contexts with many distinct next operations.
    index: Option<Box<FxHashMap<Op, u32>>>,
}

impl Node {
    pub(super) fn new(parent: u32, op: Op, depth: u8, key: u64) -> Self {
        Node {
            parent,
            op,
            key,
            depth,
            live: true,
            referenced: true,
            collapsed: false,
            retained_children: 0,
            children: 0,
            n: 0,
            max_k: 0,
            entries: SmallVec::new(),
            index: None,
        }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub(super) fn position(&self, next: Op) -> Option<usize> {
        match &self.index {
            Some(ix) => ix.get(&next).map(|&i| i as usize),
            None => self.entries.iter().position(|e| e.next == next),
        }
    }

    /// Occurrences of `next` in this context over the window.
    pub fn count(&self, next: Op) -> u32 {
        self.position(next).map_or(0, |i| self.entries[i].k)
    }

    /// Distinct next operations seen in this context.
    pub fn distinct(&self) -> u32 {
        self.entries.len() as u32
    }

    /// Records one occurrence of `next` in bucket `epoch`; `window` buckets are kept, so older
    /// pairs of this entry are dropped on the spot, which bounds an entry even without `maintain`.
    /// Returns the entry's position.
    pub(super) fn record(&mut self, next: Op, epoch: u32, window: u32) -> usize {
        let i = match self.position(next) {
            Some(i) => i,
            None => {
                self.entries.push(Entry {
                    next,
                    k: 0,
                    link: Link::default(),
                    buckets: SmallVec::new(),
                });
                let i = self.entries.len() - 1;
                if let Some(ix) = &mut self.index {
                    ix.insert(next, i as u32);
                } else if self.entries.len() > INDEX_ABOVE {
                    self.rebuild_index();
                }
                i
            }
        };
        let e = &mut self.entries[i];
        match e.buckets.last_mut() {
            Some((b, c)) if *b == epoch => *c = c.saturating_add(1),
            _ => {
                if e.buckets.len() >= window as usize {
                    let dropped = drop_expired(&mut e.buckets, epoch, window);
                    e.k -= dropped;
                    self.n -= dropped;
                }
                e.buckets.push((epoch, 1));
            }
        }
        e.k = e.k.saturating_add(1);
        self.n = self.n.saturating_add(1);
        self.max_k = self.max_k.max(e.k);
        i
    }

    /// The cached link of the entry at `i`.
    pub(super) fn link(&self, i: usize) -> u32 {
        self.entries[i].link.0
    }

    pub(super) fn set_link(&mut self, i: usize, slot: u32) {
        self.entries[i].link = Link(slot);
    }

    /// Drops counts from buckets that left the window. Returns the number of entries examined (the
    /// work done). Entries left empty are removed.
    pub(super) fn expire(&mut self, epoch: u32, window: u32) -> usize {
        let work = self.entries.len();
        let mut removed_any = false;
        for e in self.entries.iter_mut() {
            let dropped = drop_expired(&mut e.buckets, epoch, window);
            e.k -= dropped;
            self.n -= dropped;
            removed_any |= e.k == 0;
        }
        if removed_any {
            self.entries.retain(|e| e.k > 0);
            if self.index.is_some() {
                self.rebuild_index();
            }
        }
        self.max_k = self.entries.iter().map(|e| e.k).max().unwrap_or(0);
        work
    }

    fn rebuild_index(&mut self) {
        if self.entries.len() > INDEX_ABOVE {
            let ix = self
                .entries
                .iter()
                .enumerate()
                .map(|(i, e)| (e.next, i as u32))
                .collect();
            self.index = Some(Box::new(ix));
        } else {
            self.index = None;
        }
    }

    /// Releases the storage of an evicted or expired context.
    pub(super) fn clear(&mut self) {
        self.live = false;
        self.n = 0;
        self.max_k = 0;
        self.children = 0;
        self.retained_children = 0;
        self.entries = SmallVec::new();
        self.index = None;
    }

    /// Approximate heap bytes owned by this node beyond its inline size.
    pub(super) fn heap_bytes(&self) -> usize {
        let mut b = 0;
        if self.entries.spilled() {
            b += self.entries.capacity() * std::mem::size_of::<Entry>();
        }
        for e in &self.entries {
            if e.buckets.spilled() {
                b += e.buckets.capacity() * std::mem::size_of::<(u32, u32)>();
            }
        }
        if let Some(ix) = &self.index {
            // hashbrown: key + value + one control byte per bucket, at 7/8 load.
            b += ix.capacity() * (std::mem::size_of::<(Op, u32)>() + 1) * 8 / 7;
        }
        b
    }
}

/// Removes pairs whose bucket is at least `window` buckets older than `epoch`; returns their count.
fn drop_expired(buckets: &mut SmallVec<[(u32, u32); 1]>, epoch: u32, window: u32) -> u32 {
    let keep_from = epoch.saturating_sub(window - 1);
    let cut = buckets.iter().take_while(|(b, _)| *b < keep_from).count();
    if cut == 0 {
        return 0;
    }
    let dropped = buckets[..cut].iter().map(|(_, c)| *c).sum();
    buckets.drain(..cut);
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_leave_the_window_after_window_buckets() {
        let mut n = Node::new(0, 0, 1, 1);
        n.record(7, 10, 3);
        n.record(7, 11, 3);
        n.record(8, 12, 3);
        assert_eq!((n.count(7), n.count(8), n.n), (2, 1, 3));
        n.expire(12, 3); // buckets 10..=12 still inside
        assert_eq!(n.n, 3);
        n.expire(13, 3); // bucket 10 leaves
        assert_eq!((n.count(7), n.n), (1, 2));
        n.expire(15, 3); // everything but nothing newer than 12 → all gone
        assert_eq!((n.count(7), n.count(8), n.n, n.distinct()), (0, 0, 0, 0));
    }

    #[test]
    fn an_entry_never_holds_more_than_window_buckets_without_maintenance() {
        let mut n = Node::new(0, 0, 1, 1);
        for epoch in 0..1000 {
            n.record(1, epoch, 24);
        }
        assert!(n.entries()[0].buckets.len() <= 24);
        assert_eq!(n.count(1), 24);
        assert_eq!(n.n, 24);
    }

    #[test]
    fn many_next_operations_switch_to_an_index_and_stay_consistent() {
        let mut n = Node::new(0, 0, 0, 1);
        for op in 0..100 {
            for _ in 0..=op % 3 {
                n.record(op, 0, 24);
            }
        }
        assert!(n.index.is_some());
        for op in 0..100 {
            assert_eq!(n.count(op), op % 3 + 1);
        }
        assert_eq!(n.max_k, 3);
    }
}
