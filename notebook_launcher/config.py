"""Checking and resolving what the user asked for, before any process starts.

`resolve` turns the arguments of `notebook_launcher` into a `LaunchConfig` (plain,
validated data with every "auto" decided), or raises `LaunchConfigError` with a message
that says what to do.
"""

from __future__ import annotations

import math
import operator
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import environment
from .errors import LaunchConfigError
from .serialization import unsendable_reason
from .ui.base import DEFAULT_PREFIX
from .workers import context

MIXED_PRECISION = ("no", "fp16", "bf16")
START_METHODS = ("auto", "fork", "spawn")
DEVICES = ("auto", "cpu", "cuda")
RDZV_BACKENDS = ("static", "c10d")
ON_STALL = ("raise", "warn")


@dataclass(frozen=True)
class LaunchConfig:
    function: Callable
    args: tuple
    kwargs: dict
    nproc: int                  # workers on this machine
    num_nodes: int
    node_rank: int
    device_type: str            # "cpu" | "cuda"
    backend: str                # "gloo" | "nccl" | ...
    start_method: str           # "fork" | "spawn"
    start_method_reason: str    # why, when it was not what the user asked for
    mixed_precision: str
    master_addr: str
    port: Optional[int]
    max_restarts: int
    return_all: bool
    display: str
    tick: float
    line_prefix: str            # string.Template with ${rank}, ${local_rank}, ${role_name}
    num_threads: int
    stall_timeout: Optional[float]  # seconds without progress before a rank counts as stuck; None: off
    on_stall: str                   # "warn" | "raise"
    rdzv_timeout: float             # multi-node: seconds to wait for every rank to arrive
    environment: environment.Environment = field(repr=False)
    rdzv_backend: str = "static"                   # "static": node ranks given; "c10d": negotiated
    rdzv_id: str = "none"
    rdzv_conf: dict = field(default_factory=dict)
    extra_env: dict = field(default_factory=dict)  # set in every worker (e.g. NCCL quirks)
    notes: tuple = ()                              # one-line messages for the person, printed at launch
    log_with: tuple = ()                           # trackers every rank-0 report() is written to
    project_name: Optional[str] = None             # their run's project
    logging_dir: Optional[str] = None              # where file-based trackers write (default ./runs)
    cluster: Any = None                            # None: ranks on this machine; else `clusters.RayCluster`...
    cluster_facts: Any = None                      # what the cluster offers, checked before anything starts

    @property
    def world_size(self) -> int:
        return self.nproc * self.num_nodes

    @property
    def first_rank(self) -> int:
        return self.node_rank * self.nproc

    def describe(self) -> str:
        """What runs where, e.g. "2 CPU processes (gloo, fork)" or "8 GPUs on node 1 of 2
        (nccl, fork, bf16)": the launch banner, the dashboard's title and `env`'s line."""
        if self.device_type == "cuda":
            what = f"{self.nproc} GPU{'s' if self.nproc != 1 else ''}"
        else:
            what = f"{self.nproc} CPU process{'es' if self.nproc != 1 else ''}"
        nodes = f" on node {self.node_rank} of {self.num_nodes}" if self.num_nodes > 1 else ""
        if self.cluster is not None:
            nodes = f" on each of {self.num_nodes} {self.cluster.describe()} node{'s' if self.num_nodes != 1 else ''}"
        elif self.num_nodes > 1 and self.rdzv_backend == "c10d":
            nodes = f" on one of {self.num_nodes} nodes (c10d rendezvous)"
        precision = f", {self.mixed_precision}" if self.mixed_precision != "no" else ""
        return f"{what}{nodes} ({self.backend}, {self.start_method}{precision})"


def resolve(function: Optional[Callable] = None, args: Any = (), kwargs: Any = None, *,
            num_processes: Any = None, mixed_precision: Any = "no", use_port: Any = None,
            master_addr: Any = "127.0.0.1", node_rank: Any = 0, num_nodes: Any = 1,
            rdzv_backend: Any = "static", max_restarts: Any = 0, monitor_interval: Any = 0.1,
            log_line_prefix_template: Any = None, start_method: Any = "auto", backend: Any = "auto",
            device: Any = "auto", return_all: bool = False, display: str = "auto",
            stall_timeout: Any = None, on_stall: Any = "warn", rdzv_timeout: Any = 600,
            rdzv_id: Any = "none", rdzv_conf: Any = None, log_with: Any = None,
            project_name: Optional[str] = None, logging_dir: Optional[str] = None, cluster: Any = None) -> LaunchConfig:
    """Check every option and decide every "auto"; raises `LaunchConfigError` saying what to do.

    ``function`` is None for a `Session`, whose tasks come later. ``cluster`` (None, "ray"
    or `clusters.RayCluster`) runs ``num_processes`` ranks on each of ``num_nodes`` cluster
    nodes; the cluster is asked what it has (and a bad fit refused) here.

    Example::

        config = resolve(train, (10,), num_processes=2, device="cpu")
        config.describe()   # "2 CPU processes (gloo, fork)"
    """
    if context.current() is not None:
        raise LaunchConfigError(
            "notebook_launcher was called from inside a launched worker. Call it from the "
            "notebook (or script) itself; inside the function you are already distributed."
        )
    if function is not None and not callable(function):
        raise LaunchConfigError(f"function must be callable, got {type(function).__name__}: pass the function itself, not its result.")
    if not isinstance(args, (tuple, list)):
        raise LaunchConfigError(
            f"args must be a tuple or list of positional arguments, got {type(args).__name__}. "
            f"For one argument write args=(value,)."
        )
    if kwargs is not None and not isinstance(kwargs, dict):
        raise LaunchConfigError(f"kwargs must be a dict of keyword arguments, got {type(kwargs).__name__}.")
    mixed_precision = _choice("mixed_precision", str(mixed_precision).lower(), MIXED_PRECISION)
    start_method = _choice("start_method", start_method, START_METHODS)
    device = _choice("device", device, DEVICES)
    rdzv_backend = _choice("rdzv_backend", rdzv_backend, RDZV_BACKENDS)
    if rdzv_conf is not None and not isinstance(rdzv_conf, dict):
        raise LaunchConfigError(f"rdzv_conf must be a dict, got {type(rdzv_conf).__name__}.")
    reserved = sorted(set(rdzv_conf or {}) & {"min_nodes", "max_nodes", "backend", "endpoint", "run_id"})
    if reserved:
        raise LaunchConfigError(f"rdzv_conf cannot set {', '.join(reserved)}: use num_nodes, rdzv_backend, "
                                "rdzv_endpoint and rdzv_id instead.")
    from .ui import DISPLAYS

    display = _choice("display", display, DISPLAYS)
    num_nodes = _positive_int("num_nodes", num_nodes)
    node_rank = _int("node_rank", node_rank)
    if not 0 <= node_rank < num_nodes:
        raise LaunchConfigError(f"node_rank={node_rank} must be between 0 and num_nodes-1={num_nodes - 1}.")
    max_restarts = _int("max_restarts", max_restarts)
    if max_restarts < 0:
        raise LaunchConfigError(f"max_restarts must be 0 or more, got {max_restarts}.")
    from .clusters import as_cluster

    cluster = as_cluster(cluster)
    if cluster is not None:
        _check_cluster_options(cluster, node_rank, use_port, rdzv_backend, start_method)
    port = None if cluster is not None else _port(use_port, num_nodes)
    on_stall = _choice("on_stall", on_stall, ON_STALL)
    stall_timeout = None if stall_timeout is None else _seconds("stall_timeout", stall_timeout)
    rdzv_timeout = _seconds("rdzv_timeout", rdzv_timeout)

    from .trackers import check_installed

    log_with = check_installed(log_with) if log_with is not None else ()  # a missing package: before any process
    env = environment.detect()
    facts = None
    if cluster is not None:   # ranks elsewhere: the cluster's GPUs count, not this machine's
        facts = _cluster_facts(cluster, num_nodes, num_processes, device)
        device_type, nproc, (method, reason), (extra_env, notes) = facts.device_type, facts.nproc, ("spawn", ""), ({}, [])
    else:
        device_type = _device_type(device, env)
        nproc = _nproc(num_processes, device_type, env)
        method, reason = _start_method(start_method, env, device_type)
        extra_env, notes = _gpu_quirks(env, device_type, nproc, method)
        notes.extend(_shm_notes(nproc, device_type))
        if mixed_precision == "bf16" and device_type == "cuda":
            _check_bf16(env)
    backend = _backend(backend, device_type)
    args, kwargs = tuple(args), dict(kwargs or {})
    if method == "spawn" and function is not None:
        _check_sendable(function, args, kwargs)
    return LaunchConfig(
        function=function, args=args, kwargs=kwargs, nproc=nproc, num_nodes=num_nodes,
        node_rank=node_rank, device_type=device_type, backend=backend, start_method=method,
        start_method_reason=reason, mixed_precision=mixed_precision,
        master_addr=str(master_addr), port=port, max_restarts=max_restarts,
        return_all=bool(return_all), display=display, tick=_tick(monitor_interval),
        line_prefix=log_line_prefix_template or DEFAULT_PREFIX,
        num_threads=_threads_per_worker(facts.cpus_per_node if facts else env.cpu_count, nproc),
        stall_timeout=stall_timeout,
        on_stall=on_stall, rdzv_timeout=rdzv_timeout, environment=env,
        extra_env=extra_env, notes=tuple(n for n in (reason, *notes) if n),
        rdzv_backend=rdzv_backend, rdzv_id=str(rdzv_id), rdzv_conf=dict(rdzv_conf or {}),
        log_with=tuple(log_with), project_name=project_name, logging_dir=logging_dir,
        cluster=cluster, cluster_facts=facts,
    )


def _check_cluster_options(cluster, node_rank: int, use_port: Any, rdzv_backend: str, start_method: str) -> None:
    """On a cluster the engine places every node, and agent 0 reserves the rendezvous port."""
    if node_rank != 0 or use_port not in (None, "", 0, "0") or rdzv_backend != "static":
        raise LaunchConfigError(
            f"cluster={cluster.kind!r} places every node and picks the rendezvous port itself: make one call "
            "from the notebook, without node_rank, use_port, rdzv_backend or rdzv_endpoint.")
    if start_method == "fork":
        raise LaunchConfigError(f"cluster={cluster.kind!r} starts ranks with spawn on each node; "
                                "leave start_method='auto' (or 'spawn').")


def _cluster_facts(cluster, num_nodes: int, num_processes: Any, device: str):
    """Ask the cluster's engine (imported only now) what a launch there will use."""
    nproc = None if num_processes is None else _positive_int("num_processes", num_processes)
    if cluster.kind == "slurm":
        from .ranks.slurm_engine import inspect as inspect_slurm

        return inspect_slurm(cluster, num_nodes, nproc, device)
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise LaunchConfigError(f"cluster='ray' needs Ray in this kernel ({exc}): pip install "
                                "'notebook-launcher[ray]' (or pip install 'ray[default]').") from None
    from .ranks.ray_engine import inspect

    return inspect(cluster, num_nodes, nproc, device)


def endpoint(rdzv_endpoint: Any, master_addr: Any, use_port: Any) -> tuple:
    """(master_addr, use_port), taken from ``rdzv_endpoint="host:port"`` when it is given."""
    if not rdzv_endpoint:
        return master_addr, use_port
    host, sep, port = str(rdzv_endpoint).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LaunchConfigError(f"rdzv_endpoint must look like 'host:port', got {rdzv_endpoint!r}.")
    return host.strip("[]"), int(port)


def _choice(name: str, value: Any, allowed: tuple) -> str:
    if value not in allowed:
        raise LaunchConfigError(f"unknown {name}={value!r}: choose one of {', '.join(map(repr, allowed))}.")
    return value


def _int(name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)  # accelerate passes use_port="29500"
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)  # int, numpy integers
    except TypeError:
        raise LaunchConfigError(f"{name} must be a whole number, got {value!r}.") from None


def _positive_int(name: str, value: Any) -> int:
    value = _int(name, value)
    if value < 1:
        raise LaunchConfigError(f"{name} must be at least 1, got {value}.")
    return value


def _port(use_port: Any, num_nodes: int) -> Optional[int]:
    if use_port in (None, "", 0, "0"):
        if num_nodes > 1:
            raise LaunchConfigError(
                "a job over several machines needs a fixed rendezvous port that every node knows: "
                "pass use_port=29500 (or any free port) to every node's call."
            )
        return None
    port = _int("use_port", use_port)
    if not 0 < port < 65536:
        raise LaunchConfigError(f"use_port must be between 1 and 65535, got {port}.")
    return port


def _device_type(device: str, env: environment.Environment) -> str:
    if device == "cuda" and not env.has_gpus:
        raise LaunchConfigError("device='cuda' was asked for, but no CUDA GPU is visible to this process.")
    if device == "auto":
        return "cuda" if env.has_gpus else "cpu"
    return device


def _nproc(num_processes: Any, device_type: str, env: environment.Environment) -> int:
    if num_processes is None:
        return env.gpu_count if device_type == "cuda" else 2
    nproc = _positive_int("num_processes", num_processes)
    if device_type == "cuda" and nproc > env.gpu_count:
        raise LaunchConfigError(
            f"num_processes={nproc}, but this machine has {env.gpu_count} visible GPU"
            f"{'s' if env.gpu_count != 1 else ''}: one worker per GPU. Use num_processes<={env.gpu_count}, "
            f"or device='cpu' for CPU workers."
        )
    return nproc


def _backend(backend: Any, device_type: str) -> str:
    if backend in (None, "auto"):
        return "nccl" if device_type == "cuda" else "gloo"
    if not isinstance(backend, str):
        raise LaunchConfigError(f"backend must be a string such as 'gloo' or 'nccl', got {backend!r}.")
    if "nccl" in backend and device_type != "cuda":
        raise LaunchConfigError("backend='nccl' needs CUDA GPUs; on CPU use backend='gloo' (or 'auto').")
    return backend


def _start_method(asked: str, env: environment.Environment, device_type: str) -> tuple[str, str]:
    can_fork = sys.platform.startswith("linux") or sys.platform == "darwin" and device_type == "cpu"
    # What initialized CUDA, so the person can move that line instead of guessing.
    cause = f" (first by {env.cuda_init_origin})" if env.cuda_init_origin else (
        " (before notebook_launcher was imported, so the line is not known: import it first to have it named)")
    # torch's flag misses a driver initialized by another library (cupy, numba, JAX, Triton):
    # the driver probe (`environment.cuda_driver_initialized`) sees it, and forks fail the same.
    driver_only = env.driver_initialized and not env.cuda_initialized
    what = (f"The CUDA driver is already initialized in this kernel by a library other than torch "
            f"({env.driver_init_origin})" if driver_only else f"CUDA is already initialized in this kernel{cause}")
    move = ("import that library inside the launched function (or after the launch)" if driver_only
            else "move that CUDA call into the launched function or after the launch")
    if asked == "fork":
        if not can_fork:
            raise LaunchConfigError(f"start_method='fork' is not available on {sys.platform}; use 'spawn'.")
        if (env.cuda_initialized or driver_only) and device_type == "cuda":
            raise LaunchConfigError(
                f"{what}, so forked workers could not use the GPU (they crash or hang on their first CUDA "
                f"call). Use start_method='spawn' (or 'auto'), or restart the kernel and {move}."
            )
        return "fork", ""
    if asked == "spawn":
        return "spawn", ""
    if env.cuda_initialized or driver_only:
        return "spawn", (
            f"{what}, so workers start with spawn instead of fork (a few seconds slower; the function "
            f"and its arguments travel with dill). To keep fork, {move}."
        )
    if not can_fork:
        return "spawn", ""
    return "fork", ""


def _check_bf16(env: environment.Environment) -> None:
    lacking = [g for g in env.gpus if not g.has_bf16]
    if lacking:
        names = ", ".join(sorted({f"{g.name} (compute capability {g.compute_capability:g})" for g in lacking}))
        raise LaunchConfigError(
            f"mixed_precision='bf16' needs GPUs of compute capability 8.0 or newer (Ampere+); "
            f"this machine has {names}. Use mixed_precision='fp16' instead."
        )


def _gpu_quirks(env: environment.Environment, device_type: str, nproc: int, method: str) -> tuple:
    """Environment fixes the peers learned the hard way, applied only when needed."""
    extra, notes = {}, []
    if device_type != "cuda":
        return extra, notes
    if nproc > 1 and environment.p2p_supported() is False:
        for key in ("NCCL_P2P_DISABLE", "NCCL_IB_DISABLE"):
            if key not in os.environ:
                extra[key] = "1"
        if extra:
            notes.append("These GPUs cannot talk peer-to-peer (e.g. Kaggle's 2x T4, consumer cards): "
                         "setting NCCL_P2P_DISABLE=1 and NCCL_IB_DISABLE=1 for the workers.")
    imported = environment.cuda_libraries_imported()
    if method == "fork" and imported:
        notes.append(f"Warning: {', '.join(imported)} may have initialized CUDA when imported here; if the "
                     "workers fail to use the GPU, import it inside the function or use start_method='spawn'.")
    return extra, notes


SHM_ENOUGH = 512 * 2**20   # bytes of /dev/shm below which NCCL and DataLoader workers are at risk
_shm_warned: list = []     # the /dev/shm warning is given once per process


def _shm_notes(nproc: int, device_type: str, size: Optional[int] = None) -> list:
    """A warning when /dev/shm is too small (a container's default is 64 MB): NCCL between
    GPUs of one machine and DataLoader workers pass tensors through it, and fail with "Bus
    error" or "No space left on device" mid-run. Once per process; never an error."""
    size = environment.shm_bytes() if size is None else size
    if size is None or size >= SHM_ENOUGH or _shm_warned or (nproc < 2 and device_type != "cuda"):
        return []
    _shm_warned.append(size)
    return [f"Warning: /dev/shm is only {size / 2**20:.0f} MiB (a container's default): NCCL between the GPUs "
            "of this machine and DataLoader workers (num_workers > 0) pass tensors through it and fail with "
            "'Bus error' or 'No space left on device' when it fills. Fix: start the container with "
            "--shm-size=2g (or --ipc=host); on Kubernetes mount an emptyDir with medium: Memory at /dev/shm. "
            "For DataLoader workers alone, torch.multiprocessing.set_sharing_strategy('file_system') also works."]


def _check_sendable(function: Callable, args: tuple, kwargs: dict) -> None:
    named = [("function", function)]
    named += [(f"args[{i}]", value) for i, value in enumerate(args)]
    named += [(f"kwargs[{key!r}]", value) for key, value in kwargs.items()]
    for name, value in named:
        reason = unsendable_reason(value)
        if reason is not None:
            raise LaunchConfigError(
                f"{name} ({type(value).__name__}) cannot be sent to spawned workers: {reason}. "
                "Create it inside the function instead (open files, sockets, locks, generators "
                "and CUDA handles cannot be copied to another process)."
            )


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise LaunchConfigError(f"{name} must be a positive number of seconds, got {value!r}.")
    return float(value)


def _tick(monitor_interval: Any) -> float:
    try:
        value = float(monitor_interval)
    except (TypeError, ValueError):
        raise LaunchConfigError(f"monitor_interval must be a number of seconds, got {monitor_interval!r}.") from None
    if not math.isfinite(value):
        raise LaunchConfigError(f"monitor_interval must be a finite number of seconds, got {monitor_interval!r}.")
    return min(max(value, 0.01), 5.0)


def _threads_per_worker(cpu_count: int, nproc: int) -> int:
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, cpu_count // nproc)
