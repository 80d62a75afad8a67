"""The package's layers: a module imports only from its own layer and the ones below it.

    models, data, losses (and the leaf modules errors, distributed, atomic, records, version,
    modes, signals)
      <- elastic <- bn, flops <- methods <- evaluation <- engine <- deploy <- analysis, demo
      <- cli

Inside the engine, its files form rooms (ENGINE_ROOMS): a file imports only files of the rooms
below its own. And no files of the package import each other in a circle.

Read from the source with ast, so a lazy import inside a function counts as well.
``nestedtrain/__init__.py`` is the public face: it may re-export from any layer but cli; the
rest of the package imports nothing from it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "nestedtrain"

LAYERS = [
    {
        "models",
        "data",
        "losses",
        "errors",
        "distributed",
        "atomic",
        "records",
        "version",
        "modes",
        "signals",
    },
    {"elastic"},
    {"bn", "flops"},
    {"methods"},
    {"evaluation"},
    {"engine"},
    {"deploy"},
    {"analysis", "demo"},
    {"cli", "__main__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}

# engine/, bottom up: the recipe and checkpoints; what is built from them (objects, resume
# checks, the epoch loop, logs, summary, sweeps); the run folder and the epoch's evaluations;
# the trainer.
ENGINE_ROOMS = [
    {"config", "checkpoint"},
    {"resume", "build", "loop", "logs", "summary", "sweep", "foreign"},
    {"runfolder", "epoch_eval"},
    {"trainer"},
]
ROOM_OF = {name: i for i, names in enumerate(ENGINE_ROOMS) for name in names}


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
            if len(module) == 1:  # from nestedtrain import X: a submodule, not the face's names
                targets = [["nestedtrain", n] for n in names]
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


def _file_edges() -> dict[str, set[str]]:
    """Module (dotted) -> the package's modules it imports, file by file."""
    modules = {".".join(_module_name(p)): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges[name] = set()
        for _, module, names in _imports(path):
            if module[0] != "nestedtrain":
                continue
            for target in [".".join([*module, n]) for n in names] + [".".join(module)]:
                if target in modules and target != name:
                    edges[name].add(target)
                    break
    return edges


def test_no_files_import_each_other_in_a_circle():
    edges = _file_edges()
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    circles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node, [node])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_engine_files_import_only_lower_rooms():
    engine = PACKAGE / "engine"
    files = {p.stem for p in engine.glob("*.py") if p.stem != "__init__"}
    assert files == set(ROOM_OF), (
        f"engine files without a room, or rooms without a file: {files ^ set(ROOM_OF)}"
    )
    wrong = []
    for path in sorted(engine.glob("*.py")):
        if path.stem == "__init__":
            continue
        for line, module, names in _imports(path):
            if module[:2] != ["nestedtrain", "engine"]:
                continue
            targets = [module[2]] if len(module) > 2 else [n for n in names if n in ROOM_OF]
            for target in targets:
                if ROOM_OF[target] >= ROOM_OF[path.stem]:
                    wrong.append(f"engine/{path.name}:{line} imports engine/{target}.py")
    assert not wrong, "engine imports against its rooms:\n" + "\n".join(wrong)


def test_a_training_run_loads_neither_the_analyses_nor_matplotlib():
    code = (
        "import sys, nestedtrain, nestedtrain.engine.trainer, nestedtrain.engine.build; "
        "bad = [m for m in sys.modules if m.startswith(('matplotlib', 'nestedtrain.analysis', "
        "'nestedtrain.cli'))]; print(bad); assert not bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
