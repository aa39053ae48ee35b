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
def _bank_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", "-C", type=int, help="number of classes C (>= 2)")
    p.add_argument("--dim", "-d", type=int, help="dimension d (>= 1)")
    p.add_argument("--kind", choices=("simplex", "ebv", "sparse"), default="ebv",
                   help="simplex ETF (C <= d+1), EBV (minimal max |cos|), or FedLoGe sparse ETF (default ebv)")
    p.add_argument("--method", choices=("auto", "optimize", "kerdock"), default="auto", help="EBV method")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (ebv optimize / sparse)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsity", type=float, default=0.6, help="fraction of exact zeros for --kind sparse")
    p.add_argument("--device", default=None, help="torch device to generate on (default cpu)")
    p.add_argument("-o", "--output", help="write the bank to this .safetensors file")
    p.add_argument("--inspect", metavar="PATH", help="print the stored metadata and fresh stats of a saved bank")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _print_stats(stats: dict, as_json: bool, extra: dict) -> None:
    if as_json:
        print(json.dumps({**extra, "stats": stats}, indent=2, default=str))
        return
    for k, v in extra.items():
        print(f"{k}: {v}")
    ratio = stats["max_abs_cos"] / stats["welch_bound"] if stats["welch_bound"] > 0 else float("nan")
    print(f"max|cos| {stats['max_abs_cos']:.6f}  ({ratio:.4f} x Welch {stats['welch_bound']:.6f})")
    print(f"mean|cos| {stats['mean_abs_cos']:.6f}  p99.9|cos| {stats['p999_abs_cos']:.6f}  "
          f"max norm error {stats['max_norm_error']:.3g}")


@command("bank", "generate a classifier bank (simplex / EBV / sparse ETF), print its stats, save it; "
         "or --inspect a saved one", arguments=_bank_arguments)
def cmd_bank(args: argparse.Namespace) -> int:
    import os
    import time

    from etfkern import banks

    if args.inspect:
        if not os.path.isfile(args.inspect):
            raise UsageError(f"--inspect: no such file {args.inspect!r}")
        try:
            bank, meta = banks.load_bank(args.inspect, device=args.device)
            stats = banks.bank_stats(bank)
        except ValueError as exc:
            raise UsageError(f"--inspect {args.inspect!r}: {exc}") from None
        _print_stats(stats, args.json, {"path": args.inspect, "shape": list(bank.shape), "dtype": str(bank.dtype),
                                        "metadata": {k: v for k, v in meta.items() if k != "stats"}})
        return EXIT_OK
    if args.classes is None or args.dim is None:
        raise UsageError("--classes and --dim are required (or --inspect PATH)")
    if args.output and os.path.dirname(os.path.abspath(args.output)) and \
            not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise UsageError(f"-o: directory of {args.output!r} does not exist")
    t0 = time.perf_counter()
    try:
        if args.kind == "simplex":
            bank = banks.simplex_etf(args.classes, args.dim, seed=args.seed, device=args.device)
            meta = {"kind": "simplex", "seed": args.seed}
        elif args.kind == "sparse":
            kw = {} if args.steps is None else {"steps": args.steps}
            bank = banks.sparse_etf(args.classes, args.dim, sparsity=args.sparsity, seed=args.seed,
                                    device=args.device, **kw)
            meta = {"kind": "sparse", "seed": args.seed, "sparsity": args.sparsity}
        else:
            kw = {} if args.steps is None else {"steps": args.steps}
            bank = banks.ebv_bank(args.classes, args.dim, seed=args.seed, method=args.method, device=args.device,
                                  **kw)
            meta = {"kind": "ebv", "seed": args.seed, "method": args.method}
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    seconds = time.perf_counter() - t0
    stats = banks.bank_stats(bank)
    if args.output:
        banks.save_bank(args.output, bank, stats=stats, **meta)
    _print_stats(stats, args.json, {"kind": meta["kind"], "shape": list(bank.shape), "seconds": round(seconds, 3),
                                    **({"saved": args.output} if args.output else {})})
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
