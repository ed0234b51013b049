"""Node agents that dial back to the notebook over TCP (the Slurm engine's transport).

The notebook listens on an address the compute nodes can reach; each agent (and a
Slurm job's holder) connects and first sends the random token it was given through its
environment (never a command line: ``ps`` shows those to every user of the node). The
notebook compares it in constant time and drops the connection unless it matches, before
it reads anything else: nothing from a stranger is ever unpickled.

After that, frames as on a rank's pipes (`channel.encode`), each a tuple:

- notebook -> agent: ``("call", call_id, method, args)``: a `agent.NodeAgent` method;
- agent -> notebook: ``("hello", NodeInfo, node_index)`` once, ``("reply", call_id, ok,
  value)`` for each call, and ``("batch", AgentBatch)`` at least every `agent.PULL_WAIT`
  seconds (the agent's heartbeat).

The agent's side is `serve` (``python -m notebook_launcher.ranks.dial --dial host:port``):
it runs a `NodeAgent` until the notebook's connection ends, then stops its ranks and
exits. A Slurm holding job's script does the same handshake as a holder
(`slurm_engine.HOLDER`, standalone) and only stays connected, so that the job ends by
itself when the notebook is gone (a killed kernel leaves no job behind).
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import sys
import threading

from .. import channel as ch

TOKEN_ENV = "NOTEBOOK_LAUNCHER_TOKEN"
TOKEN_BYTES = 64            # hex characters of the token (32 random bytes)
ROLE_AGENT, ROLE_HOLDER = b"A", b"H"


def send(sock: socket.socket, lock: threading.Lock, message: tuple) -> None:
    data = ch.encode(message)
    with lock:
        sock.sendall(data)


def receive_frames(sock: socket.socket, decoder: ch.FrameDecoder) -> list:
    """The frames a readable socket holds (blocking for the first bytes); [] at its end."""
    data = sock.recv(1 << 20)
    if not data:
        return []
    return list(decoder.feed(data)) or [None]


# ----------------------------------------------------------------- the agent's side
def serve(address: str, hold: bool = False) -> int:
    token = os.environ.pop(TOKEN_ENV, "")   # read once; the ranks this agent starts never see it
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=60)
    sock.settimeout(None)
    sock.sendall(token.encode().ljust(TOKEN_BYTES)[:TOKEN_BYTES] + (ROLE_HOLDER if hold else ROLE_AGENT))
    if hold:
        while sock.recv(4096):   # the notebook never writes to a holder: this waits for the end
            pass
        return 0
    return _run_agent(sock)


def _run_agent(sock: socket.socket) -> int:
    from .agent import PULL_WAIT, NodeAgent

    agent, lock, stop = NodeAgent(), threading.Lock(), threading.Event()
    send(sock, lock, ("hello", agent.describe(), int(os.environ.get("SLURM_NODEID", "0"))))

    def push() -> None:
        while not stop.is_set():
            try:
                frame = ("batch", agent.pull(PULL_WAIT))
            except Exception as exc:   # the agent cannot go on: the node ends with its words, not 5 s of silence
                frame = ("failed", f"{type(exc).__name__}: {exc}")
            try:
                send(sock, lock, frame)
            except OSError:
                return
            if frame[0] == "failed":
                return

    threading.Thread(target=push, name="notebook_launcher-agent-uplink", daemon=True).start()
    decoder = ch.FrameDecoder()
    try:
        while True:
            try:
                frames = receive_frames(sock, decoder)
            except OSError:
                frames = []
            if not frames:
                return 0  # the notebook is gone: stop every rank (the finally) and leave
            for frame in frames:
                if frame is not None:
                    _answer(agent, sock, lock, frame)
    finally:
        stop.set()
        agent.close(graceful=False, term_grace=1.0)


def _answer(agent, sock: socket.socket, lock: threading.Lock, frame: tuple) -> None:
    _, call_id, method, args = frame
    try:
        reply = ("reply", call_id, True, getattr(agent, method)(*args))
    except BaseException as exc:  # returned to the notebook, which raises it there
        reply = ("reply", call_id, False, _picklable(exc))
    send(sock, lock, reply)


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m notebook_launcher.ranks.dial")
    parser.add_argument("--dial", required=True, help="host:port of the notebook's listener")
    parser.add_argument("--hold", action="store_true", help="only stay connected (a holding job)")
    args = parser.parse_args(argv)
    return serve(args.dial, args.hold)


if __name__ == "__main__":
    sys.exit(main())
