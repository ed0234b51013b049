"""`Accelerator`: the training-loop toolkit, with HF accelerate's names and meanings.

It is a facade: process facts come from `state`, precision from `precision`, sharded
loaders from `data`, optimizer/scheduler behaviour from `wrappers`, collectives from
`collectives` and checkpoints from `checkpointing`. What lives here is the bookkeeping
that ties them together: which objects were prepared, and the gradient-sync state.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import warnings
import weakref
from typing import Any, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .. import reporting
from ..trackers import names as tracker_names
from ..trackers.messages import flatten
from ..workers import context
from . import checkpointing, collectives, precision
from .checkpointing import Parts, ProjectConfiguration
from .data import DataLoaderShard, shard_data_loader
from .state import DistributedType, GradientState, ProcessState, check_mixed_precision_name, default_mixed_precision, detect
from .tracking import TrackerClient, WorkerTracker, as_number
from .wrappers import AcceleratedOptimizer, AcceleratedScheduler

# Models and optimizers already given to some Accelerator's prepare() in this process. A
# forked worker starts with an empty set: what the notebook prepared is a fresh copy there.
_prepared_in: dict = {}


def _prepared() -> "weakref.WeakSet":
    return _prepared_in.setdefault(os.getpid(), weakref.WeakSet())

_HANDLER_KINDS = {
    "DistributedDataParallelKwargs": "ddp",
    "GradScalerKwargs": "scaler",
    "AutocastKwargs": "autocast",
}


class Accelerator:
    """Distributed training and mixed precision for a plain PyTorch loop.

    Inside a `notebook_launcher` worker it uses the launcher's process group, device and
    ``mixed_precision``; in a plain process it is a one-process job. The same loop runs
    unchanged in both.

    Args:
        device_placement: move prepared models and batches to `device`.
        split_batches: the loader's batch size is the global one (split between ranks)
            instead of the per-rank one.
        mixed_precision: "no" | "fp16" | "bf16"; None takes what the launcher was given.
        gradient_accumulation_steps: micro-steps per optimizer update, used by `accumulate`.
        cpu: force the CPU in a plain process.
        dataloader_config: a `DataLoaderConfiguration` (``split_batches``, ``even_batches``).
        project_dir, project_config: where `save_state` writes (see `ProjectConfiguration`).
        gradient_accumulation_plugin: an object with ``num_steps`` (and optionally
            ``sync_with_dataloader``), e.g. HF accelerate's plugin.
        step_scheduler_with_optimizer: step prepared schedulers only on real optimizer steps.
        kwargs_handlers: HF accelerate's ``DistributedDataParallelKwargs``,
            ``GradScalerKwargs`` or ``AutocastKwargs`` (anything with those class names and
            a ``to_kwargs()`` method).
        log_with: experiment trackers, as in HF accelerate: "tensorboard", "mlflow", "wandb",
            "trackio", a list of them, or "all" (every one installed). They run in the
            notebook process, fed by rank 0 (see `init_trackers`); `log` also feeds the
            dashboard, with or without trackers. A tracker that is not installed is an
            error naming its pip package.
        logging_dir: where trackers that write files (TensorBoard) put them; default
            ``project_dir``.
        rng_types: accepted for compatibility: prepared loaders share their shuffle seed,
            so there is nothing to sync.

    Example::

        def train():
            accelerator = Accelerator()
            model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
            for x, y in loader:
                loss = torch.nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                accelerator.log({"loss": loss.item()})

        notebook_launcher(train, num_processes=2, mixed_precision="bf16")
    """

    def __init__(self, device_placement: bool = True, split_batches: Optional[bool] = None,
                 mixed_precision: Optional[str] = None, gradient_accumulation_steps: int = 1, cpu: bool = False,
                 dataloader_config: Any = None, rng_types: Any = None, log_with: Any = None,
                 project_dir: Optional[str] = None, project_config: Optional[ProjectConfiguration] = None,
                 gradient_accumulation_plugin: Any = None, step_scheduler_with_optimizer: bool = True,
                 kwargs_handlers: Optional[list] = None, logging_dir: Optional[str] = None) -> None:
        del rng_types  # prepared loaders share one shuffle seed across ranks: nothing to synchronize
        # The launcher checks log_with before any process starts; this is the fallback.
        self.log_with = tracker_names.check_installed(log_with, in_worker=context.current() is not None)
        self._process = detect(cpu=cpu)
        requested = default_mixed_precision() if mixed_precision is None else mixed_precision
        self._mixed_precision = check_mixed_precision_name(requested)
        precision.check_supported(self._mixed_precision, self._process.device)
        self._handler_kwargs = _handler_kwargs(kwargs_handlers)
        self.scaler = precision.make_scaler(self._mixed_precision, self._process.device,
                                            **self._handler_kwargs.get("scaler", {}))
        self.device_placement = device_placement
        self.split_batches = bool(getattr(dataloader_config, "split_batches", False))
        self.even_batches = bool(getattr(dataloader_config, "even_batches", True))
        if split_batches is not None:
            self.split_batches = bool(split_batches)
        self.step_scheduler_with_optimizer = step_scheduler_with_optimizer
        self.gradient_state = GradientState(**_accumulation(gradient_accumulation_steps, gradient_accumulation_plugin))
        self.project_configuration = project_config if project_config is not None else ProjectConfiguration()
        if logging_dir is not None:
            self.project_configuration.logging_dir = os.fspath(logging_dir)
        if project_dir is not None:
            self.project_configuration.set_directories(os.fspath(project_dir))
        tracker_names.check_logging_dir(self.log_with, self.logging_dir)
        self._trackers = TrackerClient(self.log_with, self._process.is_main_process)
        self.step = 0  # micro-steps since the last synced one (accumulate)
        self._models: list = []
        self._optimizers: list = []
        self._schedulers: list = []
        self._dataloaders: list = []
        self._custom_objects: list = []
        self._unsupported_log_keys: set = set()

    # ----------------------------------------------------------------- facts
    @property
    def state(self) -> ProcessState:
        return self._process

    @property
    def device(self) -> torch.device:
        return self._process.device

    @property
    def process_index(self) -> int:
        return self._process.process_index

    @property
    def local_process_index(self) -> int:
        return self._process.local_process_index

    @property
    def num_processes(self) -> int:
        return self._process.num_processes

    @property
    def is_main_process(self) -> bool:
        return self._process.is_main_process

    @property
    def is_local_main_process(self) -> bool:
        return self._process.is_local_main_process

    @property
    def is_last_process(self) -> bool:
        return self.process_index == self.num_processes - 1

    @property
    def distributed_type(self) -> DistributedType:
        return self._process.distributed_type

    @property
    def use_distributed(self) -> bool:
        return self._process.use_distributed

    @property
    def mixed_precision(self) -> str:
        return self._mixed_precision

    @property
    def native_amp(self) -> bool:
        return self._mixed_precision != "no"

    @property
    def sync_gradients(self) -> bool:
        """False on accumulation micro-steps, True when this step updates the weights."""
        return self.gradient_state.sync_gradients

    @sync_gradients.setter
    def sync_gradients(self, value: bool) -> None:
        self.gradient_state.sync_gradients = bool(value)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.gradient_state.num_steps

    @gradient_accumulation_steps.setter
    def gradient_accumulation_steps(self, value: int) -> None:
        self.gradient_state.num_steps = _accumulation(value, None)["num_steps"]

    @property
    def optimizer_step_was_skipped(self) -> bool:
        """Whether the last optimizer step was skipped (fp16 gradients overflowed)."""
        return any(opt.step_was_skipped for opt in self._optimizers)

    @property
    def project_dir(self) -> Optional[str]:
        return self.project_configuration.project_dir

    @property
    def logging_dir(self) -> Optional[str]:
        return self.project_configuration.logging_dir

    @property
    def save_iteration(self) -> int:
        return self.project_configuration.iteration

    # ----------------------------------------------------------------- prepare
    def prepare(self, *args, device_placement: Optional[list] = None):
        """Models, optimizers, DataLoaders and LR schedulers, made ready; same order back.

        Models go to `device` (and into DistributedDataParallel with more than one
        process); optimizers and schedulers learn about accumulation and fp16; loaders
        shard across ranks. Anything else comes back unchanged.

        Example::

            model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        """
        placements = list(device_placement) if device_placement is not None else [None] * len(args)
        if len(placements) != len(args):
            raise ValueError(f"device_placement has {len(placements)} entries for {len(args)} objects.")
        # Schedulers last: they must find the optimizer they drive already wrapped.
        result = [self._prepare_one(obj, place) if not _is_scheduler(obj) else obj
                  for obj, place in zip(args, placements)]
        result = [self.prepare_scheduler(obj) if _is_scheduler(obj) else obj for obj in result]
        return result[0] if len(result) == 1 else tuple(result)

    def _prepare_one(self, obj: Any, placement: Optional[bool]) -> Any:
        if isinstance(obj, torch.nn.Module):
            return self.prepare_model(obj, device_placement=placement)
        if isinstance(obj, torch.optim.Optimizer):
            return self.prepare_optimizer(obj, device_placement=placement)
        if isinstance(obj, DataLoader):
            return self.prepare_data_loader(obj, device_placement=placement)
        return obj

    def prepare_model(self, model: torch.nn.Module, device_placement: Optional[bool] = None,
                      evaluation_mode: bool = False) -> torch.nn.Module:
        """One model: on the device, under autocast when mixed precision, in DDP when distributed."""
        inner = model.module if isinstance(model, DistributedDataParallel) else model
        if inner in _prepared() or model in _prepared():
            raise ValueError(
                f"This {type(inner).__name__} was already passed to prepare(). Prepare each model once and "
                "keep using the object prepare() returned (a new Accelerator needs a new model)."
            )
        if isinstance(model, DistributedDataParallel):
            raise ValueError("prepare() wraps the model in DistributedDataParallel itself: pass the plain model.")
        place = self.device_placement if device_placement is None else device_placement
        if place:
            model = model.to(self.device)
        if self._mixed_precision != "no":
            precision.install_autocast_forward(model, self._mixed_precision, self.device,
                                               self._handler_kwargs.get("autocast"))
        else:
            precision.remove_autocast_forward(model)  # left by a prepare() in the notebook, before a fork
        _prepared().add(model)
        trainable = any(p.requires_grad for p in model.parameters())
        if self.use_distributed and trainable and not evaluation_mode:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None,
                                            **self._handler_kwargs.get("ddp", {}))
            _prepared().add(model)
        self._models.append(model)
        return model

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, device_placement: Optional[bool] = None):
        """One optimizer, wrapped so `step` knows about accumulation and the fp16 scaler."""
        if isinstance(optimizer, AcceleratedOptimizer) or optimizer in _prepared():
            raise ValueError("This optimizer was already passed to prepare(); prepare each optimizer once.")
        place = self.device_placement if device_placement is None else device_placement
        if place and optimizer.state:
            _move_optimizer_state(optimizer, self.device)
        _prepared().add(optimizer)
        wrapped = AcceleratedOptimizer(optimizer, self.gradient_state, self.scaler)
        self._optimizers.append(wrapped)
        return wrapped

    def prepare_scheduler(self, scheduler) -> AcceleratedScheduler:
        """One LR scheduler, stepped only on real optimizer steps."""
        if isinstance(scheduler, AcceleratedScheduler):
            raise ValueError("This scheduler was already passed to prepare(); prepare each scheduler once.")
        target = getattr(scheduler, "optimizer", None)
        optimizers = [opt for opt in self._optimizers if target is opt or target is opt.optimizer]
        wrapped = AcceleratedScheduler(scheduler, optimizers, self.gradient_state, self.num_processes,
                                       split_batches=self.split_batches,
                                       step_with_optimizer=self.step_scheduler_with_optimizer)
        self._schedulers.append(wrapped)
        return wrapped

    def prepare_data_loader(self, data_loader: DataLoader, device_placement: Optional[bool] = None) -> DataLoaderShard:
        """One DataLoader, sharded across ranks (the same shuffle on every rank, new each epoch)."""
        place = self.device_placement if device_placement is None else device_placement
        shard = shard_data_loader(data_loader, self._process, self.gradient_state, seed=self._shared_seed,
                                  split_batches=self.split_batches, even_batches=self.even_batches,
                                  device_placement=place)
        self._dataloaders.append(shard)
        return shard

    def _shared_seed(self, generator: Optional[torch.Generator]) -> int:
        # Every rank draws (so RNG streams stay aligned across ranks); rank 0's draw wins.
        drawn = int(torch.empty((), dtype=torch.int64).random_(0, 2**62, generator=generator))
        return collectives.broadcast_int(drawn, self._process)

    def skip_first_batches(self, dataloader: DataLoaderShard, num_batches: int = 0) -> DataLoaderShard:
        """A view of a prepared loader whose next epoch starts after ``num_batches`` batches
        (to resume mid-epoch after `load_state`). It shares the epoch count with ``dataloader``.
        """
        if not isinstance(dataloader, DataLoaderShard):
            raise TypeError("skip_first_batches() takes a DataLoader returned by prepare().")
        return dataloader.skipping(num_batches)

    # ----------------------------------------------------------------- training step
    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``loss.backward()``, divided by the accumulation steps and scaled under fp16."""
        loss = loss / self.gradient_accumulation_steps
        if self.scaler is not None:
            self.scaler.scale(loss).backward(**kwargs)
        else:
            loss.backward(**kwargs)

    def autocast(self, autocast_handler: Any = None):
        """Context manager: run the block in this Accelerator's mixed precision.

        Prepared models already run their forward under it; use this for code outside them.
        """
        kwargs = dict(self._handler_kwargs.get("autocast", {}))
        if autocast_handler is not None:
            kwargs.update(autocast_handler.to_kwargs())
        return precision.autocast(self._mixed_precision, self.device, **kwargs)

    def _do_sync(self) -> None:
        if self.gradient_state.sync_with_dataloader and self.gradient_state.end_of_dataloader:
            self.step = 0  # the epoch ends: apply what was accumulated
            self.gradient_state.sync_gradients = True
        else:
            self.step += 1
            self.gradient_state.sync_gradients = self.step % self.gradient_accumulation_steps == 0

    @contextlib.contextmanager
    def accumulate(self, *models):
        """Context manager for one micro-step of gradient accumulation.

        Every ``gradient_accumulation_steps``-th call (and the last batch of a prepared
        loader) syncs gradients and lets the optimizer step; the others skip DDP's
        all-reduce and leave optimizer.step()/zero_grad() as no-ops.

        Example::

            for x, y in loader:
                with accelerator.accumulate(model):
                    accelerator.backward(loss_fn(model(x), y))
                    optimizer.step()
                    optimizer.zero_grad()
        """
        self._do_sync()
        with contextlib.ExitStack() as stack:
            if not self.sync_gradients:
                for model in models:
                    stack.enter_context(self.no_sync(model))
            yield

    @contextlib.contextmanager
    def no_sync(self, model):
        """Context manager: no gradient all-reduce for backward passes inside it."""
        with (model.no_sync() if self.use_distributed and isinstance(model, DistributedDataParallel)
              else contextlib.nullcontext()):
            yield

    def unscale_gradients(self, optimizer=None) -> None:
        """Divide fp16-scaled gradients back to their true size (before clipping or inspecting)."""
        if self.scaler is None:
            return
        targets = self._optimizers if optimizer is None else (optimizer if isinstance(optimizer, (list, tuple))
                                                              else [optimizer])
        for opt in targets:
            self.scaler.unscale_(opt.optimizer if isinstance(opt, AcceleratedOptimizer) else opt)

    def clip_grad_norm_(self, parameters, max_norm: float, norm_type: float = 2.0):
        """``torch.nn.utils.clip_grad_norm_`` on true (unscaled) gradients; returns the total norm.

        Only on steps that update the weights: on accumulation micro-steps the gradients
        are partial (and, under fp16, still scaled), so this returns None and changes nothing.
        """
        if not self.sync_gradients:
            return None
        self.unscale_gradients()
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)

    def clip_grad_value_(self, parameters, clip_value: float) -> None:
        """``torch.nn.utils.clip_grad_value_`` on true gradients (on weight-updating steps only)."""
        if not self.sync_gradients:
            return
        self.unscale_gradients()
        torch.nn.utils.clip_grad_value_(parameters, clip_value)

    # ----------------------------------------------------------------- collectives
    def gather(self, tensor):
        """Every rank's tensors concatenated along dim 0 (nested structures too)."""
        return collectives.gather(tensor, self._process)

    def gather_for_metrics(self, input_data, use_gather_object: bool = False):
        """`gather`, minus the samples repeated to even out the last batch of a prepared loader,
        so each example counts once. Non-tensor data is gathered as objects.

        Example::

            for x, y in eval_loader:
                predictions, labels = accelerator.gather_for_metrics((model(x).argmax(-1), y))
        """
        as_objects = use_gather_object or not collectives.only_tensors(input_data)
        data = (collectives.gather_object(input_data, self._process) if as_objects
                else collectives.gather(input_data, self._process))
        if self.gradient_state.end_of_dataloader and self.gradient_state.remainder > 0:
            return collectives.truncate(data, self.gradient_state.remainder, as_objects)
        return data

    def reduce(self, tensor, reduction: str = "sum", scale: float = 1.0):
        """Tensors summed ("sum"), averaged ("mean"), max/min-ed across ranks; every rank gets it."""
        return collectives.reduce(tensor, self._process, reduction, scale)

    def pad_across_processes(self, tensor, dim: int = 0, pad_index: Any = 0, pad_first: bool = False):
        """Tensors padded along ``dim`` to the largest size on any rank."""
        return collectives.pad_across_processes(tensor, self._process, dim, pad_index, pad_first)

    def split_between_processes(self, inputs, apply_padding: bool = False):
        """Context manager giving this rank its contiguous share of ``inputs``."""
        return collectives.split_between_processes(inputs, self._process, apply_padding)

    def wait_for_everyone(self) -> None:
        """Block until every rank reaches this point."""
        collectives.barrier(self._process)

    @contextlib.contextmanager
    def main_process_first(self):
        """Context manager: the main process runs the block first (e.g. to download), then the rest."""
        with self._first(self.is_main_process):
            yield

    @contextlib.contextmanager
    def local_main_process_first(self):
        """Like `main_process_first`, with the first process of each machine going first."""
        with self._first(self.is_local_main_process):
            yield

    @contextlib.contextmanager
    def _first(self, leader: bool):
        if not leader:
            self.wait_for_everyone()
        yield
        if leader:
            self.wait_for_everyone()

    def print(self, *args, **kwargs) -> None:
        """``print`` on the main process only."""
        if self.is_main_process:
            builtins.print(*args, **kwargs)

    # ----------------------------------------------------------------- models and checkpoints
    def unwrap_model(self, model, keep_fp32_wrapper: bool = True) -> torch.nn.Module:
        """The user's own module: without DDP (and torch.compile's wrapper); with
        ``keep_fp32_wrapper=False`` also without the autocast forward."""
        while isinstance(model, DistributedDataParallel) or hasattr(model, "_orig_mod"):
            model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
        if not keep_fp32_wrapper:
            precision.remove_autocast_forward(model)
        return model

    def get_state_dict(self, model, unwrap: bool = True) -> dict:
        return (self.unwrap_model(model) if unwrap else model).state_dict()

    def save_model(self, model, save_directory: str, max_shard_size="1GB", safe_serialization: bool = True) -> str:
        """Write the unwrapped model's weights once, from the main process, in HF's layout:
        ``model.safetensors`` (``pytorch_model.bin`` when not ``safe_serialization``), or,
        past ``max_shard_size`` ("1GB", "500MB", "2GiB" or bytes), numbered shards and a
        ``model.safetensors.index.json`` that HF's loaders read. Every rank calls it; returns
        the file to load from (``notebook_launcher.accelerator.load_weights`` reads it back).

        Example::

            accelerator.save_model(model, "out", max_shard_size="200MB")
            model.load_state_dict(load_weights("out"))
        """
        return checkpointing.save_model(self.unwrap_model(model), os.fspath(save_directory), self._process,
                                        max_shard_size, safe_serialization)

    def save(self, obj, f, safe_serialization: bool = False) -> None:
        """``torch.save`` (or safetensors for a dict of tensors) from the main process only."""
        if self.is_main_process or (self.project_configuration.save_on_each_node and self.is_local_main_process):
            if safe_serialization:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in obj.items()}, f, metadata={"format": "pt"})
            else:
                torch.save(obj, f)

    def register_for_checkpointing(self, *objects) -> None:
        """Objects with ``state_dict()``/``load_state_dict()`` to include in `save_state`."""
        invalid = [type(obj).__name__ for obj in objects
                   if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)))]
        if invalid:
            raise TypeError(f"register_for_checkpointing needs objects with state_dict() and load_state_dict(); "
                            f"these have not: {', '.join(invalid)}.")
        self._custom_objects.extend(objects)

    def _parts(self) -> Parts:
        return Parts(models=[self.unwrap_model(m) for m in self._models], optimizers=list(self._optimizers),
                     schedulers=list(self._schedulers), dataloaders=list(self._dataloaders), scaler=self.scaler,
                     custom=list(self._custom_objects))

    def save_state(self, output_dir: Optional[str] = None, safe_serialization: bool = True) -> str:
        """Checkpoint everything prepared or registered, plus every rank's RNG streams.

        Without ``output_dir``, uses ``project_dir/checkpoints/checkpoint_<iteration>``
        (needs ``automatic_checkpoint_naming``). Every rank must call it. Returns the folder.
        """
        folder = checkpointing.folder_for_save(output_dir, self.project_configuration, self._process)
        checkpointing.write_state(folder, self._parts(), self._process, self.project_configuration,
                                  safe_serialization)
        self.project_configuration.iteration += 1
        return folder

    def load_state(self, input_dir: Optional[str] = None) -> str:
        """Restore a `save_state` checkpoint (the newest automatic one without ``input_dir``)
        into the objects prepared (and registered) in the same order. Returns the folder."""
        folder = checkpointing.folder_for_load(input_dir, self.project_configuration)
        checkpointing.read_state(folder, self._parts(), self._process)
        following = checkpointing.iteration_after(folder)
        if self.project_configuration.automatic_checkpoint_naming and following is not None:
            self.project_configuration.iteration = max(self.project_configuration.iteration, following)
        return folder

    def free_memory(self, *objects) -> list:
        """Forget everything prepared; returns ``None`` for each object passed, so that
        ``model, optimizer = accelerator.free_memory(model, optimizer)`` drops them too."""
        self._models.clear()
        self._optimizers.clear()
        self._schedulers.clear()
        self._dataloaders.clear()
        self._custom_objects.clear()
        self.step = 0
        return [None] * len(objects)

    clear = free_memory

    # ----------------------------------------------------------------- dashboard and trackers
    def init_trackers(self, project_name: str, config: Optional[dict] = None, init_kwargs: Optional[dict] = None):
        """Open a run in each ``log_with`` tracker, recording ``config`` as its hyperparameters.

        Call it on every rank (only rank 0's call is sent). The runs open in the notebook
        process, which also closes them when the launch ends (failed or interrupted runs
        are marked so where the tracker can), or at `end_training`. ``init_kwargs`` holds
        each tracker's own options under its name, as in HF accelerate.

        Example::

            accelerator = Accelerator(log_with=["tensorboard", "mlflow"], project_dir="runs")
            accelerator.init_trackers("mnist", config={"lr": 3e-4, "batch_size": 64},
                                      init_kwargs={"mlflow": {"run_name": "baseline"}})
        """
        self._trackers.init(project_name, config, init_kwargs, self.logging_dir)

    def log(self, values: dict, step: Optional[int] = None, log_kwargs: Optional[dict] = None) -> None:
        """Send values to the live dashboard and, after `init_trackers`, to the trackers.

        Nested dicts become "a/b" names. The dashboard plots numbers; trackers also take
        strings. ``log_kwargs`` holds per-tracker options, e.g. ``{"wandb": {"commit": False}}``.
        Outside a launched worker the dashboard part does nothing.

        Example::

            accelerator.log({"train/loss": loss.item(), "lr": scheduler.get_last_lr()[0]}, step=step)
        """
        metrics, text = {}, {}
        for name, value in flatten(values):
            number = as_number(value)
            if number is not None:
                metrics[name] = number
            elif isinstance(value, str) and self._trackers.initialized:
                text[name] = value
            elif name not in self._unsupported_log_keys:
                self._unsupported_log_keys.add(name)
                warnings.warn(f"Accelerator.log: {name!r} is not a number ({type(value).__name__}); "
                              "the dashboard plots numbers (and trackers take numbers and strings), "
                              "so it is left out.", stacklevel=2)
        if "step" in metrics:  # report() takes the step as its own argument
            logged_step = metrics.pop("step")
            step = int(logged_step) if step is None else step
        reporting.report(step=step, **metrics)
        self._trackers.log({**metrics, **text}, step, log_kwargs, reported=True, plain=True)

    def get_tracker(self, name: str, unwrap: bool = False) -> WorkerTracker:
        """The tracker ``name`` (one of ``log_with``), after `init_trackers`.

        Its ``log`` and ``store_init_configuration`` work from any rank (rank 0's are
        recorded). The real object (``unwrap=True``, ``.writer``, ``.run``) lives in the
        notebook process, so asking for it here raises an error that says so.

        Example::

            accelerator.get_tracker("tensorboard").log({"val/acc": acc}, step=epoch)
        """
        if name not in self.log_with:
            raise ValueError(f"{name!r} is not an available tracker stored inside the Accelerator "
                             f"(log_with={list(self.log_with)}).")
        if not self._trackers.initialized:
            raise ValueError(f"get_tracker({name!r}) needs init_trackers(...) first.")
        tracker = WorkerTracker(name, self._trackers)
        return tracker.tracker if unwrap else tracker

    @property
    def trackers(self) -> list:
        """The `WorkerTracker` of each ``log_with`` tracker, once `init_trackers` ran."""
        return [WorkerTracker(name, self._trackers) for name in self.log_with] if self._trackers.initialized else []

    def end_training(self) -> None:
        """Close the tracker runs, wait for every rank and push the last metrics to the dashboard.

        The process group stays: the launcher owns it (and closes it when the function returns).
        """
        self._trackers.end()
        self.wait_for_everyone()
        ctx = context.current()
        if ctx is not None:
            flush = getattr(ctx.channel, "flush", None) or ctx.channel._flush
            try:
                flush()
            except OSError:
                pass  # the parent is gone; the watchdog ends this worker

    def __repr__(self) -> str:
        return (f"Accelerator(process {self.process_index} of {self.num_processes}, device={self.device}, "
                f"mixed_precision={self.mixed_precision!r}, distributed_type={self.distributed_type.value})")


# ----------------------------------------------------------------- helpers
def _is_scheduler(obj: Any) -> bool:
    return isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau))


def _accumulation(steps: Any, plugin: Any) -> dict:
    sync_with_dataloader = True
    if plugin is not None:
        if steps not in (1, None):
            raise ValueError("Give gradient_accumulation_steps or gradient_accumulation_plugin, not both.")
        steps = plugin.num_steps
        sync_with_dataloader = bool(getattr(plugin, "sync_with_dataloader", True))
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be an integer >= 1, got {steps!r}.")
    return {"num_steps": steps, "sync_with_dataloader": sync_with_dataloader}


def _handler_kwargs(handlers: Optional[list]) -> dict:
    kwargs: dict = {}
    for handler in handlers or []:
        kind = _HANDLER_KINDS.get(type(handler).__name__)
        if kind is None or not callable(getattr(handler, "to_kwargs", None)):
            raise ValueError(f"Unsupported kwargs handler {type(handler).__name__}; supported: "
                             f"{', '.join(_HANDLER_KINDS)}.")
        if kind in kwargs:
            raise ValueError(f"Only one {type(handler).__name__} may be given.")
        kwargs[kind] = handler.to_kwargs()
    return kwargs


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for per_param in optimizer.state.values():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and key != "step":
                per_param[key] = value.to(device)
