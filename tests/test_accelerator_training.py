"""Accelerator training semantics, for real: 2 gloo workers vs one process, same numbers."""

import pytest
import torch

from accelerator_helpers import checkpoint_roundtrip, mixed_precision_checks, parity_runs, train_regression
from notebook_launcher import notebook_launcher

TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOLERANCE, msg=lambda m: f"{name}: {m}")


def differs(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[k], b[k], **TOLERANCE) for k in a)


@pytest.fixture(scope="module")
def reference():
    """1 process x batch 16, in this process (no process group, no DDP)."""
    return train_regression(batch_size=16)


@pytest.fixture(scope="module")
def two_workers():
    return notebook_launcher(parity_runs, num_processes=2, return_all=True, display="none")


def test_reference_is_a_plain_process_run(reference):
    assert reference["ddp"] is False
    assert reference["updates"] == 6  # 32 samples / 16 per step x 3 epochs


@pytest.mark.parametrize("run", ["2x8", "2x4_accumulate_2", "2x16_split"])
def test_two_workers_match_one_process_with_the_same_global_batch(reference, two_workers, run):
    rank0, rank1 = two_workers[0][run], two_workers[1][run]
    assert rank0["ddp"] and rank1["ddp"]
    assert rank0["updates"] == rank1["updates"] == 6
    assert_same_weights(rank0["weights"], rank1["weights"])  # DDP keeps the ranks identical
    assert_same_weights(rank0["weights"], reference["weights"])


def test_a_different_global_batch_does_not_match(reference, two_workers):
    # The control: split_batches=True with batch 8 is a global batch of 8, twice the updates.
    run = two_workers[0]["2x8_split"]
    assert run["updates"] == 12
    assert differs(run["weights"], reference["weights"])


def test_accumulation_2x8_equals_16_in_one_process(reference):
    accumulated = train_regression(batch_size=8, accumulation=2)
    assert accumulated["micro_steps"] == 12 and accumulated["updates"] == 6
    assert_same_weights(accumulated["weights"], reference["weights"])
    assert differs(train_regression(batch_size=8)["weights"], reference["weights"])


def test_accumulation_syncs_on_the_last_batch_of_an_epoch():
    # 32 samples, batch 8: 4 micro-steps per epoch, accumulation 3 -> updates after 3 and after 4.
    run = train_regression(batch_size=8, accumulation=3, epochs=2)
    assert run["micro_steps"] == 8 and run["updates"] == 4


@pytest.mark.parametrize("mixed_precision", ["no", "fp16"])
def test_checkpoint_round_trip_restores_weights_data_order_and_rng(tmp_path, mixed_precision):
    results = notebook_launcher(checkpoint_roundtrip, args=(str(tmp_path), mixed_precision), num_processes=2,
                                return_all=True, display="none", mixed_precision=mixed_precision)
    for rank, result in enumerate(results):
        first, second = result["first"], result["second"]
        assert result["differs_before_load"], "the reloaded run must start from other weights"
        assert result["loaded"] == result["folder"] and result["folder"].endswith("checkpoint_0")
        assert result["next_iteration"] == 1
        for name in first["weights"]:
            assert torch.equal(first["weights"][name], second["weights"][name]), (rank, name)
        assert first["data"] == second["data"]
        for key in ("lr", "count", "scale", "torch_rng", "python_rng", "numpy_rng"):
            assert first[key] == second[key], (rank, key)
    assert results[0]["first"]["data"] != results[1]["first"]["data"]  # each rank saw its own shard
    expected = {"model.safetensors", "optimizer.bin", "scheduler.bin", "dataloaders.bin", "custom_checkpoint_0.pkl",
                "random_states_0.pkl", "random_states_1.pkl"} | ({"scaler.pt"} if mixed_precision == "fp16" else set())
    assert set(results[0]["files"]) == expected


def test_fp16_in_workers_autocasts_and_skips_overflowing_steps():
    results = notebook_launcher(mixed_precision_checks, num_processes=2, return_all=True, display="none",
                                mixed_precision="fp16")
    for result in results:
        assert result["mixed_precision"] == "fp16"  # taken from the launcher
        assert result["inner"] == ["torch.float16"]
        assert result["output"] == "torch.float32"  # prepared models hand back fp32
        assert result["bare_matmul"] == "torch.float16"
        normal, overflow, recovered = result["normal"], result["overflow"], result["recovered"]
        # lr 0.1, StepLR(gamma=0.5) stepped once per rank per update (split_batches=False): x0.25 per update.
        assert normal["skipped"] is False and normal["moved"] and normal["lr"] == 0.025
        assert overflow["skipped"] is True and not overflow["moved"]
        assert overflow["scale_after"] == overflow["scale_before"] / 2
        assert overflow["lr"] == 0.025, "the scheduler must not step when the optimizer step was skipped"
        assert recovered["skipped"] is False and recovered["moved"] and recovered["lr"] == 0.00625
        assert result["bf16_mixed_precision"] == "bf16" and result["bf16_scaler"] is None
        assert result["bf16_inner"] == ["torch.bfloat16"] and result["bf16_output"] == "torch.float32"
