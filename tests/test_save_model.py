"""Accelerator.save_model: HF's layout, sharded past max_shard_size, read back by our loader,
by hand through the index file, and by HF's own loaders (transformers, accelerate)."""

import json
import os
import time

import pytest
import torch
from torch import nn

from notebook_launcher import notebook_launcher
from notebook_launcher.accelerator import Accelerator, load_weights
from notebook_launcher.accelerator.weights import shard_size_bytes


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # 4 linear layers of 64x64 floats: about 16.6 KB each
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])


class Tied(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(100, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 100, bias=False)
        self.head.weight = self.embed.weight


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def read_through_index(folder) -> dict:
    """Independently of our loader: the index's weight_map, then each shard file."""
    from safetensors.torch import load_file

    with open(folder / "model.safetensors.index.json") as f:
        index = json.load(f)
    state_dict = {}
    for name, file in index["weight_map"].items():
        state_dict[name] = load_file(folder / file)[name]
    return index, state_dict


@pytest.mark.parametrize("safe", [True, False])
def test_sharded_save_round_trips(tmp_path, safe):
    model = mlp()
    path = Accelerator().save_model(model, tmp_path, max_shard_size="40KB", safe_serialization=safe)
    base, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    shards = [f"{base}-0000{i}-of-00002.{ext}" for i in (1, 2)]
    assert sorted(os.listdir(tmp_path)) == sorted([*shards, f"{base}.{ext}.index.json"])
    assert path == str(tmp_path / f"{base}.{ext}.index.json")
    with open(path) as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.state_dict().values())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(shards)
    assert all(os.path.getsize(tmp_path / shard) < 40_000 + 1_000 for shard in shards)  # + header

    fresh = mlp(seed=1)
    fresh.load_state_dict(load_weights(str(tmp_path)))
    assert_same_weights(fresh, model)


def test_the_index_file_alone_finds_every_tensor(tmp_path):
    model = mlp()
    Accelerator().save_model(model, tmp_path, max_shard_size="20KB")
    index, state_dict = read_through_index(tmp_path)
    assert len(set(index["weight_map"].values())) == 4  # one 16.6 KB layer per shard
    fresh = mlp(seed=1)
    fresh.load_state_dict(state_dict)
    assert_same_weights(fresh, model)


@pytest.mark.parametrize("safe", [True, False])
def test_hf_loaders_read_the_shards(tmp_path, safe):
    from accelerate.utils import load_checkpoint_in_model
    from transformers.trainer_utils import load_sharded_checkpoint

    model = mlp()
    Accelerator().save_model(model, tmp_path, max_shard_size="40KB", safe_serialization=safe)
    by_transformers = mlp(seed=1)
    result = load_sharded_checkpoint(by_transformers, str(tmp_path), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_weights(by_transformers, model)
    by_accelerate = mlp(seed=2)
    index = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
    load_checkpoint_in_model(by_accelerate, str(tmp_path / index))
    assert_same_weights(by_accelerate, model)


@pytest.mark.parametrize("safe", [True, False])
def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path, safe):
    model = Tied()
    Accelerator().save_model(model, tmp_path, max_shard_size="8KB", safe_serialization=safe)
    index_name = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
    with open(tmp_path / index_name) as f:
        index = json.load(f)
    assert "head.weight" not in index["weight_map"]
    assert index["metadata"]["aliases"] == {"head.weight": "embed.weight"}
    assert index["metadata"]["total_size"] == (100 * 32 + 32 * 32 + 32) * 4  # the tied matrix once

    fresh = Tied(seed=1)
    fresh.load_state_dict(load_weights(str(tmp_path)))
    assert_same_weights(fresh, model)
    assert fresh.head.weight is fresh.embed.weight

    from accelerate.utils import load_checkpoint_in_model

    by_accelerate = Tied(seed=2)
    load_checkpoint_in_model(by_accelerate, str(tmp_path / index_name))
    assert_same_weights(by_accelerate, model)


def test_one_file_when_it_fits_and_no_stale_shards(tmp_path):
    model = mlp()
    Accelerator().save_model(model, tmp_path, max_shard_size="20KB")
    assert len(os.listdir(tmp_path)) == 5
    (tmp_path / "pytorch_model.bin").write_bytes(b"another format: left alone")
    path = Accelerator().save_model(model, tmp_path)  # 1GB: one file; the old shards and index go
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "pytorch_model.bin"]
    assert path == str(tmp_path / "model.safetensors")
    fresh = mlp(seed=1)
    fresh.load_state_dict(load_weights(path))
    assert_same_weights(fresh, model)


def test_shard_sizes():
    assert shard_size_bytes("1GB") == 10**9 and shard_size_bytes("500MB") == 5 * 10**8
    assert shard_size_bytes("2GiB") == 2 * 2**30 and shard_size_bytes("1.5kb") == 1500
    assert shard_size_bytes(12345) == 12345
    for bad in ("1 parsec", 0, -5, True, "GB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            shard_size_bytes(bad)
    with pytest.raises(ValueError, match="max_shard_size"):
        Accelerator().save_model(mlp(), "unused", max_shard_size="lots")


def save_from_every_rank(folder: str) -> dict:
    """Rank 1's model differs (other values, one more layer): only rank 0's may be written."""
    accelerator = Accelerator()
    model = mlp(seed=accelerator.process_index)
    if accelerator.process_index == 1:
        model.append(nn.Linear(64, 2))
        time.sleep(0.5)  # were rank 1 to write, it would write last, over rank 0's files
    path = accelerator.save_model(model, folder, max_shard_size="40KB")
    # Past the barrier, every rank sees the complete checkpoint.
    return {"path": path, "files": sorted(os.listdir(folder)), "loaded": load_weights(folder)}


def test_only_the_main_process_writes(tmp_path):
    results = notebook_launcher(save_from_every_rank, args=(str(tmp_path),), num_processes=2, display="none",
                                return_all=True)
    expected = mlp(seed=0).state_dict()
    for result in results:
        assert result["path"] == str(tmp_path / "model.safetensors.index.json")
        assert result["files"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                   "model.safetensors.index.json"]
        assert result["loaded"].keys() == expected.keys()
        assert all(torch.equal(result["loaded"][k], expected[k]) for k in expected)


def set_mtime(path: str, seconds: float) -> None:
    """Give a save's file an exact modification time: two saves within the filesystem's
    timestamp resolution (a second on some) would otherwise tie."""
    os.utime(path, (seconds, seconds))


def test_the_newest_save_is_loaded_when_two_formats_share_a_folder(tmp_path):
    """The loader picks the save whose file (index or single file) was modified last; the
    mtimes are set by hand, one second apart, in both orders."""
    from notebook_launcher.accelerator import weights

    model = nn.Linear(64, 64)
    first = weights.write(model.state_dict(), str(tmp_path), max_shard_size="10KB", safe=True)
    assert first.endswith("model.safetensors.index.json")            # sharded safetensors, left in place
    zeros = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
    second = weights.write(zeros, str(tmp_path), safe=False)         # then a .bin save into the same folder
    assert weights.target(zeros, str(tmp_path), safe=False) == second   # what the other ranks report
    now = time.time()
    set_mtime(first, now - 1)
    set_mtime(second, now)
    loaded = load_weights(str(tmp_path))
    assert all(torch.equal(loaded[name], zeros[name]) for name in zeros)
    set_mtime(first, now + 1)                                        # the safetensors save is the newer one now
    loaded = load_weights(str(tmp_path))
    assert all(torch.equal(loaded[name], value) for name, value in model.state_dict().items())
