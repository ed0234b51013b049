"""The user functions every launcher runs, identical for all of them.

Each function is self-contained (imports inside) because the benchmark defines it in
the host's ``__main__``, the way a notebook cell does: forked launchers just call it,
our spawn path ships it by value with dill, as it would a function from a cell. Only
torch's spawn floor needs an importable function; it uses this module's copy.

``init=True`` means the launcher does not set up the process group itself
(accelerate's ``notebook_launcher``, the bare floors): the function calls
``init_process_group`` the way a user's function (or ``Accelerator()``) would, and
that cost is part of "every rank inside the function with the group ready".

Timestamps are ``time.time()`` written to ``<out_dir>/<name>.<rank>``: wall-clock time
is comparable across processes of one machine.
"""


def trivial(out_dir, init):
    """Record when this rank is inside the function with the process group ready."""
    import os
    import time

    import torch.distributed as dist

    if init:
        dist.init_process_group("gloo")
    now = time.time()
    with open(os.path.join(out_dir, f"entry.{dist.get_rank()}"), "w") as f:
        f.write(repr(now))
    # One collective, as any real function has: a rank must not exit while a peer is
    # still connecting to it (gloo then fails that peer's setup).
    dist.barrier()
    return dist.get_rank()


def failing(out_dir, init):
    """The last rank raises; the others wait in a collective, as real training would."""
    import os
    import time

    import torch.distributed as dist

    if init:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == world - 1:
        time.sleep(0.2)  # let every other rank reach the barrier first
        now = time.time()
        with open(os.path.join(out_dir, f"raise.{rank}"), "w") as f:
            f.write(repr(now))
        raise ValueError(f"benchmark failure on rank {rank}")
    dist.barrier()
    return rank


def ddp_step(seed: int, after_backward=None):
    """The DDP benchmark loop's one step, ready to call as ``step(i)`` (returns the loss as a
    float): a small MLP under DDP on fixed random data of this rank, threads per rank set
    the same for every launcher (no launcher wins by oversubscribing the cores), after the
    process group exists. ``after_backward(loss)``: extra work each step (a collective)."""
    import os

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(seed)
    model = DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(seed + rank)
    inputs = torch.randn(8, 64, 256, generator=generator)
    targets = torch.randint(0, 10, (8, 64), generator=generator)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(i):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs[i % 8]), targets[i % 8])
        loss.backward()
        optimizer.step()
        if after_backward is not None:
            after_backward(loss)
        return loss.item()

    return step


def train(out_dir, init, steps, use_report, seed=0):
    """A small MLP under DDP on fixed random data; rank 0 returns (and writes) steps per second.

    ``use_report``: call notebook_launcher's ``progress()`` and ``report()`` every step
    (what a user of our dashboard writes). Every variant takes ``loss.item()`` each step,
    so the work besides reporting is the same. Threads per rank are set explicitly, the
    same for every launcher, so no launcher wins by oversubscribing the cores.
    """
    import os
    import time

    import torch.distributed as dist

    if init:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    step = ddp_step(seed)
    for i in range(5):  # warm-up: allocator, DDP buckets
        step(i)
    if use_report:
        from notebook_launcher import progress, report

        loop = progress(range(steps), desc="train")
    else:
        report, loop = None, range(steps)
    dist.barrier()
    start = time.perf_counter()
    for i in loop:
        loss = step(i)
        if report is not None:
            report(i, loss=loss)
    rate = steps / (time.perf_counter() - start)
    if rank != 0:
        return None
    with open(os.path.join(out_dir, "rate.0"), "w") as f:  # accelerate's launcher returns None
        f.write(repr(rate))
    with open(os.path.join(out_dir, "loop.0"), "w") as f:  # when the timed loop ran, wall clock
        f.write(repr(time.time() - steps / rate))
    return rate


def big_state(out_dir, init, megabytes):
    """Rank 0 returns a state_dict of ``megabytes`` MB of float32 tensors."""
    import os
    import time

    import torch
    import torch.distributed as dist

    if init:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    state = None
    if rank == 0:
        per_tensor = 1 << 20  # 4 MB of float32 each
        count = max(1, int(megabytes * (1 << 20) / (4 * per_tensor)))
        tail = int(megabytes * (1 << 20) / 4) - count * per_tensor
        state = {f"layer{i}.weight": torch.randn(per_tensor) for i in range(count)}
        if tail > 0:
            state["tail.weight"] = torch.randn(tail)
    dist.barrier()
    if rank == 0:
        now = time.time()
        with open(os.path.join(out_dir, "return.0"), "w") as f:
            f.write(repr(now))
    return state


def report_cost(out_dir, init, calls, tensor_values):
    """Seconds per ``report()`` call on this rank, in a launched worker."""
    import time

    import torch
    from notebook_launcher import report

    value = torch.tensor(0.5) if tensor_values else 0.5
    for i in range(1000):  # warm-up: starts the channel's flusher thread
        report(i, loss=value)
    start = time.perf_counter()
    for i in range(calls):
        report(i, loss=value, lr=0.001)
    return (time.perf_counter() - start) / calls
