"""Stack configs: the shipped ones load; a bad file or override raises ConfigError naming the bad field."""

from __future__ import annotations

import json

import pytest

from ppd.config import REPO_ROOT, ConfigError, load_config, resolve_path, to_dict

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_has_its_model(path):
    cfg = load_config(path)
    assert cfg.servers
    assert (resolve_path(cfg.model.path) / "config.json").is_file()
    json.dumps(to_dict(cfg))  # results files embed it


def test_local_is_the_embedded_default_and_h200_pins_gpus():
    local = load_config(REPO_ROOT / "configs" / "local.yaml")
    assert local.backend == "emulated" and local.mode == "disaggregated"
    assert local.model.served_name == "llama-3-8b" and local.router.port == 8000
    h200 = load_config(REPO_ROOT / "configs" / "h200x2-llama3-8b.yaml")
    assert h200.backend == "sglang"
    assert [s.gpu_ids for s in h200.prefill] == [(0,)] and [s.gpu_ids for s in h200.decode] == [(1,)]
    assert h200.sglang.version == "0.5.10.post1" and h200.sglang.transport == "nvlink"


@pytest.mark.parametrize(
    ("override", "field", "why"),
    [
        ("router.port=abc", "router.port", "valid integer"),
        ("router.prot=8000", "router.prot", "Unexpected keyword argument"),
        ("sglang.transport=infiniband", "sglang.transport", "'nvlink' or 'tcp'"),
        ("backend=vllm", "backend", "'emulated' or 'sglang'"),
        ("prefill.0.gpu_ids=zero", "prefill.0.gpu_ids", "valid tuple"),
        ("emulator.time_scale=fast", "emulator.time_scale", "valid number"),
        ("decode.0.port=[1]", "decode.0.port", "valid integer"),
    ],
)
def test_a_bad_field_is_named(override, field, why):
    with pytest.raises(ConfigError) as info:
        load_config(REPO_ROOT / "configs" / "local.yaml", [override])
    msg = str(info.value)
    assert f"{field}: " in msg and why in msg
    assert msg.startswith(str(REPO_ROOT / "configs" / "local.yaml"))


def test_cross_field_rules_name_what_is_missing():
    with pytest.raises(ConfigError, match="bootstrap_port"):
        load_config(REPO_ROOT / "configs" / "local.yaml", ["prefill.0.bootstrap_port=null"])
    with pytest.raises(ConfigError, match="at least one prefill and one decode"):
        load_config(REPO_ROOT / "configs" / "local.yaml", ["decode=[]"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("router: {port: 8000\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    bad.write_text("mode: disaggregated\nprefill: [{port: 1, bootstrap_port: 2}]\ndecode: [{port: 3, gpu: 7}]\n")
    with pytest.raises(ConfigError, match=r"decode\.0\.gpu: Input should be a valid string"):
        load_config(bad)


def test_overrides_are_yaml_typed_and_reach_list_entries():
    cfg = load_config(
        REPO_ROOT / "configs" / "local.yaml",
        ["decode.0.port=31001", "router.policy=decode", "emulator.time_scale=0.5", "sglang.decode_local_append=true"],
    )
    assert cfg.decode[0].port == 31001 and cfg.router.policy == "decode"
    assert cfg.emulator.time_scale == 0.5 and cfg.sglang.decode_local_append is True
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(REPO_ROOT / "configs" / "local.yaml", ["router.port"])
