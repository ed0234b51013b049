"""Small helpers shared by the measurements that run inside a host (process or kernel)."""

from __future__ import annotations

import contextlib
import gc
import glob
import os
import shutil
import tempfile
import threading
import time


@contextlib.contextmanager
def scratch():
    """A fresh directory for the workers' timestamp files, removed afterwards."""
    path = tempfile.mkdtemp(prefix="nl-bench-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stamps(directory: str, prefix: str) -> list:
    """The ``time.time()`` values the workers wrote as ``<prefix>.<rank>``."""
    values = []
    for path in glob.glob(os.path.join(directory, f"{prefix}.*")):
        with open(path) as f:
            values.append(float(f.read()))
    return values


def settle() -> None:
    """Start each measurement from the same state: garbage collected, workers of the
    previous call gone (a launcher may return before its last child is reaped).
    multiprocessing's resource tracker, a helper that lives as long as its parent, is
    not a worker: it stays."""
    gc.collect()
    _malloc_trim()
    try:
        import psutil
    except ImportError:
        return
    deadline = time.monotonic() + 5
    me = psutil.Process()
    while time.monotonic() < deadline:
        if not [p for p in me.children(recursive=True) if _alive(p) and not _helper(p)]:
            return
        time.sleep(0.01)


def _malloc_trim() -> None:
    # Give memory freed by earlier calls back to the OS, so that a memory measurement
    # is not hidden by new allocations reusing pages that are still resident.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _helper(proc) -> bool:
    try:
        return any("resource_tracker" in part or "forkserver" in part for part in proc.cmdline())
    except Exception:
        return False


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class PeakRSS:
    """The peak resident memory of this process during a block, in bytes.

    On Linux the kernel keeps the high-water mark (VmHWM) and lets a process reset it
    (``/proc/self/clear_refs``), which catches every peak, even one reached while a C
    call holds the GIL. Elsewhere a thread samples the RSS every 2 ms (it can miss
    such peaks).

    Example::

        with PeakRSS() as mem:
            value = big_call()
        print(mem.peak - mem.baseline)
    """

    def __init__(self, interval: float = 0.002) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._thread = None
        self.baseline = self.peak = 0

    def __enter__(self) -> "PeakRSS":
        self.baseline = _status_kb("VmRSS") * 1024
        if _reset_high_water_mark():
            self.method = "VmHWM"
        else:
            import psutil

            self.method = "sampled"
            self.peak = psutil.Process().memory_info().rss
            self._thread = threading.Thread(target=self._sample, args=(psutil.Process(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            self.peak = _status_kb("VmHWM") * 1024
            return
        self._stop.set()
        self._thread.join(timeout=5)

    def _sample(self, process) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, process.memory_info().rss)


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss // 1024


class CPUTrace:
    """Samples this process's CPU time (all its threads) against the wall clock, so that
    the CPU it used during any window inside the block can be read afterwards.

    Example::

        with CPUTrace() as trace:
            run()
        trace.used(start, end)   # CPU seconds between two time.time() stamps
    """

    def __init__(self, interval: float = 0.01) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self.samples: list = []

    def __enter__(self) -> "CPUTrace":
        self._take()
        self._thread = threading.Thread(target=self._run, name="bench-cpu", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._take()

    def _take(self) -> None:
        times = os.times()
        self.samples.append((time.time(), times.user + times.system))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._take()

    def used(self, start: float, end: float) -> float:
        """CPU seconds used between ``start`` and ``end`` (linear between samples)."""
        return self._at(end) - self._at(start)

    def _at(self, when: float) -> float:
        samples = self.samples
        if when <= samples[0][0]:
            return samples[0][1]
        for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
            if t0 <= when <= t1:
                return c0 + (c1 - c0) * ((when - t0) / (t1 - t0) if t1 > t0 else 1.0)
        return samples[-1][1]
