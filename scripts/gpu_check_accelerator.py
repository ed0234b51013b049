"""Check the Accelerator's CUDA paths on a GPU machine: fp16 autocast + GradScaler, bf16.

Run it with ``python scripts/gpu_check_accelerator.py``. It launches the checks through
`notebook_launcher` (one worker per check run, ``num_processes=1``; a second run with 2
workers when 2 GPUs are visible), prints one PASS/FAIL line per check, and exits 1 if
any failed. On a machine without CUDA it prints "no CUDA, skipped" and exits 0. The
parent process never initializes CUDA (it asks NVML how many GPUs there are).
"""

from __future__ import annotations

import sys
import tempfile

import torch
from torch import nn

from notebook_launcher import notebook_launcher
from notebook_launcher.environment import cuda_device_count


def _check(results: list, name: str, fn) -> None:
    try:
        detail = fn()
        results.append((name, True, detail or ""))
    except Exception as exc:  # a failed check must not hide the others
        results.append((name, False, f"{type(exc).__name__}: {exc}"))


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _inner_dtype(model, inner, x):
    seen = []
    handle = inner.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    out = model(x)
    handle.remove()
    return seen[0], out.dtype


def _fp16_checks(results: list, folder: str) -> None:
    from notebook_launcher.accelerator import Accelerator

    accelerator = Accelerator()  # fp16 from the launcher
    _expect(accelerator.mixed_precision == "fp16", f"mixed_precision is {accelerator.mixed_precision}")
    _expect(accelerator.device.type == "cuda", f"device is {accelerator.device}")
    _expect(accelerator.scaler is not None and getattr(accelerator.scaler, "_device", "cuda") == "cuda",
            "no CUDA GradScaler")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    x = torch.randn(256, 64, device=accelerator.device)
    y = x[:, :1] * 2 + 1
    inner, outer = _inner_dtype(model, accelerator.unwrap_model(model)[0], x)
    _check(results, "fp16: compute dtype float16, output float32",
           lambda: _expect((inner, outer) == (torch.float16, torch.float32), f"got {inner}, {outer}"))

    def train() -> str:
        losses = []
        for _ in range(50):
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        _expect(losses[-1] < losses[0] * 0.5, f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        return f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"

    _check(results, "fp16: trains with GradScaler and clipping", train)

    def overflow() -> str:
        before = [p.detach().clone() for p in model.parameters()]
        scale = accelerator.scaler.get_scale()
        bad = x.clone()
        bad[0, 0] = float("inf")
        accelerator.backward(nn.functional.mse_loss(model(bad), y))
        optimizer.step()
        optimizer.zero_grad()
        _expect(accelerator.optimizer_step_was_skipped, "step not reported as skipped")
        _expect(all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "weights changed")
        _expect(accelerator.scaler.get_scale() == scale / 2, "scale not halved")
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
        _expect(not accelerator.optimizer_step_was_skipped, "next step skipped too")
        return f"scale {scale:g} -> {scale / 2:g}"

    _check(results, "fp16: inf gradients skip the step", overflow)

    def checkpoint() -> str:
        accelerator.save_state(folder)  # one folder for every rank: save_state is collective
        expected = torch.rand(3, device=accelerator.device).tolist()
        weights = [p.detach().clone() for p in model.parameters()]
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
        accelerator.load_state(folder)
        _expect(torch.rand(3, device=accelerator.device).tolist() == expected, "CUDA RNG not restored")
        _expect(all(torch.equal(a, b) for a, b in zip(weights, model.parameters())), "weights not restored")
        return ""

    _check(results, "fp16: save_state/load_state on CUDA (weights, CUDA RNG)", checkpoint)
    _check(results, "gather on CUDA",
           lambda: _expect(accelerator.gather(torch.ones(2, device=accelerator.device)).numel()
                           == 2 * accelerator.num_processes, "wrong size"))


def _bf16_checks(results: list) -> None:
    from notebook_launcher.accelerator import Accelerator

    device = torch.device("cuda", torch.cuda.current_device())
    native = torch.cuda.get_device_capability(device) >= (8, 0)
    if not native:
        def refused() -> str:
            try:
                Accelerator(mixed_precision="bf16")
            except ValueError as exc:
                return f"refused: {exc}"
            raise AssertionError("bf16 accepted on a GPU without native bf16")

        _check(results, "bf16: refused on a GPU without native bf16", refused)
        return
    accelerator = Accelerator(mixed_precision="bf16")
    _check(results, "bf16: no GradScaler", lambda: _expect(accelerator.scaler is None, "a scaler was made"))
    model = accelerator.prepare(nn.Sequential(nn.Linear(32, 1)))
    x = torch.randn(8, 32, device=accelerator.device)
    inner, outer = _inner_dtype(model, accelerator.unwrap_model(model)[0], x)
    _check(results, "bf16: compute dtype bfloat16, output float32",
           lambda: _expect((inner, outer) == (torch.bfloat16, torch.float32), f"got {inner}, {outer}"))
    with accelerator.autocast():
        product = x @ x.T
    _check(results, "bf16: autocast() block", lambda: _expect(product.dtype == torch.bfloat16, str(product.dtype)))


def gpu_checks(folder: str) -> list:
    """Runs in each worker; returns (name, ok, detail) rows."""
    results: list = []
    try:
        _fp16_checks(results, folder)
        _bf16_checks(results)
    except Exception as exc:
        results.append(("setup", False, f"{type(exc).__name__}: {exc}"))
    return results


def main() -> int:
    gpus = cuda_device_count()
    if gpus == 0:
        print("no CUDA, skipped")
        return 0
    failed = 0
    for nproc in sorted({1, min(2, gpus)}):
        with tempfile.TemporaryDirectory() as folder:
            rows = notebook_launcher(gpu_checks, args=(folder,), num_processes=nproc, mixed_precision="fp16",
                                     device="cuda", return_all=True, display="none")
        for rank, rank_rows in enumerate(rows):
            for name, ok, detail in rank_rows:
                failed += not ok
                print(f"{'PASS' if ok else 'FAIL'} [{nproc} GPU{'s' if nproc > 1 else ''}, rank {rank}] {name}"
                      + (f" ({detail})" if detail else ""))
    parent_clean = not torch.cuda.is_initialized()
    failed += not parent_clean
    print(f"{'PASS' if parent_clean else 'FAIL'} parent process never initialized CUDA")
    print("all passed" if not failed else f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
