"""A Dask cluster over SSH: the scheduler on the first host, workers on the others.

Usage::

    python cluster/ssh_cluster.py head node1 node2 --workers-per-host 8

Needs passwordless SSH to every host and the same Python environment (with
diffkernel installed) at the same path on each, and every host must see the Zarr
stores at the same path (a shared file system). The scheduler address is printed
and written to ``scheduler.json``; submit with ``--scheduler ADDRESS``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    from distributed import SSHCluster

    from diffkernel.pipeline.dask.cluster import WORKER_ENVIRON

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hosts", nargs="+", help="scheduler host, then worker hosts")
    parser.add_argument("--workers-per-host", type=int, default=4)
    parser.add_argument("--python", default=sys.executable, help="Python on the hosts")
    parser.add_argument("--scheduler-file", default="scheduler.json")
    args = parser.parse_args()
    cluster = SSHCluster(
        args.hosts,
        connect_options={"known_hosts": None},
        worker_options={"n_workers": args.workers_per_host, "nthreads": 1, "env": WORKER_ENVIRON},
        scheduler_options={"port": 8786, "dashboard_address": "127.0.0.1:8787"},
        remote_python=args.python,
    )
    with open(args.scheduler_file, "w") as handle:
        json.dump({"address": cluster.scheduler_address}, handle)
    print(f"scheduler {cluster.scheduler_address}; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
