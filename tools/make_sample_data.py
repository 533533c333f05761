"""Make the sample volumes in ``sample_data/`` from two healthy brain templates.

Run from the repository root::

    python tools/make_sample_data.py            # writes into sample_data/
    python tools/make_sample_data.py --out DIR  # writes elsewhere

Sources (both T1-weighted, 1 mm, RAS, in MNI space; nothing is downloaded by this script):

* MNI ICBM152 2009a symmetric T1 template with its grey- and white-matter probability maps, as
  bundled in the nilearn wheel (``pip install nilearn``): files
  ``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``.
* Colin27 (one real subject, average of 27 scans), skull-stripped, from the Debian/Ubuntu package
  ``mricron-data`` (``sudo apt-get install mricron-data``): ``/usr/share/mricron/templates/ch2bet.nii.gz``.

What it writes (see ``sample_data/README.md`` for the design, the subject split and the licences):

* ``normal_01..03.nii.gz``: lesion-free volumes of the BANK subject (the MNI152 template itself and
  two augmented pseudo-subjects of it), for the memory bank;
* ``case_01.nii.gz`` / ``case_01_seg.nii.gz``: the TEST subject (Colin27) with one large bright lesion;
* ``case_02.nii.gz`` / ``case_02_seg.nii.gz``: an augmented pseudo-subject of the test subject with a
  bright and a dark lesion.

Every output is cropped to the brain in-plane (1 mm voxels, blurred by a Gaussian in-plane PSF of
sigma 1.5 mm) and merged into 4 mm thick axial slices (voxel axis 2), with mild Rician noise, so a
CPU encoder can process a volume in well under a minute. The affines are the
source affines moved by the crop and scaled by the slice merge, so every voxel keeps its true MNI
world position. All randomness comes from one seed (``SEED``); the outputs are reproducible.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402  (tools/synthetic.py, beside this script)

SEED = 20250917
SLICE_MM = 4  # thick-slice spacing along voxel axis 2 (axial)
INPLANE_MARGIN_MM = 5  # margin around the union of both brains' in-plane bounding boxes
AUG_MARGIN_MM = 16  # extra slab kept above and below while augmenting (no edge effects)
CASE_Z_MM = (-8, 56)  # world z range of the test cases: 16 slices of 4 mm, mid-brain levels
NORMAL_Z_STARTS_MM = (-8, -4, 0)  # bank volumes: 14 slices each, staggered like real positioning
NORMAL_SLICES = 14
OUTPUT_SCALE = 4.0  # raw uint8 template values x 4 -> int16 scanner-like range (about 0-1,200)
NOISE_FRACTION = 0.015  # Rician noise std as a fraction of the brain's 99.5th percentile
# In-plane point-spread function of the simulated acquisition (Gaussian sigma, mm; FWHM 3.5 mm).
# Applied to every volume alike. It removes the finest gyral detail, which differs between the two
# individuals and which a one-subject memory bank cannot cover (see README: measured effect).
INPLANE_PSF_SIGMA_MM = 1.5

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")


@dataclass
class Subject:
    """A skull-stripped 1 mm T1 volume, its brain mask and its affine (voxel -> MNI mm)."""

    name: str
    image: np.ndarray  # float32
    mask: np.ndarray  # bool
    affine: np.ndarray


@dataclass
class Output:
    """One file to write: a float image (saved as int16) or a 0/1 label map (saved as uint8)."""

    name: str
    data: np.ndarray
    affine: np.ndarray
    is_label: bool
    note: str


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def nilearn_data_dir() -> Path:
    try:
        import nilearn
    except ImportError as exc:
        raise SystemExit("nilearn is needed for the MNI152 template: pip install nilearn") from exc
    return Path(nilearn.__file__).resolve().parent / "datasets" / "data"


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise SystemExit(f"source file not found: {path}")
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=float)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def _fill_holes_per_slice(mask: np.ndarray, axis: int = 2) -> np.ndarray:
    """Fill holes in 3D and in every slice along ``axis`` (closes the ventricles in the mask)."""
    mask = ndimage.binary_fill_holes(mask)
    moved = np.moveaxis(mask, axis, 0)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in moved])
    return np.moveaxis(filled, 0, axis)


def load_mni152() -> Subject:
    """MNI152 2009a T1 masked to the brain: (GM + WM probability) > 0.2, closed, holes filled."""
    data = nilearn_data_dir()
    t1, affine = _load(data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gm, _ = _load(data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
    wm, _ = _load(data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
    tissue = (gm + wm) / 255.0 > 0.2
    ball = ndimage.generate_binary_structure(3, 1)
    mask = ndimage.binary_closing(tissue, structure=ball, iterations=2)
    mask = _fill_holes_per_slice(_largest_component(mask))
    return Subject("MNI152-2009a", np.where(mask, t1, 0.0).astype(np.float32), mask, affine)


def load_colin27() -> Subject:
    """Colin27 skull-stripped T1 (ch2bet): mask = its non-zero voxels, largest part, holes filled."""
    path = MRICRON_TEMPLATES / "ch2bet.nii.gz"
    if not path.is_file():
        raise SystemExit(f"{path} not found: install it with `sudo apt-get install mricron-data`")
    t1, affine = _load(path)
    mask = _fill_holes_per_slice(_largest_component(t1 > 0))
    return Subject("Colin27", np.where(mask, t1, 0.0).astype(np.float32), mask, affine)


# ---------------------------------------------------------------------------------------------
# Geometry: one world box for every output
# ---------------------------------------------------------------------------------------------


def world_to_index(affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Integer voxel indices of world points on an axis-aligned 1 mm grid (checked)."""
    ijk = np.linalg.solve(affine, np.c_[world, np.ones(len(world))].T)[:3].T
    rounded = np.rint(ijk)
    if not np.allclose(ijk, rounded, atol=1e-3):
        raise ValueError("source grid is not aligned to whole millimetres; cannot crop exactly")
    return rounded.astype(int)


def inplane_world_box(subjects: list[Subject], margin: float) -> tuple[np.ndarray, np.ndarray]:
    """World (x, y) corners spanning every subject's brain, plus ``margin`` mm."""
    lows, highs = [], []
    for s in subjects:
        idx = np.argwhere(s.mask)
        corners = (s.affine @ np.c_[np.r_[[idx.min(0)], [idx.max(0)]], np.ones(2)].T)[:3].T
        lows.append(corners.min(0))
        highs.append(corners.max(0))
    lo = np.floor(np.min(lows, axis=0)[:2] - margin)
    hi = np.ceil(np.max(highs, axis=0)[:2] + margin)
    return lo, hi


def crop_world(subject_image: np.ndarray, affine: np.ndarray, xy_lo: np.ndarray, xy_hi: np.ndarray,
               z_lo: float, z_hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Crop a 1 mm RAS volume to the world box [xy_lo, xy_hi] x [z_lo, z_hi) (affine follows)."""
    lo = world_to_index(affine, np.array([[xy_lo[0], xy_lo[1], z_lo]]))[0]
    hi = world_to_index(affine, np.array([[xy_hi[0], xy_hi[1], z_hi]]))[0]
    stop = hi + np.array([1, 1, 0])  # in-plane inclusive, z half-open
    return synthetic.crop_with_affine(subject_image, affine, lo, stop)


@dataclass
class Grid:
    """Where outputs live: the in-plane world box, shared by every file."""

    xy_lo: np.ndarray
    xy_hi: np.ndarray

    def slab(self, subject: Subject, z_lo: float, z_hi: float, margin: float = 0.0) -> Subject:
        """The subject cropped to this box and to world z in [z_lo - margin, z_hi + margin)."""
        image, affine = crop_world(subject.image, subject.affine, self.xy_lo, self.xy_hi, z_lo - margin, z_hi + margin)
        mask, _ = crop_world(subject.mask, subject.affine, self.xy_lo, self.xy_hi, z_lo - margin, z_hi + margin)
        return Subject(subject.name, image, mask, affine)


def trim_z(volume: np.ndarray, affine: np.ndarray, margin_vox: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop ``margin_vox`` slices at both ends of axis 2 (undoes the augmentation margin)."""
    if margin_vox == 0:
        return volume, affine
    start = (0, 0, margin_vox)
    stop = (volume.shape[0], volume.shape[1], volume.shape[2] - margin_vox)
    return synthetic.crop_with_affine(volume, affine, start, stop)


# ---------------------------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------------------------


def augment(subject: Subject, rng: np.random.Generator) -> Subject:
    """A pseudo-subject: affine jitter, elastic warp, blur, bias field and intensity curve."""
    image, mask = synthetic.pseudo_subject(
        subject.image,
        subject.mask,
        rng,
        elastic_alpha=2.5,
        elastic_sigma=14.0,
        max_rotation_deg=5.0,
        max_scale=0.06,
        max_shift=3.0,
        bias_strength=0.18,
        gamma_range=(0.8, 1.25),
        gain_range=(0.8, 1.2),
        blur_sigma_range=(0.0, 0.8),
    )
    return Subject(subject.name, image, mask, subject.affine)


def finish(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, rng: np.random.Generator,
           margin_vox: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blur in-plane (PSF), trim the augmentation margin, merge 4 mm slices, add noise, zero the background.

    Returns ``(image float32, brain mask bool, affine)`` on the output grid.
    """
    image = ndimage.gaussian_filter(image, (INPLANE_PSF_SIGMA_MM, INPLANE_PSF_SIGMA_MM, 0.0))
    image, affine_t = trim_z(image, affine, margin_vox)
    mask, _ = trim_z(mask.astype(np.float32), affine, margin_vox)
    image, out_affine = synthetic.thick_slices(image, affine_t, factor=SLICE_MM)
    soft_mask, _ = synthetic.thick_slices(mask, affine_t, factor=SLICE_MM)
    brain = soft_mask >= 0.5
    top = float(np.percentile(image[brain], 99.5))
    image = synthetic.rician_noise(image, rng, std=NOISE_FRACTION * top, mask=brain)
    image[~brain] = 0.0
    return image * OUTPUT_SCALE, brain, out_affine


def make_normals(bank: Subject, grid: Grid, rng: np.random.Generator) -> list[Output]:
    """normal_01 = the bank subject itself, normal_02.. = its augmented pseudo-subjects."""
    outputs = []
    margin = AUG_MARGIN_MM
    for n, z0 in enumerate(NORMAL_Z_STARTS_MM, start=1):
        z1 = z0 + NORMAL_SLICES * SLICE_MM
        slab = grid.slab(bank, z0, z1, margin=margin)
        if n > 1:
            slab = augment(slab, rng)
        image, _, affine = finish(slab.image, slab.mask, slab.affine, rng, margin)
        kind = "the template itself" if n == 1 else "augmented pseudo-subject"
        outputs.append(Output(f"normal_{n:02d}", image, affine, False, f"{bank.name}, {kind}, no lesion"))
    return outputs


def lesion_allowed_region(mask: np.ndarray, image: np.ndarray, depth_mm: float) -> np.ndarray:
    """Brain tissue at least ``depth_mm`` from the brain border, excluding CSF-dark voxels."""
    deep = ndimage.distance_transform_edt(mask) >= depth_mm
    tissue = ndimage.gaussian_filter(image, 2.0) > 0.55 * float(np.percentile(image[mask], 90))
    return deep & tissue


def lesion_volume(subject: Subject, rng: np.random.Generator, lesions: list[dict], margin_vox: int,
                  placed: list | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Insert the given lesions at 1 mm, then finish; returns (image, labels uint8, affine).

    Each lesion dict holds ``centre_mm`` (world, or None for a random place), ``radii_mm``,
    ``contrast`` (> 0 bright, < 0 dark, relative to the white-matter level) and optionally
    ``irregularity`` (:func:`synthetic.make_lesion_mask`), ``texture``, ``halo_mm`` and
    ``halo_amplitude`` (:func:`synthetic.insert_lesion`). Labels are
    the 1 mm masks merged like the image: a thick voxel is lesion when at least half of it is.
    ``placed``: if given, each lesion's centre in world mm is appended to it.
    """
    image = subject.image.copy()
    labels = np.zeros(image.shape, dtype=np.float32)
    wm_level = float(np.percentile(image[subject.mask], 90))
    allowed = lesion_allowed_region(subject.mask, image, depth_mm=8.0)
    z_keep = np.zeros(image.shape, dtype=bool)  # keep lesions inside the output slab
    z_keep[:, :, margin_vox + 8 : image.shape[2] - margin_vox - 8] = True
    allowed &= z_keep
    for spec in lesions:
        radii = np.asarray(spec["radii_mm"], dtype=float)  # 1 mm grid: mm == voxels
        if spec["centre_mm"] is None:
            centre = synthetic.random_lesion_centre(allowed, radii, rng)
        else:
            centre = tuple(world_to_index(subject.affine, np.array([spec["centre_mm"]], dtype=float))[0])
        if placed is not None:
            placed.append(tuple((subject.affine @ np.r_[np.asarray(centre, dtype=float), 1.0])[:3]))
        irregularity = spec.get("irregularity", 0.6)
        mask = synthetic.make_lesion_mask(image.shape, centre, radii, rng, irregularity=irregularity) & subject.mask
        image = synthetic.insert_lesion(
            image, mask, contrast=spec["contrast"], rng=rng, reference=wm_level,
            texture=spec.get("texture", 0.1), halo=spec.get("halo_mm", 4.0),
            halo_amplitude=spec.get("halo_amplitude", 0.35),
        )
        labels[mask] = 1.0
        allowed &= ~ndimage.binary_dilation(mask, iterations=12)
    out_image, brain, affine = finish(image, subject.mask, subject.affine, rng, margin_vox)
    label_t, _ = trim_z(labels, subject.affine, margin_vox)
    soft, _ = synthetic.thick_slices(label_t, subject.affine, factor=SLICE_MM)
    seg = ((soft >= 0.5) & brain).astype(np.uint8)
    return out_image, seg, affine


def make_cases(test: Subject, grid: Grid, rng: np.random.Generator) -> list[Output]:
    z0, z1 = CASE_Z_MM
    margin = AUG_MARGIN_MM
    outputs: list[Output] = []
    # case_01: the test subject as is, one large bright glioma-sized lesion (about 30 cm^3, the
    # order of a BraTS whole tumour) centred in the right corona radiata / centrum semiovale
    # (world mm; RAS: +x = the subject's right). Chosen by anatomy, not by where the method scores.
    slab = grid.slab(test, z0, z1, margin=margin)
    case01 = [{"centre_mm": (28.0, -12.0, 24.0), "radii_mm": (22.0, 26.0, 18.0), "contrast": 0.6,
               "texture": 0.15, "halo_mm": 5.0, "halo_amplitude": 0.4}]
    image, seg, affine = lesion_volume(slab, rng, case01, margin)
    outputs += [
        Output("case_01", image, affine, False, f"{test.name}, one bright lesion"),
        Output("case_01_seg", seg, affine, True, "ground truth of case_01 (0/1)"),
    ]
    # case_02: a pseudo-subject of the test subject, a bright and a dark lesion at random places.
    slab = augment(grid.slab(test, z0, z1, margin=margin), rng)
    case02 = [
        {"centre_mm": None, "radii_mm": tuple(rng.uniform(8.0, 12.0, size=3)), "contrast": 0.5},
        {"centre_mm": None, "radii_mm": tuple(rng.uniform(7.0, 10.0, size=3)), "contrast": -0.6},
    ]
    image, seg, affine = lesion_volume(slab, rng, case02, margin)
    outputs += [
        Output("case_02", image, affine, False, f"{test.name} pseudo-subject, one bright and one dark lesion"),
        Output("case_02_seg", seg, affine, True, "ground truth of case_02 (0/1)"),
    ]
    return outputs


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def to_nifti(out: Output) -> nib.Nifti1Image:
    if out.is_label:
        data = np.asarray(out.data, dtype=np.uint8)
    else:
        data = np.clip(np.rint(out.data), 0, np.iinfo(np.int16).max).astype(np.int16)
    img = nib.Nifti1Image(data, out.affine)
    img.set_data_dtype(data.dtype)
    img.set_qform(out.affine, code=4)  # 4 = MNI_152: both templates live in MNI space
    img.set_sform(out.affine, code=4)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = out.note[:79].encode("ascii", "replace")
    if out.is_label:
        img.header.set_intent("label")
    return img


def save_atomic(img: nib.Nifti1Image, target: Path) -> int:
    """Write to a temporary file beside ``target`` and move it into place; returns the size."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part.nii.gz", dir=target.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target.stat().st_size


def describe(out: Output) -> str:
    spacing = np.sqrt((out.affine[:3, :3] ** 2).sum(axis=0))
    extra = ""
    if out.is_label:
        slices = np.flatnonzero(out.data.reshape(-1, out.data.shape[2]).any(axis=0))
        extra = f", lesion voxels {int(out.data.sum())}, lesion slices (axis 2) {slices.tolist()}"
    return f"shape {out.data.shape}, spacing {tuple(float(s) for s in spacing)} mm{extra}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "sample_data",
                        help="output folder (default: the repository's sample_data/)")
    args = parser.parse_args(argv)

    bank, test = load_mni152(), load_colin27()
    grid = Grid(*inplane_world_box([bank, test], INPLANE_MARGIN_MM))
    rng = np.random.default_rng(SEED)
    outputs = make_normals(bank, grid, rng) + make_cases(test, grid, rng)

    total = 0
    for out in outputs:
        size = save_atomic(to_nifti(out), args.out / f"{out.name}.nii.gz")
        total += size
        print(f"{out.name}.nii.gz  {size / 1e6:6.2f} MB  {describe(out)}  [{out.note}]")
    print(f"total {total / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
