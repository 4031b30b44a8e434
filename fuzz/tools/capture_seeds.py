#!/usr/bin/env python3
"""Writes the capture seeds of the `pcap` fuzz target (fuzz/seeds/pcap/): a few real-shaped
packets (Ethernet, 802.1Q, IPv4, IPv6, TCP with correct checksums) carrying HTTP requests,
an ACK, a UDP datagram and a packet cut by the snaplen, as pcap, pcapng and Linux SLL; and a
capture of both directions whose server acknowledges one request and resets a forged one.
No capture tools needed; run from anywhere: python3 fuzz/tools/capture_seeds.py"""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "seeds", "pcap")


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def tcp(src, dst, sport, dport, payload, pseudo, flags=0x18, seq=1, ack=1):
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 1024, 0, 0)
    c = csum(pseudo(len(hdr) + len(payload)) + hdr + payload)
    return hdr[:16] + struct.pack("!H", c) + hdr[18:] + payload


def ipv4(src, dst, proto, l4):
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0, src, dst)
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + l4


def v4_tcp(src, dst, sport, dport, payload, flags=0x18, seq=1, ack=1):
    pseudo = lambda n: src + dst + struct.pack("!BBH", 0, 6, n)
    return ipv4(src, dst, 6, tcp(src, dst, sport, dport, payload, pseudo, flags, seq, ack))


def v6_tcp(src, dst, sport, dport, payload):
    pseudo = lambda n: src + dst + struct.pack("!IxxxB", n, 6)
    seg = tcp(src, dst, sport, dport, payload, pseudo)
    return struct.pack("!IHBB16s16s", 6 << 28, len(seg), 6, 64, src, dst) + seg


def v4_udp(src, dst, payload):
    udp = struct.pack("!HHHH", 5353, 53, 8 + len(payload), 0) + payload
    return ipv4(src, dst, 17, udp)


def eth(ethertype, l3, vlan=None):
    head = b"\x02" * 6 + b"\x01" * 6
    if vlan is not None:
        head += struct.pack("!HH", 0x8100, vlan)
    return head + struct.pack("!H", ethertype) + l3


def sll(ethertype, l3):
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x01" * 6 + b"\0\0", ethertype) + l3


C4 = bytes([192, 0, 2, 10])
S4 = bytes([192, 0, 2, 1])
C6 = bytes.fromhex("20010db8000000000000000000000042")
S6 = bytes.fromhex("20010db8000000000000000000000001")
GET = (b"GET /api/v1/accounts/7/balance?x=1 HTTP/1.1\r\nHost: bank.example\r\n"
       b"Authorization: Bearer abc\r\nCookie: sid=9\r\nAccept: */*\r\n\r\n")
POST = b"POST /api/v1/transferFunds HTTP/1.1\r\nHost: bank.example\r\nContent-Length: 2\r\n\r\n{}"
LOGIN = b"GET /login HTTP/1.1\r\nHost: bank.example\r\nCookie: sid=9\r\n\r\n"

# (seconds, microseconds, frame, original length or None)
PACKETS = [
    (1714564800, 0, eth(0x0800, v4_tcp(C4, S4, 40000, 80, LOGIN)), None),
    (1714564800, 250, eth(0x0800, v4_tcp(S4, C4, 80, 40000, b"", 0x10)), None),
    (1714564801, 0, eth(0x0800, v4_tcp(C4, S4, 40000, 80, GET), vlan=42), None),
    (1714564801, 500, eth(0x86DD, v6_tcp(C6, S6, 40002, 8080, POST)), None),
    (1714564802, 0, eth(0x0800, v4_udp(C4, S4, b"\x12\x34\x01\x00")), None),
]
CUT = eth(0x0800, v4_tcp(C4, S4, 40001, 80, GET))
PACKETS.append((1714564803, 0, CUT[:90], len(CUT)))


def pcap(linktype, packets):
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)
    for s, us, data, orig in packets:
        out += struct.pack("<IIII", s, us, len(data), orig or len(data)) + data
    return out


def ng_block(kind, body):
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack("<II", kind, n) + body + struct.pack("<I", n)


def pcapng(packets):
    shb = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
    # Ethernet, nanosecond timestamps (if_tsresol = 9), end of options.
    idb = struct.pack("<HHI", 1, 0, 65535) + struct.pack("<HHB3x", 9, 1, 9) + b"\0\0\0\0"
    out = ng_block(0x0A0D0D0A, shb) + ng_block(1, idb)
    for s, us, data, orig in packets:
        ts = s * 1_000_000_000 + us * 1000
        epb = struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, len(data), orig or len(data))
        out += ng_block(6, epb + data)
    return out


def write(name, data):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


os.makedirs(OUT, exist_ok=True)
write("ethernet.pcap", pcap(1, PACKETS))
write("ethernet.pcapng", pcapng(PACKETS[:4]))
# Linux "any" captures: the same IP packets behind an SLL header.
write("linux-sll.pcap", pcap(113, [(s, us, sll(0x0800, v4_tcp(C4, S4, 40000, 80, LOGIN)), None)
                                   for s, us, _, _ in PACKETS[:2]]))
# Both directions: the server's handshake and acknowledgements let requests wait for them.
E1 = 1001 + len(LOGIN)
E2 = E1 + len(POST)
write("two-way.pcap", pcap(1, [
    (1714564800, 0, eth(0x0800, v4_tcp(S4, C4, 80, 40000, b"", 0x12, 5000, 1001)), None),
    (1714564800, 100, eth(0x0800, v4_tcp(C4, S4, 40000, 80, LOGIN, 0x18, 1001, 5001)), None),
    (1714564800, 300, eth(0x0800, v4_tcp(S4, C4, 80, 40000, b"", 0x10, 5001, E1)), None),
    (1714564801, 0, eth(0x0800, v4_tcp(C4, S4, 40009, 80, POST, 0x18, 77, 1)), None),
    (1714564801, 50, eth(0x0800, v4_tcp(S4, C4, 80, 40009, b"", 0x14, 0, 77 + len(POST))), None),
    (1714564802, 0, eth(0x0800, v4_tcp(C4, S4, 40000, 80, POST, 0x18, E1, 5001)), None),
    (1714564802, 40000, eth(0x0800, v4_tcp(S4, C4, 80, 40000, b"", 0x10, 5001, E2)), None),
]))
