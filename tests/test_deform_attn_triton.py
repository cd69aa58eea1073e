"""The ``triton`` deformable-attention backend equals ``reference`` (output and the gradients of
value, locations and weights), run on the CPU by Triton's interpreter.

Triton interprets or compiles as ``TRITON_INTERPRET`` was when triton was imported (its own
library functions are interpreted then or never), and in a full run other tests import triton
first (``default_backend("cuda")``, torch.compile). So the kernel cases run in one fresh Python
process started with ``TRITON_INTERPRET=1`` (this file run as a script: ``main``), which reports
each case's result; the tests here read that report. The interpreter runs programs one after the
other in numpy, so the cases stay small. The op's wiring (backend choice, autograd, dtypes) is
tested in this process with the kernels stubbed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparsedet
from sparsedet.errors import SparsedetError
from sparsedet.ops import deform_attn, deform_attn_triton
from sparsedet.ops.deform_attn import ms_deform_attn

FP32_ATOL = 1e-5  # times max(1, the largest magnitude of the reference)
# One unit in the last place, relative: the kernels compute in fp32 and round once, but the
# interpreter truncates fp32 to bf16 (a GPU rounds to nearest), which costs up to one unit.
HALF_RTOL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


# --- the kernel cases, run by main() in a process of their own ------------------------------

def _inputs(seed, B, Q, shapes, M=2, D=3, P=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(B, S, M, D, generator=g).to(dtype)
    # Locations spill outside [0, 1] so that border and out-of-map samples are exercised.
    loc = (torch.rand(B, Q, M, L, P, 2, generator=g) * 1.4 - 0.2).to(dtype)
    weights = torch.rand(B, Q, M, L, P, generator=g).softmax(-1).to(dtype)
    return value, loc, weights


def _on_lines(seed, B, Q, shapes, M=3, D=4, P=4):
    """Locations picked from the special places of each level: pixel centres (x = i in pixel
    units, a bilinear cell's corner, where the gradient is one-sided), also as a model computes
    them (a centre plus whole-pixel offsets, in fp32: their rounding decides the cell), the map's
    edges (0 and 1), x = -1 and x = W (just outside, weight 0 but a gradient on one side), and far
    outside."""
    value, _, weights = _inputs(seed, B, Q, shapes, M=M, D=D, P=P)
    g = torch.Generator().manual_seed(seed + 1)
    loc = torch.empty(B, Q, M, len(shapes), P, 2)
    for lv, (h, w) in enumerate(shapes):
        for axis, n in ((0, w), (1, h)):
            centres = (torch.arange(n, dtype=torch.float32) + 0.5) / n
            shifted = (centres[:, None] + torch.arange(-2, 3, dtype=torch.float32) / n).flatten()
            picks = torch.cat([centres, shifted, torch.tensor([0.0, 1.0, -0.5 / n, 1 + 0.5 / n, -3.0, 2.5])])
            # Every pick at least once (B * Q * M * P >= len(picks)), in a random order per axis.
            which = torch.arange(B * Q * M * P)[torch.randperm(B * Q * M * P, generator=g)] % len(picks)
            loc[:, :, :, lv, :, axis] = picks[which].view(B, Q, M, P)
    return value, loc, weights


def _preset_calls(preset: str, limit: int = 2) -> list[tuple]:
    """Inputs of a tiny preset's own calls in one training forward: the first ``limit`` distinct
    (queries, level shapes) signatures (an encoder and a decoder call). One encoder and one decoder
    layer, a narrower FFN and backbone: the calls keep the preset's shapes (heads, channels per
    head, levels, points, queries), in a quarter of the time. At initialisation every sampling
    offset is a whole number of pixels, so the locations lie on pixel centres."""
    from sparsedet import Detector
    from sparsedet.data.batch import Batch
    torch.manual_seed(0)
    model = Detector.from_preset(preset, num_classes=3, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64,
                                 **{"backbone.width": 8}).train()
    g = torch.Generator().manual_seed(0)
    batch = Batch.from_images([torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 64, generator=g)])
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    calls, seen = [], set()
    original = deform_attn.ms_deform_attn

    def record(value, shapes, locations, weights, backend=None):
        key = (locations.shape[1], tuple(map(tuple, shapes)))
        if key not in seen and len(calls) < limit:
            seen.add(key)
            calls.append(([tuple(s) for s in shapes], value.detach().clone(), locations.detach().clone(),
                          weights.detach().clone()))
        return deform_attn._reference(value, shapes, locations, weights)  # not the op: see main()

    deform_attn.ms_deform_attn = record
    try:
        with torch.no_grad():  # the inputs are all this needs
            model(batch, targets)
    finally:
        deform_attn.ms_deform_attn = original
    return calls


def _grad_out(shape, dtype):
    # Drawn in fp32 and rounded once, so that low-precision runs and their fp32 truth share it.
    return torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)


def _reference(shapes, value, loc, weights, grad):
    """Output and gradients of the grid_sample reference (autograd through it), in fp32."""
    leaves = [t.detach().float().requires_grad_() for t in (value, loc, weights)]
    out = deform_attn._reference(leaves[0], shapes, leaves[1], leaves[2])
    return (out.detach(), *torch.autograd.grad(out, leaves, grad.float()))


def _triton(shapes, value, loc, weights, grad, block_rows=None):
    flat = [n for hw in shapes for n in hw]
    out = deform_attn_triton.forward(value, flat, loc, weights, block_rows=block_rows)
    return (out, *deform_attn_triton.backward(grad, value, flat, loc, weights, block_rows=block_rows))


def _compare(got, want, dtype) -> str | None:
    """None where every tensor matches, else what differs."""
    problems = []
    for name, a, b in zip(("output", "grad value", "grad locations", "grad weights"), got, want):
        if a.dtype != dtype:
            problems.append(f"{name}: dtype {a.dtype}, expected {dtype}")
            continue
        scale = max(1.0, b.abs().max().item())
        rtol = HALF_RTOL.get(dtype, 0.0)
        try:
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=FP32_ATOL * scale)
        except AssertionError as e:
            problems.append(f"{name}: {e}")
    return "; ".join(problems) or None


def _check(shapes, value, loc, weights, block_rows=None) -> str | None:
    """The kernels against the reference run in fp32 on the same numbers (for bf16/fp16 inputs too:
    the kernels compute in fp32, the reference would compute in bf16)."""
    grad = _grad_out((value.shape[0], loc.shape[1], value.shape[2] * value.shape[3]), value.dtype)
    got = _triton(shapes, value, loc, weights, grad, block_rows)
    return _compare(got, _reference(shapes, value, loc, weights, grad), value.dtype)


def _check_special_values() -> str | None:
    """A pixel centre reads that pixel; halfway between two reads their mean; outside, NaN and
    huge coordinates read zero (as the cpu backend)."""
    value = torch.arange(8, dtype=torch.float32).view(1, 8, 1, 1)
    w = torch.ones(1, 1, 1, 1, 1)
    expected = {(2.5 / 4, 1.5 / 2): 6.0, (2.0 / 4, 1.5 / 2): 5.5, (1.5, 1.5): 0.0, (float("nan"), 0.5): 0.0,
                (1e30, -1e30): 0.0}
    got = {xy: deform_attn_triton.forward(value, [2, 4], torch.tensor(xy).view(1, 1, 1, 1, 1, 2), w).item()
           for xy in expected}
    return None if got == expected else f"got {got}, expected {expected}"


ODD = [(3, 5), (2, 7), (1, 1)]
FOUR = [(9, 11), (5, 6), (3, 3), (2, 2)]
LINES = [(10, 11), (2, 7), (1, 1)]


def _check_preset(preset: str) -> str | None:
    calls = _preset_calls(preset)
    problems = [f"{c[0]}, {c[2].shape[1]} queries: {r}" for c in calls if (r := _check(*c)) is not None]
    queries = [c[2].shape[1] for c in calls]
    if len(queries) != 2 or queries[0] != 85:  # an encoder call (queries = the 85 tokens), a decoder call
        problems.append(f"recorded calls with {queries} queries; expected an encoder call (85) and a decoder call")
    return "; ".join(problems) or None


CASES = {
    "fp32 odd levels": lambda: _check(ODD, *_inputs(0, 2, 13, ODD, M=3, D=5, P=3)),
    "fp32 one level, one point, wide heads": lambda: _check([(4, 6)], *_inputs(1, 1, 9, [(4, 6)], M=2, D=32, P=1)),
    "fp32 four levels, eight heads": lambda: _check(FOUR, *_inputs(2, 2, 7, FOUR, M=8, D=8, P=4)),
    # 10 and 11 wide: some centres plus offsets there fall in another cell unless rounded once.
    "fp32 pixel centres, edges and outside": lambda: _check(LINES, *_on_lines(3, 2, 11, LINES)),
    "fp32 several programs, partial last block": lambda: _check(ODD, *_inputs(4, 2, 13, ODD), block_rows=16),
    "fp32 permuted (non-contiguous) inputs": lambda: _check(
        ODD, *(t.transpose(0, 1).contiguous().transpose(0, 1) for t in _inputs(7, 2, 5, ODD))),
    "bf16": lambda: _check(ODD, *_inputs(5, 2, 13, ODD, M=2, D=8, P=3, dtype=torch.bfloat16)),
    "fp16": lambda: _check(ODD, *_inputs(6, 2, 13, ODD, M=2, D=8, P=3, dtype=torch.float16)),
    "special values": _check_special_values,
    "dino_tiny's own calls": lambda: _check_preset("dino_tiny"),
}


def main() -> None:
    """Run every case and print one line: REPORT {name: None or what went wrong}. The op itself
    (a torch.library custom op) is not called here: its first call imports torch._dynamo, seconds
    this process does not need to spend."""
    assert deform_attn_triton.interpreted(), "run with TRITON_INTERPRET=1 set before triton is imported"
    torch.set_num_threads(2)
    report = {}
    for name, case in CASES.items():
        start, cpu = time.perf_counter(), time.process_time()
        try:
            report[name] = case()
        except Exception as e:  # reported per case, so that one failure does not hide the others
            report[name] = f"raised {type(e).__name__}: {e}"
        print(f"{time.perf_counter() - start:6.2f} s ({time.process_time() - cpu:5.2f} s CPU)  {name}",
              file=sys.stderr)
    print("REPORT " + json.dumps(report))


# --- the tests, in pytest's process -----------------------------------------------------------

def test_triton_kernels_match_reference_in_the_interpreter():
    # One test, not one per case: under xdist each worker that drew a case would start the process.
    from conftest import require_module
    require_module("triton", "dev")
    env = {k: v for k, v in os.environ.items() if k != deform_attn.ENV}
    env["TRITON_INTERPRET"] = "1"
    src = str(Path(sparsedet.__file__).resolve().parents[1])  # the sparsedet this process imported
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, f"the interpreter run failed ({done.returncode}):\n{done.stderr[-4000:]}"
    report = json.loads(lines[-1][len("REPORT "):])
    failed = {case: report.get(case, "not reported") for case in CASES if report.get(case, "not reported")}
    assert not failed, "\n".join(f"{case}: {problem}" for case, problem in failed.items()) + "\n" + done.stderr


def test_triton_is_the_cuda_default_where_it_imports(monkeypatch):
    monkeypatch.delenv(deform_attn.ENV, raising=False)
    assert "triton" in deform_attn.BACKENDS
    for importable, expected in ((True, "triton"), (False, "gather")):
        monkeypatch.setattr(deform_attn_triton, "_available", importable)
        assert deform_attn.default_backend("cuda") == expected
        assert deform_attn.default_backend("cpu") in ("cpu", "reference")  # never chosen for CPUs


def test_triton_on_cpu_tensors_outside_the_interpreter_is_refused(monkeypatch):
    # Stubbed, so that it runs where triton is absent too.
    monkeypatch.setattr(deform_attn_triton, "_available", True)
    monkeypatch.setattr(deform_attn_triton, "interpreted", lambda: False)
    monkeypatch.setattr(deform_attn_triton, "_interpret_requested", lambda: False)
    value, loc, weights = _inputs(0, 1, 3, [(2, 3)])
    message = (r"runs on CPU tensors only under Triton's interpreter, with TRITON_INTERPRET=1 set before triton is "
               r"imported: slow, meant for tests; on CPUs use backend='cpu'")
    with pytest.raises(SparsedetError, match=message):
        ms_deform_attn(value, [(2, 3)], loc, weights, backend="triton")
    monkeypatch.setenv(deform_attn.ENV, "triton")
    with pytest.raises(SparsedetError, match=message):
        ms_deform_attn(value, [(2, 3)], loc, weights)
    with pytest.raises(SparsedetError, match=message):
        deform_attn.default_backend("cpu")
    with pytest.raises(SparsedetError, match=message):
        deform_attn_triton.forward(value, [2, 3], loc, weights)
    # The variable set after triton was imported: too late, and the message says so.
    monkeypatch.setattr(deform_attn_triton, "_interpret_requested", lambda: True)
    with pytest.raises(SparsedetError, match=r"TRITON_INTERPRET=1 set before triton is imported \(it was set after"):
        deform_attn_triton.backward(torch.zeros(1, 3, 6), value, [2, 3], loc, weights)


def test_without_triton_the_backend_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    monkeypatch.setattr(deform_attn_triton, "_available", None)
    monkeypatch.setattr(deform_attn_triton, "_failure", None)
    assert not deform_attn_triton.available() and not deform_attn_triton.interpreted()
    assert deform_attn.default_backend("cuda") == "gather"
    value, loc, weights = _inputs(0, 1, 3, [(2, 3)])
    with pytest.raises(SparsedetError, match=r"needs triton, which does not import here \(ModuleNotFoundError: "
                                             r".*\); pip install triton, or use backend='gather'"):
        ms_deform_attn(value, [(2, 3)], loc, weights, backend="triton")
    assert ms_deform_attn(value, [(2, 3)], loc, weights).shape == (1, 3, 6)  # the CPU default still runs


def test_op_routes_triton_to_its_kernels_forward_and_backward(monkeypatch):
    """The op's wiring, with the kernels' entry points stubbed by the gather backend: one op node,
    its autograd calls the backward entry point, and dtypes come back as the inputs'."""
    calls = []

    def forward(value, shapes, locations, weights):
        calls.append("forward")
        return deform_attn._gather_forward(value, deform_attn._pairs(shapes), locations, weights)

    def backward(grad, value, shapes, locations, weights):
        calls.append("backward")
        return deform_attn._gather_backward(grad, value, deform_attn._pairs(shapes), locations, weights)

    monkeypatch.setattr(deform_attn_triton, "unusable_reason", lambda device: None)
    monkeypatch.setattr(deform_attn_triton, "forward", forward)
    monkeypatch.setattr(deform_attn_triton, "backward", backward)
    for dtype in (torch.float32, torch.bfloat16):
        value, loc, weights = (t.requires_grad_() for t in _inputs(0, 2, 5, ODD, dtype=dtype))
        out = ms_deform_attn(value, ODD, loc, weights, backend="triton")
        grads = torch.autograd.grad(out.float().sum(), (value, loc, weights))
        assert out.dtype == dtype and [g.dtype for g in grads] == [dtype] * 3
    assert calls == ["forward", "backward"] * 2
    monkeypatch.setenv(deform_attn.ENV, "triton")
    ms_deform_attn(*_inputs(0, 1, 2, ODD)[:1], ODD, *_inputs(0, 1, 2, ODD)[1:])
    assert calls[-1] == "forward"


if __name__ == "__main__":
    main()
