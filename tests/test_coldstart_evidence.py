"""The evidence a cold-start measurement reads: phases from the engine's log, and cache roots that
keep every compiled kernel where the artifact carries it (SPEC §6)."""

from __future__ import annotations

import pytest

from harness.engines.coldstart import CacheRoots, parse_phases

# Lines from a compiled vLLM CPU 0.32.0 start (reports/logs/cpu-coldstart-cold.log of a .ci/run).
CPU_LOG = """\
(Worker pid=14549) INFO 11-30 00:49:59 [base_loader.py:82] Initializing model took 0.067740 seconds
(Worker pid=14549) INFO 11-30 00:49:59 [default_loader.py:501] Loading weights took 0.00 seconds
(Worker pid=14549) INFO 11-30 00:50:00 [cpu_model_runner.py:87] Warming up model for the compilation...
(Worker pid=14549) INFO 11-30 00:50:18 [monitor.py:91] [backbone] Initial profiling/warmup run took 0.01 s
(EngineCore pid=14539) INFO 11-30 00:50:19 [core.py:402] init engine (profile, create kv cache, warmup model) took 18.39 s
"""

# vLLM 0.32.0's GPU lines, rendered from its format strings (compilation/monitor.py "%storch.compile
# took %.2f s in total", v1/engine/core.py's init line with "(compilation: %.2f s)",
# v1/worker/gpu_model_runner.py "Graph capturing finished in %.0f secs, took %.2f GiB" and
# mm_encoder_model_runner.py's "Encoder graph capturing ..."), two workers (tp=2) printing each.
GPU_LOG = """\
(Worker_TP0 pid=1) INFO [default_loader.py:502] Loading weights took 3.21 seconds
(Worker_TP1 pid=2) INFO [default_loader.py:502] Loading weights took 3.40 seconds
(Worker_TP0 pid=1) INFO [monitor.py:62] [backbone] torch.compile took 9.87 s in total
(Worker_TP0 pid=1) INFO [monitor.py:62] [encoder] torch.compile took 1.50 s in total
(Worker_TP0 pid=1) INFO [mm_encoder_model_runner.py:95] Encoder graph capturing finished in 2 secs, took 0.10 GiB (4 graphs)
(Worker_TP0 pid=1) INFO [gpu_model_runner.py:6582] Graph capturing finished in 7 secs, took 0.45 GiB
(EngineCore pid=0) INFO [core.py:386] init engine (profile, create kv cache, warmup model) took 31.02 s (compilation: 11.37 s \u2014 language_model: 9.87 s, encoder: 1.50 s)
"""


def test_a_cpu_start_reports_its_weight_load_and_engine_init_and_no_compile_of_its_own():
    phases = parse_phases(CPU_LOG)
    assert phases == {"model_init": 0.06774, "weight_load": 0.0, "engine_init": 18.39}


def test_a_gpu_start_reports_the_whole_compile_time_and_the_decoder_graph_capture():
    phases = parse_phases(GPU_LOG)
    assert phases["compile"] == 11.37  # the init line's total, not one graph's
    assert phases["engine_init"] == 31.02
    assert phases["graph_capture"] == 7.0  # not the encoder's
    assert phases["weight_load"] == 3.40  # the last worker's


def test_without_the_init_total_the_compile_time_is_the_torch_compile_line():
    assert parse_phases("INFO [monitor.py:62] [backbone] torch.compile took 9.87 s in total\n")["compile"] == 9.87
    # vLLM before 0.11 said "takes"
    assert parse_phases("INFO torch.compile takes 4.20 s in total\n")["compile"] == 4.2


def test_a_log_without_phase_lines_has_no_phases_rather_than_zeros():
    assert parse_phases("INFO starting the API server\n") == {}


def test_every_cache_root_a_start_writes_is_under_its_base_and_the_carried_ones_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("DG_JIT_CACHE_DIR", "/somewhere/else")
    roots = CacheRoots(tmp_path / "run")
    env = roots.env()
    for name in ("VLLM_CACHE_ROOT", "TMPDIR", "TRITON_CACHE_DIR", "DG_JIT_CACHE_DIR", "HOME", "XDG_CACHE_HOME"):
        assert env[name].startswith(str(roots.base)), name
    # DeepGEMM's kernels land inside the carried vLLM root whatever the host's environment says
    assert env["DG_JIT_CACHE_DIR"].startswith(str(roots.vllm) + "/")
    assert set(roots.reuse_set()) == {"vllm", "inductor", "triton"}
    assert roots.inductor.parent == roots.tmpdir


@pytest.mark.parametrize("kernel", ["a/b/kernel.so", "triton/x.cubin", "x/y.hsaco"])
def test_a_new_kernel_anywhere_under_the_roots_is_seen(tmp_path, kernel):
    roots = CacheRoots(tmp_path)
    before = roots.kernels()
    (tmp_path / kernel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / kernel).write_bytes(b"\0")
    assert roots.kernels() - before == {kernel}
