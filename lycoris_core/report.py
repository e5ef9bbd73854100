"""What `inspect` says about a file: a stable JSON-able dict, and the same as a readable table."""

from __future__ import annotations

import math
from collections import Counter

from .adapter_file import AdapterFile
from .algorithms import ALGORITHMS
from .safetensors_io import dtype_name

REPORT_VERSION = 1

# How the stored forms of an algorithm read in text (LoKr's are the only ones so far), and what
# `inspect` adds about their scale.
VARIANT_WORDS = {"full": "full-matrix", "low_rank": "low-rank"}
VARIANT_NOTES = {"full": " (scale 1)"}


# Characters a name or metadata value from a file must not carry raw into a terminal: C0/C1 controls and
# Unicode's line separators (a line break forges a line, ESC sequences drive the terminal), bidirectional
# overrides (text that reads differently from what it is) and lone surrogates (undecodable bytes of a
# path; they cannot be printed).
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})
_ESCAPES.update({c: f"\\u{c:04x}" for c in (0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A),
                                            *range(0xD800, 0xE000))})


def printable(text: str) -> str:
    """`text` safe for a terminal, on one line: control characters and the like as escapes."""
    return text.translate(_ESCAPES)


def json_safe(value):
    """`value` with non-finite floats as the strings 'nan', 'inf', '-inf' (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def _number_key(value: float | int | None) -> str:
    if value is None:
        return "none"
    return f"{value:.6g}"


def describe(adapter: AdapterFile, scan_values: bool = True) -> dict:
    """What `inspect` reports (see README). `scan_values` reads every tensor to count NaN/Inf."""
    modules = list(adapter.modules.values())
    by_algorithm = Counter(m.algorithm for m in modules)
    problems = list(adapter.problems)
    nonfinite = adapter.nonfinite_counts() if scan_values else {}
    for key, count in nonfinite.items():
        problems.append(f"{key}: {count} non-finite values (NaN/Inf)")
    if adapter.unknown_keys:
        problems.append(f"{len(adapter.unknown_keys)} keys belong to no adapter module (listed under unknown_keys)")

    report = {
        "report_version": REPORT_VERSION,
        "file": adapter.path,
        "size_bytes": adapter.size,
        "format": adapter.format,
        "source": adapter.source,
        "scale_rule": adapter.scale_rule,
        "architecture": adapter.architecture,
        "tensor_count": len(adapter.tensors),
        "dtypes": dict(Counter(dtype_name(e.dtype) for e in adapter.tensors.values())),
        "module_count": len(modules),
        "algorithms": dict(by_algorithm),
        "ranks": dict(Counter(_number_key(m.rank) for m in modules)),
        "alphas": dict(Counter(_number_key(m.alpha) for m in modules)),
        "scales": dict(Counter(_number_key(m.scale) for m in modules)),
        "dora_modules": sum(m.has_dora for m in modules),
        "nonfinite_values": sum(nonfinite.values()) if scan_values else None,
        "metadata": dict(adapter.metadata),
        "unknown_keys": list(adapter.unknown_keys),
        "problems": problems,
        "modules": [
            {
                "stem": m.stem,
                "algorithm": m.algorithm,
                "shape": list(m.shape),
                "rank": m.rank,
                "alpha": m.alpha,
                "scale": m.scale,
                "lokr_mode": m.variant,  # the stored form; named for LoKr, its only user so far
                "dora": m.has_dora,
                "dtype": dtype_name(next(iter(m.params.values())).dtype),
            }
            for m in modules
        ],
    }
    for name in by_algorithm:  # per algorithm with several stored forms: {form: modules}, e.g. report["lokr"]
        if ALGORITHMS[name].variants:
            found = Counter(m.variant for m in modules if m.algorithm == name)
            report[name] = {variant: found[variant] for variant in ALGORITHMS[name].variants}
    return report


def _counts(counter: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1])) or "-"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_report(report: dict, max_modules: int = 40) -> str:
    """The readable form: a summary, then one line per module (the first `max_modules`)."""
    lines = [
        f"file          {report['file']} ({_size(report['size_bytes'])}, {report['tensor_count']} tensors)",
        f"format        {report['format']}",
        f"source        {report['source']}",
        f"architecture  {report['architecture'] or 'unknown'}",
        f"modules       {report['module_count']} ({_counts(report['algorithms'])})",
    ]
    for name in report["algorithms"]:
        if name in report:  # an algorithm with several stored forms
            forms = ", ".join(f"{n} {VARIANT_WORDS[v]}{VARIANT_NOTES.get(v, '')}" for v, n in report[name].items())
            lines.append(f"{name:<14}{forms}")
    lines += [
        f"ranks         {_counts(report['ranks'])}",
        f"alphas        {_counts(report['alphas'])}",
        f"scales        {_counts(report['scales'])} ({report['scale_rule']})",
        f"dtypes        {_counts(report['dtypes'])}",
    ]
    if report["dora_modules"]:
        lines.append(f"dora          {report['dora_modules']} modules")
    if report["metadata"]:
        lines.append("metadata")
        for key in sorted(report["metadata"]):
            value = printable(report["metadata"][key])
            lines.append(f"  {key} = {value[:100] + '...' if len(value) > 100 else value}")
    lines.append("problems      " + ("none" if not report["problems"] else ""))
    lines += [f"  - {p}" for p in report["problems"]]
    if report["unknown_keys"]:
        lines.append("unknown keys")
        lines += [f"  {k}" for k in report["unknown_keys"]]

    rows = report["modules"]
    lines.append("")
    header = ("module", "algorithm", "shape", "rank", "alpha", "scale")
    table = [header] + [
        (
            m["stem"],
            m["algorithm"] + (f" ({m['lokr_mode']})" if m["lokr_mode"] else "") + (" +dora" if m["dora"] else ""),
            "x".join(str(d) for d in m["shape"]),
            "-" if m["rank"] is None else str(m["rank"]),
            "-" if m["alpha"] is None else f"{m['alpha']:g}",
            f"{m['scale']:.6g}",
        )
        for m in rows[:max_modules]
    ]
    table = [tuple(printable(c) for c in r) for r in table]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if len(rows) > max_modules:
        lines.append(f"... and {len(rows) - max_modules} more modules (use --json for all)")
    return "\n".join(printable(line) for line in lines)
