"""Test configuration.

The Triton kernels are exercised on the CPU through Triton's interpreter, which must be
switched on before anything imports triton. Set GRPO_TEST_NATIVE=1 on a GPU machine to
run the same suite against the compiled kernels instead.
"""
import os

if os.environ.get("GRPO_TEST_NATIVE") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

from hypothesis import settings  # noqa: E402

# The interpreter is slow and the machine has two cores: few, fresh examples per property.
settings.register_profile("default", max_examples=12, deadline=None, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
