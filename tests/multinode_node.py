"""One "node" of a multi-node launch, run as its own process by test_multinode.py."""

import json
import sys

import torch
import torch.distributed as dist

from notebook_launcher import LaunchConfigError, WorkerError, notebook_launcher


def where_am_i():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item()}


if __name__ == "__main__":
    node_rank, num_nodes, port, timeout = (int(a) for a in sys.argv[1:5])
    backend = sys.argv[5] if len(sys.argv) > 5 else "static"
    try:
        values = notebook_launcher(where_am_i, num_processes=2, num_nodes=num_nodes, node_rank=node_rank,
                                   use_port=port, rdzv_timeout=timeout, return_all=True, display="none",
                                   rdzv_backend=backend, rdzv_id="test-job")
        print("RESULT", json.dumps(values), flush=True)
    except WorkerError as err:
        print("ERROR", str(err).splitlines()[0], flush=True)
    except LaunchConfigError as err:   # e.g. the port was taken meanwhile: the test tries another
        print("CONFIG", err, flush=True)
