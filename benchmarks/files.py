"""Case 5: file throughput and peak memory of merge and convert against a plain read + write.

Every run is a fresh subprocess, so its peak RSS (VmHWM, from process start: interpreter and torch
included) is the operation's alone; the sampled peak of anonymous memory (without mapped file
pages) and the RSS after imports are reported with it. Runs of ours and the baseline alternate.

  plain read+write  the safetensors library's `safe_open` (memory-mapped) for each tensor, written
                    with the streaming writer merge and convert use (`SafetensorsWriter`): the I/O floor
  merge             `lycoris_core.merge.merge` of a Musubi LoKr file into a Wan-shaped bf16 base
  convert           the converter (`comfyui-lycoris convert IN OUT --to comfyui`) on a LoHa file of
                    ~1 GB, against a plain read+write of the same file
  extract           `comfyui-lycoris extract BASE TUNED OUT --algorithm lora --rank 16` with TUNED = the
                    merge base with the Musubi LoKr baked in, against a plain read of BASE and read+write
                    of TUNED (the two files extract reads)
  to-lora           `comfyui-lycoris to-lora IN OUT --rank 16 --base BASE` of that LoKr with a DoRA
                    magnitude on every module (so that every base weight is read and the change to it
                    decomposed), against a plain read+write of BASE

The merge target: peak memory < 1.5 × the largest tensor + the adapter file + 300 MB; extract and
to-lora are held to the same bound (their outputs are small); the convert target: ≤ the largest
tensor + 200 MB. Extract and to-lora decompose every layer, so their time has no target: it is
reported against the plain read+write of the same files. Both are checked on the growth of RSS over the
process's RSS after its imports: what the interpreter and torch take (about 220 MB with the CPU
build of torch, 510 MB with a CUDA build) is not the operation's, and would otherwise decide the
outcome. The absolute peak is in `peak_bytes` and the note. MB here is 2^20 bytes.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from . import synthetic
from .harness import MB, Result, WorkerError, run_worker

STRENGTH = 0.8
PLAIN = "plain read+write (safe_open + streamed write)"
PLAIN_PAIR = "plain read of BASE + read+write of TUNED (safe_open + streamed write)"
TOOL_RANK = 16


def _runs(tasks: dict[str, dict], runs: int, folder: str, log) -> dict[str, list[dict]]:
    """Alternate the tasks' subprocesses for `runs` rounds; outputs are deleted after each run."""
    answers: dict[str, list[dict]] = {task: [] for task in tasks}
    names = list(tasks)
    for round_ in range(runs):
        shift = round_ % len(names)
        for task in names[shift:] + names[:shift]:
            params = dict(tasks[task], out=os.path.join(folder, f"out_{task}.safetensors"))
            log(f"  {task} run {round_ + 1}/{runs}")
            answers[task].append(run_worker(task.split(":")[0], params))
            if os.path.exists(params["out"]):
                os.remove(params["out"])
    return answers


def _summary(answers: list[dict]) -> tuple[float, int, int, int]:
    """(median seconds, max peak RSS, max anonymous peak, RSS after imports)."""
    return (statistics.median(a["seconds"] for a in answers), max(a["peak_rss"] for a in answers),
            max(a["peak_anon"] for a in answers), max(a["rss_after_imports"] for a in answers))


def run(base_blocks: int, convert_bytes: int, runs: int, folder: str | None, log,
        dim: int = synthetic.WAN14B_DIM, ffn: int = synthetic.WAN14B_FFN, tool_runs: int | None = None) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="comfyui-lycoris-bench-", dir=folder) as work:
        dtype = torch.bfloat16
        base = os.path.join(work, "wan_base.safetensors")
        log(f"files: writing a {base_blocks}-block Wan-shaped bf16 base")
        layout = synthetic.write_wan_base(base, base_blocks, dtype, dim, ffn)
        adapter = os.path.join(work, "wan_lokr.safetensors")
        adapter_bytes = synthetic.write_adapter(adapter, synthetic.wan_lokr_adapter(base_blocks, 16, dim, ffn),
                                                synthetic.musubi_metadata("lokr", 16))
        base_bytes = os.path.getsize(base)
        largest = max(e.nbytes for e in layout)
        params = {"base_bytes": base_bytes, "blocks": base_blocks, "dim": dim, "ffn": ffn, "dtype": "bf16",
                  "largest_tensor_bytes": largest,
                  "adapter": "musubi lokr r16", "adapter_bytes": adapter_bytes, "strength": STRENGTH}
        log("files: merge vs plain read+write")
        try:
            answers = _runs({"copy": {"src": base}, "merge": {"base": base, "adapter": adapter}}, runs, work, log)
        except WorkerError as e:
            return [Result("files", "merge", params, "lycoris_core.merge.merge", PLAIN, status="error", note=str(e))]
        results += _records("merge", params, answers["merge"], answers["copy"], "lycoris_core.merge.merge",
                            bound=int(1.5 * largest) + adapter_bytes + 300 * MB,
                            bound_text="RSS growth < 1.5×largest tensor + adapter + 300 MB")
        results += _tools(base, adapter, params, largest, tool_runs or runs, work, log, dim, ffn)
        os.remove(base)

        name = "convert musubi→comfyui"
        per_block = sum(2 * 32 * (out + in_) * 4 for _, (out, in_) in synthetic.wan_block_layers(dim, ffn))  # fp32 r32
        blocks = max(1, min(synthetic.WAN14B_BLOCKS, round(convert_bytes / per_block)))
        source = os.path.join(work, "wan_loha.safetensors")
        log(f"files: writing a {blocks}-block LoHa r32 adapter for convert")
        tensors = synthetic.wan_loha_adapter(blocks, 32, dim, ffn)
        largest = max(t.numel() * t.element_size() for t in tensors.values())
        size = synthetic.write_adapter(source, tensors, synthetic.musubi_metadata("loha", 32))
        del tensors
        params = {"adapter": "musubi loha r32 fp32", "adapter_bytes": size, "blocks": blocks,
                  "largest_tensor_bytes": largest, "to": "comfyui"}
        log("files: convert vs plain read+write")
        try:
            answers = _runs({"copy": {"src": source}, "convert": {"src": source}}, runs, work, log)
        except WorkerError as e:
            results.append(Result("files", name, params, "comfyui-lycoris convert", PLAIN, status="error", note=str(e)))
            return results
        results += _records(name, params, answers["convert"], answers["copy"], "comfyui-lycoris convert",
                            bound=largest + 200 * MB, bound_text="RSS growth ≤ largest tensor + 200 MB")
    return results


def run_reading(tiny_tensors: int, key_bytes: int, runs: int, folder: str | None, log) -> list[Result]:
    """Reading must stay linear in the header: `inspect` of a file of many tiny tensors against the
    safetensors library reading every tensor of it, and `read_adapter` of a file whose one module has a
    key of `key_bytes` against the library listing its keys."""
    import contextlib
    import io

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from .. import cli
    from ..lycoris_core import read_adapter
    from .harness import interleaved

    def inspect(path: str) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            if cli.main(["inspect", "--json", path]) != 0:
                raise RuntimeError(f"inspect of {path} failed")

    def keys(path: str) -> None:
        with safe_open(path, framework="pt") as f:
            list(f.keys())

    results = []
    with tempfile.TemporaryDirectory(prefix="comfyui-lycoris-bench-", dir=folder) as work:
        many = os.path.join(work, "many_tiny.safetensors")
        modules = tiny_tensors // 3
        log(f"files: writing {3 * modules} tiny tensors")
        save_file({f"lora_unet_blocks_{i}_self_attn_q.{name}": tensor for i in range(modules) for name, tensor in
                   (("lora_down.weight", torch.zeros(1, 2)), ("lora_up.weight", torch.zeros(2, 1)), ("alpha", torch.ones(())))},
                  many)
        log("files: inspect vs load_file")
        times = interleaved({"ours": lambda: inspect(many), "baseline": lambda: load_file(many)}, runs, lambda: None)
        params = {"tensors": 3 * modules, "file_bytes": os.path.getsize(many)}
        result = Result("reading", f"inspect {3 * modules} tiny tensors", params, "comfyui-lycoris inspect --json",
                        "safetensors.torch.load_file (the library reading every tensor)", seconds=times["ours"].median,
                        baseline_seconds=times["baseline"].median, runs=runs,
                        target="ratio ≤ 1.5; under 10 s at 200000 tensors").finish()
        result.met = result.ratio <= 1.5 and result.seconds < 10 * max(1.0, 3 * modules / 200_000)
        results.append(result)

        long_key = os.path.join(work, "long_key.safetensors")
        stem = "a." * (key_bytes // 2)
        save_file({f"{stem}lora_down.weight": torch.zeros(2, 4), f"{stem}lora_up.weight": torch.zeros(4, 2)}, long_key)
        log(f"files: read_adapter of a {key_bytes}-byte key")
        times = interleaved({"ours": lambda: read_adapter(long_key), "baseline": lambda: keys(long_key)}, runs, lambda: None)
        result = Result("reading", f"read_adapter of a {key_bytes}-byte key", {"key_bytes": len(stem) + 17},
                        "lycoris_core.read_adapter", "safetensors safe_open(...).keys()", seconds=times["ours"].median,
                        baseline_seconds=times["baseline"].median, runs=runs, target="under 1 s").finish()
        result.met = result.seconds < 1.0
        results.append(result)
    return results


def _tools(base: str, adapter: str, merge_params: dict, largest: int, runs: int, work: str, log, dim: int,
           ffn: int) -> list[Result]:
    """extract and to-lora on the merge case's base (module docstring)."""
    from ..lycoris_core.merge import merge

    bound, bound_text = int(1.5 * largest) + 300 * MB, "RSS growth < 1.5×largest tensor + 300 MB (merge's bound)"
    common = {k: merge_params[k] for k in ("base_bytes", "blocks", "dim", "ffn", "dtype", "largest_tensor_bytes")}
    results = []
    tuned = os.path.join(work, "wan_tuned.safetensors")
    log("files: baking the LoKr into the base, as the fine-tune extract takes apart")
    merge(base, tuned, [(adapter, 1.0)], progress=False)
    name, title = f"extract lora r{TOOL_RANK}", f"comfyui-lycoris extract --algorithm lora --rank {TOOL_RANK}"
    params = dict(common, tuned="base + musubi lokr r16", rank=TOOL_RANK)
    log("files: extract vs plain read+write")
    try:
        answers = _runs({"copy_pair": {"src": tuned, "also": base},
                         "extract": {"base": base, "tuned": tuned, "rank": TOOL_RANK}}, runs, work, log)
        results += _records(name, params, answers["extract"], answers["copy_pair"], title, bound, bound_text,
                            time_target=None, plain=PLAIN_PAIR)
    except WorkerError as e:
        results.append(Result("files", name, params, title, PLAIN_PAIR, status="error", note=str(e)))
    os.remove(tuned)

    dora = os.path.join(work, "wan_lokr_dora.safetensors")
    tensors = synthetic.wan_lokr_adapter(merge_params["blocks"], 16, dim, ffn)
    for key in [k for k in tensors if k.endswith(".lokr_w1")]:
        stem = key[: -len(".lokr_w1")]
        out = tensors[key].shape[0] * (tensors[f"{stem}.lokr_w2"] if f"{stem}.lokr_w2" in tensors else tensors[f"{stem}.lokr_w2_a"]).shape[0]
        tensors[f"{stem}.dora_scale"] = torch.full((out, 1), 1.5)  # a magnitude per output row, near the rows' norms
    size = synthetic.write_adapter(dora, tensors, synthetic.musubi_metadata("lokr", 16))
    del tensors
    name, title = f"to-lora r{TOOL_RANK} of a DoRA LoKr", f"comfyui-lycoris to-lora --rank {TOOL_RANK} --base BASE"
    params = dict(common, adapter="musubi lokr r16 + dora_scale", adapter_bytes=size, rank=TOOL_RANK)
    log("files: to-lora vs plain read+write")
    try:
        answers = _runs({"copy": {"src": base}, "to_lora": {"src": dora, "base": base, "rank": TOOL_RANK}}, runs, work, log)
        results += _records(name, params, answers["to_lora"], answers["copy"], title, bound, bound_text, time_target=None)
    except WorkerError as e:
        results.append(Result("files", name, params, title, PLAIN, status="error", note=str(e)))
    os.remove(dora)
    return results


def _records(name, params, ours_answers, plain_answers, ours_title, bound, bound_text, time_target: float | None = 1.5,
             plain: str = PLAIN) -> list[Result]:
    seconds, peak, anon, rss0 = _summary(ours_answers)
    p_seconds, p_peak, p_anon, p_rss0 = _summary(plain_answers)
    timing = Result("files", f"{name} time", params, ours_title, plain, seconds=seconds, baseline_seconds=p_seconds,
                    runs=len(ours_answers), peak_bytes=peak, baseline_peak_bytes=p_peak,
                    target=None if time_target is None else f"ratio ≤ {time_target:g}").finish()
    timing.met = None if time_target is None else timing.ratio <= time_target
    memory = Result("files", f"{name} peak memory", dict(params, bound_bytes=bound), ours_title, plain,
                    seconds=seconds, baseline_seconds=p_seconds, runs=len(ours_answers), peak_bytes=peak,
                    baseline_peak_bytes=p_peak, metric="memory", ratio=peak / p_peak,
                    target=f"{bound_text} = {bound / MB:.0f} MB", met=peak - rss0 <= bound)
    memory.note = (f"peak RSS {peak / MB:.0f} MB ({rss0 / MB:.0f} MB after imports, growth {(peak - rss0) / MB:.0f} MB, "
                   f"anonymous growth {anon / MB:.0f} MB); plain: {p_peak / MB:.0f} MB ({p_rss0 / MB:.0f} MB after "
                   f"imports, anonymous growth {p_anon / MB:.0f} MB); ")
    return [timing, memory]


# ---------------------------------------------------------------------------------------------
# Inside the subprocesses


def _measured(operation) -> dict:
    from .harness import AnonPeak, proc_status

    status = proc_status()
    rss0, anon0 = status.get("VmRSS", 0), status.get("RssAnon", 0)
    with AnonPeak() as anon:
        start = time.perf_counter()
        operation()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss": proc_status().get("VmHWM", 0), "rss_after_imports": rss0,
            "peak_anon": (anon.peak or anon0) - anon0}


def copy_worker(params: dict) -> dict:
    """The baseline: the safetensors library's own reader (not ours, so the baseline does not move
    when the core's reader changes) and the streaming writer merge and convert use. With `also`, every
    tensor of that file is read first (extract's two inputs)."""
    from safetensors import safe_open

    from ..lycoris_core.safetensors_io import SafetensorsWriter, read_header

    def copy():
        if params.get("also"):
            with safe_open(params["also"], framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 (not a dict)
                    handle.get_tensor(key)
        header = read_header(params["src"])
        with safe_open(params["src"], framework="pt", device="cpu") as handle:
            with SafetensorsWriter(params["out"], list(header.tensors.values()), header.metadata, overwrite=True) as writer:
                for entry in header.tensors.values():
                    writer.write(entry.name, handle.get_tensor(entry.name))

    return _measured(copy)


def merge_worker(params: dict) -> dict:
    from ..lycoris_core.merge import merge

    return _measured(lambda: merge(params["base"], params["out"], [(params["adapter"], STRENGTH)], overwrite=True,
                                   progress=False))


def convert_worker(params: dict) -> dict:
    from ..convert import convert_file

    return _measured(lambda: convert_file(params["src"], params["out"], "comfyui", overwrite=True))


def extract_worker(params: dict) -> dict:
    from ..convert.extract import extract_file

    return _measured(lambda: extract_file(params["base"], params["tuned"], params["out"], params.get("algorithm", "lora"),
                                          rank=params.get("rank"), arch="wan", overwrite=True))


def to_lora_worker(params: dict) -> dict:
    from ..convert.to_lora import to_lora_file

    return _measured(lambda: to_lora_file(params["src"], params["out"], rank=params["rank"], base=params["base"],
                                          arch="wan", overwrite=True))
