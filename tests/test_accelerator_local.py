"""Accelerator in a plain process (world size 1): the same API, no process group needed."""

import os
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from accelerator_helpers import StepCounter, prepare_model_twice
from notebook_launcher import notebook_launcher
from notebook_launcher.accelerator import Accelerator, DistributedType, ProjectConfiguration, set_seed


@pytest.fixture(autouse=True)
def no_launcher_precision(monkeypatch):
    for name in ("NOTEBOOK_LAUNCHER_MIXED_PRECISION", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)


def inner_dtype(model, inner, x):
    seen = []
    handle = inner.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    output = model(x)
    handle.remove()
    return seen[0], output.dtype


def test_plain_process_facts():
    accelerator = Accelerator(cpu=True)
    assert (accelerator.process_index, accelerator.local_process_index, accelerator.num_processes) == (0, 0, 1)
    assert accelerator.is_main_process and accelerator.is_local_main_process and accelerator.is_last_process
    assert accelerator.distributed_type == DistributedType.NO == "NO"
    assert accelerator.device == torch.device("cpu")
    assert accelerator.mixed_precision == "no" and accelerator.scaler is None
    assert accelerator.sync_gradients and accelerator.gradient_accumulation_steps == 1
    model = accelerator.prepare(nn.Linear(2, 1))
    assert not isinstance(model, DistributedDataParallel)


def test_mixed_precision_default_comes_from_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert Accelerator().mixed_precision == "fp16"
    monkeypatch.setenv("NOTEBOOK_LAUNCHER_MIXED_PRECISION", "bf16")
    assert Accelerator().mixed_precision == "bf16"
    assert Accelerator(mixed_precision="no").mixed_precision == "no"  # an explicit choice wins


@pytest.mark.parametrize("mixed_precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_autocast_changes_the_compute_dtype_on_cpu(mixed_precision, dtype):
    accelerator = Accelerator(mixed_precision=mixed_precision)
    model = accelerator.prepare(nn.Sequential(nn.Linear(4, 3)))
    x = torch.randn(2, 4)
    assert inner_dtype(model, model[0], x) == (dtype, torch.float32)  # computed in half, handed back in fp32
    with accelerator.autocast():
        assert (x @ x.T).dtype == dtype
    assert (x @ x.T).dtype == torch.float32
    assert (accelerator.scaler is not None) == (mixed_precision == "fp16")
    # The prepared model still pickles (the autocast forward is an object, not a closure) ...
    clone = pickle.loads(pickle.dumps(model))
    assert inner_dtype(clone, clone[0], x)[0] == dtype
    # ... and unwrapping without the fp32 wrapper gives back the plain module.
    plain = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    assert "forward" not in plain.__dict__ and inner_dtype(plain, plain[0], x) == (torch.float32, torch.float32)


def test_no_mixed_precision_leaves_dtypes_alone():
    accelerator = Accelerator(mixed_precision="no")
    model = accelerator.prepare(nn.Sequential(nn.Linear(4, 3)))
    assert inner_dtype(model, model[0], torch.randn(2, 4)) == (torch.float32, torch.float32)
    with accelerator.autocast():
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32


def test_fp16_scaler_skips_a_step_with_inf_gradients():
    accelerator = Accelerator(mixed_precision="fp16")
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    before = model.weight.detach().clone()
    scale = accelerator.scaler.get_scale()
    accelerator.backward(model(torch.tensor([[float("inf"), 1.0, 1.0]])).sum())
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    assert accelerator.optimizer_step_was_skipped and optimizer.step_was_skipped
    assert torch.equal(model.weight, before)
    assert accelerator.scaler.get_scale() == scale / 2
    assert scheduler.get_last_lr() == [0.1]  # no update, no schedule step
    accelerator.backward(model(torch.ones(1, 3)).sum())
    optimizer.step()
    scheduler.step()
    assert not accelerator.optimizer_step_was_skipped
    assert not torch.equal(model.weight, before) and scheduler.get_last_lr() == [0.05]


def test_clipping_works_on_true_gradients_under_fp16():
    accelerator = Accelerator(mixed_precision="fp16")
    model = nn.Linear(3, 1)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    accelerator.backward(model(torch.full((1, 3), 5.0)).sum() * 1e-3)
    true_norm = (3 * 5e-3 ** 2 + 1e-3 ** 2) ** 0.5  # d/dw = 5e-3 each, d/db = 1e-3
    norm = accelerator.clip_grad_norm_(model.parameters(), 1e-3)
    assert norm.item() == pytest.approx(true_norm, rel=1e-2)  # not multiplied by the 65536 loss scale
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])) <= 1e-3 * 1.001
    optimizer.step()  # unscale_ then step in one update: GradScaler accepts it
    assert not accelerator.optimizer_step_was_skipped


def test_clipping_is_a_no_op_on_accumulation_micro_steps():
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model = accelerator.prepare(nn.Linear(3, 1))
    with accelerator.accumulate(model):
        accelerator.backward(model(torch.full((1, 3), 100.0)).sum())
        assert not accelerator.sync_gradients
        assert accelerator.clip_grad_norm_(model.parameters(), 1.0) is None
        assert model.weight.grad.abs().max() > 1


def test_optimizer_is_still_an_optimizer_for_schedulers_made_after_prepare():
    accelerator = Accelerator()
    model = nn.Linear(2, 1)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    assert isinstance(optimizer, torch.optim.Optimizer)
    scheduler = accelerator.prepare(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1))
    accelerator.backward(model(torch.ones(1, 2)).sum())
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.1])


def test_misuse_is_refused_clearly():
    accelerator = Accelerator()
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accelerator.prepare(model, optimizer)
    with pytest.raises(ValueError, match="already passed to prepare"):
        Accelerator().prepare(model)
    with pytest.raises(ValueError, match="already passed to prepare"):
        accelerator.prepare(optimizer)
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        Accelerator(mixed_precision="fp8")
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be an integer"):
        Accelerator(gradient_accumulation_steps=0)
    with pytest.raises(TypeError, match="state_dict"):
        accelerator.register_for_checkpointing(object())
    with pytest.raises(ValueError, match="needs an output_dir"):
        accelerator.save_state()
    with pytest.raises(FileNotFoundError):
        accelerator.load_state("/nonexistent/checkpoint")
    with pytest.raises(ValueError, match="Unsupported kwargs handler"):
        Accelerator(kwargs_handlers=[object()])


def test_prepare_in_the_notebook_then_again_in_a_forked_worker(monkeypatch):
    # A model prepared here (fp16) and used again inside a launched function is a fresh copy there.
    model = Accelerator(mixed_precision="fp16").prepare(nn.Sequential(nn.Linear(2, 1)))

    def use_it_again():
        again = Accelerator(mixed_precision="no").prepare(model)
        return inner_dtype(again, again.module[0], torch.ones(1, 2))

    assert notebook_launcher(use_it_again, num_processes=2, display="none") == (torch.float32, torch.float32)


def test_accelerate_kwargs_handlers_are_honoured():
    accelerate_utils = pytest.importorskip("accelerate.utils")
    accelerator = Accelerator(mixed_precision="fp16",
                              kwargs_handlers=[accelerate_utils.GradScalerKwargs(init_scale=1024.0)])
    assert accelerator.scaler.get_scale() == 1024.0


def test_collectives_are_identities_in_one_process():
    accelerator = Accelerator()
    assert accelerator.gather(torch.tensor(3)).tolist() == [3]
    assert accelerator.reduce(torch.tensor([2.0]), "mean").tolist() == [2.0]
    assert accelerator.pad_across_processes(torch.arange(3)).tolist() == [0, 1, 2]
    with accelerator.split_between_processes([1, 2, 3]) as mine:
        assert mine == [1, 2, 3]
    with accelerator.main_process_first():
        pass
    accelerator.wait_for_everyone()


def test_log_outside_a_worker_is_harmless_and_warns_once_about_non_numbers():
    accelerator = Accelerator()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        accelerator.log({"loss": 1.0, "name": "x"}, step=1)
        accelerator.log({"loss": 0.5, "name": "x"}, step=2)
    assert len([w for w in caught if "'name' is not a number" in str(w.message)]) == 1
    accelerator.end_training()


def _train(accelerator, model, optimizer, steps):
    for _ in range(steps):
        accelerator.backward(model(torch.randn(4, 3)).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()


def test_automatic_checkpoint_naming_keeps_total_limit_and_loads_the_newest(tmp_path):
    config = ProjectConfiguration(project_dir=str(tmp_path), automatic_checkpoint_naming=True, total_limit=2)
    accelerator = Accelerator(project_config=config)
    model = nn.Linear(3, 1)
    model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters()))
    counter = StepCounter()
    accelerator.register_for_checkpointing(counter)
    saved = []
    for _ in range(3):
        _train(accelerator, model, optimizer, 2)
        counter.count += 1
        saved.append(accelerator.save_state())
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint_1", "checkpoint_2"]
    newest = {k: v.clone() for k, v in model.state_dict().items()}
    _train(accelerator, model, optimizer, 2)
    counter.count = 0
    assert accelerator.load_state() == saved[-1]
    assert all(torch.equal(newest[k], v) for k, v in model.state_dict().items())
    assert counter.count == 3
    # A fresh run of the same project carries on numbering after the newest checkpoint.
    resumed = Accelerator(project_config=ProjectConfiguration(project_dir=str(tmp_path),
                                                              automatic_checkpoint_naming=True))
    resumed.load_state()
    assert resumed.save_iteration == 3


@pytest.mark.parametrize("safe, filename", [(True, "model.safetensors"), (False, "pytorch_model.bin")])
def test_save_model_with_tied_weights(tmp_path, safe, filename):
    from notebook_launcher.accelerator.checkpointing import read_weights

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    accelerator = Accelerator()
    model = accelerator.prepare(Tied())
    path = accelerator.save_model(model, tmp_path, safe_serialization=safe)
    assert os.path.basename(path) == filename and os.listdir(tmp_path) == [filename]
    fresh = Tied()
    fresh.load_state_dict(read_weights(str(tmp_path), 0, torch.device("cpu")))
    assert torch.equal(fresh.embed.weight, model.embed.weight) and fresh.head.weight is fresh.embed.weight


def test_set_seed_makes_runs_repeat():
    set_seed(7)
    first = (torch.rand(2).tolist(), __import__("random").random())
    set_seed(7)
    assert (torch.rand(2).tolist(), __import__("random").random()) == first


def test_free_memory_forgets_prepared_objects():
    accelerator = Accelerator()
    model = accelerator.prepare(nn.Linear(2, 1))
    assert accelerator.free_memory(model) == [None]
    assert accelerator._models == []


def test_prepare_twice_in_a_plain_process_raises():
    with pytest.raises(ValueError, match="already passed to prepare"):
        prepare_model_twice()
