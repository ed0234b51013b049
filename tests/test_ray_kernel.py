"""Ranks on a real Ray cluster, from a real kernel: `cluster="ray"`.

One local Ray cluster for the module (`ray.cluster_utils.Cluster`: a head and a second
node, 1 CPU each, no dashboard, a small object store), with token authentication on
(Ray 2.60's default for local clusters, made explicit here with a token of the test's
own); the kernel connects with that token. After every test nothing of ours is left:
no live actor of ours, no placement group that is not removed, no rank process.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("ray")

from kernel_harness import Kernel, wait_pids_gone  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class LocalRay:
    """The module's cluster: a process of its own (`ray_cluster_process.py`), stopped by its PID."""

    def __init__(self, env: dict) -> None:
        self.env = env
        self.process = subprocess.Popen([sys.executable, os.path.join(HERE, "ray_cluster_process.py")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.address = self._expect("ADDRESS", timeout=300).split()[1]

    def remove_worker(self) -> None:
        self.process.stdin.write("remove-worker\n")
        self.process.stdin.flush()
        self._expect("REMOVED", timeout=60)

    def add_worker(self) -> None:
        self.process.stdin.write("add-worker\n")
        self.process.stdin.flush()
        self._expect("ADDED", timeout=120)

    def _expect(self, word: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                break
            if line.startswith(word):
                return line.strip()
        raise AssertionError(f"the Ray cluster process did not say {word}")

    def stop(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    token = tmp_path_factory.mktemp("ray") / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))   # for the kernels started here
    started = LocalRay(env)
    try:
        yield started
    finally:
        started.stop()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def kernel(cluster, stranger):
    startup = textwrap.dedent(f"""
        import os, time
        import ray, torch, torch.distributed as dist
        from notebook_launcher import notebook_launcher, RayCluster, WorkerError
        ray.init(address={cluster.address!r}, log_to_driver=False)
        %load_ext notebook_launcher
    """)
    with Kernel(startup=startup, timeout=180) as k:
        yield k


def cell(kernel: Kernel, code: str, timeout: float = 240):
    return kernel.run(textwrap.dedent(code), timeout=timeout)


def ours_left(kernel: Kernel) -> str:
    """What the kernel's Ray still holds of ours: live RayAgent actors, placement groups not removed."""
    result = cell(kernel, """
        import ray._private.state as _state
        _actors = [a for a in _state.state.actor_table(None).values()
                   if a.get("ActorClassName", "").endswith("RayAgent") and a.get("State") != "DEAD"]
        _groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        print("LEFT", len(_actors), len(_groups))
    """)
    return re.search(r"LEFT \d+ \d+", result.stdout).group(0) if "LEFT" in result.stdout else result.text


def assert_nothing_left(kernel: Kernel, pids=()) -> None:
    deadline = time.monotonic() + 15
    while (left := ours_left(kernel)) != "LEFT 0 0" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == "LEFT 0 0", left
    assert wait_pids_gone(pids, timeout=5) == [], "rank processes left behind"


def pids_in(text: str) -> list:
    return [int(p) for p in re.findall(r"PID (\d+)", text)]


def test_a_two_node_launch_returns_rank_0s_value_and_runs_on_two_ray_nodes(kernel):
    # The second call returns every rank's 4 MB state: big values come back inline, exactly.
    result = cell(kernel, textwrap.dedent(BIG_VALUES) + textwrap.dedent("""
        def total(x):
            t = torch.tensor([float(x * (dist.get_rank() + 1))])
            dist.all_reduce(t)
            print("PID", os.getpid(), flush=True)
            return t.item(), os.environ["NOTEBOOK_LAUNCHER_NODE_ID"], dist.get_world_size()
        value = notebook_launcher(total, args=(10,), num_processes=1, num_nodes=2, cluster="ray", display="text")
        every = notebook_launcher(lambda: (os.environ["NOTEBOOK_LAUNCHER_NODE_ID"], big_state(dist.get_rank())),
                                  num_processes=1, num_nodes=2, cluster="ray", display="none", return_all=True)
        print("VALUE", value[0], value[2], "NODES", len({node for node, _ in every}))
        exact = all(torch.equal(state[k], big_state(rank)[k]) for rank, (_, state) in enumerate(every) for k in state)
        print("BIG VALUES", exact, "KERNEL MAPS", maps_of_ours())
    """))
    assert result.status == "ok", result.traceback + result.stderr
    assert "VALUE 30.0 2 NODES 2" in result.stdout, result.text
    assert "BIG VALUES True KERNEL MAPS 0" in result.stdout, result.text
    assert "Launching on 1 CPU process on each of 2 Ray nodes (gloo, spawn)" in result.stdout
    assert_nothing_left(kernel, pids_in(result.stdout))


def test_an_error_on_rank_1_names_the_rank_its_node_and_its_traceback(kernel):
    result = cell(kernel, """
        def fails_on_rank_1():
            print("PID", os.getpid(), flush=True)
            if dist.get_rank() == 1:
                raise ValueError("bad shard on rank 1")   # the cell's own line
            dist.barrier()
        started = time.monotonic()
        try:
            notebook_launcher(fails_on_rank_1, num_processes=1, num_nodes=2, cluster="ray", display="none")
        except WorkerError as err:
            print("ERR", str(err).splitlines()[0])
            print("CAUSE", type(err.__cause__).__name__, "RANK", err.rank)
            print("TB", "bad shard on rank 1\\")   # the cell's own line" in err.remote_traceback)
    """)
    assert result.status == "ok", result.traceback
    assert re.search(r"ERR rank 1 on node 1 \(.+\) failed: ValueError: bad shard on rank 1", result.stdout), result.text
    assert "CAUSE ValueError RANK 1" in result.stdout and "TB True" in result.stdout
    assert_nothing_left(kernel, pids_in(result.stdout))


def test_a_session_keeps_state_over_cells_on_two_nodes_through_an_error_and_an_interrupt(kernel):
    started = cell(kernel, "%dist start -n 1 --nodes 2 --cluster ray --display none")
    assert started.status == "ok", started.traceback
    assert "Session started: 1 CPU process on each of 2 Ray nodes (gloo, spawn)" in started.stdout
    try:
        first = cell(kernel, "%%dist\nimport os\nweights = torch.ones(2) * (rank + 1)\nprint('PID', os.getpid())")
        second = cell(kernel, "%%dist\ndist.all_reduce(weights)\nweights.sum().item()")
        third = cell(kernel, "%%dist\nraise ValueError(f'only a user error on rank {rank}') if rank == 1 else 7")
        fourth = cell(kernel, "%%dist\nweights.tolist()")
        msg_id = kernel.submit("%%dist\nprint('SLEEPING', flush=True)\nimport time\ntime.sleep(60)")
        kernel.wait_for_output(msg_id, r"(SLEEPING[\s\S]*){2}", timeout=60)
        pressed = time.monotonic()
        kernel.interrupt()
        with pytest.raises(TimeoutError, match="the cell ended"):
            kernel.wait_for_output(msg_id, r"NEVER PRINTED", timeout=30)
        interrupted_in = time.monotonic() - pressed
        fifth = cell(kernel, "%%dist\nweights.tolist()")
        cell(kernel, PRESS_WHILE_A_PULL_IS_POSTED)
        msg_id = kernel.submit("%%dist\nprint('SLEEPING', flush=True)\nimport time\ntime.sleep(60)")
        with pytest.raises(TimeoutError, match="the cell ended"):
            kernel.wait_for_output(msg_id, r"NEVER PRINTED", timeout=30)
        cell(kernel, RESTORE_THE_ACTORS)
        sixth = cell(kernel, "%%dist\nweights.tolist()")
    finally:
        cell(kernel, RESTORE_THE_ACTORS)   # else a failed check leaves %dist stop unable to kill them
        stopped = cell(kernel, "%dist stop")
    assert interrupted_in < 2.0, "the interrupted cell did not end within 2 s"
    assert "Out[rank 1]: [3.0, 3.0]" in fifth.stdout and "fresh ranks" not in fifth.stderr, fifth.text
    assert "Out[rank 1]: [3.0, 3.0]" in sixth.stdout and "fresh ranks" not in sixth.stderr, sixth.text
    assert "Out[rank 0]: 6.0" in second.stdout and "Out[rank 1]: 6.0" in second.stdout, second.text
    assert third.status == "error" and "only a user error on rank 1" in third.evalue + third.traceback
    assert "Out[rank 0]: [3.0, 3.0]" in fourth.stdout and "Out[rank 1]: [3.0, 3.0]" in fourth.stdout, fourth.text
    assert stopped.status == "ok"
    assert_nothing_left(kernel, pids_in(first.stdout))


# The person presses Interrupt just as the notebook asks an agent for its next batch (a pull,
# 0.3 ms of Ray's Python here): armed for the next cell, the press lands right after a pull
# was handed to Ray, a second after that cell's first pull, when the ranks sleep. A pull whose reference the
# Interrupt lost would take that agent's next batch, its rank's KeyboardInterrupt, with it:
# the session would break ("rank 1 could not be interrupted").
PRESS_WHILE_A_PULL_IS_POSTED = """
import os, signal, time
_group = get_ipython().magics_manager.registry["DistMagics"].session._ranks
_press = {"at": None, "done": False}

class _PressAfterPosting:
    def __init__(self, method):
        self.method = method
    def options(self, **options):
        return _PressAfterPosting(self.method.options(**options))
    def remote(self, *args):
        ref = self.method.remote(*args)
        if _press["at"] is None:
            _press["at"] = time.monotonic() + 1.0     # the next cell's first pull: press a second later
        elif not _press["done"] and time.monotonic() > _press["at"]:
            _press["done"] = True
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)      # the handler runs here, before the caller has the reference
        return ref

class _Agent:
    def __init__(self, actor):
        self.actor = actor
    def __getattr__(self, name):
        pulls = ("pull", "send_then_pull")     # a cell's task is its agent's first pull
        return _PressAfterPosting(getattr(self.actor, name)) if name in pulls else getattr(self.actor, name)

_group.actors = [_Agent(actor) for actor in _group.actors]
"""
RESTORE_THE_ACTORS = "if '_group' in globals(): _group.actors = [getattr(a, 'actor', a) for a in _group.actors]"


def test_interrupt_ends_the_cell_within_two_seconds(kernel):
    msg_id = kernel.submit(textwrap.dedent("""
        def sleeps():
            print("PID", os.getpid(), "READY", flush=True)
            time.sleep(120)
        notebook_launcher(sleeps, num_processes=1, num_nodes=2, cluster="ray", display="none")
    """))
    out = kernel.wait_for_output(msg_id, r"(PID \d+ READY[\s\S]*){2}", timeout=180)
    pressed = time.monotonic()
    kernel.interrupt()
    with pytest.raises(TimeoutError, match="the cell ended"):
        kernel.wait_for_output(msg_id, r"NEVER PRINTED", timeout=30)
    assert time.monotonic() - pressed < 2.0, "the cell did not end within 2 s of the Interrupt"
    assert_nothing_left(kernel, pids_in(out))


# An agent that cannot hand a task to its ranks (a bug of ours there): node 1's agent's
# `NodeAgent.send` raises. Its ranks never get the task and the agent goes on answering
# its pulls, so only the failed call itself can end the cell. Then no pull is left out
# (the last cell's answer: each answers within PULL_WAIT, 0.5 s), so that the next small
# cell goes in a call that is also the agent's pull.
BREAK_NODE_1S_SEND = """
def _break_send(actor):
    def send(ranks, frame):
        raise RuntimeError("the send broke")
    actor.agent.send = send
_group = get_ipython().magics_manager.registry["DistMagics"].session._ranks
ray.get(_group.actors[1].__ray_call__.remote(_break_send))
time.sleep(0.7)
_group.drain()
print("PULLS OUT", len(_group._pulls))
del _group, _break_send
"""


@pytest.mark.parametrize("size", ["small", "big"])
def test_an_agent_whose_send_fails_ends_its_node_and_the_cell(kernel, size):
    """A small cell goes in a call that is also the agent's pull, a big one (over 1 MiB)
    is sent alone: either way the node ends with the agent's words, and the session breaks."""
    started = cell(kernel, "%dist start -n 1 --nodes 2 --cluster ray --display none")
    assert started.status == "ok", started.traceback
    try:
        first = cell(kernel, "%%dist\nimport os\nprint('PID', os.getpid())")
        broken = cell(kernel, BREAK_NODE_1S_SEND)
        padding = "x" * (2 << 20) if size == "big" else ""
        sent = time.monotonic()
        failed = cell(kernel, f"%%dist\npadding = {padding!r}\ndist.barrier()", timeout=60)
        ended_in = time.monotonic() - sent
        status = cell(kernel, "%dist status")
    finally:
        cell(kernel, "%dist stop")
    assert broken.status == "ok" and "PULLS OUT 0" in broken.stdout, broken.text
    assert failed.status == "error", failed.text
    assert "rank 1 on node 1" in failed.evalue, failed.evalue
    assert "lost with its node: its agent failed: RuntimeError: the send broke" in failed.evalue, failed.evalue
    assert ended_in < 10.0, f"the cell took {ended_in:.1f} s to end"
    assert "broken because rank 1" in status.stdout, status.text
    assert_nothing_left(kernel, pids_in(first.stdout))


# ----------------------------------------------------------------- big values (issue 21)
# Ranks on other nodes get and send their tensors inline, through the node agents, never
# through this machine's shared memory (the test cluster runs on one machine, where shared
# memory would happen to work: the tests check that it is not used, as it must not be
# across machines).
BIG_VALUES = """
    import os
    def maps_of_ours():
        with open("/proc/self/maps") as maps:
            return sum("memfd:notebook_launcher" in line for line in maps)
    def big_state(rank):
        torch.manual_seed(rank)
        base = torch.randn(1_000_000)                       # 4 MB: above the inline limit on one machine
        return {"base": base, "view": base[10:20], "t": base[:600].reshape(20, 30).t(),
                "p": torch.nn.Parameter(torch.ones(3))}
"""


def test_big_values_cross_the_cluster_inline_and_exactly(kernel):
    started = cell(kernel, "%dist start -n 1 --nodes 2 --cluster ray --display none")
    assert started.status == "ok", started.traceback
    try:
        result = cell(kernel, textwrap.dedent(BIG_VALUES) + textwrap.dedent("""
            session = get_ipython().find_magic('dist').__self__.session
            session.push(pushed=big_state(7), big_state=big_state, maps_of_ours=maps_of_ours)
            print("ON RANKS", session.execute(
                "s = big_state(7); all(torch.equal(pushed[k], s[k]) for k in s) and "
                "pushed['view'].untyped_storage().data_ptr() == pushed['base'].untyped_storage().data_ptr() "
                "and pushed['t'].stride() == s['t'].stride()"))
            print("RANK MAPS", session.execute("maps_of_ours()"))
            session.execute("import os; mine = big_state(rank); print('PID', os.getpid())")
            back = session.pull("mine", rank=1)
            want = big_state(1)
            print("PULLED", all(torch.equal(back[k], want[k]) for k in want), type(back["p"]).__name__,
                  back["view"].untyped_storage().data_ptr() == back["base"].untyped_storage().data_ptr())
            returned = session.run(lambda: big_state(dist.get_rank()), return_all=True)
            print("RETURNED", all(torch.equal(returned[r]["base"], big_state(r)["base"]) for r in (0, 1)))
            print("KERNEL MAPS", maps_of_ours())
        """))
    finally:
        stopped = cell(kernel, "%dist stop")
    assert result.status == "ok", result.traceback + result.stderr
    assert "ON RANKS {0: 'True', 1: 'True'}" in result.stdout, result.text
    assert "PULLED True Parameter True" in result.stdout and "RETURNED True" in result.stdout, result.text
    assert "RANK MAPS {0: '0', 1: '0'}" in result.stdout and "KERNEL MAPS 0" in result.stdout, result.text
    assert stopped.status == "ok"
    assert_nothing_left(kernel, pids_in(result.stdout))


def test_kernel_death_takes_every_actor_placement_group_and_rank(cluster):
    """A killed kernel (the Ray driver): Ray kills the actors it owned, and the ranks go with them."""
    startup = f"import ray, os, time\nray.init(address={cluster.address!r}, log_to_driver=False)\n" \
              "from notebook_launcher import notebook_launcher"
    with Kernel(startup=startup, timeout=180) as doomed:
        msg_id = doomed.submit(textwrap.dedent("""
            def sleeps():
                print("PID", os.getpid(), "READY", flush=True)
                time.sleep(300)
            notebook_launcher(sleeps, num_processes=1, num_nodes=2, cluster="ray", display="none")
        """))
        out = doomed.wait_for_output(msg_id, r"(PID \d+ READY[\s\S]*){2}", timeout=180)
        os.kill(doomed.pid, signal.SIGKILL)
        pids = pids_in(out)
        assert wait_pids_gone(pids, timeout=60) == [], "ranks outlived their kernel"
    check = ("import ray, sys, time; ray.init(address=sys.argv[1], log_to_driver=False)\n"
             "deadline = time.monotonic() + 60\n"
             "while time.monotonic() < deadline:\n"
             "    left = [g for g in ray.util.placement_group_table().values() if g['state'] != 'REMOVED']\n"
             "    if not left: break\n"
             "    time.sleep(1)\n"
             "print('GROUPS LEFT', len(left))")
    probe = subprocess.run([sys.executable, "-c", check, cluster.address], env=cluster.env, capture_output=True,
                           text=True, timeout=180)
    assert "GROUPS LEFT 0" in probe.stdout, probe.stdout + probe.stderr


CONNECT = "import ray, sys; ray.init(address=sys.argv[1]); print(ray.cluster_resources()['CPU']); ray.shutdown()"


@pytest.fixture(scope="module")
def stranger(cluster, tmp_path_factory):
    """A process that tries the cluster with another token, started with the module: Ray
    retries for about 20 s before it gives up, so it does that while the other tests run."""
    wrong = tmp_path_factory.mktemp("stranger") / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    probe = subprocess.Popen([sys.executable, "-c", CONNECT, cluster.address],
                             env={**cluster.env, "RAY_AUTH_TOKEN_PATH": str(wrong)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield probe
    if probe.poll() is None:
        probe.kill()
    probe.communicate()


def test_token_authentication_is_on(cluster, stranger):
    """A process with another token is refused; one with the cluster's token connects."""
    right = subprocess.run([sys.executable, "-c", CONNECT, cluster.address], env=cluster.env, capture_output=True,
                           text=True, timeout=120)
    assert right.returncode == 0 and right.stdout.strip().endswith("2.0"), right.stdout + right.stderr
    out, err = stranger.communicate(timeout=120)
    assert stranger.returncode != 0 and "2.0" not in out, out + err


# ----------------------------------------------------------------- refused before anything starts
def test_asking_for_what_the_cluster_lacks_is_a_clear_error_before_anything_starts(kernel):
    result = cell(kernel, """
        from notebook_launcher import LaunchConfigError
        for options in (dict(num_nodes=3), dict(num_nodes=2, device="cuda"),
                        dict(num_nodes=2, cluster=RayCluster(resources_per_node={"CPU": 1, "GPU": 2})),
                        dict(num_nodes=2, node_rank=1), dict(num_nodes=2, start_method="fork")):
            try:
                notebook_launcher(print, **{"num_processes": 1, "cluster": "ray", **options})
            except LaunchConfigError as err:
                print("REFUSED", str(err)[:60])
        print("GROUPS", len([g for g in ray.util.placement_group_table().values()]))
    """)
    assert result.status == "ok", result.traceback
    lines = re.findall(r"REFUSED (.*)", result.stdout)
    assert len(lines) == 5, result.text
    assert lines[0].startswith("num_nodes=3 needs 3 Ray nodes with {'CPU': 1} each (num_processes=1 per node), but the"[:60])
    assert lines[1] == "device='cuda' was asked for, but the Ray cluster has no GPU."[:60]
    assert lines[2].startswith("num_nodes=2 needs 2 Ray nodes with {'CPU': 1, 'GPU': 2} each"[:60])
    assert lines[3].startswith("cluster='ray' places every node and picks the rendezvous port"[:60])
    assert lines[4] == "cluster='ray' starts ranks with spawn on each node; leave start"[:60]
    assert_nothing_left(kernel)


def test_without_ray_installed_cluster_ray_is_a_clear_error(tmp_path):
    """A kernel where Ray does not import: the error says what to install; nothing starts."""
    shim = tmp_path / "no_ray" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "from notebook_launcher import notebook_launcher, LaunchConfigError\n"
            "try:\n    notebook_launcher(print, num_processes=1, num_nodes=2, cluster='ray')\n"
            "except LaunchConfigError as err:\n    print('REFUSED', err)\n")
    done = subprocess.run([sys.executable, "-c", code, str(shim.parent)], capture_output=True, text=True, timeout=120)
    assert "REFUSED cluster='ray' needs Ray in this kernel" in done.stdout, done.stdout + done.stderr
    assert "pip install 'notebook-launcher[ray]'" in done.stdout


def test_run_from_a_terminal_with_cluster_ray(cluster, tmp_path):
    """``python -m notebook_launcher run --cluster ray --num_machines 2``: accelerate's meaning
    (--num_processes counts every machine's), the script on every node, exit status 0."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import torch, torch.distributed as dist
        t = torch.ones(1)
        dist.all_reduce(t)
        print("RANK", dist.get_rank(), "OF", dist.get_world_size(), "SUM", t.item(), "ARG", sys.argv[1],
              "NODE", os.environ["NOTEBOOK_LAUNCHER_NODE_ID"][:8], flush=True)
    """))
    done = subprocess.run([sys.executable, "-m", "notebook_launcher", "run", "--cluster", "ray", "--num_machines", "2",
                           "--num_processes", "2", str(script), "hello"],
                          env={**cluster.env, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True,
                          timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = re.findall(r"RANK (\d) OF 2 SUM 2.0 ARG hello NODE (\w+)", done.stdout)
    assert sorted(r for r, _ in ranks) == ["0", "1"] and len({n for _, n in ranks}) == 2, done.stdout


def test_max_restarts_starts_again_on_a_fresh_placement(kernel):
    result = cell(kernel, """
        def fails_once():
            attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
            print("PID", os.getpid(), flush=True)
            if attempt == 0 and dist.get_rank() == 1:
                raise RuntimeError("first attempt fails")
            dist.barrier()
            return attempt
        before = len(ray.util.placement_group_table())
        value = notebook_launcher(fails_once, num_processes=1, num_nodes=2, cluster="ray", display="none",
                                  max_restarts=1)
        print("VALUE", value, "NEW GROUPS", len(ray.util.placement_group_table()) - before)
    """)
    assert result.status == "ok", result.traceback
    assert "VALUE 1 NEW GROUPS 2" in result.stdout, result.text
    assert "rank 1 failed (RuntimeError: first attempt fails); restart 1 of 1" in result.stderr
    assert_nothing_left(kernel, pids_in(result.stdout))


# ----------------------------------------------------------------- last: it takes a node away
def test_a_node_removed_mid_run_is_reported_within_ten_seconds(kernel, cluster):
    """Last in the module: it takes the second node away."""
    msg_id = kernel.submit(textwrap.dedent("""
        def long_job():
            print("PID", os.getpid(), "NODE", os.environ["NOTEBOOK_LAUNCHER_NODE_ADDRESS"], "READY", flush=True)
            for step in range(600):
                t = torch.ones(1)
                dist.all_reduce(t)
                time.sleep(0.1)
        started = time.monotonic()
        try:
            notebook_launcher(long_job, num_processes=1, num_nodes=2, cluster="ray", display="none")
        except WorkerError as err:
            print("ERR", str(err).splitlines()[0])
            print("LOST", err.rank, sorted(err.details))
    """))
    out = kernel.wait_for_output(msg_id, r"(PID \d+ NODE \S+ READY[\s\S]*){2}", timeout=180)
    removed = time.monotonic()
    cluster.remove_worker()
    result = kernel.wait_for_output(msg_id, r"LOST \d+", timeout=60)
    assert time.monotonic() - removed < 10.0, "the lost node was reported too late"
    assert re.search(r"ERR rank \d on node \d \(.+\) failed: lost with its node: its agent (stopped answering|died)",
                     result), result
    kernel.run("1", timeout=60)
    assert_nothing_left(kernel, pids_in(out))


def test_a_session_that_loses_a_node_is_broken_and_says_so(kernel, cluster):
    """After the node-removal test: a node again, a session on both, the node removed mid-cell."""
    cluster.add_worker()
    started = cell(kernel, "%dist start -n 1 --nodes 2 --cluster ray --display none")
    assert started.status == "ok", started.traceback
    try:
        msg_id = kernel.submit("%%dist\nimport os, time\nprint('PID', os.getpid(), 'READY', flush=True)\n"
                               "for _ in range(600):\n    dist.all_reduce(torch.ones(1))\n    time.sleep(0.1)")
        out = kernel.wait_for_output(msg_id, r"(PID \d+ READY[\s\S]*){2}", timeout=120)
        removed = time.monotonic()
        cluster.remove_worker()
        with pytest.raises(TimeoutError, match="the cell ended"):
            kernel.wait_for_output(msg_id, r"NEVER PRINTED", timeout=60)
        ended_in = time.monotonic() - removed
        status = cell(kernel, "%dist status")
    finally:
        cell(kernel, "%dist stop")
    assert ended_in < 10.0, "the lost node was reported too late"
    assert "broken because rank" in status.stdout, status.text
    assert_nothing_left(kernel, pids_in(out))
