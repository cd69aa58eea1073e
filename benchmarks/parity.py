"""How close the parity tests' outputs are to the references, next to the tolerance each test asserts.

Runs the parity tests' own functions (tests/test_fixture_*.py, tests/test_convert_hf.py,
tests/test_convert_hf_conditional.py) with ``torch.testing.assert_close`` replaced by a recorder:
every comparison a test makes is measured (max |ours - reference|) and checked against the
tolerance the test passes, and nothing raises, so a number is printed even where it would fail.
What is compared, on which inputs, is therefore exactly what the tests compare:

- the official fixtures in ../shared/fixtures/official (DINO, Sparse DETR, Focus-DETR, Salience
  DETR, SAM-DETR, SAM-DETR + SMCA), read as tests/conftest.py's ``official`` fixture and
  tests/released.py's ``official_fixture_file`` read them; near-tied ranking decisions go the
  fixture's way through tests/ties.py's ``follow_fixture``, as in the tests, and its own check
  (ranked scores position by position within 1e-4) is listed as "ranked scores (ties rule)";
- Hugging Face Deformable DETR (two-stage + refinement R50: one image, a padded batch, the run
  folder ``sparsedet convert`` writes; single-stage R18 with and without refinement) and
  Conditional DETR (R50: one image then a padded batch, and the run folder), random perturbed
  weights built by tests/released.py;

plus two sensitivity figures that no test asserts:

- Focus-DETR in float32 against float64: our converted model run in both precisions on the
  fixture's inputs (the fixture's picks in both), max |difference| of each decoder layer's logits;
- SMCA switched off in the converted SAM-DETR + SMCA model (the Gaussian prior dropped, weights
  unchanged): how far its outputs move from the fixture's, i.e. what the SMCA test would see if the
  prior were missing.

Needs ../shared/fixtures (it ships beside the repository in CI), transformers and pytest
(the tests' helpers import it). About 3 minutes on 2 shared CPU threads.

    python benchmarks/parity.py            # summary table
    python benchmarks/parity.py --detail   # and every comparison
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network, before transformers is imported

import torch  # noqa: E402

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from conftest import SHARED  # noqa: E402  (importing conftest sets 2 threads, as the tests run)

from sparsedet.tools.bench import environment, format_environment  # noqa: E402

_assert_close = torch.testing.assert_close


class Recorder:
    """Stands in for torch.testing.assert_close: measures, checks, never raises."""

    def __init__(self):
        self.rows: list[dict] = []

    def __call__(self, actual, expected, *, rtol=None, atol=None, **kwargs):
        frame = inspect.currentframe().f_back
        label, kind = _label(frame)
        if actual.shape != expected.shape:
            diff, ok = math.nan, False
        else:
            diff = (actual.detach().double() - expected.detach().double()).abs().max().item() if actual.numel() else 0.0
            try:
                _assert_close(actual, expected, rtol=rtol, atol=atol, **kwargs)
                ok = True
            except AssertionError:
                ok = False
        seen = sum(r["label"] == label for r in self.rows)
        self.rows.append({"label": label, "call": seen + 1, "kind": kind, "diff": diff, "atol": atol, "rtol": rtol,
                          "ok": ok})


def _label(frame) -> tuple[str, str]:
    """What a comparison compares: the fixture key, read from the test's source line or locals."""
    if frame.f_code.co_name == "wrapped":  # tests/ties.py follow_fixture's own check
        return "ranked scores (ties rule)", "ties"
    local = frame.f_locals
    if isinstance(local.get("key"), str):  # the tests' close(ours, key) helpers
        return local["key"], "output"
    line = "".join(inspect.getframeinfo(frame).code_context or [])
    m = re.search(r'expected(?:\[(f?)"([^"]+)"\]|\.(\w+))', line)
    if m and m.group(2):
        return (m.group(2).format(**local) if m.group(1) else m.group(2)), "output"
    if m:
        return m.group(3), "output"
    return line.strip()[:60], "output"


def official(name):
    """tests/conftest.py's ``official`` fixture: (rebuilt state dict, inputs, outputs, manifest)."""
    from safetensors.torch import load_file
    folder = SHARED / "fixtures" / "official"
    spec = importlib.util.spec_from_file_location("fixture_state_dict", folder / "state_dict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return (module.official_state_dict(str(folder / name)), load_file(str(folder / name / "inputs.safetensors")),
            load_file(str(folder / name / "outputs.safetensors")),
            json.loads((folder / name / "manifest.json").read_text()))


def tolerance(row) -> str:
    if row["atol"] is None:
        return "default"
    return f"atol {row['atol']:.0e}" + (f" + rtol {row['rtol']:.0e}" if row["rtol"] else "")


# --- the checks: each runs one test function (or two sensitivity measurements) --------------------------


def fixture_checks(tmp: Path):
    import test_fixture_dino
    import test_fixture_focus_detr
    import test_fixture_salience_detr
    import test_fixture_sam_detr
    import test_fixture_sparse_detr
    yield ("official DINO", "tests/test_fixture_dino.py",
           lambda: test_fixture_dino.test_official_dino_fixture_matches(official, SHARED, tmp))
    yield ("official Sparse DETR", "tests/test_fixture_sparse_detr.py",
           lambda: test_fixture_sparse_detr.test_official_sparse_detr_fixture_matches(official, SHARED, tmp, "ours"))
    yield ("official Focus-DETR", "tests/test_fixture_focus_detr.py",
           lambda: test_fixture_focus_detr.test_official_focus_detr_fixture_matches(official, SHARED, tmp))
    yield ("official Salience DETR", "tests/test_fixture_salience_detr.py",
           lambda: test_fixture_salience_detr.test_official_salience_detr_fixture_matches(official, SHARED, tmp,
                                                                                           "ours"))
    for name in ("sam_detr", "sam_detr_smca"):
        yield (f"official {'SAM-DETR + SMCA' if 'smca' in name else 'SAM-DETR'}", "tests/test_fixture_sam_detr.py",
               lambda name=name: test_fixture_sam_detr.test_official_sam_detr_fixture_matches(official, SHARED, tmp,
                                                                                                name))


def hf_checks(tmp: Path):
    import test_convert_hf
    import test_convert_hf_conditional
    from released import hf_conditional_detr, hf_deformable_detr

    from sparsedet.tools.convert import convert
    from sparsedet.tools.convert.hf_deformable_detr import convert_hf_deformable_detr

    state = {}

    def deformable():  # test_convert_hf.py's module fixtures hf_model, converted, our_model
        if "deformable" not in state:
            t = test_convert_hf
            directory = tmp / "hf_deformable"
            hf = hf_deformable_detr(directory, 50, True, True, t.LAYERS, t.QUERIES)
            ours = t._our_model("deformable_detr_r50_two_stage", convert_hf_deformable_detr(directory))
            state["deformable"] = (hf, directory), ours
        return state["deformable"]

    def conditional():  # test_convert_hf_conditional.py's module fixtures hf_model, converted
        if "conditional" not in state:
            t = test_convert_hf_conditional
            directory = tmp / "hf_conditional"
            hf = hf_conditional_detr(directory, 50, t.LAYERS, t.QUERIES, t.NUM_CLASSES)
            state["conditional"] = (hf, directory), convert("hf-conditional-detr", directory)
        return state["conditional"]

    def sub(name):
        path = tmp / name
        path.mkdir(exist_ok=True)
        return path

    t = test_convert_hf
    yield ("HF Deformable DETR two-stage R50, one image", "tests/test_convert_hf.py",
           lambda: t.test_outputs_match_hf(*deformable()))
    yield ("HF Deformable DETR two-stage R50, padded batch", "tests/test_convert_hf.py",
           lambda: t.test_padded_batch_matches_hf(*deformable()))
    yield ("HF Deformable DETR two-stage R50, CLI run folder", "tests/test_convert_hf.py",
           lambda: t.test_cli_convert_writes_a_run_that_predicts_like_hf(deformable()[0], sub("cli_deformable")))
    for refine in (False, True):
        yield (f"HF Deformable DETR single-stage R18, {'with' if refine else 'no'} refinement, padded batch",
               "tests/test_convert_hf.py",
               lambda refine=refine: t.test_single_stage_matches_hf(sub(f"single_{refine}"), refine))
    c = test_convert_hf_conditional
    yield ("HF Conditional DETR R50, one image [1] then padded batch [2]", "tests/test_convert_hf_conditional.py",
           lambda: c.test_outputs_match_hf(*conditional()))
    yield ("HF Conditional DETR R50, CLI run folder", "tests/test_convert_hf_conditional.py",
           lambda: c.test_cli_convert_writes_a_run(conditional()[0], sub("cli_conditional")))


def smca_off_check(tmp: Path):
    """The SAM-DETR + SMCA test with the converted model's SMCA prior switched off."""
    import test_fixture_sam_detr

    from sparsedet.models.decoders.sam import SamDecoderLayer

    def convert_without_smca(*args, **kwargs):
        model, config = original(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, SamDecoderLayer):
                module.smca = False
        return model, config

    def run():
        test_fixture_sam_detr.convert = convert_without_smca
        try:
            test_fixture_sam_detr.test_official_sam_detr_fixture_matches(official, SHARED, tmp, "sam_detr_smca")
        finally:
            test_fixture_sam_detr.convert = original

    original = test_fixture_sam_detr.convert
    yield ("sensitivity: SAM-DETR + SMCA fixture, SMCA off in our model", "tests/test_fixture_sam_detr.py setup", run)


def focus_precision(tmp: Path) -> list[tuple[str, float]]:
    """Our converted Focus-DETR on the fixture's inputs in float32 and float64, set up as
    tests/test_fixture_focus_detr.py (the fixture's picks in both): max |fp32 - fp64| per decoder layer."""
    from conftest import StoredFeatures
    from released import official_fixture_file
    from ties import best_class, follow_fixture, picks_by_value

    from sparsedet.data.batch import Batch
    from sparsedet.tools.convert import convert

    path, inputs, expected, _ = official_fixture_file("focus_detr", official, SHARED, tmp)
    outs = {}
    for dtype in (torch.float32, torch.float64):
        model, _ = convert("official-focus-detr", path)
        model = model.to(dtype)
        model.backbone = StoredFeatures([inputs[f"features.res{i}"].to(dtype) for i in (3, 4, 5)])
        B, _, h, w = inputs["features.res3"].shape
        model.queries.select = follow_fixture(model.queries.select,
                                             picks_by_value(expected["enc.pred_logits"], best_class), best_class)
        with torch.no_grad():
            outs[dtype] = model(Batch(torch.zeros(B, 3, h * 8, w * 8, dtype=dtype),
                                      torch.zeros(B, h * 8, w * 8, dtype=torch.bool)))
    a, b = outs[torch.float32], outs[torch.float64]
    layers = [aux.logits for aux in a.aux] + [a.logits], [aux.logits for aux in b.aux] + [b.logits]
    return [(f"decoder layer {i} logits", (x.double() - y).abs().max().item()) for i, (x, y) in enumerate(zip(*layers))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detail", action="store_true", help="also print every comparison")
    p.add_argument("--skip-hf", action="store_true", help="only the official fixtures")
    args = p.parse_args()
    if not (SHARED / "fixtures" / "official").is_dir():
        sys.exit(f"{SHARED / 'fixtures' / 'official'} is absent (it ships with the project's CI, not with a clone)")
    start = time.perf_counter()
    results = []
    recorder = Recorder()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checks = [*fixture_checks(tmp), *([] if args.skip_hf else hf_checks(tmp)), *smca_off_check(tmp)]
        torch.testing.assert_close = recorder
        try:
            for name, test, run in checks:
                recorder.rows = []
                error = None
                try:
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                        run()
                except Exception as e:  # a plain assert or a ties-rule assert in the test
                    error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                results.append((name, test, recorder.rows, error))
        finally:
            torch.testing.assert_close = _assert_close
        precision = focus_precision(tmp)
    seconds = time.perf_counter() - start

    print(format_environment(environment(torch.device("cpu"), "float32")))
    print(f"transformers {_version('transformers')}; {seconds:.0f} s\n")
    print("| check | compared | asserted | measured max abs diff | passes |")
    print("|---|---|---|---:|---|")
    for name, test, rows, error in results:
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            groups.setdefault((r["kind"], tolerance(r)), []).append(r)
        for (kind, tol), group in groups.items():
            what = "ranked scores (ties rule)" if kind == "ties" else _keys(group)
            worst = max(group, key=lambda r: -1 if math.isnan(r["diff"]) else r["diff"])
            where = "" if kind == "ties" else f" (`{worst['label']}`)"
            passes = "yes" if all(r["ok"] for r in group) else "no" + (
                " (the test would catch it)" if name.startswith("sensitivity") else "")
            print(f"| {name} (`{test}`) | {what} | {tol} | {worst['diff']:.1e}{where} | {passes} |")
        if error:
            print(f"| {name} (`{test}`) | stopped: {error} | | | no |")
    print("| sensitivity: our Focus-DETR, float32 against float64 | "
          + ", ".join(f"layer {i}: {d:.1e}" for i, (_, d) in enumerate(precision)) + " | not asserted | "
          f"{precision[-1][1]:.1e} (final logits) | |")

    if args.detail:
        print("\n| check | compared | call | asserted | max abs diff | passes |")
        print("|---|---|---:|---|---:|---|")
        for name, _, rows, _ in results:
            for r in rows:
                print(f"| {name} | {r['label']} | {r['call']} | {tolerance(r)} | {r['diff']:.2e} | "
                      f"{'yes' if r['ok'] else 'no'} |")
        for label, diff in precision:
            print(f"| Focus-DETR float32 vs float64 | {label} | 1 | not asserted | {diff:.2e} | |")


def _keys(group: list[dict]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in group))
    if len(labels) <= 4:
        return ", ".join(f"`{k}`" for k in labels)
    return f"{len(labels)} outputs (`{labels[0]}` ... `{labels[-1]}`)"


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except ImportError:
        return "absent"


if __name__ == "__main__":
    main()
