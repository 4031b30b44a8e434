//! The userspace side of blocking: the block and allow maps the XDP program reads.
//!
//! Blocks are source prefixes with an expiry on the kernel's monotonic clock, so they end on
//! time even if this process is gone. The allowlist always wins, in the kernel and here.
//! Blocks go to hash tables keyed by (prefix, prefix length) (array maps used as hash tables,
//! see [`ExactTable`]), which the kernel searches much faster than a trie: one bucket per
//! prefix length in use, up to [`HASHED_LENGTHS`] lengths per family. A block whose bucket is
//! full, or of a length beyond those, goes to the LPM trie. Callers never see the difference.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use agent_common::{
    BlockEntry, Bucket, EXACT_WAYS, Enforcement, ExactSlotV4, ExactSlotV6, FLAG_ALLOW_V4,
    FLAG_ALLOW_V6, FLAG_BLOCK_V4, FLAG_BLOCK_V6, HASHED_LENGTHS, exact_bucket_v4, exact_bucket_v6,
    prefix_v4, prefix_v6,
};
use aya::{
    Ebpf,
    maps::{Array, LpmTrie, MapData, MapError, lpm_trie::Key},
};
use ipnet::IpNet;
use serde::Serialize;

use crate::{capture::CaptureError, clock};

type Trie<K, V> = LpmTrie<MapData, K, V>;

/// Owner of the six block/allow maps, and of the `ENFORCE` entry telling the kernel which of
/// them hold entries (it skips lookups in empty ones) and which prefix lengths to probe.
pub struct Enforcer {
    exact_v4: ExactTable<ExactSlotV4>,
    exact_v6: ExactTable<ExactSlotV6>,
    block_v4: Trie<[u8; 4], BlockEntry>,
    block_v6: Trie<[u8; 16], BlockEntry>,
    allow_v4: Trie<[u8; 4], u8>,
    allow_v6: Trie<[u8; 16], u8>,
    state: Array<MapData, Enforcement>,
    /// The keys of the block and allow maps. A trie lookup is a longest-prefix match and
    /// cannot say whether an exact key exists; this mirror can, and gives the FLAG_* bits.
    blocked: HashSet<IpNet>,
    allowed: HashSet<IpNet>,
    /// Blocks held by a trie rather than a hash table (their bucket was full, their length
    /// was not served, or an earlier version put them there).
    in_trie: HashSet<IpNet>,
}

/// One block as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Block {
    pub net: IpNet,
    /// Time left; zero once expired (the kernel already ignores it; `sweep` removes it).
    #[serde(with = "humantime_serde_secs")]
    pub remaining: Duration,
    /// Packets dropped because of this entry.
    pub dropped: u64,
}

/// A change to apply in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockOp {
    Block { net: IpNet, ttl: Duration },
    Unblock { net: IpNet },
}

/// The widest prefixes a block may cover: the kernel drops every packet from a blocked
/// prefix, so a wider one (most likely a slip, /0 for /32) would cut off the API's clients and
/// the operator's own session alike.
const MIN_PREFIX_V4: u8 = 8;
const MIN_PREFIX_V6: u8 = 16;

/// Refusals and map failures.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnforceError {
    #[error(
        "{net} is covered by the allowlist entry {allow}; allowlisted clients are never blocked"
    )]
    Allowlisted { net: IpNet, allow: IpNet },
    #[error("block TTL must be positive")]
    ZeroTtl,
    #[error(
        "block TTL {} is longer than {}; blocks always end",
        humantime::format_duration(*.ttl),
        crate::decide::max_block_ttl_text()
    )]
    TtlTooLong { ttl: Duration },
    #[error(
        "{net} is wider than /{min}, the widest prefix a block may cover (a slip such as /0 for /32 would drop everyone)"
    )]
    TooWide { net: IpNet, min: u8 },
    #[error("BPF map {map}: {detail}")]
    Map { map: &'static str, detail: String },
}

impl Enforcer {
    /// Takes the block and allow maps out of `ebpf`. `reused`: the maps may hold entries from
    /// an earlier run (pinned), so the exact tables are scanned for occupied slots.
    pub(crate) fn from_ebpf(ebpf: &mut Ebpf, reused: bool) -> Result<Self, CaptureError> {
        fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
            ebpf.take_map(name).ok_or(CaptureError::Map {
                map: name,
                detail: "missing from the object".into(),
            })
        }
        fn trie<K: aya::Pod, V: aya::Pod>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<Trie<K, V>, CaptureError> {
            LpmTrie::try_from(take(ebpf, name)?).map_err(capture_err(name))
        }
        fn exact<S: Slot>(
            ebpf: &mut Ebpf,
            name: &'static str,
            reused: bool,
        ) -> Result<ExactTable<S>, CaptureError> {
            let map = Array::try_from(take(ebpf, name)?).map_err(capture_err(name))?;
            ExactTable::new(map, reused).map_err(capture_err(name))
        }
        let state = Array::try_from(take(ebpf, "ENFORCE")?).map_err(capture_err("ENFORCE"))?;
        let mut me = Self {
            exact_v4: exact(ebpf, "BLOCK_EXACT_V4", reused)?,
            exact_v6: exact(ebpf, "BLOCK_EXACT_V6", reused)?,
            block_v4: trie(ebpf, "BLOCK_V4")?,
            block_v6: trie(ebpf, "BLOCK_V6")?,
            allow_v4: trie(ebpf, "ALLOW_V4")?,
            allow_v6: trie(ebpf, "ALLOW_V6")?,
            state,
            blocked: HashSet::new(),
            allowed: HashSet::new(),
            in_trie: HashSet::new(),
        };
        // Pinned maps may arrive with entries from an earlier run.
        let key_net = |data: IpAddr, len: u32| IpNet::new(data, len as u8).ok();
        let in_tries: Vec<IpNet> = me
            .block_v4
            .keys()
            .flatten()
            .filter_map(|k| key_net(k.data().into(), k.prefix_len()))
            .chain(
                me.block_v6
                    .keys()
                    .flatten()
                    .filter_map(|k| key_net(k.data().into(), k.prefix_len())),
            )
            .collect();
        me.in_trie = in_tries.iter().copied().collect();
        me.blocked.extend(in_tries);
        let in_tables = me.exact_v4.slots.values().chain(me.exact_v6.slots.values());
        me.blocked.extend(in_tables.copied());
        me.allowed.extend(
            me.allow_v4
                .keys()
                .flatten()
                .filter_map(|k| key_net(k.data().into(), k.prefix_len())),
        );
        me.allowed.extend(
            me.allow_v6
                .keys()
                .flatten()
                .filter_map(|k| key_net(k.data().into(), k.prefix_len())),
        );
        me.write_state().map_err(|e| CaptureError::Map {
            map: "ENFORCE",
            detail: e.to_string(),
        })?;
        Ok(me)
    }

    /// Tells the kernel which maps hold entries and which prefix lengths the hash tables
    /// serve (longest first, so a drop is counted on the narrowest live block).
    fn write_state(&mut self) -> Result<(), EnforceError> {
        let mut st = Enforcement::default();
        for n in &self.in_trie {
            st.flags |= match n {
                IpNet::V4(_) => FLAG_BLOCK_V4,
                IpNet::V6(_) => FLAG_BLOCK_V6,
            };
        }
        for n in &self.allowed {
            st.flags |= match n {
                IpNet::V4(_) => FLAG_ALLOW_V4,
                IpNet::V6(_) => FLAG_ALLOW_V6,
            };
        }
        st.lengths_v4 = self.exact_v4.lengths.len() as u8;
        for (slot, hb) in st.host_bits_v4.iter_mut().zip(self.exact_v4.lengths.keys()) {
            *slot = *hb;
        }
        st.lengths_v6 = self.exact_v6.lengths.len() as u8;
        for (slot, hb) in st.host_bits_v6.iter_mut().zip(self.exact_v6.lengths.keys()) {
            *slot = *hb;
        }
        self.state.set(0, st, 0).map_err(map_err("enforce state"))
    }

    /// Writes a block entry: in its hash table unless it is already in the trie, its length
    /// is not served (all [`HASHED_LENGTHS`] taken by others) or its bucket is full; else in
    /// the trie. True when the prefix lengths the kernel must probe changed.
    fn insert_block(&mut self, net: IpNet, entry: BlockEntry) -> Result<bool, MapError> {
        if !self.in_trie.contains(&net) {
            let placed = match net {
                IpNet::V4(n) => self.exact_v4.insert(n.addr(), n.prefix_len(), entry)?,
                IpNet::V6(n) => self.exact_v6.insert(n.addr(), n.prefix_len(), entry)?,
            };
            if let Some(new_length) = placed {
                return Ok(new_length);
            }
            tracing::debug!(%net, "hash bucket full or prefix length not served; block kept in the trie");
        }
        insert_net(&mut self.block_v4, &mut self.block_v6, net, entry)?;
        Ok(self.in_trie.insert(net))
    }

    /// Removes the block of exactly `net`, wherever it is; false when there was none.
    fn remove_block(&mut self, net: IpNet) -> Result<bool, MapError> {
        if !self.in_trie.contains(&net) {
            return match net {
                IpNet::V4(n) => self.exact_v4.remove(n.addr(), n.prefix_len()),
                IpNet::V6(n) => self.exact_v6.remove(n.addr(), n.prefix_len()),
            };
        }
        match remove_net(&mut self.block_v4, &mut self.block_v6, net) {
            Ok(()) => {
                self.in_trie.remove(&net);
                Ok(true)
            }
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Blocks `net` for `ttl` (replacing any block of the same prefix). Refused when an
    /// allowlist entry covers all of `net`; allowlisted parts of a wider block stay reachable
    /// because the kernel checks the allowlist before dropping.
    pub fn block(&mut self, net: IpNet, ttl: Duration) -> Result<(), EnforceError> {
        if ttl.is_zero() {
            return Err(EnforceError::ZeroTtl);
        }
        if ttl > crate::decide::MAX_BLOCK_TTL {
            return Err(EnforceError::TtlTooLong { ttl });
        }
        let min = match net {
            IpNet::V4(_) => MIN_PREFIX_V4,
            IpNet::V6(_) => MIN_PREFIX_V6,
        };
        if net.prefix_len() < min {
            return Err(EnforceError::TooWide { net, min });
        }
        let net = net.trunc();
        if let Some(allow) = self.allow_covering(net) {
            return Err(EnforceError::Allowlisted { net, allow });
        }
        let expires_ns =
            clock::monotonic_ns().saturating_add(ttl.as_nanos().min(u64::MAX as u128) as u64);
        let entry = BlockEntry {
            expires_ns,
            dropped: 0,
        };
        let changed = self.insert_block(net, entry).map_err(map_err("block"))?;
        if self.blocked.insert(net) || changed {
            self.write_state()?;
        }
        tracing::info!(%net, ttl = %humantime::format_duration(ttl), "blocked");
        Ok(())
    }

    /// Writes a block with a known expiry and drop count (moved from an earlier map layout).
    /// An expired one is dropped: the kernel would ignore it anyway.
    pub(crate) fn restore(&mut self, net: IpNet, entry: BlockEntry) -> Result<(), EnforceError> {
        if entry.expires_ns <= clock::monotonic_ns() {
            return Ok(());
        }
        let net = net.trunc();
        let changed = self.insert_block(net, entry).map_err(map_err("block"))?;
        if self.blocked.insert(net) || changed {
            self.write_state()?;
        }
        Ok(())
    }

    /// Removes the block of exactly `net`; false when there was none.
    pub fn unblock(&mut self, net: IpNet) -> Result<bool, EnforceError> {
        let net = net.trunc();
        if !self.remove_block(net).map_err(map_err("block"))? {
            return Ok(false);
        }
        self.blocked.remove(&net);
        self.write_state()?;
        tracing::info!(%net, "unblocked");
        Ok(true)
    }

    /// Block entries in the maps (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.blocked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocked.is_empty()
    }

    /// Every block entry, expired ones included (with zero time left).
    pub fn blocks(&self) -> Result<Vec<Block>, EnforceError> {
        let now = clock::monotonic_ns();
        let block = |addr: IpAddr, len: u32, e: BlockEntry| -> Result<Block, EnforceError> {
            Ok(Block {
                net: IpNet::new(addr, len as u8).map_err(|e| EnforceError::Map {
                    map: "block",
                    detail: e.to_string(),
                })?,
                remaining: Duration::from_nanos(e.expires_ns.saturating_sub(now)),
                dropped: e.dropped,
            })
        };
        let mut out = Vec::with_capacity(self.blocked.len());
        for (n, e) in self.exact_v4.entries().map_err(map_err("block"))? {
            out.push(block(n.addr(), n.prefix_len().into(), e)?);
        }
        for (n, e) in self.exact_v6.entries().map_err(map_err("block"))? {
            out.push(block(n.addr(), n.prefix_len().into(), e)?);
        }
        for item in self.block_v4.iter() {
            let (k, e) = item.map_err(map_err("block"))?;
            out.push(block(k.data().into(), k.prefix_len(), e)?);
        }
        for item in self.block_v6.iter() {
            let (k, e) = item.map_err(map_err("block"))?;
            out.push(block(k.data().into(), k.prefix_len(), e)?);
        }
        out.sort_by_key(|b| b.net);
        Ok(out)
    }

    /// Removes expired blocks; returns how many. The kernel ignores them already; this keeps
    /// the maps from filling up with dead entries.
    pub fn sweep(&mut self) -> Result<usize, EnforceError> {
        let expired: Vec<IpNet> = self
            .blocks()?
            .into_iter()
            .filter(|b| b.remaining.is_zero())
            .map(|b| b.net)
            .collect();
        for net in &expired {
            self.unblock(*net)?;
        }
        Ok(expired.len())
    }

    /// Applies several changes; each succeeds or fails on its own (results in order).
    pub fn apply(&mut self, ops: &[BlockOp]) -> Vec<Result<(), EnforceError>> {
        ops.iter()
            .map(|op| match op {
                BlockOp::Block { net, ttl } => self.block(*net, *ttl),
                BlockOp::Unblock { net } => self.unblock(*net).map(|_| ()),
            })
            .collect()
    }

    /// Adds `net` to the allowlist. Existing blocks inside it stop applying at once (the
    /// kernel checks the allowlist on every blocked packet).
    pub fn allow(&mut self, net: IpNet) -> Result<(), EnforceError> {
        let net = net.trunc();
        insert_net(&mut self.allow_v4, &mut self.allow_v6, net, 1u8).map_err(map_err("allow"))?;
        if self.allowed.insert(net) {
            self.write_state()?;
        }
        tracing::info!(%net, "allowlisted");
        Ok(())
    }

    /// Removes exactly `net` from the allowlist; false when it was not there.
    pub fn disallow(&mut self, net: IpNet) -> Result<bool, EnforceError> {
        let net = net.trunc();
        let r = remove_net(&mut self.allow_v4, &mut self.allow_v6, net);
        match r {
            Ok(()) => {
                self.allowed.remove(&net);
                self.write_state()?;
                Ok(true)
            }
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err("allow")(e)),
        }
    }

    pub fn allowlist(&self) -> Result<Vec<IpNet>, EnforceError> {
        let mut out = Vec::new();
        for k in self.allow_v4.keys() {
            let k = k.map_err(map_err("allow"))?;
            out.extend(IpNet::new(IpAddr::from(k.data()), k.prefix_len() as u8).ok());
        }
        for k in self.allow_v6.keys() {
            let k = k.map_err(map_err("allow"))?;
            out.extend(IpNet::new(IpAddr::from(k.data()), k.prefix_len() as u8).ok());
        }
        out.sort();
        Ok(out)
    }

    /// Is `ip` covered by the allowlist?
    pub fn is_allowlisted(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.allow_v4.get(&Key::new(32, a.octets()), 0).is_ok(),
            IpAddr::V6(a) => self.allow_v6.get(&Key::new(128, a.octets()), 0).is_ok(),
        }
    }

    /// An allowlist entry that contains all of `net`.
    fn allow_covering(&self, net: IpNet) -> Option<IpNet> {
        if !self.is_allowlisted(net.network()) {
            return None;
        }
        self.allowlist()
            .ok()?
            .into_iter()
            .find(|a| a.contains(&net))
    }
}

/// What the kernel's hash tables hold per slot, and how a prefix picks its bucket (the hash
/// functions are shared with the XDP program through agent-common).
trait Slot: aya::Pod + Default {
    type Addr: Copy + Into<IpAddr>;
    /// Address bits of the family (32, 128).
    const BITS: u8;
    /// A slot for the prefix of `addr` with `host_bits` host bits (cleared here).
    fn new(addr: Self::Addr, host_bits: u8, entry: BlockEntry) -> Self;
    fn entry(&self) -> BlockEntry;
    /// The prefix the slot holds, as a network.
    fn net(&self) -> Option<IpNet>;
    /// The bucket of the prefix of `addr` with `host_bits` host bits.
    fn bucket(addr: Self::Addr, host_bits: u8) -> u32;
}

impl Slot for ExactSlotV4 {
    type Addr = Ipv4Addr;
    const BITS: u8 = 32;
    fn new(addr: Ipv4Addr, host_bits: u8, entry: BlockEntry) -> Self {
        Self {
            addr: prefix_v4(u32::from_ne_bytes(addr.octets()), host_bits.into()),
            host_bits: host_bits.into(),
            entry,
        }
    }
    fn entry(&self) -> BlockEntry {
        self.entry
    }
    fn net(&self) -> Option<IpNet> {
        let addr = Ipv4Addr::from(self.addr.to_ne_bytes());
        let len = 32u32.checked_sub(self.host_bits)?;
        IpNet::new(addr.into(), len as u8).ok()
    }
    fn bucket(addr: Ipv4Addr, host_bits: u8) -> u32 {
        let hb = host_bits.into();
        exact_bucket_v4(prefix_v4(u32::from_ne_bytes(addr.octets()), hb), hb)
    }
}

impl Slot for ExactSlotV6 {
    type Addr = Ipv6Addr;
    const BITS: u8 = 128;
    fn new(addr: Ipv6Addr, host_bits: u8, entry: BlockEntry) -> Self {
        Self {
            addr: prefix_v6(v6_words(addr), host_bits.into()),
            host_bits: host_bits.into(),
            _pad: 0,
            entry,
        }
    }
    fn entry(&self) -> BlockEntry {
        self.entry
    }
    fn net(&self) -> Option<IpNet> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr[0].to_ne_bytes());
        b[8..].copy_from_slice(&self.addr[1].to_ne_bytes());
        let len = 128u32.checked_sub(self.host_bits)?;
        IpNet::new(Ipv6Addr::from(b).into(), len as u8).ok()
    }
    fn bucket(addr: Ipv6Addr, host_bits: u8) -> u32 {
        let hb = host_bits.into();
        exact_bucket_v6(prefix_v6(v6_words(addr), hb), hb)
    }
}

/// The 16 address bytes as the two native-order words the kernel compares.
fn v6_words(addr: Ipv6Addr) -> [u64; 2] {
    let o = addr.octets();
    let word = |i: usize| u64::from_ne_bytes(o[i..i + 8].try_into().expect("8 bytes"));
    [word(0), word(8)]
}

/// A hash table of blocks keyed by (prefix, prefix length): an array map used as a hash table
/// with buckets of `EXACT_WAYS` consecutive slots, which the XDP program searches with inlined
/// array lookups, one bucket per prefix length in `lengths`. The map is the truth; `slots`
/// indexes its occupied slots, so placing and listing entries need no scan of the whole map.
///
/// A slot write is a plain copy, not atomic against the program reading it: a packet racing
/// an update may see the old or new prefix with the old or new expiry. Either way it is
/// judged by an entry that existed (or by none, as for an empty slot, whose expiry of 0 the
/// program skips), and a drop counted during a rewrite of the same slot may be lost.
struct ExactTable<S: Slot> {
    map: Array<MapData, Bucket<S>>,
    slots: HashMap<u32, IpNet>,
    /// Entries per prefix length (as host bits), for the lengths the table serves (at most
    /// [`HASHED_LENGTHS`]); ascending host bits is longest prefix first.
    lengths: BTreeMap<u8, u32>,
}

impl<S: Slot> ExactTable<S> {
    /// `scan`: read every slot for entries left by an earlier run (pinned maps).
    fn new(map: Array<MapData, Bucket<S>>, scan: bool) -> Result<Self, MapError> {
        let mut me = Self {
            map,
            slots: HashMap::new(),
            lengths: BTreeMap::new(),
        };
        if scan {
            let mut found = Vec::new();
            for (b, bucket) in me.map.iter().enumerate() {
                for (way, slot) in bucket?.slots.iter().enumerate() {
                    if slot.entry().expires_ns != 0
                        && let Some(net) = slot.net()
                    {
                        found.push((b as u32 * EXACT_WAYS + way as u32, net));
                    }
                }
            }
            for (i, net) in found {
                me.slots.insert(i, net);
                *me.lengths.entry(S::BITS - net.prefix_len()).or_default() += 1;
            }
        }
        Ok(me)
    }

    fn bucket_slots(addr: S::Addr, host_bits: u8) -> std::ops::Range<u32> {
        let first = S::bucket(addr, host_bits) * EXACT_WAYS;
        first..first + EXACT_WAYS
    }

    /// The slot holding the block of `addr`/`len` (`addr` with host bits cleared).
    fn find(&self, addr: S::Addr, len: u8) -> Option<u32> {
        let net = IpNet::new(addr.into(), len).ok()?;
        Self::bucket_slots(addr, S::BITS - len).find(|i| self.slots.get(i) == Some(&net))
    }

    /// Writes the block of `addr`/`len` (in place if it has one). `None` when its bucket is
    /// full or its length is not served; else whether its length is newly served.
    fn insert(
        &mut self,
        addr: S::Addr,
        len: u8,
        entry: BlockEntry,
    ) -> Result<Option<bool>, MapError> {
        let host_bits = S::BITS - len;
        let Ok(net) = IpNet::new(addr.into(), len) else {
            return Ok(None);
        };
        if let Some(slot) = self.find(addr, len) {
            self.write(slot, S::new(addr, host_bits, entry))?;
            return Ok(Some(false));
        }
        let served = self.lengths.contains_key(&host_bits);
        if !served && self.lengths.len() >= HASHED_LENGTHS {
            return Ok(None);
        }
        let Some(slot) = Self::bucket_slots(addr, host_bits).find(|i| !self.slots.contains_key(i))
        else {
            return Ok(None);
        };
        self.write(slot, S::new(addr, host_bits, entry))?;
        self.slots.insert(slot, net);
        *self.lengths.entry(host_bits).or_default() += 1;
        Ok(Some(!served))
    }

    /// Empties the slot of `addr`/`len`; false when it had none.
    fn remove(&mut self, addr: S::Addr, len: u8) -> Result<bool, MapError> {
        let Some(slot) = self.find(addr, len) else {
            return Ok(false);
        };
        self.write(slot, S::default())?;
        self.slots.remove(&slot);
        let host_bits = S::BITS - len;
        if let Some(n) = self.lengths.get_mut(&host_bits) {
            *n -= 1;
            if *n == 0 {
                self.lengths.remove(&host_bits);
            }
        }
        Ok(true)
    }

    /// Writes one slot (slot ids are bucket × ways + way). The whole bucket is rewritten, its
    /// other slots with the bytes they already hold, so a packet reading it meanwhile sees
    /// them unchanged.
    fn write(&mut self, slot: u32, value: S) -> Result<(), MapError> {
        let index = slot / EXACT_WAYS;
        let mut bucket = self.map.get(&index, 0)?;
        bucket.slots[(slot % EXACT_WAYS) as usize] = value;
        self.map.set(index, bucket, 0)
    }

    /// Every occupied slot's prefix and entry, as the kernel holds them now.
    fn entries(&self) -> Result<Vec<(IpNet, BlockEntry)>, MapError> {
        self.slots
            .iter()
            .map(|(i, n)| {
                let bucket = self.map.get(&(i / EXACT_WAYS), 0)?;
                Ok((*n, bucket.slots[(i % EXACT_WAYS) as usize].entry()))
            })
            .collect()
    }
}

/// Inserts `value` under `net` in the trie of its address family.
fn insert_net<V: aya::Pod>(
    v4: &mut Trie<[u8; 4], V>,
    v6: &mut Trie<[u8; 16], V>,
    net: IpNet,
    value: V,
) -> Result<(), MapError> {
    match net {
        IpNet::V4(n) => v4.insert(
            &Key::new(n.prefix_len().into(), n.addr().octets()),
            value,
            0,
        ),
        IpNet::V6(n) => v6.insert(
            &Key::new(n.prefix_len().into(), n.addr().octets()),
            value,
            0,
        ),
    }
}

/// Removes exactly `net` from the trie of its address family.
fn remove_net<V: aya::Pod>(
    v4: &mut Trie<[u8; 4], V>,
    v6: &mut Trie<[u8; 16], V>,
    net: IpNet,
) -> Result<(), MapError> {
    match net {
        IpNet::V4(n) => v4.remove(&Key::new(n.prefix_len().into(), n.addr().octets())),
        IpNet::V6(n) => v6.remove(&Key::new(n.prefix_len().into(), n.addr().octets())),
    }
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn capture_err<E: std::fmt::Display>(map: &'static str) -> impl Fn(E) -> CaptureError {
    move |e| CaptureError::Map {
        map,
        detail: e.to_string(),
    }
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> EnforceError {
    move |e| EnforceError::Map {
        map,
        detail: e.to_string(),
    }
}

/// Durations serialise as whole seconds in JSON (`remaining_secs` reads well in scripts).
mod humantime_serde_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}
