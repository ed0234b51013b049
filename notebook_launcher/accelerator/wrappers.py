"""Optimizer and LR-scheduler wrappers that know about accumulation and the grad scaler.

`AcceleratedOptimizer.step()` does nothing on accumulation micro-steps, goes through the
grad scaler under fp16 (which skips the update when gradients overflowed), and records
whether the step was skipped. `zero_grad()` likewise waits for the real step, so the
usual ``step(); zero_grad()`` loop inside ``accumulate()`` is right as written.

`AcceleratedScheduler.step()` steps only after a real optimizer update. With
``split_batches=False`` one update consumes ``num_processes`` of the loader's original
batches, so the scheduler is stepped that many times: a schedule written for the
single-process loader length ends at the same point (HF accelerate's convention).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from .state import GradientState


class AcceleratedOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer; ``isinstance(wrapped, torch.optim.Optimizer)`` stays true."""

    def __init__(self, optimizer: torch.optim.Optimizer, gradient_state: GradientState,
                 scaler: Optional[torch.amp.GradScaler] = None) -> None:
        # Deliberately no super().__init__: every bit of state lives in the wrapped optimizer.
        self.optimizer = optimizer
        self.gradient_state = gradient_state
        self.scaler = scaler
        self._skipped = False

    # Views on the wrapped optimizer's state, so schedulers and user code see the real thing.
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: Optional[bool] = None) -> None:
        if not self.gradient_state.sync_gradients:
            return  # keep accumulating
        if "set_to_none" in inspect.signature(self.optimizer.zero_grad).parameters:
            self.optimizer.zero_grad(set_to_none=True if set_to_none is None else set_to_none)
        else:
            self.optimizer.zero_grad()

    def step(self, closure=None):
        if not self.gradient_state.sync_gradients:
            return None
        if self.scaler is None:
            self._skipped = False
            return self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        # GradScaler skips optimizer.step() when it found inf/NaN gradients and then
        # lowers the scale: a lower scale after update() is exactly "this step was skipped".
        before = self.scaler.get_scale()
        result = self.scaler.step(self.optimizer, closure) if closure is not None else self.scaler.step(self.optimizer)
        self.scaler.update()
        self._skipped = self.scaler.get_scale() < before
        return result

    @property
    def step_was_skipped(self) -> bool:
        """Whether the last real step was skipped because gradients overflowed (fp16)."""
        return self._skipped

    def train(self) -> None:
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()

    def eval(self) -> None:
        if callable(getattr(self.optimizer, "eval", None)):
            self.optimizer.eval()

    def __getattr__(self, name):
        # Anything else (e.g. an optimizer's own extra methods) from the wrapped optimizer.
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"AcceleratedOptimizer({self.optimizer!r})"


class AcceleratedScheduler:
    """Wraps an LR scheduler so it follows the optimizer's real steps."""

    def __init__(self, scheduler, optimizers: list, gradient_state: GradientState, num_processes: int,
                 split_batches: bool = False, step_with_optimizer: bool = True) -> None:
        self.scheduler = scheduler
        self.optimizers = optimizers
        self.gradient_state = gradient_state
        self.num_processes = num_processes
        self.split_batches = split_batches
        self.step_with_optimizer = step_with_optimizer

    def step(self, *args, **kwargs) -> None:
        if not self.step_with_optimizer:
            self.scheduler.step(*args, **kwargs)
            return
        if not self.gradient_state.sync_gradients:
            return  # an accumulation micro-step: the optimizer did not move
        if any(opt.step_was_skipped for opt in self.optimizers):
            return  # the fp16 scaler skipped the update: the schedule waits too
        repeats = 1 if self.split_batches else self.num_processes
        for _ in range(repeats):
            total = getattr(self.scheduler, "total_steps", None)  # OneCycleLR refuses to step past its end
            if total is not None and self.scheduler.last_epoch + 1 > total:
                break
            self.scheduler.step(*args, **kwargs)

    def get_last_lr(self):
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name):
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __repr__(self) -> str:
        return f"AcceleratedScheduler({self.scheduler!r})"
