"""Model weights on disk in HF's layout: one file, or shards with an index.

One file when the weights fit in ``max_shard_size``::

    model.safetensors                         (pytorch_model.bin with safe_serialization=False)

otherwise shards and their index, which HF's loaders read (``from_pretrained``,
``transformers.trainer_utils.load_sharded_checkpoint``, ``accelerate.load_checkpoint_in_model``)::

    model-00001-of-00003.safetensors ...      (pytorch_model-00001-of-00003.bin ...)
    model.safetensors.index.json              {"metadata": {"total_size": bytes}, "weight_map": {name: file}}

Tied weights (two names, one tensor) are stored once, as HF does: the other names are
recorded as ``aliases`` (in the file's safetensors metadata, or in the index's metadata)
and `load_weights` gives them back, so ``load_state_dict`` sees every name. A single
``.bin`` file keeps the sharing itself (``torch.save`` does). Pure functions of their
arguments: who writes (the main process) is decided by the caller.
"""

from __future__ import annotations

import json
import os
import re
from typing import Union

import torch

SAFE_NAME = "model"
BIN_NAME = "pytorch_model"
_SHARD = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_size_bytes(size: Union[int, str]) -> int:
    """``max_shard_size`` in bytes: an int, or "1GB" / "500MB" (powers of 1000) / "2GiB" (of 1024).

    Example::

        shard_size_bytes("1GB")   # 1_000_000_000
    """
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not match or isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a number of bytes or a size like '1GB', '500MB', '2GiB'; "
                         f"got {size!r}.")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def file_names(safe: bool, shards: int) -> tuple:
    """(shard file names, index file name or None) for ``shards`` shards."""
    name, ext = (SAFE_NAME, "safetensors") if safe else (BIN_NAME, "bin")
    if shards == 1:
        return [f"{name}.{ext}"], None
    return [f"{name}-{i:05d}-of-{shards:05d}.{ext}" for i in range(1, shards + 1)], f"{name}.{ext}.index.json"


def dedupe_shared(state_dict: dict) -> tuple:
    """(tensors with each storage once, {alias: kept name}). Same view of the same memory =
    an alias (tied weights); an overlapping but different view is copied, since safetensors
    refuses shared memory."""
    kept, aliases, seen, storages = {}, {}, {}, set()
    for name, tensor in state_dict.items():
        if tensor.numel() == 0:
            kept[name] = tensor.detach().contiguous()
            continue
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        data = tensor.detach()
        kept[name] = data.clone() if storage in storages or data.untyped_storage().nbytes() != data.nbytes \
            else data.contiguous()
        storages.add(storage)
    return kept, aliases


def plan_shards(tensors: dict, max_bytes: int) -> list:
    """Tensors in order into shards of at most ``max_bytes`` (a bigger tensor gets a shard of its own)."""
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    return shards + [current] if current or not shards else shards


def write(state_dict: dict, folder: str, max_shard_size: Union[int, str] = "1GB", safe: bool = True) -> str:
    """Write ``state_dict`` to ``folder`` (made if needed); removes the weight files of an
    earlier save there that this one does not overwrite. Returns the file to load from:
    the single weights file, or the index.

    Example::

        write(model.state_dict(), "out", max_shard_size="200MB")   # "out/model.safetensors.index.json"
    """
    if os.path.isfile(folder):
        raise ValueError(f"save_model needs a folder, and {folder} is a file.")
    tensors, aliases, shards, names, index_name = _plan(state_dict, max_shard_size, safe)
    os.makedirs(folder, exist_ok=True)
    _remove_stale(folder, SAFE_NAME if safe else BIN_NAME, set(names) | {index_name})
    if index_name is None and not safe:
        torch.save(state_dict, os.path.join(folder, names[0]))  # keeps the sharing of tied weights itself
        return os.path.join(folder, names[0])
    for name, shard in zip(names, shards):
        write_file(os.path.join(folder, name), shard, aliases if index_name is None else {}, safe)
    if index_name is None:
        return os.path.join(folder, names[0])
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor in shard}}
    if aliases:
        index["metadata"]["aliases"] = aliases
    with open(os.path.join(folder, index_name), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return os.path.join(folder, index_name)


def _plan(state_dict: dict, max_shard_size: Union[int, str], safe: bool) -> tuple:
    tensors, aliases = dedupe_shared(state_dict)
    shards = plan_shards(tensors, shard_size_bytes(max_shard_size))
    names, index_name = file_names(safe, len(shards))
    return tensors, aliases, shards, names, index_name


def target(state_dict: dict, folder: str, max_shard_size: Union[int, str] = "1GB", safe: bool = True) -> str:
    """The file `write` returns for these arguments, without writing anything (what the
    ranks that do not write report, even on a machine that never sees the folder).

    Example::

        target(model.state_dict(), "out")   # "out/model.safetensors"
    """
    *_, names, index_name = _plan(state_dict, max_shard_size, safe)
    return os.path.join(folder, index_name or names[0])


def load_weights(path: str, device: Union[str, torch.device] = "cpu") -> dict:
    """A state dict from what `write` wrote: a folder (index or single file found in it),
    an index file, or one weights file. Aliases (tied weights) are given back.

    Example::

        model.load_state_dict(load_weights("out"))
    """
    path = weights_path(path)
    if path.endswith(".index.json"):
        with open(path) as f:
            index = json.load(f)
        folder, state_dict = os.path.dirname(path), {}
        for name in dict.fromkeys(index["weight_map"].values()):
            state_dict.update(_read_file(os.path.join(folder, name), device)[0])
        aliases = index.get("metadata", {}).get("aliases", {})
    else:
        state_dict, aliases = _read_file(path, device)
    for alias, name in aliases.items():
        state_dict[alias] = state_dict[name]
    return state_dict


def weights_path(path: str) -> str:
    """The file to load from: ``path`` itself, or in a folder the index or single weights
    file of the newest save there."""
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"No model weights at {path}.")
        return path
    found = [os.path.join(path, name) for name in (f"{SAFE_NAME}.safetensors.index.json", f"{SAFE_NAME}.safetensors",
                                                    f"{BIN_NAME}.bin.index.json", f"{BIN_NAME}.bin")
             if os.path.exists(os.path.join(path, name))]
    if found:  # a .bin save leaves an earlier safetensors one in place (as HF does): the newest wins
        return max(found, key=lambda file: (os.path.getmtime(file), -found.index(file)))
    raise FileNotFoundError(f"{path} has no model weights (model.safetensors, pytorch_model.bin, or an index).")


def write_file(path: str, tensors: dict, aliases: dict, safe: bool) -> None:
    """One weights file; a safetensors file records ``aliases`` in its metadata."""
    if safe:
        from safetensors.torch import save_file

        save_file(tensors, path, metadata={"format": "pt", "aliases": json.dumps(aliases)})
    else:
        torch.save(tensors, path)


def _read_file(path: str, device) -> tuple:
    """(state dict, aliases) of one weights file."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            return tensors, json.loads((handle.metadata() or {}).get("aliases", "{}"))
    return torch.load(path, map_location=device, weights_only=True), {}


def _remove_stale(folder: str, base: str, keep: set) -> None:
    # A 3-shard save over a 5-shard one must not leave shards 4 and 5 (or an index) behind.
    # Like HF, only files of the format being written: a .bin save leaves safetensors alone.
    for name in os.listdir(folder):
        match = _SHARD.fullmatch(name)
        if match and match.group(1) == base and name not in keep:
            os.remove(os.path.join(folder, name))
