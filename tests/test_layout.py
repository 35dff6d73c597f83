"""The house's rules, checked on the source: at most eight modules directly in sidecar/,
no file over 600 lines, and imports that only go down the layers the README's Layout
section draws (no circle between packages, none upward)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sidecar"

#: Each part of sidecar (a package or a module directly in it) and its layer, bottom (0)
#: to top, as the README's Layout section draws them: a part imports only lower layers.
LAYERS = {
    "_native": 0, "settings": 0, "version": 0,
    "wire": 1,
    "errors": 2, "failures": 2,
    "text": 3,
    "limits": 4, "cache": 4, "routing": 4, "cluster": 4, "ledger": 4,
    "config": 5,
    "client": 6, "daemon": 6,
    "integrations": 7, "cli": 7, "protocol": 7, "tokens": 7, "normalize": 7, "__init__": 8,
    "__main__": 8,
}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The parts of sidecar a module imports (every import, also under TYPE_CHECKING or
    inside functions); a name taken from the package itself counts as ``__init__``."""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            modules = [f"{module}.{a.name}" for a in node.names] if module == "sidecar" else [module]
        for module in modules:
            parts = module.split(".")
            if parts[0] == "sidecar":
                found.add(parts[1] if len(parts) > 1 and parts[1] in LAYERS else "__init__")
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_at_most_eight_modules_directly_in_sidecar():
    top = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(top) <= 8, top


def test_every_part_has_a_layer():
    parts = {_part(p) for p in _modules()} | {p.name for p in PACKAGE.iterdir() if p.is_dir()
                                                  and p.name != "__pycache__"}
    assert parts <= set(LAYERS), parts - set(LAYERS)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_the_layers(path):
    me = _part(path)
    for other in _imports(path) - {me}:
        assert LAYERS[other] < LAYERS[me], \
            f"{path.relative_to(ROOT)} ({me}, layer {LAYERS[me]}) imports {other} (layer {LAYERS[other]})"


def test_the_client_side_loads_no_engine():
    """An application importing sidecar pays for the wire and the client only; the
    shared-memory fast path loads the cache's key function (and the normaliser) on its
    first lookup, and nothing else of the engines."""
    for path in (PACKAGE / "client").rglob("*.py"):
        assert _imports(path) <= {"wire", "errors", "client", "version", "cache", "text"}, path
    code = ("import sys, sidecar; loaded = sorted(m for m in sys.modules if m.startswith("
            "'sidecar.') and m.split('.')[1] not in ('client', 'wire', 'errors', 'version', "
            "'_native')); assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


@pytest.mark.parametrize("folder", ["sidecar", "native", "bench"])
def test_no_file_over_600_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*")
            if p.suffix in (".py", ".pyx", ".pxd", ".pxi", ".h")
            and (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_documented_module_names_still_import():
    """The README's import paths (``sidecar.protocol``, ``sidecar.tokens``,
    ``sidecar.normalize``) are the modules that moved, not copies of them."""
    import sidecar.normalize
    import sidecar.protocol
    import sidecar.text.normalize
    import sidecar.text.tokens
    import sidecar.tokens
    import sidecar.wire
    from sidecar.protocol import Fingerprint

    assert sidecar.protocol is sidecar.wire and Fingerprint is sidecar.wire.Fingerprint
    assert sidecar.tokens is sidecar.text.tokens
    assert sidecar.normalize is sidecar.text.normalize
    assert sidecar.tokens.count("hello world", model="gpt-4o").input_tokens == 2
