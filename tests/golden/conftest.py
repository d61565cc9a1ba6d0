"""nbval runs each golden notebook in a kernel it starts in the notebook's setup, before its
first cell; that kernel gets ``GOLDEN_KERNEL_ENV`` (kernel_env.py), and only it: the setting is
undone as soon as the kernel has started. Run folders go to outputs/golden/ as when they were
made."""
import pytest

from kernel_env import golden_kernel_env  # this folder is on sys.path (pytest's prepend mode)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with golden_kernel_env():
        yield
