"""Big values on a cluster (issue 21): ranks on other nodes get and send their tensors
inline, through the node agents, never through this machine's shared memory (the local
test cluster runs on one machine, where shared memory would happen to work: the test
checks that it is not used, as it must not be across machines).

The cluster and kernel are test_ray_kernel's (a head and a second node, 1 CPU each).
"""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("ray")

from test_ray_kernel import assert_nothing_left, cell, cluster, kernel, pids_in, stranger  # noqa: E402,F401

CHECK = """
    import os
    def maps_of_ours():
        with open("/proc/self/maps") as maps:
            return sum("memfd:notebook_launcher" in line for line in maps)
    def big_state(rank):
        torch.manual_seed(rank)
        base = torch.randn(1_000_000)                       # 4 MB: above the inline limit on one machine
        return {"base": base, "view": base[10:20], "t": base[:600].reshape(20, 30).t(),
                "p": torch.nn.Parameter(torch.ones(3))}
"""


def test_big_values_cross_the_cluster_inline_and_exactly(kernel):
    started = cell(kernel, "%dist start -n 1 --nodes 2 --cluster ray --display none")
    assert started.status == "ok", started.traceback
    try:
        result = cell(kernel, textwrap.dedent(CHECK) + textwrap.dedent("""
            session = get_ipython().find_magic('dist').__self__.session
            session.push(pushed=big_state(7), big_state=big_state, maps_of_ours=maps_of_ours)
            print("ON RANKS", session.execute(
                "s = big_state(7); all(torch.equal(pushed[k], s[k]) for k in s) and "
                "pushed['view'].untyped_storage().data_ptr() == pushed['base'].untyped_storage().data_ptr() "
                "and pushed['t'].stride() == s['t'].stride()"))
            print("RANK MAPS", session.execute("maps_of_ours()"))
            session.execute("import os; mine = big_state(rank); print('PID', os.getpid())")
            back = session.pull("mine", rank=1)
            want = big_state(1)
            print("PULLED", all(torch.equal(back[k], want[k]) for k in want), type(back["p"]).__name__,
                  back["view"].untyped_storage().data_ptr() == back["base"].untyped_storage().data_ptr())
            returned = session.run(lambda: big_state(dist.get_rank()), return_all=True)
            print("RETURNED", all(torch.equal(returned[r]["base"], big_state(r)["base"]) for r in (0, 1)))
            print("KERNEL MAPS", maps_of_ours())
        """))
    finally:
        stopped = cell(kernel, "%dist stop")
    assert result.status == "ok", result.traceback + result.stderr
    assert "ON RANKS {0: 'True', 1: 'True'}" in result.stdout, result.text
    assert "PULLED True Parameter True" in result.stdout and "RETURNED True" in result.stdout, result.text
    assert "RANK MAPS {0: '0', 1: '0'}" in result.stdout and "KERNEL MAPS 0" in result.stdout, result.text
    assert stopped.status == "ok"
    assert_nothing_left(kernel, pids_in(result.stdout))


def test_a_one_shot_launch_on_the_cluster_returns_a_big_value_inline(kernel):
    result = cell(kernel, textwrap.dedent(CHECK) + textwrap.dedent("""
        value = notebook_launcher(lambda: big_state(dist.get_rank()), num_processes=1, num_nodes=2, cluster="ray",
                                  display="none")
        print("VALUE", all(torch.equal(value[k], big_state(0)[k]) for k in value), "KERNEL MAPS", maps_of_ours())
    """))
    assert result.status == "ok", result.traceback + result.stderr
    assert "VALUE True KERNEL MAPS 0" in result.stdout, result.text
