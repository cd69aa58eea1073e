"""The README's claim: a new token-sparse method is one encoder file plus one preset, shipped as an
installable package (examples/plugin). Its module runs here, then the new method trains, is
supervised by the loss its base declares, and its selection differs from the base's cascade.
Installed, the package's kinds load in a fresh process by its entry point: a run saved with its
encoder evaluates, predicts and serves with nothing imported by hand."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import require_module
from tiny import two_images
from sparsedet import Detector
from sparsedet.losses.criterion import SetCriterion
from sparsedet.models.encoders import ENCODERS
from sparsedet.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
README, PLUGIN = ROOT / "README.md", ROOT / "examples" / "plugin"
MODULE = PLUGIN / "sparsedet_flat_focus" / "__init__.py"


def test_the_readme_shows_the_example_package():
    section = README.read_text()[README.read_text().index("### A new token-sparse method"):]
    assert re.search(r"```python\n(.*?)```", section, re.S).group(1) == MODULE.read_text()
    assert 'flat_focus = "sparsedet_flat_focus"' in section and "[project.entry-points.\"sparsedet.plugins\"]" in section


def test_the_example_adds_a_method_that_trains():
    namespace: dict = {}
    try:
        exec(compile(MODULE.read_text(), str(MODULE), "exec"), namespace)
        model = Detector.from_preset("flat_focus_detr_tiny", num_classes=3)
        assert type(model.encoder).__name__ == "FlatFocusEncoder"
        torch.manual_seed(0)
        model.train()
        batch, targets = two_images()
        out = model(batch, targets)
        layers = out.selection.layers
        assert all(torch.equal(s.indices, layers[0].indices) for s in layers)  # one set, no cascade
        terms = SetCriterion.for_model(model.config)(out, targets)  # Focus-DETR's foreground loss
        assert torch.isfinite(terms["loss_select"]) and terms["loss_select"] > 0
        terms["loss_select"].backward()
        assert sum(p.grad.abs().sum() for p in model.encoder.scorer.parameters()) > 0
    finally:  # leave the tables as the other tests expect them
        ENCODERS.pop("flat_focus", None)
        PRESETS.pop("flat_focus_detr_tiny", None)


SMALL = ("hidden_dim=64, ffn_dim=64, num_decoder_layers=1, num_queries=10, dn_queries=4, eval_size=64, "
         "eval_max_size=96, **{'backbone.width': 8}")


def test_an_installed_plugin_loads_where_its_runs_go(tmp_path, synth, monkeypatch):
    require_module("fastapi", "serve")
    from live_server import start_server
    source = shutil.copytree(PLUGIN, tmp_path / "plugin")  # the build writes next to its sources
    # No build isolation: the venv's setuptools ([dev] pins it) builds it, with no index to reach.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    # A fresh process: only the entry point brings the plug-in in.
    run = tmp_path / "run"
    listed = subprocess.run([sys.executable, "-c", "from sparsedet import Detector; from sparsedet.cli import main; "
                             f"main(['presets']); Detector.from_preset('flat_focus_detr_tiny', num_classes=5, "
                             f"{SMALL}).save_pretrained({str(run)!r})"], capture_output=True, text=True, check=True)
    assert "flat_focus_detr_tiny" in listed.stdout
    live = start_server(run)
    try:
        assert live.request("/v1/model").json()["encoder"] == "flat_focus"
        image = next((Path(synth["root"]) / "images" / "val").glob("*.png"))
        assert live.predict(image.read_bytes()).status == 200
    finally:
        assert live.stop() == 0


def test_a_run_whose_encoder_no_plugin_provides_says_what_to_install(tmp_path):
    from sparsedet.errors import SparsedetError
    torch.manual_seed(0)
    model = Detector.from_preset("focus_detr_tiny", num_classes=3)
    model.config.encoder.kind = "from_an_absent_package"
    model.save_pretrained(tmp_path / "run")
    with pytest.raises(SparsedetError, match="unknown encoder kind 'from_an_absent_package'.*needs that package "
                       "installed.*'sparsedet.plugins'"):
        Detector.from_pretrained(tmp_path / "run")


def test_an_encoder_class_that_declares_nothing_is_refused_where_it_registers():
    from sparsedet.errors import SparsedetError
    from sparsedet.models.encoders import register_encoder
    with pytest.raises(SparsedetError, match="Loose does not declare supervision, config_fields, needs, single_level, "
                       "check, from_config; derive it from sparsedet.models.encoders.Encoder"):
        register_encoder("loose")(type("Loose", (torch.nn.Module,), {}))
    assert "loose" not in ENCODERS
