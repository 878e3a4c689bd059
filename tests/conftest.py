"""Test-session set-up."""

from transformers.utils import logging as hf_logging

# transformers binds its log handler to the sys.stderr of its first use. Make that use now,
# at collection, not inside a test whose captured stderr pytest closes afterwards (later
# warnings would then print "--- Logging error ---" tracebacks into other tests' stderr).
hf_logging.get_logger("transformers")
