"""Install the requirements that are missing from this interpreter (pip, one call).

Requirements already satisfied are skipped, so an interpreter with torch preinstalled and no package
registry (the GPU machine) passes without network; a fresh venv gets everything, torch pinned to the CPU wheel.
``make ... PYTHON=python3`` passes ``--any-torch``: the interpreter's own torch is kept, whatever its version.
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
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(line)
            continue
        if any_torch and req.name == "torch":
            continue
        # A local build tag (2.13.0+cpu, +cu128) satisfies the pin.
        if req.specifier and not req.specifier.contains(version.split("+")[0], prereleases=True):
            out.append(line)
    return out


def main(path: str, any_torch: bool) -> int:
    with open(path) as f:
        todo = missing(f.read().splitlines(), any_torch)
    if not todo:
        print("dependencies: all present")
        return 0
    print("installing:", " ".join(todo))
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", *todo])


if __name__ == "__main__":
    # --any-torch: the interpreter's own torch (e.g. a CUDA build on the GPU machine) is kept whatever its version.
    args = [a for a in sys.argv[1:] if a != "--any-torch"]
    sys.exit(main(args[0] if args else "requirements-dev.txt", "--any-torch" in sys.argv[1:]))
