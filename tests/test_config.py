"""Bad input is refused with a message that says what to do, before any process starts."""

from __future__ import annotations

import socket

import psutil
import pytest
import torch.distributed as dist

from notebook_launcher import LaunchConfigError, notebook_launcher
from notebook_launcher import config as cfg
from notebook_launcher.environment import Environment


def work(x=1):
    return x


def children() -> list:
    return psutil.Process().children(recursive=True)


@pytest.mark.parametrize("call, message", [
    (lambda: notebook_launcher(42), "function must be callable"),
    (lambda: notebook_launcher(work, args=5), "args must be a tuple or list"),
    (lambda: notebook_launcher(work, args="ab"), "For one argument write args=(value,)"),
    (lambda: notebook_launcher(work, kwargs=[1]), "kwargs must be a dict"),
    (lambda: notebook_launcher(work, num_processes=0), "num_processes must be at least 1"),
    (lambda: notebook_launcher(work, num_processes=-2), "num_processes must be at least 1"),
    (lambda: notebook_launcher(work, num_processes="two"), "num_processes must be a whole number"),
    (lambda: notebook_launcher(work, mixed_precision="fp12"), "unknown mixed_precision='fp12': choose one of 'no', 'fp16', 'bf16'"),
    (lambda: notebook_launcher(work, start_method="forkserver"), "unknown start_method='forkserver'"),
    (lambda: notebook_launcher(work, display="fancy"), "unknown display='fancy'"),
    (lambda: notebook_launcher(work, node_rank=2, num_nodes=2, use_port=29999), "node_rank=2 must be between 0 and num_nodes-1=1"),
    (lambda: notebook_launcher(work, num_nodes=2), "needs a fixed rendezvous port"),
    (lambda: notebook_launcher(work, use_port=70000), "use_port must be between 1 and 65535"),
    (lambda: notebook_launcher(work, max_restarts=-1), "max_restarts must be 0 or more"),
    (lambda: notebook_launcher(work, device="cuda"), "no CUDA GPU is visible"),
    (lambda: notebook_launcher(work, backend="nccl"), "backend='nccl' needs CUDA GPUs"),
    (lambda: notebook_launcher(work, monitor_interval="often"), "monitor_interval must be a number"),
])
def test_bad_input_is_refused_before_any_process_starts(call, message):
    before = children()
    with pytest.raises(LaunchConfigError) as info:
        call()
    assert message in str(info.value)
    assert children() == before


def test_arguments_that_cannot_reach_spawned_workers_are_named():
    gen = (i for i in range(3))
    with pytest.raises(LaunchConfigError) as info:
        notebook_launcher(work, args=(1, gen), start_method="spawn")
    assert "args[1] (generator) cannot be sent to spawned workers" in str(info.value)
    with pytest.raises(LaunchConfigError) as info:
        notebook_launcher(work, kwargs={"stream": (c for c in "ab")}, start_method="spawn")
    assert "kwargs['stream'] (generator) cannot be sent" in str(info.value)


def test_more_processes_than_gpus_says_how_many_gpus():
    env = Environment(gpu_count=2, cuda_initialized=False, platform="python", cpu_count=8)
    with pytest.raises(LaunchConfigError) as info:
        cfg._nproc(3, "cuda", env)
    assert "this machine has 2 visible GPUs" in str(info.value)
    assert cfg._nproc(None, "cuda", env) == 2
    assert cfg._nproc(None, "cpu", Environment(0, False, "python", 8)) == 2


def test_cuda_initialized_in_the_kernel_switches_to_spawn_and_says_why():
    busy = Environment(gpu_count=2, cuda_initialized=True, platform="jupyter", cpu_count=8)
    method, reason = cfg._start_method("auto", busy, "cuda")
    assert method == "spawn" and "CUDA is already initialized" in reason
    with pytest.raises(LaunchConfigError, match="start_method='spawn'"):
        cfg._start_method("fork", busy, "cuda")
    fresh = Environment(gpu_count=2, cuda_initialized=False, platform="jupyter", cpu_count=8)
    assert cfg._start_method("auto", fresh, "cuda") == ("fork", "")


def test_a_port_in_use_is_a_clear_error():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        with pytest.raises(LaunchConfigError, match=f"use_port={port} is not available"):
            notebook_launcher(work, use_port=port, display="none")
    finally:
        holder.close()
    assert children() == []


def port_of_this_run():
    import os

    return int(os.environ["MASTER_PORT"])


def listening_here(port: int) -> bool:
    """Whether this process (the store's owner) still listens on ``port``. Asked of the
    process itself: a probe that binds the port would fail whenever another program took
    the freed port meanwhile, which says nothing about us."""
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in psutil.Process().net_connections("tcp"))


def test_the_store_port_is_released_after_the_run():
    for _ in range(3):
        port = notebook_launcher(port_of_this_run, num_processes=2, display="none")
        assert not listening_here(port), "the store still listens after the run"
        # and a user-chosen port can be reused by the very next launch
        try:
            assert notebook_launcher(port_of_this_run, num_processes=1, use_port=port, display="none") == port
            return
        except LaunchConfigError:
            assert not listening_here(port)   # another program took the freed port: try another run's
    pytest.fail("three freed ports were taken by other programs before they could be reused")


def test_calling_the_launcher_from_inside_a_worker_is_refused():
    def nested():
        try:
            notebook_launcher(work, num_processes=1)
        except LaunchConfigError as exc:
            return str(exc)
        return "no error"

    message = notebook_launcher(nested, num_processes=1, display="none")
    assert "called from inside a launched worker" in message


def test_bf16_is_refused_on_gpus_without_it():
    from notebook_launcher.environment import GpuInfo

    t4s = Environment(gpu_count=2, cuda_initialized=False, platform="kaggle", cpu_count=4,
                      gpus=(GpuInfo("Tesla T4", 7.5), GpuInfo("Tesla T4", 7.5)))
    with pytest.raises(LaunchConfigError, match=r"Tesla T4 \(compute capability 7.5\).*mixed_precision='fp16'"):
        cfg._check_bf16(t4s)
    cfg._check_bf16(Environment(1, False, "python", 8, gpus=(GpuInfo("NVIDIA H100", 9.0),)))


def test_gpus_without_peer_to_peer_get_nccl_p2p_disabled(monkeypatch):
    from notebook_launcher import environment

    monkeypatch.setattr(environment, "p2p_supported", lambda: False)
    monkeypatch.delenv("NCCL_P2P_DISABLE", raising=False)
    monkeypatch.delenv("NCCL_IB_DISABLE", raising=False)
    env = Environment(gpu_count=2, cuda_initialized=False, platform="kaggle", cpu_count=4)
    extra, notes = cfg._gpu_quirks(env, "cuda", 2, "fork")
    assert extra == {"NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1"} and "peer-to-peer" in notes[0]
    monkeypatch.setenv("NCCL_P2P_DISABLE", "0")  # the person's own choice wins
    assert cfg._gpu_quirks(env, "cuda", 2, "fork")[0] == {"NCCL_IB_DISABLE": "1"}
    monkeypatch.setattr(environment, "p2p_supported", lambda: True)
    assert cfg._gpu_quirks(env, "cuda", 2, "fork") == ({}, [])
    assert cfg._gpu_quirks(env, "cpu", 2, "fork") == ({}, [])


def test_p2p_matrix_from_nvidia_smi():
    from notebook_launcher.environment import parse_p2p_matrix

    matrix = "        GPU0    GPU1\n GPU0   X       {v}\n GPU1   {v}      X\n\nLegend:\n  NS   = Not supported\n"
    assert parse_p2p_matrix(matrix.format(v="NS")) is False
    assert parse_p2p_matrix(matrix.format(v="OK")) is True
    assert parse_p2p_matrix("") is None


def test_rdzv_endpoint_gives_the_store_address():
    assert cfg.endpoint("10.0.0.5:29400", "127.0.0.1", None) == ("10.0.0.5", 29400)
    assert cfg.endpoint("[::1]:29400", "127.0.0.1", None) == ("::1", 29400)
    assert cfg.endpoint("", "127.0.0.1", 1234) == ("127.0.0.1", 1234)
    with pytest.raises(LaunchConfigError, match="host:port"):
        cfg.endpoint("nohost", "127.0.0.1", None)
