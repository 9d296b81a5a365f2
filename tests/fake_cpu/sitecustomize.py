"""Test-only: the tests' processes see a CPU without native bfloat16, whatever the machine has.

`--mixed-precision auto` (the default) picks bfloat16 on CPUs with native bfloat16, so the tests would
train differently on such a CPU. conftest.py runs this file in the test process and puts this folder
first on PYTHONPATH, so that every Python process the tests start imports it at start-up (as
`sitecustomize`). It points `kerastune_flow.runtime.device.CPUINFO` at an empty file as soon as that
module is imported: the package keeps no switch for the tests, and imports nothing early here.
A test that wants a CPU with bfloat16 patches `device.read_cpuinfo` or `device.CPUINFO` itself.
"""

import importlib.abc
import importlib.machinery
import os
import sys

MODULE = "kerastune_flow.runtime.device"


def fake(module) -> None:
    """A CPU whose /proc/cpuinfo lists no flags."""
    module.CPUINFO = os.devnull


class _Loader(importlib.abc.Loader):
    """The module's own loader, then `fake`."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        fake(module)

    def __getattr__(self, name):  # get_source, get_filename, ...: the real loader's
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if MODULE in sys.modules:
    fake(sys.modules[MODULE])
elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
