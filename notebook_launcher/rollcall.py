"""The roll-call: which collective waits for which rank, and mismatches, from the ranks' journals.

Each rank's journal (`workers.journal`) says which Python-level collectives it called, in
order, numbered per group, and whether it is still inside the last one. Put side by side
they say what a stall report's stacks leave to the person to work out:

- **who is missing** (`roll_call`): a collective some ranks wait in, and the members of
  its group that have not reached it, with where each of them is instead (the caller
  says it in words: `workers.frames.whereabouts`, "failed: ...", "finished the function")::

      all_reduce #10 (cell line 4) is waiting for rank 1: rank 0 waiting; rank 1 missing,
      finished the function (its last: all_reduce #9, cell line 4)

- **mismatches** (`mismatches`): ranks in the same collective number with a different op,
  dtype, shape or root, which hangs NCCL and fails or corrupts gloo::

      mismatch in collective #3: rank 0 all_reduce float32 [2] at cell line 3; rank 1 all_reduce float32 [3] at cell line 3

- **hopeless waits** (`hopeless`): ranks waiting in a collective that a member of its
  group can no longer join (it left the task): only aborting the group releases them.

Everything here is pure: journals and words in, lines out; no process is touched.
"""

from __future__ import annotations

from typing import Callable, Optional

from .workers.frames import place
from .workers.journal import SLOTS, Entry, Snapshot

CPP = "a collective torch issued from C++ (DDP's gradient all_reduce or its start-up broadcast, say)"


def current(snapshot: Optional[Snapshot], states: tuple = ("waiting",)) -> Optional[Entry]:
    """The collective a rank is in: its latest one, while its state is one of ``states``."""
    if snapshot is None or not snapshot.entries:
        return None
    last = snapshot.entries[-1]
    return last if last.state in states else None


def ranks_text(ranks: list) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(str(r) for r in ranks)


def roll_call(journals: dict, everyone: list, where: Callable[[int], str], states: tuple = ("waiting",),
              stuck: Optional[list] = None) -> list:
    """One line per collective in flight: who waits in it, who is missing and where that
    rank is. ``journals``: {rank: Snapshot or None}; ``everyone``: the ranks of the default
    group; ``where(rank)``: words for where a rank is; ``states``: which last entries count
    as in flight ("failed" too, after a collective raised); ``stuck``: ranks known to show
    no sign of life: when none waits inside a call, a collective they issued that others
    have not (NCCL's return at once: the wait comes later, `_issued`), else one torch
    issued from C++ (`cpp_line`)."""
    inside = _inside(journals, states)
    lines = [_p2p_line(rank, entry, inside, where) for rank, entry in inside.items() if entry.point_to_point]
    for key, seq, ranks, missing, past in _collectives(journals, inside, everyone):
        lines.append(_collective_line(key, seq, ranks, missing, past, journals, inside, where))
    if not lines and stuck:
        lines = [_issued_line(entry, ahead, behind, journals, where)
                 for entry, ahead, behind in _issued(journals, stuck, everyone)]
    if not lines and stuck:
        cpp = cpp_line(journals, stuck, where)
        if cpp:
            lines.append(cpp)
    return lines


def missing(journals: dict, everyone: list, states: tuple = ("waiting",), stuck: Optional[list] = None) -> list:
    """The ranks the collectives in flight wait for, in the order `roll_call` names them
    (the first is the one a stall is blamed on)."""
    inside = _inside(journals, states)
    out = [entry.peer for rank, entry in inside.items() if entry.point_to_point and entry.peer not in inside]
    for _, _, _, absent, _ in _collectives(journals, inside, everyone):
        out.extend(rank for rank in absent if rank not in out)
    if not out and stuck:
        for _, _, behind in _issued(journals, stuck, everyone):
            out.extend(rank for rank in behind if rank not in out)
    return out


def _issued(journals: dict, stuck: list, everyone: list) -> list:
    """[(entry, ranks that issued it, ranks that have not)] for the latest collective of
    each group that stuck ranks issued (and left: NCCL's calls return once queued) while
    other members of the group have not reached it."""
    latest: dict = {}
    for rank in stuck:
        snap = journals.get(rank)
        for entry in reversed(snap.entries if snap is not None else []):
            if not entry.point_to_point:
                latest.setdefault(entry.key, {}).setdefault(rank, entry)
    out = []
    for key, entries in latest.items():
        top = max(entry.seq for entry in entries.values())
        ahead = sorted(rank for rank, entry in entries.items() if entry.seq == top)
        first = entries[ahead[0]]
        behind = [rank for rank in first.members(everyone) if rank not in ahead and _reached(journals.get(rank), key) < top]
        if behind:
            out.append((first, ahead, behind))
    return out


def _reached(snap: Optional[Snapshot], key: tuple) -> int:
    last = snap.last(key) if snap is not None else None
    return last.seq if last is not None else 0


def _issued_line(entry: Entry, ahead: list, behind: list, journals: dict, where: Callable[[int], str]) -> str:
    head = f"{entry.op} #{entry.seq}{_group_text(entry)} ({place(entry.file, entry.line)})"
    issued = "; ".join(f"rank {rank} issued it and waits{', ' + where(rank) if where(rank) else ''}" for rank in ahead)
    absent = "; ".join(_missing_text(rank, entry.key, journals, where) for rank in behind)
    return f"{head} is waiting for {ranks_text(behind)}: {issued}; {absent}"


def _inside(journals: dict, states: tuple) -> dict:
    return {rank: entry for rank, snap in sorted(journals.items()) if (entry := current(snap, states))}


def _collectives(journals: dict, inside: dict, everyone: list) -> list:
    """(group key, number, ranks in it, ranks missing, [(rank, entry) of ranks past it])
    for each collective some rank is in, oldest number first."""
    grouped: dict = {}
    for rank, entry in inside.items():
        if not entry.point_to_point:
            grouped.setdefault((entry.key, entry.seq), []).append(rank)
    out = []
    for (key, seq), ranks in sorted(grouped.items(), key=lambda item: (item[0][1], item[0][0])):
        absent, past = [], []
        for rank in inside[ranks[0]].members(everyone):
            if rank in ranks:
                continue
            snap = journals.get(rank)
            theirs = snap.numbered(key, seq) if snap is not None else None
            if theirs is not None and theirs.state != "waiting":
                past.append((rank, theirs))
            else:
                absent.append(rank)
        out.append((key, seq, ranks, absent, past))
    return out


def _collective_line(key: tuple, seq: int, ranks: list, missing: list, past: list, journals: dict, inside: dict,
                     where: Callable[[int], str]) -> str:
    first = inside[ranks[0]]
    head = f"{first.op} #{seq}{_group_text(first)} ({_places([inside[r] for r in ranks])})"
    waiting = f"{ranks_text(ranks)} waiting"
    if missing:
        absent = "; ".join(_missing_text(rank, key, journals, where) for rank in missing)
        return f"{head} is waiting for {ranks_text(missing)}: {waiting}; {absent}"
    gone_by = "; ".join(f"rank {rank} went past it ({entry.describe()} at {place(entry.file, entry.line)}, "
                        f"{entry.state})" for rank, entry in past)
    return f"{head}: {waiting}; {gone_by}" if gone_by else f"{head}: {waiting}"


def _missing_text(rank: int, key: tuple, journals: dict, where: Callable[[int], str]) -> str:
    words = where(rank)
    text = f"rank {rank} missing, {words}" if words else f"rank {rank} missing"
    snap = journals.get(rank)
    last = snap.last(key) if snap is not None else None
    if last is not None:
        text += f" (its last: {last.op} #{last.seq}, {place(last.file, last.line)})"
    elif snap is None:
        text += " (no journal)"
    return text


def _p2p_line(rank: int, entry: Entry, inside: dict, where: Callable[[int], str]) -> str:
    verb = "to" if entry.op.startswith("send") else "from"
    head = f"{entry.op} {verb} rank {entry.peer} ({place(entry.file, entry.line)})"
    theirs = inside.get(entry.peer)
    if theirs is not None and theirs.point_to_point and theirs.peer == rank:
        return f"{head}: rank {rank} waiting; rank {entry.peer} waiting in {theirs.op} ({place(theirs.file, theirs.line)})"
    words = where(entry.peer)
    return f"{head} is waiting for rank {entry.peer}: rank {rank} waiting; rank {entry.peer} missing" + \
        (f", {words}" if words else "")


def _places(entries: list) -> str:
    named = {place(e.file, e.line) for e in entries}
    return next(iter(named)) if len(named) == 1 else ", ".join(
        sorted(f"{place(e.file, e.line)}" for e in entries))


def _group_text(entry: Entry) -> str:
    if entry.group == "default":
        return ""
    return f" in group [{entry.group.rpartition(':')[2].replace(',', ', ')}]"


def mismatches(journals: dict) -> list:
    """One line per group: the first collective number in which ranks disagree on the op,
    dtype, shape or root, each rank's call and line."""
    seen: dict = {}
    for rank, snap in sorted(journals.items()):
        for entry in snap.entries if snap is not None else ():
            if not entry.point_to_point:
                seen.setdefault(entry.key, {}).setdefault(entry.seq, {})[rank] = entry
    lines = []
    for key, numbers in seen.items():
        for seq in sorted(numbers):
            calls = numbers[seq]
            if len(calls) > 1 and len({entry.signature() for entry in calls.values()}) > 1:
                first = next(iter(calls.values()))
                each = "; ".join(f"rank {rank} {entry.describe()}{_root_text(entry)} at {place(entry.file, entry.line)}"
                                 for rank, entry in sorted(calls.items()))
                lines.append(f"mismatch in collective #{seq}{_group_text(first)}: {each}")
                break
    return lines


def _root_text(entry: Entry) -> str:
    if entry.peer < 0 or entry.point_to_point:
        return ""
    return f" ({'src' if entry.op in ('broadcast', 'scatter', 'broadcast_object_list', 'scatter_object_list') else 'dst'} {entry.peer})"


def hopeless(journals: dict, left: set, everyone: list, left_at: Optional[dict] = None) -> list:
    """Ranks waiting in a collective that can never complete: a member of its group (the
    peer, for a send or recv) has left the task (``left``: failed, finished, gone, or not
    in this call), or will never reach a collective the rank has issued (NCCL's calls
    return once queued: the rank waits later). Only aborting the group releases them.

    Collectives torch issued from C++ (DDP's) count too, where ``left_at`` says when each
    rank left (on the ranks' own clock, comparable with their samples: one machine): a rank
    whose default group issued more collectives than a rank that has left will ever issue
    (its count sampled after it left) waits for one that cannot complete."""
    out = []
    for rank, snap in sorted(journals.items()):
        if rank in left or snap is None:
            continue
        entry = current(snap)
        if entry is not None:
            members = [entry.peer] if entry.point_to_point else entry.members(everyone)
            if any(member in left for member in members if member != rank):
                out.append(rank)
        elif _issued_past_the_left(snap, journals, left, everyone) or (
                left_at and _ahead_of_the_left(snap, journals, left_at)):
            out.append(rank)
    return out


def _issued_past_the_left(snap: Snapshot, journals: dict, left: set, everyone: list) -> bool:
    """The rank's latest collective of a group is one a member that left never reached
    (a member whose journal holds nothing of the group reached none only if it holds all
    it ever did: fewer than SLOTS)."""
    latest: dict = {}
    for entry in reversed(snap.entries):
        if not entry.point_to_point:
            latest.setdefault(entry.key, entry)
    for key, entry in latest.items():
        for member in entry.members(everyone):
            theirs = journals.get(member)
            if member in left and theirs is not None:
                last = theirs.last(key)
                reached = last.seq if last is not None else (0 if theirs.count < SLOTS else entry.seq)
                if reached < entry.seq:
                    return True
    return False


def _ahead_of_the_left(snap: Snapshot, journals: dict, left_at: dict) -> bool:
    for rank, at in left_at.items():
        theirs = journals.get(rank)
        if (theirs is not None and theirs.generation == snap.generation and theirs.cpp_at > at
                and snap.cpp_count > theirs.cpp_count):
            return True
    return False


def cpp_line(journals: dict, stuck: list, where: Callable[[int], str]) -> Optional[str]:
    """Ranks blocked in a collective torch issued from C++ (not journaled entry by entry):
    the default group's own counts (sampled by each rank) say which ranks are ahead, and
    wait, and which are behind. None when the counts say nothing."""
    counts = {rank: snap.cpp_count for rank, snap in journals.items()
              if snap is not None and snap.cpp_at > 0 and snap.generation == _generation(journals)}
    if len(counts) < 2 or len(set(counts.values())) < 2:
        return None
    top = max(counts.values())
    ahead = sorted(rank for rank, count in counts.items() if count == top and rank in stuck)
    behind = sorted(rank for rank, count in counts.items() if count < top)
    if not ahead or not behind:
        return None
    waiting = "; ".join(f"rank {rank} waiting{', ' + where(rank) if where(rank) else ''}" for rank in ahead)
    absent = "; ".join(f"rank {rank} missing{', ' + where(rank) if where(rank) else ''} "
                       f"(at #{counts[rank]})" for rank in behind)
    return f"{CPP}, #{top} of the default group, is waiting for {ranks_text(behind)}: {waiting}; {absent}"


def _generation(journals: dict) -> int:
    return max((snap.generation for snap in journals.values() if snap is not None), default=0)
