"""Training functions for the Accelerator tests.

They live at module level so workers (forked by `notebook_launcher`) and the test
process itself run exactly the same code. Every function returns plain data (tensors,
lists, dicts) for the test to compare.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch._dynamo  # noqa: F401  DDP's constructor imports it (~2.5 s); once here, forked workers inherit it
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from notebook_launcher.accelerator import Accelerator, ProjectConfiguration

FEATURES = 6


def regression_data(n: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(n, FEATURES, generator=generator)
    true_w = torch.randn(FEATURES, 1, generator=generator)
    y = x @ true_w + 0.1 * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y)


def small_model(dropout: float = 0.0) -> nn.Module:
    layers = [nn.Linear(FEATURES, 8), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(8, 1))


def weights_of(accelerator: Accelerator, model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}


# ----------------------------------------------------------------- parity
def train_regression(batch_size: int, accumulation: int = 1, split_batches: bool = False, epochs: int = 3,
                     shuffle: bool = True, seed: int = 0) -> dict:
    """Train the small model with SGD+momentum; the same seed gives the same init and shuffle."""
    torch.manual_seed(seed)
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, split_batches=split_batches)
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(regression_data(), batch_size=batch_size, shuffle=shuffle)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    updates, micro_steps = 0, 0
    for _ in range(epochs):
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            micro_steps += 1
            updates += int(accelerator.sync_gradients)
    return {"weights": weights_of(accelerator, model), "updates": updates, "micro_steps": micro_steps,
            "ddp": isinstance(model, DistributedDataParallel), "rank": accelerator.process_index}


PARITY_RUNS = {
    "2x8": dict(batch_size=8),
    "2x4_accumulate_2": dict(batch_size=4, accumulation=2),
    "2x16_split": dict(batch_size=16, split_batches=True),
    "2x8_split": dict(batch_size=8, split_batches=True),  # global batch 8: must NOT match 1x16
}


def parity_runs() -> dict:
    return {name: train_regression(**kwargs) for name, kwargs in PARITY_RUNS.items()}


# ----------------------------------------------------------------- gather_for_metrics
class CountingStream(IterableDataset):
    """0..n-1 as a stream (with a length, so the padding can be dropped)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(torch.arange(self.n))

    def __len__(self) -> int:
        return self.n


def _gather_epochs(accelerator: Accelerator, loader, epochs: int) -> dict:
    tensors, objects, batch_sizes = [], [], []
    for _ in range(epochs):
        epoch_tensors, epoch_objects = [], []
        for batch in loader:
            index = batch[0] if isinstance(batch, (list, tuple)) else batch
            batch_sizes.append(len(index))
            epoch_tensors.append(accelerator.gather_for_metrics(index))
            epoch_objects.extend(accelerator.gather_for_metrics([f"s{i}" for i in index.tolist()]))
        tensors.append(torch.cat(epoch_tensors).tolist())
        objects.append(epoch_objects)
    return {"tensors": tensors, "objects": objects, "batch_sizes": batch_sizes, "len": len(loader)}


def metrics_case(n: int, batch_size: int, split_batches: bool = False, shuffle: bool = False,
                 kind: str = "map", epochs: int = 1) -> dict:
    accelerator = Accelerator(split_batches=split_batches)
    if kind == "map":
        loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size, shuffle=shuffle)
    elif kind == "stream":
        loader = DataLoader(CountingStream(n), batch_size=batch_size)
    else:  # a custom batch sampler: batches of 2 over n items
        batches = [list(range(i, min(i + 2, n))) for i in range(0, n, 2)]
        loader = DataLoader(TensorDataset(torch.arange(n)), batch_sampler=batches)
    return _gather_epochs(accelerator, accelerator.prepare(loader), epochs)


METRICS_CASES = {
    "13_by_4": dict(n=13, batch_size=4),
    "9_by_4": dict(n=9, batch_size=4),
    "16_by_4": dict(n=16, batch_size=4),
    "13_split_4": dict(n=13, batch_size=4, split_batches=True),
    "13_shuffled": dict(n=13, batch_size=4, shuffle=True, epochs=2),
    "13_stream": dict(n=13, batch_size=4, kind="stream"),
    "9_custom_batches": dict(n=9, batch_size=2, kind="batches"),
}


def metrics_cases() -> dict:
    return {name: metrics_case(**kwargs) for name, kwargs in METRICS_CASES.items()}


# ----------------------------------------------------------------- checkpoints
class StepCounter:
    """A user object registered for checkpointing."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


def _checkpoint_setup(seed: int, project_dir: str, mixed_precision: str):
    torch.manual_seed(seed)
    config = ProjectConfiguration(project_dir=project_dir, automatic_checkpoint_naming=True, total_limit=2)
    accelerator = Accelerator(mixed_precision=mixed_precision, project_config=config)
    model = small_model(dropout=0.3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    loader = DataLoader(regression_data(), batch_size=4, shuffle=True)
    counter = StepCounter()
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.register_for_checkpointing(counter)
    return accelerator, model, optimizer, loader, scheduler, counter


def _train_epoch(accelerator, model, optimizer, loader, scheduler, counter) -> list:
    seen = []
    model.train()
    for x, y in loader:
        seen.append(x[:, 0].tolist())
        loss = nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        counter.count += 1
    return seen


def _snapshot(accelerator, model, scheduler, counter, seen) -> dict:
    return {
        "weights": weights_of(accelerator, model),
        "data": seen,
        "lr": scheduler.get_last_lr(),
        "count": counter.count,
        "scale": accelerator.scaler.get_scale() if accelerator.scaler is not None else None,
        # Draws after training: equal only if every generator was restored.
        "torch_rng": torch.rand(3).tolist(),
        "python_rng": random.random(),
        "numpy_rng": float(np.random.rand()),
    }


def checkpoint_roundtrip(project_dir: str, mixed_precision: str) -> dict:
    """Run A: train k, save, train k. Run B (other init): load, train k. Return both."""
    parts = _checkpoint_setup(0, project_dir, mixed_precision)
    _train_epoch(*parts)
    folder = parts[0].save_state()
    seen = _train_epoch(*parts)
    first = _snapshot(parts[0], parts[1], parts[4], parts[5], seen)

    parts = _checkpoint_setup(1, project_dir, mixed_precision)
    before_load = weights_of(parts[0], parts[1])
    loaded = parts[0].load_state()
    seen = _train_epoch(*parts)
    second = _snapshot(parts[0], parts[1], parts[4], parts[5], seen)
    return {"first": first, "second": second, "folder": folder, "loaded": loaded,
            "differs_before_load": any(not torch.equal(before_load[k], first["weights"][k]) for k in before_load),
            "files": sorted(os.listdir(folder)), "next_iteration": parts[0].save_iteration}


# ----------------------------------------------------------------- mixed precision
def _record_inner_dtype(module: nn.Module, store: list) -> None:
    module.register_forward_hook(lambda _m, _inputs, output: store.append(output.dtype))


def mixed_precision_checks(inf_rank: int = 1) -> dict:
    """In a worker launched with mixed_precision="fp16": dtypes, scaler, skipped step; then bf16."""
    torch.manual_seed(0)
    accelerator = Accelerator()  # the launcher's choice
    inner_dtypes: list = []
    model = nn.Sequential(nn.Linear(4, 2))  # the hook sees the inner layer's compute dtype
    _record_inner_dtype(model[0], inner_dtypes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    x = torch.randn(8, 4)

    def step(inputs):
        before = {k: v.clone() for k, v in weights_of(accelerator, model).items()}
        scale = accelerator.scaler.get_scale()
        loss = model(inputs).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        after = weights_of(accelerator, model)
        return {"skipped": accelerator.optimizer_step_was_skipped,
                "moved": any(not torch.equal(before[k], after[k]) for k in before),
                "scale_before": scale, "scale_after": accelerator.scaler.get_scale(),
                "lr": scheduler.get_last_lr()[0], "loss_dtype": str(loss.dtype)}

    output_dtype = str(model(x).dtype)
    normal = step(x)
    bad = x.clone()
    if accelerator.process_index == inf_rank:
        bad[0, 0] = float("inf")  # only one rank overflows; DDP's all-reduce spreads it
    overflow = step(bad)
    recovered = step(x)
    with accelerator.autocast():
        bare_matmul = str((x @ x.T).dtype)

    bf16 = Accelerator(mixed_precision="bf16")
    bf16_dtypes: list = []
    other = nn.Sequential(nn.Linear(4, 2))
    _record_inner_dtype(other[0], bf16_dtypes)
    other = bf16.prepare(other)
    bf16_output = str(other(x).dtype)
    return {"mixed_precision": accelerator.mixed_precision, "inner": [str(d) for d in inner_dtypes[:1]],
            "output": output_dtype, "bare_matmul": bare_matmul, "normal": normal, "overflow": overflow,
            "recovered": recovered, "bf16_mixed_precision": bf16.mixed_precision, "bf16_scaler": bf16.scaler,
            "bf16_inner": [str(d) for d in bf16_dtypes[:1]], "bf16_output": bf16_output}


# ----------------------------------------------------------------- facts, collectives, schedulers
def _scheduler_steps(split_batches: bool) -> int:
    accelerator = Accelerator(gradient_accumulation_steps=2, split_batches=split_batches)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for _ in range(4):  # 4 micro-steps = 2 updates
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.ones(1, 2)).sum())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return scheduler.last_epoch


def _error_of(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def facts_and_collectives(shared_dir: str) -> dict:
    accelerator = Accelerator()
    rank = accelerator.process_index
    accelerator.print("printed-by-main-only")
    out = {
        "facts": (accelerator.process_index, accelerator.local_process_index, accelerator.num_processes,
                  accelerator.is_main_process, accelerator.is_local_main_process,
                  accelerator.distributed_type.value, str(accelerator.device), accelerator.mixed_precision,
                  accelerator.sync_gradients),
        "gather": accelerator.gather(torch.tensor([rank])).tolist(),
        "gather_scalar": accelerator.gather(torch.tensor(rank * 10)).tolist(),
        "gather_uneven": accelerator.gather(torch.arange(rank + 1)).tolist(),
        "gather_nested": {k: (v.tolist() if torch.is_tensor(v) else [t.tolist() for t in v])
                          for k, v in accelerator.gather({"a": torch.tensor([rank]),
                                                          "b": (torch.full((1, 2), rank),)}).items()},
        "gather_bool": accelerator.gather(torch.tensor([rank == 1])).tolist(),
        "sum": accelerator.reduce(torch.tensor([1.0 + rank])).tolist(),
        "mean": accelerator.reduce(torch.tensor([1.0 + rank]), reduction="mean").tolist(),
        "max": accelerator.reduce(torch.tensor([1.0 + rank]), reduction="max").tolist(),
        "pad": accelerator.pad_across_processes(torch.arange(rank + 1), pad_index=-1).tolist(),
        "pad_first": accelerator.pad_across_processes(torch.arange(rank + 1), pad_index=-1, pad_first=True).tolist(),
        "pad_dim1": list(accelerator.pad_across_processes(torch.zeros(2, rank + 1), dim=1).shape),
        "objects": accelerator.gather_for_metrics({"rank": rank}),
        "scheduler_steps": _scheduler_steps(split_batches=False),
        "scheduler_steps_split": _scheduler_steps(split_batches=True),
    }
    with accelerator.split_between_processes(list(range(5))) as part:
        out["split"] = part
    with accelerator.split_between_processes(list(range(5)), apply_padding=True) as part:
        out["split_padded"] = part
    with accelerator.split_between_processes({"a": torch.arange(4), "b": ["w", "x", "y", "z"]}) as part:
        out["split_dict"] = {"a": part["a"].tolist(), "b": part["b"]}
    marker = os.path.join(shared_dir, "main-was-here")
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            with open(marker, "w") as f:
                f.write("x")
        out["saw_marker"] = os.path.exists(marker)
    out["split_batches_error"] = _error_of(
        lambda: Accelerator(split_batches=True).prepare(DataLoader(TensorDataset(torch.arange(9)), batch_size=3)))
    model = nn.Linear(2, 1)
    accelerator.prepare(model)
    out["prepare_twice_error"] = _error_of(lambda: accelerator.prepare(model))
    accelerator.wait_for_everyone()
    return out


def log_to_dashboard(steps: int) -> int:
    accelerator = Accelerator()
    for step in range(steps):
        accelerator.log({"loss": 1.0 / (step + 1), "nested": {"acc": torch.tensor(step / 10)}}, step=step)
    accelerator.end_training()
    return steps


def prepare_model_twice() -> None:
    accelerator = Accelerator()
    model = nn.Linear(2, 1)
    accelerator.prepare(model)
    accelerator.prepare(model)


# ----------------------------------------------------------------- HF accelerate interop
def reference_full_batch(epochs: int = 3) -> dict:
    """Plain single-process PyTorch: batch 16 over the regression data, in order."""
    torch.manual_seed(0)
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for x, y in DataLoader(regression_data(), batch_size=16):
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_with_hf_accelerate(epochs: int = 3) -> dict:
    """accelerate's own Accelerator inside our worker: 2 ranks x batch 8, in order."""
    import accelerate

    accelerator = accelerate.Accelerator()
    torch.manual_seed(0)
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(regression_data(), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(accelerator.gather(loss.detach()[None]).mean().item())
    state = accelerate.PartialState()
    return {"process_index": accelerator.process_index, "num_processes": accelerator.num_processes,
            "device": accelerator.device.type, "distributed_type": str(accelerator.distributed_type),
            "partial_state": (state.num_processes, state.process_index),
            "weights": {k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()},
            "losses": losses}
