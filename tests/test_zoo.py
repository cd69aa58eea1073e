"""The model zoo and the download cache: released checkpoints by name, served by a loopback HTTP
mirror (SPARSEDET_MIRROR) that this file starts, with Range support and a request log."""
import hashlib
import http.server
import json
import re
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from released import conditional_detr_layout, save_conditional_detr

from sparsedet import Detector
from sparsedet.cli import main
from sparsedet.errors import SparsedetError
from sparsedet.nn.backbone import ResNet
from sparsedet.tools import imagenet
from sparsedet.tools.download import fetch
from sparsedet.tools.zoo import ZOO

CONDITIONAL = "conditional_detr_r50_50ep"


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET of the mirror folder's files, honouring ``Range: bytes=N-`` (206) and logging each request."""

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        path = server.root / urllib.parse.unquote(self.path.lstrip("/"))
        if not path.is_file():
            return self.send_error(404)
        data = path.read_bytes()
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or ""):
            start = int(match.group(1))
            if start >= len(data):
                return self.send_error(416)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


class Mirror:
    """A running loopback mirror: ``root`` holds its files, ``requests`` lists (path, Range header)."""

    def __init__(self, root: Path):
        self.root = root
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.root, self.httpd.requests = root, []
        self.requests = self.httpd.requests
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        """Shut down and close the socket: from now on every connection is refused."""
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join()
        self.httpd.server_close()


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    root = tmp_path / "mirror"
    root.mkdir()
    server = Mirror(root)
    monkeypatch.setenv("SPARSEDET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPARSEDET_MIRROR", server.url)
    yield server
    server.stop()


def _downloads(tmp_path) -> Path:
    return tmp_path / "home" / "downloads"


def _blob(mirror, name: str, size: int) -> bytes:
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    (mirror.root / name).write_bytes(data)
    return data


def test_zoo_name_downloads_converts_predicts_then_works_offline(tmp_path, mirror, capsys):
    torch.manual_seed(0)
    ours = Detector.from_preset("conditional_detr_r50").state_dict()  # full size: R50, 300 queries, 91 classes
    save_conditional_detr(tmp_path, conditional_detr_layout(ours)).rename(mirror.root / ZOO[CONDITIONAL].file)
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)

    model = Detector.from_pretrained(CONDITIONAL, eval_size=64, eval_max_size=96)
    got = model.state_dict()
    assert all(torch.equal(got[k], ours[k]) for k in ours)  # the released file, converted bit-exactly
    assert mirror.requests == [(f"/{ZOO[CONDITIONAL].file}", None)]
    first = model.predict(image, threshold=0.0, top_k=3)[0]
    assert first["boxes"].shape == (3, 4) and (first["boxes"][:, 2:] <= torch.tensor([64, 48])).all()
    run = tmp_path / "home" / "runs" / CONDITIONAL
    assert (_downloads(tmp_path) / f"{ZOO[CONDITIONAL].file}.sha256").is_file()
    # The cached run is an ordinary run folder; a small eval size keeps the CLI's forward pass fast.
    config = json.loads((run / "config.json").read_text())
    config["model"].update(eval_size=64, eval_max_size=96)
    (run / "config.json").write_text(json.dumps(config))

    mirror.stop()  # offline: the converted run is all a second use reads
    assert main(["predict", "--weights", CONDITIONAL, str(image), "--out", str(tmp_path / "pred"),
                 "--threshold", "0", "--top-k", "3"]) == 0
    assert "wrote" in capsys.readouterr().out and len(mirror.requests) == 1
    again = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert [round(r["score"], 4) for r in again] == [round(float(v), 4) for v in first["scores"]]


def test_a_partial_download_resumes_with_a_range_request(tmp_path, mirror):
    data = _blob(mirror, "blob.bin", 300_000)
    _downloads(tmp_path).mkdir(parents=True)
    (_downloads(tmp_path) / "blob.bin.part").write_bytes(data[:120_000])
    path = fetch("blob.bin", url="http://unused.invalid/blob.bin")
    assert mirror.requests == [("/blob.bin", "bytes=120000-")]  # only the rest was asked for
    assert path.read_bytes() == data and not (_downloads(tmp_path) / "blob.bin.part").exists()
    assert (_downloads(tmp_path) / "blob.bin.sha256").read_text().strip() == hashlib.sha256(data).hexdigest()
    assert fetch("blob.bin") == path and len(mirror.requests) == 1  # cached: no request


def test_a_file_that_does_not_convert_is_refused_and_removed(tmp_path, mirror):
    (mirror.root / ZOO[CONDITIONAL].file).write_bytes(b"<html>quota exceeded</html>")
    with pytest.raises(SparsedetError, match=f"{CONDITIONAL}: the downloaded {ZOO[CONDITIONAL].file} .* not the "
                                             "released checkpoint, so it was removed from the cache"):
        Detector.from_pretrained(CONDITIONAL)
    assert not any(_downloads(tmp_path).iterdir())
    assert not (tmp_path / "home" / "runs").exists() or not any((tmp_path / "home" / "runs").iterdir())


def test_a_cached_file_that_changed_fails_its_recorded_sha256(tmp_path, mirror):
    data = _blob(mirror, "blob.bin", 50_000)
    path = fetch("blob.bin")
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(SparsedetError, match=r"blob.bin changed since it was downloaded \(SHA-256 .*removed it"):
        fetch("blob.bin")
    assert not path.exists()
    assert fetch("blob.bin").read_bytes() == data and len(mirror.requests) == 2  # downloaded afresh


def test_imagenet_backbone_by_name_is_checked_by_the_hash_in_its_name(tmp_path, mirror, monkeypatch):
    torch.manual_seed(0)
    weights = ResNet(18).state_dict()
    torch.save(weights, tmp_path / "r18.pth")
    digest = hashlib.sha256((tmp_path / "r18.pth").read_bytes()).hexdigest()
    data = (tmp_path / "r18.pth").read_bytes()
    (mirror.root / f"resnet18-{digest[:8]}.pth").write_bytes(data)
    (mirror.root / imagenet.TORCHVISION_FILES[18]).write_bytes(data)  # our weights under torchvision's name
    overrides = {"backbone.depth": 18, "backbone.width": 64, "backbone.weights": "imagenet"}

    with pytest.raises(SparsedetError, match=r"resnet18-f37072fd.pth from .* has SHA-256 .*not the f37072fd"):
        Detector.from_preset("dino_tiny", **overrides)  # the real name: our file cannot have its hash
    assert not any(_downloads(tmp_path).iterdir())

    monkeypatch.setitem(imagenet.TORCHVISION_FILES, 18, f"resnet18-{digest[:8]}.pth")
    model = Detector.from_preset("dino_tiny", **overrides)
    assert torch.equal(model.backbone.state_dict()["layer3.0.conv1.weight"], weights["layer3.0.conv1.weight"])
    with pytest.raises(SparsedetError, match="imagenet-detectron2 names detectron2's ResNet-50 only"):
        Detector.from_preset("dino_tiny", **{**overrides, "backbone.weights": "imagenet-detectron2"})


def test_without_network_the_error_says_what_failed_and_how_to_pass_a_file(tmp_path, mirror, monkeypatch):
    mirror.stop()
    with pytest.raises(SparsedetError, match=r"could not download resnet50-0676ba61.pth from http://127.0.0.1:\d+/"
                                             r"resnet50-0676ba61.pth .*model.backbone.weights=/path/resnet50-0676ba61"
                                             r"\.pth$") as error:
        imagenet.backbone_weights_path("imagenet", 50, 64)
    assert "kept" not in str(error.value)  # nothing was received, so nothing is kept
    (_downloads(tmp_path) / "R-50.pkl.part").write_bytes(bytes(3 << 19))
    with pytest.raises(SparsedetError, match=r"\(.*\); the 1.5 MiB received are kept and the next try resumes them\. "):
        imagenet.backbone_weights_path("imagenet-detectron2", 50, 64)
    monkeypatch.delenv("SPARSEDET_MIRROR")
    with pytest.raises(SparsedetError, match="no download link is known for checkpoint0033_4scale.pth. Download .*put "
                                             "it at .*downloads/checkpoint0033_4scale.pth \\(or run `sparsedet convert "
                                             "--from official-dino FILE --out RUN`\\).*drive.google.com/drive/folders.*"
                                             "; or set SPARSEDET_MIRROR=URL to fetch URL/checkpoint0033_4scale.pth"):
        Detector.from_pretrained("dino_r50_36ep")
    monkeypatch.setitem(sys.modules, "gdown", None)  # not installed
    with pytest.raises(SparsedetError, match="sam_detr_r50_12ep.pth is on Google Drive, which needs the gdown package"):
        Detector.from_pretrained("sam_detr_r50_12ep")
    assert mirror.requests == []


def test_training_presets_name_imagenet_but_building_a_model_downloads_nothing(tmp_path, mirror):
    model = Detector.from_preset("conditional_detr_r50", **{"backbone.depth": 18}, num_queries=10)
    assert model.run_config.model.backbone.weights == "imagenet" and mirror.requests == []


def test_zoo_lists_every_release(capsys):
    assert main(["zoo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "AP", "source", "file"] and len(lines) == len(ZOO) + 1
    assert lines[1:] == [line for line in lines[1:] if line.split()[0] in ZOO]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["salience_detr_r50_24ep"] == ["51.2", "official-salience-detr",
                                              "salience_detr_resnet50_800_1333_coco_2x.pth"]
    assert rows["sparse_detr_r50_scrl_rho0.5_50ep"] == ["47.9", "official-sparse-detr", "sparse_detr_r50_scrl_50.pth"]
