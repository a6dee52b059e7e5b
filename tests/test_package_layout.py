"""The package's layout rule, as each subpackage's docstring states it: imports go one way,
tools -> capsules / dropins / decompose -> _core, and _core uses only the compiled
libraries and the version module (no imports of its own) at the package root. Read from the source, nothing is imported."""

import ast
import os
import subprocess
import sys

import pytest

import tf_smallmm

PACKAGE = os.path.dirname(os.path.abspath(tf_smallmm.__file__))
# What each subpackage may import from tf_smallmm: "" is the package itself (its public
# names), other names are subpackages or modules at the package root.
ALLOWED = {
    "_core": {"_core", "_smallmm_core", "_version"},
    "dropins": {"_core", "dropins"},
    "capsules": {"_core", "capsules"},
    "decompose": {"decompose"},
    "keras2": {"capsules", "keras2"},
    "tools": {"", "_core", "capsules", "decompose", "dropins", "layers", "tools"},
}


def imported_parts(path):
    """The first component below tf_smallmm of every tf_smallmm import in a file."""
    with open(path) as f:
        tree = ast.parse(f.read())
    parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "tf_smallmm":
                names = [f"tf_smallmm.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "tf_smallmm":
                parts.add("")
            elif name.startswith("tf_smallmm."):
                parts.add(name.split(".")[1])
    return parts


@pytest.mark.parametrize("subpackage", sorted(ALLOWED))
def test_imports_go_one_way(subpackage):
    folder = os.path.join(PACKAGE, subpackage)
    modules = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    assert "__init__.py" in modules
    for module in modules:
        path = os.path.join(folder, module)
        extra = imported_parts(path) - ALLOWED[subpackage]
        assert not extra, f"{subpackage}/{module} imports tf_smallmm {sorted(extra)}"


@pytest.mark.parametrize("subpackage", sorted(ALLOWED))
def test_each_subpackage_says_what_it_holds_and_may_import(subpackage):
    with open(os.path.join(PACKAGE, subpackage, "__init__.py")) as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    assert doc and "import" in doc


@pytest.mark.slow
def test_building_without_tensorflow_says_what_to_do_in_one_sentence(tmp_path):
    """What `pip install .` with build isolation meets: no TensorFlow importable."""
    # The checkout these tests are in (the package itself may be an installed copy).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['tensorflow'] = None\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp",
                          str(tmp_path / "temp"), "--build-lib", str(tmp_path / "lib")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "install tensorflow (or tensorflow-cpu) 2.21 first" in out.stderr
    assert "--no-build-isolation" in out.stderr
