"""The collective journal (workers/journal.py) in one process, without a process group: what
a rank writes is what the notebook decodes, over a long session's worth of cells."""

from __future__ import annotations

import torch

from notebook_launcher.workers import journal


def journaled_all_reduce(j: journal.Journal):
    def all_reduce(tensor, op=None, group=None, async_op=False):   # stands in for torch's: only the wrapper is under test
        return None
    return journal._wrap(j, "all_reduce", all_reduce, journal.OPS["all_reduce"])


def run_cell(function, number: int, tensor) -> None:
    """One session cell calling ``function`` from its own file name, as %%dist cells do."""
    exec(compile("all_reduce(t)", f"<dist-cell-{number}>", "exec"), {"all_reduce": function, "t": tensor})


def test_lines_and_groups_are_named_after_a_thousand_cells_and_a_regroup(tmp_path):
    """Every cell is a new file name: the 8 KB string table fills after a few hundred cells
    and must start over, keeping the group names (the roll-call finds a group's members by
    its name; with none, it names nobody)."""
    path = str(tmp_path / "rank0.journal")
    j = journal.Journal(path)
    all_reduce = journaled_all_reduce(j)
    t = torch.ones(2, 3)
    for number in range(1, 1001):
        run_cell(all_reduce, number, t)
    j.regrouped()
    for number in range(1001, 1006):
        run_cell(all_reduce, number, t)
    j.map.flush()
    with open(path, "rb") as f:
        snap = journal.decode(f.read())
    last = snap.entries[-1]
    assert (last.op, last.seq, last.group, last.generation) == ("all_reduce", 5, "default", 1)
    assert (last.file, last.line, last.shape) == ("<dist-cell-1005>", 1, (2, 3))
    before = [e for e in snap.entries if e.generation == 0]
    assert [e.seq for e in before][-1] == 1000 and all(e.group == "default" for e in before)
    assert before[-1].file == "<dist-cell-1000>"
    j.close()


def test_the_cpp_sample_survives_the_names_written_after_it(tmp_path):
    """The sampler thread writes the default group's C++ count into the header; the main
    thread, writing a new name (a new cell's first collective), must not wipe it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        path = str(tmp_path / "rank0.journal")
        j = journal.Journal(path)
        for _ in range(3):
            dist.all_reduce(torch.ones(1))        # unjournaled: counted by the group in C++ only
        j.sample()
        run_cell(journaled_all_reduce(j), 1, torch.ones(1))
        j.map.flush()
        with open(path, "rb") as f:
            snap = journal.decode(f.read())
        assert snap.cpp_count == 3 and snap.cpp_at > 0, snap
        assert snap.entries[-1].file == "<dist-cell-1>"
        j.close()
    finally:
        dist.destroy_process_group()


def test_subgroups_are_named_and_not_kept_alive_and_keywords_mean_the_default_group(tmp_path):
    import gc

    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        path = str(tmp_path / "rank0.journal")
        j = journal.Journal(path)
        all_reduce = journaled_all_reduce(j)
        sub = dist.new_group([0])
        exec(compile("all_reduce(t, op=None)\nall_reduce(t, group=sub)", "<dist-cell-1>", "exec"),
             {"all_reduce": all_reduce, "t": torch.ones(1), "sub": sub})
        j.map.flush()
        with open(path, "rb") as f:
            default, subgroup = journal.decode(f.read()).entries
        assert (default.group, default.line) == ("default", 1)             # keywords without a group
        assert subgroup.group.endswith(":0") and subgroup.line == 2, subgroup
        dist.destroy_process_group(sub)
        del sub
        gc.collect()
        assert len(j._groups) == 0          # the journal does not keep a destroyed group alive
        j.close()
    finally:
        dist.destroy_process_group()
