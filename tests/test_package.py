"""The package imports without ComfyUI, the way pip installs it and the way ComfyUI loads a folder;
only nodes/ imports ComfyUI, and nothing in the package touches sys.path or imports itself by name."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Top-level module names a ComfyUI process provides (its root and comfy/ are on sys.path there).
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "comfy_config", "folder_paths", "server",
                   "nodes", "execution", "node_helpers", "latent_preview", "comfyui_version"}
# What ships (pyproject's packages): the root modules and these folders. Benchmarks and tests may
# import ComfyUI to compare with it.
PACKAGE_DIRS = ("lycoris_core", "convert", "nodes")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_imports_without_comfyui_as_installed(tmp_path):
    result = run_python(f"""
        import inspect, sys
        import comfyui_lycoris
        assert inspect.iscoroutinefunction(comfyui_lycoris.comfy_entrypoint)
        from comfyui_lycoris.lycoris_core import read_adapter, bypass, loading  # the core the nodes use
        comfy = sorted(m for m in sys.modules if m.split(".")[0] in {COMFYUI_MODULES!r})
        assert not comfy, comfy
        print("ok")
    """, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_imports_without_comfyui_as_comfyui_loads_a_folder(tmp_path):
    """ComfyUI: a module from <folder>/__init__.py under a path-like name, the folder not on sys.path."""
    result = run_python(f"""
        import importlib.util, sys
        folder = {str(REPO)!r}
        assert folder not in sys.path
        name = folder.replace(".", "_x_")
        spec = importlib.util.spec_from_file_location(name, folder + "/__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        core = importlib.import_module(name + ".lycoris_core.loading")
        assert core.__file__.startswith(folder)
        print("ok")
    """, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def package_files() -> list[Path]:
    files = list(REPO.glob("*.py"))
    for folder in PACKAGE_DIRS:
        files += (REPO / folder).rglob("*.py")
    return [p for p in files if "__pycache__" not in p.parts]


# The one exception to "only nodes/ imports ComfyUI": the `train` command's host, which runs outside ComfyUI,
# makes ComfyUI's own modules importable from --comfyui PATH and sets its device before model management
# loads; everything that then uses ComfyUI is in nodes/.
COMFYUI_HOSTS = {Path("train_job.py")}


def may_import_comfyui(rel: Path) -> bool:
    return rel.parts[0] == "nodes" or rel in COMFYUI_HOSTS


def test_only_nodes_imports_comfyui_and_imports_are_relative():
    problems, files = [], package_files()
    assert any(p.relative_to(REPO).parts[0] == "nodes" for p in files) and (REPO / "__init__.py") in files
    for path in files:
        rel = path.relative_to(REPO)
        source = path.read_text()
        if "sys.path" in source:
            problems.append(f"{rel}: touches sys.path")
        for node in ast.walk(ast.parse(source, str(rel))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "comfyui_lycoris":
                    problems.append(f"{rel}:{node.lineno}: imports the package by name ({name}); use a relative import")
                if top in COMFYUI_MODULES and not may_import_comfyui(rel):
                    problems.append(f"{rel}:{node.lineno}: imports ComfyUI ({name}) outside nodes/")
        for node in ast.walk(ast.parse(source, str(rel))):  # importlib.import_module("comfy...") counts too
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                    and node.args[0].value.split(".")[0] in COMFYUI_MODULES and not may_import_comfyui(rel)):
                problems.append(f"{rel}:{node.lineno}: imports ComfyUI ({node.args[0].value}) outside nodes/")
    assert not problems, "\n".join(problems)
