"""The other direction: HF accelerate's own Accelerator, unchanged, inside our workers."""

import pytest
import torch

pytest.importorskip("accelerate")

from accelerator_helpers import reference_full_batch, train_with_hf_accelerate  # noqa: E402
from notebook_launcher import notebook_launcher  # noqa: E402


def test_accelerate_accelerator_sees_the_job_and_trains_like_one_big_batch():
    results = notebook_launcher(train_with_hf_accelerate, num_processes=2, return_all=True, display="none")
    reference = reference_full_batch()
    for rank, result in enumerate(results):
        assert result["process_index"] == rank
        assert result["num_processes"] == 2
        assert result["device"] == "cpu"
        assert result["distributed_type"] == "DistributedType.MULTI_CPU"
        assert result["partial_state"] == (2, rank)  # PartialState() joins the same job
        # 2 ranks x batch 8, unshuffled, equals one process with batch 16.
        for name, value in reference.items():
            torch.testing.assert_close(result["weights"][name], value, rtol=1e-5, atol=1e-6)
    losses = results[0]["losses"]
    assert losses == results[1]["losses"] and losses[-1] < losses[0]
