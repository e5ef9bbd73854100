"""The `comfyui-lycoris` command line: a thin argparse front over the core.

User errors (AdapterError, unreadable paths) print one line on stderr and exit 2; nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .lycoris_core.errors import AdapterError


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .lycoris_core import read_adapter
    from .lycoris_core.report import describe, format_report

    adapter = read_adapter(args.file, lokr_full_matrix_alpha=args.lokr_full_matrix_alpha)
    report = describe(adapter, scan_values=not args.no_scan)
    if args.json:
        json.dump(report, sys.stdout, indent=1, sort_keys=False)
        sys.stdout.write("\n")
    else:
        print(format_report(report, max_modules=args.max_modules))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .lycoris_core.merge import merge, parse_adapter_arg

    result = merge(
        args.base,
        args.out,
        [parse_adapter_arg(a) for a in args.adapter],
        architecture=args.arch,
        overwrite=args.overwrite,
        lokr_full_matrix_alpha=args.lokr_full_matrix_alpha,
    )
    print(result.summary())
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_file

    result = convert_file(
        args.input, args.output, args.to, prefix=args.prefix, arch=args.arch, overwrite=args.overwrite, progress=True
    )
    print(result.summary())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarks import suite

    groups = args.only.split(",") if args.only else suite.GROUPS
    unknown = [g for g in groups if g not in suite.GROUPS]
    if unknown:
        raise AdapterError(f"unknown benchmark group {unknown[0]!r} (choose from {', '.join(suite.GROUPS)})")
    report = suite.run(suite.QUICK if args.quick else suite.FULL, groups, args.device, args.json)
    print(suite.markdown(report))
    return 1 if any(case["status"] == "error" for case in report["cases"]) else 0


def _fresh_folder(name: str) -> str:
    """`name`, or `name-2`, `name-3`, ... : the first that does not exist yet (so a rerun never collides)."""
    candidate, n = name, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _cmd_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .demo import run_demo

    try:
        from .convert import convert_file
    except ImportError:  # a checkout without the converter: the demo skips that step
        convert_file = None
    bars: dict[str, tqdm] = {}

    def progress(name, p) -> None:
        bar = bars.get(name) or bars.setdefault(name, tqdm(total=p.total, desc=f"train {name}", unit="step"))
        bar.set_postfix(loss=f"{p.loss:.3g}", refresh=False)
        bar.update(p.step - bar.n)
        if p.step >= p.total:
            bar.close()

    def convert(source: str, output: str, to: str) -> None:
        convert_file(source, output, to)

    try:
        report = run_demo(args.out or _fresh_folder("comfyui-lycoris-demo"), args.steps, progress,
                          convert=convert if convert_file else None)
    finally:
        for bar in bars.values():
            bar.close()
    print(report.format())
    return 0 if report.ok() else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfyui-lycoris",
        description="LoHa / LoKr / LoRA adapters for Musubi Tuner models: inspect, convert, merge, train.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("inspect", help="say what an adapter file is and what is wrong with it")
    p.add_argument("file", help="adapter file (.safetensors; .pt/.ckpt/.bin read weights-only)")
    p.add_argument("--json", action="store_true", help="print the stable JSON report instead of a table")
    p.add_argument("--no-scan", action="store_true", help="skip reading every tensor to count NaN/Inf")
    p.add_argument("--max-modules", type=int, default=40, help="module lines in the table (default 40)")
    p.add_argument(
        "--lokr-full-matrix-alpha",
        action="store_true",
        help="apply alpha/ss_network_dim to full-matrix LoKr modules (files from trainers that did so)",
    )
    p.set_defaults(run=_cmd_inspect)

    p = commands.add_parser("merge", help="bake adapters into a diffusion-model file (streamed, fp8 aware)")
    p.add_argument("base", help="diffusion-model .safetensors (bare keys or model.diffusion_model. prefix)")
    p.add_argument("out", help="output .safetensors (same keys, order, dtypes and metadata as BASE)")
    p.add_argument(
        "--adapter", action="append", required=True, metavar="FILE[:STRENGTH]",
        help="adapter to apply (repeatable), with an optional strength (default 1.0)",
    )
    p.add_argument("--arch", default="auto", help="architecture id (default: detect from the files)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--lokr-full-matrix-alpha", action="store_true", help="see inspect --help")
    p.set_defaults(run=_cmd_merge)

    p = commands.add_parser("convert", help="rewrite an adapter in the Musubi, Diffusers or ComfyUI key layout (exact)")
    p.add_argument("input", help="adapter file (any layout this pack reads)")
    p.add_argument("output", help="output .safetensors")
    p.add_argument(
        "--to", required=True, choices=["musubi", "diffusers", "comfyui"],
        help="musubi: lora_unet_ names; diffusers: <prefix>.<module path> (Musubi's --target other); "
        "comfyui: the names ComfyUI core's LoraLoader loads completely",
    )
    p.add_argument("--prefix", help="key prefix for --to diffusers (default diffusion_model; also transformer)")
    p.add_argument("--arch", help="architecture id (default: detect from the file)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(run=_cmd_convert)

    p = commands.add_parser("bench", help="benchmark patching, bypass, training and file work against baselines")
    p.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes on 2 CPU cores")
    p.add_argument(
        "--json", metavar="FILE", help="also write the results as JSON (schema: pydoc comfyui_lycoris.benchmarks)"
    )
    p.add_argument(
        "--only", metavar="GROUP[,GROUP]", help="run only these of: apply, bypass, training, model_patch, files"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: a GPU when present, full run only)")
    p.set_defaults(run=_cmd_bench)

    p = commands.add_parser("demo", help="train a LoKr and a LoHa on a built-in model, save, convert, merge, verify")
    p.add_argument("--out", help="output folder (default: a new ./comfyui-lycoris-demo[-N]); "
                   "existing outputs are never replaced")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per adapter (default 300)")
    p.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except AdapterError as e:
        print(f"comfyui-lycoris {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"comfyui-lycoris {args.command}: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"comfyui-lycoris {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
