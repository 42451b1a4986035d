"""Where a redirected connection was going: ``SO_ORIGINAL_DST``.

When iptables REDIRECTs an application's connection to the outbound listener, the kernel's
connection tracking still remembers the address the application dialled; the
``SO_ORIGINAL_DST`` socket option (``IP6T_SO_ORIGINAL_DST`` for IPv6, same number) returns it as
a ``struct sockaddr_in`` / ``sockaddr_in6``.  A connection that was not redirected (someone
dialled 127.0.0.1:4140 directly) has no NAT entry and the option fails with ENOENT; then the
answer is the socket's own local address, which is what that client dialled.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import trio

SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>
IP6T_SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv6/ip6_tables.h>
_SOCKADDR_IN_LEN = 16
_SOCKADDR_IN6_LEN = 28


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """``struct sockaddr_in`` → (ip, port).  The family is in host order, port and address not."""
    if len(raw) < 8:
        raise ValueError(f"sockaddr_in needs 8 bytes, got {len(raw)}")
    (family,) = struct.unpack("=H", raw[:2])
    if family != socket.AF_INET:
        raise ValueError(f"sockaddr_in has family {family}, expected AF_INET")
    port, addr = struct.unpack("!H4s", raw[2:8])
    return str(ipaddress.IPv4Address(addr)), port


def parse_sockaddr_in6(raw: bytes) -> tuple[str, int]:
    """``struct sockaddr_in6`` → (ip, port); a scope id is appended as ``%<id>``."""
    if len(raw) < _SOCKADDR_IN6_LEN:
        raise ValueError(f"sockaddr_in6 needs {_SOCKADDR_IN6_LEN} bytes, got {len(raw)}")
    (family,) = struct.unpack("=H", raw[:2])
    if family != socket.AF_INET6:
        raise ValueError(f"sockaddr_in6 has family {family}, expected AF_INET6")
    port, _flowinfo, addr = struct.unpack("!HI16s", raw[2:24])
    (scope_id,) = struct.unpack("=I", raw[24:28])
    ip = str(ipaddress.IPv6Address(addr))
    return (f"{ip}%{scope_id}" if scope_id else ip), port


def original_dst(sock: trio.socket.SocketType | socket.socket) -> tuple[str, int]:
    """The (ip, port) the peer dialled before any REDIRECT; the local address if none applied."""
    if sock.family == socket.AF_INET6:
        try:
            return parse_sockaddr_in6(
                # SOL_IPV6 is IPPROTO_IPV6 (41) on Linux; Python names only the latter.
                sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
            )
        except OSError:
            pass  # not redirected by ip6tables; an IPv4-mapped peer may still be, below
    try:
        return parse_sockaddr_in(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN))
    except OSError:
        pass  # no NAT entry: the peer dialled this socket's own address
    local = sock.getsockname()
    host = str(local[0])
    if host.startswith("::ffff:") and "." in host:
        host = host.removeprefix("::ffff:")
    return host, int(local[1])
