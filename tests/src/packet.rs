//! Hand-built Ethernet frames for BPF_PROG_TEST_RUN: every header field under the test's
//! control, including the malformed ones a packet library would refuse to build.
use std::net::IpAddr;

/// A TCP (or other protocol) packet to build. Checksums are left zero: XDP never checks them.
#[derive(Clone, Debug)]
pub struct Packet {
    /// Outer TPID of a single VLAN tag (0x8100 or 0x88a8), if any.
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Bytes of IPv4 options (multiple of 4, at most 40).
    pub ip_options: usize,
    /// IPv6 hop-by-hop extension header before the L4 header.
    pub ipv6_hop_by_hop: bool,
    /// IPv4 fragment offset (8-byte units) and more-fragments flag; for IPv6, a fragment
    /// header with them before the L4 header. None: not a fragment (IPv4 sets DF).
    pub fragment: Option<(u16, bool)>,
    /// IP protocol number (6 = TCP, 17 = UDP).
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
    /// Bytes of TCP options (multiple of 4, at most 40).
    pub tcp_options: usize,
    /// TCP flags byte (0x18 = PSH|ACK, 0x02 = SYN).
    pub tcp_flags: u8,
    /// TCP sequence number.
    pub seq: u32,
    /// TCP acknowledgement number.
    pub ack: u32,
    pub payload: Vec<u8>,
}

impl Packet {
    pub fn tcp(src: &str, dst: &str, payload: &[u8]) -> Self {
        Self {
            vlan: None,
            src: src.parse().expect("source address"),
            dst: dst.parse().expect("destination address"),
            ip_options: 0,
            ipv6_hop_by_hop: false,
            fragment: None,
            protocol: 6,
            sport: 40_000,
            dport: 8080,
            tcp_options: 0,
            tcp_flags: 0x18,
            seq: 1,
            ack: 1,
            payload: payload.to_vec(),
        }
    }

    /// Offset of the TCP payload in the built frame.
    pub fn payload_offset(&self) -> usize {
        let l2 = if self.vlan.is_some() { 18 } else { 14 };
        let l3 = match self.src {
            IpAddr::V4(_) => 20 + self.ip_options,
            IpAddr::V6(_) => 40 + self.ipv6_ext_len(),
        };
        l2 + l3 + 20 + self.tcp_options
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128 + self.payload.len());
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]); // dst MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2]); // src MAC
        if let Some(tpid) = self.vlan {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&100u16.to_be_bytes()); // VLAN id 100
        }
        let l4 = self.l4();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let ihl = 20 + self.ip_options;
                f.push(0x40 | (ihl / 4) as u8);
                f.push(0);
                f.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
                f.extend_from_slice(&[0, 1]); // id
                let frag_off = match self.fragment {
                    None => 0x4000, // DF
                    Some((offset, more)) => offset & 0x1fff | if more { 0x2000 } else { 0 },
                };
                f.extend_from_slice(&frag_off.to_be_bytes());
                f.push(64);
                f.push(self.protocol);
                f.extend_from_slice(&[0, 0]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                // Options: NOPs then End-of-list.
                f.extend(std::iter::repeat_n(1u8, self.ip_options.saturating_sub(1)));
                if self.ip_options > 0 {
                    f.push(0);
                }
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86DDu16.to_be_bytes());
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&((self.ipv6_ext_len() + l4.len()) as u16).to_be_bytes());
                let first = if self.ipv6_hop_by_hop {
                    0
                } else if self.fragment.is_some() {
                    44
                } else {
                    self.protocol
                };
                f.push(first);
                f.push(64);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                if self.ipv6_hop_by_hop {
                    // Next header, length 0 (8 bytes), PadN option filling the rest.
                    let next = if self.fragment.is_some() {
                        44
                    } else {
                        self.protocol
                    };
                    f.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                }
                if let Some((offset, more)) = self.fragment {
                    // Next header, reserved, offset and M flag, identification.
                    let off = (offset << 3) | u16::from(more);
                    f.extend_from_slice(&[self.protocol, 0]);
                    f.extend_from_slice(&off.to_be_bytes());
                    f.extend_from_slice(&[0, 0, 0, 1]);
                }
            }
            _ => panic!("source and destination must be the same family"),
        }
        f.extend_from_slice(&l4);
        f
    }

    fn ipv6_ext_len(&self) -> usize {
        8 * (usize::from(self.ipv6_hop_by_hop) + usize::from(self.fragment.is_some()))
    }

    fn l4(&self) -> Vec<u8> {
        if self.protocol != 6 {
            // A UDP header (or any 8 bytes) followed by the payload.
            let mut u = Vec::new();
            u.extend_from_slice(&self.sport.to_be_bytes());
            u.extend_from_slice(&self.dport.to_be_bytes());
            u.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            u.extend_from_slice(&[0, 0]);
            u.extend_from_slice(&self.payload);
            return u;
        }
        let doff = 20 + self.tcp_options;
        let mut t = Vec::with_capacity(doff + self.payload.len());
        t.extend_from_slice(&self.sport.to_be_bytes());
        t.extend_from_slice(&self.dport.to_be_bytes());
        t.extend_from_slice(&self.seq.to_be_bytes());
        t.extend_from_slice(&self.ack.to_be_bytes());
        t.push(((doff / 4) as u8) << 4);
        t.push(self.tcp_flags);
        t.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
        // Options: MSS (4 bytes) when room, then NOPs.
        let mut opts = Vec::new();
        if self.tcp_options >= 4 {
            opts.extend_from_slice(&[2, 4, 0x05, 0xb4]);
        }
        opts.resize(self.tcp_options, 1);
        t.extend_from_slice(&opts);
        t.extend_from_slice(&self.payload);
        t
    }
}
