"""Deformable attention: every backend of the ``sparsedet::ms_deform_attn`` op equals the
grid_sample reference, values and gradients, on hand-made inputs and on every preset's own calls."""
import math
import os
import subprocess
import threading
import warnings

import pytest
import torch
from conftest import require_kernel
from test_deform_attn_triton import LINES, _on_lines

from sparsedet import Detector
from sparsedet.data.batch import Batch
from sparsedet.errors import SparsedetError
from sparsedet.nn.attention import MSDeformAttn
from sparsedet.ops import deform_attn, deform_attn_build, deform_attn_kernel, deform_attn_triton
from sparsedet.ops.deform_attn import BACKENDS, ms_deform_attn
from sparsedet.presets import PRESETS

# triton runs on CPUs only in Triton's interpreter, in a process of its own: tests/test_deform_attn_triton.py.
CPU_BACKENDS = [b for b in BACKENDS if b != "triton"]
FAST = [b for b in CPU_BACKENDS if b != "reference"]
# The backends the gpu-marked tests run on the test device ($SPARSEDET_TEST_DEVICE, the `device`
# fixture): on a GPU every one but the cpu kernel.
ON_CPU = torch.device(os.environ.get("SPARSEDET_TEST_DEVICE", "cpu")).type == "cpu"
DEVICE_BACKENDS = CPU_BACKENDS if ON_CPU else [b for b in BACKENDS if b != "cpu"]
DEVICE_FAST = [b for b in DEVICE_BACKENDS if b != "reference"]


def _inputs(seed, B, Q, shapes, M=2, D=3, P=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=dtype)
    # Locations spill outside [0, 1] so that border and out-of-map samples are exercised.
    loc = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(B, Q, M, L, P, generator=g, dtype=dtype).softmax(-1)
    return value, loc, weights


def _run(backend, shapes, value, loc, weights, grad_seed=7):
    """Output and the gradients of a fixed random projection of it, for value, locations, weights."""
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2], backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype).to(out.device)
    return (out.detach(), *torch.autograd.grad((out * g).sum(), leaves))


def _assert_matches(backend, shapes, value, loc, weights, atol):
    ref = _run("reference", shapes, value, loc, weights)
    got = _run(backend, shapes, value, loc, weights)
    for name, a, b in zip(("output", "grad value", "grad locations", "grad weights"), got, ref):
        assert a.dtype == b.dtype, name
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=0, atol=atol * scale, msg=lambda m: f"{backend} {name}: {m}")


def _require_backend(backend, device):
    """Skip a backend that cannot run on ``device``: the cpu kernel off the CPU, triton on a GPU
    where it does not import; the cpu backend needs its kernel built."""
    if backend == "cpu":
        if device.type != "cpu":
            pytest.skip(f"the cpu backend runs on CPU tensors only, not {device.type}")
        require_kernel()
    if backend == "triton" and not deform_attn_triton.available():
        pytest.skip(f"triton does not import here: {deform_attn_triton.failure()}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", DEVICE_FAST)
@pytest.mark.parametrize("seed,shapes,D", [(0, [(5, 7)], 3), (1, [(6, 4), (3, 2), (1, 1)], 16),
                                          (2, [(9, 11), (5, 6), (3, 3), (2, 2)], 32)])
def test_backend_matches_reference_values_and_gradients(backend, seed, shapes, D, device):
    _require_backend(backend, device)
    # gather keeps float64 (exact); the cpu kernel computes in fp32 and returns the input dtype;
    # triton takes fp32, bf16 and fp16.
    value, loc, weights = (t.to(device) for t in _inputs(seed, 2, 13, shapes, D=D))
    if backend != "triton":
        _assert_matches(backend, shapes, value, loc, weights, atol=1e-10 if backend == "gather" else 1e-5)
    _assert_matches(backend, shapes, *(t.float() for t in (value, loc, weights)), atol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_locations_on_pixel_lines_fall_in_grid_samples_cell(backend):
    """fp32 pixel centres (a centre plus whole-pixel offsets, as a model computes them), edges and
    outside, on 10- and 11-wide maps: rounded twice, some of them fall in the next cell and get the
    other one-sided location gradient (off by up to 16 here)."""
    if backend == "cpu":
        require_kernel()
    _assert_matches(backend, LINES, *_on_lines(3, 2, 11, LINES), atol=1e-5)


def test_cpu_kernel_result_does_not_depend_on_thread_count():
    require_kernel()
    value, loc, weights = _inputs(3, 2, 600, [(12, 10), (6, 5)], M=8, D=16, P=4, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_run("cpu", [(12, 10), (6, 5)], value, loc, weights))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_sample_at_pixel_centre_reads_that_pixel(backend, device):
    _require_backend(backend, device)
    dtype = torch.float32 if backend == "triton" else torch.float64  # triton: fp32, bf16 and fp16
    # 1 level of 2x4, one head of width 1: location of pixel (row 1, col 2) centre is ((2+.5)/4, (1+.5)/2).
    value = torch.arange(8, dtype=dtype, device=device).view(1, 8, 1, 1)
    w = torch.ones(1, 1, 1, 1, 1, dtype=dtype, device=device)

    def at(x, y):
        loc = torch.tensor([[x, y]], dtype=dtype, device=device).view(1, 1, 1, 1, 1, 2)
        return ms_deform_attn(value, [(2, 4)], loc, w, backend).item()

    assert at(2.5 / 4, 1.5 / 2) == pytest.approx(6.0)
    # Halfway between pixels 5 and 6, fully outside the map (zero padding), and not a number.
    assert at(2.0 / 4, 1.5 / 2) == pytest.approx(5.5)
    assert at(1.5, 1.5) == 0.0
    if backend == "cpu":
        assert at(float("nan"), 0.5) == 0.0 and at(1e30, -1e30) == 0.0


def test_one_graph_node_under_compile_and_export():
    require_kernel()
    torch.library.opcheck(torch.ops.sparsedet.ms_deform_attn.default,
                          (*(t.float() for t in _inputs(4, 1, 5, [(3, 4)])[:1]), [3, 4],
                           *(t.float() for t in _inputs(4, 1, 5, [(3, 4)])[1:]), "cpu"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    class Core(torch.nn.Module):
        def forward(self, value, loc, weights):
            return ms_deform_attn(value, [(3, 4)], loc, weights, backend="cpu")

    value, loc, weights = (t.float() for t in _inputs(4, 1, 5, [(3, 4)]))
    program = torch.export.export(Core(), (value, loc, weights))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets == ["sparsedet.ms_deform_attn.default"]
    torch.testing.assert_close(program.module()(value, loc, weights), Core()(value, loc, weights))


def test_backend_choice_env_and_errors(monkeypatch):
    monkeypatch.setenv(deform_attn.ENV, "gather")
    assert deform_attn.default_backend("cpu") == "gather"
    monkeypatch.setenv(deform_attn.ENV, "grid")
    with pytest.raises(SparsedetError, match="SPARSEDET_DEFORM_ATTN: unknown deformable-attention backend 'grid'; "
                                             "set SPARSEDET_DEFORM_ATTN to one of reference, cpu, gather, triton"):
        deform_attn.default_backend("cpu")
    monkeypatch.delenv(deform_attn.ENV)
    assert deform_attn.default_backend("cpu") == ("cpu" if deform_attn_kernel.available() else "reference")
    assert deform_attn.default_backend("cuda") == ("triton" if deform_attn_triton.available() else "gather")
    with pytest.raises(SparsedetError, match="cannot run on meta tensors; use backend='gather'"):
        ms_deform_attn(*(t.to("meta") for t in _inputs(0, 1, 2, [(2, 2)])[:1]), [(2, 2)],
                       *(t.to("meta") for t in _inputs(0, 1, 2, [(2, 2)])[1:]), backend="cpu")


def test_no_compiler_falls_back_to_reference_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(deform_attn_kernel, "_library", None)
    monkeypatch.setattr(deform_attn_kernel, "_failure", None)
    monkeypatch.setenv("SPARSEDET_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(UserWarning, match=r"fast CPU kernel is unavailable .*slower grid_sample path, about 5-9× "
                                         r"slower forward and backward \(docs/results.md\)"):
        assert deform_attn.default_backend("cpu") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value, loc, weights = _inputs(0, 1, 3, [(2, 3)])
        ref = ms_deform_attn(value, [(2, 3)], loc, weights, backend="reference")
        assert torch.equal(ms_deform_attn(value, [(2, 3)], loc, weights), ref)


def _spy_thread_counts(monkeypatch) -> list[int]:
    """Records the thread count every kernel call passes (its last argument)."""
    lib, seen = deform_attn_kernel.load(), []
    for name in ("ms_deform_attn_forward", "ms_deform_attn_backward"):
        def spy(*args, original=getattr(lib, name)):
            seen.append(args[-1])
            return original(*args)
        monkeypatch.setattr(lib, name, spy)
    return seen


def test_cpu_kernel_takes_torch_thread_count_in_a_new_python_thread(monkeypatch):
    # OpenMP's thread count is per calling thread: a new Python thread must still follow torch's.
    require_kernel()
    seen = _spy_thread_counts(monkeypatch)
    shapes = [(12, 10), (6, 5)]  # 600 queries x 8 heads x 2 levels x 4 points: above PARALLEL_MIN_SAMPLES
    value, loc, weights = _inputs(5, 1, 600, shapes, M=8, D=16, P=4, dtype=torch.float32)
    results = {}

    def work(n: int) -> None:
        results[n] = _run("cpu", shapes, value, loc, weights)

    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            worker = threading.Thread(target=work, args=(n,))
            worker.start()
            worker.join()
    finally:
        torch.set_num_threads(threads)
    assert seen == ([1, 1, 2, 2] if deform_attn_kernel.threaded() else [1, 1, 1, 1])
    for a, b in zip(results[1], results[2]):
        assert torch.equal(a, b)
    # Small work stays on one thread whatever torch says.
    seen.clear()
    _run("cpu", [(2, 3)], *_inputs(0, 1, 3, [(2, 3)], dtype=torch.float32))
    assert seen == [1, 1]


MISMATCHES = [
    ([(4, 4), (2, 2)], 19, 2, r"level shapes \[\(4, 4\), \(2, 2\)\] hold 20 tokens but value has 19"),
    ([(4, 4), (2, 2)], 21, 2, r"hold 20 tokens but value has 21"),
    ([(4, 4), (2, 2)], 20, 3, r"2 level shapes .* but locations and weights have 3 and 3 levels"),
    ([(4, 4)], 20, 2, r"1 level shapes .* have 2 and 2 levels"),
]


@pytest.mark.parametrize("shapes,S,L,message", MISMATCHES)
def test_mismatched_sizes_raise_before_any_backend_runs(shapes, S, L, message):
    g = torch.Generator().manual_seed(0)
    value = torch.randn(2, S, 2, 4, generator=g)
    loc, weights = torch.rand(2, 5, 2, L, 3, 2, generator=g), torch.rand(2, 5, 2, L, 3, generator=g)
    flat = [n for hw in shapes for n in hw]
    for backend in BACKENDS:
        with pytest.raises(SparsedetError, match=message):
            ms_deform_attn(value, shapes, loc, weights, backend=backend)
    # The kernel's own entry points check too: they index raw pointers with these sizes.
    with pytest.raises(SparsedetError, match=message):
        deform_attn_kernel.forward(value, flat, loc, weights)
    with pytest.raises(SparsedetError, match=message):
        deform_attn_kernel.backward(torch.zeros(2, 5, 8), value, flat, loc, weights)


def test_size_check_traces_with_a_symbolic_batch():
    # Under export the batch is symbolic: the check compares only plain ints, adds no guard, and
    # still catches a static mismatch.
    class Core(torch.nn.Module):
        def __init__(self, shapes):
            super().__init__()
            self.shapes = shapes

        def forward(self, value, loc, weights):
            return ms_deform_attn(value, self.shapes, loc, weights, backend="gather")

    batch = torch.export.Dim("batch")
    value, loc, weights = (t.float() for t in _inputs(0, 2, 5, [(3, 4), (2, 2)]))
    dynamic = ({0: batch}, {0: batch}, {0: batch})
    program = torch.export.export(Core([(3, 4), (2, 2)]), (value, loc, weights), dynamic_shapes=dynamic)
    other = (t.float() for t in _inputs(1, 3, 5, [(3, 4), (2, 2)]))
    assert program.module()(*other).shape == (3, 5, 6)
    with pytest.raises(SparsedetError, match="hold 17 tokens but value has 16"):
        torch.export.export(Core([(3, 4), (5, 1)]), (value, loc, weights), dynamic_shapes=dynamic)


def test_kernel_checks_batch_heads_gradient_dtype_and_device():
    value, loc, weights = _inputs(0, 2, 5, [(2, 3)], dtype=torch.float32)
    with pytest.raises(SparsedetError, match=r"disagree on the batch size: \(2, 1, 1\)"):
        ms_deform_attn(value, [(2, 3)], loc[:1], weights[:1])
    with pytest.raises(SparsedetError, match=r"disagree on the head size"):
        deform_attn_kernel.forward(value[:, :, :1], [2, 3], loc, weights)
    with pytest.raises(SparsedetError, match=r"output gradient has shape \(2, 5, 5\); expected \[2, 5, 6\]"):
        deform_attn_kernel.backward(torch.zeros(2, 5, 5), value, [2, 3], loc, weights)
    with pytest.raises(SparsedetError, match="takes fp32 CPU tensors; got torch.float64"):
        deform_attn_kernel.forward(value.double(), [2, 3], loc, weights)
    with pytest.raises(SparsedetError, match="takes fp32 CPU tensors; got torch.float32 on meta"):
        deform_attn_kernel.forward(value.to("meta"), [2, 3], loc, weights)


def test_cache_key_follows_cpu_flags_and_unknown_cpus_build_portable(monkeypatch):
    keys = {}
    for identity in ("flags: fpu sse2 avx2", "flags: fpu sse2 avx2 avx512f", None):
        monkeypatch.setattr(deform_attn_build, "cpu_identity", lambda identity=identity: identity)
        keys[identity] = deform_attn_build.library_path("cc", "cc 12.2.0")
    assert len(set(keys.values())) == 3
    assert deform_attn_build.arch_flags(None) == [[]]  # flags unreadable: no -march=native
    assert deform_attn_build.arch_flags("flags: fpu")[0] in (["-march=native"], ["-mcpu=native"])


def test_openmp_runtime_conflict_decision():
    torch_gomp = "/venv/torch/lib/libgomp.so.1"
    assert deform_attn_kernel.runtimes_conflict({torch_gomp}, {torch_gomp}) is None
    conflict = deform_attn_kernel.runtimes_conflict({torch_gomp}, {torch_gomp, "/usr/lib/libgomp.so.1"})
    assert conflict == f"it loaded the OpenMP runtime /usr/lib/libgomp.so.1 while PyTorch uses {torch_gomp}"
    assert "libomp.dylib" in deform_attn_kernel.runtimes_conflict(
        {"/opt/homebrew/lib/libgomp.1.dylib"}, {"/opt/homebrew/lib/libgomp.1.dylib", "/t/lib/libomp.dylib"})
    # PyTorch without OpenMP: the kernel's runtime is the only one.
    assert deform_attn_kernel.runtimes_conflict(set(), {"/usr/lib/libgomp.so.1"}) is None
    maps = ("7f00-7f10 r-xp 00000000 08:01 42 /venv/torch/lib/libgomp.so.1\n"
            "7f10-7f20 r-xp 00000000 08:01 43 /usr/lib/libiomp5.so\n"
            "7f20-7f30 r-xp 00000000 08:01 44 /x/torch.libs/libgomp-a34b3233.so.1\n"
            "7f30-7f40 r-xp 00000000 08:01 45 /usr/lib/libgompat.so\n"
            "7f40-7f50 rw-p 00000000 00:00 0 \n"
            "7f50-7f60 r-xp 00000000 08:01 46 /usr/lib/libm.so.6\n")
    assert deform_attn_kernel.runtimes_in_maps(maps) == {"/venv/torch/lib/libgomp.so.1", "/usr/lib/libiomp5.so",
                                                         "/x/torch.libs/libgomp-a34b3233.so.1"}


def _reload_with_compiler_rejecting(flag: str, monkeypatch, tmp_path) -> None:
    """Forget the loaded kernel (restored after the test) and make the compiler reject ``flag``,
    with a fresh cache, so that the next ``load()`` builds again."""
    require_kernel()
    for name in ("_library", "_failure", "_threaded"):
        monkeypatch.setattr(deform_attn_kernel, name, getattr(deform_attn_kernel, name))  # restored after
    monkeypatch.setattr(deform_attn_kernel, "_library", None)
    monkeypatch.setenv("SPARSEDET_HOME", str(tmp_path))
    real = deform_attn_build._compile

    def rejecting(command):
        if flag in command:
            return subprocess.CompletedProcess(command, 1, "", f"clang: error: unsupported option '{flag}'")
        return real(command)

    monkeypatch.setattr(deform_attn_build, "_compile", rejecting)


def test_kernel_built_without_openmp_runs_one_thread_with_one_warning(monkeypatch, tmp_path):
    _reload_with_compiler_rejecting(deform_attn_build.OPENMP, monkeypatch, tmp_path)  # as Apple clang
    with pytest.warns(UserWarning, match="built without OpenMP .*runs one thread per call"):
        assert deform_attn_kernel.available()
    assert not deform_attn_kernel.threaded()
    seen = _spy_thread_counts(monkeypatch)
    shapes = [(12, 10), (6, 5)]
    value, loc, weights = _inputs(5, 1, 600, shapes, M=8, D=16, P=4, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning came once, at load
        _assert_matches("cpu", shapes, value, loc, weights, atol=1e-5)
    assert seen and set(seen) == {1}


def test_kernel_rejecting_native_tuning_builds_generic_code_with_a_note(monkeypatch, tmp_path):
    if deform_attn_build.cpu_identity() is None:
        pytest.skip("this CPU's flags cannot be read, so the build is portable and tries no tuning")
    _reload_with_compiler_rejecting("-march=native", monkeypatch, tmp_path)
    monkeypatch.setattr(deform_attn_build.platform, "machine", lambda: "x86_64")  # no -mcpu=native to fall to
    with pytest.warns(UserWarning, match=r"is generic code: .* rejected native tuning"):
        assert deform_attn_kernel.available()
    assert deform_attn_kernel.threaded() == (deform_attn_kernel._library.ms_deform_attn_build_info() & 1 == 1)
    _assert_matches("cpu", [(3, 4)], *_inputs(1, 1, 5, [(3, 4)], dtype=torch.float32), atol=1e-5)


def _recorded_calls(preset, device=torch.device("cpu")):
    """Whether ``preset`` has deformable attention, and the inputs of every call to it in one
    training forward on ``device``."""
    torch.manual_seed(0)
    model = Detector.from_preset(preset, num_classes=3).train().to(device)
    deformable = any(isinstance(m, MSDeformAttn) for m in model.modules())
    g = torch.Generator().manual_seed(0)
    batch = Batch.from_images([torch.rand(3, 96, 128, generator=g), torch.rand(3, 112, 80, generator=g)]).to(device)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    calls = []
    original = deform_attn.ms_deform_attn

    def record(value, shapes, locations, weights, backend=None):
        calls.append((value.detach().clone(), list(shapes), locations.detach().clone(), weights.detach().clone()))
        return original(value, shapes, locations, weights, "reference")

    deform_attn.ms_deform_attn = record
    try:
        model(batch, targets)
    finally:
        deform_attn.ms_deform_attn = original
    return deformable, calls


@pytest.mark.gpu
@pytest.mark.parametrize("preset", [p for p in PRESETS if p.endswith("_tiny")])
def test_fast_backends_match_reference_on_every_preset(preset, device):
    deformable, calls = _recorded_calls(preset, device)
    assert bool(calls) == deformable
    for value, shapes, loc, weights in calls:
        _assert_matches("gather", shapes, value, loc, weights, atol=1e-4)
    if device.type != "cpu":  # the cpu backend runs on CPU tensors only
        if deform_attn_triton.available():
            for value, shapes, loc, weights in calls:
                _assert_matches("triton", shapes, value, loc, weights, atol=1e-4)
        return
    require_kernel()  # after gather's checks, which need no compiler
    for value, shapes, loc, weights in calls:
        _assert_matches("cpu", shapes, value, loc, weights, atol=1e-4)


def test_module_initialisation_follows_official_pattern():
    attn = MSDeformAttn(dim=32, num_levels=2, num_heads=8, num_points=3)
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    # Head 1 points at 45 degrees: direction (1, 1) after scaling by the max-abs component.
    assert torch.allclose(bias[1, 0, 0], torch.tensor([1.0, 1.0]))
    assert torch.allclose(bias[1, 1, 2], torch.tensor([3.0, 3.0]))
    # Head 2 points straight down (x ~ 0, y = 1) scaled by the point index.
    assert abs(bias[2, 0, 1, 0].item()) < 1e-6 and bias[2, 0, 1, 1].item() == pytest.approx(2.0)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0


def test_module_masks_padding_and_box_reference():
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=16, num_levels=1, num_heads=2, num_points=2).double()
    value = torch.randn(1, 6, 16, dtype=torch.float64)
    query = torch.randn(1, 3, 16, dtype=torch.float64)
    ref = torch.rand(1, 3, 1, 4, dtype=torch.float64) * 0.5 + 0.25
    pad = torch.tensor([[False, False, False, True, True, True]])
    out = attn(query, ref, value, [(2, 3)], pad)
    # Changing padded values must not change the result.
    value2 = value.clone()
    value2[0, 3:] += 100
    torch.testing.assert_close(attn(query, ref, value2, [(2, 3)], pad), out)
    assert out.shape == (1, 3, 16) and math.isfinite(out.sum().item())


def test_torch_compile_traces_a_whole_model_without_graph_breaks():
    # dynamo's trace only (no code generation): the op, its backend choice and the model are one graph.
    torch.manual_seed(0)
    model = Detector.from_preset("deformable_detr_tiny", num_classes=3).eval()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(Batch.from_images([torch.rand(3, 64, 96)]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_set_default_backend_returns_the_choice_it_replaces():
    previous = deform_attn.set_default_backend("gather")
    try:
        assert deform_attn.set_default_backend("reference") == "gather"
        assert deform_attn.default_backend("cpu") == "reference"
    finally:
        assert deform_attn.set_default_backend(previous) == "reference"
