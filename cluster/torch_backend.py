"""Ray Train's torch process-group setup with the rendezvous store on 127.0.0.1 only, for local clusters.

Ray Train's `TorchConfig` (init_method env://) has every rank call `init_process_group`, and rank 0's
rendezvous creates the c10d TCPStore server at MASTER_ADDR:MASTER_PORT. That server listens on the wildcard
address (`::`) whatever MASTER_ADDR says (torch 2.14), so a loopback-only local Ray cluster
(cluster/safety.py) would still expose one port on every interface for as long as the process group lives.

`LoopbackTorchConfig` does what `TorchConfig` does (backend choice, MASTER_ADDR/MASTER_PORT and the
LOCAL_RANK/RANK/WORLD_SIZE/... variables, the CUDA device per worker, the collective timeout, destroying the
process group on shutdown, so that Ray Train's restart after a failure builds a fresh one), except the store:

* rank 0 binds a socket to 127.0.0.1 on a port the kernel picks and listens on it (no find-free-port race),
  then hands it to the TCPStore server (`master_listen_fd`, `multi_tenant=True`, as env:// would);
* every other rank connects a TCPStore client to 127.0.0.1:port;
* each rank builds the default process group from that store, prefixed like the env:// path
  (`PrefixStore("default_pg", store)`), with the same timeout (`timeout_s`, the collective timeout).

It also points gloo and NCCL at the loopback interface (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, unless
set): gloo otherwise binds its pair listeners to the address the host name resolves to, and NCCL's
bootstrap to the first non-loopback interface.

Single node only: every worker must be on the node of rank 0 and that node's IP must be loopback (a local
cluster started with `cluster.safety.local_ray_init_kwargs()`); `on_start` refuses anything else. Clusters
that other nodes join keep the stock `TorchConfig`: `torch_config(..., loopback=False)`.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from ray.train.torch.config import TorchConfig, _TorchBackend

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# On rank 0's worker: the listening socket made by `_bind_store_listener`, until the store takes it over.
_listener: socket.socket | None = None


def torch_config(backend: str, timeout_s: int, *, loopback: bool) -> TorchConfig:
    """The `torch_config` of the TorchTrainer: the loopback-only variant for a local cluster whose workers
    all share one node (started here, loopback-only), the stock one for any other cluster."""
    cls = LoopbackTorchConfig if loopback else TorchConfig
    return cls(backend=backend, timeout_s=int(timeout_s))


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """`TorchConfig` whose rendezvous store (rank 0's TCPStore) listens on 127.0.0.1 only. Every worker must
    be on one node whose IP is loopback. `init_method` is not used: the ranks meet through the store."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


def _loopback_interface() -> str:
    """The name of the interface holding 127.0.0.1 (`lo` on Linux, `lo0` on macOS)."""
    try:
        import psutil

        for name, addrs in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addrs):
                return name
    except Exception:  # psutil missing or failing: the Linux name
        pass
    return "lo"


def _worker_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _bind_store_listener() -> tuple[str, int]:
    """On rank 0: listen on 127.0.0.1, port chosen by the kernel; kept for `_setup_loopback_process_group`.
    Returns (MASTER_ADDR, MASTER_PORT). Refuses a node whose IP is not loopback (the other ranks could not
    reach 127.0.0.1 of this host from another node, and such a cluster is not the local one)."""
    global _listener
    import ray

    from cluster.safety import is_loopback

    node_ip = ray.util.get_node_ip_address()
    if not is_loopback(node_ip):
        raise RuntimeError(f"LoopbackTorchConfig needs a loopback-only local Ray cluster, but this node's IP is "
                           f"{node_ip}; use the stock TorchConfig (torch_config(..., loopback=False))")
    _close_store_listener()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        sock.listen(512)
    except BaseException:
        sock.close()
        raise
    _listener = sock
    return LOOPBACK, sock.getsockname()[1]


def _close_store_listener() -> None:
    global _listener
    if _listener is not None:
        _listener.close()
        _listener = None


def _set_rendezvous_env(addr: str, port: int) -> None:
    """MASTER_ADDR/MASTER_PORT, as Ray sets them (for code that reads them)."""
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def _pin_collectives_to_loopback() -> None:
    """gloo's pair listeners and NCCL's bootstrap sockets on the loopback interface, unless the user chose one.
    (gloo binds the address this host's name resolves to, which may be routable; NCCL avoids `lo`.)"""
    interface = _loopback_interface()
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if var not in os.environ:
            os.environ[var] = interface
        elif os.environ[var] != interface:
            logger.warning(f"{var}={os.environ[var]} is set: collectives may listen beyond loopback")


def _use_libuv() -> bool:
    """The TCPStore implementation env:// would pick (torch.distributed.rendezvous: USE_LIBUV, default on)."""
    return os.environ.get("USE_LIBUV", "1") == "1"


def _setup_loopback_process_group(backend: str, world_rank: int, world_size: int, addr: str, port: int,
                                  timeout_s: int) -> None:
    """On every rank: the default process group through rank 0's loopback TCPStore. Mirrors Ray's
    `_setup_torch_process_group` (NCCL error handling, custom backends) and torch's env:// rendezvous
    (multi-tenant store, store timeout, "default_pg" prefix), with the store made here."""
    global _listener
    import torch.distributed as dist
    from ray.train.torch.config import _is_backend_nccl

    logger.debug(f"Setting up process group through the loopback store {addr}:{port} "
                 f"[rank={world_rank}, world_size={world_size}, backend={backend}]")
    if _is_backend_nccl(backend):
        # As Ray does (torch >= 2.2 names): fail on NCCL timeouts unless the user chose otherwise.
        if "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    elif backend in ("hccl", "tpu_dist"):
        from ray.air._internal.device_manager import register_custom_torch_dist_backend

        register_custom_torch_dist_backend(backend)

    _pin_collectives_to_loopback()
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        if _listener is None or _listener.getsockname()[1] != port:
            raise RuntimeError(f"rank 0 holds no listening socket for the store on port {port}")
        # The store owns the descriptor from here on (it closes it when the last store object goes).
        fd, _listener = _listener.detach(), None
        store = dist.TCPStore(host_name=addr, port=port, world_size=world_size, is_master=True, timeout=timeout,
                              wait_for_workers=True, multi_tenant=True, master_listen_fd=fd,
                              use_libuv=_use_libuv())
    else:
        store = dist.TCPStore(host_name=addr, port=port, world_size=world_size, is_master=False, timeout=timeout,
                              multi_tenant=True, use_libuv=_use_libuv())
    store.set_timeout(timeout)
    dist.init_process_group(backend=backend, store=dist.PrefixStore("default_pg", store), rank=world_rank,
                            world_size=world_size, timeout=timeout)


class _LoopbackTorchBackend(_TorchBackend):
    """Ray's `_TorchBackend` with the store on 127.0.0.1; `on_shutdown` (destroy the process group, which
    drops the store and closes its socket) and `on_training_start` are Ray's."""

    def on_start(self, worker_group, backend_config: LoopbackTorchConfig):
        import ray
        import torch.distributed as dist
        from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
        from ray.train.torch.config import _set_torch_distributed_env_vars

        if not dist.is_available():
            raise RuntimeError("Distributed torch is not available.")
        backend = self._backend_name(worker_group, backend_config)
        if backend == "tpu_dist":
            raise ValueError("LoopbackTorchConfig does not support TPU workers; use TorchConfig")

        nodes = set(worker_group.execute(_worker_node_id))
        if len(nodes) != 1:
            raise RuntimeError(f"LoopbackTorchConfig needs every worker on one node; they are on {len(nodes)} "
                               "nodes. Use the stock TorchConfig (torch_config(..., loopback=False))")
        addr, port = worker_group.execute_single(0, _bind_store_listener)
        try:
            worker_group.execute(_set_rendezvous_env, addr=addr, port=port)
            # As Ray: LOCAL_RANK, WORLD_SIZE, ... before init_process_group (V1 sets them at training start).
            if not isinstance(worker_group, V1WorkerGroup):
                worker_group.execute(_set_torch_distributed_env_vars)
            ray.get([worker_group.execute_single_async(i, _setup_loopback_process_group, backend=backend,
                                                       world_rank=i, world_size=len(worker_group), addr=addr,
                                                       port=port, timeout_s=backend_config.timeout_s)
                     for i in range(len(worker_group))])
        except BaseException:
            try:  # rank 0 may still hold the listening socket; the group is about to be torn down anyway
                ray.get(worker_group.execute_single_async(0, _close_store_listener), timeout=10)
            except Exception:
                pass
            raise

    @staticmethod
    def _backend_name(worker_group, backend_config) -> str:
        """Ray's choice: the configured backend, else nccl with GPUs, tpu_dist with TPUs, gloo otherwise."""
        if backend_config.backend is not None:
            return backend_config.backend
        resources = worker_group.get_resources_per_worker()
        if resources.get("GPU", 0) > 0:
            return "nccl"
        if resources.get("TPU", 0) > 0:
            return "tpu_dist"
        return "gloo"
