"""`comfyui-lycoris bench [--quick] [--json FILE] [--only GROUP,...] [--device cpu|cuda|auto]`.

Where the pack stands against its peers and against the hardware, every case measured against a
baseline in the same run (interleaved medians). Groups: `apply` (W += s·ΔW), `bypass` (adapter in
the forward pass), `training` (one LoKr step), `model_patch` (a Wan-14B-shaped LoKr onto a matching
base), `files` (merge and convert against a plain read + write, with peak RSS), `reading`, and
`train_scaling` (the `train` command at 1 and 2 processes; Train LyCORIS against ComfyUI's Train LoRA). See README.md here.

JSON schema (`schema_version` 1; fields are only ever added, a change of meaning bumps the version):

    {
      "schema": "comfyui-lycoris-bench", "schema_version": 1,
      "mode": "quick" | "full",
      "created": "2025-01-31T12:00:00+0000", "wall_seconds": float,
      "machine": {"cpu": str, "cores": int, "usable_cores": int, "torch_threads": int,
                  "memory_bytes": int | null, "torch": str, "python": str, "platform": str,
                  "device": "cpu" | "cuda[:N]", "device_name": str, "lycoris_lora": str | null,
                  "load_average": [1 min, 5 min, 15 min] | null},   # at the end of the run
      "notes": [str, ...],                     # what this mode ran smaller, how to read ratios
      "cases": [{
        "group": "apply" | "bypass" | "training" | "model_patch" | "files",
        "name": str,                           # unique within a report, stable between runs
        "params": {...},                       # sizes, dtypes, ranks, tokens, blocks, bytes
        "ours": str, "baseline": str | null,   # what was measured on each side
        "metric": "time" | "memory",           # what `ratio` compares
        "seconds": float | null,               # median of ours
        "baseline_seconds": float | null,      # median of the baseline, same run
        "ratio": float | null,                 # time: seconds / baseline_seconds; memory: peak / baseline peak
        "runs": int,                           # timed runs of ours (after one warm-up where noted)
        "peak_bytes": int | null,              # ours' peak memory where measured (see the group's module)
        "baseline_peak_bytes": int | null,
        "target": str | null,                  # the issue's target for this comparison, in words
        "met": bool | null,                    # null: no target, or not measured
        "status": "ok" | "skipped" | "not available" | "error",
        "note": str                            # why skipped / what else was seen
      }, ...]
    }
"""
