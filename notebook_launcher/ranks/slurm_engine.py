"""Ranks on a Slurm cluster: Slurm allocates, we run.

- **The allocation.** Inside one (``SLURM_JOB_ID`` set: ``salloc``, a Jupyter job) it is
  used as it is and never cancelled. Otherwise a holding job is submitted with ``sbatch``
  (`SlurmCluster`'s options); while it waits in the queue the notebook says so, with the
  job id and the reason Slurm gives. The job's script (`HOLDER`) dials back and stays
  connected, so the job ends by itself when the notebook is gone; the call or the
  session that took it also cancels it (``scancel``) on every path.
- **The agents.** ``srun --overlap --ntasks-per-node=1`` starts one `agent.NodeAgent` per
  node inside the allocation; each dials a TCP listener in the notebook (bound to an
  address the nodes can reach), proves itself with a random token passed through the
  environment, and is then driven over that connection (`dial`): the same agent and the
  same worker code as on Ray. Agent 0's first rank serves the rendezvous store.
- **Only** ``sbatch``, ``srun``, ``squeue``, ``scontrol`` and ``scancel`` are used (never
  ``sacct``: many clusters run no slurmdbd), and ``squeue`` at most once a second.
- **The end of a job** (``scancel``, its time limit, preemption, a node failure) closes the
  agents' connections: the call ends at once, saying what Slurm says happened.

Example::

    group = SlurmRanks.start(config, attempt=0, persistent=True)
    group.close(graceful=False, term_grace=1.0)   # srun ended, the holding job cancelled
"""

from __future__ import annotations

import hmac
import os
import queue
import secrets
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

from .. import channel as ch
from ..errors import LaunchConfigError
from .agent import PULL_WAIT, AgentBatch, _node_address
from .dial import ROLE_AGENT, ROLE_HOLDER, TOKEN_BYTES, TOKEN_ENV, send
from .plan import plan_for
from .remote import CALL_TIMEOUT, Node, NodeGone, RemoteRanks

# The holding job's script, standalone (importing our package would import torch): dial the
# notebook with the token from the environment, then wait for the connection to end.
HOLDER = ("import os, socket, sys\n"
          "host, _, port = sys.argv[1].rpartition(':')\n"
          "s = socket.create_connection((host, int(port)), timeout=60)\n"
          f"s.sendall(os.environ.pop({TOKEN_ENV!r}, '').encode().ljust({TOKEN_BYTES})[:{TOKEN_BYTES}] + {ROLE_HOLDER!r})\n"
          "s.settimeout(None)\n"
          "while s.recv(4096): pass\n")
QUEUE_POLL = 1.0          # seconds between squeue looks while the job waits
CONNECT_TIMEOUT = 120.0   # seconds for every agent to dial back once srun started
JOB_NAME = "notebook-launcher"


@dataclass
class Allocation:
    job_id: str
    nodes: list               # host names, in Slurm's node order
    owned: bool               # we submitted it (and cancel it), or we attached to the person's


# ----------------------------------------------------------------- before anything starts
@dataclass(frozen=True)
class SlurmFacts:
    device_type: str
    nproc: int
    cpus_per_node: int
    attach: bool


def inspect(cluster, num_nodes: int, nproc: Optional[int], device: str) -> SlurmFacts:
    """Decide the device and ranks per node, and check what can be checked before anything
    starts: Slurm's commands are here, an allocation we attach to is big enough."""
    missing = [tool for tool in ("sbatch", "srun", "squeue", "scontrol", "scancel") if not _which(tool)]
    if missing:
        raise LaunchConfigError(f"cluster='slurm' needs Slurm's commands on this machine; {', '.join(missing)} "
                                "not found. Run the notebook on a login node or inside a Slurm job.")
    attach = bool(os.environ.get("SLURM_JOB_ID"))
    gpus = cluster.gpus_per_node or (int(os.environ.get("SLURM_GPUS_ON_NODE", "0") or 0) if attach else 0)
    device_type = ("cuda" if gpus else "cpu") if device == "auto" else device
    if device_type == "cuda" and not gpus:
        raise LaunchConfigError("device='cuda' on Slurm needs GPUs: pass cluster=SlurmCluster(gpus_per_node=N) "
                                "(or run inside an allocation that has GPUs).")
    nproc = nproc or (gpus if device_type == "cuda" else 2)
    if attach:
        have = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
        if num_nodes > have:
            raise LaunchConfigError(
                f"num_nodes={num_nodes}, but this notebook runs inside Slurm job {os.environ['SLURM_JOB_ID']}, "
                f"which has {have} node{'s' if have != 1 else ''}: ask salloc/sbatch for {num_nodes} nodes, or use "
                f"num_nodes<={have}.")
    cpus = cluster.cpus_per_task or int(os.environ.get("SLURM_CPUS_ON_NODE", "0") or 0) or nproc
    return SlurmFacts(device_type, nproc, max(1, cpus), attach)


def _which(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None


# ----------------------------------------------------------------- the group
class SlurmRanks(RemoteRanks):
    """Ranks under Slurm node agents; see the module docstring."""

    def __init__(self, nodes: list, links: dict, allocation: Allocation, srun: subprocess.Popen,
                 listener: "Listener", last_words) -> None:
        super().__init__(nodes, last_words)
        self.links = links                 # node index -> _Link
        self.allocation = allocation
        self.srun = srun
        self.listener = listener
        self._ended = ""                   # what Slurm says happened to the job, once asked

    @classmethod
    def start(cls, config, attempt: int, *, persistent: bool, first_request=None, last_words=None) -> "SlurmRanks":
        """Allocate (or attach), start one agent per node and every node's ranks; on any
        error everything taken is released (srun ended, the holding job cancelled)."""
        cluster, facts = config.cluster, config.cluster_facts
        token = secrets.token_hex(TOKEN_BYTES // 2)
        listener = Listener(token)
        allocation, srun, links = None, None, {}
        try:
            allocation = _attach(config.num_nodes) if facts.attach else _acquire(cluster, config, facts, listener)
            listener.check_reachable(allocation.nodes)
            srun = _srun(allocation, config.num_nodes, facts, listener, token)
            links = listener.agents(config.num_nodes, srun, CONNECT_TIMEOUT)
            nodes = [Node(i, links[i].info, list(range(i * config.nproc, (i + 1) * config.nproc)))
                     for i in range(config.num_nodes)]
            group = cls(nodes, links, allocation, srun, listener, last_words or (lambda lines: None))
            group._start_ranks(config, attempt, persistent, first_request)
        except BaseException:
            _release(links, srun, listener, allocation)
            raise
        return group

    def _start_ranks(self, config, attempt: int, persistent: bool, first_request) -> None:
        import dataclasses
        import uuid

        plan = plan_for(config, attempt, persistent, first_request,
                        rdzv_timeout=config.rdzv_timeout if config.num_nodes > 1 else None)
        plan = dataclasses.replace(plan, run_id=uuid.uuid4().hex[:12])
        address, port = self._call(self.nodes[0], "reserve_store", plan.for_node(0))
        calls = [(node, self.links[node.index].call_async(
            "start", (dataclasses.replace(plan.for_node(node.index), env={
                **plan.env, "NOTEBOOK_LAUNCHER_NODE_ADDRESS": node.info.address,
                "NOTEBOOK_LAUNCHER_SLURM_JOB_ID": self.allocation.job_id}), address, port)))
            for node in self.nodes]
        for node, pending in calls:
            self.pids.update(pending.result(CALL_TIMEOUT * 10))

    # ------------------------------------------------------------- transport
    def _call(self, node: Node, method: str, *args, timeout: float = CALL_TIMEOUT):
        return self.links[node.index].call_async(method, args).result(timeout)

    def _receive(self, timeout: float) -> list:
        out = self.listener.batches(timeout)
        now = time.monotonic()
        for node in self.nodes:
            link = self.links[node.index]
            silent = now - link.heard_at > 2 * PULL_WAIT
            node.silent_since = link.heard_at if silent else None
        return [(self.nodes[index], self._why(item) if isinstance(item, EOFError) else item) for index, item in out]

    def _why(self, eof: EOFError) -> Exception:
        """An agent's connection ended: ask Slurm what happened to the job (once)."""
        if not self._ended:
            self._ended = job_end_reason(self.allocation.job_id)
        return NodeGone(self._ended) if self._ended else ConnectionError(str(eof))

    def _release(self) -> None:
        _release(self.links, self.srun, self.listener, self.allocation)


# ----------------------------------------------------------------- the listener
class _Pending:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok, self.value = False, None

    def result(self, timeout: float):
        if not self.done.wait(timeout):
            raise TimeoutError(f"a node agent did not answer within {timeout:g}s")
        if not self.ok:
            raise self.value
        return self.value


class _Link:
    """The notebook's connection to one agent."""

    def __init__(self, sock: socket.socket, info, index: int) -> None:
        self.sock, self.info, self.index = sock, info, index
        self.lock = threading.Lock()
        self.pending: dict = {}
        self.next_id = 0
        self.heard_at = time.monotonic()
        self.closed = False

    def call_async(self, method: str, args: tuple) -> _Pending:
        if self.closed:
            raise ConnectionError(f"the agent on {self.info.hostname} is gone")
        with self.lock:
            self.next_id += 1
            call_id, pending = self.next_id, _Pending()
            self.pending[call_id] = pending
        send(self.sock, self.lock, ("call", call_id, method, args))
        return pending

    def fail_pending(self, error: BaseException) -> None:
        self.closed = True
        for pending in list(self.pending.values()):
            pending.ok, pending.value = False, error
            pending.done.set()
        self.pending.clear()


class Listener:
    """A TCP listener in the notebook that agents (and a holding job) dial, and the one
    thread that reads every connection: replies complete calls, batches are queued."""

    def __init__(self, token: str) -> None:
        self.token = token.encode()
        self.address = _node_address()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.holder: Optional[socket.socket] = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._selector = selectors.DefaultSelector()
        self._links: dict = {}
        self._decoders: dict = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def dial(self) -> str:
        return f"{self.address}:{self.port}"

    def check_reachable(self, nodes: list) -> None:
        """Agents on other hosts cannot dial a loopback address: say so before srun starts."""
        here = {socket.gethostname(), socket.getfqdn(), "localhost"}
        elsewhere = [node for node in nodes if node not in here]
        if self.address.startswith("127.") and elsewhere:
            raise LaunchConfigError(
                f"the compute nodes ({', '.join(elsewhere[:3])}) cannot reach this notebook: its only address is "
                f"{self.address}. Run the notebook on a login node or inside the job, on a network the nodes share.")

    def accept(self, timeout: float) -> tuple:
        """(role, socket) of the next caller with the right token; strangers are dropped unread."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                raise TimeoutError("no node agent dialed back") from None
            conn.settimeout(10)
            try:
                hello = _read_exactly(conn, TOKEN_BYTES + 1)
            except OSError:
                conn.close()
                continue
            if hmac.compare_digest(hello[:TOKEN_BYTES], self.token) and hello[TOKEN_BYTES:] in (ROLE_AGENT, ROLE_HOLDER):
                conn.settimeout(30 if hello[TOKEN_BYTES:] == ROLE_AGENT else None)  # an agent's hello follows at once
                return hello[TOKEN_BYTES:], conn
            conn.close()

    def wait_for_holder(self, job_id: str, timeout: Optional[float] = None) -> None:
        """Wait until the holding job runs (its script dials back), saying why it waits."""
        said, deadline = "", None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                role, conn = self.accept(QUEUE_POLL)
            except TimeoutError:
                state, reason = queue_state(job_id)
                if state in ("", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY"):
                    raise RuntimeError(f"the Slurm job {job_id} ended before it started ({state or 'gone'}"
                                       f"{': ' + reason if reason else ''}).") from None
                now = f"Slurm job {job_id} to start: it is {state.lower()}{f' ({reason})' if reason else ''}"
                if state == "PENDING" and now != said:   # running: starting up, a matter of seconds
                    print(f"notebook_launcher: waiting for {now}", file=sys.stderr, flush=True)
                    said = now
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the Slurm job {job_id} did not start in time") from None
                continue
            if role == ROLE_HOLDER:
                self.holder = conn
                return
            conn.close()   # an agent before its job started: not possible; drop it

    def agents(self, count: int, srun: subprocess.Popen, timeout: float) -> dict:
        """Accept ``count`` agents; {node index: _Link}, then start reading them."""
        deadline = time.monotonic() + timeout
        while len(self._links) < count:
            if srun.poll() is not None:
                raise RuntimeError(f"srun ended before every node agent dialed back (exit status {srun.returncode})")
            try:
                role, conn = self.accept(min(1.0, max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(self._links)} of {count} node agents dialed back within "
                                       f"{timeout:g}s: can the nodes reach {self.dial}?") from None
                continue
            if role != ROLE_AGENT:
                conn.close()
                continue
            decoder = ch.FrameDecoder()
            frames = []
            while not frames:
                data = conn.recv(1 << 16)
                if not data:
                    break
                frames = list(decoder.feed(data))
            if not frames or frames[0][0] != "hello":
                conn.close()
                continue
            _, info, index = frames[0]
            link = _Link(conn, info, index)
            self._links[index], self._decoders[index] = link, decoder
            for frame in frames[1:]:
                self._dispatch(link, frame)
        for index, link in self._links.items():
            link.sock.settimeout(CALL_TIMEOUT)   # reads come after select; a send may wait, not forever
            self._selector.register(link.sock, selectors.EVENT_READ, index)
        self._thread = threading.Thread(target=self._read, name="notebook_launcher-slurm-uplink", daemon=True)
        self._thread.start()
        return dict(self._links)

    def batches(self, timeout: float) -> list:
        """[(node index, AgentBatch or EOFError)] that arrived within ``timeout``."""
        out = []
        try:
            out.append(self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait())
        except queue.Empty:
            return out
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def _read(self) -> None:
        while not self._stop.is_set() and self._selector.get_map():
            for key, _ in self._selector.select(0.2):
                link = self._links[key.data]
                try:
                    data = link.sock.recv(1 << 20)
                except OSError:
                    data = b""
                if not data:
                    self._selector.unregister(link.sock)
                    link.fail_pending(ConnectionError(f"the agent on {link.info.hostname} is gone"))
                    self._queue.put((link.index, EOFError(f"the agent on {link.info.hostname} closed its connection")))
                    continue
                for frame in self._decoders[key.data].feed(data):
                    self._dispatch(link, frame)

    def _dispatch(self, link: _Link, frame: tuple) -> None:
        link.heard_at = time.monotonic()
        if frame[0] == "batch":
            if frame[1].items or frame[1].pids:
                self._queue.put((link.index, frame[1]))
        elif frame[0] == "failed":   # the agent's own words: its node cannot go on
            self._queue.put((link.index, NodeGone.agent_failed(frame[1])))
        elif frame[0] == "reply":
            _, call_id, ok, value = frame
            pending = link.pending.pop(call_id, None)
            if pending is not None:
                pending.ok, pending.value = ok, value
                pending.done.set()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        for link in self._links.values():
            link.fail_pending(ConnectionError("the group was closed"))
            _close_quietly(link.sock)
        if self.holder is not None:
            _close_quietly(self.holder)   # the holding job's script ends, and with it the job
        _close_quietly(self.sock)
        self._selector.close()


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def _close_quietly(sock) -> None:
    try:
        sock.close()
    except OSError:
        pass


# ----------------------------------------------------------------- Slurm's commands
def _slurm(*argv, check: bool = True, timeout: float = 60) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:1])} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def _attach(num_nodes: int) -> Allocation:
    job_id = os.environ["SLURM_JOB_ID"]
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or ""
    return Allocation(job_id, _hostnames(nodelist)[:num_nodes] if nodelist else [], owned=False)


def _acquire(cluster, config, facts: SlurmFacts, listener: Listener) -> Allocation:
    """Submit the holding job and wait until it runs (interruptible; cancelled on any error)."""
    options = [f"--nodes={config.num_nodes}", "--ntasks-per-node=1", f"--cpus-per-task={facts.cpus_per_node}",
               f"--time={cluster.time}", f"--job-name={JOB_NAME}", "--output=/dev/null", "--parsable"]
    options += [f"--{name.replace('_', '-')}={value}" for name, value in
                (("partition", cluster.partition), ("account", cluster.account), ("gpus_per_node", cluster.gpus_per_node))
                if value]
    script = f"exec {shlex.quote(sys.executable)} -c {shlex.quote(HOLDER)} {listener.dial}"
    env = {**os.environ, TOKEN_ENV: listener.token.decode()}   # sbatch exports it to the job: never an argument
    done = subprocess.run(["sbatch", *options, *cluster.sbatch_args, f"--wrap={script}"], capture_output=True,
                          text=True, env=env, timeout=60)
    if done.returncode != 0:
        raise LaunchConfigError(f"sbatch refused the holding job: {(done.stderr or done.stdout).strip()}")
    job_id = done.stdout.strip().split(";")[0]
    allocation = Allocation(job_id, [], owned=True)
    try:
        listener.wait_for_holder(job_id)
        allocation.nodes = _hostnames(_slurm("squeue", "-h", "-j", job_id, "-o", "%N").strip())
    except BaseException:
        _cancel(allocation)
        raise
    return allocation


def _srun(allocation: Allocation, num_nodes: int, facts: SlurmFacts, listener: Listener, token: str) -> subprocess.Popen:
    argv = ["srun", f"--jobid={allocation.job_id}", "--overlap", f"--nodes={num_nodes}", "--ntasks-per-node=1",
            f"--ntasks={num_nodes}", f"--cpus-per-task={facts.cpus_per_node}", "--kill-on-bad-exit=1",
            "--job-name=notebook-launcher-agents", sys.executable, "-m", "notebook_launcher.ranks.dial",
            "--dial", listener.dial]
    env = {**os.environ, TOKEN_ENV: token}
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def queue_state(job_id: str) -> tuple:
    """(state, reason) of a job as squeue shows it; ("", "") once it left the queue."""
    out = _slurm("squeue", "-h", "-j", job_id, "-o", "%T|%r", check=False).strip()
    state, _, reason = out.partition("|")
    return state.strip(), "" if reason.strip() in ("None", "") else reason.strip()


def job_end_reason(job_id: str, settle: float = 3.0) -> str:
    """Why a job's agents went away, in words, from scontrol (kept for MinJobAge after the
    end); "" when the job still runs. A job being ended is COMPLETING for a moment first."""
    deadline = time.monotonic() + settle
    while True:
        out = _slurm("scontrol", "show", "job", job_id, check=False)
        fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
        state, reason = fields.get("JobState", ""), fields.get("Reason", "None")
        if state not in ("RUNNING", "COMPLETING") or time.monotonic() > deadline:
            break
        time.sleep(QUEUE_POLL)
    said = {"CANCELLED": "was cancelled (scancel)", "TIMEOUT": "reached its time limit",
            "PREEMPTED": "was preempted", "NODE_FAIL": "lost a node (NODE_FAIL)",
            "OUT_OF_MEMORY": "ran out of memory", "FAILED": "failed", "COMPLETED": "ended"}
    if state in said:
        return f"the Slurm job {job_id} {said[state]}" + (f" ({reason})" if reason not in ("None", "") else "")
    return ""


def _hostnames(nodelist: str) -> list:
    return _slurm("scontrol", "show", "hostnames", nodelist).split() if nodelist else []


def _cancel(allocation: Optional[Allocation]) -> None:
    if allocation is not None and allocation.owned:
        _slurm("scancel", allocation.job_id, check=False)


def _release(links: dict, srun: Optional[subprocess.Popen], listener: Listener, allocation) -> None:
    """Every step on its own: agents' connections, srun, the listener, the holding job."""
    steps = [listener.close]
    if srun is not None:
        steps.append(lambda: _end(srun))
    steps.append(lambda: _cancel(allocation))
    for step in steps:
        try:
            step()
        except Exception as exc:
            print(f"notebook_launcher: releasing the Slurm job failed at a step: {exc!r}", file=sys.stderr)


def _end(srun: subprocess.Popen, grace: float = 5.0) -> None:
    """srun's agents stop their ranks when their connection closes; srun then exits."""
    try:
        srun.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(srun.pid, sig)
            except ProcessLookupError:
                break
            try:
                srun.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    if srun.stderr is not None:
        srun.stderr.close()
