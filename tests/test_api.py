"""The public surface and the layering rules, checked in fresh interpreters (so the result
does not depend on which tests imported what before)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "guardmerge"
NAMESPACES = ("guardmerge", "guardmerge.merge", "guardmerge.testing", "guardmerge.serve")


def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_public_names_are_exactly_all_and_have_no_aliases(namespace):
    info = _fresh(f"""
import importlib, json, types
m = importlib.import_module({namespace!r})
before = sorted(n for n in dir(m) if not n.startswith("_")
                and not isinstance(getattr(m, n), types.ModuleType))
objs = {{n: getattr(m, n) for n in m.__all__}}
after = sorted(n for n in dir(m) if not n.startswith("_")
               and not isinstance(getattr(m, n), types.ModuleType))
ids = {{}}
for n, o in objs.items():
    if callable(o) or isinstance(o, type):
        ids.setdefault(id(o), []).append(n)
print(json.dumps({{"all": list(m.__all__), "before": before, "after": after,
                  "aliases": [v for v in ids.values() if len(v) > 1]}}))
""")
    names = [n for n in info["all"] if n != "__version__"]
    assert names == sorted(set(names)), "__all__ is sorted and has no duplicates"
    assert info["before"] == info["after"] == sorted(names)
    assert info["aliases"] == []


def test_importing_guardmerge_and_the_policy_check_do_not_import_torch():
    policies = sorted(str(p) for p in (ROOT / "policies").glob("*.yaml"))
    info = _fresh(f"""
import json, sys, io, contextlib
import guardmerge
from guardmerge import Guard, Policy, FunctionClassifier, Verdict, guard_client, inspect_bundle
from guardmerge.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    rc_help = main(["--help"])
    rc = main(["policy", "check", *{policies!r}])
print(json.dumps({{"rc": rc, "help": rc_help, "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules}}))
""")
    assert info == {"rc": 0, "help": 0, "torch": False, "transformers": False}


def test_the_cli_parser_builds_without_torch():
    info = _fresh("""
import json, sys
from guardmerge.cli import _build_parser
_build_parser()
print(json.dumps("torch" in sys.modules))
""")
    assert info is False


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module name, at module level?) of every import in a guardmerge source file."""
    package = list(path.relative_to(ROOT).parts[:-1])  # a module's package (an __init__'s own)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((mod, id(node) in top))
            found += [(f"{mod}.{a.name}", id(node) in top) for a in node.names]
    return found


def _library_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py")
            if not {"tools", "testing"} & set(p.relative_to(PACKAGE).parts[:-1])]


def test_the_library_never_imports_the_tools_or_the_test_kit():
    bad = []
    for path in _library_files():
        for mod, top_level in _imports(path):
            for kit in ("guardmerge.tools", "guardmerge.testing"):
                if mod == kit or mod.startswith(kit + "."):
                    lazy_cli = path.name == "cli.py" and kit == "guardmerge.tools" and not top_level
                    if not lazy_cli:
                        bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    for path in (PACKAGE / "testing").rglob("*.py"):
        bad += [f"{path.relative_to(ROOT)} imports {m}" for m, _ in _imports(path)
                if m.startswith("guardmerge.tools")]
    assert bad == []
    # and at run time: importing every library module loads neither
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in _library_files() if p.name != "__main__.py")
    info = _fresh(f"""
import importlib, json, sys
for m in {modules!r}:
    importlib.import_module(m)
print(json.dumps(sorted(m for m in sys.modules
                        if m.startswith(("guardmerge.tools", "guardmerge.testing")))))
""")
    assert info == []


def test_the_library_never_imports_the_proxy():
    """``guardmerge.serve`` is an optional extra: only the CLI imports it, inside its commands
    (its options, to build the flags; the rest when ``serve`` runs)."""
    bad = []
    for path in _library_files():
        if "serve" in path.relative_to(PACKAGE).parts[:-1]:
            continue
        for mod, top_level in _imports(path):
            if mod == "guardmerge.serve" or mod.startswith("guardmerge.serve."):
                if not (path.name == "cli.py" and (not top_level or
                                                   mod.startswith("guardmerge.serve.config"))):
                    bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert bad == []
    info = _fresh("""
import importlib, json, sys
import guardmerge, guardmerge.client, guardmerge.guard, guardmerge.merge
from guardmerge.cli import _build_parser
_build_parser()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in
                        ("starlette", "uvicorn", "prometheus_client", "ray"))))
""")
    assert info == []


def test_examples_use_only_public_names():
    public = _fresh("""
import importlib, json
names = {}
for ns in ("guardmerge", "guardmerge.merge", "guardmerge.testing", "guardmerge.tools.build",
           "guardmerge.tools.merge_bench", "guardmerge.tools.datasets", "guardmerge.tools.bench"):
    names[ns] = list(importlib.import_module(ns).__all__)
print(json.dumps(names))
""")
    bad = []
    for path in sorted((ROOT / "examples").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("guardmerge"):
                allowed = public.get(node.module)
                if allowed is None:
                    bad.append(f"{path.name}: from {node.module} (not a public namespace)")
                    continue
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                        if a.name not in allowed]
            elif isinstance(node, ast.Import):
                bad += [f"{path.name}: import {a.name}" for a in node.names
                        if a.name.startswith("guardmerge.") and a.name not in public]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                bad.append(f"{path.name}:{node.lineno}: private attribute .{node.attr}")
    assert bad == []


def test_every_subpackage_says_what_lives_there_and_what_it_may_import():
    for sub in ("merge", "testing", "tools", "serve"):
        doc = ast.get_docstring(ast.parse((PACKAGE / sub / "__init__.py").read_text())) or ""
        modules = sorted(p.stem for p in (PACKAGE / sub).glob("*.py") if p.stem != "__init__")
        assert [m for m in modules if f"``{m}``" not in doc] == [], f"{sub}: modules not described"
        assert "never" in doc and "import" in doc, f"{sub}: no import rule"


@pytest.mark.parametrize("init", ["__init__.py", "merge/__init__.py", "serve/__init__.py"])
def test_lazy_export_tables_match_their_type_checking_imports(init):
    tree = ast.parse((PACKAGE / init).read_text())
    table = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", "") == "_EXPORTS")
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            imported.update({a.name: node.module for a in node.names})
    assert imported == table
