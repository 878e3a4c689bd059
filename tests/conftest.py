"""Test-session set-up: transformers' log handler, and the hypothesis profiles.

Hypothesis profiles (select with HYPOTHESIS_PROFILE=<name>, or pytest's --hypothesis-profile):
`ci` (the default) runs 4 examples per property test, so the suite stays fast; `long` runs
300 per test (tests/test_random_architectures.py: well over half an hour on one core).
HYPOTHESIS_MAX_EXAMPLES=N sets another number under either profile. Tests that set
max_examples themselves keep it.
"""

import os

import torch
from hypothesis import HealthCheck, settings
from transformers.utils import logging as hf_logging

# transformers binds its log handler to the sys.stderr of its first use. Make that use now,
# at collection, not inside a test whose captured stderr pytest closes afterwards (later
# warnings would then print "--- Logging error ---" tracebacks into other tests' stderr).
hf_logging.get_logger("transformers")

# `make test` runs one pytest process per core (pytest-xdist): one torch thread each, so the
# processes do not fight over the cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=4, deadline=None, suppress_health_check=_SLOW_OK)
settings.register_profile("long", max_examples=300, deadline=None, suppress_health_check=_SLOW_OK)
_profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if os.environ.get("HYPOTHESIS_MAX_EXAMPLES"):  # the profile, with another number of examples
    settings.register_profile(
        f"{_profile}-n",
        settings.get_profile(_profile),
        max_examples=int(os.environ["HYPOTHESIS_MAX_EXAMPLES"]),
    )
    _profile = f"{_profile}-n"
settings.load_profile(_profile)
