"""HF accelerate created inside our workers sees the real job, on CPU as on GPU."""

from notebook_launcher import notebook_launcher


def partial_state():
    from accelerate import PartialState

    state = PartialState()
    return state.num_processes, state.process_index, str(state.distributed_type), str(state.device)


def accelerator():
    from accelerate import Accelerator

    acc = Accelerator()
    return acc.num_processes, acc.process_index, str(acc.distributed_type), acc.mixed_precision


def test_partial_state_sees_both_cpu_workers():
    got = notebook_launcher(partial_state, num_processes=2, return_all=True, display="none")
    assert got == [(2, 0, "DistributedType.MULTI_CPU", "cpu:0"), (2, 1, "DistributedType.MULTI_CPU", "cpu:0")]


def test_accelerator_sees_world_size_and_launcher_mixed_precision():
    got = notebook_launcher(accelerator, num_processes=2, return_all=True, display="none", mixed_precision="bf16")
    assert got == [(2, 0, "DistributedType.MULTI_CPU", "bf16"), (2, 1, "DistributedType.MULTI_CPU", "bf16")]


def test_accelerate_state_made_in_the_notebook_does_not_leak_into_workers():
    from accelerate import PartialState

    PartialState()  # the notebook made a one-process state before launching
    try:
        got = notebook_launcher(partial_state, num_processes=2, return_all=True, display="none")
    finally:
        PartialState._reset_state()
    assert [g[:2] for g in got] == [(2, 0), (2, 1)]
