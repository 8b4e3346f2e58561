"""The house's floors: which lorakit package may import which, lazy imports included.

docs/layers.md draws the same picture. An edge not listed here fails the test: a new one is a
design decision, made by adding it here (and to the drawing), not by accident.
"""

import ast
import sys

from tests.test_import_cycles import ROOT, graph

# package -> the packages it may import ("lorakit" is the top-level __init__, the public API).
ALLOWED: dict[str, set[str]] = {
    "core": set(),  # the LoRA semantics: torch only
    "kernels": {"core"},  # fast paths, checked against core's reference forward
    "quant": {"core"},  # quantized bases (NF4), answering core's duck-typed questions
    "formats": {"core"},  # adapter files (PEFT layout, inspect) and atomic writes
    "fusion": {"core", "kernels"},  # training-time rewrites of a model
    "hf": {"core", "formats", "quant"},  # what needs transformers: loading, generation
    "estimate": {"core", "kernels", "fusion", "quant", "hf"},  # memory from a config, on the meta device
    "data": {"core"},
    "gguf": {"core", "formats", "hf"},
    "serve": {"core", "formats", "hf"},
    "train": {"core", "data", "estimate", "formats", "fusion", "hf", "kernels", "quant"},
    "cli": {"core", "data", "estimate", "formats", "fusion", "gguf", "hf", "kernels", "quant", "serve",
            "train"},
    "lorakit": {"core", "formats", "fusion", "kernels", "hf"},
    "__main__": {"cli"},
}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lorakit"


def forbidden_edges(edges: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import between packages that ALLOWED does not list."""
    found = []
    for module, imported in sorted(edges.items()):
        source = package_of(module)
        for target in sorted(imported):
            if package_of(target) != source and package_of(target) not in ALLOWED.get(source, set()):
                found.append(f"{module} -> {target}")
    return found


def test_the_checker_finds_an_edge_that_points_up():
    assert forbidden_edges({"lorakit.core.layers": {"lorakit.kernels.paths"}}) == [
        "lorakit.core.layers -> lorakit.kernels.paths"]
    assert forbidden_edges({"lorakit.kernels.paths": {"lorakit.core.layers"}}) == []


def test_every_package_is_placed():
    packages = {package_of(module) for module in graph()}
    assert packages == set(ALLOWED)


def test_packages_import_only_the_floors_below_them():
    assert forbidden_edges(graph()) == []


def test_core_imports_torch_and_the_standard_library_only():
    outside = set()
    for path in (ROOT / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in ("torch", "lorakit", "__future__") and top not in sys.stdlib_module_names:
                    outside.add(f"{path.name}: {name}")
                if top == "lorakit" and not name.startswith("lorakit.core"):
                    outside.add(f"{path.name}: {name}")
    assert sorted(outside) == []
