//! One context of the trie and its next-operation counts, kept per time bucket so the learning
//! window slides. An entry stores its window total plus the (bucket, count) pairs behind it; most
//! entries live in one bucket, so only that bucket's epoch is stored inline (see [`Entry`]).

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use super::Op;

/// Above this many distinct next operations a context gets a hash index instead of a linear scan.
const INDEX_ABOVE: usize = 8;

/// Count of one next operation in one context over the window.
///
/// The (bucket epoch, count) pairs behind `k` take 12 bytes instead of a small vector's 24, so
/// an entry is 24 bytes: the newest bucket's epoch is inline and its count is `k` minus the
/// older buckets' counts; the older pairs are boxed, and absent while the entry lives in one
/// bucket (as most do). Saved as the list of pairs, oldest first, as before.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "SavedEntry", into = "SavedEntry")]
pub struct Entry {
    pub next: Op,
    /// Occurrences in the window (the sum of the buckets' counts).
    pub k: u32,
    /// Slot of the context this transition leads to (this context extended by `next`), so a
    /// session's next walk needs no hash lookups. A hint: checked against the slot's key before use.
    pub(super) link: Link,
    /// Epoch of the newest bucket (meaningless while `k` is 0).
    newest: u32,
    /// The older buckets' (epoch, count), oldest first; never an empty list. Boxed on purpose:
    /// the field is 8 bytes where a `Vec` is 24, and it is rarely there.
    #[allow(clippy::box_collection)]
    older: Option<Box<Vec<(u32, u32)>>>,
}

/// What is saved of an [`Entry`]: its count and its (bucket epoch, count) pairs, oldest first.
#[derive(Serialize, Deserialize)]
struct SavedEntry {
    next: Op,
    k: u32,
    buckets: SmallVec<[(u32, u32); 1]>,
}

impl From<SavedEntry> for Entry {
    fn from(s: SavedEntry) -> Self {
        let mut pairs = s.buckets.into_vec();
        let newest = pairs.pop().map_or(0, |(b, _)| b);
        Entry {
            next: s.next,
            k: s.k,
            link: Link::default(),
            newest,
            older: (!pairs.is_empty()).then(|| Box::new(pairs)),
        }
    }
}

impl From<Entry> for SavedEntry {
    fn from(e: Entry) -> Self {
        SavedEntry {
            next: e.next,
            k: e.k,
            buckets: e.buckets().collect(),
        }
    }
}

impl Entry {
    fn new(next: Op) -> Self {
        Entry {
            next,
            k: 0,
            link: Link::default(),
            newest: 0,
            older: None,
        }
    }

    fn older_sum(&self) -> u64 {
        self.older
            .as_deref()
            .map_or(0, |v| v.iter().map(|&(_, c)| u64::from(c)).sum())
    }

    /// The (bucket epoch, count) pairs, oldest first.
    pub(super) fn buckets(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        let newest_count = (u64::from(self.k) - self.older_sum().min(u64::from(self.k))) as u32;
        self.older
            .iter()
            .flat_map(|v| v.iter().copied())
            .chain((self.k > 0).then_some((self.newest, newest_count)))
    }

    fn bucket_count(&self) -> usize {
        self.older.as_ref().map_or(0, |v| v.len()) + usize::from(self.k > 0)
    }

    /// Counts one occurrence in bucket `epoch` (never older than the newest). A new bucket
    /// beyond `window` of them first drops the pairs that left the window, which bounds an
    /// entry even without `maintain`. Returns the count dropped.
    fn add(&mut self, epoch: u32, window: u32) -> u32 {
        let mut dropped = 0;
        if self.k > 0 && epoch != self.newest {
            if self.bucket_count() >= window as usize {
                dropped = self.expire(epoch, window);
            }
            if self.k > 0 {
                let newest_count = (u64::from(self.k) - self.older_sum()) as u32;
                self.older
                    .get_or_insert_with(Default::default)
                    .push((self.newest, newest_count));
            }
        }
        self.newest = epoch;
        self.k = self.k.saturating_add(1);
        dropped
    }

    /// Drops the buckets at least `window` buckets older than `epoch` from the pairs and from
    /// `k`; returns the count dropped.
    fn expire(&mut self, epoch: u32, window: u32) -> u32 {
        if self.k == 0 {
            return 0;
        }
        let keep_from = epoch.saturating_sub(window - 1);
        if self.newest < keep_from {
            // The older buckets are older still: everything leaves.
            let dropped = self.k;
            self.k = 0;
            self.older = None;
            return dropped;
        }
        let Some(v) = self.older.as_deref_mut() else {
            return 0;
        };
        let cut = v.iter().take_while(|&&(b, _)| b < keep_from).count();
        let dropped: u32 = v[..cut].iter().map(|&(_, c)| c).sum();
        v.drain(..cut);
        if v.is_empty() {
            self.older = None;
        }
        self.k -= dropped;
        dropped
    }
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
    /// Saved as the map it replaced (op → position), so state files keep their format.
    #[serde(with = "op_index_serde")]
    index: Option<OpIndex>,
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
            Some(ix) => ix.get(next),
            None => self.entries.iter().position(|e| e.next == next),
        }
    }

    /// Hints the CPU to load what [`Node::position`] reads for `next` when that is outside
    /// the node: the index slot its probe starts at, or the entries a scan goes through (at
    /// most `INDEX_ABOVE`, a few lines). No effect on results.
    #[inline(always)]
    pub(super) fn prefetch_search(&self, next: Op) {
        match &self.index {
            Some(ix) => {
                super::prefetch_lines(&ix.slots[ix.home(next)], 8);
            }
            None if self.entries.spilled() => super::prefetch_lines(
                self.entries.as_ptr(),
                std::mem::size_of_val(self.entries.as_slice()),
            ),
            None => {}
        }
    }

    /// Hints the CPU to load the first lines of the entries when they live outside the node.
    /// No effect on results.
    #[inline(always)]
    pub(super) fn prefetch_entries(&self) {
        if self.entries.spilled() {
            let bytes = std::mem::size_of_val(self.entries.as_slice()).min(4 * 64);
            super::prefetch_lines(self.entries.as_ptr(), bytes);
        }
    }

    /// Hints the CPU to load the entry at `i` (from [`Node::position`]). No effect on results.
    #[inline(always)]
    pub(super) fn prefetch_entry(&self, i: usize) {
        if let Some(e) = self.entries.get(i) {
            super::prefetch_lines(e as *const Entry, std::mem::size_of::<Entry>());
        }
    }

    /// Occurrences of `next` in this context over the window.
    pub fn count(&self, next: Op) -> u32 {
        self.count_at(self.position(next))
    }

    /// The count of the entry at `at` (from [`Node::position`]), 0 for none.
    pub(super) fn count_at(&self, at: Option<usize>) -> u32 {
        at.map_or(0, |i| self.entries[i].k)
    }

    /// Distinct next operations seen in this context.
    pub fn distinct(&self) -> u32 {
        self.entries.len() as u32
    }

    /// Records one occurrence of `next` in bucket `epoch`; `window` buckets are kept, so older
    /// pairs of this entry are dropped on the spot, which bounds an entry even without `maintain`.
    /// Returns the entry's position.
    #[cfg(test)]
    pub(super) fn record(&mut self, next: Op, epoch: u32, window: u32) -> usize {
        let at = self.position(next);
        self.record_at(at, next, epoch, window)
    }

    /// [`Node::record`] with `next`'s position already found (`self.position(next)`), so a walk
    /// that scored `next` here does not search the entries twice.
    pub(super) fn record_at(
        &mut self,
        at: Option<usize>,
        next: Op,
        epoch: u32,
        window: u32,
    ) -> usize {
        debug_assert_eq!(at, self.position(next));
        let i = match at {
            Some(i) => i,
            None => {
                self.entries.push(Entry::new(next));
                let i = self.entries.len() - 1;
                match &mut self.index {
                    Some(ix) if ix.has_room(i + 1) => ix.insert(next, i),
                    _ if self.entries.len() > INDEX_ABOVE => self.rebuild_index(),
                    _ => {}
                }
                i
            }
        };
        let e = &mut self.entries[i];
        let dropped = e.add(epoch, window);
        self.n = (self.n - dropped).saturating_add(1);
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
            self.n -= e.expire(epoch, window);
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
            self.index = Some(OpIndex::build(
                self.entries.len(),
                self.entries.iter().map(|e| e.next),
            ));
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

    /// For [`super::Model::check`]: counts that cover their buckets (so expiry's subtractions
    /// cannot underflow), none above `max_k`, and an index that finds every entry where it is.
    pub(super) fn check(&self) -> Result<(), String> {
        let mut total = 0u64;
        for (i, e) in self.entries.iter().enumerate() {
            let held = e.older_sum();
            if held > u64::from(e.k) {
                return Err(format!(
                    "next {} counts {} but its older buckets hold {held}",
                    e.next, e.k
                ));
            }
            if self
                .index
                .as_ref()
                .is_some_and(|ix| ix.get(e.next) != Some(i))
            {
                return Err(format!("the index does not find next {} at {i}", e.next));
            }
            // The collapse trusts max_k to bound every count (see `collapsible`).
            if e.k > self.max_k {
                return Err(format!(
                    "next {} counts {} above the context's largest count {}",
                    e.next, e.k, self.max_k
                ));
            }
            total += u64::from(e.k);
        }
        // Every entry is found above; an index holding more ops would send a lookup past the
        // entries.
        if let Some(ix) = &self.index
            && ix.len() != self.entries.len()
        {
            return Err(format!(
                "its index holds {} next operations for {} entries",
                ix.len(),
                self.entries.len()
            ));
        }
        if total > u64::from(self.n) {
            return Err(format!(
                "{} observations but its entries count {total}",
                self.n
            ));
        }
        Ok(())
    }

    /// Approximate heap bytes owned by this node beyond its inline size.
    pub(super) fn heap_bytes(&self) -> usize {
        let mut b = 0;
        if self.entries.spilled() {
            b += self.entries.capacity() * std::mem::size_of::<Entry>();
        }
        for e in &self.entries {
            if let Some(v) = &e.older {
                b += std::mem::size_of::<Vec<(u32, u32)>>()
                    + v.capacity() * std::mem::size_of::<(u32, u32)>();
            }
        }
        if let Some(ix) = &self.index {
            b += ix.slots.len() * std::mem::size_of::<(u32, u32)>();
        }
        b
    }
}

/// next op → position in a node's entries: open addressing with linear probing over a
/// power-of-two table of (op + 1, position) pairs (0 = empty), at most half full. A lookup
/// costs one cache line in the common case, where a boxed general map costs three (the box,
/// a control group, a bucket): the walk is memory-latency bound and wide contexts are hot.
#[derive(Clone, Debug)]
pub(super) struct OpIndex {
    slots: Box<[(u32, u32)]>,
    shift: u32,
}

/// Derived from the entries, so two nodes with equal entries have equivalent indexes.
impl PartialEq for OpIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl OpIndex {
    fn build(len: usize, ops: impl Iterator<Item = Op>) -> Self {
        let cap = (len * 2).next_power_of_two().max(32);
        let mut ix = OpIndex {
            slots: vec![(0, 0); cap].into_boxed_slice(),
            shift: 64 - cap.trailing_zeros(),
        };
        for (i, op) in ops.enumerate() {
            ix.insert(op, i);
        }
        ix
    }

    /// Fibonacci hashing: ops are dense small ids, the multiply spreads them.
    fn home(&self, op: Op) -> usize {
        ((u64::from(op).wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    fn len(&self) -> usize {
        self.slots.iter().filter(|&&(tag, _)| tag != 0).count()
    }

    fn has_room(&self, len: usize) -> bool {
        len * 2 <= self.slots.len()
    }

    fn get(&self, op: Op) -> Option<usize> {
        let mask = self.slots.len() - 1;
        let mut i = self.home(op);
        loop {
            let (tag, pos) = self.slots[i];
            if tag == op.wrapping_add(1) {
                return Some(pos as usize);
            }
            if tag == 0 {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    fn insert(&mut self, op: Op, pos: usize) {
        let mask = self.slots.len() - 1;
        let mut i = self.home(op);
        while self.slots[i].0 != 0 && self.slots[i].0 != op.wrapping_add(1) {
            i = (i + 1) & mask;
        }
        self.slots[i] = (op.wrapping_add(1), pos as u32);
    }
}

/// The index as the `op → position` map earlier versions saved.
mod op_index_serde {
    use rustc_hash::FxHashMap;
    use serde::{Deserialize as _, Deserializer, Serialize as _, Serializer};

    use super::{Op, OpIndex};

    pub fn serialize<S: Serializer>(ix: &Option<OpIndex>, s: S) -> Result<S::Ok, S::Error> {
        let map: Option<FxHashMap<Op, u32>> = ix.as_ref().map(|ix| {
            ix.slots
                .iter()
                .filter(|(tag, _)| *tag != 0)
                .map(|&(tag, pos)| (tag.wrapping_sub(1), pos))
                .collect()
        });
        map.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OpIndex>, D::Error> {
        let map = Option::<FxHashMap<Op, u32>>::deserialize(d)?;
        Ok(map.map(|m| {
            let mut pairs: Vec<(u32, Op)> = m.into_iter().map(|(op, pos)| (pos, op)).collect();
            pairs.sort_unstable();
            OpIndex::build(pairs.len(), pairs.into_iter().map(|(_, op)| op))
        }))
    }
}

#[cfg(test)]
mod tests {
    use rustc_hash::FxHashMap;

    use super::*;

    /// A loaded index that names more operations than the context has entries would answer
    /// a lookup with a position past them (a panic): the check refuses it.
    #[test]
    fn an_index_with_more_operations_than_entries_is_refused() {
        let mut n = Node::new(0, 0, 1, 1);
        for op in 0..12 {
            n.record(op, 1, 3);
        }
        assert!(n.index.is_some(), "indexed above {INDEX_ABOVE} entries");
        assert_eq!(n.check(), Ok(()));
        let json = serde_json::to_string(&n).unwrap();
        // The saved index is an op → position map; one more op, at the next position.
        let tampered = json.replacen("\"index\":{", "\"index\":{\"99\":12,", 1);
        assert_ne!(tampered, json, "{json}");
        let loaded: Node = serde_json::from_str(&tampered).unwrap();
        assert!(loaded.check().is_err());
        let loaded: Node = serde_json::from_str(&json).unwrap();
        assert_eq!(loaded.check(), Ok(()));
    }

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
        assert!(n.entries()[0].bucket_count() <= 24);
        assert_eq!(n.count(1), 24);
        assert_eq!(n.n, 24);
    }

    /// An entry is saved exactly as when its pairs were a small vector: next, k, then the
    /// (bucket epoch, count) pairs oldest first; and read back to the same entry.
    #[test]
    fn an_entry_is_saved_as_its_list_of_bucket_pairs() {
        #[derive(Serialize)]
        struct Before {
            next: Op,
            k: u32,
            buckets: Vec<(u32, u32)>,
        }
        let mut n = Node::new(0, 0, 1, 1);
        for (epoch, times) in [(3, 2), (5, 1), (9, 4)] {
            for _ in 0..times {
                n.record(7, epoch, 24);
            }
        }
        n.record(8, 9, 24);
        let e = &n.entries()[0];
        assert_eq!(e.buckets().collect::<Vec<_>>(), [(3, 2), (5, 1), (9, 4)]);
        let before = Before {
            next: 7,
            k: 7,
            buckets: vec![(3, 2), (5, 1), (9, 4)],
        };
        let bytes = postcard::to_stdvec(e).unwrap();
        assert_eq!(bytes, postcard::to_stdvec(&before).unwrap());
        let back: Entry = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.buckets().collect::<Vec<_>>(), [(3, 2), (5, 1), (9, 4)]);
        assert_eq!((back.k, back.older.as_ref().map(|v| v.len())), (7, Some(2)));
        // One bucket: nothing boxed.
        let single = &n.entries()[1];
        assert_eq!(single.buckets().collect::<Vec<_>>(), [(9, 1)]);
        assert!(single.older.is_none());
        assert_eq!(std::mem::size_of::<Entry>(), 24);
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

    #[test]
    fn the_index_is_saved_as_the_map_it_replaced_and_restored_from_it() {
        let mut n = Node::new(0, 0, 0, 1);
        for op in (0..300).rev() {
            n.record(op * 7, 0, 24);
        }
        let bytes = postcard::to_stdvec(&n).unwrap();
        // Same encoding as the field's former type.
        #[derive(Serialize)]
        struct Old<'a> {
            parent: u32,
            op: Op,
            key: u64,
            depth: u8,
            live: bool,
            referenced: bool,
            collapsed: bool,
            retained_children: u32,
            children: u32,
            n: u32,
            max_k: u32,
            entries: &'a SmallVec<[Entry; 1]>,
            index: Option<Box<FxHashMap<Op, u32>>>,
        }
        let old: Node = postcard::from_bytes(
            &postcard::to_stdvec(&Old {
                parent: n.parent,
                op: n.op,
                key: n.key,
                depth: n.depth,
                live: n.live,
                referenced: n.referenced,
                collapsed: n.collapsed,
                retained_children: n.retained_children,
                children: n.children,
                n: n.n,
                max_k: n.max_k,
                entries: &n.entries,
                index: Some(Box::new(
                    n.entries
                        .iter()
                        .enumerate()
                        .map(|(i, e)| (e.next, i as u32))
                        .collect(),
                )),
            })
            .unwrap(),
        )
        .unwrap();
        let back: Node = postcard::from_bytes(&bytes).unwrap();
        for m in [&old, &back] {
            for op in 0..2200 {
                let want = if op % 7 == 0 && op / 7 < 300 { 1 } else { 0 };
                assert_eq!(m.count(op), want, "op {op}");
            }
        }
    }
}
