//! The userspace side of blocking: the LPM-trie block and allow maps the XDP program reads.
//!
//! Blocks are source prefixes with an expiry on the kernel's monotonic clock, so they end on
//! time even if this process is gone. The allowlist always wins, in the kernel and here.
use std::{collections::HashSet, net::IpAddr, time::Duration};

use agent_common::{BlockEntry, FLAG_ALLOW_V4, FLAG_ALLOW_V6, FLAG_BLOCK_V4, FLAG_BLOCK_V6};
use aya::{
    Ebpf,
    maps::{Array, LpmTrie, MapData, MapError, lpm_trie::Key},
};
use ipnet::IpNet;
use serde::Serialize;

use crate::{capture::CaptureError, clock};

type Trie<K, V> = LpmTrie<MapData, K, V>;

/// Owner of the four block/allow maps, and of the flags telling the kernel which of them
/// hold entries (it skips lookups in empty ones).
pub struct Enforcer {
    block_v4: Trie<[u8; 4], BlockEntry>,
    block_v6: Trie<[u8; 16], BlockEntry>,
    allow_v4: Trie<[u8; 4], u8>,
    allow_v6: Trie<[u8; 16], u8>,
    flags: Array<MapData, u32>,
    /// The keys of the block and allow maps. A trie lookup is a longest-prefix match and
    /// cannot say whether an exact key exists; this mirror can, and gives the FLAG_* bits.
    blocked: HashSet<IpNet>,
    allowed: HashSet<IpNet>,
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

/// Refusals and map failures.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnforceError {
    #[error(
        "{net} is covered by the allowlist entry {allow}; allowlisted clients are never blocked"
    )]
    Allowlisted { net: IpNet, allow: IpNet },
    #[error("block TTL must be positive")]
    ZeroTtl,
    #[error("BPF map {map}: {detail}")]
    Map { map: &'static str, detail: String },
}

impl Enforcer {
    pub(crate) fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, CaptureError> {
        fn take<K: aya::Pod, V: aya::Pod>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<Trie<K, V>, CaptureError> {
            let map = ebpf.take_map(name).ok_or(CaptureError::Map {
                map: name,
                detail: "missing from the object".into(),
            })?;
            LpmTrie::try_from(map).map_err(|e| CaptureError::Map {
                map: name,
                detail: e.to_string(),
            })
        }
        let flags_map = ebpf.take_map("ENFORCE_FLAGS").ok_or(CaptureError::Map {
            map: "ENFORCE_FLAGS",
            detail: "missing from the object".into(),
        })?;
        let flags = Array::try_from(flags_map).map_err(|e| CaptureError::Map {
            map: "ENFORCE_FLAGS",
            detail: e.to_string(),
        })?;
        let mut me = Self {
            block_v4: take(ebpf, "BLOCK_V4")?,
            block_v6: take(ebpf, "BLOCK_V6")?,
            allow_v4: take(ebpf, "ALLOW_V4")?,
            allow_v6: take(ebpf, "ALLOW_V6")?,
            flags,
            blocked: HashSet::new(),
            allowed: HashSet::new(),
        };
        // Pinned maps may arrive with entries from an earlier run.
        let key_net = |data: IpAddr, len: u32| IpNet::new(data, len as u8).ok();
        me.blocked.extend(
            me.block_v4
                .keys()
                .flatten()
                .filter_map(|k| key_net(k.data().into(), k.prefix_len())),
        );
        me.blocked.extend(
            me.block_v6
                .keys()
                .flatten()
                .filter_map(|k| key_net(k.data().into(), k.prefix_len())),
        );
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
        me.write_flags().map_err(|e| CaptureError::Map {
            map: "ENFORCE_FLAGS",
            detail: e.to_string(),
        })?;
        Ok(me)
    }

    /// Tells the kernel which maps hold entries.
    fn write_flags(&mut self) -> Result<(), EnforceError> {
        let any =
            |set: &HashSet<IpNet>, v4: bool| set.iter().any(|n| matches!(n, IpNet::V4(_)) == v4);
        let mut bits = 0;
        for (set, v4, bit) in [
            (&self.blocked, true, FLAG_BLOCK_V4),
            (&self.blocked, false, FLAG_BLOCK_V6),
            (&self.allowed, true, FLAG_ALLOW_V4),
            (&self.allowed, false, FLAG_ALLOW_V6),
        ] {
            if any(set, v4) {
                bits |= bit;
            }
        }
        self.flags.set(0, bits, 0).map_err(map_err("flags"))
    }

    /// Blocks `net` for `ttl` (replacing any block of the same prefix). Refused when an
    /// allowlist entry covers all of `net`; allowlisted parts of a wider block stay reachable
    /// because the kernel checks the allowlist before dropping.
    pub fn block(&mut self, net: IpNet, ttl: Duration) -> Result<(), EnforceError> {
        if ttl.is_zero() {
            return Err(EnforceError::ZeroTtl);
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
        insert_net(&mut self.block_v4, &mut self.block_v6, net, entry).map_err(map_err("block"))?;
        if self.blocked.insert(net) {
            self.write_flags()?;
        }
        tracing::info!(%net, ttl = %humantime::format_duration(ttl), "blocked");
        Ok(())
    }

    /// Removes the block of exactly `net`; false when there was none.
    pub fn unblock(&mut self, net: IpNet) -> Result<bool, EnforceError> {
        let net = net.trunc();
        let r = remove_net(&mut self.block_v4, &mut self.block_v6, net);
        match r {
            Ok(()) => {
                self.blocked.remove(&net);
                self.write_flags()?;
                tracing::info!(%net, "unblocked");
                Ok(true)
            }
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err("block")(e)),
        }
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
        let mut out = Vec::new();
        let remaining = |e: &BlockEntry| Duration::from_nanos(e.expires_ns.saturating_sub(now));
        for item in self.block_v4.iter() {
            let (k, e) = item.map_err(map_err("block"))?;
            let net = IpNet::new(IpAddr::from(k.data()), k.prefix_len() as u8).map_err(|e| {
                EnforceError::Map {
                    map: "block",
                    detail: e.to_string(),
                }
            })?;
            out.push(Block {
                net,
                remaining: remaining(&e),
                dropped: e.dropped,
            });
        }
        for item in self.block_v6.iter() {
            let (k, e) = item.map_err(map_err("block"))?;
            let net = IpNet::new(IpAddr::from(k.data()), k.prefix_len() as u8).map_err(|e| {
                EnforceError::Map {
                    map: "block",
                    detail: e.to_string(),
                }
            })?;
            out.push(Block {
                net,
                remaining: remaining(&e),
                dropped: e.dropped,
            });
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
            self.write_flags()?;
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
                self.write_flags()?;
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
