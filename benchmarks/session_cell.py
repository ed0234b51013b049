"""What one cell costs on a persistent session, from a real Jupyter kernel (issue 11).

Side by side, in one run, as median milliseconds from sending the cell to the kernel's
reply after it went idle (what a person waits for), on 2 CPU ranks (gloo):

- a plain cell (``pass``) in the same kernel: the floor every other row is compared with;
- a trivial ``%%dist`` cell (``x = 1``) on a session started with ``%dist start``;
- ``session.run(trivial)`` on a `Session` (the function travels by value every call);
- a one-shot ``notebook_launcher(trivial, num_processes=2, device="cpu")``: fork, process
  group, run, teardown, the whole cost the session saves;
- when installed (``pip install -e ".[bench]"``), the same trivial cell in ipyparallel
  (``%%px`` on a 2-engine cluster started from the kernel) and in jupyter-distributed (its
  kernel with 2 processes, where every cell runs on the ranks: its overhead is taken over
  our kernel's plain cell). Their ranks import torch and form a gloo group in the setup,
  as ours do. nbdistributed is left out: its shutdown kills processes by broad
  ``pkill -f`` patterns, which no automated run may do on a shared machine.

Every row runs once per round, in a shuffled order; the first rounds are a warm-up that
is not counted. Every kernel is shut down and everything it started is killed at the end.

    python benchmarks/session_cell.py                      # 30 samples per row, 5 warm-up rounds
    python benchmarks/session_cell.py --samples 10 --peers none

Targets (issue 11, 2 CPU ranks): a trivial ``%%dist`` cell under 3 ms over a plain cell;
``session.run`` of a trivial function under 3 ms over a plain cell.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import table  # noqa: E402
from benchmarks.kernel_runner import KernelRunner  # noqa: E402
from benchmarks.run_all import leftover_processes, machine  # noqa: E402

NPROC = 2
PEERS = ("ipyparallel", "jupyter-distributed")
TARGET_MS = 3.0   # issue 11: a %%dist cell and session.run, over a plain cell


@dataclass(frozen=True)
class Row:
    label: str
    host: str                     # which kernel runs it: "ours" or a peer's name
    code: str
    baseline: Optional[str]       # label of the plain cell it is compared with
    target: bool = False          # held to TARGET_MS over its baseline


ROWS = (
    Row("plain cell: pass", "ours", "pass", None),
    Row("%%dist cell: x = 1", "ours", "%%dist\nx = 1", "plain cell: pass", target=True),
    Row("session.run(trivial)", "ours", "session.run(trivial)", "plain cell: pass", target=True),
    Row("notebook_launcher(trivial), one-shot", "ours",
        f"notebook_launcher(trivial, num_processes={NPROC}, device='cpu')", "plain cell: pass"),
    Row("plain cell: pass (ipyparallel's kernel)", "ipyparallel", "pass", None),
    Row("ipyparallel %%px cell: x = 1", "ipyparallel", "%%px\nx = 1", "plain cell: pass (ipyparallel's kernel)"),
    Row("jupyter-distributed cell: x = 1", "jupyter-distributed", "x = 1", "plain cell: pass"),
)

SETUP = {
    "ours": f"""
%load_ext notebook_launcher
from notebook_launcher import Session, notebook_launcher
def trivial():
    return None
%dist start -n {NPROC} --device cpu
session = Session({NPROC}, device="cpu")
""",
    # Engines get their rank and a free port pushed, then form the gloo group together.
    "ipyparallel": f"""
import socket
import ipyparallel as ipp
cluster = ipp.Cluster(n={NPROC}, log_level=40)
engines = cluster.start_and_connect_sync()
engines.wait_for_engines({NPROC}, timeout=120)
engines.activate()
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    _port = _s.getsockname()[1]
for _rank, _id in enumerate(engines.ids):
    engines[_id].push({{"rank": _rank, "port": _port}}, block=True)
engines[:].execute("import torch.distributed as dist; dist.init_process_group('gloo', "
                   "init_method=f'tcp://127.0.0.1:{{port}}', rank=rank, world_size={NPROC})", block=True)
""",
    # Every cell of this kernel runs on its ranks, which have RANK, MASTER_PORT, ... set.
    "jupyter-distributed": """
import torch.distributed as dist
dist.init_process_group("gloo")
""",
}

TEARDOWN = {
    "ours": "%dist stop\nsession.close()",
    "ipyparallel": "engines.close()\ncluster.stop_cluster_sync()",
    "jupyter-distributed": "dist.destroy_process_group()",
}


class SpecKernelRunner(KernelRunner):
    """A `KernelRunner` for a kernel given by its kernelspec (``argv``, ``env``), written to
    a directory of its own so nothing is installed.

    Example::

        with SpecKernelRunner("jd", {"argv": [...], "env": {...}}) as kernel:
            kernel.execute("x = 1")
    """

    def __init__(self, name: str, spec: dict, startup_timeout: float = 120) -> None:
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpecManager

        self.name = name
        self._spec_dir = tempfile.mkdtemp(prefix="nl-bench-kernels-")
        os.makedirs(os.path.join(self._spec_dir, name))
        with open(os.path.join(self._spec_dir, name, "kernel.json"), "w") as f:
            json.dump({"display_name": name, "language": "python", **spec}, f)
        self._km = KernelManager(kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[self._spec_dir]))
        try:
            self._km.start_kernel(cwd=REPO)
            self._pid = self._km.provisioner.process.pid
            self._client = self._km.client()
            self._client.start_channels()
            self._client.wait_for_ready(timeout=startup_timeout)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            if getattr(self, "_client", None) is not None:
                super().close()
            elif self._km.has_kernel:
                self._km.shutdown_kernel(now=True)
        finally:
            shutil.rmtree(self._spec_dir, ignore_errors=True)


def jupyter_distributed_spec(nproc: int) -> dict:
    """The kernel jupyter-distributed's server extension would start for a notebook with
    ``nproc`` processes (its proxy kernel over ``nproc`` python3 rank kernels)."""
    return {"argv": [sys.executable, "-m", "jupyter_distributed.kernel", "-f", "{connection_file}"],
            "interrupt_mode": "message",
            "env": {"JUPYTER_DISTRIBUTED_WORLD_SIZE": str(nproc), "JUPYTER_DISTRIBUTED_BASE_KERNEL": "python3"}}


def installed_peers(wanted: list) -> list:
    modules = {"ipyparallel": "ipyparallel", "jupyter-distributed": "jupyter_distributed"}
    return [peer for peer in wanted if importlib.util.find_spec(modules[peer]) is not None]


def start_host(host: str):
    runner = SpecKernelRunner("jd-bench", jupyter_distributed_spec(NPROC)) if host == "jupyter-distributed" \
        else KernelRunner(f"session-cell-{host}")
    try:
        _must(runner, SETUP[host], timeout=180)
    except BaseException:
        runner.close()
        raise
    return runner


def stop_host(runner, host: str) -> None:
    """Tear the host's ranks down by their own API, then shut the kernel down (which
    kills whatever it started that is still alive)."""
    try:
        runner.execute(TEARDOWN[host], timeout=60)
    except Exception as exc:
        print(f"tearing down {host}: {exc}", file=sys.stderr)
    finally:
        runner.close()


def _must(runner, code: str, timeout: float = 60) -> None:
    output = runner.execute(code, timeout=timeout)
    if not output.ok:
        raise RuntimeError(f"{runner.name}: {output.error.strip()[-2000:] or 'failed'}\n{output.stdout[-2000:]}")


def measure(rows: list, hosts: dict, samples: int, warmup: int, seed: int, verbose: bool) -> dict:
    """{label: [milliseconds, ...]}: every row once per round, shuffled; the first
    ``warmup`` rounds are not kept."""
    times: dict = {row.label: [] for row in rows}
    rng = random.Random(seed)
    order = list(rows)
    for index in range(warmup + samples):
        rng.shuffle(order)
        for row in order:
            runner = hosts[row.host]
            started = time.perf_counter()
            output = runner.execute(row.code, timeout=60)
            elapsed = (time.perf_counter() - started) * 1000
            if not output.ok:
                raise RuntimeError(f"{row.label} failed: {output.error.strip()[-2000:]}")
            if index >= warmup:
                times[row.label].append(elapsed)
        if verbose:
            kept = "warm-up" if index < warmup else f"round {index - warmup + 1} of {samples}"
            print(f"  {kept}: " + ", ".join(f"{row.label.split(':')[0]} {times[row.label][-1]:.1f}"
                                             for row in rows if times[row.label] and index >= warmup),
                  file=sys.stderr, flush=True)
    return times


def render(rows: list, times: dict) -> tuple:
    """(table lines, [(row, verdict)]): medians, interquartile ranges, overhead over the
    row's plain cell, and the targets. The overhead is the median of the differences
    within a round (the row minus its plain cell of the same round), so that the load of
    a shared machine, which drifts from round to round, cancels out."""
    medians = {label: statistics.median(values) for label, values in times.items() if values}
    header = ["cell", "host", "n", "median ms", "p25-p75 ms", "over plain ms", "target"]
    lines, verdicts = [], []
    for row in rows:
        values = times.get(row.label)
        if not values:
            continue
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
        over = statistics.median(a - b for a, b in zip(values, times[row.baseline])) \
            if row.baseline in medians else None
        verdict = ""
        if row.target and over is not None:
            verdict = f"< {TARGET_MS:g} ms over plain: {'ok' if over < TARGET_MS else 'MISS'}"
            verdicts.append((row.label, verdict))
        lines.append([row.label, row.host, str(len(values)), f"{medians[row.label]:.2f}", f"{q1:.2f}-{q3:.2f}",
                      "" if over is None else f"{over:+.2f}", verdict])
    return table._grid(header, lines), verdicts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=30, help="counted rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="rounds run first and not counted (default 5)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated subset of {','.join(PEERS)} (those installed), or none")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each round's times")
    args = parser.parse_args(argv)
    wanted = [] if args.peers.strip() == "none" else [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PEERS]
    if unknown:
        raise SystemExit(f"--peers: choose from {', '.join(PEERS)} or none (got {args.peers!r})")
    if args.samples < 1 or args.warmup < 0:
        raise SystemExit("--samples must be at least 1 and --warmup at least 0")
    args.peers = wanted
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    peers = installed_peers(args.peers)
    missing = [p for p in args.peers if p not in peers]
    rows = [row for row in ROWS if row.host == "ours" or row.host in peers]
    hosts: dict = {}
    try:
        for host in ["ours", *peers]:
            if args.verbose:
                print(f"starting {host}", file=sys.stderr, flush=True)
            hosts[host] = start_host(host)
        times = measure(rows, hosts, args.samples, args.warmup, args.seed, args.verbose)
    finally:
        for host, runner in hosts.items():
            stop_host(runner, host)
    left = leftover_processes()
    lines, verdicts = render(rows, times)
    print(f"Machine: {machine()}")
    print(f"Milliseconds from execute to idle (as a client sees it), {NPROC} CPU ranks (gloo); medians of "
          f"{args.samples} samples after {args.warmup} warm-up rounds, rows shuffled in each round; "
          f"over plain: median of the differences to the plain cell of the same round.")
    print("\n".join(lines))
    if missing:
        print(f"Not installed, so not measured: {', '.join(missing)} (pip install -e \".[bench]\").")
    print("Targets: " + ("; ".join(f"{label}: {verdict}" for label, verdict in verdicts) or "none measured"))
    if left:
        print(f"\nLEFT BEHIND: {[(p.pid, p.name()) for p in left]}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
