"""Big values between the notebook and ranks of this machine, through memory files.

A big value (a state_dict, a dataset pushed to the ranks) is pickled as a small header
whose tensor and array data are out-of-band buffers (pickle protocol 5, see
`serialization`). Here is how those buffers cross the process boundary with one copy:
the sender writes them once into a memfd (an anonymous memory file: no name anywhere, not
in /dev/shm), the receiver maps it and rebuilds the tensors over the mapping. The memory
lives exactly as long as someone holds the file or a mapping of it: the kernel frees it
when the last tensor over it is freed, or when its last holder dies (a killed rank, a
killed kernel). No name to unlink means nothing to leak.

How the receiver gets the file, one way per direction, each chosen for its lifetimes:

- rank -> notebook (results, ``pull``): the rank sends the file descriptor itself over a
  unix socket (SCM_RIGHTS) to the notebook's `Inbox`, then closes its own. A descriptor
  in flight is held by the socket, not by the sender: the rank may exit at once (a
  one-shot rank does) and the notebook still receives the file whenever it reads the
  socket. This is the trap Lightning's ``ddp_notebook`` falls into with names in
  /dev/shm (the rank exits before the parent maps: FileNotFoundError). Each call's
  arrivals are settled when the call ends (`settle`): claimed by the call's results, or
  closed.
- notebook -> ranks (``push``, task arguments): the notebook writes the file once
  (`Outgoing`) and keeps it open until the call ends; each rank opens it through
  ``/proc/<notebook pid>/fd/<n>`` (the notebook is alive while its call runs) and maps it.
  N ranks share the same pages: the data is written once whatever the number of ranks.

Mappings are private (copy-on-write): a rank or the notebook may write to its tensors
without touching anyone else's, and a process forked later (a one-shot launch forking
the notebook) gets its own copy-on-write view, as with any other memory.

Only ranks on this machine can do this; ranks on other nodes get their buffers inline in
the message (`RankGroup.single_host` decides, in `session`). Set
``NOTEBOOK_LAUNCHER_SHARED_MEMORY=0`` to send every value inline.

Example (rank side, then notebook side)::

    parcel_ref = send_to_inbox(inbox_address, write_memfd(buffers), nonce)   # rank
    views = map_buffers(claim(nonce), layout)                                # notebook
"""

from __future__ import annotations

import mmap
import os
import secrets
import select
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Iterable, Optional

MIN_SHARED_BYTES = 1 << 20   # values whose buffers total less than this travel inline, in the message
ALIGN = 64                   # each buffer starts on a cache line of the file
CONNECT_TIMEOUT = 10.0       # seconds for a rank to hand its file to the notebook's inbox
_NONCE = 16                  # bytes of the random name of one value in flight
_CREDS = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


def enabled() -> bool:
    """Whether values may go through memory files here (Linux, memfd, not switched off)."""
    return (sys.platform.startswith("linux") and hasattr(os, "memfd_create")
            and os.environ.get("NOTEBOOK_LAUNCHER_SHARED_MEMORY", "1") != "0")


# ----------------------------------------------------------------- the file
@dataclass(frozen=True)
class Layout:
    """Where each buffer lies in the file: ``(offset, length)`` pairs, and the file's size."""

    spans: tuple
    size: int

    @classmethod
    def of(cls, lengths: Iterable[int]) -> "Layout":
        spans, offset = [], 0
        for length in lengths:
            spans.append((offset, length))
            offset = -(-(offset + length) // ALIGN) * ALIGN
        return cls(tuple(spans), max(offset, 1))


def write_memfd(buffers: list) -> tuple:
    """One anonymous memory file holding ``buffers`` (objects with the buffer protocol),
    each copied once; returns ``(fd, layout)``. The caller owns the fd."""
    views = [memoryview(b).cast("B") for b in buffers]
    layout = Layout.of(v.nbytes for v in views)
    fd = os.memfd_create("notebook_launcher", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, layout.size)
        for view, (offset, _) in zip(views, layout.spans):
            while view.nbytes:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
    except BaseException:
        os.close(fd)
        raise
    return fd, layout


def map_buffers(fd: int, layout: Layout) -> list:
    """Writable views of each buffer over a private (copy-on-write) mapping of the file.
    The mapping lives as long as any view (or a tensor built over one); ``fd`` may be
    closed right after."""
    whole = memoryview(mmap.mmap(fd, layout.size, access=mmap.ACCESS_COPY))
    return [whole[offset:offset + length] for offset, length in layout.spans]


# ----------------------------------------------------------------- notebook -> ranks
@dataclass(frozen=True)
class SharedRef:
    """Where a rank finds the buffers the notebook wrote: its file, open in the notebook."""

    pid: int
    fd: int
    layout: Layout

    def map(self) -> list:
        """The buffers, mapped in this rank (the notebook keeps the file open until the call ends)."""
        try:
            fd = os.open(f"/proc/{self.pid}/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise RuntimeError(f"could not open the notebook's shared memory (/proc/{self.pid}/fd/{self.fd}: "
                               f"{exc.strerror}); set NOTEBOOK_LAUNCHER_SHARED_MEMORY=0 to send values inline") from None
        try:
            return map_buffers(fd, self.layout)
        finally:
            os.close(fd)


class Outgoing:
    """Buffers written once by the notebook for every rank of one call; `close` at the
    call's end (the ranks' mappings keep what they use).

    Example::

        with Outgoing(buffers) as out:
            request = TaskRequest(blob, ..., shared=out.ref)
    """

    def __init__(self, buffers: list) -> None:
        self.fd, layout = write_memfd(buffers)
        try:
            _children_close(self.fd)
            self.ref = SharedRef(os.getpid(), self.fd, layout)
        except BaseException:   # an Interrupt here: nobody else holds the file, which may be the whole value
            self.close()
            raise

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            _children_keep.discard(fd)
            os.close(fd)

    def __enter__(self) -> "Outgoing":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------- ranks -> notebook
def send_to_inbox(address: bytes, fd: int, nonce: bytes) -> None:
    """Hand the file ``fd`` to the notebook's inbox at ``address``, named ``nonce``. Once
    this returns the file is in the notebook's hands: the caller closes its ``fd``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(CONNECT_TIMEOUT)
        conn.connect(address)
        socket.send_fds(conn, [nonce], [fd])


class Inbox:
    """The notebook's end: a listening unix socket in the abstract namespace (no file
    anywhere), which ranks of this machine connect to, each handing over one file.

    Arrivals are read when someone needs them (`claim`, `settle`): until then a file
    waits in the socket's backlog, held by the kernel. Only connections from our own
    user are read; any other is closed. Thread-safe (a ``block=False`` run collects in
    another thread)."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.address = b"\0notebook_launcher-%d-%s" % (self.owner, secrets.token_hex(8).encode())
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address)
        self._listener.listen(socket.SOMAXCONN)
        self._listener.setblocking(False)
        self._ready = select.poll()    # whether a connection waits: no accept (and no exception) per call
        self._ready.register(self._listener, select.POLLIN)
        self._arrived: dict = {}       # nonce -> (fd, sender pid)
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._listener.fileno()

    def claim(self, nonce: bytes, timeout: float = CONNECT_TIMEOUT) -> int:
        """The file named ``nonce`` (the caller owns it), waiting up to ``timeout`` for it."""
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            deadline = _now() + timeout
            while True:
                with self._lock:
                    self._accept_all()
                    found = self._arrived.pop(nonce, None)
                if found is not None:
                    return found[0]
                left = deadline - _now()
                if left <= 0:
                    raise TimeoutError("a rank's value did not reach the notebook's shared-memory inbox "
                                       f"within {timeout:g} s")
                selector.select(min(left, 0.1))

    def settle(self, keep: set, senders: set) -> dict:
        """Read what arrived; return {nonce: fd} for the nonces in ``keep`` (the caller owns
        those fds); close every other file sent by a process in ``senders``. (Files of
        other senders may belong to a call running beside this one, in another thread: a
        one-shot rank exits right after sending, so "its sender is gone" proves nothing.)"""
        with self._lock:
            self._accept_all()
            kept = {n: self._arrived.pop(n)[0] for n in list(self._arrived) if n in keep}
            for nonce, (fd, pid) in list(self._arrived.items()):
                if pid in senders:
                    del self._arrived[nonce]
                    os.close(fd)
        return kept

    def held(self) -> int:
        """Files read and not yet claimed or closed (for tests and leak checks)."""
        with self._lock:
            self._accept_all()
            return len(self._arrived)

    def _accept_all(self) -> None:
        if not self._ready.poll(0):
            return
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            with conn:
                self._receive(conn)

    def _receive(self, conn: socket.socket) -> None:
        pid, uid, _ = _CREDS.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
        conn.settimeout(1.0)
        try:
            nonce, fds, _, _ = socket.recv_fds(conn, _NONCE, 1)
        except OSError:
            return
        if uid != os.getuid() or len(nonce) != _NONCE or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return
        self._arrived[nonce] = (fds[0], pid)

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._arrived.values():
                os.close(fd)
            self._arrived.clear()
            self._listener.close()


def new_nonce() -> bytes:
    return secrets.token_bytes(_NONCE)


# ----------------------------------------------------------------- this process's inbox
_inbox: Optional[Inbox] = None
_inbox_lock = threading.Lock()
_children_keep: set = set()    # fds a forked child must not keep (the inbox, outgoing files)


def inbox() -> Optional[Inbox]:
    """This process's inbox, created on first use; None where shared memory is off."""
    global _inbox
    if _inbox is not None and _inbox.owner == os.getpid():
        return _inbox
    if not enabled():
        return None
    with _inbox_lock:
        if _inbox is None or _inbox.owner != os.getpid():
            try:
                _inbox = Inbox()
            except OSError:
                return None
            _children_close(_inbox.fileno())
    return _inbox


def inbox_address() -> Optional[bytes]:
    box = inbox()
    return None if box is None else box.address


def inherited_inbox() -> Optional[bytes]:
    """In a rank forked from the notebook (a one-shot launch's rank, which gets its task
    by inheritance, not in a message): the notebook's inbox, when it had one."""
    box = _inbox
    if box is None or box.owner != os.getppid() or not enabled():
        return None
    return box.address


def settle(results: dict, senders: set) -> None:
    """A call on ranks of this machine ended: hand each of its results' files to its
    parcel (``results``: {rank: (parcel or bytes, pickler) or None}), and close whatever
    else its ranks (``senders``: their pids) sent. Nothing a call's ranks sent outlives
    the call's results."""
    box = _inbox
    if box is None or box.owner != os.getpid():
        return
    parcels = {entry[0].nonce: entry[0] for entry in results.values()
               if entry is not None and getattr(entry[0], "nonce", None) is not None}
    for nonce, fd in box.settle(set(parcels), senders).items():
        parcels[nonce].hold(fd)


def _children_close(fd: int) -> None:
    _children_keep.add(fd)


def _before_fork() -> None:
    # A forked one-shot rank sends its value here, knowing the address by inheritance:
    # the inbox must exist before the child does. A rank that forks (DataLoader workers)
    # receives no values: it needs none.
    context = sys.modules.get("notebook_launcher.workers.context")
    if context is None or context.current() is None:
        inbox()


def _in_child() -> None:
    """A forked child holds none of the notebook's files or its listening socket: the
    listener would outlive the notebook in it, a file would keep its memory alive."""
    global _inbox_lock
    _inbox_lock = threading.Lock()   # another thread may have held it at the fork
    if _inbox is not None and _inbox._listener.fileno() >= 0:
        _children_keep.discard(_inbox._listener.fileno())
        os.close(_inbox._listener.detach())   # the object stays (its address), without the parent's socket
    for fd in list(_children_keep):
        try:
            os.close(fd)
        except OSError:
            pass
    _children_keep.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_in_child)


def _now() -> float:
    import time

    return time.monotonic()
