"""The package's import graph has no cycle, counting imports inside functions too (only `if TYPE_CHECKING:`
blocks are left out): a lazy import hides a cycle from Python, not from the next engineer."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mnv4_deploy"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports, anywhere in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` / `from .pkg import module`
                if f"{base}.{alias.name}" in modules:
                    found.add(f"{base}.{alias.name}")
                elif base in modules:
                    found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def walk(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = walk(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = walk(node)
            if cycle:
                return cycle
    return []


def test_the_walker_sees_lazy_and_relative_imports() -> None:
    graph = import_graph()
    assert "mnv4_deploy.quantization.pt2e" in graph["mnv4_deploy.pipeline"]  # module level, relative
    assert "mnv4_deploy.cli.report" in graph["mnv4_deploy.cli.main"]  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert not cycle, " -> ".join(cycle)


CONFIG = "mnv4_deploy.config"
# What config must never import: the stages that read it (a recipe is checked by the targets, not the reverse).
ABOVE_CONFIG = ("mnv4_deploy.targets", "mnv4_deploy.pipeline", "mnv4_deploy.cli", "mnv4_deploy.report")


def test_no_config_module_imports_the_targets() -> None:
    """config/ sits below the targets: a recipe's `targets:` sections are checked by the registry
    (targets.check_recipe_targets), which asks each target's Options; lazy imports count too."""
    graph = import_graph()
    config = {name: deps for name, deps in graph.items() if name == CONFIG or name.startswith(CONFIG + ".")}
    assert "mnv4_deploy.config.recipes" in config
    upward = {name: sorted(d for d in deps if d.startswith(ABOVE_CONFIG)) for name, deps in config.items()}
    assert not {k: v for k, v in upward.items() if v}, upward


def test_the_shared_quantizer_does_not_import_the_tflite_converter() -> None:
    """Every int8 convert builds litert-torch's PT2E quantizer; importing it must not pull in litert-torch's
    converter and JAX (seconds per run, for targets that never use them), and a later `import litert_torch`
    (the tflite target) must find the very same quantizer modules as its attributes."""
    import subprocess
    import sys

    code = "\n".join([
        "import sys",
        "from mnv4_deploy.config.recipes import load_recipe",
        "from mnv4_deploy.quantization.pt2e import build_quantizer",
        "quantizer = build_quantizer(load_recipe(None).quantization)",
        "print('jax' in sys.modules, 'litert_torch' in sys.modules)",
        "import litert_torch",
        "from litert_torch.quantize.quant_config import QuantConfig",
        "import litert_torch.quantize.pt2e_quantizer as q",
        "print(isinstance(quantizer, q.PT2EQuantizer), litert_torch.quantize.PT2EQuantizer is q.PT2EQuantizer,",
        "      sys.modules['litert_torch.quantize.pt2e_quantizer'] is q, callable(litert_torch.convert))",
        "QuantConfig(pt2e_quantizer=quantizer)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True", "True", "True", "True"]
