"""The `comfyui-lycoris` command line: a thin argparse front over the core.

User errors (AdapterError, unreadable paths) print one line on stderr and exit 2; nothing else.
SIGTERM (kill, timeout, docker stop) stops a command like Ctrl-C does: outputs in progress are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading

from . import __version__
from .lycoris_core.architectures import SUPPORTED
from .lycoris_core.errors import AdapterError
from .lycoris_core.report import json_safe, printable


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .lycoris_core import read_adapter
    from .lycoris_core.report import describe, format_report

    adapter = read_adapter(args.file, lokr_full_matrix_alpha=args.lokr_full_matrix_alpha)
    report = describe(adapter, scan_values=not args.no_scan)
    if args.json:
        try:
            text = json.dumps(report, allow_nan=False)
        except ValueError:  # a NaN/Inf alpha (stored where the scale ignores it): JSON has no such number
            text = json.dumps(json_safe(report), allow_nan=False)
        sys.stdout.write(text + "\n")
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
    print(printable_lines(result.summary()))
    return 0


def printable_lines(text: str) -> str:
    return "\n".join(printable(line) for line in text.split("\n"))


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_file

    result = convert_file(
        args.input, args.output, args.to, prefix=args.prefix, arch=args.arch, overwrite=args.overwrite, progress=True
    )
    print(printable_lines(result.summary()))
    return 0


def _cmd_low_rank(args: argparse.Namespace) -> int:
    from .convert.to_lora import resize_file, to_lora_file

    options = dict(rank=args.rank, max_error=args.max_error, to=args.to, prefix=args.prefix, arch=args.arch, base=args.base,
                   dtype=args.dtype, overwrite=args.overwrite, progress=True)
    if args.command == "to-lora":
        result = to_lora_file(args.input, args.output, lokr_full_matrix_alpha=args.lokr_full_matrix_alpha, **options)
    else:
        result = resize_file(args.input, args.output, **options)
    print(printable_lines(result.summary(max_modules=args.max_modules)))
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from .convert.extract import extract_file

    result = extract_file(
        args.base, args.tuned, args.out, args.algorithm, rank=args.rank, max_error=args.max_error, factor=args.factor,
        loha_sweeps=args.loha_sweeps, to=args.to, prefix=args.prefix, arch=args.arch, dtype=args.dtype, overwrite=args.overwrite, progress=True,
    )
    print(printable_lines(result.summary(max_modules=args.max_modules)))
    return 0


def _cmd_ema(args: argparse.Namespace) -> int:
    from .convert.ema import ema_file

    result = ema_file(
        args.checkpoints, args.out, beta=args.beta, beta2=args.beta2, sigma_rel=args.power_ema, rank=args.rank,
        max_error=args.max_error, exact=args.exact, to=args.to, prefix=args.prefix, arch=args.arch, dtype=args.dtype,
        overwrite=args.overwrite, progress=True,
    )
    print(printable_lines(result.summary(max_modules=args.max_modules)))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train_job import TrainJob, run_train

    job = TrainJob(
        model=args.model, dataset=args.dataset, out=args.out, config=args.config, assignments=args.set or [],
        batch_size=args.batch_size, comfyui=args.comfyui, device=args.device, weight_dtype=args.weight_dtype,
        checkpoint_dir=args.checkpoint_dir, resume=args.resume, progress_file=args.progress_file, overwrite=args.overwrite,
        quiet=args.quiet,
    )
    return run_train(job)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _error_bound(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, not {text}")
    return value


def _low_rank_options(p: argparse.ArgumentParser, arch_ids: list[str]) -> None:
    """The options to-lora and resize share."""
    p.add_argument("input", help="adapter file (any layout this pack reads)")
    p.add_argument("output", help="output .safetensors")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=_at_least_one, help="rank of every module (at most its own: a smaller module keeps all of it)")
    size.add_argument(
        "--max-error", type=_error_bound, metavar="E",
        help="per module, the smallest rank whose relative error ||dW - dW_r||_F / ||dW||_F is at most E (0: exact)",
    )
    p.add_argument(
        "--to", choices=["musubi", "diffusers", "comfyui"],
        help="key layout, as convert writes it (default: the input's layout if it is one of these, else comfyui)",
    )
    p.add_argument("--prefix", help="key prefix for --to diffusers (default diffusion_model; also transformer)")
    p.add_argument("--arch", choices=arch_ids, help="architecture (default: detect from the file)")
    p.add_argument("--base", metavar="FILE", help="diffusion-model .safetensors, needed for DoRA modules (their change to it is written)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="dtype of the LoRA tensors (default: each module's own)")
    p.add_argument("--max-modules", type=int, default=40, help="module lines in the table (default 40)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(run=_cmd_low_rank)


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


def _command(commands, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help, description=description)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfyui-lycoris",
        description="LoHa / LoKr / LoRA adapters for Musubi Tuner models: inspect, convert, merge, train.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    arch_ids = [arch.id for arch in SUPPORTED]

    p = _command(commands, "inspect", "say what an adapter file is and what is wrong with it",
                 "Read an adapter file (nothing is changed) and report its layout, the tool and naming that wrote "
                 "it, the architecture, every module's algorithm, rank, alpha and scale, and its problems: "
                 "NaN/Inf values, keys that belong to no module. --json prints the same as JSON.")
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

    p = _command(commands, "merge", "bake adapters into a diffusion-model file (streamed, fp8 aware)",
                 "Write OUT = BASE with every --adapter applied at its strength (W + strength·scale·ΔW), tensor by "
                 "tensor: same keys, order, dtypes and metadata as BASE, fp8 weights requantized with their scale. "
                 "Every adapter is checked against BASE before anything is written.")
    p.add_argument("base", help="diffusion-model .safetensors (bare keys or model.diffusion_model. prefix)")
    p.add_argument("out", help="output .safetensors (same keys, order, dtypes and metadata as BASE)")
    p.add_argument(
        "--adapter", action="append", required=True, metavar="FILE[:STRENGTH[:BLOCKS]]",
        help="adapter to apply (repeatable), with an optional strength (default 1.0) and block weights (a preset, "
        "a comma-separated vector with one number per block, or pattern=value entries; see README)",
    )
    p.add_argument("--arch", default="auto", choices=["auto", *arch_ids], help="architecture (default: detect from the files)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--lokr-full-matrix-alpha", action="store_true", help="see inspect --help")
    p.set_defaults(run=_cmd_merge)

    p = _command(commands, "convert", "rewrite an adapter in the Musubi, Diffusers or ComfyUI key layout (exact)",
                 "Rename, split or fuse an adapter's modules into another key layout without changing what it does: "
                 "every module's ΔW and scale stay exactly the same. Modules the target layout cannot hold exactly "
                 "are refused, with the reason, and nothing is written.")
    p.add_argument("input", help="adapter file (any layout this pack reads)")
    p.add_argument("output", help="output .safetensors")
    p.add_argument(
        "--to", required=True, choices=["musubi", "diffusers", "comfyui"],
        help="musubi: lora_unet_ names; diffusers: <prefix>.<module path> (Musubi's --target other); "
        "comfyui: the names ComfyUI core's LoraLoader loads completely",
    )
    p.add_argument("--prefix", help="key prefix for --to diffusers (default diffusion_model; also transformer)")
    p.add_argument("--arch", choices=arch_ids, help="architecture (default: detect from the file)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(run=_cmd_convert)

    p = _command(commands, "to-lora", "turn LoHa / LoKr / full differences into a plain LoRA (truncated SVD)",
                 "Write every module as a plain LoRA: the best approximation of its scaled weight difference at a fixed "
                 "--rank, or at the smallest rank within a relative Frobenius error (--max-error), from a truncated SVD that "
                 "never builds a LoHa's or LoKr's full difference. Prints every module's rank and error. Written in the "
                 "musubi, diffusers or comfyui layout exactly as convert writes it, with alpha = rank (scale 1). DoRA "
                 "modules need --base; 1-D differences (norms) are kept as they are.")
    _low_rank_options(p, arch_ids)
    p.add_argument("--lokr-full-matrix-alpha", action="store_true", help="see inspect --help")

    p = _command(commands, "resize", "change the rank of a LoRA (truncated SVD)",
                 "Write a LoRA file at another rank: every module at a fixed --rank, or at the smallest rank within a "
                 "relative Frobenius error (--max-error), the best approximation of that rank (truncated SVD of up·down). "
                 "Prints every module's rank and error. A file with LoHa / LoKr modules is refused: use to-lora.")
    _low_rank_options(p, arch_ids)

    p = _command(commands, "extract", "make an adapter from the difference of two diffusion-model files",
                 "Write the LoRA, LoHa or LoKr that takes BASE to TUNED, on the layers Musubi Tuner trains for the "
                 "architecture and under Musubi's names, read one weight at a time (fp8 dequantized with its scale). LoRA: "
                 "truncated SVD (randomized for full-size layers, its error measured); LoHa: the same SVD written as LoHa, "
                 "refined by alternating least squares; LoKr: the nearest Kronecker product (w2 at a lower rank with --rank "
                 "or --max-error). Layers that did not change are skipped and counted. Prints every module's rank and "
                 "relative error.")
    p.add_argument("base", help="diffusion-model .safetensors before (bare keys or model.diffusion_model. prefix)")
    p.add_argument("tuned", help="the same model after fine-tuning (same keys and shapes)")
    p.add_argument("out", help="output .safetensors")
    p.add_argument("--algorithm", required=True, choices=["lora", "loha", "lokr"], help="what to write")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--rank", type=_at_least_one,
                      help="rank of every module (LoKr: of w2, kept full where Musubi keeps it full); needed for LoRA and "
                      "LoHa unless --max-error is given")
    size.add_argument("--max-error", type=_error_bound, metavar="E",
                      help="per module, the smallest rank whose relative error ||dW - fitted||_F / ||dW||_F is at most E")
    p.add_argument("--factor", type=int, default=-1,
                   help="LoKr: split of the dimensions, Musubi's network_args factor (default -1: as balanced as possible)")
    p.add_argument("--loha-sweeps", type=int, metavar="N",
                   help="LoHa: at most N sweeps of alternating least squares after the SVD start (default 20; 0: the SVD "
                   "written as LoHa)")
    p.add_argument("--to", default="musubi", choices=["musubi", "diffusers", "comfyui"],
                   help="key layout, as convert writes it (default musubi)")
    p.add_argument("--prefix", help="key prefix for --to diffusers (default diffusion_model; also transformer)")
    p.add_argument("--arch", choices=arch_ids, help="architecture (default: detect from BASE's weight names)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the written tensors (default float32)")
    p.add_argument("--max-modules", type=int, default=40, help="module lines in the table (default 40)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=_cmd_extract)

    p = _command(commands, "ema", "post-hoc EMA of adapter checkpoints, averaged over their weight differences",
                 "Average adapter checkpoints (oldest first) with Musubi's post-hoc EMA weighting (a fixed --beta, "
                 "optionally moving to --beta2, or the power-function EMA of --power-ema SIGMA_REL), taken over each "
                 "module's scale·dW rather than over its factors. Written as a LoRA (--rank or --max-error) or exactly as full "
                 "differences (--exact; comfyui layout by default, as the musubi layout holds none). Prints every module's "
                 "error and the error averaging the factors (what Musubi's lora_post_hoc_ema.py does) would have.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="adapter files, oldest first (same modules and shapes)")
    p.add_argument("out", help="output .safetensors")
    schedule = p.add_mutually_exclusive_group(required=True)
    schedule.add_argument("--beta", type=float, help="decay of the running average at each checkpoint (Musubi's default 0.95)")
    schedule.add_argument("--power-ema", type=float, metavar="SIGMA_REL",
                          help="power-function EMA of this relative width (above 0, at most 0.2887)")
    p.add_argument("--beta2", type=float, help="with --beta: the decay moves linearly from beta to beta2 over the checkpoints")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=_at_least_one, help="write a LoRA of this rank (at most each module's own)")
    size.add_argument("--max-error", type=_error_bound, metavar="E",
                      help="write a LoRA, per module of the smallest rank within relative error E")
    size.add_argument("--exact", action="store_true", help="write the averages exactly, as full differences (diff)")
    p.add_argument("--to", choices=["musubi", "diffusers", "comfyui"],
                   help="key layout (default: the first checkpoint's; comfyui for --exact on a musubi-layout input)")
    p.add_argument("--prefix", help="key prefix for --to diffusers (default diffusion_model; also transformer)")
    p.add_argument("--arch", choices=arch_ids, help="architecture (default: detect from the files)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="dtype of the written tensors (default: each module's own)")
    p.add_argument("--max-modules", type=int, default=40, help="module lines in the table (default 40)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=_cmd_ema)

    p = _command(commands, "train", "train a LoHa / LoKr on a dataset folder, in one process or several (torchrun)",
                 "Train a LoHa or LoKr (Musubi Tuner's layers, names and math) on a dataset folder written by Save LyCORIS "
                 "Dataset, for a diffusion-model file loaded by ComfyUI (used as a library: --comfyui or COMFYUI_PATH), and "
                 "write it as the Musubi file Musubi Tuner would. Options are TrainingConfig's fields, from --config and "
                 "--set. Under torchrun --nproc_per_node N the same command trains data-parallel (DDP: NCCL on GPUs, gloo "
                 "on the CPU), each process taking its share of every batch; rank 0 writes the files. Checkpoints resume "
                 "on any number of processes. SIGINT/SIGTERM stop after the current step, with a checkpoint.")
    p.add_argument("--model", required=True, metavar="FILE", help="diffusion-model .safetensors (what Load Diffusion Model loads)")
    p.add_argument("--dataset", required=True, metavar="DIR", help="dataset folder (Save LyCORIS Dataset; pickle is refused)")
    p.add_argument("--out", required=True, metavar="FILE", help="the trained adapter (.safetensors, Musubi layout)")
    p.add_argument("--config", metavar="CONFIG.toml", help="training options: TrainingConfig fields by name, and batch_size")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="one training option (repeatable; after --config), e.g. --set rank=8 --set learning_rate=2e-4 "
                   "--set 'exclude=[\".*cross_attn.*\"]'")
    p.add_argument("--batch-size", type=_at_least_one, metavar="N", help="samples per step over all processes (default 1)")
    p.add_argument("--comfyui", metavar="PATH", help="the ComfyUI folder whose runtime loads the model (default: COMFYUI_PATH)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: a GPU when there is one (under torchrun: GPU LOCAL_RANK each), else the CPU")
    p.add_argument("--weight-dtype", default="default", choices=["default", "fp8_e4m3fn", "fp8_e5m2", "bfloat16", "float16", "float32"],
                   help="the base model's weights, as Load Diffusion Model's weight_dtype (default: ComfyUI's choice)")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="where checkpoints go (default: OUT without .safetensors + _checkpoints)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from a checkpoint (default: the newest in the checkpoint folder)")
    p.add_argument("--progress-file", metavar="FILE", help="append progress as JSON lines (for programs; see pydoc comfyui_lycoris.train_job)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_train)

    p = _command(commands, "bench", "benchmark patching, bypass, training and file work against baselines",
                 "Time and measure memory of each case against a baseline run in the same process (ratios, not "
                 "absolute numbers) and print a Markdown table.")
    p.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes on 2 CPU cores")
    p.add_argument(
        "--json", metavar="FILE", help="also write the results as JSON (schema: pydoc comfyui_lycoris.benchmarks)"
    )
    p.add_argument(
        "--only", metavar="GROUP[,GROUP]", help="run only these of: apply, bypass, training, model_patch, files, reading, train_scaling"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: a GPU when present, full run only)")
    p.set_defaults(run=_cmd_bench)

    p = _command(commands, "demo", "train a LoKr and a LoHa on a built-in model, save, convert, merge, verify",
                 "The whole job end to end on a small built-in model, on this machine's CPU: train a LoKr and a LoHa, "
                 "save them, inspect, convert and merge them, and check every result against the trained model.")
    p.add_argument("--out", help="output folder (default: a new ./comfyui-lycoris-demo[-N]); "
                   "existing outputs are never replaced")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per adapter (default 300)")
    p.set_defaults(run=_cmd_demo)
    return parser


MESSAGE_CHARS = 2000  # a hostile key can be megabytes long; an error line stays readable


def _message(text: str) -> str:
    text = printable(text)
    return text if len(text) <= MESSAGE_CHARS else f"{text[:MESSAGE_CHARS]}... ({len(text) - MESSAGE_CHARS} more characters)"


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that every cleanup on the way out runs."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_unwinds():
    """While a command runs, SIGTERM unwinds the stack (outputs in progress are removed) instead of
    killing the process where it stands, which would leave a temporary file behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"comfyui-lycoris {args.command}"
    try:
        with _sigterm_unwinds():
            return args.run(args)
    except AdapterError as e:
        print(f"{name}: error: {_message(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{os.fsdecode(e.filename)}: " if e.filename else ""
        print(f"{name}: error: {_message(where + str(e.strerror or e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{name}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
