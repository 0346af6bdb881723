"""minifusion/ never imports the reference implementations: they are test oracles only."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minifusion"
FORBIDDEN = {"diffusers", "transformers", "open_clip"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            roots.add(str(node.args[0].value).split(".")[0])
    return roots


def test_package_does_not_import_reference_implementations():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 5
    offenders = {str(f.relative_to(PACKAGE)): sorted(imported_roots(f) & FORBIDDEN) for f in files}
    assert {f: r for f, r in offenders.items() if r} == {}


def test_the_check_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom diffusers.models import UNet2DConditionModel\n"
                   "import importlib\nimportlib.import_module('open_clip')\n")
    assert imported_roots(bad) & FORBIDDEN == {"diffusers", "open_clip"}
