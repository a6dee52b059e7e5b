"""What a user installing tf_smallmm sees: the version from one place, the wheel's extras
pinning the TensorFlow release the library was built for, and one clear warning at import
when the running TensorFlow is another release."""

import importlib.metadata

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import tf_smallmm as smm
from conftest import run_python
from tf_smallmm import _version


def _installed_dist():
    """The installed distribution's metadata, or None for an in-tree build."""
    try:
        dist = importlib.metadata.distribution("tf_smallmm")
    except importlib.metadata.PackageNotFoundError:
        return None
    # An editable or stale install elsewhere says nothing about this package.
    files = [str(f) for f in dist.files or []]
    return dist if any(f.endswith("tf_smallmm/_version.py") for f in files) else None


def test_version_comes_from_one_place():
    assert smm.__version__ == _version.__version__
    Version(smm.__version__)  # a valid PEP 440 version
    dist = _installed_dist()
    if dist is not None:
        assert dist.version == smm.__version__


def test_extras_pin_the_tensorflow_release_the_library_was_built_for():
    dist = _installed_dist()
    if dist is None:
        pytest.skip("tf_smallmm is not installed as a distribution (in-tree build)")
    built = Version(smm.build_info()["tf_version"])
    want = {"cpu": "tensorflow-cpu", "gpu": "tensorflow"}
    found = {}
    for line in dist.requires or []:
        req = Requirement(line)
        for extra, name in want.items():
            if req.name == name and req.marker is not None and req.marker.evaluate(
                    {"extra": extra}):
                found[extra] = req
    assert set(found) == set(want), dist.requires
    same_minor = Version(f"{built.major}.{built.minor}.9")
    next_minor = Version(f"{built.major}.{built.minor + 1}.0")
    for req in found.values():
        assert same_minor in req.specifier and next_minor not in req.specifier, req
    assert "and-cuda" in found["gpu"].extras
    # The bare package pulls no TensorFlow.
    bare = [Requirement(r) for r in dist.requires or []]
    assert not [r for r in bare if r.marker is None and r.name.startswith("tensorflow")]


@pytest.mark.slow
def test_another_tensorflow_release_warns_once_at_import_and_falls_back():
    out = run_python("""
        import warnings, tensorflow as tf
        built = tf.__version__
        tf.__version__ = "2.99.0"  # as if another release were installed
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import tf_smallmm as smm
            at_import = [str(x.message) for x in w if "TensorFlow" in str(x.message)]
            y = smm.matmul(tf.ones([3, 2, 2]), tf.ones([3, 2, 2]))
            later = [str(x.message) for x in w if "TensorFlow" in str(x.message)]
        print(len(at_import), len(later))
        print(at_import[0])
        print(float(tf.reduce_sum(y)), smm.kernels_loaded())
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    counts, msg, result = out.stdout.strip().splitlines()[-3:]
    assert counts == "1 1"  # warned at import, not again on first use
    built = smm.build_info()["tf_version"]
    release = ".".join(built.split(".")[:2])
    for text in ("2.99.0", built, f"tensorflow-cpu=={release}.*", "tf_smallmm[cpu]",
                 "--no-build-isolation"):
        assert text in msg, (text, msg)
    assert result == "24.0 False"
