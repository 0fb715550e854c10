"""Test configuration.

The Triton kernels are exercised on the CPU through Triton's interpreter, which must be
switched on before anything imports triton. Set GRPO_TEST_NATIVE=1 on a GPU machine to
run the same suite against the compiled kernels instead.
"""
import os

if os.environ.get("GRPO_TEST_NATIVE") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402


def _interpreter_index_on_numpy_2_4() -> None:
    """Triton < 3.8's interpreter turns a kernel's int argument into a shape-(1,) array and calls
    int() on it in `range(0, V, BLOCK)`, which NumPy >= 2.4 refuses (TypeError at every loop with a
    runtime bound). Triton 3.8 squeezes the array first; do the same for older interpreters. Only
    the interpreter (CPU tests) is patched: the compiled kernels of triton 3.6 are unaffected."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_squeezes_index", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._squeezes_index = True
    interpreter._patch_lang_tensor = patched


_interpreter_index_on_numpy_2_4()

# The interpreter is slow and the machine has two cores: few examples per property. Local
# runs draw fresh examples every time; CI draws from a fixed seed, so a green run is
# reproducible; "soak" is for long hunts for edge cases.
settings.register_profile("default", max_examples=12, deadline=None)
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True, database=None)
settings.register_profile("soak", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))


@pytest.fixture(autouse=True)
def _restore_environ():
    """Every test starts from the same os.environ: whatever a test sets, changes or removes is put
    back afterwards. Under transformers 4.57, `GRPOConfig(bf16=True)` sets
    ACCELERATE_MIXED_PRECISION, which then leaks into every later test (and trainer)."""
    saved = dict(os.environ)
    yield
    for key in [key for key in os.environ if key not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
