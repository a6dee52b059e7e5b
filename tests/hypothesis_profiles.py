"""Hypothesis settings profiles for the property suites (imported by each test module that
uses hypothesis; not a test module itself).

  ci       bounded example counts, no deadline: the whole property suite in about a
           minute on 2 shared cores. The default.
  nightly  many more examples per test (run by hand or on a schedule).
  dev      a handful of examples, for iterating on a test.

Select a profile with the environment variable ``HYPOTHESIS_PROFILE=nightly`` or with
hypothesis' own pytest option ``--hypothesis-profile=nightly``. That option is read when
pytest configures plugins, before test modules are imported, so the profiles must be
registered by then: load this module as a plugin too,
``python -m pytest -p tests.hypothesis_profiles --hypothesis-profile=nightly tests/...``
(the option wins over the environment variable).
"""

import os
import sys

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,  # TF's first call of each op/shape traces and allocates: timing is noise
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.function_scoped_fixture],
    "print_blob": True,  # a failure prints @reproduce_failure(...) to replay it exactly
}

settings.register_profile("ci", max_examples=100, **_COMMON)
settings.register_profile("nightly", max_examples=5000, **_COMMON)
settings.register_profile("dev", max_examples=5, **_COMMON)


def _profile_given_on_command_line():
    args = sys.argv + os.environ.get("PYTEST_ADDOPTS", "").split()
    return any(a.startswith("--hypothesis-profile") for a in args)


if not _profile_given_on_command_line():
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
