"""One engine start, timed over HTTP, with the evidence of whether it reused compiled work (SPEC §6).

A start is measured from process start to `/health` 200, then to the first token of a fixed
request. Phases come from the engine's log where it prints them. Reuse is read off the disk: a
start that compiled nothing new leaves no new kernel (`*.so` on CPU, Triton cubins on GPU) under
its cache roots; vLLM 0.32's "Compiling model again due to a load failure" line shows up on every
non-cold start and proves nothing either way.

Every start gets its own cache roots: `VLLM_CACHE_ROOT`, a `TMPDIR` of its own (inductor's
precompiled header lives under `TMPDIR/torchinductor_<user>`, and a shared one would make a "cold"
start silently warm), Triton's cache dir, and a HOME of its own for whatever else caches there.
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from harness.engines.launcher import EngineProcess, Progress, free_port, log_end, log_since, stderr_progress
from harness.engines.profiles import EngineProfile

KERNEL_GLOBS = ("*.so", "*.cubin", "*.hsaco")
# name -> patterns in priority order, each with one number in seconds, as vLLM 0.32.0 prints them
# (format strings read in its source: model_loader/default_loader.py, base_loader.py, v1/engine/core.py,
# compilation/monitor.py, v1/worker/gpu_model_runner.py). The compile total is the init line's
# "(compilation: X s)" where vLLM adds it; else the per-graph "torch.compile took X s in total" line
# ("takes" before 0.11). vLLM CPU compiles inside the warm-up and prints neither: there the compile
# cost is only visible inside engine_init.
PHASES = {
    "weight_load": (r"Loading weights took ([0-9.]+) s",),
    "model_init": (r"Initializing model took ([0-9.]+) s",),
    "compile": (r"init engine \(profile, create kv cache, warmup model\) took [0-9.]+ s \(compilation: ([0-9.]+) s",
                r"torch\.compile (?:took|takes) ([0-9.]+) s in total"),
    "engine_init": (r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s",),
    "graph_capture": (r"(?<!Encoder )Graph capturing finished in ([0-9.]+) sec",),
}


@dataclass(frozen=True)
class CacheRoots:
    """Where one engine start keeps (and finds) its compiled work."""

    base: Path

    @property
    def vllm(self) -> Path:
        return self.base / "vllm-cache"

    @property
    def tmpdir(self) -> Path:
        return self.base / "tmp"

    @property
    def inductor(self) -> Path:
        return self.tmpdir / f"torchinductor_{getpass.getuser()}"

    @property
    def triton(self) -> Path:
        return self.base / "triton-cache"

    def env(self) -> dict[str, str]:
        for d in (self.vllm, self.tmpdir, self.inductor, self.triton):
            d.mkdir(parents=True, exist_ok=True)
        home = self.base / "home"  # caches keyed under HOME (~/.cache/...) must not make a cold start warm
        home.mkdir(exist_ok=True)
        # DeepGEMM's JIT kernels go to DG_JIT_CACHE_DIR, which vLLM defaults to <vllm root>/deep_gemm only
        # when it is unset: pinned there, so a value inherited from the host cannot take them out of
        # the carried vLLM root.
        return {"VLLM_CACHE_ROOT": str(self.vllm), "TMPDIR": str(self.tmpdir), "TRITON_CACHE_DIR": str(self.triton),
                "DG_JIT_CACHE_DIR": str(self.vllm / "deep_gemm"), "HOME": str(home),
                "XDG_CACHE_HOME": str(home / ".cache")}

    def reuse_set(self) -> dict[str, Path]:
        """What must be carried for a start to reuse this one's work (SPEC §6), by artifact label:
        vLLM's root (torch_compile_cache, modelinfos, deep_gemm), inductor's dir under TMPDIR (the
        precompiled header on CPU) and Triton's (GPU kernels; empty on CPU)."""
        return {"vllm": self.vllm, "inductor": self.inductor, "triton": self.triton}

    def kernels(self) -> set[str]:
        return {str(p.relative_to(self.base)) for g in KERNEL_GLOBS for p in self.base.rglob(g)}


@dataclass
class StartRun:
    mode: str
    health_s: float | None = None
    first_token_s: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    kernels_before: int = 0
    new_kernels: list[str] = field(default_factory=list)
    log: str | None = None

    @property
    def reused(self) -> bool:
        return not self.new_kernels

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["new_kernels"] = len(self.new_kernels)
        out["reused"] = self.reused
        return out


def parse_phases(log_text: str) -> dict[str, float]:
    """The last value each phase printed (a start may print a phase once per worker)."""
    out = {}
    for name, patterns in PHASES.items():
        for pattern in patterns:
            found = re.findall(pattern, log_text)
            if found:
                out[name] = float(found[-1])
                break
    return out


def timed_start(profile: EngineProfile, model_dir: Path, served_name: str, roots: CacheRoots, mode: str,
                log_dir: Path, python: str, progress: Progress = stderr_progress, prompt: str = "Hello",
                name: str | None = None) -> StartRun:
    """Start a compiled engine on `roots`, time /health and the first token, stop it; read the evidence."""
    run = StartRun(mode, kernels_before=len(roots.kernels()))
    before = roots.kernels()
    spec = profile.launch_spec("aggregated", model_dir, served_name, free_port(), free_port(), roots.base,
                               python, compiled=True, name=name or f"{profile.name}-coldstart-{mode}")
    spec = dataclasses.replace(spec, env={**spec.env, **roots.env(), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    engine = EngineProcess(spec, log_dir)
    log_start = log_end(engine.log_path)
    engine.start()
    try:
        run.health_s = engine.wait_healthy(profile.startup_timeout_s, progress)
        resp = requests.post(f"{engine.url}/v1/completions", timeout=profile.request_timeout_s, json={
            "model": served_name, "prompt": prompt, "max_tokens": 1, "temperature": 0.0})
        resp.raise_for_status()
        run.first_token_s = time.monotonic() - engine.started_at
    finally:
        engine.stop()
    run.phases = parse_phases(log_since(engine.log_path, log_start))
    run.new_kernels = sorted(roots.kernels() - before)
    run.log = str(engine.log_path)
    progress(f"[coldstart {mode}] /health {run.health_s:.1f} s, first token {run.first_token_s:.1f} s, "
             f"phases {run.phases}, new kernels {len(run.new_kernels)}")
    return run


IDENTITY_PROBE = r"""
import json, platform
out = {"python": platform.python_version()}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        out["gpu_arch"] = "sm_%d%d" % torch.cuda.get_device_capability(0)
except Exception:
    pass
for name in ("vllm", "sglang", "triton"):
    try:
        out[name] = __import__(name).__version__
    except Exception:
        pass
print(json.dumps(out))
"""


def source_identity(python: str, profile: EngineProfile, model_dir: Path) -> dict:
    """What must match for a compile cache to be reused (SPEC §6): model, engine and its version,
    torch, CUDA and Triton, GPU architecture, parallelism, dtype and quantization."""
    import json
    import subprocess

    probe = json.loads(subprocess.run([python, "-c", IDENTITY_PROBE], capture_output=True, text=True,
                                      timeout=300, check=True).stdout.strip().splitlines()[-1])
    raw = (Path(model_dir) / "config.json").read_bytes()
    config = json.loads(raw)
    # The dir's name alone would let two models under one name share a cache; the config is what
    # vLLM's compile cache keys on (shapes, layers), so its hash is part of the identity.
    return {"model": Path(model_dir).name, "model_config_sha256": hashlib.sha256(raw).hexdigest(),
            "architectures": config.get("architectures"), "engine": profile.engine,
            "engine_version": probe.get(profile.engine), "torch": probe.get("torch"), "cuda": probe.get("cuda"),
            "triton": probe.get("triton"), "gpu_arch": probe.get("gpu_arch", "cpu"), "tp": 1, "pp": 1,
            "dtype": profile.dtype, "quantization": config.get("quantization_config", {}).get("quant_method")}
