"""Imports point down only (DESIGN.md §1): deploy → flows → tasks → bard_core."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.refs import imported_modules, module_file

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["bard_core", "tasks", "flows", "deploy"]  # low → high
FORBIDDEN = {
    "bard_core": {"prefect", "ray", "lm_eval"},
    "flows": {"torch", "ray", "transformers"},
}
STDLIB_ONLY = ["bard_core/config.py", "bard_core/config_eval.py", "bard_core/config_checks.py",
               "bard_core/recipes.py", "bard_core/overrides.py", "bard_core/gate.py", "bard_core/files.py",
               "tasks/refs.py"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """What the module at `path` imports, by the reader the stage cache keys on (`tasks.refs`)."""
    return imported_modules(path, module_name(path))


def python_files(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py")) if (ROOT / layer).exists() else []


def violations(layer: str) -> list[str]:
    found = []
    higher = set(LAYERS[LAYERS.index(layer) + 1:])
    for path in python_files(layer):
        for module in imports_of(path):
            top = module.split(".")[0]
            if top in FORBIDDEN.get(layer, set()):
                found.append(f"{path.relative_to(ROOT)} imports {module} (forbidden in {layer})")
            if top in higher:
                found.append(f"{path.relative_to(ROOT)} imports {module} (a higher layer)")
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_point_down_only(layer):
    assert violations(layer) == []


def test_every_layer_has_code():
    for layer in ("bard_core", "flows"):
        assert python_files(layer), f"{layer} has no modules"


@pytest.mark.parametrize("relative", [p for p in STDLIB_ONLY if (ROOT / p).exists()])
def test_cheap_modules_use_only_the_standard_library(relative):
    import sys

    modules = imports_of(ROOT / relative)
    ours = {m for m in modules if m.split(".")[0] in LAYERS}
    files = {module_file(m).relative_to(ROOT).as_posix() for m in ours if module_file(m)}  # `from a import b`: a.b
    assert files <= set(STDLIB_ONLY)  # only other cheap modules of ours
    tops = {m.split(".")[0] for m in modules - ours}
    assert tops - set(sys.stdlib_module_names) - {"__future__"} == set()


def test_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import torch\nfrom prefect import flow\nfrom ray.data import Dataset\n"
                   "from ..gate import paired\ndef late():\n    import lm_eval\n")
    found = imported_modules(bad, "bard_core.sub.m")
    assert {"torch", "prefect", "ray.data", "lm_eval", "bard_core.gate"} <= found  # function bodies, relative


def test_importing_config_and_refs_does_not_import_torch_or_transformers():
    import subprocess
    import sys

    code = ("import sys, bard_core.config, bard_core.recipes, tasks.refs; "
            "print(','.join(m for m in ('torch', 'transformers', 'ray', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.strip()
    assert out == ""


def test_the_train_worker_module_imports_no_prefect_or_ray():
    """Ray unpickles `train_loop_per_worker` in every worker of every stage: its module stays cheap."""
    import subprocess
    import sys

    code = ("import sys, tasks.train_worker; "
            "print(','.join(m for m in ('torch', 'transformers', 'ray', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.strip()
    assert out == ""
