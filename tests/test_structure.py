"""The package's structure: no import loops, the core imports nothing of tracking, CLI or serving,
and training never loads the demo-data generator."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "masksup_med"
CORE = ("masksup_med.transforms", "masksup_med.losses", "masksup_med.engines", "masksup_med.handlers",
        "masksup_med.semi", "masksup_med.teacher", "masksup_med.mim", "masksup_med.pretraining",
        "masksup_med.pretrained")
OUTER = ("masksup_med.tracking", "masksup_med.run_tracking", "masksup_med.registry", "masksup_med.model_format",
         "masksup_med.figures", "masksup_med.serving", "masksup_med.cli", "masksup_med.bundles")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """masksup_med modules imported by ``path`` (relative imports resolved); all, or only those run at import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules and name != _module_name(path)}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    return {_module_name(p): _imports(p, top_level_only) for p in PACKAGE.rglob("*.py")}


def test_core_imports_nothing_from_tracking_cli_or_serving():
    for module, imported in _graph(top_level_only=False).items():
        if module.startswith(CORE):
            outer = {name for name in imported if name.startswith(OUTER)}
            assert not outer, f"{module} imports {sorted(outer)}"


def test_no_import_loops_at_module_level():
    graph = _graph(top_level_only=True)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for name in sorted(graph.get(module, ())):
            if state.get(name) == 1 and not module.startswith(name + "."):  # a package importing its own module is fine
                cycle = path[path.index(name):] + [name] if name in path else [module, name]
                raise AssertionError("import loop: " + " -> ".join(cycle))
            if name not in state:
                visit(name, [*path, name])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_training_path_does_not_load_the_demo_data_generator():
    code = (
        "import sys\n"
        "import masksup_med.data, masksup_med.engines, masksup_med.run_tracking, masksup_med.resume\n"
        "import masksup_med.runtime, masksup_med.evaluation, masksup_med.inference\n"
        "masksup_med.data.get_dataset('glas')\n"
        "print('masksup_med.data.synthetic' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    import masksup_med.data

    assert callable(masksup_med.data.make_glas_demo)  # still there for the CLI and tests, loaded on first use
