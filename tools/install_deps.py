"""Install the requirements that are missing from this interpreter (pip, one call), and nothing else.

Requirements already satisfied are skipped, so an interpreter with everything preinstalled and no package
registry (the GPU machine: Python 3.12, torch 2.11.0+cu130, setuptools 81, pytest, xdist, ...) passes without
touching the network; a fresh venv gets everything, torch pinned to the CPU wheel.

    python tools/install_deps.py [requirements-dev.txt] [--any-torch] [--check]

--any-torch  the interpreter's own torch is kept, whatever its version (``make ... PYTHON=python3`` passes it:
             a CUDA build of torch on a GPU machine must not be replaced by the CPU wheel the venv pins)
--check      only report what is missing (exit 1 if anything is), install nothing
"""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata

try:
    from packaging.requirements import Requirement
except ImportError:  # a fresh venv has no `packaging`; pip vendors it
    from pip._vendor.packaging.requirements import Requirement


def missing(lines: list[str], any_torch: bool = False) -> list[str]:
    """Requirement lines not satisfied here; with ``any_torch`` an installed torch of any version counts."""
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue  # not meant for this interpreter / platform
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(line)
            continue
        if any_torch and req.name.lower() == "torch":
            continue
        # A local build tag (2.13.0+cpu, 2.11.0+cu130) satisfies the pin.
        if req.specifier and not req.specifier.contains(version.split("+")[0], prereleases=True):
            out.append(line)
    return out


def main(argv: list[str]) -> int:
    flags = {a for a in argv if a.startswith("--")}
    unknown = flags - {"--any-torch", "--check"}
    if unknown:
        print(f"install_deps: unknown option(s) {sorted(unknown)}; see the docstring", file=sys.stderr)
        return 2
    paths = [a for a in argv if not a.startswith("--")]
    path = paths[0] if paths else "requirements-dev.txt"
    try:
        with open(path) as f:
            todo = missing(f.read().splitlines(), "--any-torch" in flags)
    except OSError as exc:
        print(f"install_deps: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if not todo:
        print("dependencies: all present")
        return 0
    if "--check" in flags:
        print("missing:", " ".join(todo))
        return 1
    print("installing:", " ".join(todo))
    rc = subprocess.call([sys.executable, "-m", "pip", "install", "-q", *todo])
    if rc != 0:
        print(f"install_deps: pip could not install {' '.join(todo)} (exit {rc}). Without a package registry, "
              "install them another way (e.g. wheels carried in and `pip install --no-index`), or use an "
              "interpreter that has them (`make ... PYTHON=...`).", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
