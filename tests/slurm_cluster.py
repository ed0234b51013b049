"""A one-node Slurm cluster for the tests, from Debian's slurm-wlm and munge, without systemd.

Everything lives in one temporary folder: a munge key and socket, a minimal ``slurm.conf``
(linuxproc process tracking, no task plugin, cons_tres, no accounting: no slurmdbd, as on
many real clusters), the daemons' spool, state, logs and PID files. ``munged``,
``slurmctld -D`` and ``slurmd -D`` are started here and stopped by their PIDs. Client
commands (sbatch, srun, squeue, scontrol, scancel) find the cluster through ``SLURM_CONF``,
which `LocalSlurm.env` sets.

    with LocalSlurm() as slurm:
        subprocess.run(["sinfo"], env=slurm.env)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue")


def available() -> bool:
    """Whether Debian's slurm-wlm and munge are installed (CI installs them)."""
    return all(shutil.which(name) or os.path.exists(f"/usr/sbin/{name}") for name in DAEMONS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, cpus: int = 0) -> None:
        self.cpus = cpus or os.cpu_count() or 2
        self.folder = tempfile.mkdtemp(prefix="nl-slurm-")
        self.node = socket.gethostname()
        self.conf = os.path.join(self.folder, "slurm.conf")
        self.socket = os.path.join(self.folder, "munge.socket")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        for key in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[key]   # never inherit an allocation of whoever runs the tests
        self.processes: list = []

    # ------------------------------------------------------------- start
    def __enter__(self) -> "LocalSlurm":
        try:
            self._munge()
            self._start_slurm()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_slurm(self, attempts: int = 3) -> None:
        """slurmctld and slurmd, on ports picked free here. A picked port is free only when
        picked: another test worker may take it before the daemon binds it. A daemon that
        could not bind its port ends at once, and both start again on fresh ports, with
        fresh state and logs (the failed try's logs are kept beside, as ``*.try1``)."""
        for attempt in range(1, attempts + 1):
            self._write_conf()
            self.processes += [self._daemon(["slurmctld", "-D", "-i", "-f", self.conf], "slurmctld.out"),
                               self._daemon(["slurmd", "-D", "-f", self.conf], "slurmd.out")]
            try:
                self._wait_until_idle()
                return
            except RuntimeError as exc:
                if "Address already in use" not in str(exc) or attempt == attempts:
                    raise
                self._stop(self.processes[-2:])
                del self.processes[-2:]
                self._set_aside(attempt)

    def _set_aside(self, attempt: int) -> None:
        """A failed try's logs and state, out of the next try's way."""
        for name in ("slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log"):
            path = os.path.join(self.folder, name)
            if os.path.exists(path):
                os.replace(path, f"{path}.try{attempt}")
        for sub in ("state", "spool"):
            shutil.rmtree(os.path.join(self.folder, sub), ignore_errors=True)

    def _munge(self) -> None:
        key = os.path.join(self.folder, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self.processes.append(self._daemon(
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.socket}",
             f"--pid-file={self.folder}/munged.pid", f"--log-file={self.folder}/munged.log",
             f"--seed-file={self.folder}/munged.seed"], "munged.out"))
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket):
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {self._log('munged.out')}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.folder, sub), exist_ok=True)
        f = self.folder
        lines = [
            "ClusterName=nltest", f"SlurmctldHost={self.node}", "AuthType=auth/munge",
            f"AuthInfo=socket={self.socket}", "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", f"StateSaveLocation={f}/state",
            f"SlurmdSpoolDir={f}/spool", f"SlurmctldPidFile={f}/slurmctld.pid", f"SlurmdPidFile={f}/slurmd.pid",
            f"SlurmctldLogFile={f}/slurmctld.log", f"SlurmdLogFile={f}/slurmd.log", "ReturnToService=2",
            "SchedulerType=sched/builtin", "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0",
            "KillWait=5", "MinJobAge=60", "MessageTimeout=10",
            f"NodeName={self.node} CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
        ]
        with open(self.conf, "w") as out:
            out.write("\n".join(lines) + "\n")

    def _daemon(self, argv: list, log: str) -> subprocess.Popen:
        with open(os.path.join(self.folder, log), "wb") as out:   # the daemon keeps its own copy
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, start_new_session=True)

    def _wait_until_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for proc in self.processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited: {self._log(proc.args[0] + '.out')}"
                                       f"{self._log('slurmctld.log')}{self._log('slurmd.log')}")
            done = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            state = done.stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the node did not become idle (sinfo: {state!r}): {self._log('slurmctld.log')}")

    def _log(self, name: str) -> str:
        try:
            with open(os.path.join(self.folder, name), errors="replace") as f:
                return f"\n--- {name} ---\n" + f.read()[-3000:]
        except OSError:
            return ""

    # ------------------------------------------------------------- use
    def queue(self) -> list:
        """Job ids in the queue (any state)."""
        done = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True, timeout=30)
        return done.stdout.split()

    def wait_queue_empty(self, timeout: float = 30) -> list:
        deadline = time.monotonic() + timeout
        left = self.queue()
        while left and time.monotonic() < deadline:
            time.sleep(0.3)
            left = self.queue()
        return left

    # ------------------------------------------------------------- stop
    def __exit__(self, *exc) -> None:
        try:
            for job in self.queue() if self.processes else []:
                subprocess.run(["scancel", job], env=self.env, capture_output=True, timeout=30)
        finally:
            self._stop(self.processes)
            shutil.rmtree(self.folder, ignore_errors=True)

    @staticmethod
    def _stop(processes: list) -> None:
        """SIGTERM to each daemon's process group, the last started first; SIGKILL after 10 s."""
        for proc in reversed(processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in reversed(processes):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
