"""The package layering: ``dreamportrait/`` (the inference library) imports nothing from ``train/``
or ``world/``; ``train/`` imports nothing from ``world/``.

Static: every import statement of every file, at module level or inside a function, is resolved
(relative imports included) and its top-level package checked. Dynamic: importing every module
of the library leaves ``train`` and ``world`` out of ``sys.modules``.
"""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fixtures_path import REPO


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file ``path`` of a package under ``root``."""
    package = list(path.relative_to(root).parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # ``from . import x`` / ``from pkg import x`` may import the submodule ``pkg.x``.
            found += [(node.lineno, f"{module}.{alias.name}" if module else alias.name) for alias in node.names]
    return found


def forbidden_imports(package: str, forbidden: set[str]) -> list[str]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return [f"{path.relative_to(REPO)}:{line} imports {module}"
            for path in files for line, module in imported_modules(path, REPO)
            if module.split(".")[0] in forbidden]


@pytest.mark.parametrize("package, forbidden", [("dreamportrait", {"train", "world"}), ("train", {"world"})])
def test_no_import_reaches_a_higher_layer(package, forbidden):
    assert forbidden_imports(package, forbidden) == []


def test_import_scan_sees_relative_and_function_level_imports(tmp_path):
    """The scan resolves relative imports against the file's package and reads function bodies."""
    pkg = tmp_path / "pkg" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "mod.py").write_text("from ..eg3d import weights\n"
                                "def f():\n    from train.loop import run\n    import world.data\n")
    assert sorted(imported_modules(pkg / "mod.py", tmp_path)) == [
        (1, "pkg.eg3d.weights"), (3, "train.loop.run"), (4, "world.data")]


def test_importing_every_library_module_loads_neither_train_nor_world():
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import dreamportrait
        names = [m.name for m in pkgutil.walk_packages(dreamportrait.__path__, "dreamportrait.")
                 if not m.name.endswith(".__main__")]  # entry points run their command when imported
        for name in names:
            importlib.import_module(name)
        print(len(names), sorted(m for m in sys.modules if m.split(".")[0] in ("train", "world")))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    count, loaded = proc.stdout.strip().split(" ", 1)
    files = [p for p in (REPO / "dreamportrait").rglob("*.py") if p.name != "__main__.py"]
    assert int(count) == len(files) - 1  # every module and subpackage, not the top package itself
    assert loaded == "[]"
