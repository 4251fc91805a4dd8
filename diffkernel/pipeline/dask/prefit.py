"""The pixel work of the stages before the fit, as Dask tasks over Zarr.

:class:`ClusterWork` is the Dask :class:`~diffkernel.pipeline.stages.PixelWork`:
:func:`~diffkernel.pipeline.stages.prepare_fit` decides what is done, and this says
how. The check of the inputs runs alongside the stages; each step that reads pixels
(alignment, backgrounds, detection, FWHMs) first waits for its outcome, so an
invalid input is refused as it is in memory, before anything else reads it.
"""

from __future__ import annotations

import time

import numpy as np
from astropy.table import Table

from ...config import MakeKernelConfig
from ...errors import InputError
from ...image import with_mask_planes
from ...io.zarr.image import ZarrImage
from ...prep.align import WARP_TILE, check_overlap, check_wcs, warp_tiles
from ...prep.psf import measure_pair_fwhm
from ..stages import PixelWork, exempt_planes
from .checks import InputCheck
from .runner import TaskRunner
from .storage import Workspace
from .tasks import ZarrPair, background_task, detect_task, warp_task

__all__ = ["ClusterWork"]


class ClusterWork(PixelWork):
    """The pre-fit pixel work of one pair as tasks of one run.

    Parameters
    ----------
    runner : TaskRunner
        Where the tasks go.
    config : MakeKernelConfig
        A validated configuration.
    template, science : ZarrImage
        The inputs as stored.
    workspace : Workspace
        The run's working store (:mod:`.storage`): the warped template and the mesh backgrounds
        are written there.

    Attributes
    ----------
    reader : ZarrPair
        The pair as the kernel convolves it (warped, backgrounds removed, roles
        swapped for ``convolveScience``).
    input_check : InputCheck or None
        The check of the inputs, once started (:meth:`check`).
    """

    def __init__(
        self,
        runner: TaskRunner,
        config: MakeKernelConfig,
        template: ZarrImage,
        science: ZarrImage,
        workspace: Workspace,
    ) -> None:
        self.runner = runner
        self.config = config
        self.kcfg = config.kernel.active
        self.inputs = (template, science)
        self.template = template
        self.science = science
        self.workspace = workspace
        self.reader = ZarrPair(template, science)
        self.input_check: InputCheck | None = None

    def refuse_grids(self) -> None:
        raise InputError(
            f"template shape {self.template.shape} differs from science shape "
            f"{self.science.shape}; give both a WCS (alignment) or warp the template first"
        )

    def check(self) -> None:
        """Start the check of the inputs as stored (once); :meth:`validated` waits for it."""
        if self.input_check is None:
            template, science = self.inputs
            images = {"template": template, "science": science}
            self.input_check = InputCheck(self.runner, images, exempt_planes(self.kcfg))

    def validated(self) -> dict[tuple[str, str], str]:
        """Wait for the check: raise on invalid inputs, else their checksums."""
        self.check()
        return self.input_check.validated()

    def align(self) -> None:
        self.check()  # the warp is checked inputs' work: the check starts first
        tmpl, sci = self.template, self.science
        check_wcs(tmpl.wcs, sci.wcs)
        self.validated()
        self.create_aligned_arrays()
        t0 = time.perf_counter()
        futures = [
            self.runner.submit(
                warp_task,
                tmpl,
                sci.wcs,
                self.workspace,
                y0,
                y1,
                x0,
                x1,
                self.kcfg.warpingConfig,
                name=f"warp-{y0}-{x0}",
            )
            for y0, y1, x0, x1 in warp_tiles(sci.shape)
        ]
        check_overlap(self.runner.wait(futures, "align", t0))
        self.template = self.workspace.open_image("aligned_template")
        self.reader = ZarrPair(self.template, sci)

    def create_aligned_arrays(self) -> None:
        """The empty ``aligned_template`` group on the science grid, for the warp tasks."""
        tmpl, sci = self.template, self.science
        planes = with_mask_planes(tmpl.mask_planes, ("NO_DATA", "EDGE"))
        chunk = sci.chunks[0] if WARP_TILE % sci.chunks[0] == 0 else 256
        self.workspace.create_image("aligned_template", sci, (chunk, chunk), planes, tmpl.meta)

    def remove_backgrounds(self) -> None:
        self.validated()
        t0 = time.perf_counter()
        refs = [
            self.runner.submit(
                background_task,
                image,
                self.kcfg.afwBackgroundConfig,
                self.workspace,
                who,
                image.chunks,
                name=f"background-{who}",
            )
            for who, image in (("template", self.template), ("science", self.science))
        ]
        t_ref, s_ref = self.runner.wait(refs, "background", t0)
        self.reader = ZarrPair(self.template, self.science, t_ref, s_ref)

    def detect(self, on_template: bool, saturation: float | None) -> Table:
        self.validated()
        return self.runner.wait_one(
            detect_task, self.reader, on_template, self.config, saturation, name="detect"
        )

    def measure_fwhms(
        self, x: np.ndarray, y: np.ndarray, which: tuple[bool, bool]
    ) -> tuple[float | None, float | None]:
        self.validated()
        return self.runner.wait_one(
            measure_pair_fwhm,
            self.reader,
            x,
            y,
            self.science.shape,
            tuple(self.kcfg.badMaskPlanes),
            which,
            name="fwhm",
        )

    def swap_roles(self) -> None:
        self.reader = self.reader.swapped()

    def psf_images(self) -> tuple[ZarrImage, ZarrImage]:
        """The inputs as stored: the warped template keeps no PSF model."""
        return self.inputs
