"""The package's layout rule, as each subpackage's docstring states it: imports go one way,
tools -> capsules / dropins / decompose -> _core, and _core uses only the compiled
libraries and the version module (no imports of its own) at the package root. Read from the source, nothing is imported."""

import ast
import os

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
