"""The exact processes `ppd launch` starts (what `--dry-run` prints): CI's check of the GPU launch plan."""

from __future__ import annotations

import pytest

from launch.cli import ready_banner
from launch.plan import launch_plan
from ppd.cli import main
from ppd.config import REPO_ROOT, ConfigError, load_config

LOCAL = REPO_ROOT / "configs" / "local.yaml"
H200 = REPO_ROOT / "configs" / "h200x2-llama3-8b.yaml"
MODEL_DIR = str(REPO_ROOT / "configs" / "models" / "llama-3-8b")
PY = "python3"

SGLANG_COMMON = [
    "--model-path", MODEL_DIR,
    "--load-format", "dummy",
    "--skip-tokenizer-init",
    "--enable-metrics",
    "--incremental-streaming-output",
    "--attention-backend", "triton",
    "--sampling-backend", "pytorch",
    "--mem-fraction-static", "0.8",
    "--chunked-prefill-size", "8192",
]  # fmt: skip
NO_NVLS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
NVLINK = {"MC_INTRANODE_NVLINK": "1", "SGLANG_MOONCAKE_SEND_AUX_TCP": "1"}


def plan(path, overrides=()):
    return launch_plan(load_config(path, list(overrides)), path, list(overrides), python=PY)


def test_local_plan_is_two_emulated_servers_then_the_router():
    specs = plan(LOCAL)
    cfg = str(LOCAL)
    assert [(s.name, s.role) for s in specs] == [("prefill-0", "prefill"), ("decode-0", "decode"), ("router", "router")]
    assert [list(s.argv) for s in specs] == [
        [PY, "-m", "ppd.emulator", "--config", cfg, "--role", "prefill", "--index", "0"],
        [PY, "-m", "ppd.emulator", "--config", cfg, "--role", "decode", "--index", "0"],
        [PY, "-m", "router", "--config", cfg],
    ]
    assert all(dict(s.env) == {} for s in specs)
    assert [s.health_url for s in specs] == [
        "http://127.0.0.1:30100/health",
        "http://127.0.0.1:30200/health",
        "http://127.0.0.1:8000/ready",
    ]
    assert [s.ports for s in specs] == [(30100, 8998), (30200,), (8000,)]


def test_overrides_reach_every_child_and_move_its_ports():
    sets = ["prefill.0.port=41000", "router.policy=decode", "router.port=41002"]
    specs = plan(LOCAL, sets)
    flags = ["--set", "prefill.0.port=41000", "--set", "router.policy=decode", "--set", "router.port=41002"]
    assert all(list(s.argv[-6:]) == flags for s in specs)
    assert specs[0].url == "http://127.0.0.1:41000" and specs[-1].url == "http://127.0.0.1:41002"


def test_h200_plan_prefill_on_gpu0_decode_on_gpu1_mooncake_over_nvlink():
    specs = plan(H200)
    prefill, decode, router = specs
    assert list(prefill.argv) == [PY, "-m", "sglang.launch_server", *SGLANG_COMMON,
        "--host", "127.0.0.1", "--port", "31000",
        "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "mooncake",
        "--disaggregation-bootstrap-port", "8998"]  # fmt: skip
    assert list(decode.argv) == [PY, "-m", "sglang.launch_server", *SGLANG_COMMON,
        "--host", "127.0.0.1", "--port", "31001",
        "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "mooncake"]  # fmt: skip
    assert dict(prefill.env) == {**NO_NVLS, **NVLINK, "CUDA_VISIBLE_DEVICES": "0"}
    assert dict(decode.env) == {**NO_NVLS, **NVLINK, "CUDA_VISIBLE_DEVICES": "1"}
    assert list(router.argv) == [PY, "-m", "router", "--config", str(H200)]
    # the router binds 0.0.0.0 but is checked and advertised on loopback
    assert router.health_url == "http://127.0.0.1:8000/ready"
    assert prefill.health_url == "http://127.0.0.1:31000/health"


def test_h200_plan_over_tcp_with_local_append_and_extra_flags():
    sets = [
        "sglang.transport=tcp",
        "sglang.decode_local_append=true",
        "sglang.extra_args=[--log-level,debug]",
        "sglang.env={SGLANG_DISAGGREGATION_WAITING_TIMEOUT: '30'}",
        "decode.0.extra_args=[--max-running-requests,'64']",
    ]
    prefill, decode, _ = plan(H200, sets)
    assert prefill.argv[2] == "sglang.launch_server"  # only decode servers run our wrapper
    assert decode.argv[2] == "ppd.sglang.ext.launch_server"
    assert list(decode.argv[3:]) == [*SGLANG_COMMON, "--host", "127.0.0.1", "--port", "31001",
        "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "mooncake",
        "--log-level", "debug", "--max-running-requests", "64"]  # fmt: skip
    assert list(prefill.argv[-2:]) == ["--log-level", "debug"]
    tcp = {**NO_NVLS, "MC_FORCE_TCP": "1", "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "30"}
    assert dict(prefill.env) == {**tcp, "CUDA_VISIBLE_DEVICES": "0"}
    assert dict(decode.env) == {**tcp, "CUDA_VISIBLE_DEVICES": "1"}


def test_colocated_sglang_servers_are_plain_sglang():
    sets = ["mode=colocated", "prefill=[]", "decode=[]", "colocated=[{port: 31000, gpu_ids: [0, 1]}]"]
    server, router = plan(H200, sets)
    assert list(server.argv) == [PY, "-m", "sglang.launch_server", *SGLANG_COMMON, "--host", "127.0.0.1",
        "--port", "31000"]  # fmt: skip
    assert not any(a.startswith("--disaggregation") for a in server.argv)
    assert dict(server.env) == {**NO_NVLS, "CUDA_VISIBLE_DEVICES": "0,1"}
    assert router.name == "router"


def test_model_path_must_hold_config_json(tmp_path):
    with pytest.raises(ConfigError, match="model.path: .* config.json"):
        plan(H200, [f"model.path={tmp_path}"])
    (tmp_path / "config.json").write_text("{}")
    assert plan(H200, [f"model.path={tmp_path}"])[0].argv[4] == str(tmp_path)


def test_two_listeners_on_one_port_are_refused_naming_both():
    with pytest.raises(ConfigError, match="router.port: port 30200 is already decode.0.port"):
        plan(LOCAL, ["router.port=30200"])


def test_dry_run_prints_one_line_per_process_with_env(capsys):
    assert main(["launch", "--config", str(H200), "--dry-run", "--set", "sglang.transport=tcp"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("CUDA_VISIBLE_DEVICES=0 MC_FORCE_TCP=1 NCCL_NVLS_ENABLE=0 ")
    assert " -m sglang.launch_server --model-path " in lines[0]
    assert lines[0].endswith("--disaggregation-bootstrap-port 8998")
    assert lines[2].endswith(f"-m router --config {H200} --set sglang.transport=tcp")


def test_bad_config_exits_2_naming_the_field(capsys):
    assert main(["launch", "--config", str(LOCAL), "--dry-run", "--set", "router.port=abc"]) == 2
    assert "router.port: Input should be a valid integer" in capsys.readouterr().err


def test_ready_banner_is_a_working_curl_line():
    cfg = load_config(LOCAL)
    banner = ready_banner(cfg, plan(LOCAL)[-1])
    assert banner.startswith("AppendRouter ready at http://127.0.0.1:8000 (policy auto)")
    assert "curl http://127.0.0.1:8000/v1/chat/completions" in banner and '"model": "llama-3-8b"' in banner
