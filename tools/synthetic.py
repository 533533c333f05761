"""Synthetic data: normal-variety augmentation of healthy volumes and synthetic lesions.

Pure functions on numpy arrays (scipy for filtering and resampling); nothing here reads or writes
files. Every random choice comes from a ``numpy.random.Generator`` passed by the caller, so the same
seed gives the same output. Shapes and sizes are in voxels unless a ``spacing`` is given.

Two groups of functions:

* normal variety (pseudo-subjects): :func:`smooth_noise`, :func:`random_bias_field`,
  :func:`elastic_displacement`, :func:`random_affine`, :func:`warp`, :func:`elastic_deform`,
  :func:`intensity_curve`, :func:`rician_noise`, :func:`pseudo_subject`;
* lesions: :func:`make_lesion_mask`, :func:`insert_lesion`, :func:`random_lesion_centre`,
  :func:`add_random_lesions`;

plus the geometry helpers the sample-data script needs to keep affines true:
:func:`crop_with_affine` and :func:`thick_slices`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "smooth_noise",
    "random_bias_field",
    "elastic_displacement",
    "random_affine",
    "warp",
    "elastic_deform",
    "intensity_curve",
    "rician_noise",
    "pseudo_subject",
    "make_lesion_mask",
    "insert_lesion",
    "random_lesion_centre",
    "add_random_lesions",
    "crop_with_affine",
    "thick_slices",
]

Shape = tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Smooth random fields
# --------------------------------------------------------------------------------------------


def smooth_noise(shape: Sequence[int], rng: np.random.Generator, *, sigma: float | Sequence[float]) -> np.ndarray:
    """Gaussian-filtered white noise of ``shape`` rescaled to zero mean and unit standard deviation.

    ``sigma`` (voxels, scalar or per axis) sets the correlation length. Returns float32.
    """
    shape = tuple(int(s) for s in shape)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    std = float(noise.std())
    noise = noise - noise.mean()
    if std > 0:
        noise /= std
    return noise.astype(np.float32)


def _upsample_grid(coarse: np.ndarray, shape: Shape) -> np.ndarray:
    """Cubic interpolation of a coarse control grid spanning the whole of ``shape``."""
    axes = [np.linspace(0.0, c - 1.0, s) for c, s in zip(coarse.shape, shape)]
    coords = np.meshgrid(*axes, indexing="ij", sparse=False)
    return ndimage.map_coordinates(coarse, coords, order=3, mode="nearest")


def random_bias_field(
    shape: Sequence[int],
    rng: np.random.Generator,
    *,
    strength: float = 0.2,
    control_points: int = 4,
) -> np.ndarray:
    """A smooth multiplicative bias field (MRI receive-coil inhomogeneity) of ``shape``.

    A random ``control_points``-per-axis grid is interpolated (cubic) to full size, scaled so that
    its largest log-deviation is ``strength``, and exponentiated: values lie in
    ``[exp(-strength), exp(strength)]`` and the field is positive and centred on 1 in log scale.
    Returns float32.
    """
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if control_points < 2:
        raise ValueError(f"control_points must be >= 2, got {control_points}")
    shape = tuple(int(s) for s in shape)
    coarse = rng.standard_normal((control_points,) * len(shape))
    log_field = _upsample_grid(coarse, shape)
    log_field -= log_field.mean()
    peak = float(np.abs(log_field).max())
    if peak > 0:
        log_field *= strength / peak
    return np.exp(log_field).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Spatial transforms
# --------------------------------------------------------------------------------------------


def elastic_displacement(
    shape: Sequence[int],
    rng: np.random.Generator,
    *,
    alpha: float,
    sigma: float,
) -> np.ndarray:
    """A smooth random displacement field of shape ``(ndim, *shape)`` in voxels.

    Each component is white noise smoothed with a Gaussian of ``sigma`` voxels and scaled so that
    its standard deviation is ``alpha`` voxels (so ``alpha`` is the typical displacement and
    ``sigma`` its spatial correlation length).
    """
    shape = tuple(int(s) for s in shape)
    return np.stack([alpha * smooth_noise(shape, rng, sigma=sigma) for _ in shape]).astype(np.float32)


def random_affine(
    shape: Sequence[int],
    rng: np.random.Generator,
    *,
    max_rotation_deg: float = 4.0,
    max_scale: float = 0.04,
    max_shift: float = 2.0,
) -> np.ndarray:
    """A small random 4x4 voxel-space affine about the volume centre (3D only).

    Rotations about each axis are uniform in ``±max_rotation_deg``, per-axis scale factors in
    ``1 ± max_scale``, translations in ``±max_shift`` voxels. The matrix maps OUTPUT voxel indices
    to INPUT voxel indices (the pull-back convention of :func:`warp`).
    """
    if len(shape) != 3:
        raise ValueError(f"random_affine needs a 3D shape, got {tuple(shape)}")
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, size=3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        r[a, a] = r[b, b] = np.cos(angle)
        r[a, b] = -np.sin(angle)
        r[b, a] = np.sin(angle)
        rotation = r @ rotation
    scale = np.diag(rng.uniform(1.0 - max_scale, 1.0 + max_scale, size=3))
    linear = rotation @ scale
    centre = (np.asarray(shape, dtype=float) - 1.0) / 2.0
    shift = rng.uniform(-max_shift, max_shift, size=3)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre - linear @ centre + shift
    return matrix


def warp(
    volume: np.ndarray,
    *,
    displacement: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Resample ``volume`` at ``affine @ index + displacement`` for every output voxel index.

    ``affine`` (4x4, output index -> input index) and ``displacement`` (``(3, *shape)`` voxels) are
    both optional; with neither the volume is returned unchanged (as a copy). Use ``order=0`` for
    label maps so they stay labels; ``order=1`` or ``3`` for images. Outside the input, ``cval``.
    """
    volume = np.asarray(volume)
    shape = volume.shape
    if displacement is not None and displacement.shape != (volume.ndim, *shape):
        raise ValueError(f"displacement shape {displacement.shape} does not match volume {shape}")
    if displacement is None and affine is None:
        return volume.copy()
    grid = np.indices(shape, dtype=np.float32)
    if affine is not None:
        flat = grid.reshape(volume.ndim, -1)
        flat = affine[:3, :3].astype(np.float32) @ flat + affine[:3, 3:4].astype(np.float32)
        grid = flat.reshape(volume.ndim, *shape)
    if displacement is not None:
        grid = grid + displacement
    src = volume.astype(np.float32) if order > 0 and not np.issubdtype(volume.dtype, np.floating) else volume
    out = ndimage.map_coordinates(src, grid, order=order, mode="constant", cval=cval, prefilter=order > 1)
    return out.astype(volume.dtype, copy=False) if order == 0 else out


def elastic_deform(
    volume: np.ndarray,
    rng: np.random.Generator,
    *,
    alpha: float = 3.0,
    sigma: float = 12.0,
    order: int = 1,
) -> np.ndarray:
    """Smooth elastic deformation of ``volume`` (displacement std ``alpha`` voxels, smoothness ``sigma``).

    The field depends only on the volume's shape and the generator's state, so calling this on an
    image and on its mask with generators in the same state (same seed) deforms both alike; use
    ``order=0`` for masks. To reuse one field explicitly, call :func:`elastic_displacement` and
    :func:`warp`.
    """
    field = elastic_displacement(volume.shape, rng, alpha=alpha, sigma=sigma)
    return warp(volume, displacement=field, order=order)


# --------------------------------------------------------------------------------------------
# Intensity transforms
# --------------------------------------------------------------------------------------------


def intensity_curve(
    volume: np.ndarray,
    rng: np.random.Generator,
    *,
    gamma_range: tuple[float, float] = (0.75, 1.35),
    gain_range: tuple[float, float] = (1.0, 1.0),
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Random monotone contrast change: ``gain * top * (v / top) ** gamma`` for ``v >= 0``.

    ``top`` is the 99.5th percentile of the volume (of ``mask`` voxels where given), ``gamma`` is
    log-uniform in ``gamma_range`` and ``gain`` uniform in ``gain_range`` (scanner scale). Zero stays
    zero, order between voxel values is kept. Returns float32.
    """
    lo, hi = gamma_range
    if not 0 < lo <= hi:
        raise ValueError(f"gamma_range must be positive and ordered, got {gamma_range}")
    vol = np.asarray(volume, dtype=np.float32)
    values = vol[mask.astype(bool)] if mask is not None else vol
    top = float(np.percentile(values, 99.5)) if values.size else 0.0
    if top <= 0:
        return vol.copy()
    gamma = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    gain = float(rng.uniform(*gain_range))
    scaled = np.clip(vol, 0.0, None) / top
    return (gain * top * scaled**gamma).astype(np.float32)


def rician_noise(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    std: float,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Magnitude-MRI noise: ``sqrt((image + n1)**2 + n2**2)`` with Gaussian ``n1, n2`` of ``std``.

    ``std`` is in the image's units. Where ``mask`` is given, voxels outside it are left as they
    were (skull-stripped background stays 0). Returns float32.
    """
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    image = np.asarray(image, dtype=np.float32)
    if std == 0:
        return image.copy()
    real = image + rng.normal(0.0, std, size=image.shape).astype(np.float32)
    imag = rng.normal(0.0, std, size=image.shape).astype(np.float32)
    noisy = np.sqrt(real * real + imag * imag)
    if mask is not None:
        noisy = np.where(np.asarray(mask, dtype=bool), noisy, image)
    return noisy.astype(np.float32)


def pseudo_subject(
    volume: np.ndarray,
    brain_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    elastic_alpha: float = 2.5,
    elastic_sigma: float = 14.0,
    max_rotation_deg: float = 4.0,
    max_scale: float = 0.05,
    max_shift: float = 3.0,
    bias_strength: float = 0.15,
    gamma_range: tuple[float, float] = (0.8, 1.25),
    gain_range: tuple[float, float] = (0.85, 1.15),
    blur_sigma_range: tuple[float, float] = (0.0, 0.0),
    noise_std: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A plausible other "normal subject" made from one healthy 3D volume and its brain mask.

    Steps, all drawn from ``rng``: a small affine jitter (rotation, anisotropic scale, shift) composed
    with a smooth elastic deformation, applied to image (linear) and mask (nearest) through the same
    coordinate map; an optional Gaussian blur (``blur_sigma_range`` voxels, acquisition resolution);
    a multiplicative bias field; a gamma/gain intensity curve; optional Gaussian noise of
    ``noise_std`` times the brain's 99.5th percentile. The image is zero outside the new mask.
    Returns ``(image float32, mask bool)``.
    """
    volume = np.asarray(volume, dtype=np.float32)
    brain_mask = np.asarray(brain_mask, dtype=bool)
    if volume.shape != brain_mask.shape or volume.ndim != 3:
        raise ValueError(f"volume {volume.shape} and brain_mask {brain_mask.shape} must be the same 3D shape")
    matrix = random_affine(
        volume.shape, rng, max_rotation_deg=max_rotation_deg, max_scale=max_scale, max_shift=max_shift
    )
    field = elastic_displacement(volume.shape, rng, alpha=elastic_alpha, sigma=elastic_sigma)
    image = warp(volume, affine=matrix, displacement=field, order=1)
    mask = warp(brain_mask.astype(np.uint8), affine=matrix, displacement=field, order=0).astype(bool)
    blur = float(rng.uniform(*blur_sigma_range))
    if blur > 0:
        image = ndimage.gaussian_filter(image, blur)
    image *= random_bias_field(volume.shape, rng, strength=bias_strength)
    image = intensity_curve(image, rng, gamma_range=gamma_range, gain_range=gain_range, mask=mask)
    if noise_std > 0 and mask.any():
        top = float(np.percentile(image[mask], 99.5))
        image = rician_noise(image, rng, std=noise_std * top)
    image[~mask] = 0.0
    return image.astype(np.float32), mask


# --------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------


def _ellipsoid_box(shape: Shape, centre: Sequence[float], radii: Sequence[float]) -> tuple[slice, ...]:
    return tuple(
        slice(max(0, int(np.floor(c - r))), min(s, int(np.ceil(c + r)) + 1))
        for c, r, s in zip(centre, radii, shape)
    )


def make_lesion_mask(
    shape: Sequence[int],
    centre: Sequence[float],
    radii: Sequence[float],
    rng: np.random.Generator,
    *,
    irregularity: float = 0.5,
    roughness: float = 0.3,
) -> np.ndarray:
    """An irregular, smooth-edged blob inside the ellipsoid ``(centre, radii)`` (voxels).

    The level ``1 - r**2`` (``r`` the normalised ellipsoidal radius) is perturbed by smooth noise of
    amplitude ``irregularity`` (correlation length ``roughness`` times the smallest radius) and
    thresholded at 0.3; only the connected component holding the strongest level is kept, so the
    blob is one piece, never empty, and never leaves the ellipsoid. Returns a bool array of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    centre = np.asarray(centre, dtype=float)
    radii = np.asarray(radii, dtype=float)
    if len(centre) != len(shape) or len(radii) != len(shape):
        raise ValueError("centre and radii need one value per axis of shape")
    if np.any(radii <= 0):
        raise ValueError(f"radii must be positive, got {tuple(radii)}")
    box = _ellipsoid_box(shape, centre, radii)
    mask = np.zeros(shape, dtype=bool)
    if any(b.stop <= b.start for b in box):
        raise ValueError(f"ellipsoid at {tuple(centre)} with radii {tuple(radii)} lies outside shape {shape}")
    axes = [np.arange(b.start, b.stop, dtype=float) for b in box]
    grids = np.meshgrid(*axes, indexing="ij")
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
    sub_shape = r2.shape
    noise = smooth_noise(sub_shape, rng, sigma=max(roughness * float(radii.min()), 0.5))
    noise /= max(float(np.abs(noise).max()), 1e-6)
    level = (1.0 - r2) + irregularity * noise
    inside = r2 < 1.0
    blob = (level > 0.3) & inside
    if blob.any():
        labels, _ = ndimage.label(blob)
        peak = np.unravel_index(np.argmax(np.where(blob, level, -np.inf)), sub_shape)
        blob = labels == labels[peak]
    else:
        blob[np.unravel_index(np.argmin(r2), sub_shape)] = True
    blob = ndimage.binary_fill_holes(blob)
    mask[box] = blob
    return mask


def insert_lesion(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    contrast: float,
    rng: np.random.Generator,
    halo: float = 3.0,
    halo_amplitude: float = 0.35,
    edge: float = 1.5,
    texture: float = 0.08,
    reference: float | None = None,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Paint a lesion into ``image`` where ``mask`` is set; returns a new float32 image.

    The lesion intensity is ``reference * (1 + contrast)`` with smooth multiplicative texture of
    relative amplitude ``texture``: ``contrast > 0`` gives a hyperintense (bright) lesion, ``< 0`` a
    hypointense (dark) one. ``reference`` defaults to the median of ``image`` inside the mask (the
    tissue the lesion replaces). Voxels move towards that intensity with a weight that is 1 deeper
    than ``edge`` inside the mask, ramps down across the border to ``halo_amplitude``, and fades to 0
    at ``halo`` (oedema-like ring) outside it; distances are in voxels, or in the units of
    ``spacing``. A bright lesion never darkens a voxel and a dark one never brightens one; voxels
    farther than ``halo`` from the mask are unchanged.
    """
    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in shape")
    if contrast == 0 or not mask.any():
        return image.copy()
    if reference is None:
        reference = float(np.median(image[mask]))
    sampling = None if spacing is None else tuple(float(s) for s in spacing)
    # Work in the mask's bounding box grown by the halo, for speed on whole volumes.
    grow = int(np.ceil(max(halo, edge) / min(sampling or (1.0,)))) + 2
    idx = np.argwhere(mask)
    box = tuple(
        slice(max(0, lo - grow), min(s, hi + grow + 1)) for lo, hi, s in zip(idx.min(0), idx.max(0), mask.shape)
    )
    sub_mask = mask[box]
    outside = ndimage.distance_transform_edt(~sub_mask, sampling=sampling)
    inside = ndimage.distance_transform_edt(sub_mask, sampling=sampling)
    weight = np.zeros(sub_mask.shape, dtype=np.float32)
    # Inside: smoothstep from halo_amplitude at the border to 1 at depth `edge`.
    t = np.clip(inside / max(edge, 1e-6), 0.0, 1.0)
    ramp = t * t * (3.0 - 2.0 * t)
    weight[sub_mask] = (halo_amplitude + (1.0 - halo_amplitude) * ramp)[sub_mask]
    if halo > 0:
        ring = (~sub_mask) & (outside <= halo)
        fade = np.clip(1.0 - outside / halo, 0.0, 1.0) ** 2
        weight[ring] = (halo_amplitude * fade)[ring]
    target = reference * (1.0 + contrast)
    if texture > 0:
        target = target * (1.0 + texture * smooth_noise(sub_mask.shape, rng, sigma=2.0))
    sub = image[box]
    delta = target - sub
    delta = np.clip(delta, 0.0, None) if contrast > 0 else np.clip(delta, None, 0.0)
    out = image.copy()
    out[box] = sub + weight * delta
    return out


def random_lesion_centre(
    allowed: np.ndarray,
    radii: Sequence[float],
    rng: np.random.Generator,
) -> tuple[int, ...]:
    """A random voxel of ``allowed`` at which the ellipsoid ``radii`` fits entirely inside ``allowed``.

    Falls back to the deepest voxel of ``allowed`` (largest distance to its border) when no position
    fits. Raises ``ValueError`` if ``allowed`` is empty.
    """
    allowed = np.asarray(allowed, dtype=bool)
    if not allowed.any():
        raise ValueError("allowed region is empty")
    radii = np.asarray(radii, dtype=float)
    # Distance measured in units of each axis's radius: the nearest voxel outside ``allowed`` lies
    # outside the ellipsoid exactly when this distance is >= 1. The array border counts as outside.
    padded = np.pad(allowed, 1, constant_values=False)
    depth = ndimage.distance_transform_edt(padded, sampling=1.0 / radii)[(slice(1, -1),) * allowed.ndim]
    candidates = np.argwhere(depth >= 1.0)
    if len(candidates) == 0:
        return tuple(int(i) for i in np.unravel_index(np.argmax(depth), allowed.shape))
    return tuple(int(i) for i in candidates[rng.integers(len(candidates))])


def add_random_lesions(
    image: np.ndarray,
    allowed: np.ndarray,
    rng: np.random.Generator,
    *,
    count: int = 1,
    radius_range: tuple[float, float] = (6.0, 15.0),
    contrast: float | Sequence[float] = 0.6,
    irregularity: float = 0.5,
    halo: float = 3.0,
    reference: float | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Insert ``count`` random lesions into ``image`` inside the ``allowed`` region.

    Each lesion gets per-axis radii uniform in ``radius_range`` (in the units of ``spacing``), a
    centre from :func:`random_lesion_centre` (lesions already placed are excluded), a shape from
    :func:`make_lesion_mask` and intensity from :func:`insert_lesion`; ``contrast`` is one value or
    one per lesion (sign: bright or dark). Returns ``(image, labels)`` with labels uint8 0/1.
    """
    image = np.asarray(image, dtype=np.float32)
    free = np.asarray(allowed, dtype=bool).copy()
    spacing_arr = np.asarray(spacing, dtype=float)
    if np.isscalar(contrast):
        contrasts = [float(contrast)] * count  # type: ignore[arg-type]
    else:
        contrasts = [float(c) for c in contrast]  # type: ignore[union-attr]
    if len(contrasts) != count:
        raise ValueError(f"got {len(contrasts)} contrasts for {count} lesions")
    labels = np.zeros(image.shape, dtype=np.uint8)
    for c in contrasts:
        radii_mm = rng.uniform(*radius_range, size=image.ndim)
        radii = radii_mm / spacing_arr
        centre = random_lesion_centre(free, radii, rng)
        mask = make_lesion_mask(image.shape, centre, radii, rng, irregularity=irregularity) & np.asarray(allowed, bool)
        image = insert_lesion(image, mask, contrast=c, rng=rng, halo=halo, reference=reference, spacing=spacing)
        labels[mask] = 1
        keep_out = ndimage.binary_dilation(mask, iterations=max(1, int(np.ceil(halo / spacing_arr.min()))))
        free &= ~keep_out
    return image, labels


# --------------------------------------------------------------------------------------------
# Geometry helpers that keep the affine true
# --------------------------------------------------------------------------------------------


def crop_with_affine(
    volume: np.ndarray, affine: np.ndarray, start: Sequence[int], stop: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``volume[start:stop]`` (per axis, may extend outside: zero-padded) and shift ``affine``.

    The returned affine maps the cropped array's voxel (0, 0, 0) to the world position of the
    source voxel ``start``, so the crop stays where it was in world space.
    """
    start = np.asarray(start, dtype=int)
    stop = np.asarray(stop, dtype=int)
    if np.any(stop <= start):
        raise ValueError(f"empty crop {tuple(start)}..{tuple(stop)}")
    out = np.zeros(tuple(stop - start), dtype=volume.dtype)
    src = tuple(slice(max(0, a), min(s, b)) for a, b, s in zip(start, stop, volume.shape))
    dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, start))
    out[dst] = volume[src]
    shift = np.eye(4)
    shift[:3, 3] = start
    return out, np.asarray(affine, dtype=float) @ shift


def thick_slices(
    volume: np.ndarray, affine: np.ndarray, *, factor: int, axis: int = 2, reduce: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    """Merge every ``factor`` consecutive slices along ``axis`` into one thick slice.

    ``reduce="mean"`` averages (partial-volume, like a thick acquired slice; for images and for
    soft masks), ``"max"`` keeps any set voxel (for label maps). Trailing slices that do not fill a
    group are dropped. The affine's column for ``axis`` is multiplied by ``factor`` and the origin
    moves to the centre of the first group, so world positions stay true.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    n = volume.shape[axis] // factor
    if n == 0:
        raise ValueError(f"axis {axis} has {volume.shape[axis]} slices, fewer than factor {factor}")
    moved = np.moveaxis(volume, axis, -1)[..., : n * factor]
    grouped = moved.reshape(*moved.shape[:-1], n, factor)
    if reduce == "mean":
        merged = grouped.astype(np.float32).mean(axis=-1)
    elif reduce == "max":
        merged = grouped.max(axis=-1)
    else:
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    out = np.moveaxis(merged, -1, axis)
    scale = np.eye(4)
    scale[axis, axis] = factor
    scale[axis, 3] = (factor - 1) / 2.0
    return out, np.asarray(affine, dtype=float) @ scale
