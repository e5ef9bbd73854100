"""Training options from a TOML file and `--set FIELD=VALUE` assignments: every `TrainingConfig` field by its
name, plus the job's global `batch_size`. Values are checked against the field's type here (TOML values, or
for --set a TOML value such as `1e-4`, `true`, `["a", "b"]`, `{weight_decay = 0.01}`, JSON, or a bare word);
what the values mean is checked by `TrainingConfig.validate`.

    # train.toml
    algorithm = "loha"
    rank = 8
    learning_rate = 2e-4
    max_steps = 2000
    exclude = [".*cross_attn.*"]
    optimizer_args = { weight_decay = 0.01 }
    batch_size = 4
"""

from __future__ import annotations

import dataclasses
import json
import os

from ..errors import AdapterError
from .config import TrainingConfig, split_patterns

JOB_OPTIONS = ("batch_size",)  # what a config file may hold besides TrainingConfig's fields


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(TrainingConfig)}


def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise AdapterError("reading a TOML config needs Python 3.11 or newer, or the tomli package") from None
    return tomllib


def coerce(name: str, value, where: str):
    """`value` as field `name` takes it, or AdapterError naming `where` (the file or the --set)."""
    kind = "int" if name in JOB_OPTIONS else _field_types().get(name)
    if kind is None:
        known = ", ".join([*_field_types(), *JOB_OPTIONS])
        raise AdapterError(f"{where}: unknown training option {name!r} (the options: {known})")

    def bad(what: str) -> AdapterError:
        return AdapterError(f"{where}: {name} takes {what}, not {value!r}")

    if value is None:
        if "None" not in kind:
            raise bad("a value")
        return None
    base = kind.replace(" | None", "")
    if base == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if base.startswith("tuple"):
        if isinstance(value, str):
            return split_patterns(value)
        if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            raise bad("a list of strings")
        return tuple(value)
    if base == "dict":
        if not isinstance(value, dict):
            raise bad("a table, e.g. {weight_decay = 0.01}")
        return dict(value)
    raise bad(f"a {kind}")


def parse_value(text: str):
    """The value of `--set NAME=TEXT`: a TOML value, else JSON, else the text itself (a bare word); empty is None."""
    if text.strip().lower() in ("", "none", "null"):
        return None
    try:
        return _toml().loads(f"value = {text}")["value"]
    except ValueError:  # tomllib.TOMLDecodeError
        pass
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_config_file(path: str | os.PathLike) -> dict:
    """The options in a TOML file, checked by name and type."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = _toml().load(f)
    except OSError as e:
        raise AdapterError(f"{path}: cannot read the config ({e.strerror or e})") from None
    except ValueError as e:
        raise AdapterError(f"{path}: not a TOML file ({e})") from None
    return {name: coerce(name, value, path) for name, value in data.items()}


def job_options(config_file: str | os.PathLike | None = None, assignments: list[str] = ()) -> tuple[TrainingConfig, int | None]:
    """(TrainingConfig, batch size or None) from the defaults, the file, then each `NAME=VALUE` in order."""
    options = read_config_file(config_file) if config_file else {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep or not name.strip():
            raise AdapterError(f"--set {assignment}: expected FIELD=VALUE")
        options[name.strip()] = coerce(name.strip(), parse_value(text), f"--set {assignment}")
    batch_size = options.pop("batch_size", None)
    if batch_size is not None and batch_size < 1:
        raise AdapterError(f"batch_size={batch_size}: must be at least 1")
    return TrainingConfig(**options).validate(), batch_size
