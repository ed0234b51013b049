"""`python -m notebook_launcher env | test | demo`, run as the user runs them: subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from notebook_launcher.diagnostics import widget_support

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the command line from a neutral directory, so the installed package is what runs."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.run([sys.executable, "-m", "notebook_launcher", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.dirname(REPO), env=full_env)


def test_env_reports_the_machine_without_initializing_cuda():
    out = cli("env")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    import torch

    assert f"torch:" in text and torch.__version__ in text
    for key in ("NCCL:", "GPUs:", "peer-to-peer:", "running in:", "widgets dashboard:", "CUDA initialized here: no",
                "notebook_launcher(fn): starts"):
        assert key in text, f"{key!r} missing from:\n{text}"
    from notebook_launcher import environment

    gpus = environment.cuda_device_count()
    assert f"GPUs:" in text and f"{gpus} visible to torch" in text
    if gpus == 0:
        assert "starts 2 CPU processes (gloo, fork)" in text


def test_env_json_is_complete_and_detects_kaggle():
    out = cli("env", "--json", env={"KAGGLE_KERNEL_RUN_TYPE": "Interactive"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["platform"] == "kaggle"
    assert report["cuda_initialized"] is False
    assert report["gloo"] is True
    assert report["widgets"]["ipywidgets"] is not None and report["widgets"]["ok"] is True
    assert any("Kaggle" in hint for hint in report["hints"])
    assert report["gpus"]["source"] in ("nvml", "nvidia-smi", "none")


def test_env_detects_colab():
    out = cli("env", env={"COLAB_RELEASE_TAG": "release-colab-test"})
    assert out.returncode == 0, out.stderr
    assert "running in:" in out.stdout and "colab" in out.stdout
    assert "hint: Colab" in out.stdout


def test_test_command_passes_with_a_real_two_process_launch():
    out = cli("test", "-n", "2", "--device", "cpu")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("rank 0 (cpu, gloo): ok") for line in lines), out.stdout
    assert any(line.startswith("rank 1 (cpu, gloo): ok") for line in lines), out.stdout
    assert lines[-1].startswith("PASS: 2 processes (gloo)"), out.stdout


def test_test_command_fails_with_exit_status_1_when_the_process_group_cannot_form():
    # gloo cannot bind to a network interface that does not exist: a real failure, on every rank
    out = cli("test", "-n", "2", "--device", "cpu", env={"GLOO_SOCKET_IFNAME": "nosuchif0"})
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("accelerate config: "), out.stdout   # the config in effect comes first
    assert lines[1].startswith("FAIL: rank "), out.stdout
    assert "nosuchif0" in out.stdout


def test_test_command_cannot_ask_for_gpus_that_are_not_there():
    from notebook_launcher import environment

    if environment.cuda_device_count() > 0:
        pytest.skip("this machine has a GPU")
    out = cli("test", "--device", "cuda")
    assert out.returncode == 1
    assert "FAIL: cannot launch" in out.stdout and "no CUDA GPU" in out.stdout


def test_demo_trains_on_the_digits_with_the_text_dashboard():
    out = cli("demo", "--epochs", "3", env={"CUDA_VISIBLE_DEVICES": ""})   # the README's CPU job
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Launching on 2 CPU processes" in out.stdout
    assert "[rank0]: epoch 3/3" in out.stdout
    result_line = [line for line in out.stdout.splitlines() if line.startswith("result from rank 0:")]
    assert result_line, out.stdout
    accuracy = float(result_line[0].split("'test_accuracy': ")[1].split(",")[0])
    assert accuracy > 0.8


# ----------------------------------------------------------------- pure helpers
def test_widget_verdicts(monkeypatch):
    from notebook_launcher import diagnostics

    def versions(table):
        monkeypatch.setattr(diagnostics, "_version", lambda name: table.get(name))

    versions({"ipywidgets": "8.1.5", "jupyterlab_widgets": "3.0.13", "matplotlib": "3.9"})
    assert widget_support("jupyter").ok
    versions({"ipywidgets": "8.1.5", "jupyterlab_widgets": "1.1.1", "matplotlib": "3.9"})
    support = widget_support("jupyter")
    assert not support.ok and "mismatch" in support.verdict
    versions({"ipywidgets": "8.1.5", "matplotlib": "3.9"})
    assert not widget_support("jupyter").ok
    versions({"matplotlib": "3.9"})
    assert "not installed" in widget_support("python").verdict
    versions({"ipywidgets": "7.7.1"})
    support = widget_support("colab")
    assert support.ok and "colab" in support.verdict and "no matplotlib" in support.verdict
