"""DataLoaders that shard across ranks.

Every rank computes the same global order of sample indices for an epoch (a shuffle
seeded by one seed all ranks share, plus the epoch number), cuts it into global batches
and keeps its own slice of each. With ``split_batches=False`` each rank gets the
loader's ``batch_size`` (the global batch is ``batch_size * num_processes``); with
``True`` the loader's batch is the global one and each rank gets an equal part.

With ``even_batches`` (the default), a last global batch that is short is completed
with samples from the start of the epoch, so every rank runs the same number of steps
of the same size (DDP needs that). `remainder` says how many samples of that last
global batch are real, which is what `gather_for_metrics` uses to drop the padding.

Index layout, 2 ranks, batch 4, 13 samples (``r`` = rank)::

    global batch 0: [0 1 2 3 | 4 5 6 7]       r0 gets 0-3, r1 gets 4-7
    global batch 1: [8 9 10 11 | 12 0 1 2]     padded with 0 1 2; remainder = 5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from .state import GradientState, LoaderPosition, ProcessState


# ----------------------------------------------------------------- the global order of one epoch
class SeededShuffle:
    """A `RandomSampler`'s order, reproducible from (seed, epoch) alone."""

    def __init__(self, n: int, seed: int, replacement: bool = False, num_samples: Optional[int] = None) -> None:
        self.n, self.seed, self.replacement = n, seed, replacement
        self.num_samples = n if num_samples is None else num_samples

    def order(self, epoch: int) -> list:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.replacement:
            return torch.randint(self.n, (self.num_samples,), generator=generator).tolist()
        rounds = -(-self.num_samples // self.n)
        return torch.cat([torch.randperm(self.n, generator=generator) for _ in range(rounds)])[: self.num_samples].tolist()


class InOrder:
    def __init__(self, n: int) -> None:
        self.n = n

    def order(self, epoch: int) -> list:
        return list(range(self.n))


class FromSampler:
    """Any other sampler: asked for its order each epoch (it must be the same on every rank)."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def order(self, epoch: int) -> list:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        return list(iter(self.sampler))


# ----------------------------------------------------------------- per-rank batches
@dataclass
class Layout:
    """How global batches are cut: sizes are per rank."""

    batch_size: int          # samples per rank per step
    num_processes: int
    process_index: int
    drop_last: bool
    even_batches: bool

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes


def rank_batches(indices: list, layout: Layout) -> list:
    """This rank's batches of one epoch, given the global order ``indices``.

    Example::

        rank_batches(list(range(13)), Layout(4, 2, 1, False, True))  # [[4,5,6,7], [12,0,1,2]]
    """
    size, per_rank = layout.global_batch, layout.batch_size
    if layout.drop_last:
        indices = indices[: len(indices) // size * size]
    elif layout.even_batches and indices and len(indices) % size:
        indices = _cycle_pad(indices, -(-len(indices) // size) * size)
    start = layout.process_index * per_rank
    batches = [indices[k + start: k + start + per_rank] for k in range(0, len(indices), size)]
    return [b for b in batches if b]


def _cycle_pad(items: list, length: int) -> list:
    out = list(items)
    while len(out) < length:
        out.extend(items[: length - len(out)])
    return out


def remainder_of(n: int, layout: Layout) -> int:
    """Real samples in the last global batch when it was padded, else 0."""
    if layout.drop_last or not layout.even_batches:
        return 0
    return n % layout.global_batch


class ShardedBatchSampler(Sampler):
    """Yields this rank's index batches; the same object serves every epoch.

    The loader sets ``epoch`` (and ``skip``, batches to leave out at the start) right
    before each iteration.
    """

    def __init__(self, order, num_indices: int, layout: Layout) -> None:
        self.order, self.num_indices, self.layout = order, num_indices, layout
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list]:
        # Eager on purpose: epoch and skip are read now, when the loader creates its iterator.
        return iter(rank_batches(self.order.order(self.epoch), self.layout)[self.skip:])

    def __len__(self) -> int:
        n, size = self.num_indices, self.layout.global_batch
        if self.layout.drop_last:
            return n // size
        if self.layout.even_batches:
            return -(-n // size)
        full, rest = divmod(n, size)
        return full + (1 if rest > self.layout.process_index * self.layout.batch_size else 0)

    @property
    def remainder(self) -> int:
        return remainder_of(self.num_indices, self.layout)


class BatchShardSampler(Sampler):
    """A custom batch sampler, sharded whole batches at a time (batch j goes to rank j % world)."""

    def __init__(self, batch_sampler, num_processes: int, process_index: int, even_batches: bool) -> None:
        self.batch_sampler = batch_sampler
        self.num_processes, self.process_index, self.even_batches = num_processes, process_index, even_batches
        self.epoch, self.skip = 0, 0
        self.remainder = -1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(self.epoch)
        batches = [list(b) for b in self.batch_sampler]
        world = self.num_processes
        if self.even_batches and batches and len(batches) % world:
            real_tail = batches[len(batches) // world * world:]
            self.remainder = sum(len(b) for b in real_tail)
            batches = _cycle_pad(batches, -(-len(batches) // world) * world)
        else:
            self.remainder = 0
        return batches[self.process_index::world]

    def __iter__(self) -> Iterator[list]:
        return iter(self._batches()[self.skip:])  # eager, like ShardedBatchSampler

    def __len__(self) -> int:
        n, world = len(self.batch_sampler), self.num_processes
        if self.even_batches:
            return -(-n // world)
        return len(range(self.process_index, n, world))


class FlatSampler(Sampler):
    """For loaders without batching (``batch_size=None``): one index per 'batch'."""

    def __init__(self, shard: ShardedBatchSampler) -> None:
        self.shard = shard

    def __iter__(self):
        batches = iter(self.shard)  # the shard reads epoch and skip now
        return (index for batch in batches for index in batch)

    def __len__(self) -> int:
        return len(self.shard)


class IterableShard(IterableDataset):
    """An iterable dataset read in global batches, of which this rank keeps its slice."""

    def __init__(self, dataset: IterableDataset, layout: Layout) -> None:
        self.dataset, self.layout = dataset, layout
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        return self._items(self.skip * self.layout.batch_size)  # skip is read now, not on first next()

    def _items(self, skip: int):
        for position, item in enumerate(self._mine()):
            if position >= skip:  # a stream cannot seek: skipped items are still read
                yield item

    def _mine(self):
        size, per_rank = self.layout.global_batch, self.layout.batch_size
        start = self.layout.process_index * per_rank
        first, buffer = None, []
        for item in self.dataset:
            buffer.append(item)
            if len(buffer) == size:
                first = first if first is not None else list(buffer)
                yield from buffer[start: start + per_rank]
                buffer = []
        if buffer and not self.layout.drop_last:
            if self.layout.even_batches:  # complete it from the first global batch, like map-style data
                buffer = (buffer + first)[:size] if first else _cycle_pad(buffer, size)
            yield from buffer[start: start + per_rank]

    def __len__(self) -> int:
        n = len(self.dataset)  # TypeError for a stream without a length, as DataLoader expects
        size, per_rank = self.layout.global_batch, self.layout.batch_size
        if self.layout.drop_last:
            return n // size * per_rank
        if self.layout.even_batches:
            return -(-n // size) * per_rank
        full, rest = divmod(n, size)
        return full * per_rank + min(per_rank, max(0, rest - self.layout.process_index * per_rank))

    @property
    def remainder(self) -> int:
        try:
            return remainder_of(len(self.dataset), self.layout)
        except TypeError:
            return -1


# ----------------------------------------------------------------- the loader
class EpochCounter:
    """Shared by a loader and its `skip_first_batches` view, so both advance one epoch count."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch


class DataLoaderShard(DataLoader):
    """A DataLoader over this rank's shard: batches on the device, epochs counted, and
    the gradient state told when the last batch goes out (for accumulation and metrics).

    Iterating it starts a new epoch (a new shuffle, the same on every rank); call
    `set_epoch` to choose the epoch number yourself.
    """

    def __init__(self, *args, shard=None, gradient_state: GradientState = None, device=None,
                 non_blocking: bool = False, counter: Optional[EpochCounter] = None, skip: int = 0,
                 rebuild: Optional[Callable] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._shard = shard
        self._gradient_state = gradient_state if gradient_state is not None else GradientState()
        self._device = device
        self._non_blocking = non_blocking
        self._counter = counter or EpochCounter()
        self._skip = skip
        self._rebuild = rebuild

    @property
    def epoch(self) -> int:
        """The epoch the next (or current) iteration uses."""
        return self._counter.epoch

    def set_epoch(self, epoch: int) -> None:
        self._counter.epoch = epoch

    @property
    def remainder(self) -> int:
        return getattr(self._shard, "remainder", -1)

    def state_dict(self) -> dict:
        """Epoch counter and shuffle seed: enough to replay the same batches after a restart."""
        order = getattr(self._shard, "order", None)
        return {"epoch": self._counter.epoch, "seed": getattr(order, "seed", None)}

    def load_state_dict(self, state: dict) -> None:
        self._counter.epoch = int(state["epoch"])
        order = getattr(self._shard, "order", None)
        if state.get("seed") is not None and isinstance(order, SeededShuffle):
            order.seed = int(state["seed"])

    def __iter__(self):
        self._shard.set_epoch(self._counter.epoch)
        self._shard.skip = self._skip
        try:
            batches = super().__iter__()  # the sampler's iterator is created here
        finally:
            self._shard.skip = 0
        position = LoaderPosition()
        self._gradient_state.active.append(position)
        try:
            yield from self._with_lookahead(batches, position)
        finally:
            self._gradient_state.active[:] = [p for p in self._gradient_state.active if p is not position]
            self._counter.epoch += 1

    def _with_lookahead(self, batches, position: LoaderPosition):
        # Fetch one batch ahead, so the last batch is known when it is handed out.
        iterator = iter(batches)
        try:
            current = next(iterator)
        except StopIteration:
            return
        while True:
            try:
                upcoming = next(iterator)
            except StopIteration:
                position.end, position.remainder = True, self.remainder
                yield self._place(current)
                return
            yield self._place(current)
            current = upcoming

    def _place(self, batch: Any) -> Any:
        if self._device is None:
            return batch
        return send_to_device(batch, self._device, self._non_blocking)

    def skipping(self, num_batches: int) -> "DataLoaderShard":
        """A view of this loader whose next iteration starts after ``num_batches`` batches."""
        return self._rebuild(skip=num_batches, counter=self._counter)


def send_to_device(value: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors in a (nested) batch, moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(send_to_device(v, device, non_blocking) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(send_to_device(v, device, non_blocking) for v in value)
    if isinstance(value, dict):
        moved = {k: send_to_device(v, device, non_blocking) for k, v in value.items()}
        try:
            return type(value)(moved)
        except TypeError:
            return moved
    if hasattr(value, "to") and callable(value.to) and not isinstance(value, torch.nn.Module):
        try:
            return value.to(device)  # e.g. a tokenizer's BatchEncoding
        except TypeError:
            return value
    return value


# ----------------------------------------------------------------- prepare
_LOADER_ARGS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
                "multiprocessing_context", "generator", "persistent_workers", "pin_memory_device", "in_order")


def shard_data_loader(loader: DataLoader, state: ProcessState, gradient_state: GradientState, *,
                      seed: Callable[[Optional[torch.Generator]], int], split_batches: bool = False,
                      even_batches: bool = True, device_placement: bool = True) -> DataLoaderShard:
    """This rank's `DataLoaderShard` for ``loader``.

    ``seed(generator)`` returns the shuffle seed every rank agrees on (a collective call).

    Example::

        shard = shard_data_loader(DataLoader(ds, batch_size=8, shuffle=True), state, GradientState(),
                                  seed=lambda g: 0)
    """
    if isinstance(loader, DataLoaderShard):
        raise ValueError("This DataLoader was already prepared; prepare the original DataLoader only once.")
    if isinstance(loader.sampler, DistributedSampler) or isinstance(getattr(loader.batch_sampler, "sampler", None),
                                                                    DistributedSampler):
        raise ValueError(
            "This DataLoader uses a DistributedSampler, so it is sharded already. prepare() does the "
            "sharding for you: build the DataLoader with shuffle=True (or a plain sampler) instead."
        )
    kwargs = {name: getattr(loader, name) for name in _LOADER_ARGS if hasattr(loader, name)}
    if not kwargs.get("pin_memory_device"):
        kwargs.pop("pin_memory_device", None)  # deprecated argument: pass it only when it was set
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    world, rank = state.num_processes, state.process_index
    if isinstance(loader.dataset, IterableDataset):
        layout = _layout(loader.batch_size, loader.drop_last, state, split_batches, even_batches)
        dataset = IterableShard(loader.dataset, layout)
        build = dict(dataset=dataset, batch_size=layout.batch_size, shard=dataset)
    elif loader.batch_sampler is None or type(loader.batch_sampler) is BatchSampler:
        batch_sampler = loader.batch_sampler
        sampler = batch_sampler.sampler if batch_sampler is not None else loader.sampler
        batch_size = batch_sampler.batch_size if batch_sampler is not None else 1
        drop_last = batch_sampler.drop_last if batch_sampler is not None else False
        if batch_sampler is None and split_batches:
            raise ValueError("split_batches=True needs a DataLoader with a batch_size.")
        layout = _layout(batch_size, drop_last, state, split_batches, even_batches)
        order, count = _order(sampler, seed)
        shard = ShardedBatchSampler(order, count, layout)
        if batch_sampler is None:
            build = dict(dataset=loader.dataset, sampler=FlatSampler(shard), batch_size=None, shard=shard)
        else:
            build = dict(dataset=loader.dataset, batch_sampler=shard, shard=shard)
    else:
        if split_batches:
            raise ValueError("split_batches=True is not supported with a custom batch_sampler; "
                             "give each rank its batches with split_batches=False.")
        shard = BatchShardSampler(loader.batch_sampler, world, rank, even_batches and world > 1)
        build = dict(dataset=loader.dataset, batch_sampler=shard, shard=shard)
    extra = dict(gradient_state=gradient_state, device=state.device if device_placement else None,
                 non_blocking=bool(getattr(loader, "pin_memory", False)))

    def rebuild(skip: int = 0, counter: Optional[EpochCounter] = None) -> DataLoaderShard:
        return DataLoaderShard(**build, **kwargs, **extra, skip=skip, counter=counter, rebuild=rebuild)

    return rebuild()


def _layout(batch_size: Optional[int], drop_last: bool, state: ProcessState, split_batches: bool,
            even_batches: bool) -> Layout:
    if batch_size is None:
        raise ValueError("prepare() needs a DataLoader with a batch_size to shard an IterableDataset.")
    world = state.num_processes
    if split_batches:
        if batch_size % world:
            raise ValueError(
                f"split_batches=True divides each batch between the {world} processes, but batch_size="
                f"{batch_size} does not divide by {world}. Use a batch size that is a multiple of {world}."
            )
        batch_size //= world
    # One process has nobody to keep in step with: its last batch stays short, as without prepare().
    return Layout(batch_size, world, state.process_index, drop_last, even_batches and world > 1)


def _order(sampler: Sampler, seed: Callable) -> tuple:
    if type(sampler) is RandomSampler:
        n = len(sampler.data_source)
        shuffle = SeededShuffle(n, seed(sampler.generator), sampler.replacement, sampler.num_samples)
        return shuffle, sampler.num_samples
    if type(sampler) is SequentialSampler:
        return InOrder(len(sampler.data_source)), len(sampler.data_source)
    return FromSampler(sampler), len(sampler)


@dataclass
class DataLoaderConfiguration:
    """How prepared DataLoaders are sharded (HF accelerate's class of the same name is accepted too).

    Example::

        Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))
    """

    split_batches: bool = False
    even_batches: bool = True
