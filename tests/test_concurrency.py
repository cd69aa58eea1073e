"""One model called from several threads at once gives what it gives alone, bit for bit: nothing
in the inference path changes the model while a call runs (issue: concurrent predicts re-laid the
backbone's weights out under each other and returned wrong detections, or crashed)."""
import threading
import warnings

import numpy as np
import pytest
import torch

from sparsedet import Detector

SMALL = {"hidden_dim": 64, "ffn_dim": 64, "num_encoder_layers": 1, "num_decoder_layers": 2, "num_queries": 10,
         "dn_queries": 4, "eval_size": 64, "eval_max_size": 96, "backbone.width": 8}
THREADS, CALLS = 4, 2


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(50, 70), (64, 64), (90, 40), (30, 80)]]


def in_threads(call) -> list:
    """``call(thread)`` from THREADS threads started together, CALLS times each; the results by thread."""
    start = threading.Barrier(THREADS)
    results, errors = [[] for _ in range(THREADS)], []

    def work(t: int) -> None:
        try:
            start.wait()
            for _ in range(CALLS):
                results[t].append(call(t))
        except BaseException as e:  # noqa: BLE001 - reported below, with the thread's failure
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def same(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in ("boxes", "scores", "labels"))


@pytest.mark.parametrize("mode, precision", [("eval", "fp32"), ("eval", "bf16"), ("train", "fp32")])
def test_predict_from_threads_equals_predict_alone(mode, precision):
    torch.manual_seed(0)
    model = Detector.from_preset("dino_tiny", num_classes=3, **SMALL).train(mode == "train")
    pictures = images()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no native bf16" where the CPU has none

        def predict(t: int) -> list[dict]:  # each thread its own mix of images and batch size
            mine = pictures[t:] + pictures[:t]
            return model.predict(mine, threshold=0.0, batch_size=1 + t % 2, precision=precision)

        alone = [predict(t) for t in range(THREADS)]
        together = in_threads(predict)
    assert all(same(result, alone[t]) for t in range(THREADS) for result in together[t])
    # A model in training mode went back to it (and to its training layout) once the last call ended.
    conv = next(p for p in model.backbone.parameters() if p.dim() == 4)
    assert model.training == (mode == "train") and all(m.training == model.training for m in model.modules())
    assert conv.is_contiguous(memory_format=torch.channels_last) != model.training


def test_the_weight_layout_follows_the_mode_and_saving_does_not_see_it(tmp_path):
    torch.manual_seed(0)
    model = Detector.from_preset("dino_tiny", num_classes=3, **SMALL)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    conv = model.backbone.stem[0].weight if hasattr(model.backbone, "stem") else next(
        p for p in model.backbone.parameters() if p.dim() == 4)
    model.eval()
    assert conv.is_contiguous(memory_format=torch.channels_last)
    pointer = conv.data_ptr()
    model.eval()  # a second eval() changes nothing
    assert conv.data_ptr() == pointer
    with torch.inference_mode():
        model.train()  # the re-laid weights stay trainable tensors even under inference_mode
    assert conv.is_contiguous() and not conv.is_inference()
    model.eval().save_pretrained(tmp_path / "run")
    loaded = Detector.from_pretrained(tmp_path / "run")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.items())
