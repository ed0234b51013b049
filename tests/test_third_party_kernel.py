"""Other people's training code, unchanged, inside our workers: Lightning Fabric and
Trainer, HF transformers' Trainer, torch.compile. Each runs from a real Jupyter kernel on
2 CPU ranks and checks the world size and a result that only real data parallel training
gives: ranks fed different data end with identical weights. Where the trainer shards one
dataset itself (Lightning's Trainer and HF's install a distributed sampler), each rank
records the samples it trained on and the test checks they differ: ranks trained on the
same samples would end with identical weights without any gradient sync.

Tiny models built from code or configs: nothing is downloaded.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap

import pytest

from kernel_harness import REPO, Kernel

STARTUP = textwrap.dedent("""
    import os, sys, hashlib, tempfile
    import torch, torch.distributed as dist
    from notebook_launcher import notebook_launcher

    def weights_digest(module):
        flat = torch.cat([p.detach().flatten() for p in module.parameters()])
        return hashlib.sha256(flat.double().numpy().tobytes()).hexdigest()[:16]

    def default_group_id():
        return id(dist.distributed_c10d._get_default_group())

    def on_every_rank(fn, *args):
        # device="cpu": the same test on a GPU machine
        print("RESULTS", notebook_launcher(fn, args=args, num_processes=2, device="cpu", display="none",
                                           return_all=True))
""")

# A Lightning module and a Fabric loop as their docs write them; the data differs per rank.
LIGHTNING_CODE = textwrap.dedent("""
    import lightning
    import lightning.pytorch as pl
    from lightning.fabric import Fabric

    def fabric_ddp(strategy):
        ours = default_group_id()
        fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
        fabric.launch()
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        before = weights_digest(model)
        model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
        data = torch.Generator().manual_seed(fabric.global_rank)
        for _ in range(3):
            loss = model(torch.randn(8, 4, generator=data)).pow(2).mean()
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
        return {"world": fabric.world_size, "rank": fabric.global_rank, "same_group": default_group_id() == ours,
                "before": before, "after": weights_digest(model)}

    class TinyModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.seen = []                            # the sample numbers this rank trained on

        def training_step(self, batch, batch_idx):
            index, x = batch
            self.seen += index.tolist()
            return self.layer(x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def lightning_trainer():
        from torch.utils.data import DataLoader, TensorDataset

        ours = default_group_id()
        torch.manual_seed(0)
        model = TinyModule()
        before = weights_digest(model)
        # the same 64 numbered samples on every rank: Lightning's own DistributedSampler shards them
        data = DataLoader(TensorDataset(torch.arange(64), torch.randn(64, 4)), batch_size=8)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                             enable_checkpointing=False)
        trainer.fit(model, data)
        return {"world": trainer.world_size, "rank": trainer.global_rank, "steps": trainer.global_step,
                "same_group": default_group_id() == ours, "before": before, "after": weights_digest(model),
                "seen": model.seen}
""")


@pytest.fixture(scope="module")
def kernel():
    """A notebook that has not imported lightning: the workers import it themselves."""
    with Kernel(startup=STARTUP) as k:
        yield k
        assert k.wait_no_descendants() == [], "a launch left processes behind"


@pytest.fixture(scope="module")
def lightning_kernel():
    """A notebook that imported lightning (and so decided "interactive") before any launch."""
    with Kernel(startup=STARTUP + LIGHTNING_CODE) as k:
        yield k
        assert k.wait_no_descendants() == [], "a launch left processes behind"


def results(kernel: Kernel, code: str, timeout: float = 120) -> list:
    """Run a cell that ends with on_every_rank(...); every rank's return value."""
    return rank_results(run_cell(kernel, code, timeout))


def run_cell(kernel: Kernel, code: str, timeout: float = 120):
    result = kernel.run(textwrap.dedent(code), timeout=timeout)
    assert result.status == "ok", result.traceback[-3000:] + result.text[-3000:]
    return result


def rank_results(result) -> list:
    line = next((l for l in result.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert line is not None, result.text[-3000:]
    return ast.literal_eval(line[len("RESULTS "):])


def assert_fed_different_samples(ranks: list, at_least: int) -> None:
    """Each rank trained on at least ``at_least`` samples, and no sample on both ranks."""
    seen = [set(r["seen"]) for r in ranks]
    assert all(len(s) >= at_least for s in seen), seen
    assert not seen[0] & seen[1], f"both ranks trained on {sorted(seen[0] & seen[1])}: same data, no proof of DDP"


def assert_trained_together(ranks: list) -> None:
    """World size 2, both ranks changed their weights and ended with the same ones."""
    assert [r["world"] for r in ranks] == [2, 2], ranks
    assert [r["rank"] for r in ranks] == [0, 1], ranks
    assert ranks[0]["before"] == ranks[1]["before"], ranks
    assert ranks[0]["after"] != ranks[0]["before"], "no step changed the weights"
    assert ranks[0]["after"] == ranks[1]["after"], "ranks trained on different data ended apart: no DDP"


@pytest.mark.parametrize("strategy", ["ddp", "auto"])
def test_lightning_fabric_when_the_notebook_imported_lightning_first(lightning_kernel, strategy):
    assert lightning_kernel.value("lightning.fabric.utilities.imports._IS_INTERACTIVE") is True
    ranks = results(lightning_kernel, f"on_every_rank(fabric_ddp, {strategy!r})")
    assert_trained_together(ranks)
    assert all(r["same_group"] for r in ranks), "Fabric replaced the process group we had set up"
    # Only the workers behave as scripts: the notebook is still interactive.
    assert lightning_kernel.value("(hasattr(sys, 'ps1'), lightning.fabric.utilities.imports._IS_INTERACTIVE)") \
        == (True, True)


def test_lightning_trainer_ddp(lightning_kernel):
    ranks = results(lightning_kernel, "on_every_rank(lightning_trainer)")
    assert_fed_different_samples(ranks, at_least=3 * 8)   # 3 steps of 8
    assert_trained_together(ranks)
    assert [r["steps"] for r in ranks] == [3, 3]
    assert all(r["same_group"] for r in ranks), "Lightning replaced the process group we had set up"


def test_lightning_fabric_imported_only_in_the_workers(kernel):
    assert kernel.value("'lightning' in sys.modules") is False
    ranks = results(kernel, """
        def fabric_in_worker():
            from lightning.fabric import Fabric

            fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
            fabric.launch()
            total = fabric.all_reduce(torch.tensor(float(fabric.global_rank + 1)), reduce_op="sum")
            return {"world": fabric.world_size, "rank": fabric.global_rank, "total": float(total)}
        on_every_rank(fabric_in_worker)
    """)
    assert ranks == [{"world": 2, "rank": 0, "total": 3.0}, {"world": 2, "rank": 1, "total": 3.0}]


def test_hf_transformers_trainer(kernel):
    result = run_cell(kernel, """
        from transformers import Trainer       # imported in the notebook first, as people do: this
                                               # chooses its progress display, an HTML table, here
        def hf_trainer(output_dir):
            from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments,
                                      default_data_collator)

            torch.manual_seed(0)
            model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                               bos_token_id=0, eos_token_id=0))
            before = weights_digest(model)
            tokens = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(1))
            # the same 32 numbered samples on every rank: the Trainer shards them per rank
            data = [{"input_ids": ids, "labels": ids, "number": n} for n, ids in enumerate(tokens)]
            seen = []

            def collate(samples):   # notes which samples this rank batched, and hides the numbers
                seen.extend(sample["number"] for sample in samples)
                return default_data_collator([{k: v for k, v in s.items() if k != "number"} for s in samples])

            args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=4, max_steps=3,
                                     learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                                     remove_unused_columns=False)   # "number" reaches our collator
            trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
            steps = trainer.train().global_step
            return {"world": trainer.args.world_size, "rank": trainer.args.process_index, "steps": steps,
                    "before": before, "after": weights_digest(model), "seen": seen}
        with tempfile.TemporaryDirectory() as output_dir:
            on_every_rank(hf_trainer, output_dir)
    """)
    ranks = rank_results(result)
    assert_fed_different_samples(ranks, at_least=3 * 4)   # 3 steps of 4 (it may batch one more ahead)
    assert_trained_together(ranks)
    assert [r["steps"] for r in ranks] == [3, 3]
    # rank 0's progress as a script shows it; the notebook's HTML table could only print
    # "<IPython.core.display.HTML object>" lines from a rank
    assert re.search(r"\[rank0\]: +\d+%\|.*\| \d/3 ", result.text), result.text[-2000:]   # a console bar
    assert "HTML object" not in result.text, result.text[-2000:]


@pytest.mark.parametrize("asked_in_notebook", [False, True],
                         ids=["asked-only-in-ranks", "asked-in-notebook-first"])
def test_libraries_that_ask_ipython_see_a_script(tmp_path, asked_in_notebook):
    """A rank forked from the kernel holds the kernel's IPython shell, whose messages cannot
    reach the notebook from another process: a tqdm.auto bar in a rank showed nothing, and
    its raw messages went to the kernel's own output. In a rank: console bars (whether
    tqdm.auto chose in the notebook or in the rank), display() prints and still gives a
    handle, HF's is_in_notebook() and rich say no, widgets talk to nobody."""
    own_output = tmp_path / "kernel-output.log"
    with Kernel(startup=STARTUP, own_output=str(own_output)) as kernel:
        if asked_in_notebook:   # as `from transformers import Trainer` does in a notebook
            run_cell(kernel, """
                import tqdm.auto
                from IPython.display import display
                from transformers.utils.import_utils import is_in_notebook
                assert is_in_notebook()
            """)
        else:
            assert kernel.value("'tqdm.autonotebook' in sys.modules") is False
        result = run_cell(kernel, """
            import ipywidgets

            def asks_ipython():
                import IPython
                from rich.console import Console
                from tqdm.auto import tqdm, trange
                from transformers.utils.import_utils import is_in_notebook

                for _ in tqdm(range(3), desc="auto bar"):
                    pass
                for _ in trange(2, desc="auto trange"):
                    pass
                handle = display(f"displayed by rank {dist.get_rank()}", display_id=True)
                handle.update("an update: a script cannot redraw, so it is not printed")
                ipywidgets.IntProgress(value=1)   # a widget a library made
                return {"no shell": IPython.get_ipython() is None and get_ipython() is None,
                        "notebook": is_in_notebook(), "rich's jupyter": Console().is_jupyter}
            on_every_rank(asks_ipython)
        """)
        expected = {"no shell": True, "notebook": False, "rich's jupyter": False}
        assert rank_results(result) == [expected, expected]
        for rank in (0, 1):
            assert f"[rank{rank}]: auto bar: 100%" in result.stderr, result.stderr
            assert f"[rank{rank}]: auto trange: 100%" in result.stderr, result.stderr
            assert f"[rank{rank}]: displayed by rank {rank}" in result.stdout, result.stdout
        assert "an update" not in result.text and result.widget_states == [] and result.displays == []
        assert kernel.value("type(get_ipython()).__name__") == "ZMQInteractiveShell"   # the notebook's own
    kernel_output = own_output.read_text()
    assert "send message from fork" not in kernel_output, kernel_output[-2000:]
    assert "msg_type" not in kernel_output, kernel_output[-2000:]


def test_torch_compile_of_a_ddp_model(kernel):
    ranks = results(kernel, """
        def compiled_training():
            import torch._dynamo
            from torch.nn.parallel import DistributedDataParallel as DDP

            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
            before = weights_digest(model)
            compiled = torch.compile(DDP(model))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            data = torch.Generator().manual_seed(dist.get_rank())
            for _ in range(3):
                loss = compiled(torch.randn(4, 8, generator=data)).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            return {"world": dist.get_world_size(), "rank": dist.get_rank(), "before": before,
                    "after": weights_digest(model), "compiled": torch._dynamo.utils.counters["frames"]["ok"]}
        on_every_rank(compiled_training)
    """, timeout=180)
    assert_trained_together(ranks)
    assert all(r["compiled"] > 0 for r in ranks), "torch.compile compiled nothing"


def test_under_python_dash_i_lightning_imported_later_still_sees_a_script():
    """``python -i`` sets sys.flags.interactive, which cannot be unset: Lightning imported
    after a worker has behaved as a script (as in the test above) must still decide "script"."""
    code = textwrap.dedent("""
        import sys
        from notebook_launcher.workers.noninteractive import behave_as_a_script

        behave_as_a_script()
        import lightning.fabric.connector as connector
        import lightning.fabric.utilities.imports as imports
        print("FLAGS", sys.flags.interactive, "LIGHTNING", imports._IS_INTERACTIVE, connector._IS_INTERACTIVE)
    """)
    done = subprocess.run([sys.executable, "-i", "-c", code], cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert "FLAGS 1 LIGHTNING False False" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


def test_a_rank_whose_ipython_is_not_the_real_one_still_runs():
    """Leaving the kernel's front end is a tidy-up for other libraries: an ``IPython`` that
    is a stand-in (a test double, a lazy shim) is said once and never fails the launch."""
    code = textwrap.dedent("""
        import sys, types
        sys.modules["IPython"] = types.ModuleType("IPython")   # no IPython.core below it
        from notebook_launcher import notebook_launcher
        print("RESULT", notebook_launcher(lambda: "ran", num_processes=2, device="cpu", display="none"))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert "RESULT ran" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stderr.count("still sees the kernel's IPython") == 2, done.stderr[-3000:]   # once per rank
