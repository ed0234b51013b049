"""Saving and restoring a training run: weights, optimizer, scheduler, scaler, data
position, RNG streams of every rank, and registered objects.

Layout of one checkpoint folder (the same names as HF accelerate's, to feel familiar)::

    model.safetensors  model_1.safetensors ...   (or pytorch_model.bin with safe_serialization=False)
    optimizer.bin  optimizer_1.bin ...
    scheduler.bin  scheduler_1.bin ...
    scaler.pt                                    (fp16 only)
    dataloaders.bin                              (epoch and shuffle seed of each prepared loader)
    custom_checkpoint_0.pkl ...                  (register_for_checkpointing)
    random_states_0.pkl  random_states_1.pkl ... (one per rank)

The main process writes what is identical on every rank; each rank writes its own RNG
states. Everything here is a function of plain arguments; `Accelerator` supplies them.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import rng, weights
from .collectives import barrier
from .state import ProcessState

MODEL_SAFE = "model"
MODEL_BIN = "pytorch_model"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
SCALER = "scaler.pt"
DATALOADERS = "dataloaders.bin"
RNG_STATES = "random_states"
CUSTOM = "custom_checkpoint"
CHECKPOINT_PREFIX = "checkpoint_"


@dataclass
class ProjectConfiguration:
    """Where a project keeps its checkpoints, and how many.

    With ``automatic_checkpoint_naming=True``, ``save_state()`` without a folder writes
    ``project_dir/checkpoints/checkpoint_<iteration>`` and keeps at most ``total_limit``
    of them (oldest removed first); ``load_state()`` without a folder loads the newest.

    Example::

        config = ProjectConfiguration(project_dir="runs/a", automatic_checkpoint_naming=True, total_limit=3)
        accelerator = Accelerator(project_config=config)
    """

    project_dir: Optional[str] = None
    logging_dir: Optional[str] = None
    automatic_checkpoint_naming: bool = False
    total_limit: Optional[int] = None
    iteration: int = 0
    save_on_each_node: bool = False

    def __post_init__(self) -> None:
        self.set_directories(self.project_dir)
        if self.total_limit is not None and self.total_limit < 1:
            raise ValueError(f"total_limit must be at least 1 (or None for no limit), got {self.total_limit}.")

    def set_directories(self, project_dir: Optional[str] = None) -> None:
        self.project_dir = project_dir
        if self.logging_dir is None:
            self.logging_dir = project_dir


@dataclass
class Parts:
    """What a checkpoint holds. Models are the unwrapped modules."""

    models: list = field(default_factory=list)
    optimizers: list = field(default_factory=list)
    schedulers: list = field(default_factory=list)
    dataloaders: list = field(default_factory=list)
    scaler: Optional[object] = None
    custom: list = field(default_factory=list)


def _indexed(name: str, i: int, ext: str) -> str:
    return f"{name}{'' if i == 0 else f'_{i}'}.{ext}"


def _writes(state: ProcessState, config: ProjectConfiguration) -> bool:
    return state.is_main_process or (config.save_on_each_node and state.is_local_main_process)


# ----------------------------------------------------------------- folder choice
def _numbered(folder: str) -> list:
    """(number, path) of the checkpoint_<n> folders in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)
        if match and os.path.isdir(os.path.join(folder, name)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def _auto_root(config: ProjectConfiguration) -> str:
    if not config.project_dir:
        raise ValueError("automatic_checkpoint_naming needs a project_dir: "
                         "Accelerator(project_dir=...) or ProjectConfiguration(project_dir=...).")
    return os.path.join(config.project_dir, "checkpoints")


def folder_for_save(output_dir: Optional[str], config: ProjectConfiguration, state: ProcessState) -> str:
    """The folder ``save_state`` writes to; makes room under ``total_limit`` first."""
    if output_dir is not None:
        return os.path.expanduser(str(output_dir))
    if not config.automatic_checkpoint_naming:
        raise ValueError("save_state() needs an output_dir, or a ProjectConfiguration with "
                         "automatic_checkpoint_naming=True and a project_dir.")
    root = _auto_root(config)
    target = os.path.join(root, f"{CHECKPOINT_PREFIX}{config.iteration}")
    if os.path.exists(target):
        raise FileExistsError(
            f"{target} already exists. Set project_config.iteration past the existing checkpoints "
            "(load_state() does this for you), or use another project_dir."
        )
    if _writes(state, config):
        existing = _numbered(root)
        if config.total_limit is not None:
            for _, path in existing[: max(0, len(existing) + 1 - config.total_limit)]:
                shutil.rmtree(path)
    barrier(state)  # nobody writes before the old checkpoints are gone
    return target


def folder_for_load(input_dir: Optional[str], config: ProjectConfiguration) -> str:
    """The folder ``load_state`` reads: the one given, or the newest automatic one."""
    if input_dir is not None:
        folder = os.path.expanduser(str(input_dir))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"No checkpoint folder at {folder}.")
        return folder
    if not config.automatic_checkpoint_naming:
        raise ValueError("load_state() needs an input_dir, or a ProjectConfiguration with "
                         "automatic_checkpoint_naming=True.")
    found = _numbered(_auto_root(config))
    if not found:
        raise FileNotFoundError(f"No checkpoint_<n> folder in {_auto_root(config)} to load.")
    return found[-1][1]


def iteration_after(folder: str) -> Optional[int]:
    """For ``.../checkpoint_<n>``: n + 1, the next automatic checkpoint's number."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", os.path.basename(os.path.normpath(folder)))
    return int(match.group(1)) + 1 if match else None


# ----------------------------------------------------------------- model weights
def write_weights(model: torch.nn.Module, folder: str, index: int, safe_serialization: bool) -> str:
    """Model ``index`` of a checkpoint: one file, ``model[_<index>].safetensors`` or ``.bin``."""
    state_dict = model.state_dict()
    if safe_serialization:
        path = os.path.join(folder, _indexed(MODEL_SAFE, index, "safetensors"))
        weights.write_file(path, *weights.dedupe_shared(state_dict), safe=True)
    else:
        path = os.path.join(folder, _indexed(MODEL_BIN, index, "bin"))
        torch.save(state_dict, path)  # keeps the sharing of tied weights itself
    return path


def read_weights(folder: str, index: int, device: torch.device) -> dict:
    for name in (_indexed(MODEL_SAFE, index, "safetensors"), _indexed(MODEL_BIN, index, "bin")):
        if os.path.exists(os.path.join(folder, name)):
            return weights.load_weights(os.path.join(folder, name), device)
    raise FileNotFoundError(f"{folder} has no weights for model {index} "
                            f"({_indexed(MODEL_SAFE, index, 'safetensors')} or {_indexed(MODEL_BIN, index, 'bin')}).")


def save_model(model: torch.nn.Module, folder: str, state: ProcessState, max_shard_size="1GB",
               safe_serialization: bool = True) -> str:
    """Write an (unwrapped) model's weights once, from the main process, sharded past
    ``max_shard_size`` (see `weights`); every rank waits. Returns the file to load from."""
    max_bytes = weights.shard_size_bytes(max_shard_size)  # a bad size fails on every rank, before the barrier
    if state.is_main_process:
        path = weights.write(model.state_dict(), folder, max_bytes, safe_serialization)
    else:
        path = weights.target(model.state_dict(), folder, max_bytes, safe_serialization)
    barrier(state)
    return path


# ----------------------------------------------------------------- whole state
def write_state(folder: str, parts: Parts, state: ProcessState, config: ProjectConfiguration,
                safe_serialization: bool = True) -> str:
    """Write a checkpoint of ``parts`` to ``folder`` (a collective: every rank calls it)."""
    os.makedirs(folder, exist_ok=True)
    if _writes(state, config):
        for i, model in enumerate(parts.models):
            write_weights(model, folder, i, safe_serialization)
        for i, optimizer in enumerate(parts.optimizers):
            torch.save(optimizer.state_dict(), os.path.join(folder, _indexed(OPTIMIZER, i, "bin")))
        for i, scheduler in enumerate(parts.schedulers):
            torch.save(scheduler.state_dict(), os.path.join(folder, _indexed(SCHEDULER, i, "bin")))
        if parts.scaler is not None:
            torch.save(parts.scaler.state_dict(), os.path.join(folder, SCALER))
        if parts.dataloaders:
            torch.save([loader.state_dict() for loader in parts.dataloaders], os.path.join(folder, DATALOADERS))
        for i, obj in enumerate(parts.custom):
            torch.save(obj.state_dict(), os.path.join(folder, f"{CUSTOM}_{i}.pkl"))
    torch.save(rng.capture(state.device), os.path.join(folder, f"{RNG_STATES}_{state.process_index}.pkl"))
    barrier(state)  # the checkpoint is complete on disk when any rank returns
    return folder


def read_state(folder: str, parts: Parts, state: ProcessState) -> None:
    """Restore ``parts`` (and this rank's RNG streams) from a checkpoint folder."""
    def path(name: str) -> str:
        full = os.path.join(folder, name)
        if not os.path.exists(full):
            raise FileNotFoundError(
                f"{folder} has no {name}: it was saved with fewer objects prepared (or registered) than "
                "now. Prepare the same models, optimizers, schedulers and loaders as when saving."
            )
        return full

    for i, model in enumerate(parts.models):
        model.load_state_dict(read_weights(folder, i, state.device))
    for i, optimizer in enumerate(parts.optimizers):
        optimizer.load_state_dict(torch.load(path(_indexed(OPTIMIZER, i, "bin")), map_location=state.device,
                                             weights_only=True))
    for i, scheduler in enumerate(parts.schedulers):
        scheduler.load_state_dict(torch.load(path(_indexed(SCHEDULER, i, "bin")), weights_only=False))
    if parts.scaler is not None:
        parts.scaler.load_state_dict(torch.load(path(SCALER), weights_only=True))
    if parts.dataloaders:
        saved = torch.load(path(DATALOADERS), weights_only=True)
        for loader, loader_state in zip(parts.dataloaders, saved):
            loader.load_state_dict(loader_state)
    for i, obj in enumerate(parts.custom):
        obj.load_state_dict(torch.load(path(f"{CUSTOM}_{i}.pkl"), map_location=state.device, weights_only=False))
    rng_file = os.path.join(folder, f"{RNG_STATES}_{state.process_index}.pkl")
    if not os.path.exists(rng_file):
        raise FileNotFoundError(
            f"{folder} has no RNG states for rank {state.process_index}: it was saved by a run with fewer "
            "processes. Load it with the same num_processes it was saved with."
        )
    rng.restore(torch.load(rng_file, weights_only=False), state.device)
