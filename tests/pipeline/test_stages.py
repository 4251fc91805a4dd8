"""The stages before the fit: one sequence, run by both executors.

:func:`diffkernel.pipeline.stages.prepare_fit` is checked on its own with a
:class:`PixelWork` that records what it is asked to do (the order of the stages and
what each is given), then through both executors: an option of the pre-fit stages
(detection on the template or the science image, a preconvolved science image)
gives the same kernel and candidates in memory and on a Dask cluster.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from diffkernel import MakeKernelConfig, MakeKernelTask
from diffkernel.errors import InputError, NoCandidatesError
from diffkernel.image import DEFAULT_MASK_PLANES
from diffkernel.io.zarr.write import write_image
from diffkernel.pipeline.stages import PixelWork, basis_metadata, prepare_fit
from diffkernel.simulate import make_pair

SHAPE = (256, 256)


def config(**kernel) -> MakeKernelConfig:
    cfg = MakeKernelConfig()
    cfg.kernel.active.fitForBackground = True
    cfg.kernel.active.spatialKernelOrder = 1
    cfg.kernel.active.sizeCellX = cfg.kernel.active.sizeCellY = 64
    for name, value in kernel.items():
        setattr(cfg.kernel.active, name, value)
    return cfg


# --- the sequence, with a recording PixelWork ----------------------------------------------


class Image:
    """What the stages read of an image: shape, WCS, header, PSF model and mask planes."""

    def __init__(self, shape, meta=None, psf_fwhm=None):
        self.shape = shape
        self.wcs = None
        self.meta = dict(meta or {})
        self.psf_fwhm = psf_fwhm
        self.mask_planes = dict(DEFAULT_MASK_PLANES)


class RecordingWork(PixelWork):
    """Does no pixel work; records each call and answers with fixed values."""

    def __init__(self, template: Image, science: Image, detected: Table | None = None):
        self.template, self.science = template, science
        self.detected = detected
        self.calls: list[tuple] = []

    def refuse_grids(self):
        self.calls.append(("refuse_grids",))
        raise InputError("grids differ")

    def align(self):
        self.calls.append(("align",))

    def check(self):
        self.calls.append(("check",))

    def remove_backgrounds(self):
        self.calls.append(("remove_backgrounds",))

    def detect(self, on_template, saturation):
        self.calls.append(("detect", on_template, saturation))
        return self.detected

    def measure_fwhms(self, x, y, which):
        self.calls.append(("measure_fwhms", list(x), list(y), which))
        return (2.5 if which[0] else None), (4.0 if which[1] else None)

    def swap_roles(self):
        self.calls.append(("swap_roles",))


def stars(ids=(3, 1, 2)) -> Table:
    n = len(ids)
    return Table({"id": list(ids), "x": [60.0 + 50 * i for i in range(n)], "y": [100.0] * n})


def test_given_sources_and_psf_models_need_only_the_check():
    """Sources and both PSF widths given: the pixel work is the check, nothing else."""
    work = RecordingWork(Image(SHAPE, psf_fwhm=3.0), Image(SHAPE, psf_fwhm=5.0))
    prepared = prepare_fit(work, config(), stars(), False, "convolveTemplate")
    assert work.calls == [("check",)]
    assert list(prepared.metadata) == [
        "aligned",
        "preconvolved",
        "template_fwhm",
        "science_fwhm",
        "mode",
        "basis",
    ]
    assert prepared.metadata["basis"] == basis_metadata(prepared.basis)
    assert prepared.plan.shape == SHAPE
    np.testing.assert_array_equal(prepared.placement.ids, [3, 1, 2])


@pytest.mark.parametrize("on_template", [True, False])
def test_detection_on_the_image_the_config_names(on_template):
    """Detection runs after the backgrounds, on the configured image, with its saturation."""
    cfg = config(useAfwBackground=True)
    cfg.kernel.active.detectionConfig.detOnTemplate = on_template
    work = RecordingWork(
        Image(SHAPE, {"SATURATE": 1000.0}, psf_fwhm=3.0),
        Image(SHAPE, {"ESATUR": 2000.0}, psf_fwhm=5.0),
        detected=stars(),
    )
    prepared = prepare_fit(work, cfg, None, False, "convolveTemplate")
    saturation = 1000.0 if on_template else 2000.0
    assert work.calls == [("check",), ("remove_backgrounds",), ("detect", on_template, saturation)]
    assert prepared.metadata["detected_sources"] == 3


def test_nothing_detected_is_refused():
    work = RecordingWork(Image(SHAPE, psf_fwhm=3.0), Image(SHAPE, psf_fwhm=5.0), stars(()))
    with pytest.raises(NoCandidatesError, match="kernelSources is empty"):
        prepare_fit(work, config(), None, False, "convolveTemplate")


def test_fwhms_measured_in_id_order_and_preconvolved_widened():
    """Missing PSF models are measured on the stars in id order; sqrt(2) when preconvolved."""
    work = RecordingWork(Image(SHAPE), Image(SHAPE, psf_fwhm=5.0))
    prepared = prepare_fit(work, config(), stars((3, 1, 2)), True, "convolveTemplate")
    assert work.calls[1] == ("measure_fwhms", [110.0, 160.0, 60.0], [100.0] * 3, (True, False))
    assert prepared.metadata["template_fwhm"] == 2.5
    assert prepared.metadata["science_fwhm"] == 5.0 * np.sqrt(2.0)


def test_auto_mode_swaps_the_roles_for_a_wider_template():
    """``auto`` with the wider PSF on the template convolves the science image."""
    work = RecordingWork(Image(SHAPE, psf_fwhm=5.0), Image(SHAPE, psf_fwhm=3.0))
    prepared = prepare_fit(work, config(), stars(), False, "auto")
    assert prepared.mode == prepared.metadata["mode"] == "convolveScience"
    assert work.calls == [("check",), ("swap_roles",)]
    # The basis matches the science image (now convolved) to the template.
    assert prepared.metadata["basis"]["template_fwhm"] == 3.0


def test_grids_that_differ_are_refused_before_the_check():
    work = RecordingWork(Image((128, 128), psf_fwhm=3.0), Image(SHAPE, psf_fwhm=5.0))
    with pytest.raises(InputError, match="grids differ"):
        prepare_fit(work, config(), stars(), False, "convolveTemplate")
    assert work.calls == [("refuse_grids",)]


# --- both executors --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # Faint stars down to 500: detection finds several on either image.
    sim = make_pair(SHAPE, seed=3, template_depth=4, flux_range=(500.0, 2e5))
    template, science = sim.template.astype(np.float32), sim.science.astype(np.float32)
    store = tmp_path_factory.mktemp("stages") / "pair.zarr"
    write_image(store, template, group="template", chunks=64)
    write_image(store, science, group="science", chunks=64)
    return {"sim": sim, "template": template, "science": science, "store": store}


def both_executors(pair, client, out, cfg, sources=None, **options):
    """The in-memory result and the Dask result of the same pair and options."""
    from diffkernel.pipeline.dask.driver import run_pair

    serial = MakeKernelTask(cfg).run(pair["template"], pair["science"], sources, **options)
    store = pair["store"]
    stored = run_pair(
        (store, "science"),
        (store, "template"),
        out,
        config=cfg,
        client=client,
        sources=sources,
        **options,
    ).result
    return serial, stored


def assert_same_fit(serial, stored):
    """Kernel and background coefficients bit-identical; the candidate tables equal."""
    np.testing.assert_array_equal(
        serial.spatialSolution.kernel_coeffs, stored.solution.kernel_coeffs
    )
    np.testing.assert_array_equal(
        serial.spatialSolution.background_coeffs, stored.solution.background_coeffs
    )
    a, b = serial.candidates, stored.candidates
    assert a.colnames == b.colnames and len(a) == len(b)
    for name in a.colnames:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
    for key in ("aligned", "preconvolved", "template_fwhm", "science_fwhm", "mode", "basis"):
        assert stored.metadata[key] == serial.metadata[key], key


@pytest.mark.parametrize("on_template", [True, False], ids=["detOnTemplate", "detOnScience"])
def test_detection_option_reaches_both_executors(pair, client, tmp_path, on_template):
    """``detectionConfig.detOnTemplate`` picks the detected image in memory and on Dask."""
    cfg = config()
    cfg.kernel.active.detectionConfig.detOnTemplate = on_template
    serial, stored = both_executors(pair, client, tmp_path / "o.zarr", cfg)
    assert stored.metadata["detected_sources"] == serial.metadata["detected_sources"] >= 5
    assert_same_fit(serial, stored)
    # The option did reach the detection: the other image gives another list.
    other = config()
    other.kernel.active.detectionConfig.detOnTemplate = not on_template
    elsewhere = MakeKernelTask(other).run(pair["template"], pair["science"])
    assert len(elsewhere.candidates) != len(serial.candidates)


def test_preconvolved_reaches_both_executors(pair, client, tmp_path):
    """A preconvolved science image widens its FWHM, and so the basis, in both executors."""
    sources = pair["sim"].truth.sources
    serial, stored = both_executors(
        pair, client, tmp_path / "o.zarr", config(), sources, preconvolved=True
    )
    assert stored.metadata["preconvolved"] and serial.metadata["preconvolved"]
    assert serial.metadata["science_fwhm"] == pair["science"].psf_fwhm * np.sqrt(2.0)
    assert_same_fit(serial, stored)
