"""Kernel basis sets: Alard-Lupton, delta-function, and bases derived from them (PCA).

A basis is a list of ``K x K`` kernel images. Every basis here is stored as a
*native* set of functions plus a linear map, so that fits, statistics and
convolutions can be done once in the native set and carried to any derived basis
by matrix products:

- Alard-Lupton: the native functions are separable Gaussians times monomials,
  ``g_s(u) u^p * g_s(v) v^q``; convolving an image with them takes two 1-D passes.
  The basis actually fitted is a linear map of them, *renormalized* so that the first
  kernel has unit sum and all others zero sum (the kernel sum is then the first
  coefficient, and holding that coefficient constant in space conserves it), and the
  zero-sum kernels orthonormalized among themselves for a well-conditioned fit.
- Delta-function: one kernel per pixel of the ``K x K`` box (Bramich 2008).
- Derived (PCA, truncated by BIC): a matrix whose columns express each derived kernel
  in the native functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

from ..errors import ConfigError

__all__ = [
    "SIGMA_TO_FWHM",
    "KernelBasis",
    "alard_lupton_basis",
    "delta_function_basis",
    "renormalize",
    "derive_basis",
    "regularization_matrix",
    "regularization_for",
    "basis_from_config",
    "al_sigmas_for_fwhm",
]

SIGMA_TO_FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True)
class KernelBasis:
    """A kernel basis expressed in native functions.

    Attributes
    ----------
    kind : str
        ``"alard-lupton"``, ``"delta-function"`` or ``"pca"``.
    kernel_size : int
        Odd side length ``K`` of the kernel images.
    native_images : numpy.ndarray
        ``(n_native, K, K)`` native kernel images.
    transform : numpy.ndarray
        ``(n_native, n_basis)``: basis kernel ``j`` is
        ``sum_r transform[r, j] * native_images[r]``.
    conserves_sum : bool
        True when kernel 0 has unit sum and every other kernel zero sum, so the
        kernel sum is coefficient 0 (and is held constant in the spatial model).
    separable : tuple of numpy.ndarray or None
        For Alard-Lupton, ``(fx, fy)``: 1-D filters ``(n_native, K)`` whose outer
        product ``fy[r][:, None] * fx[r][None, :]`` is native image ``r``.
    groups : tuple of int
        Number of basis kernels in each nested group, in order; prefixes that end on
        a group boundary are valid truncations (used by the BIC choice).
    description : dict
        Parameters that built the basis (sigmas, degrees...), for provenance.
    """

    kind: str
    kernel_size: int
    native_images: np.ndarray
    transform: np.ndarray
    conserves_sum: bool
    separable: tuple[np.ndarray, np.ndarray] | None = None
    groups: tuple[int, ...] = ()
    description: dict = field(default_factory=dict)

    @property
    def n_native(self) -> int:
        """Number of native functions."""
        return self.native_images.shape[0]

    @property
    def size(self) -> int:
        """Number of kernels in the basis."""
        return self.transform.shape[1]

    @property
    def images(self) -> np.ndarray:
        """``(n_basis, K, K)`` basis kernel images."""
        return np.einsum("rj,ryx->jyx", self.transform, self.native_images)

    @property
    def sums(self) -> np.ndarray:
        """Sum of each basis kernel, ``(n_basis,)``."""
        return self.native_images.sum(axis=(1, 2)) @ self.transform

    def kernel_image(self, coefficients: np.ndarray) -> np.ndarray:
        """Kernel image ``sum_j c_j * basis_j`` for coefficients ``(..., n_basis)``."""
        native = np.asarray(coefficients) @ self.transform.T
        return np.tensordot(native, self.native_images, axes=([-1], [0]))

    def truncated(self, n: int) -> KernelBasis:
        """The basis restricted to its first ``n`` kernels."""
        if not 1 <= n <= self.size:
            raise ValueError(f"cannot truncate a basis of {self.size} kernels to {n}")
        groups, total = [], 0
        for g in self.groups:
            if total + g > n:
                break
            groups.append(g)
            total += g
        if total < n:
            groups.append(n - total)
        return KernelBasis(
            self.kind,
            self.kernel_size,
            self.native_images,
            self.transform[:, :n],
            self.conserves_sum,
            self.separable,
            tuple(groups),
            {**self.description, "truncated_to": n},
        )


def _check_kernel_size(kernel_size: int) -> int:
    kernel_size = int(kernel_size)
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ConfigError(f"kernelSize must be odd and >= 3, got {kernel_size}")
    return kernel_size


def renormalize(
    native_images: np.ndarray, transform: np.ndarray, rtol: float = 1e-10
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Renormalize a kernel list so the kernel sum is carried by the first kernel.

    Kernel 0 is scaled to unit sum; every later kernel has ``sum * kernel0``
    subtracted, giving zero sum; the zero-sum kernels are then orthonormalized in
    order (Gram-Schmidt via QR), which keeps the span of every prefix and so the
    nesting used by BIC truncation. Kernels that are linearly dependent on earlier
    ones are dropped.

    Parameters
    ----------
    native_images : numpy.ndarray
        ``(n_native, K, K)``.
    transform : numpy.ndarray
        ``(n_native, n)`` kernels to renormalize, in native coordinates.
    rtol : float
        Relative size below which a Gram-Schmidt residual counts as dependent.

    Returns
    -------
    new_transform : numpy.ndarray
        ``(n_native, m)`` renormalized kernels, ``m <= n``.
    kept : tuple of int
        Indices of the input kernels that were kept.
    """
    flat = native_images.reshape(native_images.shape[0], -1)
    images = transform.T @ flat  # (n, K*K)
    sums = images.sum(axis=1)
    if abs(sums[0]) < 1e-12 * np.abs(images[0]).sum():
        raise ValueError("the first kernel of a list to renormalize must have a non-zero sum")
    t0 = transform[:, 0] / sums[0]
    rest = transform[:, 1:] - np.outer(t0, sums[1:])
    kept = [0]
    columns = [t0]
    if rest.shape[1]:
        rest_images = rest.T @ flat
        q_basis: list[np.ndarray] = []
        for j in range(rest.shape[1]):
            vec = rest_images[j].copy()
            coef = rest[:, j].copy()
            norm0 = np.linalg.norm(vec)
            for _ in range(2):  # twice is enough (Kahan-Parlett)
                for q_img, q_coef in q_basis:
                    proj = q_img @ vec
                    vec -= proj * q_img
                    coef -= proj * q_coef
            norm = np.linalg.norm(vec)
            if norm0 == 0 or norm <= rtol * max(norm0, 1.0):
                continue
            q_basis.append((vec / norm, coef / norm))
            columns.append(coef / norm)
            kept.append(j + 1)
    return np.stack(columns, axis=1), tuple(kept)


def alard_lupton_basis(
    kernel_size: int,
    sigmas: tuple[float, ...],
    degrees: tuple[int, ...],
    degree_field: str = "alardDegGauss",
) -> KernelBasis:
    """Alard-Lupton basis: Gaussians times polynomials, renormalized.

    Parameters
    ----------
    kernel_size : int
        Odd side length of the kernel box.
    sigmas : tuple of float
        Gaussian widths in pixels.
    degrees : tuple of int
        Polynomial degree for each Gaussian; Gaussian ``i`` contributes
        ``(d_i + 1)(d_i + 2) / 2`` functions ``x^p y^q``, ``p + q <= d_i``.
    degree_field : str
        The config field the degrees come from, for the error messages.

    Returns
    -------
    KernelBasis
        With ``conserves_sum`` True and one group per Gaussian.

    Raises
    ------
    ConfigError
        When a function would be dropped as dependent on the others (a degree beyond
        what its Gaussian resolves on the kernel's pixels, or Gaussians too alike), or
        the basis is numerically degenerate.
    """
    kernel_size = _check_kernel_size(kernel_size)
    if len(sigmas) != len(degrees) or not sigmas:
        raise ConfigError(
            f"need one polynomial degree per Gaussian: sigmas {sigmas}, degrees {degrees}"
        )
    for sigma, degree in zip(sigmas, degrees, strict=True):
        if sigma <= 0:
            raise ConfigError(f"Alard-Lupton Gaussian sigmas must be > 0, got {sigma}")
        if degree < 0:
            raise ConfigError(f"Alard-Lupton polynomial degrees must be >= 0, got {degree}")
    fx_arr, fy_arr, group_sizes = _al_factors(kernel_size, sigmas, degrees)
    native = fy_arr[:, :, None] * fx_arr[:, None, :]
    transform, kept = renormalize(native, np.eye(len(native)))
    if len(kept) < len(native):
        # Dropping them silently would give a smaller basis than the one configured.
        raise _dropped_error(kernel_size, sigmas, degrees, group_sizes, kept, degree_field)
    sums = native.sum(axis=(1, 2)) @ transform
    drift = float(np.max(np.abs(sums[1:]), initial=0.0))
    if drift > 1e-8 or len(kept) > kernel_size**2:
        # Nearly dependent Gaussians (sigmas too close, or too wide for the kernel)
        # need huge, cancelling coefficients: the kernel sum would not be conserved.
        raise ConfigError(
            f"Alard-Lupton basis of sigmas {list(sigmas)} and degrees {list(degrees)} in a "
            f"{kernel_size}x{kernel_size} kernel is numerically degenerate (its zero-sum "
            f"kernels sum to up to {drift:.1e}, {len(kept)} kernels for {kernel_size**2} "
            "pixels); space the sigmas further apart (alardGaussBeta, alardSigGauss), "
            f"lower {degree_field} or widen the kernel"
        )
    return KernelBasis(
        "alard-lupton",
        kernel_size,
        native,
        transform,
        True,
        (fx_arr, fy_arr),
        tuple(group_sizes),
        {"sigmas": [float(s) for s in sigmas], "degrees": [int(d) for d in degrees]},
    )


def _al_factors(
    kernel_size: int, sigmas: tuple[float, ...], degrees: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """1-D factors ``g_s(u) u^p`` and ``g_s(v) v^q`` of the native AL functions, and the
    number of functions of each Gaussian."""
    half = kernel_size // 2
    u = np.arange(-half, half + 1, dtype=np.float64)
    fx, fy, group_sizes = [], [], []
    for sigma, degree in zip(sigmas, degrees, strict=True):
        gauss = np.exp(-0.5 * (u / sigma) ** 2)
        for total in range(degree + 1):
            for q in range(total + 1):
                p = total - q
                fx.append(gauss * (u / half) ** p)
                fy.append(gauss * (u / half) ** q)
        group_sizes.append((degree + 1) * (degree + 2) // 2)
    return np.array(fx), np.array(fy), group_sizes


def _dropped_error(
    kernel_size: int,
    sigmas: tuple[float, ...],
    degrees: tuple[int, ...],
    group_sizes: list[int],
    kept: tuple[int, ...],
    degree_field: str,
) -> ConfigError:
    """Why renormalizing an AL basis dropped functions, naming the field to change."""
    ends = np.cumsum(group_sizes)
    lost = np.bincount(np.searchsorted(ends, sorted(set(range(ends[-1])) - set(kept)), "right"))
    i = int(np.flatnonzero(lost)[0])
    sigma, degree, limit = sigmas[i], degrees[i], degrees[i]
    while limit > 0:  # the highest degree whose functions of this Gaussian are independent
        fx, fy, _ = _al_factors(kernel_size, (sigma,), (limit,))
        alone = fy[:, :, None] * fx[:, None, :]
        if len(renormalize(alone, np.eye(len(alone)))[1]) == len(alone):
            break
        limit -= 1
    if limit < degree:
        return ConfigError(
            f"{degree_field}: degree {degree} for the {sigma:.3g} px Alard-Lupton Gaussian is "
            f"more than a {kernel_size}x{kernel_size} kernel resolves (its powers above "
            f"{limit} are numerically dependent and {lost[i]} of its functions would be "
            f"dropped); use degree {limit} or less for it"
        )
    return ConfigError(
        f"Alard-Lupton Gaussians of sigmas {[round(float(s), 4) for s in sigmas]} are too "
        f"alike: {lost[i]} function(s) of the {sigma:.3g} px one repeat earlier ones and "
        "would be dropped; space the sigmas apart (alardGaussBeta > 1, distinct alardSigGauss)"
    )


def delta_function_basis(kernel_size: int) -> KernelBasis:
    """Delta-function basis: one kernel per pixel of the ``K x K`` box.

    The kernel sum is not conserved (each pixel is free); a PCA basis derived from
    these fits restores conservation.
    """
    kernel_size = _check_kernel_size(kernel_size)
    n = kernel_size * kernel_size
    native = np.eye(n).reshape(n, kernel_size, kernel_size)
    return KernelBasis("delta-function", kernel_size, native, np.eye(n), False, None, (n,), {})


def derive_basis(
    parent: KernelBasis,
    transform: np.ndarray,
    kind: str,
    conserves_sum: bool,
    groups: tuple[int, ...],
    description: dict,
) -> KernelBasis:
    """A basis whose kernels are linear combinations of ``parent``'s basis kernels.

    Parameters
    ----------
    parent : KernelBasis
        The basis the combinations refer to.
    transform : numpy.ndarray
        ``(parent.size, n)`` combinations.
    """
    return KernelBasis(
        kind,
        parent.kernel_size,
        parent.native_images,
        parent.transform @ transform,
        conserves_sum,
        parent.separable,
        groups,
        description,
    )


def regularization_matrix(
    kernel_size: int,
    regularization_type: str,
    central_stencil: int = 9,
    forward_orders: tuple[int, ...] = (1, 2),
    border_penalty: float = 3.0,
) -> np.ndarray:
    """Smoothness penalty ``H`` for a delta-function kernel: ``a^T H a``.

    ``H = L^T L + border_penalty * D`` where ``L`` applies finite differences on the
    ``K x K`` grid (missing neighbours outside the box count as zero, which also
    pulls the kernel to zero at its border) and ``D`` is diagonal, one on the
    border pixels.

    Parameters
    ----------
    kernel_size : int
        Odd kernel side.
    regularization_type : {"centralDifference", "forwardDifference"}
        Central: a discrete Laplacian with a 5- or 9-point stencil.
        Forward: the sum of squared forward differences of each order in
        ``forward_orders`` along x and along y.
    central_stencil : {5, 9}
        Laplacian stencil for the central type.
    forward_orders : tuple of int
        Orders 0..3 of the forward differences.
    border_penalty : float
        Extra penalty on the border pixels (>= 0).
    """
    k = _check_kernel_size(kernel_size)
    n = k * k
    y, x = np.divmod(np.arange(n), k)

    def stencil_operator(offsets: list[tuple[int, int, float]]) -> sparse.csr_matrix:
        # Sparse: a few entries per row. Dense n x n products of these operators took
        # 0.2 s for a 35 x 35 kernel; the entries are small integers either way, so
        # the sums are exact and H is the same.
        rows, cols, vals = [], [], []
        for dy, dx, w in offsets:
            yy, xx = y + dy, x + dx
            inside = np.flatnonzero((0 <= yy) & (yy < k) & (0 <= xx) & (xx < k))
            rows.append(inside)
            cols.append(yy[inside] * k + xx[inside])
            vals.append(np.full(inside.size, w))
        entries = (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols)))
        return sparse.csr_matrix(entries, shape=(n, n))

    if regularization_type == "centralDifference":
        if central_stencil == 5:
            offsets = [(0, 0, -4.0), (1, 0, 1.0), (-1, 0, 1.0), (0, 1, 1.0), (0, -1, 1.0)]
        elif central_stencil == 9:
            offsets = [(0, 0, -8.0)] + [
                (dy, dx, 1.0) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
            ]
        else:
            raise ConfigError(f"centralRegularizationStencil must be 5 or 9, got {central_stencil}")
        ops = [stencil_operator(offsets)]
    elif regularization_type == "forwardDifference":
        if not forward_orders:
            raise ConfigError("forwardRegularizationOrders must not be empty")
        ops = []
        for order in forward_orders:
            if not 0 <= int(order) <= 3:
                raise ConfigError(f"forward regularization orders must be 0..3, got {order}")
            coeffs = _binomial_differences(int(order))
            ops.append(stencil_operator([(0, i, c) for i, c in enumerate(coeffs)]))
            ops.append(stencil_operator([(i, 0, c) for i, c in enumerate(coeffs)]))
    else:
        raise ConfigError(
            f"regularizationType must be 'centralDifference' or 'forwardDifference', "
            f"got {regularization_type!r}"
        )
    h = sum(op.T @ op for op in ops).toarray()
    if border_penalty < 0:
        raise ConfigError(f"regularizationBorderPenalty must be >= 0, got {border_penalty}")
    border = np.zeros((k, k), dtype=bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    h = h + border_penalty * np.diag(border.ravel().astype(np.float64))
    return h


def regularization_for(basis: KernelBasis, config) -> np.ndarray | None:
    """The penalty ``H`` a configuration asks for on ``basis``, or None.

    Delta-function bases are regularized with ``useRegularization`` (the strength
    comes from ``lambdaType``); Alard-Lupton ones with ``alardRegularization > 0``:
    then ``H`` is that strength times the 9-point Laplacian penalty of the kernel
    image, written in the basis (``B H_pix Bᵀ``, ``B`` the basis images).
    """
    strength = float(getattr(config, "alardRegularization", 0.0))
    if basis.kind == "alard-lupton" and strength > 0:
        images = basis.images.reshape(basis.size, -1)
        laplacian = regularization_matrix(basis.kernel_size, "centralDifference", 9, (1,), 0.0)
        # einsum's own loops, not BLAS: a threaded product's rounding depends on the
        # thread count, and H must be the same wherever the fit runs.
        rough = np.einsum("ip,pq->iq", images, laplacian)
        return strength * np.einsum("iq,jq->ij", rough, images)
    if basis.kind != "delta-function" or not getattr(config, "useRegularization", False):
        return None
    return regularization_matrix(
        basis.kernel_size,
        config.regularizationType,
        config.centralRegularizationStencil,
        tuple(config.forwardRegularizationOrders),
        config.regularizationBorderPenalty,
    )


def _binomial_differences(order: int) -> list[float]:
    """Coefficients of the forward difference of ``order``: (-1)^(order-i) C(order, i)."""
    from math import comb

    return [(-1.0) ** (order - i) * comb(order, i) for i in range(order + 1)]


def al_sigmas_for_fwhm(
    template_fwhm: float,
    science_fwhm: float,
    n_gauss: int,
    beta: float,
    min_sigma: float,
) -> tuple[list[float], float]:
    """Gaussian widths for an AL basis sized from the two PSF widths.

    The matching kernel of two Gaussian PSFs has ``sigma_k^2 = |s_sci^2 - s_tmpl^2|``
    (floored at ``min_sigma``). With several Gaussians the ladder starts at
    ``max(min_sigma, sigma_k / beta)`` and multiplies by ``beta``, so that it is centred
    on ``sigma_k`` where it can be; a single Gaussian is ``sigma_k`` itself. This is
    ip_diffim's rule since 2026 (``_calculateBasisSigmas``): the earlier rule started
    at ``sigma_k`` whenever ``sigma_k / beta <= min_sigma``, so every width jumped by a
    factor ``beta`` as ``sigma_k`` fell below ``beta * min_sigma``, and the kernels of
    PSFs on either side of that point were unstable.

    Returns
    -------
    sigmas : list of float
        Increasing widths, continuous in both FWHMs.
    sigma_k : float
        The matching-kernel width (floored at ``min_sigma``).
    """
    s_t = template_fwhm / SIGMA_TO_FWHM
    s_s = science_fwhm / SIGMA_TO_FWHM
    sigma_k = max(float(np.sqrt(abs(s_s**2 - s_t**2))), min_sigma)
    if n_gauss == 1:
        return [sigma_k], sigma_k
    sigmas = [max(min_sigma, sigma_k / beta)]
    while len(sigmas) < n_gauss:
        sigmas.append(sigmas[-1] * beta)
    return sigmas, sigma_k


def _odd_size_clipped(size: float, size_min: int, size_max: int) -> int:
    k = int(size)
    if k % 2 == 0:
        k += 1
    return int(min(size_max, max(size_min, k)))


def basis_from_config(
    config, template_fwhm: float | None = None, science_fwhm: float | None = None
) -> KernelBasis:
    """Build the basis a :class:`~diffkernel.config.PsfMatchConfig` asks for.

    With ``scaleByFwhm`` and both PSF widths known, the Alard-Lupton widths follow
    :func:`al_sigmas_for_fwhm` and the kernel size is ``kernelSizeFwhmScaling``
    times the largest width, made odd and clipped to ``kernelSizeMin/Max``. When the
    science PSF is the narrower (matching would deconvolve), the ``*Deconv``
    fields set the number of Gaussians, their degree and the minimum width. For the
    delta-function basis the size is ``kernelSizeFwhmScaling`` times ``2 sigma_k``
    (the largest width of the default AL ladder once sigma_k >= 1.4), clipped the same way.

    Parameters
    ----------
    config : PsfMatchConfigAL or PsfMatchConfigDF
        The active kernel configuration.
    template_fwhm, science_fwhm : float, optional
        PSF FWHMs in pixels.
    """
    scale = (
        bool(config.scaleByFwhm)
        and template_fwhm is not None
        and science_fwhm is not None
        and template_fwhm > 0
        and science_fwhm > 0
    )
    if config.kernelBasisSet == "alard-lupton":
        sigmas = tuple(config.alardSigGauss)
        degrees = tuple(config.alardDegGauss)
        kernel_size = config.kernelSize
        deconvolve = False
        if scale:
            deconvolve = bool(science_fwhm < template_fwhm)
            if deconvolve:
                n_gauss = config.alardNGaussDeconv
                min_sigma = config.alardMinSigDeconv
                degrees = (config.alardDegGaussDeconv,) * n_gauss
            else:
                n_gauss = config.alardNGauss
                min_sigma = config.alardMinSig
            sig_list, _ = al_sigmas_for_fwhm(
                template_fwhm, science_fwhm, n_gauss, config.alardGaussBeta, min_sigma
            )
            sigmas = tuple(sig_list)
            kernel_size = _odd_size_clipped(
                config.kernelSizeFwhmScaling * sigmas[-1],
                config.kernelSizeMin,
                config.kernelSizeMax,
            )
        degree_field = "alardDegGaussDeconv" if deconvolve else "alardDegGauss"
        basis = alard_lupton_basis(kernel_size, sigmas, degrees, degree_field)
        basis.description.update(
            {
                "scaled_by_fwhm": scale,
                "deconvolution": deconvolve,
                "template_fwhm": template_fwhm,
                "science_fwhm": science_fwhm,
            }
        )
        return basis
    if config.kernelBasisSet == "delta-function":
        kernel_size = config.kernelSize
        if scale:
            _, sigma_k = al_sigmas_for_fwhm(template_fwhm, science_fwhm, 1, 2.0, 0.7)
            kernel_size = _odd_size_clipped(
                config.kernelSizeFwhmScaling * 2.0 * sigma_k,
                config.kernelSizeMin,
                config.kernelSizeMax,
            )
        basis = delta_function_basis(kernel_size)
        basis.description.update(
            {"scaled_by_fwhm": scale, "template_fwhm": template_fwhm, "science_fwhm": science_fwhm}
        )
        return basis
    raise ConfigError(
        f"kernelBasisSet must be 'alard-lupton' or 'delta-function', got {config.kernelBasisSet!r}"
    )
