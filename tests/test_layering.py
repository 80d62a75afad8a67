"""The package's layers: a module imports only from its own layer and the ones below it.

    models, data, losses (and the leaf modules errors, distributed, runlog, memory, modes,
    signals)
      <- elastic <- bn, flops <- methods <- engine <- analysis, demo <- cli

Read from the source with ast, so a lazy import inside a function counts as well.
``nestedtrain/__init__.py`` is the public face: it may re-export from any layer but cli, and
the rest of the package takes only ``__version__`` from it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "nestedtrain"

LAYERS = [
    {"models", "data", "losses", "errors", "distributed", "runlog", "memory", "modes", "signals"},
    {"elastic"},
    {"bn", "flops"},
    {"methods"},
    {"engine"},
    {"analysis", "demo"},
    {"cli", "__main__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path) -> list[tuple[int, list[str], list[str]]]:
    """(line, imported module as a list of names, imported names) of every import."""
    tree = ast.parse(path.read_text())
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node.lineno, alias.name.split("."), []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = base + (node.module.split(".") if node.module else [])
            else:
                module = node.module.split(".")
            found.append((node.lineno, module, [a.name for a in node.names]))
    return found


def _layer(module: list[str]) -> int | None:
    return LAYER_OF.get(module[1]) if len(module) > 1 else None


def test_every_module_has_a_layer():
    unplaced = {
        _module_name(p)[1]
        for p in PACKAGE.rglob("*.py")
        if len(_module_name(p)) > 1 and _module_name(p)[1] not in LAYER_OF
    }
    assert not unplaced, f"modules without a layer (add them to LAYERS): {sorted(unplaced)}"


def test_no_module_imports_from_a_higher_layer():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _module_name(path)
        if len(here) == 1:  # nestedtrain/__init__.py: the public face
            for line, module, _ in _imports(path):
                if module[0] == "nestedtrain" and len(module) > 1 and module[1] == "cli":
                    wrong.append(f"nestedtrain/__init__.py:{line} imports the cli")
            continue
        mine = LAYER_OF[here[1]]
        for line, module, names in _imports(path):
            if module[0] != "nestedtrain":
                continue
            if len(module) == 1:  # from nestedtrain import X: a submodule or __version__
                targets = [["nestedtrain", n] for n in names if n != "__version__"]
            else:
                targets = [module]
            for target in targets:
                theirs = _layer(target)
                if theirs is None or theirs > mine:
                    wrong.append(
                        f"{path.relative_to(PACKAGE.parent)}:{line} ({here[1]}, layer {mine}) "
                        f"imports {'.'.join(target)} (layer {theirs})"
                    )
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_a_training_run_loads_neither_the_analyses_nor_matplotlib():
    code = (
        "import sys, nestedtrain, nestedtrain.engine.trainer, nestedtrain.engine.build; "
        "bad = [m for m in sys.modules if m.startswith(('matplotlib', 'nestedtrain.analysis', "
        "'nestedtrain.cli'))]; print(bad); assert not bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
