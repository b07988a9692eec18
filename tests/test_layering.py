"""Test-only code stays out of the product: no module of ``shards``, ``pipeline`` or ``trainer`` imports
the test-support modules (``tests/loopback.py``'s loopback servers, ``helpers``, ``conftest``), and the
loopback servers no longer live in ``shards`` (``shards.testing`` is gone)."""
import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("shards", "pipeline", "trainer")
# Every module beside the tests that is not a test file itself: what tests and benchmarks import.
SUPPORT = {path.stem for path in (ROOT / "tests").glob("*.py") if not path.stem.startswith("test_")} | {"tests"}


def imported_modules(source: str, package: str) -> set[str]:
    """Every module an ``import``, ``from ... import`` or ``importlib.import_module("...")`` names,
    relative imports resolved against ``package``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # from shards import testing
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
                   or isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))):
            names.add(node.args[0].value)
    return names


def test_the_imports_are_read_from_the_syntax_tree():
    source = ("import loopback as servers\nfrom helpers import onion\nfrom . import testing\n"
              "importlib.import_module('conftest')\n# import tests\ntext = 'from loopback import x'\n")
    assert imported_modules(source, "shards") == {
        "loopback", "helpers", "helpers.onion", "shards", "shards.testing", "conftest"}


def test_no_product_module_imports_test_support():
    assert {"loopback", "helpers", "conftest"} <= SUPPORT
    modules = [path for package in PRODUCT for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(modules) > 30
    offenders = []
    for path in modules:
        relative = path.relative_to(ROOT).with_suffix("")
        package = ".".join(relative.parts[:-1])  # the package the module is in (its own, for __init__)
        for name in imported_modules(path.read_text(), package):
            if name.split(".")[0] in SUPPORT or name == "shards.testing" or name.startswith("shards.testing."):
                offenders.append(f"{relative}: {name}")
    assert not offenders, offenders


def test_the_loopback_servers_left_the_shards_package():
    assert not (ROOT / "shards" / "testing.py").exists()
    assert importlib.util.find_spec("shards.testing") is None
    assert (ROOT / "tests" / "loopback.py").is_file()
