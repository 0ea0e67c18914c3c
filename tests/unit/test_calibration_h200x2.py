"""The shipped 2xH200 calibration (configs/calibration/h200x2-llama3-8b.json, fitted by experiments.gpu_calibrate to
results/h200x2/sweep-idle) is what the router's `auto` starts from with configs/h200x2-llama3-8b.yaml: the path
resolves from the repo root, the Router restores it through its own start-up path, and it only applies to the
deployment it was fitted for."""

from __future__ import annotations

import json

import httpx
import pytest

from experiments import gpu_calibrate
from ppd import specs
from ppd.calibration import _Batch, features
from ppd.config import REPO_ROOT, load_config, resolve_path
from ppd.costmodel import FITTED_FIELDS
from ppd.sglang.client import SGLangClient
from router.backends import BackendPool
from router.metrics import RouterMetrics
from router.routing import Router

CONFIG = REPO_ROOT / "configs" / "h200x2-llama3-8b.yaml"
SHIPPED = REPO_ROOT / "configs" / "calibration" / "h200x2-llama3-8b.json"
SWEEP = REPO_ROOT / "results" / "h200x2" / "sweep-idle" / "sweep.json"


def make_router(overrides: list[str] | None = None) -> Router:
    cfg = load_config(CONFIG, overrides)
    metrics = RouterMetrics()
    return Router(cfg, BackendPool(cfg, SGLangClient(httpx.AsyncClient()), metrics), metrics)


def test_config_names_the_shipped_file_relative_to_the_repo_root():
    cfg = load_config(CONFIG)
    assert cfg.router.calibration_path == "configs/calibration/h200x2-llama3-8b.json"
    assert resolve_path(cfg.router.calibration_path) == SHIPPED
    assert SHIPPED.is_file()


def test_router_restores_the_fit_at_start():
    state = json.loads(SHIPPED.read_text())
    router = make_router()
    auto = router.default_policy
    assert auto.name == "auto"
    assert auto.calibrator.restored_from is not None
    for f in FITTED_FIELDS:
        assert getattr(auto.params, f) == pytest.approx(state["fitted"][f]), f
    # the fit moved the model off the specs (else shipping it would change nothing)
    assert auto.params.link_bytes_per_s != pytest.approx(auto.describe()["prior"]["link_bytes_per_s"])
    assert auto.describe()["calibration"]["restored"] is True


def test_restored_parameters_predict_the_sweep_better_than_the_specs():
    """The values the router starts from reproduce the measured TTFTs of the sweep they were fitted to far better
    than the specs do (fit record: results/h200x2/analysis/calibration_fit.json): a stale or mistyped file would not."""
    auto = make_router().default_policy
    obs = gpu_calibrate.observations(json.loads(SWEEP.read_text()))
    assert len(obs) == 288  # the full 72-point grid x 4 policies

    def median_err(params):
        batch = _Batch([features(o, params) for o in obs])
        pred = batch.predict({f: float(getattr(params, f)) for f in FITTED_FIELDS})[0]
        errs = sorted(abs(p / o.ttft_ms - 1.0) for p, o in zip(pred, obs, strict=True))
        return errs[len(errs) // 2]

    fitted, specs_only = median_err(auto.params), median_err(auto._static_params)
    assert fitted < 0.10 < specs_only


def test_fit_is_not_applied_to_another_link():
    auto = make_router(["sglang.transport=tcp", "link.kind=mooncake-tcp"]).default_policy
    assert auto.calibrator.restored_from is None
    assert auto.params.link_bytes_per_s == pytest.approx(specs.link("mooncake-tcp").bytes_per_s)  # not the fit
