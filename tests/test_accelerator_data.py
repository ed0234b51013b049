"""Sharded DataLoaders and gather_for_metrics: every example counted once, in order."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from accelerator_helpers import CountingStream, metrics_cases
from notebook_launcher import notebook_launcher
from notebook_launcher.accelerator import Accelerator, DataLoaderConfiguration
from notebook_launcher.accelerator.data import Layout, rank_batches


@pytest.fixture(scope="module")
def gathered():
    return notebook_launcher(metrics_cases, num_processes=2, return_all=True, display="none")


@pytest.mark.parametrize("case, n", [("13_by_4", 13), ("9_by_4", 9), ("16_by_4", 16), ("13_split_4", 13),
                                     ("13_stream", 13), ("9_custom_batches", 9)])
def test_gather_for_metrics_returns_each_example_once_in_order(gathered, case, n):
    for rank in (0, 1):
        result = gathered[rank][case]
        assert result["tensors"] == [list(range(n))]
        assert result["objects"] == [[f"s{i}" for i in range(n)]]


def test_every_rank_runs_the_same_number_of_full_batches(gathered):
    for rank in (0, 1):
        assert gathered[rank]["13_by_4"]["batch_sizes"] == [4, 4]      # global batch 8, padded
        assert gathered[rank]["13_split_4"]["batch_sizes"] == [2] * 4  # global batch 4, split
        assert gathered[rank]["13_by_4"]["len"] == 2


def test_shuffle_is_shared_by_ranks_and_new_each_epoch(gathered):
    epochs = gathered[0]["13_shuffled"]["tensors"]
    assert epochs == gathered[1]["13_shuffled"]["tensors"]
    assert all(sorted(epoch) == list(range(13)) for epoch in epochs)
    assert epochs[0] != epochs[1]


def test_rank_batches_layout():
    assert rank_batches(list(range(13)), Layout(4, 2, 0, False, True)) == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert rank_batches(list(range(13)), Layout(4, 2, 1, False, True)) == [[4, 5, 6, 7], [12, 0, 1, 2]]
    assert rank_batches(list(range(13)), Layout(4, 2, 1, True, True)) == [[4, 5, 6, 7]]           # drop_last
    assert rank_batches(list(range(13)), Layout(4, 2, 1, False, False)) == [[4, 5, 6, 7], [12]]   # uneven
    assert rank_batches(list(range(3)), Layout(4, 2, 1, False, False)) == []


def test_single_process_loader_shuffles_reproducibly_and_counts_epochs():
    def epoch_orders(seed):
        torch.manual_seed(seed)
        accelerator = Accelerator()
        loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(10)), batch_size=3, shuffle=True))
        orders = [torch.cat([b for (b,) in loader]).tolist() for _ in range(2)]
        return orders, loader

    first, loader = epoch_orders(0)
    again, _ = epoch_orders(0)
    assert first == again and first[0] != first[1]
    assert all(sorted(order) == list(range(10)) for order in first)
    assert loader.epoch == 2 and loader.state_dict()["epoch"] == 2
    loader.set_epoch(1)
    assert torch.cat([b for (b,) in loader]).tolist() == first[1]


def test_skip_first_batches_resumes_mid_epoch_and_shares_the_epoch_count():
    torch.manual_seed(0)
    accelerator = Accelerator()
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(10)), batch_size=2, shuffle=True))
    full = [b.tolist() for (b,) in loader]
    loader.set_epoch(0)
    resumed = accelerator.skip_first_batches(loader, 3)
    assert [b.tolist() for (b,) in resumed] == full[3:]
    assert loader.epoch == 1  # the view advanced the original's epoch
    assert len([b for b in loader]) == 5


def test_skip_first_batches_on_a_stream():
    accelerator = Accelerator()
    loader = accelerator.prepare(DataLoader(CountingStream(7), batch_size=2))
    assert [b.tolist() for b in accelerator.skip_first_batches(loader, 2)] == [[4, 5], [6]]
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6]]


def test_split_batches_from_a_dataloader_configuration_and_worker_processes():
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))
    assert accelerator.split_batches
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(12)), batch_size=4, num_workers=2))
    assert torch.cat([b for (b,) in loader]).tolist() == list(range(12))


def test_loader_without_batching_keeps_items_unbatched():
    accelerator = Accelerator()
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(4)), batch_size=None))
    assert [item.item() for (item,) in loader] == [0, 1, 2, 3]


def test_already_sharded_or_prepared_loaders_are_refused():
    accelerator = Accelerator()
    dataset = TensorDataset(torch.arange(8))
    sharded = DataLoader(dataset, sampler=DistributedSampler(dataset, num_replicas=2, rank=0), batch_size=2)
    with pytest.raises(ValueError, match="DistributedSampler"):
        accelerator.prepare(sharded)
    prepared = accelerator.prepare(DataLoader(dataset, batch_size=2))
    with pytest.raises(ValueError, match="already prepared"):
        accelerator.prepare(prepared)


def test_gather_for_metrics_in_one_process_is_the_identity():
    accelerator = Accelerator()
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(5)), batch_size=2))
    seen = [accelerator.gather_for_metrics(b) for (b,) in loader]
    assert torch.cat(seen).tolist() == [0, 1, 2, 3, 4]
    assert accelerator.gather_for_metrics(["a", "b"]) == ["a", "b"]
