"""Big values between the caller and its ranks (issue 21), beside the floors, in one run.

Every row moves one tensor of 1, 100 or 1000 MB that already exists on the sending side,
and ends when the receiver holds it as a tensor:

- ``pipe floor``: a forked child writes the bytes into a pipe, the caller reads them into
  a buffer of its own (one copy in each process) and wraps it as a tensor;
- ``memfd floor``: the child writes the bytes once into a memfd and passes the file
  (SCM_RIGHTS), the caller maps it and wraps the mapping as a tensor (one copy in all);
- ours, on a `Session` of 2 CPU ranks: ``return`` (``session.run`` of a function returning
  rank 0's tensor), ``pull`` (``session.pull`` of it) and ``push`` (``session.push`` of the
  caller's tensor to both ranks).

Seconds are medians over rounds (every row once per round, shuffled; one warm-up round
not counted). ``peak x value`` is the caller's peak resident memory during the row, the
value read once at the end (every page touched), over the value's size: the least
possible for a value that arrives is about 1.0x, and a push's value is already there
before it starts (Linux's high-water mark, reset before each row).

    python benchmarks/big_values.py                   # 1, 100, 1000 MB; 5 rounds
    python benchmarks/big_values.py --sizes 1,100 --rounds 3

Targets (issue 21): return, pull and push of 100 MB at most 2x the memfd floor; the
caller's peak at most 1.2x the value; 1000 MB works.
"""

from __future__ import annotations

import argparse
import gc
import mmap
import os
import random
import socket
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import table  # noqa: E402
from benchmarks._timing import PeakRSS, _malloc_trim  # noqa: E402

MB = 2**20
NPROC = 2
ROWS = ("pipe floor", "memfd floor", "return", "pull", "push")
TARGET_RATIO = 2.0     # ours over the memfd floor, at 100 MB
TARGET_PEAK = 1.2      # the caller's peak over the value


# ----------------------------------------------------------------- the floors
class FloorChild:
    """A forked process holding ``megabytes`` of data, sending it on request through a
    pipe or as a memfd. Reaped by `close`."""

    def __init__(self, megabytes: int) -> None:
        self.size = megabytes * MB
        self.control_r, self.control_w = os.pipe()
        self.data_r, self.data_w = os.pipe()
        self.parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            try:
                self.parent_sock.close()
                self._serve(child_sock)
            finally:
                os._exit(0)
        child_sock.close()
        os.close(self.control_r)
        os.close(self.data_w)
        self.ready = os.read(self.data_r, 1)   # the child's data exists

    def _serve(self, sock: socket.socket) -> None:
        data = bytearray(b"\x00\x00\x80\x3f") * (self.size // 4)   # float32 ones, as ours
        os.write(self.data_w, b"r")
        while True:
            command = os.read(self.control_r, 1)
            if command == b"p":
                view = memoryview(data)
                while view:
                    view = view[os.write(self.data_w, view):]
            elif command == b"m":
                fd = os.memfd_create("floor", os.MFD_CLOEXEC)
                os.ftruncate(fd, self.size)
                view, offset = memoryview(data), 0
                while offset < self.size:
                    offset += os.pwrite(fd, view[offset:], offset)
                socket.send_fds(sock, [b"f"], [fd])
                os.close(fd)
            else:
                return

    def by_pipe(self):
        import torch

        os.write(self.control_w, b"p")
        buffer = bytearray(self.size)
        view, got = memoryview(buffer), 0
        while got < self.size:
            got += os.readv(self.data_r, [view[got:]])
        return torch.frombuffer(buffer, dtype=torch.float32)

    def by_memfd(self):
        import torch

        os.write(self.control_w, b"m")
        _, fds, _, _ = socket.recv_fds(self.parent_sock, 1, 1)
        try:
            mapping = mmap.mmap(fds[0], self.size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fds[0])
        return torch.frombuffer(mapping, dtype=torch.float32)

    def close(self) -> None:
        try:
            os.write(self.control_w, b"q")
        except OSError:
            pass
        for fd in (self.control_w, self.data_r):
            os.close(fd)
        self.parent_sock.close()
        os.waitpid(self.pid, 0)


# ----------------------------------------------------------------- ours (rank side)
_HELD: dict = {}


def held(megabytes: int):
    """On a rank: a tensor of ``megabytes`` that lives across calls (made on first use)."""
    import torch

    if megabytes not in _HELD:
        _HELD[megabytes] = torch.ones(megabytes * MB // 4)
    return _HELD[megabytes]


# ----------------------------------------------------------------- measuring
def measure_row(row: str, megabytes: int, session, floors: dict, values: dict) -> tuple:
    """(seconds, peak over the value) of one row, once."""
    import benchmarks.big_values as me   # by reference: the ranks import it, nothing of it is pickled

    gc.collect()          # (not _timing.settle: it waits for the caller's children, and the ranks stay)
    _malloc_trim()
    with PeakRSS() as memory:
        start = time.perf_counter()
        if row == "pipe floor":
            value = floors[megabytes].by_pipe()
        elif row == "memfd floor":
            value = floors[megabytes].by_memfd()
        elif row == "return":
            value = session.run(me.held, megabytes)
        elif row == "pull":
            value = session.pull(f"v{megabytes}", rank=0)
        else:
            value = values[megabytes]
            session.push(pushed=value)
        seconds = time.perf_counter() - start
        if float(value[:: 4096 // 4].sum()) != value.numel() / 1024:   # reads every page once
            raise RuntimeError(f"{row} {megabytes} MB: wrong data")
    del value
    if row == "push":
        session.push(pushed=None)   # the ranks free it now, not in the next row's time
    return seconds, (memory.peak - memory.baseline) / (megabytes * MB)


def run(sizes: list, rounds: int, seed: int, verbose: bool) -> dict:
    """{(row, size): [(seconds, peak), ...]} over ``rounds`` counted rounds."""
    import torch

    from notebook_launcher import Session

    floors = {mb: FloorChild(mb) for mb in sizes}
    samples: dict = {(row, mb): [] for row in ROWS for mb in sizes}
    try:
        with Session(NPROC, device="cpu", display="none") as session:
            for mb in sizes:
                session.execute(f"v{mb} = torch.ones({mb * MB // 4})", ranks=[0])
            values = {mb: torch.ones(mb * MB // 4) for mb in sizes}
            cases = [(row, mb) for row in ROWS for mb in sizes]
            rng = random.Random(seed)
            for index in range(rounds + 1):
                rng.shuffle(cases)
                for row, mb in cases:
                    result = measure_row(row, mb, session, floors, values)
                    if index:
                        samples[(row, mb)].append(result)
                    if verbose:
                        print(f"  {'warm-up' if not index else f'round {index}'}: {row} {mb} MB "
                              f"{result[0]:.3f} s, peak {result[1]:.2f}x", file=sys.stderr, flush=True)
    finally:
        for floor in floors.values():
            floor.close()
    return samples


def render(samples: dict, sizes: list) -> tuple:
    """(table lines, [(name, verdict)])."""
    def median(row, mb, index):
        values = [s[index] for s in samples[(row, mb)]]
        return statistics.median(values) if values else None

    header = ["size", "measure", *ROWS, "return/memfd", "pull/memfd", "push/memfd", "target"]
    lines, verdicts = [], []
    for mb in sizes:
        seconds = {row: median(row, mb, 0) for row in ROWS}
        peaks = {row: median(row, mb, 1) for row in ROWS}
        floor = seconds["memfd floor"]
        ratios = {op: seconds[op] / floor for op in ("return", "pull", "push")}
        verdict = ""
        if mb == 100:
            worst = max(ratios.values())
            verdict = f"<= {TARGET_RATIO:g}x memfd: {'ok' if worst <= TARGET_RATIO else 'MISS'}"
            verdicts.append((f"{mb} MB return/pull/push over the memfd floor", verdict))
        lines.append([f"{mb} MB", "seconds", *(f"{seconds[r]:.3f}" for r in ROWS),
                      *(f"{ratios[op]:.2f}x" for op in ("return", "pull", "push")), verdict])
        worst_peak = max(peaks[op] for op in ("return", "pull", "push"))
        peak_verdict = f"<= {TARGET_PEAK:g}x: {'ok' if worst_peak <= TARGET_PEAK else 'MISS'}"
        verdicts.append((f"{mb} MB caller's peak", peak_verdict))
        lines.append([f"{mb} MB", "peak x value", *(f"{peaks[r]:.2f}x" for r in ROWS), "", "", "", peak_verdict])
    return table._grid(header, lines), verdicts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,100,1000", help="megabytes, comma-separated (default 1,100,1000)")
    parser.add_argument("--rounds", type=int, default=5, help="counted rounds after one warm-up (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    return args


def main(argv=None) -> int:
    from benchmarks.run_all import leftover_processes, machine

    args = parse_args(argv)
    samples = run(args.sizes, args.rounds, args.seed, args.verbose)
    left = leftover_processes()
    lines, verdicts = render(samples, args.sizes)
    print(f"Machine: {machine()}")
    print(f"One tensor from where it exists to a tensor in the receiver, {NPROC} CPU ranks; medians of "
          f"{args.rounds} rounds after a warm-up, rows shuffled; peak: the caller's, the value read once, "
          f"over its size.")
    print("\n".join(lines))
    print("Targets: " + "; ".join(f"{name}: {verdict}" for name, verdict in verdicts))
    if left:
        print(f"\nLEFT BEHIND: {[(p.pid, p.name()) for p in left]}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
