"""What `python -m notebook_launcher env` and `... test` look at.

`collect()` gathers facts about this machine as plain data (`Report`); `cli` prints it.
Nothing here initializes CUDA in this process: the GPU facts (inventory, what
CUDA_VISIBLE_DEVICES shows, peer-to-peer) come from `environment`, the same functions
the launch decides with, through NVML or ``nvidia-smi``, never the CUDA runtime, so
running ``env`` inside a notebook kernel keeps later forks safe.

`collective_check` is the function that ``test`` launches on every rank: a real
all_reduce, all_gather and broadcast, with the expected answers checked on each rank.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform as _platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from . import environment


# ----------------------------------------------------------------- plain data
@dataclass
class WidgetSupport:
    ipywidgets: Optional[str]          # installed versions, None = missing
    jupyterlab_widgets: Optional[str]  # JupyterLab's side of the widgets (prebuilt extension)
    widgetsnbextension: Optional[str]  # the classic Notebook's side
    matplotlib: Optional[str]          # draws the loss plot PNG
    ok: bool
    verdict: str


@dataclass
class Report:
    python: str
    os: str
    platform: str                  # environment.platform(): colab | kaggle | jupyter | ipython | python
    cpu_count: int
    torch: str
    torch_cuda: Optional[str]      # CUDA version torch was built with; None for CPU builds
    gloo: bool
    nccl: Optional[str]            # NCCL version torch ships, None when unavailable
    cuda_visible_devices: Optional[str]
    visible_gpu_count: int         # what torch (and so the launcher) sees
    cuda_initialized: bool         # this process holds a CUDA context (must stay False here)
    gpus: environment.GpuInventory
    p2p: Optional[bool]            # environment.p2p_supported: the answer the launch acts on
    widgets: WidgetSupport
    default_launch: str            # what `notebook_launcher(fn)` would start here
    hints: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------- collection
def collect() -> Report:
    """Facts about this machine and Python environment, without initializing CUDA.

    Example::

        report = collect()
        report.visible_gpu_count, report.p2p, report.widgets.ok
    """
    import torch
    import torch.distributed as dist

    env = environment.detect()
    gpus = environment.gpu_inventory()
    report = Report(
        python=sys.version.split()[0],
        os=f"{_platform.system()} {_platform.release()} ({_platform.machine()})",
        platform=env.platform,
        cpu_count=env.cpu_count,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        gloo=dist.is_available() and dist.is_gloo_available(),
        nccl=nccl_version(),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        visible_gpu_count=env.gpu_count,
        cuda_initialized=environment.cuda_initialized(),
        gpus=gpus,
        p2p=environment.p2p_supported(gpus),
        widgets=widget_support(env.platform),
        default_launch=default_launch(),
    )
    report.hints = hints(report)
    return report


def nccl_version() -> Optional[str]:
    """The NCCL version bundled with torch (a library query: no CUDA context is created)."""
    try:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_nccl_available()):
            return None
        version = torch.cuda.nccl.version()
    except Exception:
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def widget_support(where: Optional[str] = None) -> WidgetSupport:
    """Whether the live dashboard can render: ipywidgets here, and a frontend side that matches.

    Checked in this Python environment; a JupyterLab started from another environment
    needs its own matching ``jupyterlab_widgets``.
    """
    where = where or environment.platform()
    versions = {name: _version(name) for name in
                ("ipywidgets", "jupyterlab_widgets", "widgetsnbextension", "matplotlib")}
    ipyw = versions["ipywidgets"]
    ok, verdict = True, ""
    if ipyw is None:
        ok, verdict = False, "no: ipywidgets is not installed (pip install ipywidgets); the launcher shows text"
    elif where in ("colab", "kaggle"):
        verdict = f"yes: {where} renders ipywidgets with its own widget manager"
    else:
        major = _major(ipyw)
        wanted = {8: (3, 4), 7: (1, 3)}.get(major)    # ipywidgets major -> (jupyterlab_widgets, widgetsnbextension)
        lab, classic = _major(versions["jupyterlab_widgets"]), _major(versions["widgetsnbextension"])
        if wanted is None:
            verdict = f"unknown: ipywidgets {ipyw} is not a version this check knows"
        elif lab is None and classic is None:
            ok, verdict = False, ("no frontend side: pip install jupyterlab_widgets (JupyterLab, Notebook 7), "
                                  "else widgets show as 'Error displaying widget'")
        elif lab not in (None, wanted[0]) or classic not in (None, wanted[1]):
            ok, verdict = False, (f"mismatch: ipywidgets {ipyw} needs jupyterlab_widgets {wanted[0]}.x / "
                                  f"widgetsnbextension {wanted[1]}.x, else 'Error displaying widget'")
        else:
            verdict = "yes, in JupyterLab / Notebook 7 served from this environment"
    if ok and versions["matplotlib"] is None:
        verdict += "; no matplotlib, so no loss plot (pip install matplotlib)"
    return WidgetSupport(ipyw, versions["jupyterlab_widgets"], versions["widgetsnbextension"],
                         versions["matplotlib"], ok, verdict)


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _major(version: Optional[str]) -> Optional[int]:
    if not version:
        return None
    head = version.split(".")[0]
    return int(head) if head.isdigit() else None


def default_launch() -> str:
    """What ``notebook_launcher(fn)`` with defaults would start from this process, in the
    launch banner's words (`LaunchConfig.describe`), e.g. "2 CPU processes (gloo, fork)"."""
    from .config import resolve

    try:
        return resolve(_noop, display="none").describe()
    except Exception as exc:  # the report must still print
        return f"unknown ({type(exc).__name__}: {exc})"


def _noop() -> None:
    """Stand-in function for `default_launch` (never called)."""


def hints(report: Report) -> list:
    """Advice that follows from the facts, one line each."""
    out = []
    if report.platform == "kaggle":
        out.append("Kaggle: pick the 'GPU T4 x2' accelerator; notebook_launcher(fn) then starts 2 workers (nccl).")
    if report.platform == "colab":
        out.append("Colab: one GPU, so one GPU worker; device='cpu' runs 2 CPU workers to try multi-process code.")
    if report.gpus.gpus and report.visible_gpu_count == 0:
        out.append("GPUs are present but torch sees none: a CPU-only torch build, or CUDA_VISIBLE_DEVICES hides them.")
    if report.p2p is False:
        out.append("Some GPU pairs lack peer-to-peer access: the launcher sets NCCL_P2P_DISABLE=1 and "
                   "NCCL_IB_DISABLE=1 for the workers, and NCCL goes through host memory (slower).")
    if not report.widgets.ok:
        out.append("The live dashboard will fall back to text output (see 'widgets' above).")
    if report.cuda_initialized:
        out.append("CUDA is initialized in this process: launches use spawn (slower start) instead of fork.")
    return out


# ----------------------------------------------------------------- text
def format_report(report: Report) -> str:
    """The ``env`` report as aligned ``key: value`` lines.

    Example::

        print(format_report(collect()))   # what `python -m notebook_launcher env` prints
    """
    gpus = report.gpus
    rows = [
        ("python", f"{report.python} on {report.os}"),
        ("running in", report.platform),
        ("CPUs", str(report.cpu_count)),
        ("torch", report.torch + (f" (CUDA {report.torch_cuda})" if report.torch_cuda else " (CPU build)")),
        ("gloo", "yes" if report.gloo else "no"),
        ("NCCL", report.nccl or "not available"),
        ("GPU driver", gpus.driver or ("none found" if not gpus.error else gpus.error)),
        ("GPUs", _gpu_count_text(report)),
    ]
    for gpu in gpus.gpus:
        memory = f", {gpu.memory_mib / 1024:.0f} GiB" if gpu.memory_mib else ""
        capability = f", compute {gpu.compute_capability:.1f} (bf16 {'yes' if gpu.has_bf16 else 'no'})" \
            if gpu.compute_capability is not None else ""
        hidden = "" if gpu.index in gpus.visible else " (hidden by CUDA_VISIBLE_DEVICES)"
        rows.append((f"  GPU {gpu.index}", f"{gpu.name}{memory}{capability}{hidden}"))
    if report.cuda_visible_devices is not None:
        rows.append(("CUDA_VISIBLE_DEVICES", repr(report.cuda_visible_devices)))
    rows += [
        ("peer-to-peer", p2p_text(gpus, report.p2p)),
        ("CUDA initialized here", "yes" if report.cuda_initialized else "no"),
        ("widgets dashboard", report.widgets.verdict),
        ("  versions", _widget_versions(report.widgets)),
        ("notebook_launcher(fn)", f"starts {report.default_launch}"),
    ]
    width = max(len(key) for key, _ in rows)
    lines = [f"{key + ':':<{width + 1}} {value}" for key, value in rows]
    lines += [f"hint: {hint}" for hint in report.hints]
    return "\n".join(lines)


def p2p_text(inventory: environment.GpuInventory, verdict: Optional[bool]) -> str:
    """The ``peer-to-peer`` line: ``verdict`` (`environment.p2p_supported`) with the pair count.

    Example::

        p2p_text(inventory, environment.p2p_supported(inventory))   # "1 of 3 pairs (...)"
    """
    if len(inventory.visible) < 2:
        return "n/a (fewer than 2 GPUs)"
    good, known = sum(inventory.p2p.values()), len(inventory.p2p)
    if verdict is None:
        return f"unknown ({known} of {len(inventory.visible) * (len(inventory.visible) - 1) // 2} pairs known)" \
            if known else "unknown"
    if verdict:
        return "all pairs"
    fix = "launches set NCCL_P2P_DISABLE=1"
    return f"none ({fix})" if good == 0 else f"{good} of {known} pairs ({fix})"


def _gpu_count_text(report) -> str:
    found = len(report.gpus.gpus)
    text = f"{report.visible_gpu_count} visible to torch"
    if found != report.visible_gpu_count:
        text += f", {found} on the machine (via {report.gpus.source})" if found else ""
    elif found:
        text += f" (listed via {report.gpus.source})"
    return text


def _widget_versions(widgets) -> str:
    names = ("ipywidgets", "jupyterlab_widgets", "widgetsnbextension", "matplotlib")
    return ", ".join(f"{name} {getattr(widgets, name) or 'missing'}" for name in names)


# ----------------------------------------------------------------- the `test` worker
def collective_check(size_mib: float = 8.0, repeats: int = 3) -> dict:
    """Runs on every rank of ``python -m notebook_launcher test``.

    Checks all_reduce (sum of rank+1 over ranks), all_gather (every rank's id) and
    broadcast (rank 0's value) against the values they must have, then times an
    all_reduce of ``size_mib`` MiB. Returns this rank's findings; ``ok`` is True only
    when every check passed.

    Example::

        notebook_launcher(collective_check, num_processes=2, return_all=True)
    """
    import torch
    import torch.distributed as dist

    from .workers import context

    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = context.current()
    device = torch.device(ctx.device if ctx is not None else "cpu")
    problems = []

    total = torch.full((16,), float(rank + 1), device=device)
    dist.all_reduce(total)
    expected = world * (world + 1) / 2
    if not torch.all(total == expected):
        problems.append(f"all_reduce gave {total[0].item()}, expected {expected}")

    ranks = [torch.zeros(1, device=device) for _ in range(world)]
    dist.all_gather(ranks, torch.tensor([float(rank)], device=device))
    if [int(t.item()) for t in ranks] != list(range(world)):
        problems.append(f"all_gather gave {[t.item() for t in ranks]}")

    token = torch.tensor([1234.5 if rank == 0 else -1.0], device=device)
    dist.broadcast(token, src=0)
    if token.item() != 1234.5:
        problems.append(f"broadcast gave {token.item()}")

    seconds, bus_gbps = _time_all_reduce(size_mib, repeats, world, device)
    return {"rank": rank, "world_size": world, "device": str(device), "backend": dist.get_backend(),
            "ok": not problems, "problems": problems, "all_reduce_seconds": seconds, "bus_gb_per_s": bus_gbps}


def _time_all_reduce(size_mib: float, repeats: int, world: int, device) -> tuple:
    """Mean seconds per all_reduce of ``size_mib`` MiB and the bus bandwidth it implies
    (NCCL's convention: ``2 (n-1)/n * bytes / time``)."""
    import torch
    import torch.distributed as dist

    data = torch.ones(max(1, int(size_mib * 2**20 / 4)), device=device)
    dist.all_reduce(data)  # warm-up: connections are made lazily
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(data)
    _sync(device)
    seconds = (time.perf_counter() - start) / repeats
    bytes_moved = data.numel() * 4 * 2 * (world - 1) / world
    return seconds, bytes_moved / seconds / 1e9 if seconds > 0 else 0.0


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
