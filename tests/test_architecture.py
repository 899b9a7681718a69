"""The shape of the code: what may import what, file sizes, one progress type, one set of stages."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "cacheviz"


def _modules():
    for path in sorted(ENGINE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                yield ("." * node.level) + (node.module or ""), a.name


def test_only_the_ui_package_imports_streamlit():
    for path, tree in _modules():
        uses = any(mod.split(".")[0] == "streamlit" for mod, _ in _imports(tree))
        assert not uses or path.parent.name == "ui", path
    # the job board is pure Python, testable without Streamlit
    for name in ("jobs.py", "messages.py"):
        tree = ast.parse((ENGINE / "ui" / name).read_text())
        assert not any(mod.split(".")[0] == "streamlit" for mod, _ in _imports(tree)), name


def test_nothing_in_the_package_imports_the_command_line():
    for path, tree in _modules():
        if path.name == "__main__.py":
            continue
        for mod, name in _imports(tree):
            assert not mod.endswith("__main__") and name != "__main__", (path, mod, name)


def test_no_module_imports_another_modules_private_names():
    for path, tree in _modules():
        for mod, name in _imports(tree):
            assert not (name and name.startswith("_") and not name.startswith("__")), (path, mod, name)
        for node in ast.walk(tree):
            # module._name on an imported module (self._x and locals are not modules)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if isinstance(node.value, ast.Name) and node.value.id in _imported_names(tree):
                    raise AssertionError(f"{path}: {node.value.id}.{node.attr}")


def _imported_names(tree) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:  # our own modules
            names |= {a.asname or a.name for a in node.names}
    return names


def test_one_progress_type_and_one_set_of_stage_names():
    defined = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "ProgressFn" for t in targets):
                    defined.append(path.name)
    assert defined == ["progress.py"]
    # no stage name is spelled out as a string outside progress.py
    from cacheviz.progress import Stage

    # (one-word names such as "layers" and "test" are also ordinary words, so only the others)
    names = {v for k, v in vars(Stage).items() if not k.startswith("_") and " " in v}
    for path, tree in _modules():
        if path.name == "progress.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in names, (path, node.value)


def test_ui_files_stay_small_and_pages_thin():
    for path in (ENGINE / "ui").glob("*.py"):
        n = len(path.read_text().splitlines())
        assert n <= 400, f"{path.name} has {n} lines"
    for path in (REPO / "pages").glob("*.py"):
        tree = ast.parse(path.read_text())
        for mod, _ in _imports(tree):
            root = mod.split(".")[0]
            assert root in {"streamlit", "cacheviz", "pathlib", "numpy", "__future__"}, (path, mod)
        for mod, name in _imports(tree):
            if mod.startswith("cacheviz"):
                # pages reach the engine through ui (and a few plain helpers), never the heavy parts
                assert name in {"ui", "plots", "images", "retrieval", "CachevizError"}, (path, mod, name)
