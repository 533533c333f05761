"""``mias-sam``: build-bank, segment, demo, evaluate, benchmark, info. Every command prints
progress on stderr and exits non-zero with a one-line reason on bad input.

Size: one module on purpose (about 900 lines): the whole command line, every parser and its thin
handler, reads top to bottom; the work is in the modules each handler imports."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

from ..core import defaults
from ..core.errors import MiasSamError

__all__ = ["main", "build_parser"]

EXAMPLES = {
    "build-bank": """examples:
  mias-sam build-bank normals/ --out banks/brain                      # a folder of normal NIfTI volumes
  mias-sam build-bank BraTS2021_Training/ --modality flair --margin 2 --exclude-subjects test.txt --out banks/brats-flair
  mias-sam build-bank BraTS2021_Training/ --modality flair,t1ce,t2 --exclude-subjects test.txt --out banks/brats-3seq
  mias-sam build-bank LiTS/ --roi liver --exclude-subjects test.txt --out banks/lits   # CT preset ct-abdomen
  mias-sam build-bank a.nii.gz b.nii.gz --out banks/brain --layout mean256
  mias-sam build-bank BMAD/Brain_MRI --out banks/bmad-brain           # BMAD layout (train/good/*.png)
  mias-sam build-bank ct/ --out banks/liver --preprocess ct-abdomen
  mias-sam build-bank normals/ --out banks/sam --backbone sam-vit_b --checkpoint sam_vit_b_01ec64.pth""",
    "segment": """examples:
  mias-sam segment case.nii.gz --bank banks/brain --out results/
  mias-sam segment case.nii.gz --bank banks/brain --out results/ --gt case_seg.nii.gz --json
  mias-sam segment BraTS2021_00495/ --bank banks/brats-flair --out results/   # the bank's modality; seg paired as GT
  mias-sam segment LiTS/volume-3.nii --bank banks/lits --out results/         # segmentation-3 paired; lesion = label 2
  mias-sam segment BraTS2021_00495/ --bank banks/brats-flair --out results/ --lesion-labels 1,4   # tumour core only
  mias-sam segment cases/*.nii.gz --bank banks/brain --out results/ --gamma 3 --mask 2 --prompt max-point
  mias-sam segment BMAD/Brain_MRI/test/Ungood/img --bank banks/bmad-brain --out out/ --normalisation reference
outputs (per volume): <stem>_mask.nii.gz (uint8), <stem>_anomaly.nii.gz (float32), <stem>_points.csv,
  <stem>_lesions.nii.gz (int32: one id per lesion, 1 = the largest) and <stem>_lesions.csv (one row per lesion:
  voxels, mL, slice range, centroid in voxels and mm, peak/mean anomaly score, its prompts; with --gt its match)
outputs (PNG slices): <stem>_mask.png (0/255) and <stem>_anomaly.npy (float32) per slice, one prompts.csv
  (the slices of one call are segmented together: reference normalisation spans them)""",
    "demo": """examples:
  mias-sam demo                 # writes ./mias-sam-demo/
  mias-sam demo --out /tmp/demo --json""",
    "evaluate": """examples:
  mias-sam evaluate --bank banks/brain --images test/*_flair.nii.gz --gts test/*_seg.nii.gz --out eval/
  mias-sam evaluate --bank banks/bmad-brain --bmad BMAD/Brain_MRI --out eval-brain/ --json
  mias-sam evaluate --bank banks/brats-flair --dataset BraTS2021_Training/ --subjects test.txt --out eval-brats/
  mias-sam evaluate --bank banks/lits --dataset LiTS/ --subjects test.txt --out eval-lits/
  mias-sam evaluate --bank banks/b1024 --bank banks/b256 --images ... --gts ... --out eval/ --gammas 1,3,5""",
    "info": """examples:
  mias-sam info banks/brain""",
    "benchmark": """examples:
  mias-sam benchmark                                   # CPU (or the GPU when present), default bank sizes
  mias-sam benchmark --json > bench.json
  mias-sam benchmark --device cuda --precision bf16 --sizes 10k,768k,7.68M
  mias-sam benchmark --sizes 7.68M --knn-index flat-sq8   # a 7.68 M-patch bank that fits in 16 GB
  mias-sam benchmark --accuracy                        # Dice cost of index types / coresets on the bundled sample""",
}


def _add_backbone_args(p: argparse.ArgumentParser, *, default: str | None) -> None:
    from ..backbones import BACKBONES

    p.add_argument("--backbone", choices=BACKBONES, default=default,
                   help="encoder/decoder (default: %(default)s)" if default else "encoder/decoder (default: the bank's)")
    p.add_argument("--checkpoint", type=Path, help="weights file for SAM backbones (sam_vit_b_01ec64.pth, ...)")
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cuda, cuda:1, mps or cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="encoder precision (bf16/fp16 only pay off on a GPU; default fp32)")
    p.add_argument("--batch-size", type=int, default=defaults.BATCH_SIZE,
                   help=f"slices encoded per batch (default {defaults.BATCH_SIZE})")


def _add_lesion_args(p: argparse.ArgumentParser) -> None:
    from ..core import defaults

    g = p.add_argument_group("lesions: the mask's 3D connected components (<stem>_lesions.nii.gz and .csv)")
    g.add_argument("--lesion-connectivity", type=int, choices=(6, 18, 26), default=defaults.LESION_CONNECTIVITY,
                   help="voxels sharing a face (6), also an edge (18) or also a corner (26) join one lesion (default %(default)s)")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--min-lesion-voxels", type=int, default=None,
                      help=f"smallest lesion in voxels (default {defaults.MIN_LESION_VOXELS}; smaller specks stay in the mask "
                           "but get no lesion id)")
    size.add_argument("--min-lesion-ml", type=float, default=None, help="smallest lesion in mL (from each volume's voxel size)")


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    from ..jobs.dataset_runs import ROIS

    g = p.add_argument_group("labelled datasets (BraTS, LiTS): a bank from lesion-free slices")
    g.add_argument("--modality", help="image of each case: flair (default for BraTS; = t2f), t1 (= t1n), t1ce (= t1c), t2 (= t2w); "
                                      "ct for LiTS; or three BraTS sequences, e.g. flair,t1ce,t2 (= t2f,t1c,t2w), which fill the "
                                      "encoder's three channels for the bank and every run with it")
    g.add_argument("--margin", type=int, default=defaults.DATASET_MARGIN,
                   help=f"keep only slices more than this many slices from any labelled slice (default {defaults.DATASET_MARGIN})")
    g.add_argument("--subjects", type=Path, help="text file of the subjects to use, one per line (default: all)")
    g.add_argument("--exclude-subjects", type=Path, help="text file of subjects to leave out (e.g. the test split)")
    g.add_argument("--roi", choices=ROIS, help="LiTS: mask every slice to the liver labels (1, 2), as BMAD's Liver CT does")


def _add_dask_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--dask", metavar="SCHEDULER",
                   help=f"{what} on a Dask cluster: local (one worker per GPU, else per core), local:N (N worker processes "
                        "here), a scheduler address (tcp://host:8786) or a scheduler file (scheduler.json, e.g. from "
                        "dask-jobqueue on SLURM); files must be visible to every worker (docs/distributed.md). "
                        "Needs pip install napari-mias-sam[dask]")


def build_parser() -> argparse.ArgumentParser:
    from ..bank import INDEX_TABLE, INDEX_TYPES
    from ..method.prompts import BACKBONE_PROMPTS, PROMPT_TYPES
    from ..method.reference_encoding import ENCODINGS
    from ..method.anomaly import NORMALISATIONS
    from ..method.patches import PATCH_LAYOUTS
    from ..method.preprocess import PREPROCESS_PRESETS
    from ..pipeline.settings import VOLUME_PROMPT

    def sweep(values) -> str:
        return ",".join(f"{v:g}" for v in values)

    backbone_prompts = ", ".join(f"{r.default} for {n}" for n, r in BACKBONE_PROMPTS.items())

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="mias-sam", description="MIAS-SAM: threshold-free anomaly segmentation of 3D medical volumes.", formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser("build-bank", help="build a normal memory bank", epilog=EXAMPLES["build-bank"], formatter_class=fmt,
                       description="Encode normal slices and index their 5x5 patch features with faiss.")
    b.add_argument("normal", nargs="+", type=Path,
                   help="normal NIfTI volumes, folders of them, BMAD dataset folders, or one labelled dataset (a BraTS root "
                        "or case folder, a LiTS folder): then only its lesion-free slices are used")
    b.add_argument("--out", required=True, type=Path, help="bank folder to write (index.faiss + manifest.json)")
    b.add_argument("--preprocess", choices=sorted(PREPROCESS_PRESETS), default=None,
                   help=f"intensity preset (default {defaults.PREPROCESS}; ct-abdomen for LiTS)")
    _add_dataset_args(b)
    b.add_argument("--axis", default=defaults.SLICE_AXIS, help=f"slicing axis: axial, coronal, sagittal or 0/1/2 (default {defaults.SLICE_AXIS})")
    b.add_argument("--layout", choices=PATCH_LAYOUTS, default=defaults.PATCH_LAYOUT,
                   help=f"patch features: paper1024 (paper) or mean256 (default {defaults.PATCH_LAYOUT})")
    b.add_argument("--index", choices=INDEX_TYPES, default=defaults.INDEX_TYPE,
                   help="faiss index: " + "; ".join(f"{t.name} ({t.help})" for t in INDEX_TABLE.values()))
    b.add_argument("--coreset", type=float, default=None, metavar="RATIO",
                   help="keep a greedy k-center coreset of this fraction of each source's patches (e.g. 0.1); default: all")
    b.add_argument("--cache", action="store_true",
                   help="read/store slice embeddings in the embedding cache (float16, about 2 MB per slice): another bank "
                        "from the same volumes (layout, index, coreset) then skips the encoder")
    b.add_argument("--shards", type=int, default=None, metavar="N",
                   help="write the index as N shard files, one in memory at a time while it is built, searched "
                        "memory-mapped (default: 1, or more when the index would not fit in memory)")
    b.add_argument("--resume", action="store_true",
                   help="continue an interrupted --dask / --shards build from the sources it staged beside --out "
                        "(also: stage this build so that it can be resumed)")
    _add_dask_arg(b, "encode the sources")
    b.add_argument("--overwrite", action="store_true", help="replace an existing bank folder")
    b.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    _add_backbone_args(b, default=defaults.BACKBONE)
    b.add_argument("--encoding", choices=ENCODINGS, default="standard",
                   help="how slices reach a SAM encoder: standard (float resize, float16 embeddings; default) or reference "
                        "(the paper's code exactly: 8-bit slice resized with PIL, float32 embeddings; SAM backbones only). "
                        "Recorded in the bank; runs with the bank use it")

    s = sub.add_parser("segment", help="segment anomalies in volumes", epilog=EXAMPLES["segment"], formatter_class=fmt,
                       description=f"Run MIAS-SAM on whole volumes (default prompt: {VOLUME_PROMPT or 'per slice'}) and write NIfTI outputs.")
    s.add_argument("volume", nargs="+", type=Path,
                   help="NIfTI volume(s), BraTS case folders (the bank's modality is read; the seg file is the ground truth), "
                        "or PNG slices (files or folders; one size per call)")
    s.add_argument("--modality", help="modality of a case folder (default: the bank's): flair|t1|t1ce|t2 (= t2f|t1n|t1c|t2w)")
    s.add_argument("--lesion-labels", metavar="LABELS",
                   help="label values that count as the lesion, e.g. 1,2,4 (default: BraTS every non-zero label, LiTS 2, "
                        "other files every non-zero label)")
    s.add_argument("--bank", required=True, type=Path, help="memory bank folder (from build-bank)")
    s.add_argument("--out", required=True, type=Path, help="output folder")
    s.add_argument("--gt", nargs="+", type=Path, help="ground-truth label volume(s), one per volume, for Dice")
    s.add_argument("--gamma", type=float, default=defaults.GAMMA, help=f"centre-of-gravity exponent (default {defaults.GAMMA:g})")
    s.add_argument("--mask", type=int, choices=(1, 2, 3), default=None,
                   help=f"which of SAM's 3 masks (default: {defaults.REGIONS_MASK} with the regions prompt, "
                        f"{defaults.MASK_INDEX} (the paper's) with the others)")
    s.add_argument("--prompt", choices=PROMPT_TYPES, default=None,
                   help=f"prompt type (default for volumes: {VOLUME_PROMPT}, one box per anomalous 3D region, levels from the "
                        f"bank's normal calibration; for PNG slices the backbone's: {backbone_prompts}; "
                        "--prompt cog-point --mask 3 --normalisation reference is the paper's recipe)")
    s.add_argument("--k", type=int, default=defaults.K, help=f"nearest bank patches averaged per patch (default {defaults.K}, as the reference)")
    s.add_argument("--normalisation", choices=NORMALISATIONS, default=defaults.NORMALISATION,
                   help="calibrated: from the bank's normal data (default); reference: min-max over the volume (paper)")
    s.add_argument("--slice-decision", action="store_true", help="keep a slice's mask only if its image score exceeds every held-out normal slice's")
    s.add_argument("--axis", default=None, help="slicing axis (default: the bank's)")
    s.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    s.add_argument("--overwrite", action="store_true", help="replace existing output files")
    s.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_dask_arg(s, "segment the volumes (one task per volume)")
    _add_lesion_args(s)
    _add_backbone_args(s, default=None)

    d = sub.add_parser("demo", help="run the whole job on the bundled sample (CPU, offline)", epilog=EXAMPLES["demo"], formatter_class=fmt,
                       description="Build a bank from the bundled normal volumes, segment the bundled test case with LiteMedSAM, print Dice and timings.")
    d.add_argument("--out", type=Path, default=Path("mias-sam-demo"), help="output folder (default ./mias-sam-demo)")
    d.add_argument("--device", default="cpu", help="cpu (default), auto or cuda")
    d.add_argument("--batch-size", type=int, default=defaults.BATCH_SIZE)
    d.add_argument("--json", action="store_true", help="print the report as JSON on stdout")

    e = sub.add_parser("evaluate", help="paper metrics, 3D metrics and ablations over a test set", epilog=EXAMPLES["evaluate"],
                       formatter_class=fmt, description="Slice Dice (paper), volume Dice, P-AUROC, AUPRO@0.3, image AUROC and ablation tables.")
    e.add_argument("--bank", action="append", required=True, type=Path, help="memory bank (repeat to compare banks, e.g. layouts)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--bmad", type=Path, help="BMAD dataset folder (test/{good,Ungood}/{img,anomaly_mask})")
    src.add_argument("--images", nargs="+", type=Path, help="test NIfTI volumes")
    src.add_argument("--dataset", type=Path, help="a BraTS or LiTS root: its cases (choose with --subjects) and their seg files")
    e.add_argument("--subjects", type=Path, help="--dataset: a text file of the test subjects, one per line (default: all)")
    e.add_argument("--exclude-subjects", type=Path, help="--dataset: a text file of subjects to leave out")
    e.add_argument("--modality", help="--dataset: modality to test (default: the bank's)")
    e.add_argument("--lesion-labels", metavar="LABELS",
                   help="label values that count as the lesion, e.g. 1,2,4 (default: BraTS every non-zero, LiTS 2, other files non-zero)")
    e.add_argument("--gts", nargs="+", type=Path, help="ground truths, one per --images volume, same order")
    e.add_argument("--split", default="test", help="BMAD split to read: test (default) or valid")
    e.add_argument("--out", required=True, type=Path, help="folder for results.csv/.md/.json and plots")
    e.add_argument("--gammas", default=sweep(defaults.GAMMA_SWEEP), help=f"gamma sweep (default {sweep(defaults.GAMMA_SWEEP)})")
    e.add_argument("--ks", default=sweep(defaults.K_SWEEP), help=f"k values (default {sweep(defaults.K_SWEEP)})")
    e.add_argument("--prompts", default=",".join(PROMPT_TYPES), help=f"prompt types to compare (default {','.join(PROMPT_TYPES)})")
    e.add_argument("--prompt", choices=PROMPT_TYPES, default=None, help=f"default prompt (default for volumes: {VOLUME_PROMPT} when the bank's calibration supports it; "
                        f"for BMAD PNG slices the backbone's: {backbone_prompts})")
    e.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    e.add_argument("--overwrite", action="store_true", help="replace existing results (results.csv/.md/.json and plots) in --out")
    e.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    _add_dask_arg(e, "encode the test units and search the bank")
    _add_backbone_args(e, default=None)

    k = sub.add_parser("benchmark", help="per-stage times and peak memory on a 240x240x155 volume", epilog=EXAMPLES["benchmark"],
                       formatter_class=fmt, description="Time load, preprocess, encode, kNN (bank sizes of random vectors), map, "
                       "prompt, decode and write for a synthetic 240x240x155 volume; print machine, date and peak memory.")
    k.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda")
    k.add_argument("--sizes", default="10k,100k,1M,7.68M", help="bank sizes in patches, comma-separated (k/M suffixes; default %(default)s)")
    k.add_argument("--encode-slices", type=int, default=None, help="slices to encode (default 8 on a CPU, all on a GPU; the rest is extrapolated)")
    k.add_argument("--decode-slices", type=int, default=None, help="slices to decode (default 8 on a CPU, all on a GPU)")
    k.add_argument("--layout", choices=PATCH_LAYOUTS, default=defaults.PATCH_LAYOUT, help=f"patch layout (default {defaults.PATCH_LAYOUT})")
    k.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="encoder precision (default fp32)")
    k.add_argument("--knn-index", choices=INDEX_TYPES, default=defaults.INDEX_TYPE,
                   help=f"CPU index type for the kNN stage (default {defaults.INDEX_TYPE})")
    k.add_argument("--knn-queries", type=int, default=None, help="CPU: time this many query patches instead of whole slices (slow index types)")
    k.add_argument("--quick", action="store_true", help="a tiny run that checks the benchmark works (its numbers are not the targets')")
    k.add_argument("--accuracy", action="store_true", help="instead: the Dice cost of each index type and coreset ratio against the exact bank (data: --sample-dir)")
    k.add_argument("--sample-dir", type=Path, default=None, help="data for --accuracy: the bundled sample's layout or the benchmark's (train/, test/images/, test/labels/); default: the bundled sample")
    k.add_argument("--json", action="store_true", help="print the report as JSON on stdout")

    i = sub.add_parser("info", help="show what made a memory bank", epilog=EXAMPLES["info"], formatter_class=fmt)
    i.add_argument("bank", type=Path)
    i.add_argument("--json", action="store_true")

    from .manage import add_parsers

    add_parsers(sub, fmt)  # weights, cache
    return parser


def _version() -> str:
    from .._version import __version__

    return __version__


def _out(obj: dict) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_build_bank(a: argparse.Namespace) -> int:
    from .progress import ConsoleProgress
    from ..backbones import load_backbone
    from ..bank import bank_output
    from ..bank.staging import StagingArea, staging_dir
    from ..pipeline.embedding_cache import EmbeddingCache
    from ..core.errors import Cancelled, InputError
    from ..core.atomic_outputs import check_output_folder
    from ..jobs.bank_builds import build_bank_job
    from ..jobs.preflight import check_device, check_precision
    from ..jobs.bank_builds import check_bank_out

    check_output_folder(a.out)  # a file, under a file, not writable: refused before any work
    if a.out.exists() and not a.overwrite:
        raise InputError(f"{a.out}: already exists; choose another --out or pass --overwrite.")
    check_bank_out(a.out, a.normal)  # not an input folder, nor inside one (a dataset root, a case folder)
    if a.out.exists() and not (a.out / "manifest.json").is_file():  # refuse before the work, not after
        raise InputError(f"{a.out}: exists and is not a memory bank folder; refusing to replace it.")
    if a.coreset is not None and not 0.0 < a.coreset <= 1.0:
        raise InputError(f"--coreset must be a fraction in (0, 1], got {a.coreset:g}")
    if a.shards is not None and a.shards < 1:
        raise InputError(f"--shards must be at least 1, got {a.shards}")
    device = check_device(a.device)
    check_precision(a.precision, device)
    src = _bank_inputs(a, _dataset_input(a))
    session = _dask_session(a)  # a wrong address stops here, before anything is written
    staging = staging_dir(a.out)
    staged = False
    t0 = time.perf_counter()
    try:
        shards = _plan_build_memory(a, src, session)
        staged = session is not None or shards > 1 or a.resume
        with bank_output(a.out, overwrite=a.overwrite) as claim:  # held from here to the save: one run per bank name
            progress = ConsoleProgress()
            cache = EmbeddingCache() if a.cache else None

            def log(line: str) -> None:
                print(line, file=sys.stderr)

            if session is not None:
                from ..scale import build_bank_on_dask, register_backbone
                from ..scale.cluster import backbone_spec

                info = register_backbone(session, backbone_spec(a.backbone, a.checkpoint, device, precision=a.precision,
                                                                encoding=a.encoding))
                bank = build_bank_on_dask(src, session, info, staging=staging, layout=a.layout, index_type=a.index,
                                          batch_size=a.batch_size, coreset_ratio=a.coreset, shards=shards, resume=a.resume,
                                          cache_root=str(cache.root) if cache is not None else None, progress=progress, log=log)
            else:
                bb = load_backbone(a.backbone, a.checkpoint, device, precision=a.precision, encoding=a.encoding)
                bank = build_bank_job(src, bb, layout=a.layout, index_type=a.index, batch_size=a.batch_size,
                                      coreset_ratio=a.coreset, shards=shards, staging=staging, resume=a.resume,
                                      progress=progress, cache=cache, log=log)
            if src.dataset is not None:
                bank.manifest["dataset"] = src.dataset
            path = bank.save(a.out, overwrite=a.overwrite, claim=claim)
        if staged:
            StagingArea(staging).remove()
    except BaseException as exc:  # interrupted, killed or failed: say how to resume
        n = len(StagingArea(staging).staged()) if staged else 0
        if n and (isinstance(exc, (Cancelled, KeyboardInterrupt)) or not isinstance(exc, InputError)):
            print(f"mias-sam build-bank: {n} of {len(src.groups)} sources are staged in {staging}; run the same command "
                  "with --resume to continue from them (or delete that folder).", file=sys.stderr)
        raise
    finally:
        if session is not None:
            session.close()
    summary = {"bank": str(path), "summary": bank.summary(), "seconds": round(time.perf_counter() - t0, 1)}
    if session is not None:
        summary["dask"] = session.spec.text
    if a.json:
        _out(summary)
    else:
        print(f"wrote {path}\n  {bank.summary()}\n  {summary['seconds']} s")
    return 0


def _dask_session(a: argparse.Namespace):
    """``--dask``'s cluster, connected (and described on stderr), or None without ``--dask``:
    only then is Dask's scheduler imported."""
    if not getattr(a, "dask", None):
        return None
    from ..core.errors import InputError

    try:
        from ..scale import connect
    except ImportError as exc:
        raise InputError(f"--dask needs Dask's distributed scheduler ({exc}); install it with "
                         "pip install 'napari-mias-sam[dask]'.") from None
    session = connect(a.dask)
    print(session.describe(), file=sys.stderr)
    return session


def _bank_inputs(a: argparse.Namespace, dataset: Path | None):
    """build-bank's sources (a labelled dataset's lesion-free slices, or files), checked."""
    from ..method.preprocess import PREPROCESS_PRESETS

    if dataset is not None:
        from ..jobs.bank_builds import bank_inputs_from_dataset

        src = bank_inputs_from_dataset(dataset, modality=a.modality, margin=a.margin, subjects=a.subjects,
                                       exclude=a.exclude_subjects, roi=a.roi, preprocess=a.preprocess, axis=a.axis,
                                       encoding=a.encoding)
        ds = src.dataset
        from ..data.datasets import KINDS

        kind = KINDS[ds["layout"]].title if ds["layout"] in KINDS else ds["layout"]
        print(f"dataset: {kind}, {len(ds['subjects'])} subjects, modality {ds['modality']}, lesion-free slices more than "
              f"{a.margin} slices from any label" + (f", masked to the {a.roi}" if a.roi else ""), file=sys.stderr)
        return src
    from ..jobs.bank_builds import bank_inputs_from_files

    return bank_inputs_from_files(a.normal, PREPROCESS_PRESETS[a.preprocess or defaults.PREPROCESS], axis=a.axis, encoding=a.encoding)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _dataset_input(a: argparse.Namespace) -> Path | None:
    """build-bank: the labelled dataset root given (then only lesion-free slices are used), or None."""
    from ..data.datasets import looks_like_dataset
    from ..core.errors import InputError

    options = [f"--{n}" for n, v in (("modality", a.modality), ("subjects", a.subjects), ("exclude-subjects", a.exclude_subjects),
                                      ("roi", a.roi)) if v is not None] + (["--margin"] if a.margin != defaults.DATASET_MARGIN else [])
    datasets = [n for n in a.normal if looks_like_dataset(n)]
    if not datasets:
        if options:
            raise InputError(f"{options[0]} applies to a labelled dataset (BraTS case folders, LiTS volume-N/segmentation-N "
                             f"files); {a.normal[0]} is not one.")
        return None
    if len(a.normal) > 1:
        raise InputError(f"{datasets[0]}: is a labelled dataset; give it alone (one root, or one case folder) to build a "
                         "bank from its lesion-free slices.")
    return datasets[0]


def _plan_build_memory(a: argparse.Namespace, src, session) -> int:
    """Before a build: the index's size and the memory of every process (stderr); the shard count
    (``--shards``, or enough shards for the index when it would not fit); a plan that does not fit
    is refused with what to change."""
    from ..bank import estimate_bank_memory
    from ..core.machine import ram_bytes
    from ..jobs.memory_plan import plan_build_memory
    from ..method.patches import GRID

    n_slices = sum(g.n for g in src.groups)
    total, avail = ram_bytes()
    est = estimate_bank_memory(n_slices * GRID * GRID, a.layout, a.index, coreset_ratio=a.coreset)
    shards = a.shards or 1
    if a.shards is None and avail and est["build_peak_bytes"] > avail / 2:
        shards = max(2, math.ceil(est["index_bytes"] / (avail / 4)))  # one shard in a quarter of the memory
    print(f"memory estimate: up to {n_slices:,} slices -> {est['patches']:,} patches x {est['feature_dim']}-d, "
          f"index {a.index}: {_gb(est['index_bytes'])} (build peak {_gb(est['build_peak_bytes'])}"
          + (f"; this machine has {_gb(avail)} available of {_gb(total)})" if avail else ")")
          + (f"; {shards} shards" + (" (chosen: the index would take over half the available memory)" if a.shards is None else "")
             if shards > 1 else ""), file=sys.stderr)
    workers = len(session.workers) if session is not None else 0
    plan = plan_build_memory(n_slices=n_slices, source_paths=[g.path for g in src.groups], source_slices=[g.n for g in src.groups],
                             backbone=a.backbone, batch_size=a.batch_size, layout=a.layout, index_type=a.index,
                             coreset_ratio=a.coreset, shards=shards, workers=workers,
                             local_workers=session.local_workers if session is not None else 0, available=avail)
    for line in plan.lines():
        print(line, file=sys.stderr)
    plan.check(avail, session.worker_memory_limits() if session is not None else None)
    return shards


def _plan_run(what: str, bank, *, n_slices: int, voxels: int, backbone: str, batch_size: int, k: int, session,
              volumes_kept: int = 1, decode_passes: int = 0) -> None:
    """Before ``segment`` / ``evaluate`` work: the memory of this process and of each Dask worker
    (printed on stderr with ``--dask``), refused with what to change when it does not fit
    (:mod:`~napari_mias_sam.jobs.memory_plan`)."""
    from ..core.machine import ram_bytes
    from ..jobs.memory_plan import plan_run_memory

    plan = plan_run_memory(what, bank=bank, n_slices=n_slices, backbone=backbone, batch_size=batch_size, k=k,
                           volume_voxels=voxels, volumes_kept=volumes_kept, decode_passes=decode_passes,
                           workers=len(session.workers) if session is not None else 0,
                           local_workers=session.local_workers if session is not None else None,
                           search_on_workers=session is not None)
    if session is not None:  # printed with --dask only; a refusal is one line either way
        for line in plan.lines():
            print(line, file=sys.stderr)
    plan.check(ram_bytes()[1], session.worker_memory_limits() if session is not None else None)


def _sizes(text: str) -> tuple[int, ...]:
    mult = {"k": 1_000, "m": 1_000_000}
    out = []
    for tok in text.split(","):
        t = tok.strip().lower()
        if not t:
            continue
        try:
            out.append(int(round(float(t[:-1]) * mult[t[-1]])) if t[-1] in mult else int(t))
        except (ValueError, IndexError) as exc:
            raise MiasSamError(f"--sizes: expected numbers like 10000, 100k or 7.68M, got {tok!r}") from exc
        if out[-1] < 1:
            raise MiasSamError(f"--sizes: bank sizes must be positive, got {tok!r}")
    if not out:
        raise MiasSamError("--sizes: empty list")
    return tuple(out)


def cmd_benchmark(a: argparse.Namespace) -> int:
    from .progress import ConsoleProgress
    from ..evaluation.bank_options import bank_accuracy
    from ..evaluation.benchmark import format_report, run_benchmark

    for name in ("encode_slices", "decode_slices", "knn_queries"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise MiasSamError(f"--{name.replace('_', '-')} must be at least 1")
    progress = ConsoleProgress(enabled=not a.json)
    if a.accuracy:
        from ..core.paths import sample_data_dir
        from ..backbones import load_backbone
        from ..evaluation.bank_options import accuracy_files
        from ..pipeline.embedding_cache import EmbeddingCache

        normals, cases = accuracy_files(a.sample_dir or sample_data_dir())
        bb = load_backbone("litemedsam", device=a.device, precision=a.precision)
        rep = bank_accuracy(normals, cases, layout=a.layout, backbone=bb, cache=EmbeddingCache(), progress=progress)
        if a.json:
            _out(rep)
        else:
            print(f"Bank options on {len(cases)} case(s), bank from {len(normals)} normal volumes ({rep['machine']['date_utc']})")
            print("  option                          patches  nprobe  mean slice Dice  Dice points vs exact  mask Dice vs exact (per case)")
            for r in rep["results"]:
                opt = ", ".join(f"{k}={v}" for k, v in r["option"].items())
                md = ", ".join(f"{c.get('mask_dice_vs_exact', 1.0):.3f}" for c in r["cases"].values())
                print(f"  {opt:<30} {r['patches']:>8,}  {str(r['nprobe'] or ''):>6}  {r['mean_slice_dice']:>15.4f}  "
                      f"{r['dice_points_vs_exact']:>20.2f}  {md}")
        return 0
    rep = run_benchmark(device=a.device, sizes=_sizes(a.sizes), encode_slices=a.encode_slices, decode_slices=a.decode_slices,
                        layout=a.layout, precision=a.precision, knn_index=a.knn_index, knn_queries=a.knn_queries,
                        quick=a.quick, progress=progress)
    if a.json:
        _out(rep)
    else:
        print(format_report(rep))
    return 0


def cmd_segment(a: argparse.Namespace) -> int:
    """``segment``: every input checked before any work (:func:`~napari_mias_sam.jobs.run.prepare_run`,
    the run path the widget's Run shares), then each volume run and written."""
    from .progress import ConsoleProgress
    from ..bank import load_bank
    from ..pipeline.embedding_cache import EmbeddingCache
    from ..core.errors import InputError
    from ..bank import check_compatible
    from ..jobs.dataset_runs import segment_inputs
    from ..data.volumes import nifti_stem
    from ..core.atomic_outputs import check_output_folder
    from ..jobs.png_runs import png_inputs
    from ..jobs.run import RunInput, check_machine, prepare_run, run
    from ..pipeline.settings import SegmentSettings
    from ..jobs.outputs import output_paths, segment_job, segment_outputs
    from ..jobs.lesion_runs import lesion_rule

    pngs = png_inputs(a.volume)
    if pngs is not None:
        return _segment_pngs(a, pngs)
    if a.gt and len(a.gt) != len(a.volume):
        raise InputError(f"--gt needs one ground truth per volume: got {len(a.gt)} for {len(a.volume)} volumes.")
    settings = SegmentSettings(gamma=a.gamma, mask_index=a.mask, prompt=a.prompt, k=a.k,
                               normalisation=a.normalisation, slice_decision=a.slice_decision)
    lesion_rule(a.lesion_connectivity, a.min_lesion_voxels, a.min_lesion_ml)  # bad lesion options: refused before any work
    device = check_machine(a.device, a.precision)  # before the bank is read
    check_output_folder(a.out)
    bank = load_bank(a.bank)
    # Case folders become their modality file, and a case's seg file its ground truth
    jobs = segment_inputs(a.volume, a.gt, bank.manifest, modality=a.modality, lesion_labels=a.lesion_labels)
    stems = [nifti_stem(j.image) for j in jobs]
    if len(set(stems)) != len(stems):
        raise InputError("two input volumes share a file name; their outputs would collide. Segment them into different --out folders.")
    inputs = [j.image for j in jobs] + [j.gt for j in jobs if j.gt is not None] + [a.bank]
    outsets = [segment_outputs(a.out, stem, inputs, overwrite=a.overwrite) for stem in stems]
    for o in outsets:  # every output checked before any work, so a batch never stops half-written
        o.check()
    # likewise every input (read once, masked to the bank's ROI, checked): a bad later file must not stop the batch half-way
    prepared = prepare_run(bank, [RunInput(str(j.image), j.load, case=j.case) for j in jobs], settings,
                           backbone=a.backbone, device=device, axis=a.axis)
    rule_args = (a.lesion_connectivity, a.min_lesion_voxels, a.min_lesion_ml)
    session = _dask_session(a)  # a wrong address stops here, before anything is written
    try:
        _plan_run("segment", bank, n_slices=max(i.n_slices for i in prepared.inputs), backbone=prepared.backbone,
                  voxels=max(_voxels(j.image) for j in jobs), batch_size=a.batch_size, k=settings.k or defaults.K,
                  session=session)
    except BaseException:
        if session is not None:
            session.close()
        raise
    reports, failed = [], []

    def report(n: int, rep: dict) -> None:
        line = rep.pop("lesion_line")
        reports.append((n, rep))
        if not a.json:
            paths = rep["outputs"]
            print(f"  wrote {paths['mask']}, " + ", ".join(Path(paths[k]).name for k in ("anomaly", "points", "lesions", "lesions_table"))
                  + f" ({rep['seconds']} s)")
            print(f"  {line}")
            if "metrics" in rep:
                m = rep["metrics"]
                print(f"  slice Dice {_fmt(m['slice_dice'])}  volume Dice {_fmt(m['volume_dice'])}  "
                      f"CoG inside lesion {m['cog_inside_lesion']['hits']}/{m['cog_inside_lesion']['lesion_slices']}  "
                      f"(lesion = {rep['lesion_labels']['rule']}, {rep['lesion_labels']['source']})")

    def fail(n: int, exc: BaseException) -> None:
        if len(jobs) == 1:
            raise exc
        claims[n].release()  # nothing of this volume is kept
        failed.append({"volume": str(jobs[n].image), "error": str(exc) or type(exc).__name__})
        print(f"  failed: {failed[-1]['error']}", file=sys.stderr)

    with contextlib.ExitStack() as stack:
        if session is not None:
            stack.callback(session.close)
        claims = [stack.enter_context(o) for o in outsets]  # every output set claimed before the work
        cache = None if a.no_cache else EmbeddingCache()
        if session is not None:
            from ..scale import register_backbone, segment_on_dask
            from ..scale.cluster import backbone_spec

            info = register_backbone(session, backbone_spec(prepared.backbone, a.checkpoint, prepared.device,
                                                            precision=prepared.precision, encoding=prepared.encoding))
            check_compatible(bank, info["describe"])
            t0 = time.perf_counter()
            progress = ConsoleProgress(enabled=not a.json)
            for done, (n, rep) in enumerate(segment_on_dask(session, jobs, claims, [output_paths(a.out, st) for st in stems],
                                                            a.bank, settings, rule_args, axis=a.axis, batch_size=a.batch_size,
                                                            cache_root=str(cache.root) if cache is not None else None)):
                progress(f"segment volumes on {len(session.workers)} Dask workers", done + 1, len(jobs))
                if isinstance(rep, BaseException):
                    fail(n, rep)
                else:
                    report(n, {**rep, "seconds": round(time.perf_counter() - t0, 2)})
        else:
            setup = prepared.start(_load_run_backbone(a, prepared))
            progress = ConsoleProgress()
            for n, (job, inp) in enumerate(zip(jobs, prepared.inputs)):
                t0 = time.perf_counter()
                if not a.json:
                    print(f"[{n + 1}/{len(jobs)}] {job.image}" + (f" (ground truth {job.gt.name})" if job.gt is not None else ""),
                          file=sys.stderr)
                try:
                    rep = segment_job(job, lambda inp=inp: run(prepared, setup, inp, cache=cache, batch_size=a.batch_size,
                                                               progress=progress),
                                      rule_args, claim=claims[n], out=a.out, overwrite=a.overwrite)
                except (MiasSamError, ValueError, ArithmeticError, MemoryError) as exc:
                    fail(n, exc)
                    continue
                report(n, {**rep, "seconds": round(time.perf_counter() - t0, 2)})
    reports = [r for _, r in sorted(reports, key=lambda x: x[0])]  # in input order, however they finished
    if a.json:
        _out(reports[0] if len(reports) == 1 and not failed else {"results": reports, "failed": failed})
    if failed:
        done = ", ".join(Path(r["volume"]).name for r in reports) or "none"
        raise MiasSamError(f"{len(failed)} of {len(jobs)} volumes failed, with no outputs: "
                           + "; ".join(f["error"] for f in failed) + f". Finished, with complete outputs: {done}.")
    return 0


def _voxels(path) -> int:
    """A NIfTI file's voxel count, from its header (0 when unreadable: its own check says why)."""
    import nibabel as nib

    try:
        return int(math.prod(nib.load(str(path)).shape[:3]))
    except Exception:
        return 0


def _load_run_backbone(a: argparse.Namespace, prepared):
    """The backbone a prepared run names (its bank's encoding), from ``--checkpoint``, on the checked device."""
    from ..backbones import load_backbone

    return load_backbone(prepared.backbone, a.checkpoint, prepared.device, precision=prepared.precision,
                         encoding=prepared.encoding)


def _segment_pngs(a: argparse.Namespace, pngs: list[Path]) -> int:
    """``segment`` on PNG slices: one call, one stack, one prompts CSV (the run path of volumes)."""
    from .progress import ConsoleProgress
    from ..bank import load_bank
    from ..pipeline.embedding_cache import EmbeddingCache
    from ..core.errors import InputError
    from ..jobs.png_runs import PROMPTS_CSV, check_png_out_dir, png_output_paths, png_volume, write_png_outputs
    from ..jobs.run import RunInput, check_machine, prepare_run, run
    from ..pipeline.settings import SegmentSettings
    from ..jobs.outputs import check_outputs

    if a.dask:
        raise InputError("--dask runs volumes one task each; PNG slices of one call are segmented together: drop --dask.")
    if a.gt:
        raise InputError("--gt takes NIfTI label volumes; to score PNG slices against their masks use "
                         "mias-sam evaluate --bmad DATASET (BMAD layout).")
    device = check_machine(a.device, a.precision)
    check_png_out_dir(a.out, a.volume)
    check_outputs(png_output_paths(a.out, pngs), list(pngs) + [a.bank], overwrite=a.overwrite)
    settings = SegmentSettings(gamma=a.gamma, mask_index=a.mask, prompt=a.prompt, k=a.k,
                               normalisation=a.normalisation, slice_decision=a.slice_decision)
    t0 = time.perf_counter()
    # the bank must be one of PNG slices; the slices are read once, sizes checked, before any model loads
    prepared = prepare_run(load_bank(a.bank), [RunInput(f"{len(pngs)} PNG slices", lambda: (png_volume(pngs), None))],
                           settings, backbone=a.backbone, device=device, slice_set=True)
    setup = prepared.start(_load_run_backbone(a, prepared))
    if not a.json:
        print(f"{len(pngs)} PNG slices", file=sys.stderr)
    res, _ = run(prepared, setup, prepared.inputs[0], cache=None if a.no_cache else EmbeddingCache(),
                 batch_size=a.batch_size, progress=ConsoleProgress())
    paths = write_png_outputs(res, pngs, a.out, overwrite=a.overwrite)
    rep = {"slices": len(pngs), "out": str(a.out), "prompts": str(paths[PROMPTS_CSV]),
           "masks_kept": int(sum(bool(res.decision[s]) and res.prompts[s] is not None for s in range(len(pngs)))),
           "settings": res.metadata()["settings"], "backbone": res.backbone_info,
           "timings_s": {k: round(v, 3) for k, v in res.timings.items()}, "seconds": round(time.perf_counter() - t0, 2)}
    if a.json:
        _out(rep)
    else:
        print(f"  wrote {len(pngs)} x (<stem>_mask.png, <stem>_anomaly.npy) and {paths[PROMPTS_CSV]} into {a.out} "
              f"({rep['seconds']} s)")
    return 0


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def cmd_demo(a: argparse.Namespace) -> int:
    from .progress import ConsoleProgress
    from ..jobs.demo import run_demo
    from ..core.atomic_outputs import check_output_folder

    check_output_folder(a.out)  # before the bank is built, not after
    rep = run_demo(a.out, device=a.device, batch_size=a.batch_size, progress=ConsoleProgress())
    if a.json:
        _out(rep)
        return 0
    print("MIAS-SAM demo: LiteMedSAM (bundled weights), CPU, bank from the bundled normal volumes")
    print(f"  bank: {rep['bank']['patches']:,} patches from {rep['bank']['slices']} normal slices -> {rep['bank']['path']}")
    print(f"  settings: prompt {rep['settings']['prompt']}, gamma {rep['settings']['gamma']}, mask {rep['settings']['mask_index']}, "
          f"normalisation {rep['settings']['normalisation']}")
    print("  per-slice Dice (lesion slices): " + ", ".join(f"{k}: {v:.2f}" for k, v in rep["per_slice_dice"].items()))
    print(f"  slice Dice (paper definition): {_fmt(rep['slice_dice'])}   "
          f"0.5-threshold baseline: {_fmt(rep['baseline_threshold_0.5_slice_dice'])}")
    print(f"  volume Dice: {_fmt(rep['volume_dice'])}   0.5-threshold baseline: {_fmt(rep['baseline_threshold_0.5_volume_dice'])}")
    c = rep["cog_inside_lesion"]
    print(f"  prompt centre inside the lesion on {c['hits']}/{c['lesion_slices']} lesion slices")
    print("  timings (s): " + ", ".join(f"{k} {v}" for k, v in rep["timings_s"].items()) + f"; total {rep['total_s']}")
    print(f"  outputs: {rep['outputs']['mask']}\n           {rep['outputs']['anomaly']}\n           {rep['outputs']['points']}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from ..bank import load_bank

    bank = load_bank(a.bank)
    if a.json:
        m = dict(bank.manifest)
        cal = dict(m.get("calibration", {}))
        m["calibration"] = {k: v for k, v in cal.items() if k != "per_k"} | {"per_k": {k: {"low": v["low"], "high": v["high"]} for k, v in cal.get("per_k", {}).items()}}
        _out(m)
    else:
        print(f"{a.bank}\n  {bank.summary()}\n  created {bank.manifest.get('created')} with napari-mias-sam {bank.manifest.get('package_version')}")
        ds = bank.manifest.get("dataset")
        if ds:
            from ..data.datasets import KINDS

            kind = KINDS[ds["layout"]].title if ds.get("layout") in KINDS else ds.get("layout")
            mods = ",".join(ds["sequences"]) + " (one per encoder channel)" if ds.get("sequences") else ds.get("modality")
            print(f"  dataset {ds.get('root')} ({kind}): modality {mods}, lesion-free slices more than "
                  f"{ds.get('margin')} slices from any label" + (f", masked to the {ds['roi']}" if ds.get("roi") else "")
                  + f"; {len(ds.get('subjects') or [])} subjects: {', '.join((ds.get('subjects') or [])[:5])}"
                  + (" ..." if len(ds.get("subjects") or []) > 5 else ""))
    return 0


def _csv_list(text: str, cast, what: str) -> tuple:
    try:
        vals = tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise MiasSamError(f"--{what}: expected a comma-separated list, got {text!r}") from exc
    if not vals:
        raise MiasSamError(f"--{what}: empty list")
    return vals


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .progress import ConsoleProgress
    from ..backbones import load_backbone
    from ..bank import check_compatible, load_bank
    from ..evaluation.bmad import read_bmad_test
    from ..pipeline.embedding_cache import EmbeddingCache
    from ..core.errors import InputError
    from ..evaluation.sweep import Ablations, evaluate, units_from_slices, units_from_volumes
    from ..evaluation.report import markdown_tables, report_outputs, write_report
    from ..core.atomic_outputs import check_output_folder
    from ..jobs.preflight import check_device, check_knn_memory, check_precision
    from ..method.prompts import PROMPT_TYPES
    from ..method.reference_encoding import encoding_of
    from ..pipeline.settings import SegmentSettings

    if a.images and not a.gts:
        raise InputError("--images needs --gts (one ground truth per volume).")
    if not a.dataset and (a.subjects or a.exclude_subjects or a.modality):
        raise InputError("--subjects, --exclude-subjects and --modality apply to --dataset.")
    if a.bmad and a.lesion_labels:
        raise InputError("--lesion-labels applies to NIfTI label volumes (--images/--gts or --dataset), not to BMAD's masks.")
    prompts = _csv_list(a.prompts, str, "prompts")
    for p in prompts:
        if p not in PROMPT_TYPES:
            raise InputError(f"--prompts: unknown prompt type {p!r}; choose from {', '.join(PROMPT_TYPES)}")
    abl = Ablations(prompts=prompts, gammas=_csv_list(a.gammas, float, "gammas"), ks=_csv_list(a.ks, int, "ks"))
    for g in abl.gammas:
        SegmentSettings(gamma=g)  # the same limits as --gamma, before any work
    device = check_device(a.device)
    check_precision(a.precision, device)
    check_output_folder(a.out)
    outs = report_outputs(a.out, overwrite=a.overwrite, inputs=[*(a.images or []), *(a.gts or [])])
    outs.check()  # existing results are never replaced without --overwrite
    banks = [load_bank(b) for b in a.bank]
    from ..jobs.dataset_runs import bank_sequences

    seqs = {bank_sequences(b.manifest) for b in banks}
    if len(seqs) > 1 or (seqs != {None} and not a.dataset):
        raise InputError(f"{a.bank[0]}: banks of several sequences per slice ({', '.join(','.join(q) for q in seqs if q)}) are "
                         "evaluated on BraTS case folders with --dataset ROOT, each bank compared with banks of the same sequences.")
    test_set = None
    if a.bmad:
        ss = read_bmad_test(a.bmad, a.split)
        units = units_from_slices(ss.images, ss.masks, ss.labels, name=a.bmad.name, encoding=encoding_of(banks[0].backbone))
    elif a.dataset:
        from ..jobs.dataset_runs import units_from_dataset

        units, test_set = units_from_dataset(a.dataset, banks, subjects=a.subjects, exclude=a.exclude_subjects,
                                             modality=a.modality, lesion_labels=a.lesion_labels)
    else:
        from ..jobs.dataset_runs import lesion_for

        units = units_from_volumes(a.images, a.gts, banks[0], lesion=lesion_for(None, a.lesion_labels))
    for b in banks:
        check_knn_memory(max(abl.ks), max(len(u.frames) for u in units), b.ntotal, what="--ks")
    session = _dask_session(a)  # a wrong address stops here, before anything is written
    with contextlib.ExitStack() as stack:
        if session is not None:
            stack.callback(session.close)
        passes = len(banks) * (1 + sum(len(x) - 1 for x in (abl.prompts, abl.gammas, abl.ks, abl.normalisations)))
        for b in banks:
            _plan_run("evaluate", b, n_slices=sum(len(u.frames) for u in units), backbone=a.backbone or b.backbone["name"],
                      voxels=max(len(u.frames) for u in units) * 256 * 256, batch_size=a.batch_size, k=max(abl.ks),
                      session=session, decode_passes=passes)
        stack.enter_context(outs)
        name = a.backbone or banks[0].backbone["name"]
        bb = load_backbone(name, a.checkpoint, device, precision=a.precision, encoding=encoding_of(banks[0].backbone))
        progress = ConsoleProgress()
        cache = None if a.no_cache else EmbeddingCache()
        hooks = {}
        if session is not None:
            from ..scale import evaluate_hooks, register_backbone
            from ..scale.cluster import backbone_spec

            info = register_backbone(session, backbone_spec(name, a.checkpoint, device, precision=a.precision,
                                                            encoding=encoding_of(banks[0].backbone)))
            for b in banks:
                check_compatible(b, info["describe"])
            encode_fn, search_fn, cleanup = evaluate_hooks(session, a.out, cache_root=str(cache.root) if cache is not None else None,
                                                           progress=progress)
            stack.callback(cleanup)
            hooks = {"encode": encode_fn, "search_units": search_fn}
        res = evaluate(units, banks, bb, base=SegmentSettings(prompt=a.prompt), ablations=abl, cache=cache,
                       batch_size=a.batch_size, progress=progress, **hooks)
        if test_set is not None:
            res["data"]["dataset"] = test_set
        elif not a.bmad:
            from ..data.datasets import lesion_description

            res["data"]["lesion_labels"] = lesion_description(lesion_for(None, a.lesion_labels),
                                                              source=f"--lesion-labels {a.lesion_labels}" if a.lesion_labels else "default")
        if session is not None:
            res["dask"] = session.spec.text
        res["outputs"] = write_report(res, a.out, overwrite=a.overwrite, claim=outs)
    if a.json:
        _out(res)
    else:
        print(markdown_tables(res))
        print("wrote " + ", ".join(res["outputs"].values()))
    return 0


def _commands() -> dict:
    from .manage import COMMANDS as MANAGE

    return {"build-bank": cmd_build_bank, "segment": cmd_segment, "demo": cmd_demo, "evaluate": cmd_evaluate, "info": cmd_info,
            "benchmark": cmd_benchmark, **MANAGE}


def main(argv: list[str] | None = None) -> int:
    from ..core.termination import Terminated, handle_termination

    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.command:
        parser.print_help()
        return 2
    try:
        with handle_termination():  # SIGTERM/SIGHUP clean up like Ctrl-C
            if getattr(a, "batch_size", 1) < 1:
                raise MiasSamError("--batch-size must be at least 1")
            import warnings

            def one_line(message, category, filename, lineno, file=None, line=None):
                print(f"mias-sam {a.command}: warning: {message}", file=sys.stderr)

            with warnings.catch_warnings():  # one line per warning on stderr, restored afterwards
                warnings.showwarning = one_line
                return _commands()[a.command](a)
    except (MiasSamError, ValueError) as exc:
        print(f"mias-sam {a.command}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(f"mias-sam {a.command}: stopped by {exc}; no partial outputs were kept.", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mias-sam {a.command}: interrupted; no partial outputs were kept.", file=sys.stderr)
        return 130
    except OSError as exc:  # the system refused (disk full, permissions changed meanwhile): one line, no traceback
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"mias-sam {a.command}: error: {where}{exc.strerror or exc}; no partial outputs were kept.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
