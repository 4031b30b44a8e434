//! The interface watcher: checks, once a second, that every configured interface still
//! carries the XDP program, and puts it back when it does not.
//!
//! Three things can take the program off an interface behind the daemon's back: the interface
//! is deleted (the kernel drops the attachment with it), deleted and re-created under the same
//! name (a new ifindex with nothing attached), or an operator detaches it (`ip link set dev X
//! xdp off`; the kernel refuses that while a bpf_link holds the attachment, Linux 5.9+, but
//! not on older kernels where the attachment is made over netlink). The check asks the kernel
//! (RTM_GETLINK) which XDP programs the interface runs and compares with our program's id, so
//! it notices all three whichever way the program was attached.
use std::{collections::BTreeSet, io};

use crate::capture::{AttachMode, Datapath};

/// How often the daemon runs [`Watcher::check`].
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A change the watcher made or saw, for the daemon to log and count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The interface disappeared; the program runs nowhere there until it comes back.
    Lost { iface: String },
    /// The program is attached again (interface re-created, or program detached from outside).
    Reattached {
        iface: String,
        ifindex: u32,
        mode: AttachMode,
    },
    /// Re-attaching failed; tried again at every check, reported once until it works.
    AttachFailed { iface: String, error: String },
}

/// Keeps the configured interfaces attached. Owned by the engine owner with the [`Datapath`].
pub struct Watcher {
    interfaces: Vec<String>,
    mode: AttachMode,
    program_id: u32,
    /// Interfaces whose last re-attach failed (reported once, not every second).
    failing: BTreeSet<String>,
}

impl Watcher {
    pub fn new(
        dp: &mut Datapath,
        interfaces: Vec<String>,
        mode: AttachMode,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            interfaces,
            mode,
            program_id: dp.program_id()?,
            failing: BTreeSet::new(),
        })
    }

    /// Configured interfaces that currently run no program of ours (gone, or failing).
    pub fn missing(&self, dp: &Datapath) -> Vec<String> {
        let attached = dp.attachments();
        self.interfaces
            .iter()
            .filter(|i| !attached.iter().any(|a| &a.iface == *i))
            .cloned()
            .collect()
    }

    /// One pass over the configured interfaces: see [`plan`].
    pub fn check(&mut self, dp: &mut Datapath) -> Vec<Event> {
        let mut events = Vec::new();
        for iface in &self.interfaces {
            let attached = dp
                .attachments()
                .into_iter()
                .find(|a| &a.iface == iface)
                .map(|a| a.ifindex);
            let current = if_index(iface);
            let ours_running = match current.map(xdp_prog_ids) {
                Some(Ok(ids)) => ids.contains(&self.program_id),
                // Vanished between the two questions: the next check sees it gone.
                Some(Err(e)) => {
                    tracing::debug!(iface, error = %e, "asking the kernel for XDP programs failed");
                    continue;
                }
                None => false,
            };
            match plan(attached, current, ours_running) {
                Action::Keep | Action::StillMissing => {}
                Action::Lost => {
                    dp.detach(iface);
                    events.push(Event::Lost {
                        iface: iface.clone(),
                    });
                }
                Action::Attach => {
                    dp.detach(iface);
                    match dp.attach(iface, self.mode) {
                        Ok(mode) => {
                            self.failing.remove(iface);
                            events.push(Event::Reattached {
                                iface: iface.clone(),
                                ifindex: current.unwrap_or(0),
                                mode,
                            });
                        }
                        Err(e) => {
                            if self.failing.insert(iface.clone()) {
                                events.push(Event::AttachFailed {
                                    iface: iface.clone(),
                                    error: e.to_string(),
                                });
                            }
                        }
                    }
                }
            }
        }
        events
    }
}

/// What one check found for one interface, and what the daemon does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Attached to this ifindex and our program runs there.
    Keep,
    /// The interface is gone: forget the attachment, report it, wait for it to come back.
    Lost,
    /// Still gone since an earlier check: nothing new to report.
    StillMissing,
    /// Present but not running our program (new ifindex, or detached from outside): attach.
    Attach,
}

/// Decides from what the daemon believes (`attached`: the ifindex it attached to, if any) and
/// what the kernel says now (`current`: the name's ifindex, if the interface exists;
/// `ours_running`: our program id is among the interface's XDP programs).
pub fn plan(attached: Option<u32>, current: Option<u32>, ours_running: bool) -> Action {
    match (attached, current) {
        (Some(_), None) => Action::Lost,
        (None, None) => Action::StillMissing,
        (Some(a), Some(c)) if a == c && ours_running => Action::Keep,
        (_, Some(_)) => Action::Attach,
    }
}

/// The ifindex of `name`, or None when no such interface exists.
pub fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

// rtnetlink attributes of IFLA_XDP (linux/if_link.h); libc does not export them all.
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
/// Nested/byte-order flag bits in `rta_type`.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Ids of the XDP programs attached to interface `ifindex` (any mode), asked of the kernel
/// with one RTM_GETLINK request. Err(NotFound) when the interface does not exist.
pub fn xdp_prog_ids(ifindex: u32) -> io::Result<Vec<u32>> {
    // SAFETY: plain socket call; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: valid option pointer and length. A kernel that never answers must not hang the
    // engine owner's loop.
    unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };

    // nlmsghdr (16 bytes) + ifinfomsg (16 bytes).
    let mut req = [0u8; 32];
    req[0..4].copy_from_slice(&32u32.to_ne_bytes());
    req[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence number
    req[16] = libc::AF_UNSPEC as u8;
    req[20..24].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    // SAFETY: buffer and length are valid; the kernel is the default destination.
    if unsafe { libc::send(raw, req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: buffer and length are valid.
    let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_getlink_reply(&buf[..n as usize])
}

/// Reads the XDP program ids out of an RTM_NEWLINK reply (or the error the kernel sent).
fn parse_getlink_reply(msg: &[u8]) -> io::Result<Vec<u32>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short rtnetlink reply");
    let u16_at = |b: &[u8], i: usize| -> Option<u16> {
        Some(u16::from_ne_bytes(b.get(i..i + 2)?.try_into().ok()?))
    };
    let u32_at = |b: &[u8], i: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?))
    };
    let len = u32_at(msg, 0).ok_or_else(bad)? as usize;
    let kind = u16_at(msg, 4).ok_or_else(bad)?;
    let msg = msg.get(..len).ok_or_else(bad)?;
    if kind == libc::NLMSG_ERROR as u16 {
        let errno = -(u32_at(msg, 16).ok_or_else(bad)? as i32);
        return Err(io::Error::from_raw_os_error(errno));
    }
    if kind != libc::RTM_NEWLINK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected rtnetlink message type {kind}"),
        ));
    }
    let mut ids = Vec::new();
    // Attributes follow the 16-byte nlmsghdr and the 16-byte ifinfomsg.
    for (kind, value) in attributes(msg.get(32..).ok_or_else(bad)?) {
        if kind != libc::IFLA_XDP {
            continue;
        }
        for (inner, v) in attributes(value) {
            if matches!(
                inner,
                IFLA_XDP_PROG_ID
                    | IFLA_XDP_DRV_PROG_ID
                    | IFLA_XDP_SKB_PROG_ID
                    | IFLA_XDP_HW_PROG_ID
            ) && let Some(id) = u32_at(v, 0)
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}

/// Iterates (type, value) over a run of rtattrs, stopping at the first malformed one.
fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(b.get(2..4)?.try_into().ok()?) & NLA_TYPE_MASK;
        if len < 4 {
            return None;
        }
        let value = b.get(4..len)?;
        b = b.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some((kind, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_every_case() {
        assert_eq!(plan(Some(3), Some(3), true), Action::Keep);
        // Detached from outside: same interface, program gone.
        assert_eq!(plan(Some(3), Some(3), false), Action::Attach);
        // Deleted and re-created: a new ifindex under the same name.
        assert_eq!(plan(Some(3), Some(9), false), Action::Attach);
        assert_eq!(plan(Some(3), Some(9), true), Action::Attach);
        assert_eq!(plan(Some(3), None, false), Action::Lost);
        assert_eq!(plan(None, None, false), Action::StillMissing);
        // Back after being lost.
        assert_eq!(plan(None, Some(9), false), Action::Attach);
    }

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    fn newlink(attrs: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; 32];
        m[0..4].copy_from_slice(&((32 + attrs.len()) as u32).to_ne_bytes());
        m[4..6].copy_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
        m.extend_from_slice(attrs);
        m
    }

    #[test]
    fn reads_xdp_program_ids_from_a_reply() {
        let mut xdp = attr(2, &[1]); // IFLA_XDP_ATTACHED
        xdp.extend(attr(IFLA_XDP_PROG_ID, &77u32.to_ne_bytes()));
        xdp.extend(attr(IFLA_XDP_DRV_PROG_ID, &77u32.to_ne_bytes()));
        xdp.extend(attr(IFLA_XDP_SKB_PROG_ID, &78u32.to_ne_bytes()));
        let mut attrs = attr(libc::IFLA_IFNAME, b"eth0\0");
        attrs.extend(attr(libc::IFLA_XDP | 0x8000, &xdp)); // NLA_F_NESTED
        assert_eq!(parse_getlink_reply(&newlink(&attrs)).unwrap(), vec![77, 78]);
        // No XDP attribute, or one without programs: nothing attached.
        let plain = attr(libc::IFLA_IFNAME, b"eth0\0");
        assert!(parse_getlink_reply(&newlink(&plain)).unwrap().is_empty());
    }

    #[test]
    fn kernel_errors_and_garbage_are_errors_not_panics() {
        let mut m = vec![0u8; 36];
        m[0..4].copy_from_slice(&36u32.to_ne_bytes());
        m[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        m[16..20].copy_from_slice(&(-libc::ENODEV).to_ne_bytes());
        let e = parse_getlink_reply(&m).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
        assert!(parse_getlink_reply(&[1, 2, 3]).is_err());
        // An attribute claiming more bytes than there are ends the walk quietly.
        let mut attrs = attr(libc::IFLA_XDP, &attr(IFLA_XDP_PROG_ID, &5u32.to_ne_bytes()));
        attrs[0] = 200;
        assert!(parse_getlink_reply(&newlink(&attrs)).unwrap().is_empty());
    }

    #[test]
    fn loopback_exists_and_nonsense_does_not() {
        assert!(if_index("lo").is_some());
        assert!(if_index("no-such-if-x").is_none());
        // Asking the kernel about loopback works without privileges.
        assert!(xdp_prog_ids(if_index("lo").unwrap()).is_ok());
    }
}
