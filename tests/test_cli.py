"""`python -m harness`: the three command contracts, and errors that say what was wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.text_model import make_text_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_text_model(tmp_path_factory.mktemp("cli") / "model")


def test_card_prints_the_card_json(model):
    out = harness("card", str(model), "--name", "acme/Tiny-Llama", "--worker-type", "decode", "--block-size", "32")
    assert out.returncode == 0, out.stderr
    card = json.loads(out.stdout)
    assert card["slug"] == "acme_tiny-llama" and card["worker_type"] == "decode"
    assert card["kv_cache_block_size"] == 32 and card["needs"] == [["prefill"]]


def test_card_with_a_self_host_url_points_every_file_at_the_worker(model):
    out = harness("card", str(model), "--name", "m", "--self-host-url", "http://127.0.0.1:8000")
    card = json.loads(out.stdout)
    assert card["model_info"]["hf_config_json"]["path"].startswith("http://127.0.0.1:8000/v1/metadata/")
    assert card["extra_files"], "self-host cards list extra files"


def test_local_dir_defaults_to_home_cache_and_touches_nothing(model, tmp_path, hermetic_home):
    card_json = tmp_path / "card.json"
    card_json.write_text(harness("card", str(model), "--name", "m").stdout)
    out = harness("local-dir", str(card_json))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(hermetic_home / ".cache" / "dynamo" / "mdc" / "by-slug" / "m"))
    assert not (hermetic_home / ".cache" / "dynamo").exists()


def test_resolve_prints_the_local_dir_it_filled(model, tmp_path):
    card_json = tmp_path / "card.json"
    card_json.write_text(harness("card", str(model), "--name", "m").stdout)
    out = harness("resolve", str(card_json), "--cache-root", str(tmp_path / "mdc"))
    assert out.returncode == 0, out.stderr
    local_dir = Path(out.stdout.strip())
    assert local_dir.parent.parent == tmp_path / "mdc" / "by-slug" and (local_dir / "config.json").is_symlink()


def test_a_bad_card_exits_1_with_one_line_naming_the_problem(tmp_path):
    card_json = tmp_path / "card.json"
    card_json.write_text(json.dumps({"display_name": "m", "extra_files": [{"path": "/x", "checksum": "md5:00"}]}))
    out = harness("resolve", str(card_json), "--cache-root", str(tmp_path / "mdc"))
    assert out.returncode == 1
    assert out.stderr.strip() == "error: checksum 'md5:00' uses algorithm 'md5'; only 'blake3' is accepted"
    assert not (tmp_path / "mdc").exists()


def test_a_missing_model_dir_exits_1(tmp_path):
    out = harness("card", str(tmp_path / "nope"), "--name", "m")
    assert out.returncode == 1 and "does not exist" in out.stderr


def test_artifact_pack_then_install_through_the_cli(tmp_path, capsys):
    from harness.artifacts.server import ArtifactServer
    from harness.cli import main

    (tmp_path / "src" / "torch_compile_cache").mkdir(parents=True)
    (tmp_path / "src" / "torch_compile_cache" / "graph.py").write_text("g = 1\n")
    (tmp_path / "identity.json").write_text(json.dumps({"engine": "vllm-cpu", "engine_version": "0.32.0"}))
    assert main(["artifact", "pack", "--root", f"vllm={tmp_path / 'src'}", "--out", str(tmp_path / "art"),
                 "--identity", str(tmp_path / "identity.json")]) == 0
    aid = capsys.readouterr().out.strip()
    (tmp_path / "other.json").write_text(json.dumps({"engine": "vllm-cpu", "engine_version": "0.33.0"}))
    with ArtifactServer(tmp_path / "art") as server:
        install = ["artifact", "install", "--source", server.url, "--id", aid, "--root", f"vllm={tmp_path / 'dst'}",
                   "--state-dir", str(tmp_path / "state"), "--identity"]
        assert main(install + [str(tmp_path / "other.json")]) == 0
        assert "skipped: " in capsys.readouterr().out and not (tmp_path / "dst").exists()
        assert main(install + [str(tmp_path / "identity.json")]) == 0
    assert capsys.readouterr().out.startswith("installed: 1 files")
    assert (tmp_path / "dst" / "torch_compile_cache" / "graph.py").read_text() == "g = 1\n"


def test_a_bad_root_option_exits_1_naming_it(tmp_path, capsys):
    from harness.cli import main

    assert main(["artifact", "pack", "--root", "no-equals-sign", "--out", str(tmp_path)]) == 1
    assert "--root 'no-equals-sign' must be LABEL=DIR" in capsys.readouterr().err


def test_interpose_prints_the_urls_to_give_a_router_and_the_options_to_check_it(tmp_path):
    import os
    import signal

    import requests

    from fixtures.fake_engine import FakeEngine
    from harness.interposer import InterposedEngine

    with FakeEngine("prefill") as prefill, FakeEngine("decode") as decode:
        proc = subprocess.Popen([sys.executable, "-m", "harness", "interpose", "--engine", f"prefill={prefill.url}",
                                 "--engine", f"decode={decode.url}"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            lines = [proc.stdout.readline() for _ in range(5)]
            assert lines[0].startswith("prefill: give the router http://127.0.0.1:") and prefill.url in lines[0]
            relay_url, control_url = lines[0].split()[4], lines[0].split("control ")[1].rstrip(")\n")
            assert requests.post(f"{relay_url}/v1/completions", json={"model": "m", "prompt": [1, 2], "max_tokens": 1},
                                 timeout=10).status_code == 200
            relay = InterposedEngine(control_url).connect()
            assert relay.role == "prefill" and relay.exchanges()[-1].body["prompt"] == [1, 2]
            assert f"--interposed prefill={control_url}" in lines[3] and f"--engine-url decode={decode.url}" in lines[3]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_interpose_with_an_engine_that_is_not_role_url_is_an_error_naming_it():
    out = harness("interpose", "--engine", "aggregated=http://127.0.0.1:1")
    assert out.returncode == 1 and "--engine 'aggregated=http://127.0.0.1:1' must be ROLE=URL" in out.stderr
