"""The main job of the README: a short data-parallel training launched through the library.

A small MLP learns the 8x8 handwritten digits that ship inside scikit-learn (no download);
without scikit-learn it falls back to a synthetic classification task. Every rank trains
on its own shard, gradients are averaged by DistributedDataParallel over gloo (or NCCL),
rank 0's loss curve goes to the dashboard, and the evaluation accuracy comes back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .reporting import progress, report


def load_data(seed: int = 0):
    """(train_x, train_y, test_x, test_y, name) as float/long tensors."""
    try:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        name = "scikit-learn digits (1797 images, 8x8)"
    except ImportError:
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(10, 64, generator=g) * 2
        y = torch.randint(0, 10, (1800,), generator=g)
        x = centers[y] + torch.randn(1800, 64, generator=g)
        name = "synthetic blobs (install scikit-learn for the real digits)"
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:], name


def train(epochs: int = 8, batch_size: int = 32, lr: float = 0.05) -> dict:
    """Train on this rank's shard; return test accuracy (all ranks agree) and the last loss."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y, name = load_data()
    if rank == 0:
        print(f"data: {name}; {world} ranks x batch {batch_size}")
    device = _device()
    train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))
    shard_x, shard_y = train_x[rank::world], train_y[rank::world]
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)
    steps_per_epoch = len(shard_x) // batch_size
    step, loss = 0, torch.tensor(0.0)
    for epoch in progress(range(epochs), desc="epoch"):
        perm = torch.randperm(len(shard_x), generator=torch.Generator().manual_seed(epoch)).to(device)
        for i in progress(range(steps_per_epoch), desc="batch"):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = nn.functional.cross_entropy(ddp(shard_x[idx]), shard_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            report(step, loss=loss)
            step += 1
        accuracy = evaluate(model, test_x, test_y)
        report(step, test_accuracy=accuracy)
        if rank == 0:
            print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, test accuracy {accuracy:.3f}")
    return {"test_accuracy": accuracy, "final_loss": loss.item(), "steps": step, "world_size": world}


def _device() -> torch.device:
    """This worker's device: the GPU the launcher pinned, or the CPU."""
    from .workers import context

    ctx = context.current()
    return torch.device(ctx.device if ctx is not None else "cpu")


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy over the whole test set, each rank scoring its share, summed with all_reduce."""
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.no_grad():
        correct = (model(x[rank::world]).argmax(1) == y[rank::world]).sum().float()
    counts = torch.stack([correct, torch.tensor(float(len(y[rank::world])), device=correct.device)])
    dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()


def main(num_processes: int = 2, epochs: int = 8, display: str = "auto") -> dict:
    from .api import notebook_launcher

    result = notebook_launcher(train, kwargs={"epochs": epochs}, num_processes=num_processes, display=display)
    print(f"result from rank 0: {result}")
    return result
