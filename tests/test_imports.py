"""The package's import structure: no cycles, every module importable on its own, and no global hooks
(issue "One owner per concern")."""
import ast
import subprocess
import sys
from pathlib import Path

import kohonen_vae

PACKAGE = Path(kohonen_vae.__file__).resolve().parent


def modules() -> dict:
    """{dotted module name: path} of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def top_level_imports(name: str, path: Path, known: set) -> set:
    """Package modules that ``name`` imports when it is imported (module-level statements only: imports
    inside functions run later and cannot form an import-time cycle)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in tree.body:
        stmts = [node]
        if isinstance(node, ast.Try):
            stmts = node.body + [h for hd in node.handlers for h in hd.body] + node.orelse
        for st in stmts:
            if isinstance(st, ast.Import):
                found |= {a.name for a in st.names if a.name in known}
            elif isinstance(st, ast.ImportFrom):
                if st.level:
                    base = package.split(".")
                    base = base[: len(base) - (st.level - 1)]
                    target = ".".join(base + ([st.module] if st.module else []))
                else:
                    target = st.module or ""
                if target in known:
                    found.add(target)
                for a in st.names:  # from . import report -> the submodule
                    if f"{target}.{a.name}" in known:
                        found.add(f"{target}.{a.name}")
    found.discard(name)
    return found


def test_no_import_cycles_among_module_level_imports():
    mods = modules()
    graph = {m: top_level_imports(m, p, set(mods)) for m, p in mods.items()}
    # a package's __init__ importing its own submodules is not a cycle through the package
    for m in graph:
        graph[m] = {t for t in graph[m] if not (t.startswith(m + ".") and mods[m].name == "__init__.py")}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            parent_init = ".".join(m.split(".")[:-1])
            if t == parent_init:
                continue  # `from . import x` inside a package resolves the package first: not a loop of ours
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles


def test_every_module_imports_first_in_a_fresh_package_state():
    """Import each module as the first of the package (sys.modules cleared of kohonen_vae): an import-order
    dependency or a cycle shows up as an ImportError here."""
    names = sorted(m for m in modules() if not m.endswith("__main__"))  # __main__ runs the CLI
    code = (
        "import importlib, sys\n"
        "import torch, numpy, matplotlib\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for n in names:\n"
        "    for k in [k for k in sys.modules if k == 'kohonen_vae' or k.startswith('kohonen_vae.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{n}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", proc.stdout


def test_no_global_hook_lists_and_no_importlib_in_the_cli():
    cli = (PACKAGE / "cli.py").read_text()
    assert "importlib" not in cli
    for path in PACKAGE.rglob("*.py"):
        assert "END_OF_TRAINING_HOOKS" not in path.read_text(), path
