"""``mias-sam weights`` (list, fetch, check) and ``mias-sam cache`` (info, clear, limit): the files
the tool keeps for the user; ``mias-sam qa-report``: the summary of prompt reviews saved from the
viewer (``<stem>_qa.csv``)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from ..core.errors import InputError
from ..core.machine import human_bytes

__all__ = ["add_parsers", "COMMANDS"]

EXAMPLES = {
    "weights": """examples:
  mias-sam weights list                        # known checkpoints, their hashes, which are downloaded
  mias-sam weights fetch sam-vit_b             # download into the user cache, verify its published hash
  mias-sam weights check ~/models/sam_vit_b_01ec64.pth   # which known file is this?
then: mias-sam build-bank normals/ --out banks/sam --backbone sam-vit_b   (uses the fetched file)""",
    "cache": """examples:
  mias-sam cache info                          # folder, size, cap, what else is kept there
  mias-sam cache limit 8G                      # cap the embedding cache at 8 GiB (least recently used go first)
  mias-sam cache clear                         # remove the cached embeddings
  mias-sam cache clear --all                   # everything in the cache folder, downloaded weights included""",
    "qa-report": """examples:
  mias-sam qa-report results/case_01_qa.csv           # one volume's review, as a table
  mias-sam qa-report results/ --out results/report    # every *_qa.csv in a folder: JSON, Markdown, plot
  mias-sam qa-report reviews/*_qa.csv --json          # the summary as JSON on stdout""",
}


def add_parsers(sub, fmt) -> None:
    w = sub.add_parser("weights", help="known SAM / MedSAM checkpoints: list, download and verify, check a file",
                       epilog=EXAMPLES["weights"], formatter_class=fmt,
                       description="Checkpoints with published hashes (SHA-256; MedSAM: MD5, all its authors publish); downloads go to the user cache folder (MIAS_SAM_CACHE).")
    wsub = w.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    wl = wsub.add_parser("list", help="known checkpoints and which are downloaded")
    wl.add_argument("--json", action="store_true")
    wf = wsub.add_parser("fetch", help="download a known checkpoint and verify its hash")
    wf.add_argument("name", help="registry name (mias-sam weights list), e.g. sam-vit_b")
    wc = wsub.add_parser("check", help="hash a checkpoint file and name it when it is a known one")
    wc.add_argument("file", type=Path)
    wc.add_argument("--json", action="store_true")

    c = sub.add_parser("cache", help="the embedding cache: info, clear, size limit", epilog=EXAMPLES["cache"], formatter_class=fmt,
                       description="Embeddings are cached per slice content and backbone weights in the user cache folder "
                       "(MIAS_SAM_CACHE moves it); the least recently used are removed beyond the size limit.")
    csub = c.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    ci = csub.add_parser("info", help="folder, size, limit and what else is kept there")
    ci.add_argument("--json", action="store_true")
    cc = csub.add_parser("clear", help="remove the cached embeddings")
    cc.add_argument("--all", action="store_true", help="remove everything mias-sam keeps in the cache folder (downloaded weights, ONNX exports too; files it did not make stay)")
    cl = csub.add_parser("limit", help="set the embedding cache's size limit (e.g. 500M, 8G)")
    cl.add_argument("size", help="bytes with an optional K/M/G suffix (binary units)")
    # '-1G' is a (negative) size to check, not an unknown option: argparse takes only '-1' and '-0.5'
    # for numbers, so widen its test on this parser, which has no option that looks like a number
    cl._negative_number_matcher = re.compile(r"^-[\d.]")

    q = sub.add_parser("qa-report", help="summarise prompt reviews saved from the viewer (<stem>_qa.csv)",
                       epilog=EXAMPLES["qa-report"], formatter_class=fmt,
                       description="Per volume and overall: slices reviewed, accepted / corrected / rejected, the prompt "
                       "centre's hit rate inside the lesion before and after review, the median displacement of "
                       "corrections (mm), slice and volume Dice before and after review.")
    q.add_argument("files", nargs="+", type=Path, help="QA files (<stem>_qa.csv) or folders holding them")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    q.add_argument("--out", type=Path, help="also write qa_report.json, qa_report.md and qa_displacement.png there")
    q.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")


def _folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def cmd_weights(a: argparse.Namespace) -> int:
    from ..backbones import weights

    if a.weights_command == "list":
        rows = []
        for e in weights.registry().values():
            local = weights.local_file(e.name)
            rows.append({"name": e.name, "title": e.title, "backbone": e.backbone, "file": e.filename, "url": e.url,
                         "hash": e.hash, "downloaded": str(local) if local else None})
        if a.json:
            print(json.dumps({"folder": str(weights.weights_dir()), "weights": rows}, indent=2))
        else:
            print(f"downloads go to {weights.weights_dir()}")
            for r in rows:
                print(f"  {r['name']:<13} {r['title']}\n{'':15} --backbone {r['backbone']}, {r['file']}, "
                      f"{r['hash'] or 'no published hash'}\n{'':15} {'downloaded: ' + r['downloaded'] if r['downloaded'] else 'not downloaded'}")
        return 0
    if a.weights_command == "fetch":
        path = weights.fetch(a.name, progressbar=True)
        e = weights.registry()[a.name]
        print(f"{e.name}: {path} ({e.hash or 'no published hash: not verified'}{' verified' if e.hash else ''})")
        print(f"use it with --backbone {e.backbone} (found there automatically) or --checkpoint {path}")
        return 0
    path = weights.weights_file(a.file)  # a folder, a broken link, an empty file: refused as such
    entry, digests = weights.identify(path)
    info = None if entry else weights.inspect_checkpoint(path)  # a file with a published hash is that file
    if a.json:
        print(json.dumps({"file": str(a.file), "known_as": entry.name if entry else None, **digests,
                          "checkpoint": None if info is None else vars(info)}, indent=2))
    elif entry:
        print(f"{a.file}: {entry.title} ({entry.name}; use --backbone {entry.backbone}); {entry.hash} matches")
    else:
        shaped = f", shaped like {info.shaped_like} (--backbone {info.backbone})" if info.shaped_like else ""
        print(f"{a.file}: not a known checkpoint (SHA-256 {digests['sha256']}); a PyTorch state dict of {info.tensors:,} "
              f"tensors ({info.parameters / 1e6:.1f} M parameters){shaped}; it can be used with --checkpoint, with a warning")
    return 0


def _kept(root: Path, cache_root: Path) -> tuple[dict, dict]:
    """What else the cache folder holds: the tool's own entries (ONNX exports and weights by file
    name, other folders and files by size) and, apart, the files it did not make."""
    from fnmatch import fnmatch

    from ..pipeline.embedding_cache import TOOL_FILES

    own, foreign = {}, {}
    for child in sorted(root.iterdir()):
        if child == cache_root:
            continue
        if not any(fnmatch(child.name, pat) for pat in TOOL_FILES):
            foreign[child.name + ("/" if child.is_dir() else "")] = _folder_bytes(child)
        elif child.is_dir() and child.name in ("onnx", "weights"):
            own[child.name] = {f.name: f.stat().st_size for f in sorted(child.iterdir()) if f.is_file() and not f.name.startswith(".")}
        else:
            own[child.name] = _folder_bytes(child)
    return own, foreign


def cmd_cache(a: argparse.Namespace) -> int:
    from fnmatch import fnmatch

    from ..core.paths import cache_dir
    from ..pipeline.embedding_cache import TOOL_FILES, EmbeddingCache, parse_cache_limit, set_cache_limit

    root = cache_dir()
    if a.cache_command == "limit":
        set_cache_limit(parse_cache_limit(a.size))  # checked for what it means before it is saved
        cache = EmbeddingCache()
        removed = cache.evict()
        print(f"embedding cache limit: {human_bytes(cache.max_bytes)}" + (f"; removed {removed} least recently used entries" if removed else ""))
        return 0
    cache = EmbeddingCache()
    if a.cache_command == "clear":
        n = cache.clear()
        if a.all:  # only what the tool made: MIAS_SAM_CACHE may point at a folder holding the user's files
            left = []
            for child in sorted(root.iterdir()):
                if any(fnmatch(child.name, pat) for pat in TOOL_FILES):
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink(missing_ok=True)
                else:
                    left.append(child.name + ("/" if child.is_dir() else ""))
            print(f"removed everything mias-sam keeps in {root} ({n} cached embeddings among it)"
                  + (f"; left alone what it did not make: {', '.join(left)}" if left else ""))
        else:
            print(f"removed {n} cached embeddings from {cache.root}")
        return 0
    info = cache.info()
    own, foreign = _kept(root, cache.root)
    if a.json:
        sizes = {k: (sum(v.values()) if isinstance(v, dict) else v) for k, v in own.items()}
        print(json.dumps({"cache_folder": str(root), "embeddings": {**info, "limit": human_bytes(info["max_bytes"])},
                          "other_bytes": sizes | foreign, "onnx_models": sorted(own.get("onnx", {})),
                          "weights": sorted(own.get("weights", {})), "not_made_by_mias_sam": sorted(foreign)}, indent=2))
        return 0
    print(f"cache folder: {root}  (MIAS_SAM_CACHE moves it)")
    print(f"  embeddings: {info['entries']} entries, {human_bytes(info['bytes'])} of {human_bytes(info['max_bytes'])} "
          f"(least recently used removed beyond that; mias-sam cache limit SIZE)")
    if info["entries"]:
        print(f"    used between {info['oldest_use']} and {info['newest_use']}")
    for name, what in own.items():
        if isinstance(what, dict):
            label = {"onnx": "exported ONNX model", "weights": "downloaded weights file"}[name]
            print(f"  {name}: {len(what)} {label}{'s' if len(what) != 1 else ''}, {human_bytes(sum(what.values()))}")
            for f, size in what.items():
                print(f"    {f} ({human_bytes(size)})")
        elif name == "cache-settings.json":
            print(f"  {name}: the limit above (mias-sam cache limit)")
        else:
            print(f"  {name}: {human_bytes(what)}")
    if foreign:
        print("  not made by mias-sam (cache clear --all leaves them): " + ", ".join(f"{k} ({human_bytes(v)})" for k, v in foreign.items()))
    return 0


def qa_files(paths: list[Path]) -> list[Path]:
    """The QA files named, and those in the folders named (``*_qa.csv``); one line when none."""
    from ..data.qa_table import QA_SUFFIX

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob(f"*{QA_SUFFIX}"))
            if not found:
                raise InputError(f"{p}: no *{QA_SUFFIX} file in this folder; save the review from the viewer first.")
            files.extend(found)
        else:
            files.append(p)
    return files


def cmd_qa_report(a: argparse.Namespace) -> int:
    from ..data.qa_table import read_qa, report_text, summarise

    files = qa_files(a.files)
    summary = summarise([read_qa(f) for f in files])  # every file checked before anything is written
    if a.out is not None:
        from ..evaluation.qa_report import write_qa_report

        summary["outputs"] = write_qa_report(summary, a.out, overwrite=a.overwrite, inputs=files)
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        print(report_text(summary), end="")
        if a.out is not None:
            print("wrote " + ", ".join(summary["outputs"].values()))
    return 0


COMMANDS = {"weights": cmd_weights, "cache": cmd_cache, "qa-report": cmd_qa_report}
