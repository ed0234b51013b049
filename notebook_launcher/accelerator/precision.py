"""Mixed precision: which dtype, whether the device can do it, autocast and the grad scaler.

fp16 runs the forward pass under ``torch.autocast(dtype=float16)`` and scales the loss
with a `torch.amp.GradScaler` so small gradients do not underflow; a step whose
gradients overflowed is skipped and the scale lowered (`CountingGradScaler` counts those
steps, and the rank sends the scale and the count to the dashboard). bf16 has fp32's range, so it
needs autocast only. Both work on CPU (torch >= 2.3) and on CUDA (bf16 from Ampere on).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Optional

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def compute_dtype(mixed_precision: str) -> Optional[torch.dtype]:
    return DTYPES.get(mixed_precision)


def check_supported(mixed_precision: str, device: torch.device) -> None:
    """Raise a clear error when ``device`` cannot run ``mixed_precision``.

    Only called for the device this process trains on, so asking CUDA about bf16
    happens in a process that is about to use the GPU anyway.

    Example::

        check_supported("bf16", torch.device("cpu"))   # fine
    """
    if mixed_precision == "no":
        return
    if device.type == "cuda" and mixed_precision == "bf16" and not _cuda_bf16_supported(device):
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"mixed_precision='bf16' needs a GPU with native bfloat16 (compute capability 8.0, "
            f"Ampere or newer); {name} is {major}.{minor}. Use mixed_precision='fp16' instead."
        )
    _check_autocast(mixed_precision, device)
    if mixed_precision == "fp16":
        _check_scaler(device)


def _cuda_bf16_supported(device: torch.device) -> bool:
    # Newer torch reports True for GPUs that only emulate bf16 (slowly); ask for the real thing.
    with torch.cuda.device(device):
        if "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.cuda.is_bf16_supported()


def _check_autocast(mixed_precision: str, device: torch.device) -> None:
    # torch only warns (and silently disables autocast) for an unsupported dtype: make it an error.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.autocast(device.type, dtype=DTYPES[mixed_precision])
        except RuntimeError as exc:
            raise ValueError(f"mixed_precision={mixed_precision!r} is not available on {device}: {exc}") from None
    problems = [str(w.message) for w in caught if "autocast" in str(w.message).lower()]
    if problems:
        raise ValueError(
            f"mixed_precision={mixed_precision!r} is not available on {device}: {problems[0].splitlines()[0]} "
            f"Use {'bf16' if mixed_precision == 'fp16' else 'fp16'} or 'no'."
        )


def _check_scaler(device: torch.device) -> None:
    try:
        make_scaler("fp16", device)
    except (AttributeError, TypeError, RuntimeError) as exc:
        raise ValueError(
            f"mixed_precision='fp16' on {device.type} needs torch.amp.GradScaler('{device.type}') "
            f"(torch >= 2.3 for CPU); this torch {torch.__version__} has none ({exc}). "
            "Use mixed_precision='bf16', which needs no scaler."
        ) from None


def make_scaler(mixed_precision: str, device: torch.device, **kwargs) -> Optional[Any]:
    """The grad scaler fp16 needs (a `CountingGradScaler`), None otherwise."""
    if mixed_precision != "fp16":
        return None
    return CountingGradScaler(device.type, **kwargs)


class CountingGradScaler(torch.amp.GradScaler):
    """torch's GradScaler that also counts the optimizer steps it skipped (an inf or nan
    gradient) for the dashboard (`scaler_facts`, read by the rank's device-stats thread).

    The count stays on the scaler's device and is added to without a synchronisation: the
    training loop pays nothing; the thread that reads it once a second does the waiting.

    Example::

        scaler = make_scaler("fp16", torch.device("cpu"))
        ... scaler.step(opt); scaler.update()
        scaler_facts()          # (65536.0, 0)
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skipped_steps: Any = 0   # an int until the first update, then a tensor on the scale's device
        _scalers[:] = [self]          # the newest scaler of this process is the one shown

    def update(self, new_scale=None) -> None:
        if self.is_enabled() and new_scale is None and self._per_optimizer_states:
            found = [f for state in self._per_optimizer_states.values()
                     for f in state["found_inf_per_device"].values()]
            if found:   # the same found-inf tensors the update backs the scale off on
                skipped = (torch.stack([f.to(self._scale.device, non_blocking=True) for f in found]).sum() > 0)
                self.skipped_steps = self.skipped_steps + skipped.to(torch.int64)
        super().update(new_scale)

    def facts(self) -> tuple:
        """(the current scale, the steps skipped so far); synchronises with the device."""
        return float(self.get_scale()), int(self.skipped_steps)


# [this process's newest CountingGradScaler], kept after its Accelerator is gone: the task's
# end posts its last figures after the function returned. (A scale and a count: a few bytes.)
_scalers: list = []


def scaler_facts() -> tuple:
    """(loss scale, skipped steps) of this process's newest fp16 scaler; (None, None) without one."""
    scaler = _scalers[-1] if _scalers else None
    if scaler is None or not scaler.is_enabled():
        return None, None
    try:
        return scaler.facts()
    except Exception:   # read from another thread while the device is in trouble
        return None, None


def autocast(mixed_precision: str, device: torch.device, **kwargs):
    """``torch.autocast`` for ``mixed_precision`` on ``device``; a no-op context for "no"."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[mixed_precision], **kwargs)


def outputs_to_fp32(value: Any) -> Any:
    """Half-precision tensors in a (nested) model output, back in float32.

    The loss computed from a model's output then runs in full precision, as users of
    accelerate expect from a prepared model.
    """
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(outputs_to_fp32(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(outputs_to_fp32(v) for v in value)
    if isinstance(value, dict):
        converted = {k: outputs_to_fp32(v) for k, v in value.items()}
        try:
            return type(value)(converted)
        except TypeError:
            return converted
    return value


class AutocastForward:
    """Replaces a prepared model's ``forward``: runs it under autocast, outputs in fp32.

    A plain object (not a closure), so the model still pickles. The original forward is
    the class's own, unless the instance had one of its own before.
    """

    def __init__(self, module: torch.nn.Module, mixed_precision: str, device: torch.device,
                 autocast_kwargs: Optional[dict] = None) -> None:
        self.module = module
        self.own_forward = module.__dict__.get("forward")  # an instance-level forward, if any
        self.mixed_precision = mixed_precision
        self.device_type = device.type
        self.autocast_kwargs = dict(autocast_kwargs or {})

    def __call__(self, *args, **kwargs):
        forward = self.own_forward or type(self.module).forward.__get__(self.module)
        with torch.autocast(self.device_type, dtype=DTYPES[self.mixed_precision], **self.autocast_kwargs):
            output = forward(*args, **kwargs)
        return outputs_to_fp32(output)


def install_autocast_forward(module: torch.nn.Module, mixed_precision: str, device: torch.device,
                             autocast_kwargs: Optional[dict] = None) -> None:
    remove_autocast_forward(module)  # e.g. prepared in the notebook, then again in a forked worker
    module.forward = AutocastForward(module, mixed_precision, device, autocast_kwargs)


def remove_autocast_forward(module: torch.nn.Module) -> None:
    wrapper = module.__dict__.get("forward")
    if isinstance(wrapper, AutocastForward):
        if wrapper.own_forward is not None:
            module.forward = wrapper.own_forward
        else:
            del module.forward
