"""Test-session settings shared by every test file.

OMP_WAIT_POLICY=PASSIVE: on a 2-core machine shared with other work (CI, the subprocesses several tests
start), OpenMP threads that spin while waiting made single CPU steps 10-50x slower. It must be set before
torch is imported, which is why it lives here and not in a fixture; subprocesses inherit it.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
