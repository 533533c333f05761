"""Generate the cross-subject brain MRI benchmark: healthy train volumes and test volumes with
synthetic lesions, from two real healthy brains.

Run from the repository root (nothing is downloaded; needs ``nilearn`` and the Debian package
``mricron-data``, as ``tools/make_sample_data.py`` does)::

    python benchmarks/make_benchmark_data.py --out bench/data

Subjects (kept apart: no anatomy of a test subject is ever in the bank):

* TRAIN, for the memory bank: the MNI ICBM152 2009a T1 template (nilearn) and ``--train - 1``
  augmented pseudo-subjects of it (affine jitter, elastic warp, blur, bias field, intensity curve),
  each a slab of :data:`TRAIN_SLICES` 4 mm axial slices starting at a staggered level.
* TEST: Colin27 (one real subject, ``mricron-data``) and ``--test - 1`` augmented pseudo-subjects
  of it, each a slab of :data:`TEST_SLICES` slices over world z in :data:`TEST_Z_MM`, with 0 to 2
  synthetic lesions from :data:`LESION_PLAN`: sizes from small (radii 5-8 mm) to glioma-sized
  (16-24 mm), bright (hyperintense, like tumours and oedema on FLAIR) and dark (hypointense, like
  necrosis or chronic lesions on T1), irregular shapes, random places in deep brain tissue. One
  test subject has no lesion, and every lesion leaves slices above and below it lesion-free.

``--reverse`` swaps the two real subjects (the second fold): the bank is Colin27 and its
pseudo-subjects, the test cases are the MNI152 template and its pseudo-subjects, with the same
slabs, lesion plan and generator.

Outputs (under ``--out``): ``train/normal_XX.nii.gz``, ``test/images/case_XX.nii.gz``,
``test/labels/case_XX.nii.gz`` (0/1, same name as its image) and ``benchmark.json`` (seed,
subjects, every lesion's size, contrast, centre in world mm, voxel count and slices). Geometry,
in-plane point-spread function, 4 mm slice merge and noise are those of the bundled sample
(``tools/make_sample_data.py``, whose functions this script reuses); affines keep the true
MNI world position of every voxel. One seed (``--seed``) makes every output reproducible.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_sample_data as msd  # noqa: E402  (the sample's sources, geometry and writers)

SEED = 20251123
SLICE_MM = msd.SLICE_MM
TEST_Z_MM = (-12, 60)  # 18 slices of 4 mm: from the temporal lobes to the centrum semiovale
TEST_SLICES = (TEST_Z_MM[1] - TEST_Z_MM[0]) // SLICE_MM
TRAIN_SLICES = 22  # 88 mm: each train slab covers the test range with room for its stagger
TRAIN_Z_STARTS_MM = (-16, -20, -12, -24, -16, -8)  # staggered like real head positioning

#: Lesion sizes (per-axis radii ranges, mm) and contrasts (relative to the white-matter level).
SIZES = {"small": (5.0, 8.0), "medium": (9.0, 14.0), "large": (16.0, 24.0)}
CONTRASTS = {"bright": (0.35, 0.8), "dark": (-0.7, -0.45)}
#: Lesions per test subject (subject 1 is Colin27 itself); an empty tuple: a lesion-free subject.
LESION_PLAN: tuple[tuple[tuple[str, str], ...], ...] = (
    (("large", "bright"),),
    (("medium", "dark"),),
    (("small", "bright"),),
    (("large", "dark"),),
    (("medium", "bright"), ("small", "dark")),
    (),
    (("large", "bright"), ("medium", "bright")),
    (("medium", "bright"),),
)


def lesion_specs(plan: tuple[tuple[str, str], ...], rng: np.random.Generator) -> list[dict]:
    """Random lesion parameters for one subject's plan (place chosen later, in the tissue)."""
    specs = []
    for size, polarity in plan:
        radii = tuple(float(r) for r in rng.uniform(*SIZES[size], size=3))
        bright = polarity == "bright"
        specs.append({
            "size": size, "polarity": polarity, "centre_mm": None, "radii_mm": radii,
            "contrast": float(rng.uniform(*CONTRASTS[polarity])),
            "irregularity": float(rng.uniform(0.3, 0.9)),
            "texture": float(rng.uniform(0.05, 0.2)),
            # oedema-like ring around bright lesions; a thin rim around dark ones
            "halo_mm": float(rng.uniform(3.0, 6.0) if bright else rng.uniform(1.0, 2.5)),
            "halo_amplitude": float(rng.uniform(0.25, 0.45) if bright else 0.2),
        })
    return specs


def make_train(bank: msd.Subject, grid: msd.Grid, rng: np.random.Generator, n: int) -> list[tuple[msd.Output, dict]]:
    """The bank subject itself, then augmented pseudo-subjects of it."""
    outputs = []
    margin = msd.AUG_MARGIN_MM
    for i in range(n):
        z0 = TRAIN_Z_STARTS_MM[i % len(TRAIN_Z_STARTS_MM)]
        z1 = z0 + TRAIN_SLICES * SLICE_MM
        slab = grid.slab(bank, z0, z1, margin=margin)
        if i > 0:
            slab = msd.augment(slab, rng)
        image, _, affine = msd.finish(slab.image, slab.mask, slab.affine, rng, margin)
        kind = "the template itself" if i == 0 else "augmented pseudo-subject"
        out = msd.Output(f"normal_{i + 1:02d}", image, affine, False, f"{bank.name}, {kind}, no lesion")
        outputs.append((out, {"file": f"train/{out.name}.nii.gz", "source": bank.name, "kind": kind, "z_mm": [z0, z1]}))
    return outputs


def make_test(test: msd.Subject, grid: msd.Grid, rng: np.random.Generator, n: int) -> list[tuple[msd.Output, msd.Output, dict]]:
    """Colin27 itself, then pseudo-subjects of it, each with the lesions of its plan."""
    z0, z1 = TEST_Z_MM
    margin = msd.AUG_MARGIN_MM
    cases = []
    for i in range(n):
        plan = LESION_PLAN[i % len(LESION_PLAN)]
        slab = grid.slab(test, z0, z1, margin=margin)
        if i > 0:
            slab = msd.augment(slab, rng)
        specs = lesion_specs(plan, rng)
        centres: list = []
        image, seg, affine = msd.lesion_volume(slab, rng, specs, margin, placed=centres)
        name = f"case_{i + 1:02d}"
        kind = "the subject itself" if i == 0 else "augmented pseudo-subject"
        desc = ", ".join(f"{s['size']} {s['polarity']}" for s in specs) or "no lesion"
        img_out = msd.Output(name, image, affine, False, f"{test.name} {kind}: {desc}")
        seg_out = msd.Output(name, seg, affine, True, f"ground truth of {name} (0/1)")
        lesion_slices = np.flatnonzero(seg.reshape(-1, seg.shape[2]).any(axis=0)).tolist()
        lesions = [{k: v for k, v in s.items() if k != "centre_mm"} | {"centre_world_mm": [round(float(c), 1) for c in w]}
                   for s, w in zip(specs, centres)]
        info = {"image": f"test/images/{name}.nii.gz", "label": f"test/labels/{name}.nii.gz", "source": test.name,
                "kind": kind, "z_mm": [z0, z1], "slices": int(seg.shape[2]), "lesion_slices": lesion_slices,
                "lesion_voxels": int(seg.sum()), "lesions": lesions}
        cases.append((img_out, seg_out, info))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (train/, test/, benchmark.json)")
    parser.add_argument("--train", type=int, default=6, help="train (bank) volumes: the template + pseudo-subjects (default 6)")
    parser.add_argument("--test", type=int, default=len(LESION_PLAN), help=f"test volumes (default {len(LESION_PLAN)})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default {SEED})")
    parser.add_argument("--reverse", action="store_true",
                        help="the second fold: bank from Colin27 pseudo-subjects, tests on MNI152 ones")
    args = parser.parse_args(argv)
    if args.train < 1 or args.test < 1:
        parser.error("--train and --test must be at least 1")
    if (args.out / "benchmark.json").exists():
        parser.error(f"{args.out} already holds a benchmark; choose another --out or delete it first")

    t0 = time.perf_counter()
    bank, test = msd.load_mni152(), msd.load_colin27()
    if args.reverse:
        bank, test = test, bank
    grid = msd.Grid(*msd.inplane_world_box([bank, test], msd.INPLANE_MARGIN_MM))
    rng = np.random.default_rng(args.seed)
    manifest: dict = {"seed": args.seed, "generator": "benchmarks/make_benchmark_data.py",
                      "train_subject": bank.name, "test_subject": test.name, "reverse": bool(args.reverse),
                      "slice_mm": SLICE_MM, "train": [], "test": []}
    for out, info in make_train(bank, grid, rng, args.train):
        msd.save_atomic(msd.to_nifti(out), args.out / info["file"])
        manifest["train"].append(info)
        print(f"{info['file']}  {msd.describe(out)}")
    for img_out, seg_out, info in make_test(test, grid, rng, args.test):
        msd.save_atomic(msd.to_nifti(img_out), args.out / info["image"])
        msd.save_atomic(msd.to_nifti(seg_out), args.out / info["label"])
        manifest["test"].append(info)
        print(f"{info['image']}  {msd.describe(seg_out)}  [{img_out.note}]")
    n_slices = sum(c["slices"] for c in manifest["test"])
    n_les = sum(len(c["lesion_slices"]) for c in manifest["test"])
    manifest["summary"] = {"train_volumes": args.train, "test_volumes": args.test, "test_slices": n_slices,
                           "test_lesion_slices": n_les, "lesions": sum(len(c["lesions"]) for c in manifest["test"])}
    tmp = args.out / ".benchmark.json.part"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(args.out / "benchmark.json")  # written last: its presence marks a complete set
    print(f"{args.train} train and {args.test} test volumes ({n_les} of {n_slices} test slices with lesions) "
          f"in {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
