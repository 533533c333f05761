"""The pages agree with the code, and with each other.

- Every link in the README and the pages (docs/, CONTRIBUTING, CHANGELOG, sample_data/) that points
  into the repository reaches an existing file, and an existing heading when it names one. The
  README (shown on PyPI and the napari hub) links into the repository with absolute URLs only; the
  pages in docs/ link to each other with relative ones.
- The defaults that docs/settings.md, the README, the API examples, docs/architecture.md and each
  command's ``--help`` state are the code's own: ``core/defaults.py``, ``pipeline.settings.VOLUME_PROMPT``,
  ``method.prompts.PROMPT_RULES`` / ``BACKBONE_PROMPTS``, ``method.regions`` and ``method.region_prompts``, ``method.preprocess``,
  the embedding cache's limit and the argparse defaults.
- The figures the README quotes (the default against the thresholding baseline, with its
  intervals; the demo's time) are those of docs/results.md and docs/performance.md.

Nothing here copies a value: each expected text is computed from the code or read from the page
that owns the figure, so the next change of a default or a result fails here until the pages follow.
Each checker returns a list of problems; the probes at the end show each one failing.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from napari_mias_sam.backbones.weights import registry
from napari_mias_sam.cli.commands import build_parser
from napari_mias_sam.core import defaults
from napari_mias_sam.method import region_prompts, regions
from napari_mias_sam.method.preprocess import CT_ABDOMEN_WINDOW, MRI_PERCENTILES
from napari_mias_sam.method.prompts import BACKBONE_PROMPTS, default_mask_for
from napari_mias_sam.pipeline.embedding_cache import DEFAULT_MAX_BYTES
from napari_mias_sam.pipeline.settings import VOLUME_PROMPT

ROOT = Path(__file__).resolve().parents[1]
REPO = "napari-mias-sam/napari-mias-sam"
BLOB = re.compile(rf"^https://github\.com/{REPO}/(?:blob|tree)/main/(?P<path>[^#?]*)(?:#(?P<anchor>.*))?$")
RAW = re.compile(rf"^https://raw\.githubusercontent\.com/{REPO}/main/(?P<path>[^#?]*)$")
#: Links to the repository's site that are not files (the README anchor GitHub adds, issues, releases).
SITE = re.compile(rf"^https://github\.com/{REPO}(?:#readme|/issues.*|/releases.*|/compare/.*|/?)$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+(?:\([^()\s]*\)[^()\s]*)*)(?:\s+\"[^\"]*\")?\)")
COMMANDS = ("build-bank", "segment", "evaluate", "demo")


def pages() -> list[Path]:
    found = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md",
             ROOT / "sample_data" / "README.md", ROOT / "sample_data" / "LICENSES.md"]
    return [p for p in found if p.exists()] + sorted((ROOT / "docs").glob("*.md"))


def prose(text: str) -> str:
    """``text`` without its fenced code blocks (their ``#`` lines are comments, not headings)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (``-`` and ``_`` kept), spaces
    to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(text).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def link_problems(page: Path, text: str) -> list[str]:
    """Broken links of ``page`` (its text given): a missing file or heading, a relative link in the
    README, an absolute link into the repository from docs/."""
    problems = []
    where = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
    for target in LINK.findall(prose(text)):
        path, anchor = None, None
        if m := BLOB.match(target) or RAW.match(target):
            path, anchor = m.group("path"), m.groupdict().get("anchor")
            if page.parent == ROOT / "docs":
                problems.append(f"{where}: {target}: link to pages of this repository with a relative path")
            file = ROOT / path
        elif SITE.match(target) or re.match(r"^[a-z]+:", target):
            continue  # the repository's site, another site, mailto:
        else:
            if page.name == "README.md" and page.parent == ROOT and not target.startswith("#"):
                problems.append(f"{where}: {target}: the README is shown on PyPI and the hub; link with "
                                f"https://github.com/{REPO}/blob/main/...")
            path, _, anchor = target.partition("#")
            file = (page.parent / path) if path else page
        if not file.exists():
            problems.append(f"{where}: {target}: {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file} does not exist")
            continue
        if anchor and file.suffix == ".md" and anchor not in anchors(file.read_text() if file != page else text):
            problems.append(f"{where}: {target}: no heading '#{anchor}' in {file.name}")
    return problems


def test_every_link_into_the_repository_resolves():
    problems = [p for page in pages() for p in link_problems(page, page.read_text())]
    assert not problems, "\n".join(problems)


def test_the_readme_links_the_reference_pages():
    readme = (ROOT / "README.md").read_text()
    for name in ("install", "cli", "settings", "files", "geometry", "api", "viewer", "results", "datasets",
                 "review", "performance", "architecture", "lesions"):
        assert f"/docs/{name}.md" in readme, f"README: no link to docs/{name}.md"
    for name in ("CONTRIBUTING.md", "CHANGELOG.md", "CITATION.cff", "sample_data/LICENSES.md"):
        assert f"/{name}" in readme, f"README: no link to {name}"


# --- defaults: docs/settings.md against the code ---------------------------------------------------

def subparsers() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def options() -> dict[str, list[argparse.Action]]:
    """Each option string of build-bank, segment, evaluate and demo, with its actions."""
    out: dict[str, list[argparse.Action]] = {}
    for name, p in subparsers().items():
        if name in COMMANDS:
            for a in p._actions:
                for s in a.option_strings:
                    if s.startswith("--") and s != "--help":
                        out.setdefault(s, []).append(a)
    return out


def shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


#: Defaults decided after parsing (the argparse default is None): the code's own value.
LATE_DEFAULTS = {
    "--backbone": defaults.BACKBONE,
    "--preprocess": defaults.PREPROCESS,
    "--axis": defaults.SLICE_AXIS,
    "--layout": defaults.PATCH_LAYOUT,
    "--index": defaults.INDEX_TYPE,
    "--margin": defaults.DATASET_MARGIN,
    "--batch-size": defaults.BATCH_SIZE,
    "--gamma": defaults.GAMMA,
    "--k": defaults.K,
    "--normalisation": defaults.NORMALISATION,
    "--lesion-connectivity": defaults.LESION_CONNECTIVITY,
    "--min-lesion-voxels": defaults.MIN_LESION_VOXELS,
}
#: Options with a default that are inputs or lists of choices, not settings.
NOT_SETTINGS = {"--out", "--split", "--prompts", "--device"}


def expected_prompt_cell() -> list[str]:
    per_slice = {"litemedsam": "LiteMedSAM", "sam": "SAM"}
    return [f"`{VOLUME_PROMPT}` for volumes"] + [f"`{row.default}` for {per_slice.get(name, name)}"
                                                  for name, row in BACKBONE_PROMPTS.items()]


def expected_mask_cell() -> str:
    return f"{default_mask_for(VOLUME_PROMPT)} with `{VOLUME_PROMPT}`, else {defaults.MASK_INDEX}"


def settings_table(text: str) -> dict[str, str]:
    """docs/settings.md's defaults table: each option named in a row's first cell -> its default cell."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`--"):
            for opt in re.findall(r"`(--[\w-]+)`", cells[0]):
                rows[opt] = cells[1]
    return rows


def first_token(cell: str) -> str:
    return re.split(r"[\s(]", cell.replace("`", ""), maxsplit=1)[0]


def settings_problems(text: str) -> list[str]:
    table = settings_table(text)
    opts = options()
    problems = []
    for opt, cell in table.items():
        if opt == "--prompt":
            problems += [f"settings.md --prompt: says {cell!r}, expected it to contain {want!r}"
                         for want in expected_prompt_cell() if want not in cell]
            continue
        if opt == "--mask":
            if cell != expected_mask_cell():
                problems.append(f"settings.md --mask: says {cell!r}, the code: {expected_mask_cell()!r}")
            continue
        if opt not in opts:
            problems.append(f"settings.md names {opt}, which no command has")
            continue
        values = {a.default for a in opts[opt] if a.default is not None}
        if opt in LATE_DEFAULTS:
            values.add(LATE_DEFAULTS[opt])
        if values == {False}:
            if first_token(cell) != "off":
                problems.append(f"settings.md {opt}: a switch, off by default; the page says {cell!r}")
            continue
        for v in values - {False}:
            if first_token(cell) != shown(v):
                problems.append(f"settings.md {opt}: the page says {first_token(cell)!r}, the code {shown(v)!r}")
    missing = [o for o, acts in opts.items() if o not in table and o not in NOT_SETTINGS
               and any(a.default not in (None, False) and not isinstance(a.default, Path) for a in acts)]
    problems += [f"settings.md: no row for {o} (default {shown(opts[o][0].default)!r})" for o in missing]
    # the regions prompt's levels, and the presets, as the prose states them
    prompt_section = text.split("## `--prompt`", 1)[-1].split("\n## ", 1)[0]
    prompt_section = " ".join(prompt_section.split())
    level_texts = {(regions, "SEED_QUANTILE"): "the {:g}th percentile of held-out normal slices' peaks",
                   (regions, "EXTENT_QUANTILE"): "above their {:g}th",
                   (regions, "MIN_NORMAL_PEAKS"): "at least {} held-out normal slices",
                   (regions, "PIXEL_SEED_QUANTILE"): "at the {:g}th and",
                   (regions, "PIXEL_EXTENT_QUANTILE"): "{:g}th percentiles of every pixel of its held-out normal maps",
                   (regions, "TAIL_EXTENT_QUANTILE"): "(extent at their {:g}th percentile)",
                   (region_prompts, "BOX_SIGMAS"): "a box around it of {:g} gamma-weighted standard deviations",
                   (region_prompts, "BOX_PAD"): "plus {:g} px each side",
                   (region_prompts, "AGREEMENT_MIN"): "Dice at least {:g} with the pixels above the seed level"}
    for (module, name), form in level_texts.items():
        where = module.__name__.replace("napari_mias_sam.", "").replace(".", "/") + ".py"
        if not hasattr(module, name):
            problems.append(f"{where} has no {name} any more: say on settings.md what replaced it, and check that here")
        elif form.format(getattr(module, name)) not in prompt_section:
            problems.append(f"settings.md, the --prompt section: expected {form.format(getattr(module, name))!r} "
                            f"({where} {name})")
    lo, hi = MRI_PERCENTILES
    ct_lo, ct_hi = CT_ABDOMEN_WINDOW
    for want in (f"percentiles {lo:g}-{hi:g}", f"[{ct_lo:g}, {ct_hi:g}] HU",
                 f"capped at {DEFAULT_MAX_BYTES / 1024**3:g} GiB by default"):
        if want not in text:
            problems.append(f"settings.md: expected {want!r} (the code's value)")
    return problems


def test_the_settings_page_states_the_codes_defaults():
    problems = settings_problems((ROOT / "docs" / "settings.md").read_text())
    assert not problems, "\n".join(problems)


# --- defaults: --help ------------------------------------------------------------------------------

def help_problems(parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """Each option whose help says "default X" says the argparse default; the default prompt and
    mask named in segment's and evaluate's help are the code's; weights' help names every hash kind."""
    problems = []
    for name, p in parsers.items():
        for a in p._actions:
            text = " ".join((a.help or "").split())
            m = re.search(r"\bdefault:?\s+([^\s;)]+)", text)
            if not m or a.default in (None, False) or isinstance(a.default, Path) or "%(default)" in (a.help or ""):
                continue
            if m.group(1).strip("`'\",.") != shown(a.default):
                problems.append(f"{name} {'/'.join(a.option_strings)}: help says default {m.group(1)!r}, "
                                f"the code {shown(a.default)!r}")
        if name in ("segment", "evaluate"):
            prompt = next(a for a in p._actions if "--prompt" in a.option_strings)
            if f"default for volumes: {VOLUME_PROMPT}" not in " ".join((prompt.help or "").split()):
                problems.append(f"{name} --prompt: its help does not say the volumes' default ({VOLUME_PROMPT})")
        if name == "segment":
            mask = next(a for a in p._actions if "--mask" in a.option_strings)
            want = f"{default_mask_for(VOLUME_PROMPT)} with the {VOLUME_PROMPT} prompt"
            if want not in " ".join((mask.help or "").split()):
                problems.append(f"segment --mask: its help should say {want!r}")
            if "slice-wise" in (p.description or "") or VOLUME_PROMPT not in (p.description or ""):
                problems.append(f"segment: its description should name the default prompt ({VOLUME_PROMPT})")
        if name == "weights":
            said = (p.description or "") + (p.epilog or "")
            for kind in sorted({e.hash.split(":")[0] for e in registry().values() if e.hash}):
                if kind.upper().replace("SHA256", "SHA-256") not in said.upper().replace("SHA256", "SHA-256"):
                    problems.append(f"weights: its help does not say that some checkpoints are checked by {kind}")
    return problems


def test_help_texts_state_the_codes_defaults():
    problems = help_problems(subparsers())
    assert not problems, "\n".join(problems)


# --- defaults: the README, the API examples, architecture.md ---------------------------------------

def readme_default_problems(text: str) -> list[str]:
    flat = " ".join(text.split())
    m = re.search(r"The default \(`([\w-]+)` prompt, mask (\d)\b", flat)
    if not m:
        return ["README: the evidence section should name the default as 'The default (`PROMPT` prompt, mask N ...'"]
    if (m.group(1), int(m.group(2))) != (VOLUME_PROMPT, default_mask_for(VOLUME_PROMPT)):
        return [f"README: says the default is {m.group(1)} with mask {m.group(2)}, the code: "
                f"{VOLUME_PROMPT} with mask {default_mask_for(VOLUME_PROMPT)}"]
    return []


def api_example_problems(text: str, where: str) -> list[str]:
    """A ``SegmentSettings(...)`` in a page's Python blocks that sets a mask sets the mask of its
    prompt (the volumes' default when it sets none)."""
    problems = []
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "SegmentSettings":
                kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
                prompt = kw.get("prompt") or VOLUME_PROMPT
                if "mask_index" in kw and kw["mask_index"] != default_mask_for(prompt):
                    problems.append(f"{where}: SegmentSettings(mask_index={kw['mask_index']}) with the {prompt} prompt, "
                                    f"whose mask is {default_mask_for(prompt)}")
                if kw.get("gamma", defaults.GAMMA) != defaults.GAMMA and "prompt" not in kw:
                    problems.append(f"{where}: SegmentSettings(gamma={kw['gamma']}) shown as the default")
    return problems


def architecture_problems(text: str) -> list[str]:
    flat = " ".join(text.split())
    wants = [f"patch layout (`{defaults.PATCH_LAYOUT}`)", f"index type (`{defaults.INDEX_TYPE}`)",
             f"NIfTI preset (`{defaults.PREPROCESS}`)", f"slice axis (`{defaults.SLICE_AXIS}`)",
             f"dataset margin ({defaults.DATASET_MARGIN})", f"batch size ({defaults.BATCH_SIZE})",
             f"the kNN batch ({defaults.KNN_BATCH_SLICES} slices)"]
    return [f"architecture.md: expected {w!r} (core/defaults.py)" for w in wants if w not in flat]


def files_problems(text: str) -> list[str]:
    want = (f"{defaults.LESION_CONNECTIVITY}-connected components of at least {defaults.MIN_LESION_VOXELS} voxels")
    return [] if want in " ".join(text.split()) else [f"files.md: expected {want!r} (core/defaults.py)"]


def test_the_readme_api_and_architecture_pages_state_the_codes_defaults():
    readme = (ROOT / "README.md").read_text()
    problems = readme_default_problems(readme)
    for page in pages():
        problems += api_example_problems(page.read_text(), str(page.relative_to(ROOT)))
    problems += architecture_problems((ROOT / "docs" / "architecture.md").read_text())
    problems += files_problems((ROOT / "docs" / "files.md").read_text())
    assert not problems, "\n".join(problems)


# --- figures: the README against docs/results.md and docs/performance.md ---------------------------

NUM = r"[+-]?\d+(?:\.\d+)?"
QUOTE = re.compile(rf"slice Dice (?P<s>{NUM}) against (?P<sb>{NUM}) \((?P<sd>{NUM}), 95 % interval \[(?P<sl>{NUM}), (?P<sh>{NUM})\]\), "
                   rf"volume Dice (?P<v>{NUM}) against (?P<vb>{NUM}) \((?P<vd>{NUM}), 95 % interval \[(?P<vl>{NUM}), (?P<vh>{NUM})\]\)")


def section(text: str, anchor: str) -> str:
    """The part of a page under the heading whose anchor is ``anchor`` (to the next heading of its level)."""
    lines = prose(text).splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m and slug(m.group(2)) == anchor:
            level = len(m.group(1))
            end = next((j for j in range(i + 1, len(lines)) if re.match(rf"^#{{1,{level}}}\s", lines[j])), len(lines))
            return "\n".join(lines[i:end])
    raise AssertionError(f"no heading #{anchor}")


def table_rows(text: str, caption: str) -> dict[str, list[str]]:
    """The first Markdown table after the line starting with ``caption``: first cell -> cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(caption))
    rows, seen = {}, False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            seen = True
            cells = [c.replace("**", "").strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells)
        elif seen:
            break
    return rows


def interval(cell: str) -> tuple[str, str, str]:
    m = re.match(rf"({NUM}) \[({NUM}), ({NUM})\]", cell)
    assert m, f"not 'difference [low, high]': {cell!r}"
    return m.group(1), m.group(2), m.group(3)


def quoted_result_problems(readme: str, results: str) -> list[str]:
    """The README's default-vs-baseline sentence against the test-split table of the results section
    the README links (the first rows starting 'shipped default' and 'baseline'; bold ignored)."""
    flat = " ".join(readme.split())
    m = QUOTE.search(flat)
    if not m:
        return ["README: no 'slice Dice X against Y (+D, 95 % interval [L, H]), volume Dice ...' sentence"]
    link = re.search(r"docs/results\.md#([\w-]+)", flat[m.end():m.end() + 600])
    if not link:
        return ["README: the default-vs-baseline figures should link the results section they come from"]
    newest = [slug(h) for h in re.findall(r"^#{2,3}\s+(.*)$", prose(results), flags=re.M) if "volumes' default" in h]
    if newest and link.group(1) != newest[-1]:
        return [f"README: the default-vs-baseline figures link docs/results.md#{link.group(1)}, but the newest "
                f"section on the volumes' default is #{newest[-1]}"]
    rows = table_rows(section(results, link.group(1)), "**Test split")
    try:
        default = next(v for k, v in rows.items() if k.startswith("shipped default"))
        base = next(v for k, v in rows.items() if k.startswith("baseline"))
    except (StopIteration, KeyError):
        return [f"docs/results.md#{link.group(1)}: the test-split table has no 'shipped default' or 'baseline' row"]
    page = {"s": default[1], "sb": base[1], "v": default[3], "vb": base[3]}
    page.update(zip(("sd", "sl", "sh"), interval(default[2])))
    page.update(zip(("vd", "vl", "vh"), interval(default[4])))
    return [f"README quotes {k}={m.group(k)}, docs/results.md#{link.group(1)} says {page[k]}"
            for k in page if float(m.group(k)) != float(page[k])]


def test_the_readmes_results_are_those_of_the_results_page():
    problems = quoted_result_problems((ROOT / "README.md").read_text(), (ROOT / "docs" / "results.md").read_text())
    assert not problems, "\n".join(problems)


def demo_time_problems(readme: str, sample_readme: str, performance: str) -> list[str]:
    demo = " ".join(section(performance, "the-demo-mias-sam-demo").split())
    m = re.search(r"(\d+) s wall", demo)
    if not m:
        return ["docs/performance.md#the-demo-mias-sam-demo: no 'N s wall' figure"]
    problems = []
    for where, text in (("README", readme), ("sample_data/README.md", sample_readme)):
        said = re.findall(r"(?:about|measured) (\d+) s on a 2-core CPU", " ".join(text.split()))
        if said != [m.group(1)] * len(said) or not said:
            problems.append(f"{where}: the demo time {said or 'is not given'}; docs/performance.md measured {m.group(1)} s")
    return problems


def test_the_demo_time_is_the_measured_one():
    problems = demo_time_problems((ROOT / "README.md").read_text(), (ROOT / "sample_data" / "README.md").read_text(),
                                  (ROOT / "docs" / "performance.md").read_text())
    assert not problems, "\n".join(problems)


def paper_dice_problems(text: str, where: str) -> list[str]:
    """The paper's Brain MRI Dice is 37.04 in its main table and 37.06 in its ablation rows: a page
    quoting 37.06 says it is the ablation's."""
    flat = " ".join(text.split())
    return [f"{where}: 37.06 quoted without saying it is the paper's ablation row (main table: 37.04)"
            for m in re.finditer(r"37\.06", flat) if "ablation" not in flat[max(0, m.start() - 300):m.end() + 300]]


def test_the_papers_brain_mri_dice_is_quoted_with_its_source():
    problems = [p for page in pages() for p in paper_dice_problems(page.read_text(), str(page.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)


def test_the_readme_has_no_measurement_log():
    """No UTC times, load averages or dated timing columns on the hub page: they live in docs/."""
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"\d\d:\d\d UTC|load average", readme), "README: move measurement logs to docs/performance.md"


# --- probes: each checker fails on a page that disagrees --------------------------------------------

def test_probes_each_checker_fails_on_a_disagreeing_page(tmp_path):
    page = tmp_path / "page.md"
    text = "# Top\n\n[ok](#top) [gone](#nowhere) [file](missing.md) [here](page.md#top)\n"
    page.write_text(text)
    found = link_problems(page, text)
    assert len(found) == 2 and "#nowhere" in found[0] and "missing.md" in found[1], found

    settings = (ROOT / "docs" / "settings.md").read_text()
    gamma_row = next(line for line in settings.splitlines() if line.startswith("| `--gamma`"))
    wrong = settings.replace(gamma_row, gamma_row.replace(f"| {shown(defaults.GAMMA)} |", f"| {shown(defaults.GAMMA + 1)} |"))
    assert any("--gamma" in p for p in settings_problems(wrong))
    assert any("--mask" in p for p in settings_problems(settings.replace(expected_mask_cell(), "3")))
    assert any("--k" in p for p in settings_problems(settings.replace("| `--k` |", "| `--kk` |")))

    parsers = subparsers()
    seg = parsers["segment"]
    gamma = next(a for a in seg._actions if "--gamma" in a.option_strings)
    saved = gamma.help
    gamma.help = "centre-of-gravity exponent (default 7)"
    try:
        assert any("--gamma" in p for p in help_problems({"segment": seg}))
    finally:
        gamma.help = saved

    readme = (ROOT / "README.md").read_text()
    assert readme_default_problems(readme.replace(f"(`{VOLUME_PROMPT}` prompt", "(`max-point` prompt"))
    assert api_example_problems("```python\nSegmentSettings(mask_index=3)\n```\n", "probe") or \
        default_mask_for(VOLUME_PROMPT) == 3
    results = (ROOT / "docs" / "results.md").read_text()
    m = QUOTE.search(" ".join(readme.split()))
    assert m, "the README's quoted result is not found"
    assert quoted_result_problems(" ".join(readme.split()).replace(m.group("vh"), "9.99", 1), results)
    newest = [slug(h) for h in re.findall(r"^#{2,3}\s+(.*)$", prose(results), flags=re.M) if "volumes' default" in h]
    if len(newest) > 1:  # linking an older section on the default is caught
        assert quoted_result_problems(readme.replace(f"results.md#{newest[-1]}", f"results.md#{newest[0]}"), results)
    assert demo_time_problems(readme.replace("about ", "about 1", 1), "measured 1 s on a 2-core CPU",
                              (ROOT / "docs" / "performance.md").read_text())
    assert paper_dice_problems("The paper's Dice is 37.06.", "probe")
    assert files_problems("6-connected components of at least 10 voxels")
    assert architecture_problems("patch layout (`mean256`)")
    with pytest.raises(AssertionError):
        section("# A\n", "b")
