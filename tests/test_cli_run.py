"""`python -m notebook_launcher run ...` from a real shell: scripts, functions, modules,
failures, Ctrl-C, and accelerate config files (ours and HF accelerate's own)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


def run_cli(*args: str, cwd, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The command line as a user types it, in ``cwd``, HF_HOME in ``cwd`` unless ``env`` says."""
    full_env = {**os.environ, "HF_HOME": str(cwd / "hf_home"), **(env or {})}
    full_env.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.run([sys.executable, "-m", "notebook_launcher", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=full_env)


def write(path, source: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def rank_records(stdout: str, marker: str = "RECORD ") -> dict:
    """{rank: record} from lines ``[rankN]: RECORD {json}`` the scripts print."""
    records = {}
    for line in stdout.splitlines():
        head, sep, payload = line.partition(marker)
        if sep and head.startswith("[rank"):
            record = json.loads(payload)
            records[record["rank"]] = record
    return records


ARGPARSE_SCRIPT = """
    import argparse, json, os, sys
    import torch, torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("name")
    args = parser.parse_args()
    dist.init_process_group(backend="gloo")   # as under torchrun: from the environment's contract
    total = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(total)
    env = {key: os.environ.get(key) for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    print("RECORD " + json.dumps({"rank": dist.get_rank(), "name": __name__, "argv": sys.argv[1:],
                                  "lr": args.lr, "epochs": args.epochs, "label": args.name,
                                  "total": total.item(), "env": env}))
    dist.destroy_process_group()
"""


def test_a_script_with_argparse_arguments_runs_as_main_on_two_cpu_workers(tmp_path):
    script = write(tmp_path / "train.py", ARGPARSE_SCRIPT)
    # accelerate launch's own spelling, dashes included, then the script's arguments
    out = run_cli("run", "--cpu", "--num-processes", "2", str(script), "--lr", "0.5", "digits", "--epochs", "3",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    records = rank_records(out.stdout)
    assert sorted(records) == [0, 1], out.stdout
    for rank, record in records.items():
        assert record["name"] == "__main__"
        assert record["argv"] == ["--lr", "0.5", "digits", "--epochs", "3"]
        assert (record["lr"], record["epochs"], record["label"]) == (0.5, 3, "digits")
        assert record["total"] == 3.0                       # a real all_reduce over both ranks
        env = record["env"]
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == (str(rank), str(rank), "2")
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"].isdigit()


def test_a_function_in_a_file_is_called_and_rank_0s_value_printed(tmp_path):
    write(tmp_path / "jobs" / "reduce.py", """
        from dataclasses import dataclass
        import torch, torch.distributed as dist

        @dataclass
        class Result:
            world_size: int
            total: float

        def main():
            total = torch.ones(1) * (dist.get_rank() + 1)
            dist.all_reduce(total)
            return Result(dist.get_world_size(), total.item())

        if __name__ == "__main__":
            raise SystemExit("the file is imported, not run as a script")
    """)
    out = run_cli("run", "--cpu", "--num_processes", "2", "--display", "none", "jobs/reduce.py:main", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    # the value's class lives in the file: the command line can still show it
    assert out.stdout.splitlines()[-1] == "Result(world_size=2, total=3.0)", out.stdout


def test_a_module_runs_like_python_m_in_spawned_workers(tmp_path):
    write(tmp_path / "mypkg" / "__init__.py", "")
    write(tmp_path / "mypkg" / "train.py", """
        import json, sys
        import torch.distributed as dist
        from mypkg import helpers

        if __name__ == "__main__":
            print("RECORD " + json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(),
                                          "argv": sys.argv[1:], "helper": helpers.answer()}))
    """)
    write(tmp_path / "mypkg" / "helpers.py", "def answer():\n    return 42\n")
    out = run_cli("run", "--cpu", "--num_processes", "2", "--start_method", "spawn", "-m", "mypkg.train",
                  "--steps", "3", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "spawn" in out.stdout   # the banner: workers really were spawned (the task went with dill)
    records = rank_records(out.stdout)
    assert sorted(records) == [0, 1], out.stdout
    assert all(r["world"] == 2 and r["argv"] == ["--steps", "3"] and r["helper"] == 42 for r in records.values())


def test_a_failing_rank_sets_the_exit_status_and_is_named_on_stderr(tmp_path):
    script = write(tmp_path / "fails.py", """
        import sys
        import torch.distributed as dist

        if dist.get_rank() == 1:
            sys.exit(3)
        dist.barrier()
    """)
    out = run_cli("run", "--cpu", "--num_processes", "2", str(script), cwd=tmp_path)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "rank 1 failed" in out.stderr and "SystemExit: 3" in out.stderr, out.stderr
    assert "rank 0 failed" not in out.stderr   # rank 0 only lost its peer
    # the traceback starts at the script, as `python fails.py` shows it: no frame of ours first
    assert f'Traceback (most recent call last):\n  File "{script}", line 6, in <module>' in out.stderr, out.stderr
    assert "runpy" not in out.stderr


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("start_method", ["fork", "spawn"])   # spawn: multiprocess's helpers share the group
def test_ctrl_c_stops_every_worker_within_2_seconds_and_exits_130(tmp_path, start_method):
    write(tmp_path / "sleeper.py", """
        import os, sys, time
        import torch.distributed as dist

        with open(os.path.join(sys.argv[1], f"pid{dist.get_rank()}"), "w") as file:
            file.write(str(os.getpid()))
        while True:
            time.sleep(0.1)
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}
    command = [sys.executable, "-m", "notebook_launcher", "run", "--cpu", "--num_processes", "2", "--start_method",
               start_method, "sleeper.py", str(tmp_path)]
    # As from a shell: the command leads its own process group, the terminal's foreground
    # group, and Ctrl-C sends SIGINT to that whole group (not to one PID).
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        pid_files = [tmp_path / "pid0", tmp_path / "pid1"]
        deadline = time.monotonic() + 90
        while not all(f.exists() and f.read_text() for f in pid_files):
            assert proc.poll() is None and time.monotonic() < deadline, "the workers never started"
            time.sleep(0.05)
        pids = [int(f.read_text()) for f in pid_files]
        assert all(psutil.pid_exists(pid) for pid in pids)
        os.killpg(proc.pid, signal.SIGINT)                  # Ctrl-C
        pressed = time.monotonic()
        while not all(_gone(pid) for pid in pids) and time.monotonic() - pressed < 5:
            time.sleep(0.01)
        stopped_after = time.monotonic() - pressed
        assert all(_gone(pid) for pid in pids), "a worker outlived Ctrl-C"
        assert stopped_after < 2.0, f"workers took {stopped_after:.2f} s to go"
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert f"(gloo, {start_method})" in stdout, stdout


# ----------------------------------------------------------------- accelerate's config and Accelerator
ACCELERATE_SCRIPT = """
    # written for `accelerate launch`: nothing here knows about notebook_launcher
    import json
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator()
    ranks = accelerator.gather(torch.tensor([accelerator.process_index]))
    print("RECORD " + json.dumps({"rank": accelerator.process_index, "world": accelerator.num_processes,
                                  "ranks": ranks.tolist(), "mixed_precision": accelerator.mixed_precision,
                                  "device": accelerator.device.type,
                                  "distributed_type": str(accelerator.distributed_type)}))
"""


def test_our_config_file_is_honoured_by_run_and_an_accelerate_script_runs_unchanged(tmp_path):
    wrote = run_cli("config", "--num_processes", "2", "--mixed_precision", "bf16", "--cpu", cwd=tmp_path)
    assert wrote.returncode == 0, wrote.stderr
    default_file = tmp_path / "hf_home" / "accelerate" / "default_config.yaml"
    assert default_file.is_file() and str(default_file) in wrote.stdout

    from accelerate.commands.config.config_args import load_config_from_file

    theirs = load_config_from_file(str(default_file))   # HF accelerate reads our file too
    assert (theirs.num_processes, theirs.mixed_precision, theirs.use_cpu) == (2, "bf16", True)

    script = write(tmp_path / "accelerate_script.py", ACCELERATE_SCRIPT)
    out = run_cli("run", str(script), cwd=tmp_path)        # no flags: everything from the file
    assert out.returncode == 0, out.stdout + out.stderr
    records = rank_records(out.stdout)
    assert sorted(records) == [0, 1], out.stdout
    for record in records.values():
        assert record["world"] == 2 and record["ranks"] == [0, 1]
        assert record["mixed_precision"] == "bf16" and record["device"] == "cpu"
        assert record["distributed_type"].endswith("MULTI_CPU")


def test_a_config_from_hf_write_basic_config_is_honoured_and_flags_override_it(tmp_path):
    from accelerate.utils import write_basic_config

    default_file = tmp_path / "hf_home" / "accelerate" / "default_config.yaml"
    write_basic_config(mixed_precision="fp16", save_location=str(default_file))
    script = write(tmp_path / "accelerate_script.py", ACCELERATE_SCRIPT)
    out = run_cli("run", "--cpu", "--num_processes", "2", str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    records = rank_records(out.stdout)
    assert sorted(records) == [0, 1], out.stdout          # the flag, over the file's num_processes
    assert all(r["mixed_precision"] == "fp16" for r in records.values())   # from HF's file


# ----------------------------------------------------------------- accelerate launch's flags, each with its meaning
def test_the_mixed_precision_flag_reaches_the_workers_over_the_file(tmp_path):
    from accelerate.utils import write_basic_config

    write_basic_config(mixed_precision="fp16", save_location=str(tmp_path / "hf_home" / "accelerate" /
                                                                 "default_config.yaml"))
    script = write(tmp_path / "accelerate_script.py", ACCELERATE_SCRIPT)
    out = run_cli("run", "--cpu", "--num_processes", "2", "--mixed_precision", "bf16", str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    records = rank_records(out.stdout)
    assert sorted(records) == [0, 1], out.stdout
    assert all(r["mixed_precision"] == "bf16" for r in records.values())   # the flag, not the file's fp16
    assert "(gloo, fork, bf16)" in out.stdout                              # and the banner says so


RESTARTS_SCRIPT = """
    import json, os, sys
    import torch.distributed as dist

    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if attempt == 0 and dist.get_rank() == 1:
        sys.exit(3)                        # the first attempt fails
    dist.barrier()
    print("RECORD " + json.dumps({"rank": dist.get_rank(), "attempt": attempt,
                                  "max_restarts": os.environ["TORCHELASTIC_MAX_RESTARTS"]}))
"""


def test_max_restarts_starts_every_worker_again_after_a_failure(tmp_path):
    script = write(tmp_path / "flaky.py", RESTARTS_SCRIPT)
    out = run_cli("run", "--cpu", "--num_processes", "2", "--max_restarts", "1", str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "restart 1 of 1" in out.stderr, out.stderr
    records = rank_records(out.stdout)
    assert sorted(records) == [0, 1] and all(r == {"rank": r["rank"], "attempt": 1, "max_restarts": "1"}
                                             for r in records.values()), out.stdout
    # without the flag the first failure is the end
    once = run_cli("run", "--cpu", "--num_processes", "2", str(script), cwd=tmp_path)
    assert once.returncode == 3 and "restart 1 of" not in once.stderr, once.stdout + once.stderr


def test_a_rank_that_raises_gives_exit_status_1_and_its_traceback(tmp_path):
    script = write(tmp_path / "raises.py", """
        import torch.distributed as dist

        if dist.get_rank() == 1:
            raise ValueError("bad batch on rank 1")
        dist.barrier()
    """)
    out = run_cli("run", "--cpu", "--num_processes", "2", str(script), cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "rank 1 failed: ValueError: bad batch on rank 1" in out.stderr, out.stderr
    assert f'File "{script}", line 5, in <module>' in out.stderr and "rank 0 failed" not in out.stderr


MACHINE_SCRIPT = """
    import json, os
    import torch, torch.distributed as dist

    total = torch.ones(1) * dist.get_rank()
    dist.all_reduce(total)                 # over both "machines"
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    print("RECORD " + json.dumps({"rank": dist.get_rank(), "total": total.item(),
                                  "env": {key: os.environ[key] for key in keys}}))
"""


def start_machine(tmp_path, machine_rank: int, port: int) -> subprocess.Popen:
    """One machine of two, as `accelerate launch` is run on each: 4 processes in all.
    127.0.0.2 is this host too (all of 127/8 is loopback), and not the default address."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}
    command = [sys.executable, "-m", "notebook_launcher", "run", "--cpu", "--num_processes", "4",
               "--num_machines", "2", "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.2",
               "--main_process_port", str(port), "machine.py"]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple:
    """(exit status, stdout, stderr); the process is killed if it outlives ``timeout``."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def a_free_port() -> int:
    """A port nobody listened on a moment ago (it may be taken by the time it is used)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_multi_machine_flags_make_one_job_over_two_launches(tmp_path):
    write(tmp_path / "machine.py", MACHINE_SCRIPT)
    for _ in range(3):   # the port must be fixed: another one when a stranger took it first
        port = a_free_port()
        first = start_machine(tmp_path, 0, port)
        time.sleep(0.5)
        second = start_machine(tmp_path, 1, port)
        code0, out0, err0 = finish(first)
        taken = f"use_port={port} is not available" in err0
        code1, out1, err1 = finish(second, timeout=1 if taken else 120)   # it cannot join a stranger
        if not taken:
            break
    assert code0 == 0 and code1 == 0, err0 + err1
    records = {**rank_records(out0), **rank_records(out1)}
    assert sorted(rank_records(out0)) == [0, 1] and sorted(rank_records(out1)) == [2, 3], out0 + out1
    for rank, record in records.items():
        assert record["total"] == 6.0                     # 0 + 1 + 2 + 3: one job
        assert record["env"] == {"RANK": str(rank), "LOCAL_RANK": str(rank % 2), "WORLD_SIZE": "4",
                                 "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": str(rank // 2),
                                 "MASTER_ADDR": "127.0.0.2", "MASTER_PORT": str(port)}
    assert "2 CPU processes on node 1 of 2" in out1


STALL_SCRIPT = """
    import sys, time

    time.sleep(float(sys.argv[1]))         # every rank quiet: no output, no report, no CPU
"""


def test_stall_timeout_and_on_stall_raise_stop_a_quiet_rank(tmp_path):
    script = write(tmp_path / "quiet.py", STALL_SCRIPT)
    started = time.monotonic()
    out = run_cli("run", "--cpu", "--num_processes", "2", "--stall_timeout", "1.5", "--on_stall", "raise",
                  str(script), "60", cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"rank [01] failed: no progress for 1.5s \(stall_timeout\)", out.stderr), out.stderr
    assert time.monotonic() - started < 45                 # not the script's 60 s


def test_stall_timeout_warns_by_default_and_0_turns_it_off(tmp_path):
    script = write(tmp_path / "quiet.py", STALL_SCRIPT)
    warned = run_cli("run", "--cpu", "--num_processes", "2", "--stall_timeout", "1.5", str(script), "4",
                     cwd=tmp_path)
    assert warned.returncode == 0, warned.stdout + warned.stderr       # on_stall=warn: the run goes on
    assert "no progress for 1.5s (stall_timeout)" in warned.stdout + warned.stderr
    off = run_cli("run", "--cpu", "--num_processes", "2", "--stall_timeout", "0", "--on_stall", "raise",
                  str(script), "4", cwd=tmp_path)
    assert off.returncode == 0, off.stdout + off.stderr                # 0 is "never", not "at once"
    assert "no progress" not in off.stdout + off.stderr


def test_stall_timeout_0_is_no_stall_detection_at_all():
    """What the launch is given (0 would be refused by notebook_launcher; 300 would only
    be slower): None, which turns the stall watch off."""
    from notebook_launcher import cli

    def options(*flags):
        args, _ = cli._parser().parse_known_args(["run", *flags, "train.py"])
        return cli._launcher_options(args)

    assert options("--stall_timeout", "0")["stall_timeout"] is None
    given = options("--stall-timeout", "2.5", "--on_stall", "raise")
    assert (given["stall_timeout"], given["on_stall"]) == (2.5, "raise")
    assert "stall_timeout" not in options()                       # notebook_launcher's default (300 s) applies


GPU_SCRIPT = """
    import json, os
    import torch, torch.distributed as dist

    print("RECORD " + json.dumps({"rank": dist.get_rank(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                  "cuda": torch.cuda.is_available(), "backend": dist.get_backend()}))
"""
NO_GPU_HERE = not (os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi"))


@pytest.mark.skipif(not NO_GPU_HERE, reason="what --gpu_ids does where there are no GPUs (it picks GPUs where there are)")
def test_gpu_ids_on_a_machine_without_gpus(tmp_path):
    script = write(tmp_path / "gpus.py", GPU_SCRIPT)
    # As accelerate launch does: CUDA_VISIBLE_DEVICES for the workers; with no GPU there the
    # launch says it runs CPU processes, and runs them.
    out = run_cli("run", "--num_processes", "2", "--gpu_ids", "0,1", str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Launching on 2 CPU processes (gloo, fork)" in out.stdout
    assert "--gpu_ids 0,1 given, but no GPU is visible here: the workers run on the CPU." in out.stderr
    records = rank_records(out.stdout)
    assert sorted(records) == [0, 1] and all(r["visible"] == "0,1" and r["backend"] == "gloo" and not r["cuda"]
                                             for r in records.values()), out.stdout
    # asking for GPU workers on those ids is refused before anything starts, saying why
    refused = run_cli("run", "--multi_gpu", "--gpu_ids", "0", str(script), cwd=tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "no CUDA GPU is visible" in refused.stderr and "RECORD" not in refused.stdout
