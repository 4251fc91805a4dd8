"""Scheduled survey reprocessing: every pair of a manifest, resumable, one run at a time.

Usage::

    python workflows/survey_batch.py manifest.csv --out DIR [--scheduler tcp://host:8786]
        [--config config.toml] [--concurrent 4]

Runs :func:`diffkernel.batch.run_batch` under an exclusive lock (``DIR/.batch.lock``):
when a previous run is still going, this one logs that and exits 0, so cron or a
systemd timer can fire it as often as wanted. See ``workflows/README.md``.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import sys
from pathlib import Path

from diffkernel import MakeKernelConfig
from diffkernel.batch import run_batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest")
    parser.add_argument("--out", required=True)
    parser.add_argument("--scheduler")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--config")
    parser.add_argument("--concurrent", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    log = logging.getLogger("survey_batch")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".batch.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another batch is running on %s; nothing to do", out)
            return 0
        base = MakeKernelConfig.default_subtraction()  # a fitted background, as the CLI
        config = MakeKernelConfig.from_file(args.config, base=base) if args.config else base
        statuses = run_batch(
            args.manifest, out, config=config, scheduler=args.scheduler,
            n_workers=args.workers, concurrent=args.concurrent,
        )  # fmt: skip
    for s in statuses:
        log.log(logging.ERROR if s.state == "failed" else logging.INFO,
                "%s %s %s", s.state, s.output, s.error or "")  # fmt: skip
    return 1 if any(s.state == "failed" for s in statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
