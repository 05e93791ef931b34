"""Is this pid the process on the other end of this TCP connection? (Linux, same network
namespace.)

A lease tied to a pid lives as long as that process; a caller may tie one only to itself,
else one request could pin memory to pid 1 forever. TCP carries no peer credentials, so the
kernel's socket table decides: the connection's client end (its address and port, as the
server sees them) is found in /proc/net/tcp{,6}, and the pid owns it if one of its file
descriptors is that socket's inode.
"""

from __future__ import annotations

import ipaddress
import os
import struct


def proc_address(hex_address: str) -> tuple[str, int]:
    """'0100007F:1F90' -> ('127.0.0.1', 8080); IPv6 in the kernel's four little-endian words."""
    raw_ip, raw_port = hex_address.split(":")
    packed = bytes.fromhex(raw_ip)
    words = struct.unpack(f"<{len(packed) // 4}I", packed)
    ip = ipaddress.ip_address(struct.pack(f">{len(words)}I", *words))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(raw_port, 16)


def socket_inode(client: tuple[str, int], server_port: int) -> int | None:
    """The inode of the client end of the connection ``client`` -> our ``server_port``."""
    client_ip = str(ipaddress.ip_address(client[0]))
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, remote, inode = proc_address(fields[1]), proc_address(fields[2]), int(fields[9])
                    if local == (client_ip, client[1]) and remote[1] == server_port and inode:
                        return inode
        except OSError:
            continue
    return None


def pid_owns_connection(pid: int, client: tuple[str, int], server_port: int) -> bool:
    """True if process ``pid`` holds the client end of ``client`` -> ``server_port``."""
    inode = socket_inode(client, server_port)
    if inode is None:
        return False
    target = f"socket:[{inode}]"
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:  # no such process, or not ours to look at
        return False
    for fd in fds:
        try:
            if os.readlink(os.path.join(fd_dir, fd)) == target:
                return True
        except OSError:
            continue
    return False

