"""Test configuration.

The Triton kernels are exercised on the CPU through Triton's interpreter, which must be
switched on before anything imports triton. Set GRPO_TEST_NATIVE=1 on a GPU machine to
run the same suite against the compiled kernels instead: the tensors the tests create
without naming a device are then made on the GPU (see _TestTensorsOn), so the kernels run
on CUDA tensors. GRPO_TEST_DEVICE names that device explicitly ("cuda", "cuda:1"; "cpu"
exercises the redirection itself on a machine without a GPU; "none" turns it off).
"""
import inspect
import os
import sys

if os.environ.get("GRPO_TEST_NATIVE") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402


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


# --- GRPO_TEST_NATIVE=1: the tests' tensors on the GPU ------------------------------------------

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
# Tests whose source contains one of these keep CPU tensors in native mode: they check argument
# validation, whose value checks run on the host for CPU tensors only (on a device they poison the
# loss with NaN instead: SPEC section 12), or they manipulate the interpreter switch itself.
CPU_CONTRACT_WORDS = ("pytest.raises(", "eager_cpu", "TRITON_INTERPRET")


def tensor_device() -> torch.device | None:
    """Where tensors the tests create without a device go: None leaves them on the CPU."""
    name = os.environ.get("GRPO_TEST_DEVICE")
    if name is None:
        native = os.environ.get("GRPO_TEST_NATIVE") == "1"
        return torch.device("cuda") if native and torch.cuda.is_available() else None
    return None if name.lower() in ("", "none") else torch.device(name)


TENSOR_DEVICE = tensor_device()


def _from_test_code() -> bool:
    """Whether the factory call being intercepted comes from a file under tests/ (the first
    caller outside torch's own Python code), so that the library's own CPU tensors stay put."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
        frame = frame.f_back
    return frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(TESTS_DIR)


class _TestTensorsOn(TorchFunctionMode):
    """A factory call in test code that names no device (torch.randn(..., generator=g),
    torch.zeros, torch.tensor, ...) makes its tensor on the CPU, exactly as on a CPU run (the
    tests draw from CPU generators, so the values are the same), and moves it to `device`; a
    tensor created with requires_grad=True is a leaf on the device. Calls that name a device
    or an `out`, and every call from outside tests/, are left alone."""

    def __init__(self, device: torch.device):
        super().__init__()
        from torch.utils._device import _device_constructors

        self.device = device
        self.constructors = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if (func not in self.constructors or kwargs.get("device") is not None or kwargs.get("out") is not None
                or not _from_test_code()):
            return func(*args, **kwargs)
        requires_grad = kwargs.pop("requires_grad", False)
        out = func(*args, **kwargs).to(self.device)
        return out.requires_grad_(True) if requires_grad else out


def _to_device(value, device: torch.device):
    """CPU tensors in a (nested) parameter value moved to `device`; everything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device) if value.device.type == "cpu" and device.type != "cpu" else value
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_to_device(v, device) for v in value)
    return value


def keeps_cpu_tensors(item) -> bool:
    if item.get_closest_marker("cpu_tensors") is not None:
        return True
    try:
        source = inspect.getsource(inspect.unwrap(item.function))
    except (AttributeError, OSError, TypeError):
        return False
    return any(word in source for word in CPU_CONTRACT_WORDS)


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_tensors: keep the CPU tensors the test makes under GRPO_TEST_NATIVE=1 "
                                       "(argument-validation tests: their value checks are a CPU contract)")


def pytest_report_header(config):
    if TENSOR_DEVICE is not None:
        return (f"grpo_kernels tests: tensors made by test code go to {TENSOR_DEVICE} (tests with "
                f"{' / '.join(CPU_CONTRACT_WORDS)} in their source, or marked cpu_tensors, keep CPU tensors)")
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """Under GRPO_TEST_DEVICE / GRPO_TEST_NATIVE=1 on a GPU, run the test with its tensors on that
    device: its parametrized tensors moved, and the tensors it makes redirected (_TestTensorsOn)."""
    device = TENSOR_DEVICE
    if device is None or keeps_cpu_tensors(pyfuncitem):
        yield
        return
    callspec = getattr(pyfuncitem, "callspec", None)
    for name in (callspec.params if callspec is not None else {}):
        if name in pyfuncitem.funcargs:
            pyfuncitem.funcargs[name] = _to_device(pyfuncitem.funcargs[name], device)
    with _TestTensorsOn(device):
        yield
