"""The environment the goldens' kernels run in, when they are made (``regenerate.py``) and when
nbval checks them (``conftest.py``): the same on every machine.

- No progress bars: their timings differ on every run.
- One torch thread (OpenMP and MKL): a training run's last bits depend on how its reductions
  are split between threads, and two cells of the goldens printed other values with one
  thread than with two. Pinned, the goldens compare on any number of cores, and a kernel of
  one thread costs no barrier waits when the goldens run beside other work.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

GOLDEN_KERNEL_ENV = {"HANDCLIP_PROGRESS": "off", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextmanager
def golden_kernel_env():
    """``GOLDEN_KERNEL_ENV`` in ``os.environ`` while a kernel starts (it inherits it); the
    previous values afterwards, so nothing else in the process sees them."""
    before = {name: os.environ.get(name) for name in GOLDEN_KERNEL_ENV}
    os.environ.update(GOLDEN_KERNEL_ENV)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
