"""A real JupyterLab server for browser tests: loopback only, a random port, a token, a
throwaway root directory and throwaway user settings; always stopped and reaped.

Stopping goes from polite to certain: every kernel is shut down through the REST API,
then the server is asked to exit, then its whole process group (server, kernels and
anything they started) gets SIGTERM and finally SIGKILL.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Optional

import psutil

START_TIMEOUT = 60.0    # seconds for the server to answer /api/status
STOP_GRACE = 10.0       # seconds for each stopping step

# User settings written into a fresh settings directory: no news or update checks (no
# network here, and their pop-ups would cover the page) and every cell kept in the DOM
# (JupyterLab can leave cells that are out of view unrendered).
SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


# Prebuilt JupyterLab extensions the page needs; any other one installed in the environment
# (e.g. jupyter-distributed, which re-renders every output area per rank) is disabled, so
# the page is a plain JupyterLab with widgets whatever else is installed.
KEEP_EXTENSIONS = ("@jupyter-widgets/jupyterlab-manager", "jupyterlab_pygments")


def installed_extensions() -> list:
    """Names of the prebuilt (federated) JupyterLab extensions this Python environment has."""
    from jupyter_core.paths import jupyter_path

    names = []
    for root in jupyter_path("labextensions"):
        for package in glob.glob(os.path.join(root, "*", "package.json")) + \
                glob.glob(os.path.join(root, "@*", "*", "package.json")):
            try:
                with open(package) as f:
                    names.append(json.load(f)["name"])
            except (OSError, ValueError, KeyError):
                continue
    return sorted(set(names))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class JupyterLab:
    """``with JupyterLab(root) as lab: page.goto(lab.url("lab/tree/x.ipynb"))``."""

    def __init__(self, root: str, log_path: str) -> None:
        self.root = root
        self.home = os.path.join(root, ".lab-home")      # settings, workspaces, runtime files
        self.token = secrets.token_hex(16)
        self.log_path = log_path
        self.port: Optional[int] = None
        self.process: Optional[subprocess.Popen] = None
        self._log = None

    # ------------------------------------------------------------- start
    def __enter__(self) -> "JupyterLab":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._write_settings()
        self._log = open(self.log_path, "ab")
        for _ in range(3):   # a free port can be taken between choosing and binding it
            self.port = free_port()
            self.process = subprocess.Popen(self._command(), cwd=self.root, env=self._env(),
                                            stdout=self._log, stderr=subprocess.STDOUT,
                                            start_new_session=True)   # its own group: one killpg reaches all
            if self._wait_ready():
                return
            self._kill_group()
        raise RuntimeError(f"JupyterLab did not start; see {self.log_path}:\n{self.log_tail()}")

    def _command(self) -> list:
        return [
            sys.executable, "-m", "jupyterlab", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
            "--ServerApp.allow_root=True", "--ServerApp.open_browser=False",
            f"--LabApp.workspaces_dir={os.path.join(self.home, 'workspaces')}",
            f"--LabApp.user_settings_dir={os.path.join(self.home, 'settings')}",
            "--LabApp.extension_manager=readonly",   # no package index queries
        ]

    def _env(self) -> dict:
        env = dict(os.environ)
        env.pop("PYTEST_CURRENT_TEST", None)
        env["JUPYTER_RUNTIME_DIR"] = os.path.join(self.home, "runtime")
        env["JUPYTER_CONFIG_DIR"] = os.path.join(self.home, "config")   # no user config from ~/.jupyter
        env["JUPYTER_DATA_DIR"] = os.path.join(self.home, "data")       # nor user data (signing key, ...)
        env["CUDA_VISIBLE_DEVICES"] = ""   # the CPU path, on every machine
        return env

    def _write_settings(self) -> None:
        for name, values in SETTINGS.items():
            path = os.path.join(self.home, "settings", name.split("/", 1)[0], name.split("/", 1)[1])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(values, f)
        others = {name: True for name in installed_extensions() if name not in KEEP_EXTENSIONS}
        labconfig = os.path.join(self.home, "config", "labconfig")
        os.makedirs(labconfig, exist_ok=True)
        with open(os.path.join(labconfig, "page_config.json"), "w") as f:
            json.dump({"disabledExtensions": others}, f)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                self.api("GET", "api/status", timeout=2)
                return True
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        return False

    # ------------------------------------------------------------- use
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def api(self, method: str, path: str, timeout: float = 10) -> object:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def kernels(self) -> list:
        return self.api("GET", "api/kernels")

    def log_tail(self, size: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-size:].decode(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------- stop
    def stop(self) -> None:
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                self._shutdown_politely()
        finally:
            self._kill_group()
            if self._log is not None:
                self._log.close()
            shutil.rmtree(self.home, ignore_errors=True)

    def _shutdown_politely(self) -> None:
        try:
            for kernel in self.kernels():
                self.api("DELETE", f"api/kernels/{kernel['id']}", timeout=STOP_GRACE)
            self.api("POST", "api/shutdown", timeout=STOP_GRACE)
        except (OSError, urllib.error.URLError, ValueError):
            return
        try:
            self.process.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass

    def _kill_group(self) -> None:
        """SIGTERM then SIGKILL to the server's process group; reap the server."""
        process, self.process = self.process, None
        if process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            if _group_gone(process, STOP_GRACE):
                break
        try:
            process.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass


def _group_gone(process: subprocess.Popen, timeout: float) -> bool:
    """Wait until no live process of ``process``'s group is left (zombies do not count:
    once the server is gone its children belong to init, which reaps them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.poll()
        if not group_members(process.pid):
            return True
        time.sleep(0.05)
    return False


def group_members(pgid: int) -> list:
    """Live (non-zombie) processes of process group ``pgid``."""
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.info["pid"]) == pgid:
                members.append(proc.info["pid"])
        except (ProcessLookupError, psutil.Error):
            continue
    return members
