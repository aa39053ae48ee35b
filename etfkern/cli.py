"""The ``etfkern`` command line (``python -m etfkern ...``).

Subcommands register themselves in :data:`COMMANDS`: each adds a parser and a function returning an exit code
(0 ok, 1 the work failed, 2 bad arguments or missing files).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Callable

import torch

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str,  # noqa: A002 - argparse's word
            arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Decorator: register ``run(args) -> int`` as subcommand ``name``; ``arguments(parser)`` adds its flags."""

    def wrap(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, arguments or (lambda p: None), run)
        return run

    return wrap


class UsageError(Exception):
    """Bad argument or missing file: printed without a traceback, exit code 2."""


# ----------------------------------------------------------------------------------------------------------
def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


@command("info", "versions, build, and which backends can run here (and why the others cannot)",
         arguments=_info_arguments)
def cmd_info(args: argparse.Namespace) -> int:
    import etfkern
    from etfkern import _backend

    info = etfkern.build_info()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    backends = {d: _backend.availability(d) for d in devices}
    report = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "build": info,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "requested_backend": _backend.requested(),
        "backends": backends,
    }
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return EXIT_OK
    print(f"etfkern {info['etfkern']}  torch {info['torch']}  python {report['python']}")
    print(f"triton: {info.get('triton') or 'missing (' + info.get('triton_error', '?') + ')'}")
    if info["compiled"]:
        print(f"compiled library: yes  compiler={info['compiler']}  openmp={info['openmp']} "
              f"(threads {info['openmp_max_threads']})  cuda={info['cuda']} {info['cuda_archs']}")
    else:
        print(f"compiled library: NO ({info['compiled_error']}) - torch fallbacks in use")
    print(f"GPU: {report['cuda_device'] or 'none'}   ETFKERN_BACKEND={report['requested_backend']}")
    for device, table in backends.items():
        print(f"backends for {device} tensors:")
        for name, why in table.items():
            print(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="etfkern", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args._run(args)
    except UsageError as exc:
        print(f"etfkern {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
