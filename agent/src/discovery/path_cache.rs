//! Raw request path → operation, for paths seen before: most traffic repeats a modest set of
//! literal paths (`GET /login`, `GET /api/v2/orders/list`), and one hash of the raw path and one
//! byte comparison cost far less than splitting it, classifying each segment and looking each
//! up in the trie (a hash and a string comparison per segment).
//!
//! The cache only answers what the trie walk would: [`super::Discovery`] fills it with walks
//! that went through literal positions only and changed no counter but the operation's own
//! count, and invalidates it (see [`PathCache::invalidate`]) whenever the trie or the templates
//! change in a way that could map a path it holds elsewhere. Literal-only paths are bounded by
//! the trie (each is a distinct chain of literal nodes under a cardinality threshold), so
//! high-cardinality values (`/users/12345`) never get in; the explicit caps below bound it
//! anyway, whatever the traffic: when an insert would pass either, the cache starts afresh.

use std::hash::BuildHasher as _;

use hashbrown::HashTable;
use smallvec::SmallVec;

use super::OpId;
use crate::http::Method;

/// Entries at most.
pub(super) const MAX_ENTRIES: usize = 16_384;
/// Bytes of host and path text at most (on top of the per-entry overhead).
pub(super) const MAX_TEXT_BYTES: usize = 1 << 20;
/// Longer host + path are not cached (they would take a large share of the text budget).
const MAX_KEY_BYTES: usize = 512;
/// Host + path bytes kept in the entry itself: a lookup then reads one place, not the entry
/// and a separate allocation (a cache miss that cost as much as the rest of the lookup).
const INLINE_BYTES: usize = 48;

struct Entry {
    method: Method,
    /// `text` is the host (empty when hosts are not in names) followed by the path.
    host_len: u32,
    text: SmallVec<[u8; INLINE_BYTES]>,
    op: OpId,
}

impl Entry {
    fn is(&self, method: Method, host: &str, path: &str) -> bool {
        let (h, p) = self.text.split_at(self.host_len as usize);
        self.method == method && h == host.as_bytes() && p == path.as_bytes()
    }
}

/// See the module docs. Not persisted: it is rebuilt from traffic.
#[derive(Default)]
pub(super) struct PathCache {
    table: HashTable<Entry>,
    hasher: hashbrown::DefaultHashBuilder,
    text_bytes: usize,
}

impl PathCache {
    /// Hashed as bytes, like the entries' text when the table grows and rehashes them.
    fn hash(&self, method: Method, host: &str, path: &str) -> u64 {
        self.hasher
            .hash_one((method, host.as_bytes(), path.as_bytes()))
    }

    pub(super) fn get(&self, method: Method, host: &str, path: &str) -> Option<OpId> {
        let h = self.hash(method, host, path);
        self.table
            .find(h, |e| e.is(method, host, path))
            .map(|e| e.op)
    }

    /// Remembers `op` for the request; starts afresh first if the caps would be passed.
    pub(super) fn insert(&mut self, method: Method, host: &str, path: &str, op: OpId) {
        let bytes = host.len() + path.len();
        if bytes > MAX_KEY_BYTES {
            return;
        }
        if self.table.len() >= MAX_ENTRIES || self.text_bytes + bytes > MAX_TEXT_BYTES {
            self.invalidate();
        }
        let h = self.hash(method, host, path);
        if self.table.find(h, |e| e.is(method, host, path)).is_some() {
            return;
        }
        let mut text = SmallVec::with_capacity(bytes);
        text.extend_from_slice(host.as_bytes());
        text.extend_from_slice(path.as_bytes());
        let hasher = &self.hasher;
        self.table.insert_unique(
            h,
            Entry {
                method,
                host_len: host.len() as u32,
                text,
                op,
            },
            |e| {
                let (h, p) = e.text.split_at(e.host_len as usize);
                hasher.hash_one((e.method, h, p))
            },
        );
        self.text_bytes += bytes;
    }

    /// Forgets everything (the trie changed under it, or it is full).
    pub(super) fn invalidate(&mut self) {
        self.table.clear();
        self.text_bytes = 0;
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    #[cfg(test)]
    pub(super) fn text_bytes(&self) -> usize {
        self.text_bytes
    }
}

/// A cache is not state: clones start empty (the copy's trie fills it again).
impl Clone for PathCache {
    fn clone(&self) -> Self {
        PathCache::default()
    }
}

impl std::fmt::Debug for PathCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathCache")
            .field("entries", &self.table.len())
            .field("text_bytes", &self.text_bytes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_only_the_exact_request_it_holds() {
        let mut c = PathCache::default();
        c.insert(Method::Get, "", "/a/b", OpId(1));
        c.insert(Method::Get, "h", "/a/b", OpId(2));
        assert_eq!(c.get(Method::Get, "", "/a/b"), Some(OpId(1)));
        assert_eq!(c.get(Method::Get, "h", "/a/b"), Some(OpId(2)));
        assert_eq!(c.get(Method::Post, "", "/a/b"), None);
        assert_eq!(c.get(Method::Get, "", "/a/b/"), None);
        assert_eq!(c.get(Method::Get, "", "/a"), None);
        // The host/path split is part of the key: "h" + "/x" is not "" + "h/x".
        c.insert(Method::Get, "", "h/x", OpId(3));
        assert_eq!(c.get(Method::Get, "h", "/x"), None);
        assert_eq!(c.len(), 3);
        c.invalidate();
        assert_eq!(c.get(Method::Get, "", "/a/b"), None);
        assert_eq!((c.len(), c.text_bytes()), (0, 0));
    }

    #[test]
    fn a_flood_of_distinct_paths_stays_under_the_caps() {
        let mut c = PathCache::default();
        let long = "x".repeat(400);
        for i in 0..200_000u32 {
            let path = if i % 2 == 0 {
                format!("/{i}")
            } else {
                format!("/{long}/{i}")
            };
            c.insert(Method::Get, "", &path, OpId(i));
            assert!(c.len() <= MAX_ENTRIES);
            assert!(c.text_bytes() <= MAX_TEXT_BYTES);
            // What was just inserted is there (the cache starts afresh, it does not refuse).
            assert_eq!(c.get(Method::Get, "", &path), Some(OpId(i)));
        }
        // Keys too long to be worth their bytes are never held.
        c.insert(Method::Get, "", &"y".repeat(MAX_KEY_BYTES + 1), OpId(0));
        assert_eq!(c.get(Method::Get, "", &"y".repeat(MAX_KEY_BYTES + 1)), None);
    }
}
