"""Run-state events as the supervisor makes them, for tests that drive a `RunState` by hand.

What a rank says arrives as `state.Received(rank, <channel message>, t)`; these build the
common ones. ``t`` is when the notebook received it; ``sent`` is the rank's own clock
(default: the same moment, as for ranks on this machine).
"""

from notebook_launcher import channel as ch
from notebook_launcher.state import Received


def ready(rank: int, t: float) -> Received:
    return Received(rank, ch.RankReady(1000 + rank, "gloo", "cpu"), t)


def metrics(rank: int, step, values: dict, t: float, sent=None) -> Received:
    return Received(rank, ch.Report(step, values, t if sent is None else sent), t)


def progress(rank: int, n: int, total, desc, depth: int, t: float, sent=None) -> Received:
    return Received(rank, ch.ProgressUpdate(n, total, desc, depth, t if sent is None else sent), t)


def heartbeat(rank: int, t: float) -> Received:
    return Received(rank, ch.Heartbeat(t), t)


def task_ended(rank: int, ok: bool, t: float) -> Received:
    message = ch.TaskDone() if ok else ch.TaskFailed("E: x", "", "E", None, False, t)
    return Received(rank, message, t)
