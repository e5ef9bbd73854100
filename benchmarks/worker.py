"""Subprocess entry for measurements that need a fresh interpreter (peak memory, ComfyUI imports).

    python -m comfyui_lycoris.benchmarks.worker TASK 'JSON PARAMS'

prints one JSON line (the last line of stdout) with the task's answer. Each task imports only what
it needs, so the RSS after imports is the interpreter's and torch's, nothing of another case.
"""

from __future__ import annotations

import importlib
import json
import sys

TASKS = {  # task -> (module of this package, function)
    "comfy_apply": ("apply", "comfy_worker"),
    "train_step": ("training", "worker"),
    "model_patch": ("model_patch", "worker"),
    "copy": ("files", "copy_worker"),
    "merge": ("files", "merge_worker"),
    "convert": ("files", "convert_worker"),
    "copy_pair": ("files", "copy_worker"),
    "extract": ("files", "extract_worker"),
    "to_lora": ("files", "to_lora_worker"),
}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in TASKS:
        print(f"usage: worker {{{','.join(TASKS)}}} JSON", file=sys.stderr)
        return 2
    module, function = TASKS[argv[1]]
    answer = getattr(importlib.import_module(f".{module}", __package__), function)(json.loads(argv[2]))
    sys.stdout.write("\n" + json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
