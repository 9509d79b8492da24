"""The package's rooms keep their order: a room imports only the rooms docs/development.md lists
above it, so no import circle can form between rooms; within the package no module imports a
private name of another, and no import circle hides inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.test_readme import ROOT, blocks, layout_tree

PACKAGE = ROOT / "syncdiffusion"
ENTRY_POINTS = {"__init__", "__main__"}  # the package's own: they may import any room


def rooms() -> list[str]:
    """The package's rooms (sub-packages and top-level modules) in the layout's order."""
    [(_, layout, _)] = blocks(ROOT / "docs" / "development.md", "text")
    names = [
        p.removeprefix("syncdiffusion/")
        for p in layout_tree(layout)
        if p.startswith("syncdiffusion/")
    ]
    return [n.rstrip("/").removesuffix(".py") for n in names if n and "/" not in n.rstrip("/")]


def imports() -> dict[str, list[tuple[str, str | None]]]:
    """Each module of the package (dotted, under syncdiffusion) and what it imports from the
    package, function-level imports included: (module, name) pairs, name None for a module."""
    modules = {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): path
        for path in PACKAGE.rglob("*.py")
    }
    found: dict[str, list[tuple[str, str | None]]] = {}
    for module, path in modules.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        edges = found.setdefault(module, [])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                node.level or node.module.startswith("syncdiffusion")
            ):
                base = package[: len(package) - node.level + 1] if node.level else []
                source = ".".join([*base, *(node.module or "").split(".")]).strip(".")
                source = source.removeprefix("syncdiffusion").strip(".")
                for alias in node.names:
                    sub = f"{source}.{alias.name}".strip(".")
                    edges.append((sub, None) if sub in modules else (source, alias.name))
            elif isinstance(node, ast.Import):
                edges += [
                    (a.name.removeprefix("syncdiffusion.").removeprefix("syncdiffusion"), None)
                    for a in node.names
                    if a.name.startswith("syncdiffusion")
                ]
    return found


def room_of(module: str) -> str:
    return module.split(".")[0] if module else "__init__"


def test_a_room_imports_only_the_rooms_above_it():
    order = rooms()
    assert {"errors", "core", "models", "request", "pipeline", "testing"} <= set(order)
    wrong = [
        f"syncdiffusion.{module} imports syncdiffusion.{source}"
        for module, edges in imports().items()
        if room_of(module) not in ENTRY_POINTS
        for source, _ in edges
        if room_of(source) != room_of(module)
        and (
            room_of(source) not in order
            or room_of(module) not in order
            or order.index(room_of(source)) > order.index(room_of(module))
        )
    ]
    assert not wrong, f"against the rooms' order {order}: {wrong}"


def test_nothing_in_the_package_imports_testing():
    importers = [
        m
        for m, edges in imports().items()
        if room_of(m) != "testing" and any(room_of(source) == "testing" for source, _ in edges)
    ]
    assert not importers


def test_no_private_name_crosses_a_module():
    taken = [
        f"syncdiffusion.{module} imports {name} from syncdiffusion.{source}"
        for module, edges in imports().items()
        for source, name in edges
        if name and name.startswith("_") and not name.startswith("__") and source != module
    ]
    assert not taken


def test_no_import_circle():
    graph = {m: {s for s, _ in edges if s != m} for m, edges in imports().items()}
    graph = {m: {s for s in edges if s in graph} for m, edges in graph.items()}
    state: dict[str, int] = {}  # 1 on the path being walked, 2 done

    def walk(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for source in sorted(graph[module]):
            if state.get(source) == 1:
                return [*path[path.index(source) :], source] if source in path else [source]
            if source not in state and (circle := walk(source, [*path, source])):
                return circle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            assert (circle := walk(module, [module])) is None, " -> ".join(circle)


def test_the_layouts_rooms_are_the_packages():
    on_disk = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py") or (p / "__init__.py").is_file()
    }
    assert set(rooms()) == on_disk


def test_the_cog_image_holds_every_module_its_predictors_import():
    """.dockerignore leaves testing/ and replicate/ out of the image: no predictor may need them
    (each predictor imported alone, in a fresh interpreter, as the image's worker does)."""
    left_out = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    left_out = [f for f in left_out if f.startswith("syncdiffusion/")]
    assert left_out
    for predictor in ("predict", "predict_sdxl", "predict_controlnet"):
        code = f"import sys, {predictor}; print(*(m for m in sys.modules if 'syncdiffusion' in m))"
        imported = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        files = {m.replace(".", "/") for m in imported}
        needed = [
            f for f in files for folder in left_out if f == folder or f.startswith(folder + "/")
        ]
        assert not needed, f"{predictor}.py imports {needed}, which .dockerignore leaves out"
