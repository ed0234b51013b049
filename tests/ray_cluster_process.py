"""A local Ray cluster in a process of its own, driven over stdin (for the Ray tests).

Started by a test fixture with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` in its
environment: a head and a second node, 1 CPU each, no dashboard, a small object store
(`ray.cluster_utils.Cluster`). It prints ``ADDRESS <gcs address>`` once the nodes are up,
then reads commands, one per line:

- ``remove-worker``: remove the second node at once (no graceful shutdown); prints ``REMOVED``;
- ``add-worker``: add a second node again; prints ``ADDED``;
- EOF (the fixture closes stdin, or the test process died): shut the cluster down, exit.

The cluster lives in its own process so that the test process never caches Ray's
authentication mode, and so that a fixture stops it by one PID.
"""

from __future__ import annotations

import sys

NODE = dict(num_cpus=1, object_store_memory=80 * 2**20)


def main() -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        worker = cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        print("ADDRESS", cluster.address, flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "remove-worker":
                cluster.remove_node(worker, allow_graceful=False)
                print("REMOVED", flush=True)
            elif command == "add-worker":
                worker = cluster.add_node(**NODE)
                cluster.wait_for_nodes()
                print("ADDED", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
