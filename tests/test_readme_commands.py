"""The README's two commands work as written in a fresh virtual environment.

CI runs `.ci/run`, which makes a brand-new venv and runs the README's test command in it. These tests
keep that honest from inside any environment: the command CI runs is the README's, and every
third-party module the code and the tests import is installed by the requirements the README's
commands name (directly or as a dependency), not merely present on the machine.
"""
from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCAL = {"dreamportrait", "train", "world", "benchmarks", "app"} | {p.stem for p in (ROOT / "tests").glob("*.py")}


def readme_commands() -> dict[str, str]:
    """The indented command lines under the README's "Quick start", keyed by what they run."""
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    lines = [ln.strip() for ln in quick.splitlines() if ln.startswith("    pip install")]
    return {("tests" if "pytest" in ln else "app"): ln for ln in lines}


def requirement_closure(req_file: Path) -> set[str]:
    """Canonical names of the distributions a `pip install -r req_file` installs (following Requires-Dist)."""
    todo: list[Requirement] = []

    def read(path: Path):
        for raw in path.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if line.startswith("-r "):
                read(path.parent / line[3:].strip())
            elif line:
                todo.append(Requirement(line))

    read(req_file)
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(req.name).requires or []
        except metadata.PackageNotFoundError:
            continue  # not installed here: the import check below reports what it would have provided
        for spec in requires:
            sub = Requirement(spec)
            extras = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in extras):
                todo.append(sub)
    return seen


def third_party_imports(paths) -> dict[str, list[str]]:
    """Top-level module name -> files importing it (module level or inside functions)."""
    found: dict[str, list[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in LOCAL and top != "__future__":
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    ci = (ROOT / ".ci" / "run").read_text()
    command = readme_commands()["tests"]
    assert command.startswith("pip install -r requirements-dev.txt"), command
    assert re.search(r"^" + re.escape(command) + r"$", ci, re.M), f".ci/run does not run the README's command {command!r}"
    assert "python3 -m venv" in ci and "/bin/activate" in ci, ".ci/run must run it in a venv it creates"


@pytest.mark.parametrize("which, req_file, folders", [
    ("app", "requirements.txt", ["dreamportrait", "app.py"]),
    ("tests", "requirements-dev.txt", ["dreamportrait", "train", "world", "app.py", "tests", "benchmarks"]),
])
def test_every_imported_package_is_installed_by_the_readme_command(which, req_file, folders):
    assert f"-r {req_file}" in readme_commands()[which]
    files = []
    for folder in folders:
        p = ROOT / folder
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    closure = requirement_closure(ROOT / req_file)
    provided = metadata.packages_distributions()
    missing = {}
    for module, users in sorted(third_party_imports(files).items()):
        dists = {canonicalize_name(d) for d in provided.get(module, [])}
        if not dists & closure:
            missing[module] = (sorted(dists) or ["<not installed>"], users[:3])
    assert not missing, (f"imported but not installed by `pip install -r {req_file}` in a fresh venv "
                         f"(module: (distributions that provide it here, importing files)): {missing}; "
                         f"add the distribution to {req_file}")
