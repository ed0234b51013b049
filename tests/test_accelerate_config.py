"""HF accelerate's config file: what we read, what we refuse (by name), what we write,
where the file is, and the `config`, `config show` and `env` commands."""

from __future__ import annotations

import json

import pytest
import yaml

from notebook_launcher import cli
from notebook_launcher.accelerate_config import (AccelerateConfigError, AccelerateSettings, default_config_file,
                                                 launch_arguments, load, parse, unsupported_option)
from test_cli_run import run_cli, write

# What `accelerate config` writes for 2 machines x 4 GPUs, "not used" keys included.
INTERACTIVE_MULTI_GPU = """
compute_environment: LOCAL_MACHINE
debug: false
distributed_type: MULTI_GPU
downcast_bf16: 'no'
enable_cpu_affinity: false
gpu_ids: all
machine_rank: 1
main_process_ip: 10.0.0.5
main_process_port: 29500
main_training_function: main
mixed_precision: fp16
num_machines: 2
num_processes: 8
rdzv_backend: static
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: false
"""


def test_an_interactive_accelerate_config_means_what_accelerate_launch_makes_of_it(tmp_path):
    path = tmp_path / "multi.yaml"
    path.write_text(INTERACTIVE_MULTI_GPU)
    kwargs, env = launch_arguments(load(str(path)))
    assert kwargs == {"num_nodes": 2, "node_rank": 1, "device": "cuda", "mixed_precision": "fp16",
                      "num_processes": 4,            # accelerate counts both machines' processes
                      "master_addr": "10.0.0.5", "use_port": 29500, "rdzv_backend": "static"}
    assert env == {}


def test_flags_override_the_file_and_gpu_ids_and_debug_reach_the_workers_environment():
    from_file = parse({"distributed_type": "MULTI_GPU", "num_processes": 4, "gpu_ids": "0,1,2,3",
                       "mixed_precision": "bf16"})
    flags = AccelerateSettings(num_processes=2, gpu_ids="2,3", use_cpu=None, debug=True)
    kwargs, env = launch_arguments(from_file.overridden_by(flags))
    assert (kwargs["num_processes"], kwargs["mixed_precision"], kwargs["device"]) == (2, "bf16", "cuda")
    assert env == {"CUDA_VISIBLE_DEVICES": "2,3", "ACCELERATE_DEBUG_MODE": "true"}


def test_yaml_spellings_older_files_and_cpu_configs_are_read():
    assert parse({"mixed_precision": False}).mixed_precision == "no"     # an unquoted `no`
    assert parse({"fp16": True, "distributed_type": "NO"}).mixed_precision == "fp16"   # accelerate < 0.15
    assert parse({"gpu_ids": 0}).gpu_ids == "0"
    assert parse({"num_processes": -1}).num_processes is None             # accelerate's "not set"
    kwargs, _ = launch_arguments(parse({"distributed_type": "MULTI_CPU", "num_processes": 2}))
    assert kwargs["device"] == "cpu" and kwargs["num_processes"] == 2


def test_num_processes_must_split_evenly_over_the_machines():
    with pytest.raises(AccelerateConfigError, match="multiple of num_machines=2"):
        launch_arguments(parse({"num_processes": 7, "num_machines": 2}))


@pytest.mark.parametrize("key, value, named", [
    ("distributed_type", "DEEPSPEED", "DeepSpeed"),
    ("deepspeed_config", {"zero_stage": 2}, "DeepSpeed"),
    ("fsdp_config", {"fsdp_sharding_strategy": "FULL_SHARD"}, "FSDP"),
    ("distributed_type", "XLA", "TPU"),
    ("tpu_use_cluster", True, "TPU"),
    ("megatron_lm_config", {"megatron_lm_tp_degree": 2}, "Megatron-LM"),
    ("mixed_precision", "fp8", "FP8"),
    ("compute_environment", "AMAZON_SAGEMAKER", "SageMaker"),
    ("dynamo_config", {"dynamo_backend": "INDUCTOR"}, "torch.compile"),
])
def test_keys_we_cannot_honour_are_refused_by_name(key, value, named):
    with pytest.raises(AccelerateConfigError) as caught:
        parse({"distributed_type": "MULTI_GPU", key: value}, "cfg.yaml")
    message = str(caught.value)
    assert f"`{key}: " in message and named in message and "accelerate launch" in message
    assert message.startswith("cfg.yaml: ")


def test_an_unknown_key_or_a_bad_value_is_refused_by_name():
    with pytest.raises(AccelerateConfigError, match="unknown key `num_proceses`"):
        parse({"num_proceses": 2})
    with pytest.raises(AccelerateConfigError, match="`num_processes` must be a whole number"):
        parse({"num_processes": "two"})


def test_accelerate_launch_options_we_do_not_take_are_named():
    assert "FSDP is not supported" in unsupported_option("--use_fsdp")
    assert "DeepSpeed is not supported" in unsupported_option("--zero-stage=2")
    assert "TPU is not supported" in unsupported_option("--tpu")
    assert unsupported_option("--bogus").startswith("unknown option --bogus")


def test_the_default_file_is_where_accelerate_looks(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_config_file() == str(tmp_path / "cache" / "huggingface" / "accelerate" / "default_config.yaml")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "hf" / "accelerate"
    assert default_config_file() == str(folder / "default_config.yaml")
    write(folder / "default_config.json", "{}")         # what accelerate before 1.0 wrote
    assert default_config_file() == str(folder / "default_config.json")
    write(folder / "default_config.yaml", "{}")
    assert default_config_file() == str(folder / "default_config.yaml")


# ----------------------------------------------------------------- the commands
def test_config_writes_a_file_show_prints_it_and_an_existing_one_is_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cli.main(["config", "--num-processes", "3", "--mixed_precision", "bf16", "--cpu"]) == 0
    path = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    written = yaml.safe_load(path.read_text())
    assert written["num_processes"] == 3 and written["mixed_precision"] == "bf16" and written["use_cpu"] is True
    assert written["distributed_type"] == "MULTI_CPU"
    capsys.readouterr()
    assert cli.main(["config", "show"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"# accelerate config in effect: {path}")
    assert yaml.safe_load(shown)["num_processes"] == 3
    assert cli.main(["config", "--num_processes", "2"]) == 1                # never clobbered silently
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["config", "--num_processes", "2", "--cpu", "--overwrite"]) == 0
    assert yaml.safe_load(path.read_text())["num_processes"] == 2


def test_config_show_without_a_file_says_where_it_would_be(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cli.main(["config", "show"]) == 0
    assert f"accelerate config: none (no file at {tmp_path / 'hf' / 'accelerate' / 'default_config.yaml'})" \
        in capsys.readouterr().out


def test_run_refuses_a_deepspeed_config_by_name_before_any_process_starts(tmp_path):
    config = write(tmp_path / "ds.yaml", """
        compute_environment: LOCAL_MACHINE
        distributed_type: DEEPSPEED
        deepspeed_config:
          zero_stage: 2
        num_processes: 2
    """)
    script = write(tmp_path / "touch.py", "open(__file__ + '.ran', 'w').close()\n")
    out = run_cli("run", "--config_file", str(config), str(script), cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "deepspeed_config" in out.stderr and "DeepSpeed" in out.stderr, out.stderr
    assert not (tmp_path / "touch.py.ran").exists()
    assert "Launching" not in out.stdout


def test_run_refuses_bad_targets_and_options_before_any_process_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "job.py", "import os\n\ndef train():\n    return 1\n")
    cases = {
        ("job.py:trian",): "defines no top-level `trian` (its top-level names: os, train)",
        ("missing.py",): "missing.py: no such file",
        ("-m", "no_such_module_here"): "no module named 'no_such_module_here'",
        ("--use_deepspeed", "job.py"): "--use_deepspeed: DeepSpeed is not supported",
        ("--config_file", "nope.yaml", "job.py"): "--config_file nope.yaml: no such file",
    }
    for args, message in cases.items():
        assert cli.main(["run", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    write(tmp_path / "broken.py", "def f(:\n")
    assert cli.main(["run", "broken.py"]) == 2
    assert "broken.py, line 1: SyntaxError" in capsys.readouterr().err


def test_env_reports_the_config_in_effect(tmp_path):
    write(tmp_path / "hf_home" / "accelerate" / "default_config.yaml",
          "distributed_type: MULTI_CPU\nnum_processes: 2\nmixed_precision: bf16\nuse_cpu: true\n")
    out = run_cli("env", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)["accelerate_config"]
    assert found["file"] == str(tmp_path / "hf_home" / "accelerate" / "default_config.yaml")
    assert found["settings"] == {"distributed_type": "MULTI_CPU", "num_processes": 2, "mixed_precision": "bf16",
                                 "use_cpu": True}
