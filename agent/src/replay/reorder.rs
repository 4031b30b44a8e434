//! Timestamp order: a bounded reorder window per input, then a k-way merge of the inputs.
//!
//! Logs are written when a request *ends*, so a slow request lands after faster later ones;
//! several workers writing one file interleave too. The engine wants time to move forward,
//! so each input is sorted within a window and the sorted inputs are merged.
use std::{cmp::Reverse, collections::BinaryHeap};

use serde::{Deserialize, Serialize};

/// What happens to a record older than one already released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicy {
    /// Counted and dropped (the default): the engine's clock never goes backwards and a
    /// request out of place by more than the window would sit in the wrong spot of its session
    /// anyway. Raise the window if `late` is not small.
    #[default]
    Drop,
    /// Counted and passed on with its timestamp raised to the last released one, so order
    /// holds and no request is lost (its time is off by at least the window).
    Clamp,
}

/// Outcome of [`Reorder::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Buffered,
    /// Older than a record already released; dropped ([`LatePolicy::Drop`]).
    LateDropped,
    /// Older than a record already released; buffered with a raised timestamp.
    LateClamped,
}

/// Sorts a stream whose disorder is bounded: a record is released once the newest timestamp
/// seen is `window_ns` past it, or when more than `max_buffered` records wait (the window
/// then shrinks rather than memory growing; counted in `overflow`). Ties keep arrival order.
#[derive(Debug)]
pub struct Reorder<T> {
    window_ns: u64,
    max_buffered: usize,
    policy: LatePolicy,
    /// (ts, arrival seq, slot): records stay put in `slots`, the heap moves 24-byte keys.
    heap: BinaryHeap<Reverse<(u64, u64, usize)>>,
    slots: Vec<Option<T>>,
    free: Vec<usize>,
    seq: u64,
    newest: u64,
    released: Option<u64>,
    pub late: u64,
    pub overflow: u64,
}

impl<T> Reorder<T> {
    pub fn new(window_ns: u64, max_buffered: usize, policy: LatePolicy) -> Self {
        Reorder {
            window_ns,
            max_buffered: max_buffered.max(1),
            policy,
            heap: BinaryHeap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            seq: 0,
            newest: 0,
            released: None,
            late: 0,
            overflow: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Adds a record with timestamp `ts`. `set_ts` rewrites a clamped record's timestamp.
    pub fn push(&mut self, mut ts: u64, mut item: T, set_ts: impl FnOnce(&mut T, u64)) -> Pushed {
        let mut outcome = Pushed::Buffered;
        if let Some(r) = self.released
            && ts < r
        {
            self.late += 1;
            match self.policy {
                LatePolicy::Drop => return Pushed::LateDropped,
                LatePolicy::Clamp => {
                    ts = r;
                    set_ts(&mut item, r);
                    outcome = Pushed::LateClamped;
                }
            }
        }
        self.newest = self.newest.max(ts);
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(item);
                i
            }
            None => {
                self.slots.push(Some(item));
                self.slots.len() - 1
            }
        };
        self.heap.push(Reverse((ts, self.seq, slot)));
        self.seq += 1;
        outcome
    }

    /// The oldest record, if the window (or the cap) says it can no longer be overtaken.
    pub fn pop_ready(&mut self) -> Option<T> {
        let &Reverse((ts, _, _)) = self.heap.peek()?;
        if self.heap.len() > self.max_buffered {
            self.overflow += 1;
        } else if ts.saturating_add(self.window_ns) > self.newest {
            return None;
        }
        self.pop_any()
    }

    /// The oldest record regardless of the window (at the end of the input).
    pub fn pop_any(&mut self) -> Option<T> {
        let Reverse((ts, _, slot)) = self.heap.pop()?;
        self.released = Some(ts);
        self.free.push(slot);
        self.slots[slot].take()
    }
}

/// Merges streams that are each in timestamp order into one, by (timestamp, stream index):
/// deterministic for equal timestamps.
#[derive(Debug)]
pub struct Merge<T> {
    heap: BinaryHeap<Reverse<(u64, usize)>>,
    heads: Vec<Option<T>>,
}

impl<T> Merge<T> {
    pub fn new(streams: usize) -> Self {
        Merge {
            heap: BinaryHeap::with_capacity(streams),
            heads: (0..streams).map(|_| None).collect(),
        }
    }

    /// Offers stream `i`'s next record; at most one per stream is held.
    pub fn offer(&mut self, i: usize, ts: u64, item: T) {
        debug_assert!(self.heads[i].is_none(), "one head per stream");
        self.heads[i] = Some(item);
        self.heap.push(Reverse((ts, i)));
    }

    /// The oldest head and the stream it came from (which must then offer its next record).
    pub fn pop(&mut self) -> Option<(usize, T)> {
        let Reverse((_, i)) = self.heap.pop()?;
        self.heads[i].take().map(|t| (i, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn run(policy: LatePolicy, window: u64, cap: usize, input: &[u64]) -> (Vec<u64>, u64, u64) {
        let mut r = Reorder::new(window, cap, policy);
        let mut out = Vec::new();
        for &ts in input {
            r.push(ts, ts, |t, v| *t = v);
            while let Some(t) = r.pop_ready() {
                out.push(t);
            }
        }
        while let Some(t) = r.pop_any() {
            out.push(t);
        }
        (out, r.late, r.overflow)
    }

    #[test]
    fn out_of_order_within_window_comes_out_sorted() {
        let input = [
            10 * S,
            12 * S,
            11 * S,
            15 * S,
            13 * S,
            30 * S,
            25 * S,
            40 * S,
        ];
        let (out, late, _) = run(LatePolicy::Drop, 10 * S, 1000, &input);
        let mut sorted = input.to_vec();
        sorted.sort();
        assert_eq!(out, sorted);
        assert_eq!(late, 0);
    }

    #[test]
    fn record_later_than_window_is_counted_and_dropped() {
        // 100 s releases 10 s; 5 s then arrives behind an already released record.
        let input = [10 * S, 100 * S, 5 * S, 101 * S];
        let (out, late, _) = run(LatePolicy::Drop, 10 * S, 1000, &input);
        assert_eq!(out, vec![10 * S, 100 * S, 101 * S]);
        assert_eq!(late, 1);
    }

    #[test]
    fn clamp_policy_passes_late_record_with_raised_timestamp() {
        let input = [10 * S, 100 * S, 5 * S, 101 * S];
        let (out, late, _) = run(LatePolicy::Clamp, 10 * S, 1000, &input);
        assert_eq!(out, vec![10 * S, 10 * S, 100 * S, 101 * S]);
        assert_eq!(late, 1);
        assert!(out.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn count_cap_bounds_the_buffer_and_counts_overflow() {
        // All within one window, but at most 4 may wait.
        let input: Vec<u64> = (0..100).map(|i| 1000 - i).collect();
        let mut r = Reorder::new(u64::MAX / 2, 4, LatePolicy::Drop);
        for &ts in &input {
            r.push(ts, ts, |_, _| {});
            while r.pop_ready().is_some() {}
            assert!(r.len() <= 4);
        }
        assert!(r.overflow > 0);
        assert!(r.late > 0, "descending input beyond the cap must be late");
    }

    #[test]
    fn equal_timestamps_keep_arrival_order() {
        let mut r = Reorder::new(S, 100, LatePolicy::Drop);
        for i in 0..5u64 {
            r.push(7, i, |_, _| {});
        }
        let out: Vec<u64> = std::iter::from_fn(|| r.pop_any()).collect();
        assert_eq!(out, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn merge_interleaves_sorted_streams_by_time_then_stream() {
        let streams = [vec![1, 4, 4, 9], vec![2, 4, 10], vec![]];
        let mut iters: Vec<_> = streams.iter().map(|s| s.iter().copied()).collect();
        let mut m = Merge::new(iters.len());
        for (i, it) in iters.iter_mut().enumerate() {
            if let Some(t) = it.next() {
                m.offer(i, t, (t, i));
            }
        }
        let mut out = Vec::new();
        while let Some((i, item)) = m.pop() {
            out.push(item);
            if let Some(t) = iters[i].next() {
                m.offer(i, t, (t, i));
            }
        }
        assert_eq!(
            out,
            vec![(1, 0), (2, 1), (4, 0), (4, 0), (4, 1), (9, 0), (10, 1)]
        );
    }
}
