"""The package's structure: layers by folder, no import loops, the core imports nothing of tracking, CLI
or serving, and training never loads the demo-data generator."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "masksup_med"

# The layers, by folder: what each part of the package may import besides itself and the package root
# (``__version__``). A new module takes the layer of the folder it goes in; a new top-level module or
# folder must be given its line here.
LAYERS: dict[str, set[str]] = {
    "errors": set(),
    "bundles": set(),
    "transforms": set(),
    "run": {"errors"},
    "data": {"errors", "transforms", "run"},
    "methods": {"errors", "transforms", "run"},
    "inference": {"errors", "transforms", "data"},
    "tracking": {"errors", "transforms", "run", "methods"},
    "evaluation": {"errors", "transforms", "run", "data", "tracking"},
    "serving": {"errors", "transforms", "run", "data", "inference", "tracking"},
    "cli": {"errors", "transforms", "run", "data", "methods", "inference", "tracking", "evaluation", "serving"},
    "__main__": {"cli"},
}
CORE = ("transforms", "methods")
OUTER = ("tracking", "serving", "cli")


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
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules and name != _module_name(path)}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    return {_module_name(p): _imports(p, top_level_only) for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> str:
    """The part of the package ``module`` belongs to: its folder, or its own name at the top level."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import in ``graph`` that reaches a layer its module's layer may not import."""
    found = []
    for module, imported in sorted(graph.items()):
        layer = _layer(module)
        if layer == "":
            continue  # the package root (__version__) imports nothing of its own
        if layer not in LAYERS:
            found.append(f"{module}: its folder or name {layer!r} has no line in LAYERS")
            continue
        for name in sorted(imported):
            other = _layer(name)
            if other not in ("", layer) and other not in LAYERS[layer]:
                found.append(f"{module} imports {name} ({other!r} is not below {layer!r})")
    return found


def test_every_module_imports_only_from_the_layers_below_it():
    assert layering_violations(_graph(top_level_only=False)) == []


def test_a_module_importing_from_a_layer_above_it_is_caught():
    graph = _graph(top_level_only=False)
    graph["masksup_med.methods.losses"] = graph["masksup_med.methods.losses"] | {"masksup_med.tracking.store"}
    graph["masksup_med.newmodule"] = set()
    assert layering_violations(graph) == [
        "masksup_med.methods.losses imports masksup_med.tracking.store ('tracking' is not below 'methods')",
        "masksup_med.newmodule: its folder or name 'newmodule' has no line in LAYERS",
    ]


def test_core_imports_nothing_from_tracking_cli_or_serving():
    for module, imported in _graph(top_level_only=False).items():
        if _layer(module) in CORE:
            outer = {name for name in imported if _layer(name) in OUTER}
            assert not outer, f"{module} imports {sorted(outer)}"


def test_the_package_top_level_holds_at_most_six_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 6, modules


def test_no_import_loops_at_module_level():
    graph = _graph(top_level_only=True)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for name in sorted(graph.get(module, ())):
            if state.get(name) == 1 and not module.startswith(name + "."):  # a package importing its own module is fine
                cycle = path[path.index(name) :] + [name] if name in path else [module, name]
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
        "import masksup_med.data, masksup_med.methods.masksup, masksup_med.tracking.run, masksup_med.run.resume\n"
        "import masksup_med.run.runtime, masksup_med.evaluation, masksup_med.inference\n"
        "masksup_med.data.get_dataset('glas')\n"
        "print('masksup_med.data.synthetic' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    import masksup_med.data

    assert callable(masksup_med.data.make_glas_demo)  # still there for the CLI and tests, loaded on first use


def _package_classes() -> dict[str, type]:
    """Every class defined in the package, by dotted name."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if module.endswith("__main__"):
            continue
        for name, obj in vars(importlib.import_module(module)).items():
            if inspect.isclass(obj) and obj.__module__ == module:
                found[f"{module}.{name}"] = obj
    return found


def test_classes_that_attach_to_an_engine_are_named_handlers():
    for name, cls in _package_classes().items():
        if "attach" in vars(cls) and not cls.__name__.startswith("_"):
            assert cls.__name__.endswith("Handler"), f"{name} has attach(engine): name it ...Handler"


def _config_targets() -> set[str]:
    """The package's names that the bundles' configs instantiate (``_target_`` or a ``$`` expression)."""
    configs = Path(__file__).resolve().parents[1] / "bundles" / "common" / "configs"
    names = set()
    for config in configs.glob("*.json"):
        text = config.read_text(encoding="utf-8")
        names |= set(re.findall(r'_target_":\s*"(masksup_med\.[\w.]+)"', text))
        names |= {f"masksup_med.{name}" for name in re.findall(r"\$masksup_med\.([\w.]+)\(", text)}
    return names


def undocumented_arguments(cls: type) -> list[str]:
    """The parameters of ``cls.__init__`` that its docstring's ``Args:`` section does not name."""
    parameters = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    doc = inspect.getdoc(cls) or ""
    if "Args:" not in doc:
        return parameters
    named = set()
    for line in doc.split("Args:", 1)[1].splitlines():
        head = re.match(r"^\s{4}([\w, ]+):", line)
        if head:
            named |= {part.strip() for part in head.group(1).split(",")}
    return [p for p in parameters if p not in named]


def test_classes_a_config_targets_document_every_argument():
    targets = {}
    for name in _config_targets():
        module, _, attribute = name.rpartition(".")
        obj = getattr(importlib.import_module(module), attribute)
        if inspect.isclass(obj):
            targets[name] = obj
    assert "masksup_med.methods.masksup.MaskSupTrainer" in targets  # the scan finds the configs' classes
    assert "masksup_med.transforms.RandMaskBank" in targets
    missing = {name: undocumented_arguments(cls) for name, cls in sorted(targets.items())}
    assert {name: args for name, args in missing.items() if args} == {}


def test_an_undocumented_argument_is_caught():
    class Documented:
        """A class.

        Args:
            alpha, beta: two numbers.
        """

        def __init__(self, alpha, beta, gamma=0, *args, **kwargs):
            pass

    assert undocumented_arguments(Documented) == ["gamma"]
