//! A network namespace with a veth pair to the host, created and destroyed by a guard.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// `ns` holds one end of a veth pair (`ns_if`, address `ns_ip`); the other end (`host_if`,
/// `host_ip`) stays in the caller's namespace. Dropping it deletes both.
pub struct TestNet {
    pub ns: String,
    pub host_if: String,
    pub ns_if: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
    pub host_ip6: Ipv6Addr,
    pub ns_ip6: Ipv6Addr,
}

impl TestNet {
    /// `tag` (at most 8 characters) makes names unique per test; `subnet` picks
    /// 10.231.`subnet`.0/24 and fd00:231:`subnet`::/64.
    pub fn new(tag: &str, subnet: u8) -> anyhow::Result<Self> {
        assert!(tag.len() <= 8, "tag {tag:?} too long for an interface name");
        let net = Self {
            ns: format!("prec-{tag}"),
            host_if: format!("pr{tag}h"),
            ns_if: format!("pr{tag}n"),
            host_ip: Ipv4Addr::new(10, 231, subnet, 1),
            ns_ip: Ipv4Addr::new(10, 231, subnet, 2),
            host_ip6: Ipv6Addr::new(0xfd00, 0x231, subnet.into(), 0, 0, 0, 0, 1),
            ns_ip6: Ipv6Addr::new(0xfd00, 0x231, subnet.into(), 0, 0, 0, 0, 2),
        };
        // Leftovers of an earlier run killed before its guard ran.
        net.remove();
        // From here on, `net` owns what exists: an error below still cleans up on drop.
        ip(&["netns", "add", &net.ns])?;
        net.create_link()?;
        Ok(net)
    }

    /// Creates the veth pair with its addresses, both ends up (done by [`TestNet::new`]; again
    /// after [`TestNet::delete_link`] to re-create the interface under the same names).
    pub fn create_link(&self) -> anyhow::Result<()> {
        ip(&[
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &self.ns_if,
        ])?;
        ip(&["link", "set", &self.ns_if, "netns", &self.ns])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.host_ip),
            "dev",
            &self.host_if,
        ])?;
        ip(&["link", "set", &self.host_if, "up"])?;
        ip(&[
            "-n",
            &self.ns,
            "addr",
            "add",
            &format!("{}/24", self.ns_ip),
            "dev",
            &self.ns_if,
        ])?;
        ip(&["-n", &self.ns, "link", "set", &self.ns_if, "up"])?;
        ip(&["-n", &self.ns, "link", "set", "lo", "up"])?;
        // nodad: usable at once, instead of after duplicate address detection (~2 s).
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", self.host_ip6),
            "dev",
            &self.host_if,
            "nodad",
        ])?;
        ip(&[
            "-n",
            &self.ns,
            "-6",
            "addr",
            "add",
            &format!("{}/64", self.ns_ip6),
            "dev",
            &self.ns_if,
            "nodad",
        ])?;
        Ok(())
    }

    /// Deletes the veth pair (both ends), as an operator or a network manager might.
    pub fn delete_link(&self) -> anyhow::Result<()> {
        ip(&["link", "del", &self.host_if])
    }

    /// Adds another address on the namespace side (another client on the same link).
    pub fn add_ns_address(&self, addr: std::net::IpAddr) -> anyhow::Result<()> {
        let cidr = match addr {
            std::net::IpAddr::V4(a) => format!("{a}/24"),
            std::net::IpAddr::V6(a) => format!("{a}/64"),
        };
        ip(&[
            "-n",
            &self.ns,
            "addr",
            "add",
            &cidr,
            "dev",
            &self.ns_if,
            "nodad",
        ])
    }

    /// Turns GRO on or off on the host end. A veth receives through NAPI (like a NIC driver)
    /// only when GRO is on or an XDP program is attached; with GRO off, attaching any program
    /// switches the receive path, and a with/without comparison measures that switch.
    pub fn set_host_gro(&self, on: bool) -> anyhow::Result<()> {
        const ETHTOOL_SGRO: u32 = 0x2c;
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        let mut value = EthtoolValue {
            cmd: ETHTOOL_SGRO,
            data: on.into(),
        };
        // SAFETY: a zeroed ifreq is valid; the name fits (interface names are < 16 bytes).
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(self.host_if.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&raw mut value).cast();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
        // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points to, both live.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
        if rc != 0 {
            bail!(
                "setting GRO on {}: {}",
                self.host_if,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Runs `f` on a thread that has joined the namespace, so its sockets live there.
    pub fn run_in_ns<F, R>(&self, f: F) -> anyhow::Result<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        run_in(&self.ns, f)
    }

    fn remove(&self) {
        // Deleting the namespace destroys its veth end, and with it the host end.
        let _ = quiet_ip(&["netns", "del", &self.ns]);
        let _ = quiet_ip(&["link", "del", &self.host_if]);
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.remove();
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (package iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn quiet_ip(args: &[&str]) -> std::io::Result<std::process::ExitStatus> {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

/// Runs `f` on a thread that has joined the network namespace `ns` (by name).
pub fn run_in<F, R>(ns: &str, f: F) -> anyhow::Result<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only; the fd is valid for the call.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(anyhow::anyhow!(
                "setns: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
}
