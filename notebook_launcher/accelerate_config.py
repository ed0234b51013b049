"""HF accelerate's configuration file, read and written, and `accelerate launch`'s meaning.

`accelerate config` writes a YAML file (``$HF_HOME/accelerate/default_config.yaml``) that
`accelerate launch` takes its defaults from; command-line flags override it. We honour
the keys that describe a plain multi-process launch (`FILE_KEYS`), accept the keys that
`accelerate config` writes into every file when they say "not used", and refuse anything
that asks for a feature we do not have (DeepSpeed, FSDP, TPU, Megatron-LM, ...) by name:
silently ignoring it would train something else than the person configured.

`AccelerateSettings` is the plain data both a file and the command line produce;
`launch_arguments` turns it into `notebook_launcher` arguments with accelerate's meaning
(``num_processes`` counts every machine's processes, not one machine's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

from .errors import LaunchConfigError

FILE_KEYS = ("compute_environment", "distributed_type", "mixed_precision", "num_processes", "num_machines",
             "machine_rank", "main_process_ip", "main_process_port", "gpu_ids", "use_cpu", "rdzv_backend",
             "debug", "fp16")   # fp16: true is how older accelerate said mixed_precision: fp16
DISTRIBUTED_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU")
MIXED_PRECISION = ("no", "fp16", "bf16")
RDZV_BACKENDS = ("static", "c10d")

# Keys `accelerate config` writes into every file; accepted while they hold a "not used" value.
_UNUSED_VALUES = {
    "downcast_bf16": ("no", False, None), "enable_cpu_affinity": (False, None),
    "tpu_env": ([], None), "tpu_use_cluster": (False, None), "tpu_use_sudo": (False, None),
    "tpu_name": (None,), "tpu_zone": (None,), "tpu_vm": ([], None), "commands": ([], None),
    "command_file": (None,), "deepspeed_config": ({}, None), "fsdp_config": ({}, None),
    "megatron_lm_config": ({}, None), "mpirun_config": ({}, None), "fp8_config": ({}, None),
    "parallelism_config": ({}, None), "dynamo_config": ({}, None, {"dynamo_backend": "NO"}),
    "dynamo_backend": ("NO", "no", None),
}
# Accepted with any value: they only matter to accelerate's TPU launcher and its multi-node checks.
_NO_EFFECT = ("same_network", "main_training_function")
# What a key, a distributed_type or a flag asks for, by the start of its (lowercase) name.
_FEATURES = (("deepspeed", "DeepSpeed"), ("zero_stage", "DeepSpeed"), ("offload_", "DeepSpeed"),
             ("gradient_", "DeepSpeed"), ("fsdp", "FSDP"), ("megatron", "Megatron-LM"), ("tpu", "TPU"),
             ("no_tpu", "TPU"), ("xla", "TPU"), ("downcast_bf16", "TPU"), ("command", "TPU pods"),
             ("vm", "TPU pods"), ("env", "TPU pods"), ("mpirun", "MPI (mpirun)"), ("fp8", "FP8 training"),
             ("parallelism", "accelerate's parallelism config"), ("dynamo", "torch.compile through accelerate"),
             ("enable_cpu_affinity", "CPU affinity"), ("multi_", "this kind of accelerator"),
             ("amazon_sagemaker", "SageMaker"), ("aws_", "SageMaker"), ("no_python", "a non-Python program"))


class AccelerateConfigError(LaunchConfigError):
    """An accelerate config file we cannot honour; the message names the file and the key."""


@dataclass(frozen=True)
class AccelerateSettings:
    """What an accelerate config file, or `accelerate launch`'s flags, ask for. None: not said."""

    distributed_type: Optional[str] = None
    mixed_precision: Optional[str] = None
    num_processes: Optional[int] = None      # every machine's processes together, as in accelerate
    num_machines: Optional[int] = None
    machine_rank: Optional[int] = None
    main_process_ip: Optional[str] = None
    main_process_port: Optional[int] = None
    gpu_ids: Optional[str] = None            # "all" or "0,1"
    use_cpu: Optional[bool] = None
    rdzv_backend: Optional[str] = None
    debug: Optional[bool] = None
    source: str = ""                         # the file these came from; "" for flags

    def overridden_by(self, other: "AccelerateSettings") -> "AccelerateSettings":
        """These settings with every value ``other`` gives replacing ours (flags over the file).

        Example::

            AccelerateSettings(num_processes=4).overridden_by(AccelerateSettings(num_processes=2))
        """
        given = {f.name: getattr(other, f.name) for f in fields(other)
                 if f.name != "source" and getattr(other, f.name) is not None}
        return replace(self, **given)

    def given(self) -> dict:
        """The values that were said, by key (what `config show` prints)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "source" and getattr(self, f.name) is not None}


# ----------------------------------------------------------------- where the file is
def default_config_file() -> str:
    """The file `accelerate launch` reads when given no ``--config_file``.

    ``$HF_HOME/accelerate/default_config.yaml``, HF_HOME defaulting to
    ``$XDG_CACHE_HOME/huggingface`` (``~/.cache/huggingface``). Older accelerate wrote
    ``default_config.json``, still read when it is the only one.

    Example::

        default_config_file()   # '/root/.cache/huggingface/accelerate/default_config.yaml'
    """
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    folder = os.path.join(os.path.expanduser(home), "accelerate")
    yaml_file, json_file = (os.path.join(folder, f"default_config.{ext}") for ext in ("yaml", "json"))
    return json_file if os.path.isfile(json_file) and not os.path.isfile(yaml_file) else yaml_file


def settings_in_effect(config_file: Optional[str] = None) -> AccelerateSettings:
    """The settings from ``config_file`` (which must exist), else from the default file when it
    exists, else none (an empty `AccelerateSettings`).

    Example::

        settings_in_effect("my_config.yaml").num_processes   # 4
    """
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise AccelerateConfigError(
                f"--config_file {config_file}: no such file. Write one with "
                f"`python -m notebook_launcher config --config_file {config_file}`.")
        return load(config_file)
    default = default_config_file()
    return load(default) if os.path.isfile(default) else AccelerateSettings()


# ----------------------------------------------------------------- reading
def load(path: str) -> AccelerateSettings:
    """Read an accelerate config file (YAML, or the JSON older versions wrote).

    Raises `AccelerateConfigError` naming the key we cannot honour.

    Example::

        load(os.path.expanduser("~/.cache/huggingface/accelerate/default_config.yaml"))
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as file:
            data = yaml.safe_load(file)
    except (OSError, yaml.YAMLError) as exc:
        raise AccelerateConfigError(f"{path}: cannot be read as an accelerate config: {exc}") from None
    return parse(data or {}, path)


def parse(data: Any, path: str = "<config>") -> AccelerateSettings:
    """`AccelerateSettings` from the file's mapping; refuses what we cannot honour."""
    if not isinstance(data, dict):
        raise AccelerateConfigError(f"{path}: expected `key: value` lines, found {type(data).__name__}.")
    for key, value in data.items():
        _check_key(path, str(key), value)
    get = lambda key, kind: _typed(path, key, data.get(key), kind)  # noqa: E731
    num_processes = get("num_processes", int)
    mixed_precision = _mixed_precision(path, data)
    return AccelerateSettings(
        distributed_type=_choice(path, "distributed_type", get("distributed_type", str), DISTRIBUTED_TYPES),
        mixed_precision=mixed_precision,
        num_processes=None if num_processes is not None and num_processes < 0 else num_processes,  # -1: unset
        num_machines=get("num_machines", int), machine_rank=get("machine_rank", int),
        main_process_ip=get("main_process_ip", str), main_process_port=get("main_process_port", int),
        gpu_ids=get("gpu_ids", str), use_cpu=get("use_cpu", bool),
        rdzv_backend=_choice(path, "rdzv_backend", get("rdzv_backend", str), RDZV_BACKENDS),
        debug=get("debug", bool), source=path,
    )


def _check_key(path: str, key: str, value: Any) -> None:
    if key == "compute_environment":
        if value not in (None, "LOCAL_MACHINE"):
            raise _unsupported(path, key, value)
    elif key in _UNUSED_VALUES:
        if value not in _UNUSED_VALUES[key]:
            raise _unsupported(path, key, value)
    elif key not in FILE_KEYS and key not in _NO_EFFECT:
        raise AccelerateConfigError(
            f"{path}: unknown key `{key}` (not one `accelerate config` writes). Remove it, or write a "
            "fresh file with `python -m notebook_launcher config`.")


def _feature(name: str) -> Optional[str]:
    name = name.lower()
    name = name[4:] if name.startswith("use_") else name
    return next((feature for prefix, feature in _FEATURES if name.startswith(prefix)), None)


def unsupported_option(option: str) -> str:
    """The message for an ``accelerate launch`` option we do not take, e.g. ``--use_fsdp``.

    Example::

        unsupported_option("--zero-stage=2")   # '--zero-stage=2: DeepSpeed is not supported ...'
    """
    feature = _feature(option.lstrip("-").split("=")[0].replace("-", "_"))
    if feature is None:
        return f"unknown option {option}; see `python -m notebook_launcher run --help`."
    return (f"{option}: {feature} is not supported by notebook_launcher; use `accelerate launch` for it, "
            "or leave the option out.")


def _unsupported(path: str, key: str, value: Any) -> AccelerateConfigError:
    named = str(value) if key in ("distributed_type", "compute_environment", "mixed_precision") else key
    feature = _feature(named) or "a feature"
    return AccelerateConfigError(
        f"{path}: `{key}: {value}` asks for {feature}, which notebook_launcher does not support. "
        f"Run this configuration with `accelerate launch`, or remove `{key}` from the file "
        "(`python -m notebook_launcher config` writes a plain one).")


def _typed(path: str, key: str, value: Any, kind: type) -> Any:
    if value is None:
        return None
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)    # YAML reads `gpu_ids: 0` as a number
    if kind is int and isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise AccelerateConfigError(f"{path}: `{key}` must be {_KIND_NAMES[kind]}, got {value!r}.")


_KIND_NAMES = {int: "a whole number", str: "text", bool: "true or false"}


def _choice(path: str, key: str, value: Optional[str], allowed: tuple) -> Optional[str]:
    if value is None or value in allowed:
        return value
    if key == "distributed_type":
        raise _unsupported(path, key, value)
    raise AccelerateConfigError(f"{path}: `{key}: {value}` is not supported; use one of {', '.join(allowed)}.")


def _mixed_precision(path: str, data: dict) -> Optional[str]:
    value = data.get("mixed_precision")
    if value is None:
        legacy = _typed(path, "fp16", data.get("fp16"), bool)
        return None if legacy is None else "fp16" if legacy else "no"
    if value is False:
        return "no"      # an unquoted `no` is YAML for false
    value = str(value).lower()
    if value == "fp8":
        raise _unsupported(path, "mixed_precision", value)
    return _choice(path, "mixed_precision", value, MIXED_PRECISION)


# ----------------------------------------------------------------- meaning
def launch_arguments(settings: AccelerateSettings) -> tuple[dict, dict]:
    """(`notebook_launcher` keyword arguments, environment for the workers) with the meaning
    `accelerate launch` gives these settings.

    Example::

        launch_arguments(AccelerateSettings(num_processes=8, num_machines=2, use_cpu=True))
        # ({'num_nodes': 2, 'node_rank': 0, 'device': 'cpu', 'num_processes': 4, ...}, {})
    """
    machines = settings.num_machines or 1
    kwargs = {"num_nodes": machines, "node_rank": settings.machine_rank or 0, "device": _device(settings),
              "mixed_precision": settings.mixed_precision or "no"}
    if settings.num_processes is not None:
        kwargs["num_processes"] = _per_machine(settings.num_processes, machines)
    if settings.main_process_ip:
        kwargs["master_addr"] = settings.main_process_ip
    if settings.main_process_port:
        kwargs["use_port"] = settings.main_process_port
    if settings.rdzv_backend:
        kwargs["rdzv_backend"] = settings.rdzv_backend
    env = {}
    if settings.gpu_ids not in (None, "", "all"):
        env["CUDA_VISIBLE_DEVICES"] = settings.gpu_ids   # as accelerate launch does
    if settings.debug:
        env["ACCELERATE_DEBUG_MODE"] = "true"
    return kwargs, env


def _device(settings: AccelerateSettings) -> str:
    if settings.use_cpu or settings.distributed_type == "MULTI_CPU":
        return "cpu"
    return "cuda" if settings.distributed_type == "MULTI_GPU" else "auto"


def _per_machine(num_processes: int, machines: int) -> int:
    if num_processes < 1 or num_processes % machines:
        raise AccelerateConfigError(
            f"num_processes={num_processes} counts the processes of all {machines} machines together (as in "
            f"accelerate), so it must be a positive multiple of num_machines={machines}.")
    return num_processes // machines


# ----------------------------------------------------------------- writing and showing
def basic_config(num_processes: Optional[int], mixed_precision: str, cpu: bool, gpu_count: int) -> dict:
    """A plain single-machine config, as accelerate's ``write_basic_config`` makes, with our
    defaults: one process per GPU, or 2 CPU processes on a machine without GPUs.

    Example::

        basic_config(None, "bf16", cpu=True, gpu_count=0)["num_processes"]   # 2
    """
    cpu = cpu or gpu_count == 0
    if num_processes is None:
        num_processes = 2 if cpu else gpu_count
    if num_processes < 1:
        raise AccelerateConfigError(f"--num_processes must be at least 1, got {num_processes}.")
    if mixed_precision not in MIXED_PRECISION:
        raise AccelerateConfigError(f"--mixed_precision must be one of {', '.join(MIXED_PRECISION)}.")
    distributed = "NO" if num_processes == 1 else "MULTI_CPU" if cpu else "MULTI_GPU"
    return {"compute_environment": "LOCAL_MACHINE", "distributed_type": distributed, "mixed_precision": mixed_precision,
            "num_processes": num_processes, "num_machines": 1, "machine_rank": 0, "gpu_ids": "all",
            "use_cpu": cpu, "rdzv_backend": "static", "debug": False}


def save(path: str, config: dict, overwrite: bool = False) -> None:
    """Write ``config`` as YAML to ``path`` (folders created). An existing file is kept
    unless ``overwrite``: it may hold settings somebody wrote by hand."""
    import yaml

    if os.path.exists(path) and not overwrite:
        raise AccelerateConfigError(f"{path} already exists; pass --overwrite to replace it.")
    parse(config, path)   # never write what we would refuse to read
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        yaml.safe_dump(config, file)


def summary(config_file: Optional[str] = None) -> dict:
    """The config in effect as plain data, for `env --json`; never raises.

    Example::

        summary()   # {'file': None, 'default_file': '...', 'settings': {}, 'error': None}
    """
    result = {"file": None, "default_file": default_config_file(), "settings": {}, "error": None}
    try:
        settings = settings_in_effect(config_file)
    except AccelerateConfigError as exc:
        return {**result, "error": str(exc)}
    return {**result, "file": settings.source or None, "settings": settings.given()}


def describe(config_file: Optional[str] = None) -> str:
    """One line on the config in effect, for `env` and `test`; never raises.

    Example::

        describe()   # 'accelerate config: none (no file at ~/.cache/huggingface/...)'
    """
    found = summary(config_file)
    if found["error"]:
        return f"accelerate config: unusable: {found['error']}"
    if not found["file"]:
        return f"accelerate config: none (no file at {found['default_file']}); launches use the defaults"
    values = ", ".join(f"{key}={value}" for key, value in found["settings"].items())
    return f"accelerate config: {found['file']} ({values or 'empty'})"


def parse_rdzv_conf(text: Optional[str]) -> Optional[dict]:
    """``--rdzv_conf "key1=value1,key2=value2"`` (torchrun's format) as a dict.

    Example::

        parse_rdzv_conf("join_timeout=900,read_timeout=60")   # {'join_timeout': '900', ...}
    """
    if not text:
        return None
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 or not pair[0].strip() for pair in pairs):
        raise AccelerateConfigError(f"--rdzv_conf {text!r}: write key=value pairs separated by commas.")
    return {key.strip(): value.strip() for key, value in pairs}
