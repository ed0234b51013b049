"""Accelerator inside 2 launched CPU workers: facts, collectives, printing, dashboard, errors."""

import pytest

from accelerator_helpers import facts_and_collectives, log_to_dashboard, prepare_model_twice
from notebook_launcher import WorkerError, notebook_launcher


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared")
    return notebook_launcher(facts_and_collectives, args=(str(shared),), num_processes=2, return_all=True,
                             display="none", mixed_precision="bf16")


def test_process_facts(results):
    assert results[0]["facts"] == (0, 0, 2, True, True, "MULTI_CPU", "cpu", "bf16", True)
    assert results[1]["facts"] == (1, 1, 2, False, False, "MULTI_CPU", "cpu", "bf16", True)


def test_gather_reduce_pad(results):
    for r in results:
        assert r["gather"] == [0, 1]
        assert r["gather_scalar"] == [0, 10]
        assert r["gather_uneven"] == [0, 0, 1]  # lengths 1 and 2, no manual padding needed
        assert r["gather_nested"] == {"a": [0, 1], "b": [[[0, 0], [1, 1]]]}
        assert r["gather_bool"] == [False, True]
        assert r["sum"] == [3.0] and r["mean"] == [1.5] and r["max"] == [2.0]
        assert r["pad_dim1"] == [2, 2]
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]
    assert results[0]["pad"] == [0, -1] and results[1]["pad"] == [0, 1]
    assert results[0]["pad_first"] == [-1, 0]


def test_split_between_processes_and_main_process_first(results):
    assert [r["split"] for r in results] == [[0, 1, 2], [3, 4]]
    assert [r["split_padded"] for r in results] == [[0, 1, 2], [3, 4, 4]]
    assert [r["split_dict"] for r in results] == [{"a": [0, 1], "b": ["w", "x"]}, {"a": [2, 3], "b": ["y", "z"]}]
    assert all(r["saw_marker"] for r in results)  # rank 1 entered only after rank 0 left the block


def test_schedulers_step_per_real_update_times_the_world(results):
    # 4 micro-steps with accumulation 2 = 2 updates; split_batches=False steps once per rank each.
    assert results[0]["scheduler_steps"] == 4
    assert results[0]["scheduler_steps_split"] == 2


def test_misuse_gets_clear_errors(results):
    assert "does not divide by 2" in results[0]["split_batches_error"]
    assert "already passed to prepare()" in results[0]["prepare_twice_error"]


def test_print_is_main_process_only(capsys, tmp_path):
    notebook_launcher(facts_and_collectives, args=(str(tmp_path),), num_processes=2, display="none")
    lines = [line for line in capsys.readouterr().out.splitlines() if "printed-by-main-only" in line]
    assert lines == ["[rank0]: printed-by-main-only"]


def test_log_reaches_the_dashboard_state():
    run = notebook_launcher(log_to_dashboard, args=(5,), num_processes=2, display="none", block=False)
    assert run.result(timeout=60) == 5
    steps, values = run.state.series["loss"].points()
    assert steps == [0, 1, 2, 3, 4] and values == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert run.state.series["nested/acc"].points()[1] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])


def test_an_error_in_a_worker_names_the_misuse():
    with pytest.raises(WorkerError, match="already passed to prepare"):
        notebook_launcher(prepare_model_twice, num_processes=2, display="none")
