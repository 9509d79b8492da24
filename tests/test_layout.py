"""The package's rooms keep their order: a room imports only the rooms docs/development.md lists
above it, so no import circle can form between rooms; within the package no module imports a
private name of another, and no import circle hides inside a function."""

from __future__ import annotations

import ast
import re
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


PREDICTORS = ("predict", "predict_sdxl", "predict_controlnet")
# What the image holds beside the package: the predictors, what cog builds from, the command
# the weights errors name, the code's licence; and the weights.
IMAGE_FILES = {f"{p}.py" for p in PREDICTORS} | {"cog.yaml", "requirements.txt", "LICENSE"}
IMAGE_FILES |= {"scripts/download_weights.py"}
WEIGHT_FILES = (
    "weights/stable-diffusion-2-base/unet/diffusion_pytorch_model.fp16.safetensors",
    "weights/lpips/vgg16-features.safetensors",
    "weights/controlnet/sd-controlnet-canny/config.json",
)
NOT_WEIGHTS = (
    "weights/README.md",
    "weights/.partial/vgg16-397923af.pth",
    "weights/stable-diffusion-2-base/.cache/huggingface/download/unet.incomplete",
    "weights/controlnet/sd-controlnet-canny/.cache/huggingface/x.lock",
)


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore's patterns as Docker reads them: (an exception `!`, the path it matches);
    `**` any number of folders, `*` and `?` within one name."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception, line = line.startswith("!"), line.removeprefix("!").strip("/")
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", line)
        wild = {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        regex = "".join(wild.get(part, re.escape(part)) for part in parts)
        patterns.append((exception, re.compile(regex)))
    return patterns


def in_image(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether `cog build` copies `path`: the last pattern that matches it or a folder above it
    decides (Docker's rule)."""
    parents = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
    kept = True
    for exception, pattern in patterns:
        if any(pattern.fullmatch(p) for p in parents):
            kept = exception
    return kept


def runtime_modules() -> set[str]:
    """The package's modules the predictors and the download command run: what they import, and
    what those import, function-level imports included."""
    # (the package's own __init__ is "__init__", and what it imports "__init__.<module>")
    graph = {m: {s.removeprefix("__init__.") for s, _ in e} for m, e in imports().items()}
    start = {"cli.download"}
    for predictor in PREDICTORS:
        for node in ast.walk(ast.parse((ROOT / f"{predictor}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("syncdiffusion"):
                start.add(node.module.removeprefix("syncdiffusion").lstrip(".") or "__init__")
    todo, found = list(start), set()
    while todo:
        module = todo.pop()
        if module in graph and module not in found:
            found.add(module)
            todo += graph[module]
            parts = module.split(".")  # a module's packages run their __init__ first
            todo += [".".join(parts[:i]) for i in range(1, len(parts))] + ["__init__"]
    return found


def module_file(module: str) -> str:
    path = PACKAGE / module.replace(".", "/")
    return (
        (path / "__init__.py" if path.is_dir() else path.with_suffix(".py"))
        .relative_to(ROOT)
        .as_posix()
    )


def test_the_cog_image_holds_what_the_predictors_run_and_nothing_else():
    """.dockerignore lets through the predictors, the package's modules they or the download
    command import (at the top or in a function) and the weights; no test, tool, document,
    front-end, app page, evaluation or requirements file of theirs."""
    patterns = dockerignore()
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    shipped = {f for f in tracked if in_image(f, patterns)}
    package = {module_file(m) for m in runtime_modules()}
    assert (
        "syncdiffusion/models/weights.py" in package
        and "syncdiffusion/app/server.py" not in package
    )
    expected = IMAGE_FILES | package
    left_out, extra = sorted(expected - shipped), sorted(shipped - expected)
    assert shipped == expected, f"left out: {left_out}; shipped besides: {extra}"
    assert all(in_image(f, patterns) for f in WEIGHT_FILES)
    assert not any(in_image(f, patterns) for f in NOT_WEIGHTS)
    assert not in_image("syncdiffusion/core/__pycache__/sync.cpython-311.pyc", patterns)
    served = re.search(r'^run: "(\w+\.py):Predictor"', (ROOT / "cog.yaml").read_text(), re.M)
    assert served and served[1] in shipped


def test_the_dockerignore_reader_follows_dockers_rules():
    patterns = [(False, re.compile("[^/]*")), (True, re.compile("a/b\\.py"))]
    assert not in_image("a/c.py", patterns) and in_image("a/b.py", patterns)
    assert in_image("x/.cache/y", [(False, re.compile("[^/]*/.cache"))]) is False


def test_the_cog_image_holds_every_module_its_predictors_import():
    """No predictor needs what .dockerignore leaves out (each predictor imported alone, in a
    fresh interpreter, as the image's worker does)."""
    patterns = dockerignore()
    for predictor in PREDICTORS:
        code = f"import sys, {predictor}; print(*(m for m in sys.modules if 'syncdiffusion' in m))"
        imported = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        files = [
            module_file(m.removeprefix("syncdiffusion").lstrip(".") or "__init__")
            for m in imported
            if m.split(".")[0] == "syncdiffusion"
        ]
        needed = [f for f in files if not in_image(f, patterns)]
        assert not needed, f"{predictor}.py imports {needed}, which .dockerignore leaves out"
