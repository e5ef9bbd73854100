"""Case 5: file throughput and peak memory of merge and convert against a plain read + write.

Every run is a fresh subprocess, so its peak RSS (VmHWM, from process start: interpreter and torch
included) is the operation's alone; the sampled peak of anonymous memory (without mapped file
pages) and the RSS after imports are reported with it. Runs of ours and the baseline alternate.

  plain read+write  the safetensors library's `safe_open` (memory-mapped) for each tensor, written
                    with the streaming writer merge and convert use (`SafetensorsWriter`): the I/O floor
  merge             `lycoris_core.merge.merge` of a Musubi LoKr file into a Wan-shaped bf16 base
  convert           the converter (`comfyui-lycoris convert IN OUT --to comfyui`) on a LoHa file of
                    ~1 GB, against a plain read+write of the same file

The merge target: peak memory < 1.5 × the largest tensor + the adapter file + 300 MB; the
convert target: ≤ the largest tensor + 200 MB. Both are checked on the growth of RSS over the
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
        dim: int = synthetic.WAN14B_DIM, ffn: int = synthetic.WAN14B_FFN) -> list[Result]:
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


def _records(name, params, ours_answers, plain_answers, ours_title, bound, bound_text) -> list[Result]:
    seconds, peak, anon, rss0 = _summary(ours_answers)
    p_seconds, p_peak, p_anon, p_rss0 = _summary(plain_answers)
    timing = Result("files", f"{name} time", params, ours_title, PLAIN, seconds=seconds, baseline_seconds=p_seconds,
                    runs=len(ours_answers), peak_bytes=peak, baseline_peak_bytes=p_peak,
                    target="ratio ≤ 1.5").finish()
    timing.met = timing.ratio <= 1.5
    memory = Result("files", f"{name} peak memory", dict(params, bound_bytes=bound), ours_title, PLAIN,
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
    when the core's reader changes) and the streaming writer merge and convert use."""
    from safetensors import safe_open

    from ..lycoris_core.safetensors_io import SafetensorsWriter, read_header

    def copy():
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
