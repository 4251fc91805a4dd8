"""Start a LocalCluster on this machine and keep it up for jobs submitted by address.

Usage::

    python cluster/local_cluster.py --workers 2 --scheduler-file scheduler.json
    diffkernel subtract sci.fits tmpl.fits --out diff.zarr \\
        --scheduler "$(jq -r .address scheduler.json)"

Workers are single-threaded processes (one per core by default) with the environment
diffkernel recommends (single-threaded BLAS and Zarr codecs, glibc's adaptive malloc).
Stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading


def main() -> None:
    import dask
    from distributed import LocalCluster

    from diffkernel.pipeline.dask.cluster import SCHEDULER_CONFIG, WORKER_ENVIRON

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="scheduler port (0: any free)")
    parser.add_argument("--scheduler-file", default="scheduler.json")
    args = parser.parse_args()
    with (
        dask.config.set(
            {"distributed.nanny.pre-spawn-environ": WORKER_ENVIRON, **SCHEDULER_CONFIG}
        ),
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            host=args.host,
            scheduler_port=args.port,
            dashboard_address=f"{args.host}:0",  # the dashboard shows paths: same host
        ) as cluster,
    ):
        info = {"address": cluster.scheduler_address, "dashboard": cluster.dashboard_link}
        tmp = f"{args.scheduler_file}.tmp"
        with open(tmp, "w") as handle:
            json.dump(info, handle)
        os.replace(tmp, args.scheduler_file)
        print(f"scheduler {info['address']}, dashboard {info['dashboard']}", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
