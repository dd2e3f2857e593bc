"""Network exposure of a local Ray cluster, and the listening sockets of a process tree.

What a plain local `ray.init()` (Ray 2.60) listens on, on a host with a routable address: the GCS, the
raylet's node manager and object manager, every core worker's gRPC server (driver, workers, actors) and the
dashboard agent's gRPC server on all interfaces (`::`); the autoscaler monitor's metrics (44217), the
dashboard head's metrics (44227) and the dashboard agent's Prometheus metrics export on `0.0.0.0`; the
dashboard agent's HTTP server (52365) and the runtime-env agent on the node's routable IP. Only the
dashboard itself (8265, which also serves the job API) honours `dashboard_host="127.0.0.1"`.

Why: each of these binds to loopback only when the node's IP is a loopback address, and Ray picks the node IP
from the route to the outside (`services.get_node_ip_address`). `ray.init(_node_ip_address="127.0.0.1")`
does not help: `resolve_ip_for_localhost` replaces a loopback address with that routable IP. The one switch
is `ray_constants.ENABLE_RAY_CLUSTER` (environment `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`, read when Ray is
imported; off by default on macOS and Windows for this very reason): when it is off the node IP is
127.0.0.1, and then every server above binds to 127.0.0.1 (the C++ ones as `::ffff:127.0.0.1`). A
cluster started that way cannot take other nodes, which is what a local cluster is.

`local_ray_init_kwargs()` applies that switch in this process (and, through the environment, in every Ray
process it starts) and returns the `ray.init` arguments of a fresh, loopback-only local cluster.

Not Ray's: torch.distributed's rendezvous store (c10d TCPStore), which Ray Train's stock TorchConfig
creates on rank 0, binds the wildcard address (`::`) whatever MASTER_ADDR says (torch 2.14). On the
loopback-only local cluster, cluster/torch_backend.py creates it on a socket bound to 127.0.0.1 beforehand
(TCPStore(master_listen_fd=..., multi_tenant=True)) and builds the process group from it, and pins gloo /
NCCL to the loopback interface.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys

LOOPBACK = "127.0.0.1"

# The environment of a loopback-only local Ray cluster; inherited by the processes Ray starts.
LOCAL_RAY_ENV = {
    # Off: the node IP is 127.0.0.1, so the GCS, raylet, workers, agents and metrics servers bind to loopback.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # No usage report to the Ray project's servers from a local run.
    "RAY_USAGE_STATS_ENABLED": "0",
}


def pin_ray_to_loopback() -> None:
    """Make this process (and the Ray processes it starts) put a new local Ray node on 127.0.0.1.

    Sets LOCAL_RAY_ENV in os.environ and, when Ray is already imported, the constant it was read into.
    Only for a process that starts its own local cluster: such a process cannot join another cluster
    afterwards (it would look for its raylet at 127.0.0.1)."""
    os.environ.update(LOCAL_RAY_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def local_ray_init_kwargs() -> dict:
    """`ray.init` arguments for a fresh local cluster with nothing listening beyond 127.0.0.1.

    address="local" always starts a new cluster: `address=None` would join whatever cluster the last
    `ray start` on this machine left in /tmp/ray/ray_current_cluster (someone else's, perhaps, listening on
    every interface). The dashboard (and with it the job API) stays at http://127.0.0.1:8265.
    Side effect: `pin_ray_to_loopback()`."""
    pin_ray_to_loopback()
    return {"address": "local", "_node_ip_address": LOOPBACK, "dashboard_host": LOOPBACK}


def ray_init_kwargs(address: str | None) -> dict:
    """The `ray.init` arguments of `liquid pretrain`: join `address` (cluster.address) when given; join the
    cluster of RAY_ADDRESS when it is set (a Ray job's entrypoint, e.g. a KubeRay RayJob or `ray job
    submit`, runs with RAY_ADDRESS pointing at its cluster); otherwise start a loopback-only local cluster."""
    if address:
        return {"address": address}
    if os.environ.get("RAY_ADDRESS"):
        return {"address": None}  # Ray reads RAY_ADDRESS itself
    return local_ray_init_kwargs()


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1, how dual-stack gRPC servers report it)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _short_command(argv: list[str], limit: int = 160) -> str:
    """A process's command line that reads the same wherever the project is checked out: the program by its
    base name and installed files from `site-packages/` on (so Ray's dashboard is `ray/dashboard/dashboard.py`
    however long the path to the virtual environment)."""
    parts = [os.path.basename(argv[0])] if argv else []
    for arg in argv[1:]:
        parts.append(arg.split("site-packages/", 1)[1] if "site-packages/" in arg else arg)
    return " ".join(parts)[:limit]


def listening_sockets(root_pid: int | None = None) -> list[dict]:
    """TCP sockets in LISTEN state and bound UDP sockets of `root_pid` (default: this process) and all its
    descendants: [{"pid", "name", "proto", "ip", "port"}], sorted."""
    import psutil

    root = psutil.Process(root_pid)
    procs = {root.pid: root}
    for child in root.children(recursive=True):
        procs[child.pid] = child
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid not in procs:
            continue
        tcp = conn.type == socket.SOCK_STREAM
        if (tcp and conn.status != psutil.CONN_LISTEN) or (not tcp and conn.raddr):
            continue
        try:
            name = _short_command(procs[conn.pid].cmdline()) or procs[conn.pid].name()
        except psutil.Error:
            name = "?"
        found.append({"pid": conn.pid, "name": name, "proto": "tcp" if tcp else "udp",
                      "ip": conn.laddr.ip, "port": conn.laddr.port})
    return sorted(found, key=lambda s: (s["name"], s["proto"], s["port"], s["ip"]))


def exposed_sockets(root_pid: int | None = None) -> list[dict]:
    """The listening sockets of the process tree that are not on a loopback address."""
    return [s for s in listening_sockets(root_pid) if not is_loopback(s["ip"])]
