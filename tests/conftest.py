import importlib.util
import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter on CPU tensors; this
# must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# triton is optional (the [test] extra installs it on Linux, where its wheels
# exist); without it the tests marked `triton` skip and say why.
NO_TRITON = "needs the triton package, which is not installed (pip install triton; Linux wheels only)"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "triton: needs the triton package (skipped without it)")


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("triton") is None:
        skip_triton = pytest.mark.skip(reason=NO_TRITON)
        for item in items:
            if item.get_closest_marker("triton") is not None:
                item.add_marker(skip_triton)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def key_form(request):
    """(indirect param, see contract.KEY_FORMS) "python" hides the C++ form from gates built in the test; "cpp" uses it."""
    from contract import key_form_of

    with key_form_of(request.param):
        yield request.param
