"""Where the time of one of our launches goes, step by step, parent and workers.

    python benchmarks/profile_launch.py                 # 2 processes, fork, 15 launches
    python benchmarks/profile_launch.py -n 4 --start-method spawn --repeats 5
    python benchmarks/profile_launch.py --parent-imports lightning.pytorch,accelerate   # a bigger parent

It wraps the launcher's internal steps (by name; a step that no longer exists is
skipped) with ``time.time()`` stamps. Forked workers inherit the wrappers; spawned ones
cannot, so for spawn only the parent's steps and the function entry are shown. Each
stamp is written by the process that made it to ``<dir>/<pid>``, and the table shows,
for every step, the median of its start and end relative to the call, over the launches.
Steps overlap and nest: read the start/end columns, not a sum.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

_DIR = {"path": None}

# (module, attribute path, label, side). Order = the order they happen in.
STEPS = [
    ("notebook_launcher.api", "resolve", "parent: resolve config", "parent"),
    ("notebook_launcher.api", "make_view", "parent: make view", "parent"),
    ("notebook_launcher.ranks", "rendezvous.host_store", "parent: TCPStore server", "parent"),
    ("notebook_launcher.workers.processes", "WorkerPipes.open", "parent: open pipes (each)", "parent"),
    ("notebook_launcher.workers.preload", "before_fork", "parent: preload decision", "parent"),
    ("notebook_launcher.workers.noninteractive", "before_fork", "parent: modules holding Lightning's flag", "parent"),
    ("notebook_launcher.ranks.local", "start_workers", "parent: start all workers", "parent"),
    ("multiprocess.process", "BaseProcess.start", "parent: Process.start (each)", "parent"),
    ("os", "fork", "parent: os.fork syscall (each)", "parent"),
    ("notebook_launcher.monitor", "Supervisor.run", "parent: supervisor loop", "parent"),
    ("notebook_launcher.workers.bootstrap", "_isolate", "worker: isolate (setpgid, pdeathsig)", "worker"),
    ("notebook_launcher.workers.bootstrap", "_own_descriptors", "worker: own fds and streams", "worker"),
    ("notebook_launcher.workers.bootstrap", "_reattach_log_handlers", "worker: reattach log handlers", "worker"),
    ("notebook_launcher.workers.bootstrap", "_read_control", "worker: watchdog thread", "worker"),
    ("notebook_launcher.workers.bootstrap", "register_dump_handler", "worker: stack dump handler", "worker"),
    ("notebook_launcher.workers.bootstrap", "_prepare", "worker: prepare (env, torch, group)", "worker"),
    ("notebook_launcher.workers.noninteractive", "behave_as_a_script", "worker: behave as a script", "worker"),
    ("notebook_launcher.workers.bootstrap", "_init_process_group", "worker: init_process_group", "worker"),
    ("notebook_launcher.integrations", "prepare_accelerate", "worker: prepare accelerate", "worker"),
    ("notebook_launcher.workers.bootstrap", "_rank_namespace", "worker: rank namespace", "worker"),
    ("notebook_launcher.workers.bootstrap", "_run_task", "worker: run task (function, result)", "worker"),
    ("notebook_launcher.workers.bootstrap", "_finish_together", "worker: final barrier", "worker"),
    ("notebook_launcher.workers.bootstrap", "_send_result", "worker: send result", "worker"),
    ("notebook_launcher.workers.bootstrap", "dumps_result", "worker: pickle the result", "worker"),
    ("notebook_launcher.channel", "encode", "worker: frame a message (each)", "worker"),
    ("notebook_launcher.workers.bootstrap", "_destroy_process_group", "worker: destroy group", "worker"),
    ("notebook_launcher.channel", "WorkerChannel.close", "worker: channel close", "worker"),
    ("notebook_launcher.workers.bootstrap", "_flush_std_streams", "worker: final flush (-> _exit)", "worker"),
    ("notebook_launcher.ranks.local", "LocalRanks._on_exit", "parent: sees a worker exit (each)", "parent"),
    ("notebook_launcher.workers.bootstrap", "_report_error", "worker: report its error", "worker"),
    ("notebook_launcher.monitor", "Verdict.failed", "parent: records a failure (each)", "parent"),
    ("notebook_launcher.launcher", "collect", "parent: unpickle result", "parent"),
    ("notebook_launcher.ranks.local", "LocalRanks.close", "parent: teardown", "parent"),
    ("notebook_launcher.ranks.local", "LocalRanks._wait_for_exits", "parent: wait for ranks to exit", "parent"),
    ("notebook_launcher.ranks.local", "stop_workers", "parent: stop/reap workers", "parent"),
]


def _record(label: str, start: float, end: float) -> None:
    if _DIR["path"] is None:
        return
    with open(os.path.join(_DIR["path"], str(os.getpid())), "a") as f:
        f.write(f"{label}\t{start!r}\t{end!r}\n")


def _wrap(label: str, original):
    @functools.wraps(original)
    def timed(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            _record(label, start, time.time())

    return timed


def instrument() -> list:
    """Wrap every step that exists; returns the labels that could not be found."""
    import importlib

    missing = []
    for module_name, path, label, _ in STEPS:
        try:
            owner = importlib.import_module(module_name)
            *parents, name = path.split(".")
            for part in parents:
                owner = getattr(owner, part)
            setattr(owner, name, _wrap(label, getattr(owner, name)))
        except (ImportError, AttributeError):
            missing.append(label)
    return missing


def trivial(out_dir):
    """The workload: stamp the entry (group ready), one barrier, return."""
    import time as _time

    import torch.distributed as dist

    entered = _time.time()
    with open(os.path.join(out_dir, str(os.getpid())), "a") as f:
        f.write(f"worker: inside the function\t{entered!r}\t{entered!r}\n")
    dist.barrier()
    return dist.get_rank()


def _decide_when_all_exited() -> None:
    """Experiment for a proposed change in monitor.py: nobody is left to report an earlier
    root cause once every rank has exited, so the failure window can end there."""
    from notebook_launcher import monitor

    original = monitor.Supervisor._decided

    def decided(self) -> bool:
        if self._first_failure_at is not None and all(h.exitcode is not None for h in self.handles):
            return True
        return original(self)

    monitor.Supervisor._decided = decided


def wait_while_closing() -> None:
    """Experiment for a proposed change in ranks/local.py: `LocalRanks.close` marks the group
    closed before its first step, `_wait_for_exits`, and `_wait_raw` answers a closed group
    with a 50 ms sleep instead of a select() on the ranks' pipes and sentinels: every
    one-shot launch waits those 50 ms for ranks that exit in a few. Here `_wait_raw` selects
    until the selector itself is closed (a later step of `close`)."""
    from notebook_launcher.ranks import local

    original = getattr(local.LocalRanks._wait_raw, "__wrapped_original__", local.LocalRanks._wait_raw)

    def wait_raw(self, timeout: float) -> list:
        closed, self._closed = self._closed, False   # as if _wait_raw tested only the selector
        try:
            return original(self, timeout)
        finally:
            self._closed = closed

    wait_raw.__wrapped_original__ = original
    local.LocalRanks._wait_raw = wait_raw


def big_result(out_dir, megabytes=100):
    """The return workload: rank 0 returns a ``megabytes`` MB state_dict."""
    import time as _time

    import torch
    import torch.distributed as dist

    state = None
    if dist.get_rank() == 0:
        state = {f"w{i}": torch.randn(1 << 20) for i in range(int(megabytes) // 4)}
    dist.barrier()
    returned = _time.time()
    with open(os.path.join(out_dir, str(os.getpid())), "a") as f:
        f.write(f"worker: returns\t{returned!r}\t{returned!r}\n")
    return state


def failing(out_dir):
    """The failure workload: the last rank raises while the others wait in a barrier."""
    import time as _time

    import torch.distributed as dist

    if dist.get_rank() == dist.get_world_size() - 1:
        _time.sleep(0.2)
        raised = _time.time()
        with open(os.path.join(out_dir, str(os.getpid())), "a") as f:
            f.write(f"worker: raises\t{raised!r}\t{raised!r}\n")
        raise ValueError("profiled failure")
    dist.barrier()


def one_launch(nproc: int, start_method: str, workload=trivial) -> dict:
    """Run one launch; {label: [(start, end) relative to the call, ...]}."""
    from notebook_launcher import notebook_launcher

    with tempfile.TemporaryDirectory(prefix="nl-profile-") as directory:
        _DIR["path"] = directory
        start = time.time()
        try:
            notebook_launcher(workload, (directory,), num_processes=nproc, start_method=start_method,
                              display="none", device="cpu")
        except Exception:
            if workload is trivial:
                raise
        end = time.time()
        _DIR["path"] = None
        steps: dict = {"call (total)": [(0.0, end - start)]}
        for name in os.listdir(directory):
            with open(os.path.join(directory, name)) as f:
                for line in f:
                    label, s, e = line.rstrip("\n").split("\t")
                    steps.setdefault(label, []).append((float(s) - start, float(e) - start))
    return steps


def _import_all(names: str) -> None:
    import importlib

    import torch  # noqa: F401  (every launch's parent has it)

    for name in filter(None, (n.strip() for n in names.split(","))):
        importlib.import_module(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--nproc", type=int, default=2)
    parser.add_argument("--start-method", default="fork", choices=("fork", "spawn"))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-destroy", action="store_true",
                        help="experiment: workers skip destroy_process_group before exiting")
    parser.add_argument("--failing", action="store_true", help="profile a failing launch instead")
    parser.add_argument("--big-result", action="store_true", help="profile returning a 100 MB state_dict")
    parser.add_argument("--failure-window", type=float, default=None,
                        help="experiment: override monitor.FAILURE_WINDOW (seconds)")
    parser.add_argument("--store-after-fork", action="store_true",
                        help="experiment: start the TCPStore server after forking (see fork_race.py)")
    parser.add_argument("--decide-early", action="store_true",
                        help="experiment: end the failure window once every rank has exited")
    parser.add_argument("--wait-while-closing", action="store_true",
                        help="experiment: ranks/local.py selects on the exiting ranks while it closes, "
                             "instead of sleeping 50 ms")
    parser.add_argument("--parent-imports", default="",
                        help="modules the launching process imports first, comma-separated (a bigger "
                             "parent: e.g. lightning.pytorch,accelerate, as a notebook using them has)")
    args = parser.parse_args(argv)
    _import_all(args.parent_imports)
    missing = instrument()
    if args.decide_early:
        _decide_when_all_exited()
    if args.wait_while_closing:
        wait_while_closing()
    if args.store_after_fork:
        from benchmarks.fork_race import store_after_fork

        store_after_fork()
    if args.failure_window is not None:
        from notebook_launcher import monitor

        monitor.FAILURE_WINDOW = args.failure_window
    if args.skip_destroy:
        from notebook_launcher.workers import bootstrap

        bootstrap._destroy_process_group = _wrap("worker: destroy group", lambda: None)
    workload = failing if args.failing else big_result if args.big_result else trivial
    one_launch(args.nproc, args.start_method, workload)  # warm-up: imports, first fork
    runs = [one_launch(args.nproc, args.start_method, workload) for _ in range(args.repeats)]
    order = [label for *_, label, _ in STEPS]
    order.insert(order.index("worker: run task (function, result)"), "worker: inside the function")
    order.insert(order.index("worker: report its error"), "worker: raises")
    order.insert(order.index("worker: final barrier"), "worker: returns")
    print(f"notebook_launcher launch profile: {args.nproc} processes, {args.start_method}, "
          f"median of {args.repeats} launches; ms from the call (first start / last end over ranks); "
          f"parent: {len(sys.modules)} modules imported")
    print(f"{'step':42s} {'start':>8s} {'end':>8s} {'dur/each':>9s}")
    for label in ["call (total)", *order]:
        starts, ends, durations = [], [], []
        for run in runs:
            spans = run.get(label)
            if spans:
                starts.append(min(s for s, _ in spans))
                ends.append(max(e for _, e in spans))
                durations.append(statistics.median(e - s for s, e in spans))
        if not starts:
            continue
        print(f"{label:42s} {1e3 * statistics.median(starts):8.1f} {1e3 * statistics.median(ends):8.1f} "
              f"{1e3 * statistics.median(durations):9.1f}")
    if missing:
        print("not found (renamed?): " + ", ".join(missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
