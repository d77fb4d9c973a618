"""Test-session settings shared by every test file.

OMP_WAIT_POLICY=PASSIVE: on a 2-core machine shared with other work (CI, the subprocesses several tests
start), OpenMP threads that spin while waiting made single CPU steps 10-50x slower. It must be set before
torch is imported, which is why it lives here and not in a fixture; subprocesses inherit it.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib  # noqa: E402  (after the environment is set)

import pytest  # noqa: E402


@pytest.fixture
def nan_images_at_step(monkeypatch):
    """nan_images_at_step(k): a context in which the model's training forward gets NaN images at optimizer
    step k (one forward per step without --accum-steps): how a test makes the loss non-finite where it
    wants (train.py has no option for it)."""
    @contextlib.contextmanager
    def inject(step):
        from model import CILFCIAE
        forward, calls = CILFCIAE.forward, iter(range(10 ** 9))
        with monkeypatch.context() as patch:
            patch.setattr(CILFCIAE, "forward", lambda self, images: forward(
                self, images * float("nan") if self.training and next(calls) == step else images))
            yield
    return inject
