"""The collective journal: what each rank's Python-level collectives were, in shared memory.

Every ``torch.distributed`` collective a rank's code calls (``dist.all_reduce`` and the
others in `OPS`) is written, before it starts, into a small file of the rank's own that
the rank maps (``MAP_SHARED``): its number in its group, the op, the first tensor's shape
and dtype, the group and the caller's line (``sys._getframe``; our own frames and those of
installed libraries are skipped, so it is the person's line), then, when it returns, that
it did. The notebook (or the node agent) reads the file without the rank's help: a rank
blocked in C, or dead, cannot answer, and its journal still says where it is (`read`,
`decode`). Cost: about a microsecond per collective (`benchmarks/journal_cost.py`).

Invariants:
- only the rank's main thread writes, one ``pack_into`` per collective into the next of
  `SLOTS` slots (the entry's own index says which collective it is: no shared counter),
  then one byte when it returns; a reader may see a slot half written only while the
  rank runs, never while it is stuck;
- numbers count the Python-level collectives of one group (the default one, or a group
  the user made) since the group was formed: ranks that ran the same code have the same
  numbers, so a rank that skipped one is behind;
- what torch issues from C++ (DDP's gradient all_reduce and its start-up broadcasts) is
  not in the entries: a thread samples the default group's own count of collectives
  (``_get_sequence_number_for_group``, C++ ones included) into the header twice a
  second, so that a rank blocked in DDP's collective shows as ahead of the one it waits for;
- the launcher's own collectives (the final barrier) go around the journal (`original`).

Example::

    journal = install("/tmp/notebook_launcher-stacks-x/rank0.journal")   # in the rank
    snapshot = decode(read("/tmp/notebook_launcher-stacks-x/rank0.journal"))   # anywhere on the machine
    snapshot.entries[-1]      # Entry(op='all_reduce', seq=7, state='waiting', shape=(4,), ...)
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

from .frames import LIBRARIES

SUFFIX = ".journal"
SLOTS = 64                      # the last collectives kept per rank
SLOT = 96                       # bytes per entry
STRINGS = 8192                  # bytes for names (files, groups), each written once
SAMPLE_EVERY = 0.5              # seconds between samples of the default group's C++ count
MAX_DIMS = 6                    # a tensor with more dims records its numel as one

_HEADER = struct.Struct("<4sIIIQQQd")   # magic, version, pid, generation, (unused), strings used, C++ count, its time
# Each writer writes only its own fields: the main thread the first six, the sampler thread the C++ sample.
_OWN_HEADER = struct.Struct("<4sIIIQQ")
_CPP_SAMPLE = struct.Struct("<Qd")
_MOVING = struct.Struct("<QI")         # an entry's index and its number in its group: written at each call
_STATIC = struct.Struct("<BBBBHHHIi")   # state, op, dtype, ndim, group, count, file, line, peer; dims follow:
#                                         the same for every call of one line with one shape (kept, `Journal.static`)
STATICS_KEPT = 4096                     # call sites x shapes remembered before starting over
_STRING = struct.Struct("<HH")
MAGIC = b"NLJ1"
STRINGS_AT = 64
ENTRIES_AT = STRINGS_AT + STRINGS
SIZE = ENTRIES_AT + SLOTS * SLOT
_STATE_AT = _MOVING.size        # offset of the state byte in an entry

# States of an entry.
WAITING, RETURNED, FAILED, ISSUED = 1, 2, 3, 4     # ISSUED: async_op=True (it runs on; its wait is the user's)
STATES = {WAITING: "waiting", RETURNED: "returned", FAILED: "failed", ISSUED: "issued"}

# name -> (where the tensor, list or object is: position, keyword, kind), (peer: position, keyword), group position,
# async_op position; kind: "t" a tensor, "l" a list of tensors, "o" an object or a list of objects, "" nothing.
OPS = {
    "all_reduce": ((0, "tensor", "t"), None, 2, 3),
    "broadcast": ((0, "tensor", "t"), (1, "src"), 2, 3),
    "all_gather": ((1, "tensor", "t"), None, 2, 3),
    "all_gather_into_tensor": ((1, "input_tensor", "t"), None, 2, 3),
    "reduce_scatter": ((0, "output", "t"), None, 3, 4),
    "reduce_scatter_tensor": ((1, "input", "t"), None, 3, 4),
    "barrier": ((None, None, ""), None, 0, 1),
    "monitored_barrier": ((None, None, ""), None, 0, None),
    "gather": ((0, "tensor", "t"), (2, "dst"), 3, 4),
    "scatter": ((0, "tensor", "t"), (2, "src"), 3, 4),
    "reduce": ((0, "tensor", "t"), (1, "dst"), 3, 4),
    "all_to_all": ((1, "input_tensor_list", "l"), None, 2, 3),
    "all_to_all_single": ((1, "input", "t"), None, 4, 5),
    "send": ((0, "tensor", "t"), (1, "dst"), 2, None),
    "recv": ((0, "tensor", "t"), (1, "src"), 2, None),
    "all_gather_object": ((1, "obj", "o"), None, 2, None),
    "broadcast_object_list": ((0, "object_list", "o"), (1, "src"), 2, None),
    "gather_object": ((0, "obj", "o"), (2, "dst"), 3, None),
    "scatter_object_list": ((0, "scatter_object_output_list", "o"), (2, "src"), 3, None),
    "send_object_list": ((0, "object_list", "o"), (1, "dst"), 2, None),
    "recv_object_list": ((0, "object_list", "o"), (1, "src"), 2, None),
}
OP_NAMES = list(OPS)
POINT_TO_POINT = {"send", "recv", "send_object_list", "recv_object_list"}
DTYPES = ["float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool",
          "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"]
OBJECT = len(DTYPES) + 1        # the dtype code of a pickled object

_LIBRARIES = LIBRARIES          # a caller in these is not the person's line: look further out

_journal: Optional["Journal"] = None


def path_for(stack_file: str) -> str:
    """A rank's journal lies beside its stack-dump file, in the group's private folder."""
    return os.path.splitext(stack_file)[0] + SUFFIX


def enabled() -> bool:
    """Off with NOTEBOOK_LAUNCHER_JOURNAL=0 (for measuring what it costs)."""
    return os.environ.get("NOTEBOOK_LAUNCHER_JOURNAL", "1") != "0"


# ----------------------------------------------------------------- the rank's side
class Journal:
    """The rank's writer: see the module docstring."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, SIZE)
            self.map = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.numbers = itertools.count(1)   # each collective's index in this journal
        self.generation = 0
        self._strings: dict = {}         # text -> id, of the strings in the table now
        self._strings_used = 0
        self._next_id = 1                # ids are never reused: an old entry's file reads "?", never another's
        # subgroup -> string id; weak: a group the person destroys is not kept alive (its sockets, threads)
        self._groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.defaults = [0]              # the default group's string id (0 until its first collective)
        self._seqs: dict = {}            # string id of a group -> collectives so far
        self._dtypes: dict = {}
        self._statics: dict = {}         # (file, line, group, shape, dtype, ...) -> an entry's static bytes
        self._header()

    def _header(self) -> None:
        _OWN_HEADER.pack_into(self.map, 0, MAGIC, 1, os.getpid(), self.generation, 0, self._strings_used)

    def string(self, text: str) -> int:
        """The id of ``text`` in the file (written once). A full table starts over (every
        session cell is a file name of its own), keeping the groups' names and ids."""
        known = self._strings.get(text)
        if known is not None:
            return known
        if self._strings_used + _STRING.size + min(len(text.encode("utf-8", "replace")), 512) > STRINGS:
            self._start_strings_over()
        ident, self._next_id = self._next_id, self._next_id % 65535 + 1
        self._write_string(text, ident)
        return ident

    def _write_string(self, text: str, ident: int) -> None:
        data = text.encode("utf-8", "replace")[:512]
        at = STRINGS_AT + self._strings_used
        _STRING.pack_into(self.map, at, ident, len(data))
        self.map[at + _STRING.size:at + _STRING.size + len(data)] = data
        self._strings_used += _STRING.size + len(data)
        self._header()
        self._strings[text] = ident

    def _start_strings_over(self) -> None:
        groups = set(self._groups.values()) | {self.defaults[0]}
        kept = [(text, ident) for text, ident in self._strings.items() if ident in groups]
        self._strings, self._strings_used = {}, 0
        self._statics.clear()   # their bytes hold file ids no longer in the table
        for text, ident in kept:
            self._write_string(text, ident)

    def group_id(self, group) -> int:
        """A group's string id: "<generation>|default", or "<generation>|<torch's name>:<global
        ranks>" (the same on every rank that made the same groups since the same regroup)."""
        import torch.distributed as dist

        world = dist.distributed_c10d.GroupMember.WORLD
        if group is None or group is world:
            ident = self.defaults[0] = self.string(f"{self.generation}|default")
        else:
            try:
                ranks = ",".join(str(r) for r in dist.get_process_group_ranks(group))
                ident = self.string(f"{self.generation}|{group.group_name}:{ranks}")
            except Exception:
                ident = self.string(f"{self.generation}|?")
        if group is not None:
            try:
                self._groups[group] = ident
            except TypeError:   # not weakly referable: looked up again at each call
                pass
        return ident

    def static(self, key: tuple, op: int) -> bytes:
        """The part of an entry that one line with one shape always writes the same."""
        if len(key) == 6:   # a tensor: (file, line, group, shape, dtype, peer)
            filename, line, gid, shape, dtype, peer = key
            count = 1
        else:               # (file, line, group, peer, shape, dtype, count)
            filename, line, gid, peer, shape, dtype, count = key
        dims = () if shape == "object" else tuple(shape)
        dtype = OBJECT if shape == "object" else self._dtypes.get(dtype, 0)
        ndim = len(dims)
        if ndim > MAX_DIMS:
            dims = (_numel(dims),)
        static = _STATIC.pack(WAITING, op, dtype, min(ndim, 255), gid, min(count, 65535),
                              self.string(filename), line, -1 if peer is None else int(peer))
        static += struct.pack(f"<{len(dims)}q", *dims)
        if len(self._statics) >= STATICS_KEPT:
            self._statics.clear()
        self._statics[key] = static
        return static

    def regrouped(self) -> None:
        """A fresh default group: numbers start again (the old group's are void)."""
        self.generation += 1
        self._groups.clear()
        self.defaults[0] = 0
        self._seqs.clear()
        self._header()

    def sample(self) -> None:
        """The default group's own count of collectives (C++ ones included), into the header
        (a thread of the journal's calls it every `SAMPLE_EVERY` seconds)."""
        import torch.distributed as dist

        world = dist.distributed_c10d.GroupMember.WORLD
        try:
            if world is not None:
                _CPP_SAMPLE.pack_into(self.map, _OWN_HEADER.size, world._get_sequence_number_for_group(),
                                      time.monotonic())
        except Exception:   # no group now (aborted, being rebuilt), or a backend without the count
            pass

    def close(self) -> None:
        try:
            self.map.close()
        except (BufferError, ValueError):
            pass


def install(path: str) -> Optional[Journal]:
    """Wrap ``torch.distributed``'s collectives to write into ``path``; start the sampler.
    Idempotent; None when switched off."""
    global _journal
    if _journal is not None or not enabled():
        return _journal
    import torch
    import torch.distributed as dist

    journal = Journal(path)
    for code, name in enumerate(DTYPES, start=1):
        dtype = getattr(torch, name, None)
        if dtype is not None:
            journal._dtypes[dtype] = code
    for name, spec in OPS.items():
        original = getattr(dist, name, None)
        if original is not None and not hasattr(original, "_notebook_launcher_journal"):
            setattr(dist, name, _wrap(journal, name, original, spec))
    _journal = journal
    threading.Thread(target=_sampler, args=(journal,), name="notebook_launcher-journal", daemon=True).start()
    return journal


def current() -> Optional[Journal]:
    return _journal


def original(function):
    """The unjournaled collective behind a wrapped one (the launcher's own barrier)."""
    return getattr(function, "__wrapped__", function)


def _sampler(journal: Journal) -> None:
    while True:
        time.sleep(SAMPLE_EVERY)
        journal.sample()


def _wrap(journal: Journal, name: str, function, spec):
    """``function`` with its calls written to ``journal`` (the hot path: keep it lean)."""
    (t_pos, t_key, kind), peer, g_pos, a_pos = spec
    op = OP_NAMES.index(name) + 1
    moving, groups, seqs, statics = _MOVING.pack, journal._groups, journal._seqs, journal._statics
    first, slots, slot = ENTRIES_AT, SLOTS, SLOT
    state_at, failed, returned = _STATE_AT, FAILED, RETURNED
    numbers, defaults = journal.numbers, journal.defaults
    frame_of, libraries = sys._getframe, _LIBRARIES
    the_map = journal.map
    p_pos, p_key = peer if peer else (None, None)
    p2p = name in POINT_TO_POINT

    def journaled(*args, **kwargs):
        n = len(args)
        try:   # the hot path: about a microsecond and a half (benchmarks/journal_cost.py)
            if n > g_pos or kwargs:
                group = args[g_pos] if n > g_pos else kwargs.get("group")
                gid = (groups.get(group) if group is not None else defaults[0]) or journal.group_id(group)
            else:   # the default group, as most calls use it
                gid = defaults[0] or journal.group_id(None)
            counter = -gid if p2p else gid     # point-to-point calls are numbered apart: ranks differ in them
            seq = seqs[counter] = seqs.get(counter, 0) + 1
            caller = frame_of(1)
            code = caller.f_code
            if code.co_filename.startswith(libraries):
                caller = _outside_libraries(caller)
                code = caller.f_code
            target = (args[p_pos] if n > p_pos else kwargs.get(p_key)) if p_pos is not None else None
            if kind == "t":
                tensor = args[t_pos] if n > t_pos else kwargs.get(t_key)
                key = (code.co_filename, caller.f_lineno, gid, tensor.shape, tensor.dtype, target)
            elif kind:   # (shape, dtype, count) of a list of tensors, or ("object", None, count)
                key = (code.co_filename, caller.f_lineno, gid, target,
                       *_described(args[t_pos] if n > t_pos else kwargs.get(t_key), kind))
            else:
                key = (code.co_filename, caller.f_lineno, gid, target, (), None, 1)
            static = statics.get(key) or journal.static(key, op)
            index = next(numbers)
            at = first + (index % slots) * slot
            entry = moving(index, seq) + static
            the_map[at:at + len(entry)] = entry
        except Exception:   # a call torch itself will refuse (no tensor, say): journal nothing
            at = None
        try:
            result = function(*args, **kwargs)
        except BaseException:
            if at is not None:
                the_map[at + state_at] = failed
            raise
        if at is not None:
            the_map[at + state_at] = returned if a_pos is None or not (
                args[a_pos] if n > a_pos else kwargs.get("async_op")) else ISSUED
        return result

    journaled.__wrapped__ = function
    journaled.__name__ = function.__name__
    journaled.__qualname__ = getattr(function, "__qualname__", function.__name__)
    journaled.__doc__ = function.__doc__
    journaled._notebook_launcher_journal = True
    return journaled


def _described(value, kind: str) -> tuple:
    """(shape, dtype, count) of a list of tensors ("l": the first's) or of objects ("o"),
    as `Journal.static` reads it."""
    if kind == "l":
        return (value[0].shape, value[0].dtype, len(value)) if value else ((), None, 0)
    return ("object", None, len(value) if isinstance(value, list) else 1)


def _outside_libraries(frame):
    """The innermost frame that is the person's own (not ours, torch's or an installed
    library's); the immediate caller when every frame is a library's."""
    first = frame
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame = frame.f_back
    return frame if frame is not None else first


def _numel(dims) -> int:
    total = 1
    for d in dims:
        total *= d
    return total


# ----------------------------------------------------------------- the reader's side
@dataclass(frozen=True)
class Entry:
    """One collective of one rank, decoded."""

    index: int          # its place in the rank's journal (1, 2, ...)
    seq: int            # its number in its group
    group: str          # "default", or "<torch's group name>:<global ranks>"
    generation: int     # which default group it ran under (0, then one more at each regroup)
    op: str
    state: str          # "waiting" | "returned" | "failed" | "issued"
    dtype: str          # "" when it has no tensor; "object" for the *_object collectives
    shape: tuple        # the first tensor's (numel as one dim when it has more than MAX_DIMS)
    count: int          # tensors in a list, or objects
    file: str
    line: int
    peer: int           # src or dst, -1 when none

    @property
    def point_to_point(self) -> bool:
        return self.op in POINT_TO_POINT

    @property
    def key(self) -> tuple:
        """Its group, as every rank names it: (generation, group)."""
        return (self.generation, self.group)

    def members(self, everyone: list) -> list:
        """The global ranks of its group (``everyone`` for the default group)."""
        if self.group == "default":
            return list(everyone)
        ranks = self.group.rpartition(":")[2]
        return [int(r) for r in ranks.split(",") if r.strip().isdigit()]

    def describe(self) -> str:
        """e.g. ``all_reduce float32 [4, 8]``, ``all_gather_object``, ``barrier``."""
        if self.dtype == "object":
            return self.op
        if not self.dtype:
            return self.op
        shape = f"[{', '.join(str(d) for d in self.shape)}]"
        return f"{self.op} {self.dtype} {f'{self.count} x ' if self.count > 1 else ''}{shape}"

    def signature(self) -> tuple:
        """What ranks in the same collective must agree on."""
        return (self.op, self.dtype, self.shape if self.op not in _SHAPES_MAY_DIFFER else (), self.peer)


_SHAPES_MAY_DIFFER = {"all_gather_object", "gather_object", "scatter_object_list", "broadcast_object_list",
                      "all_to_all", "all_to_all_single"}


@dataclass(frozen=True)
class Snapshot:
    """A rank's journal as read at one moment."""

    pid: int = 0
    generation: int = 0
    count: int = 0                   # collectives journaled since the rank started
    entries: list = field(default_factory=list)   # the last ones, oldest first
    cpp_count: int = 0               # the default group's own count (C++ collectives included), when sampled
    cpp_at: float = 0.0

    def last(self, key: tuple) -> Optional[Entry]:
        """The latest collective of a group, ``key`` = (generation, group); point-to-point ones aside."""
        for entry in reversed(self.entries):
            if entry.key == key and not entry.point_to_point:
                return entry
        return None

    def numbered(self, key: tuple, seq: int) -> Optional[Entry]:
        for entry in reversed(self.entries):
            if entry.key == key and entry.seq == seq and not entry.point_to_point:
                return entry
        return None


def read(path: str) -> bytes:
    """The raw journal of a rank (b"" when it has none), read without the rank's help."""
    try:
        with open(path, "rb") as f:
            return f.read(SIZE)
    except OSError:
        return b""


def decode(raw: bytes) -> Optional[Snapshot]:
    """A `Snapshot` of raw journal bytes; None when they are not a journal."""
    if len(raw) < SIZE:
        return None
    magic, _, pid, generation, _, used, cpp_count, cpp_at = _HEADER.unpack_from(raw, 0)
    if magic != MAGIC:
        return None
    strings = _strings(raw, used)
    entries = []
    for slot in range(SLOTS):
        at = ENTRIES_AT + slot * SLOT
        index, seq = _MOVING.unpack_from(raw, at)
        state, op, dtype, ndim, gid, n, fid, line, peer = _STATIC.unpack_from(raw, at + _MOVING.size)
        if index == 0 or index % SLOTS != slot or not 0 < op <= len(OP_NAMES):
            continue   # never written, or half written
        dims = struct.unpack_from(f"<{min(ndim, MAX_DIMS) if ndim <= MAX_DIMS else 1}q", raw,
                                  at + _MOVING.size + _STATIC.size)
        generation_text, _, group = strings.get(gid, "0|?").partition("|")
        entries.append(Entry(index, seq, group, int(generation_text or 0), OP_NAMES[op - 1], STATES.get(state, "?"),
                             _dtype_name(dtype), tuple(dims), n, strings.get(fid, "?"), line, peer))
    entries.sort(key=lambda entry: entry.index)
    return Snapshot(pid, generation, entries[-1].index if entries else 0, entries, cpp_count, cpp_at)


def _strings(raw: bytes, used: int) -> dict:
    out, at, end = {}, STRINGS_AT, STRINGS_AT + min(used, STRINGS)
    while at + _STRING.size <= end:
        ident, length = _STRING.unpack_from(raw, at)
        at += _STRING.size
        out[ident] = raw[at:at + length].decode("utf-8", "replace")
        at += length
    return out


def _dtype_name(code: int) -> str:
    if code == OBJECT:
        return "object"
    return DTYPES[code - 1] if 0 < code <= len(DTYPES) else ""
