"""The import graph, read from the source (function-level imports included): layers point down only,
`pipelines/` -> `rewards/`, `data_recipes/` -> `alignment/` (and `data_recipes/` may use `rewards/`), with no
import circle anywhere."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("alignment", "rewards", "data_recipes", "pipelines")
# package -> the project packages it must never import
FORBIDDEN = {"alignment": {"rewards", "data_recipes", "pipelines"}, "rewards": {"data_recipes", "pipelines"},
             "data_recipes": {"pipelines"}, "pipelines": set()}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports: `from pkg import sub` counts as the submodule when it is one, else as the
    package (its __init__)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for t in imports(p, known) if t in known and t != m} for m, p in known.items()}


def test_layers_point_down_only():
    bad = [f"{m} imports {t}" for m, targets in graph().items() for t in sorted(targets)
           if t.split(".")[0] in FORBIDDEN[m.split(".")[0]]]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [module, target]
            if target not in state and (found := visit(target, path + [module])):
                return found
        state[module] = 2
        return None

    for module in edges:
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(dict.fromkeys(cycle)) + f" -> {cycle[-1]}"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The graph is read right: an `alignment` module importing `rewards` inside a function is caught."""
    fake = ROOT / "alignment" / "evaluation.py"
    known = modules()
    text = fake.read_text() + "\n\ndef _probe():\n    from rewards.verifiers import verify\n"
    probe = tmp_path / "alignment" / "evaluation.py"
    probe.parent.mkdir()
    probe.write_text(text)
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert "rewards.verifiers" in imports(probe, known)
