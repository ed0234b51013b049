"""The public entry point. Thin: check the arguments, then launch (`launcher.launch`)."""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from .config import endpoint, resolve
from .launcher import launch
from .ui import make_view


def notebook_launcher(
    function: Callable,
    args: tuple = (),
    num_processes: Optional[int] = None,
    mixed_precision: str = "no",
    use_port: Optional[int] = None,
    master_addr: str = "127.0.0.1",
    node_rank: int = 0,
    num_nodes: int = 1,
    rdzv_backend: str = "static",
    rdzv_endpoint: str = "",
    rdzv_conf: Optional[dict] = None,
    rdzv_id: str = "none",
    max_restarts: int = 0,
    monitor_interval: float = 0.1,
    log_line_prefix_template: Optional[str] = None,
    *,
    kwargs: Optional[dict] = None,
    start_method: str = "auto",
    backend: str = "auto",
    device: str = "auto",
    return_all: bool = False,
    display: str = "auto",
    stall_timeout: Optional[float] = 300.0,
    on_stall: str = "warn",
    rdzv_timeout: float = 600.0,
    block: bool = True,
    log_with: Any = None,
    project_name: Optional[str] = None,
    logging_dir: Optional[str] = None,
    cluster: Any = None,
) -> Any:
    """Run ``function(*args, **kwargs)`` in ``num_processes`` workers wired into one
    ``torch.distributed`` job, and return rank 0's return value.

    The positional parameters are those of HF accelerate's ``notebook_launcher``, with
    the same meaning, so swapping the import is enough. The default process group (nccl
    on GPUs, gloo on CPU) is ready when ``function`` starts; RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR/PORT and the rest of torchrun's variables are set.

    Args:
        function: the training function. Defined in the notebook is fine.
        args, kwargs: its arguments.
        num_processes: workers on this machine. None: one per visible GPU, or 2 on CPU.
        mixed_precision: "no" | "fp16" | "bf16", used by `Accelerator` (ours or HF's)
            inside the workers.
        use_port: rendezvous port. None: a free port chosen by the system.
        master_addr, node_rank, num_nodes: where node 0 is, and which node this is.
        rdzv_endpoint: "host:port" of the rendezvous; overrides master_addr and use_port.
        rdzv_backend: "static" (each node passes its node_rank; node 0 hosts the store) or
            "c10d" (torch's c10d rendezvous assigns node ranks; rdzv_id names the job,
            rdzv_conf passes torch's rendezvous options).
        max_restarts: restart every worker up to this many times after a failure.
        monitor_interval: seconds between checks of the workers when nothing happens.
        log_line_prefix_template: prefix of each output line, e.g. "[${rank}]: ".
        start_method: "auto" (fork, or spawn when CUDA is already initialized here),
            "fork" or "spawn".
        backend: "auto", "gloo", "nccl", ...
        device: "auto", "cpu" or "cuda".
        return_all: return a list with every rank's value, indexed by rank.
        display: "auto" (widgets under a Jupyter server, "html" on Colab, Kaggle, VS Code and
            other kernels, "text" outside a kernel; see the README) | "widgets" (live
            dashboard: progress, metric curves, ranks, log panel; a static summary at the end) |
            "html" (the same dashboard as one display updated in place, no ipywidgets) |
            "text" (progress line, plot saved to a file) | "none" (only the workers' output).
        stall_timeout: seconds a rank may go without any sign of progress (a report,
            a progress step, an output line, or its Python stack moving) before it counts
            as stuck; its stacks (every thread) are then shown. None turns this off.
        on_stall: "warn" (show the stacks, keep running) or "raise" (stop the run and
            raise WorkerError carrying the stacks).
        rdzv_timeout: several machines: seconds to wait for every node to arrive.
        cluster: None (every rank on this machine, or several machines started by hand with
            node_rank), or ``"ray"`` / ``RayCluster(...)``: ``num_processes`` ranks on each
            of ``num_nodes`` Ray nodes, all from this one call (see the README's "On a Ray
            cluster"); results, errors, Interrupt, stalls and the dashboard work as here.
        log_with, project_name, logging_dir: experiment trackers ("tensorboard", "mlflow",
            "wandb", "trackio", a list, or "all") that every rank-0 ``report()`` is written
            to, in this notebook process. A restart gets a run of its own (the failed
            attempt's run is closed as failed). ``Accelerator(log_with=...)`` inside the
            function works without these.

    Raises:
        WorkerError: a worker failed. ``.rank`` is the rank that failed first,
            ``.remote_traceback`` its traceback, ``__cause__`` its exception. It is a
            ``torch.distributed.elastic...ChildFailedError``, as accelerate's launcher raises.
        LaunchConfigError: bad arguments; raised before any process starts.
        KeyboardInterrupt: you interrupted the kernel; every worker is already gone.

    Example::

        import torch.distributed as dist
        from notebook_launcher import notebook_launcher

        def total(x):
            t = torch.tensor([x * (dist.get_rank() + 1)])
            dist.all_reduce(t)
            return t.item()

        notebook_launcher(total, args=(10,), num_processes=2)   # -> 30
    """
    master_addr, use_port = endpoint(rdzv_endpoint, master_addr, use_port)
    config = resolve(
        function, args, kwargs, num_processes=num_processes, mixed_precision=mixed_precision,
        use_port=use_port, master_addr=master_addr, node_rank=node_rank, num_nodes=num_nodes,
        rdzv_backend=rdzv_backend, max_restarts=max_restarts, monitor_interval=monitor_interval,
        log_line_prefix_template=log_line_prefix_template, start_method=start_method,
        backend=backend, device=device, return_all=return_all, display=display,
        stall_timeout=stall_timeout, on_stall=on_stall, rdzv_timeout=rdzv_timeout,
        rdzv_id=rdzv_id, rdzv_conf=rdzv_conf, log_with=log_with, project_name=project_name,
        logging_dir=logging_dir, cluster=cluster,
    )
    for note in config.notes:
        print(note, file=sys.stderr)
    title = config.describe()
    if config.display != "none":
        print(f"Launching on {title}")
    if not block:
        from .run import Run

        return Run.launch(config, title)
    return launch(config, lambda attempt: make_view(config.display, config.line_prefix, title))
