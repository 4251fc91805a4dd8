"""A Dask cluster on an HPC batch system (SLURM or PBS) with dask-jobqueue.

Usage (on a login node)::

    pip install dask-jobqueue
    python cluster/jobqueue_cluster.py slurm --jobs 10 --cores 16 --memory 64GB \\
        --queue regular --account myproj --walltime 02:00:00

Each batch job runs ``cores`` single-threaded worker processes (about 2 GB each is
plenty for 4k x 4k pairs). The scheduler runs here; its address is printed and
written to ``scheduler.json``: submit with ``diffkernel batch ... --scheduler ADDRESS``.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("system", choices=["slurm", "pbs"])
    parser.add_argument("--jobs", type=int, default=4, help="batch jobs to start")
    parser.add_argument("--cores", type=int, default=16, help="cores per job")
    parser.add_argument("--memory", default="64GB", help="memory per job")
    parser.add_argument("--queue")
    parser.add_argument("--account")
    parser.add_argument("--walltime", default="02:00:00")
    parser.add_argument("--scheduler-file", default="scheduler.json")
    args = parser.parse_args()
    from dask_jobqueue import PBSCluster, SLURMCluster

    from diffkernel.pipeline.dask.cluster import WORKER_ENVIRON

    cls = SLURMCluster if args.system == "slurm" else PBSCluster
    cluster = cls(
        cores=args.cores,
        processes=args.cores,  # one single-threaded worker per core
        memory=args.memory,
        queue=args.queue,
        account=args.account,
        walltime=args.walltime,
        job_script_prologue=[f"export {k}={v}" for k, v in WORKER_ENVIRON.items()],
    )
    cluster.scale(jobs=args.jobs)
    with open(args.scheduler_file, "w") as handle:
        json.dump({"address": cluster.scheduler_address}, handle)
    print(cluster.job_script())
    print(f"scheduler {cluster.scheduler_address}; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
