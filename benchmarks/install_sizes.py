"""What ``pip install napari-mias-sam`` downloads, per platform: the package's dependencies
(pyproject.toml, plus extras or swaps) fetched with ``pip download``, then listed by size with the
CUDA libraries among them and the total.

On the machine itself (Linux x86_64 here) pip resolves as a user's pip would. For another platform
the versions come from ``uv pip compile --python-platform`` (pip's own ``--platform`` evaluates
environment markers on this machine, so it would resolve torch's Linux-only CUDA dependencies for
macOS too) and are fetched with ``pip download --no-deps`` (wheels, or the source archive where
there is none).

    python benchmarks/install_sizes.py --target linux --out /tmp/sizes/linux
    python benchmarks/install_sizes.py --target macos --out /tmp/sizes/macos
    python benchmarks/install_sizes.py --target linux --swap faiss-cpu=faiss-gpu --out /tmp/sizes/linux-faiss-gpu

Needs ``uv`` (``pip install uv``; ``--uv PATH`` if it is not on PATH). Downloads go to --out
(reused between runs; several GB for Linux, where PyPI's torch is a CUDA build). Other
platforms get the newest versions on PyPI at the time of the run (this machine's pip configuration,
which caps some versions, is not applied there). Figures are download sizes (compressed wheels).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: --target: (uv --python-platform, pip --platform, MACOSX_DEPLOYMENT_TARGET)
TARGETS = {
    "linux": ("x86_64-manylinux_2_28", ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                         "manylinux_2_5_x86_64", "manylinux1_x86_64"], None),
    "macos": ("aarch64-apple-darwin", ["macosx_15_0_arm64", "macosx_15_0_universal2"], "15.0"),
}
CUDA_PREFIXES = ("nvidia_", "nvidia-", "triton-", "cuda_", "cuda-")


def requirements(extras: list[str], swaps: dict[str, str]) -> list[str]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for e in extras:
        reqs += meta["optional-dependencies"][e]
    out = []
    for r in reqs:
        name = re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]
        out.append(r.replace(name, swaps[name], 1) if name in swaps else r)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=TARGETS, required=True)
    p.add_argument("--python-version", default="3.11")
    p.add_argument("--extra", action="append", default=[], help="also the dependencies of this extra (e.g. qt)")
    p.add_argument("--swap", action="append", default=[], help="replace a dependency: old=new (e.g. faiss-cpu=faiss-gpu)")
    p.add_argument("--uv", default=shutil.which("uv") or "uv")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    uv_platform, pip_platform, macos = TARGETS[a.target]
    a.out.mkdir(parents=True, exist_ok=True)
    req_in = a.out / "requirements.in"
    req_in.write_text("\n".join(requirements(a.extra, dict(s.split("=", 1) for s in a.swap))) + "\n")
    host = platform.system() == "Linux" and platform.machine() == "x86_64" and a.target == "linux" \
        and a.python_version == f"{sys.version_info[0]}.{sys.version_info[1]}"
    if host:
        # this machine is the target: pip resolves and downloads as a user's pip would here
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--prefer-binary", "-d", str(a.out), *req_in.read_text().split()]
        print("$ " + " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
        keep = None
    else:
        env = dict(os.environ, PIP_CONFIG_FILE=os.devnull)  # no local version cap (a user's machine has none)
        if macos:
            env["MACOSX_DEPLOYMENT_TARGET"] = macos
        pins = subprocess.run([a.uv, "pip", "compile", str(req_in), "--python-platform", uv_platform, "--python-version",
                               a.python_version, "--no-header", "--no-annotate", "-q"], check=True, capture_output=True,
                              text=True, env=env).stdout.split()
        (a.out / "requirements.txt").write_text("\n".join(pins) + "\n")
        keep = {re.sub(r"[-_.]+", "_", pin.split("==")[0]).lower() for pin in pins}
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--prefer-binary", *[x for p in pip_platform for x in ("--platform", p)],
               "--python-version", a.python_version, "--implementation", "cp", "-d", str(a.out), *pins]
        print(f"$ uv pip compile --python-platform {uv_platform} (Python {a.python_version}): {len(pins)} packages; pip download --no-deps", flush=True)
        subprocess.run(cmd, check=True, env=env)
    wheels = [f for f in a.out.iterdir() if f.name.endswith((".whl", ".tar.gz", ".zip"))
              and (keep is None or re.sub(r"[-_.]+", "_", f.name.split("-")[0]).lower() in keep)]
    wheels.sort(key=lambda f: -f.stat().st_size)
    mb = lambda n: n / 1e6  # noqa: E731
    size = lambda fs: sum(f.stat().st_size for f in fs)  # noqa: E731
    cuda = [f for f in wheels if f.name.lower().startswith(CUDA_PREFIXES)]
    torch_stack = [f for f in wheels if f.name.lower().startswith(("torch-", "torchvision-"))]
    print(f"{len(wheels)} files, {mb(size(wheels)):,.0f} MB to download for {a.target} ({pip_platform[0]}), Python {a.python_version}")
    print(f"  CUDA libraries: {len(cuda)} wheels, {mb(size(cuda)):,.0f} MB; torch + torchvision: {mb(size(torch_stack)):,.0f} MB; "
          f"everything else: {mb(size(wheels) - size(cuda) - size(torch_stack)):,.0f} MB")
    for f in wheels[:12]:
        print(f"  {mb(f.stat().st_size):8,.1f} MB  {f.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
