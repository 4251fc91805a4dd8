"""Convert a FITS image to a Zarr image group: ``diffkernel ingest``."""

from __future__ import annotations

import argparse

from .common import add_input_options, add_logging_options, gain_notes, read_options

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``ingest`` command to the subparsers ``sub``."""
    ingest = sub.add_parser(
        "ingest",
        help="convert a FITS image to a Zarr image group",
        description="Read a FITS image (LSST-style IMAGE/MASK/VARIANCE extensions, or a "
        "plain image whose variance is modelled from GAIN and the sky) and write it as a "
        "Zarr image group (image, variance, mask in square chunks; WCS and mask planes "
        "in attributes). The write is atomic.",
    )
    ingest.add_argument("input", help="FITS file")
    ingest.add_argument("output", help="Zarr store to write")
    ingest.add_argument("--chunks", type=int, default=512, help="chunk side in pixels")
    ingest.add_argument("--overwrite", action="store_true", help="replace an existing store")
    add_input_options(ingest, pair=False)
    add_logging_options(ingest)
    ingest.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.inputs import ingest

    with gain_notes("input", args.input):
        image = ingest(
            args.input,
            args.output,
            chunks=args.chunks,
            overwrite=args.overwrite,
            read_options=read_options(args, "science"),
        )
    print(
        f"wrote {args.output}: {image.shape[1]}x{image.shape[0]} {image.dtype} in "
        f"{image.chunks[1]}x{image.chunks[0]} chunks, mask planes {sorted(image.mask_planes)}"
    )
    return 0
