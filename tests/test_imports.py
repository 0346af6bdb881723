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


def declared(section: str) -> dict[str, str]:
    """{import name: distribution} of pyproject's runtime dependencies or of one optional extra."""
    import re
    import tomllib
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] if section == "runtime" else project["optional-dependencies"][section]
    dists = [re.match(r"[A-Za-z0-9_.\-]+", d).group(0) for d in names]
    imports = {"pillow": "PIL", "opencv-python-headless": "cv2", "open_clip_torch": "open_clip"}
    return {imports.get(d.lower(), d.lower().replace("-", "_")): d for d in dists}


def test_runtime_dependencies_are_exactly_what_the_package_imports():
    import sys
    imported = set().union(*(imported_roots(f) for f in PACKAGE.rglob("*.py")))
    third_party = {r for r in imported if r not in sys.stdlib_module_names and r not in ("minifusion", "bench")}
    runtime, optional = declared("runtime"), {**declared("ui"), **declared("canny")}
    assert third_party - runtime.keys() - optional.keys() == set()  # nothing imported that install would miss
    # nothing declared that is never imported, but open_clip, whose package only supplies the BPE vocabulary file
    assert runtime.keys() - third_party == {"open_clip"}


def package_modules_imported(path: Path) -> set[str]:
    """The minifusion modules a file imports: `from . import x`, `from .x import y`, `minifusion.x`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("minifusion")):
            module = (node.module or "").removeprefix("minifusion").lstrip(".")
            found.update([module.split(".")[0]] if module else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("minifusion."))
    return found


def test_front_ends_share_the_request_model_not_each_other():
    """The web UI once imported the command line's __main__ for its defaults and rules; the front ends (the command
    line, the page and its server) now meet only in minifusion.request and minifusion.settings."""
    command_line = {"__main__", "command", "progress"}
    web = {"ui", "studio", "app"}
    for f in sorted(PACKAGE.rglob("*.py")):
        name = f.stem
        imported = package_modules_imported(f)
        if name not in command_line:
            assert not imported & command_line, (f.name, imported & command_line)
        if name not in web:
            assert not imported & web, (f.name, imported & web)
    assert {"request", "settings"} <= package_modules_imported(PACKAGE / "studio.py")
    assert "request" in package_modules_imported(PACKAGE / "command.py")


def test_the_front_end_check_sees_an_import_of_the_command_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from . import __main__ as cli\nfrom .command import run\nimport minifusion.progress\n")
    assert package_modules_imported(bad) == {"__main__", "command", "progress"}
