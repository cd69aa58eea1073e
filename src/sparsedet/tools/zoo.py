"""The model zoo: the authors' released COCO checkpoints by name (``<preset>_<epochs>ep``).

``pretrained_run(NAME)`` downloads a file once (``tools.download``: cache, mirror, resume, SHA-256),
converts it once with its entry's overrides into ``$SPARSEDET_HOME/runs/NAME`` and returns that run
folder; later calls read the folder and touch no network. URLs, file names and APs are the authors'
(their READMEs); ``note`` says where an entry knows less.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..engine.checkpoint import CONFIG, WEIGHTS
from ..errors import SparsedetError, close_names
from .download import cache_root, fetch, forget, mirror_url


@dataclass(frozen=True)
class Release:
    """One released checkpoint: where it lives, what reads it, what it scored."""
    name: str                         # <preset>_<variant>_<epochs>ep
    source: str                       # converter, ``sparsedet convert --from SOURCE``
    file: str                         # file name in the cache and under SPARSEDET_MIRROR
    ap: float                         # published COCO val2017 box AP
    url: str = ""                     # direct download
    drive_id: str = ""                # Google Drive file id (gdown)
    overrides: tuple[str, ...] = ()   # config values the file cannot tell
    note: str = ""


_DEFORMABLE = "official-deformable-detr"
_SPARSE_URL = "https://arena.kakaocdn.net/brainrepo/sparse_detr/"
_FOCUS_URL = "https://github.com/linxid/Focus-DETR-mindspore/releases/download/Focus-DETR/"
_SALIENCE_URL = "https://github.com/xiuqhou/Salience-DETR/releases/download/v1.0.0/"
_DINO_FOLDER = "https://drive.google.com/drive/folders/1qD5m1NmK0kjE5hh-G17XUX751WsEG-h_"
_DINO_IDS = ("file id from third-party download scripts (the official README links only the Drive folder "
             f"{_DINO_FOLDER})")
_SAM_NAME = "our cache name: the README gives Drive links, not the file's own name"
# A DC5 file has a C5 file's keys; its pickled args say dilation, and the override holds even without them.
_DC5 = ("backbone.dilation=true",)
_DINO_SWIN = (f"download it from the Drive folder {_DINO_FOLDER}: the README gives neither the file's name nor "
              "its id; the name is the folder's as third-party scripts cite it (36 epochs: the folder's other "
              "Swin file of that scale)")
_FOCUS_SWIN = ("the Swin configs are not in the released code: the position embedding is taken to be the "
               "12-epoch R50 model's, unverified")

_RELEASES = [
    Release("deformable_detr_r50_single_scale_50ep", _DEFORMABLE, "r50_deformable_detr_single_scale-checkpoint.pth",
            39.4, drive_id="1WEjQ9_FgfI5sw5OZZ4ix-OKk-IJ_-SDU"),
    Release("deformable_detr_r50_50ep", _DEFORMABLE, "r50_deformable_detr-checkpoint.pth", 44.5,
            drive_id="1nDWZWHuRwtwGden77NLM9JoWe-YisJnA"),
    Release("deformable_detr_r50_box_refine_50ep", _DEFORMABLE,
            "r50_deformable_detr_plus_iterative_bbox_refinement-checkpoint.pth", 46.2,
            drive_id="1JYKyRYzUH7uo9eVfDaVCiaIGZb5YTCuI"),
    Release("deformable_detr_r50_two_stage_50ep", _DEFORMABLE,
            "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage-checkpoint.pth", 46.9,
            drive_id="15I03A7hNTpwuLNdfuEmW9_taZMNVssEp"),
    Release("conditional_detr_r50_50ep", "official-conditional-detr", "ConditionalDETR_r50_epoch50.pth", 41.0,
            url="https://github.com/DeppMeng/ConditionalDETR/releases/download/v1.0/ConditionalDETR_r50_epoch50.pth",
            note="published AP evaluated at batch size 2 (eval --batch-size 2)"),
    Release("conditional_detr_dc5_r50_50ep", "official-conditional-detr", "ConditionalDETR_r50dc5_epoch50.pth", 43.7,
            url="https://github.com/DeppMeng/ConditionalDETR/releases/download/v1.0/ConditionalDETR_r50dc5_epoch50.pth",
            overrides=_DC5, note="published AP evaluated at batch size 1 (eval --batch-size 1)"),
    Release("dino_r50_12ep", "official-dino", "checkpoint0011_4scale.pth", 49.0,
            drive_id="1eeAHgu-fzp28PGdIjeLe-pzGPMG2r2G_", note=_DINO_IDS),
    Release("dino_r50_24ep", "official-dino", "checkpoint0023_4scale.pth", 50.4,
            drive_id="1cJ6WWAYrYjK2xGpv_x1-EqKMeNNW5R0h", note=_DINO_IDS),
    Release("dino_r50_36ep", "official-dino", "checkpoint0033_4scale.pth", 50.9,
            note=f"no file id known: download it from the Drive folder {_DINO_FOLDER}"),
    *[Release(name, "official-dino", file, ap, note=_DINO_SWIN)
      for name, file, ap in (("dino_swin_l_12ep", "checkpoint0011_4scale_swin.pth", 56.8),
                             ("dino_swin_l_36ep", "checkpoint0029_4scale_swin.pth", 58.0),
                             ("dino_swin_l_5scale_12ep", "checkpoint0011_5scale_swin.pth", 57.3),
                             ("dino_swin_l_5scale_36ep", "checkpoint0027_5scale_swin.pth", 58.5))],
    *[Release(f"sparse_detr_r50_rho0.{k}_50ep", "official-sparse-detr", f"sparse_detr_r50_{k}0.pth", ap,
              url=f"{_SPARSE_URL}sparse_detr_r50_{k}0.pth")
      for k, ap in zip(range(1, 6), (45.3, 45.6, 46.0, 46.2, 46.3))],
    *[Release(f"sparse_detr_r50_scrl_rho0.{k}_50ep", "official-sparse-detr", f"sparse_detr_r50_scrl_{k}0.pth", ap,
              url=f"{_SPARSE_URL}sparse_detr_r50_scrl_{k}0.pth", note="backbone initialised with SCRL")
      for k, ap in zip(range(1, 6), (46.9, 47.2, 47.4, 47.7, 47.9))],
    *[Release(f"sparse_detr_swin_t_rho0.{k}_50ep", "official-sparse-detr", f"sparse_detr_swint_{k}0.pth", ap,
              url=f"{_SPARSE_URL}sparse_detr_swint_{k}0.pth")
      for k, ap in zip(range(1, 6), (48.2, 48.8, 49.1, 49.2, 49.3))],
    Release("focus_detr_r50_12ep", "official-focus-detr", "focus_detr_r50_4scale_12ep.zip", 48.8,
            url=f"{_FOCUS_URL}focus_detr_r50_4scale_12ep.zip"),
    *[Release(f"focus_detr_r50_{epochs}ep", "official-focus-detr", file, ap, url=_FOCUS_URL + file,
              overrides=("pos_temperature=20", "pos_offset=0"),
              note="DAB-DETR's position embedding, which nothing in the file records")
      for epochs, file, ap in ((24, "focus_detr_r50_4scale_24ep.zip", 50.3),
                               (36, "focus_detr_r50_4scale_36ep_v3.zip", 50.4))],
    *[Release(name, "official-focus-detr", file, ap, url=_FOCUS_URL + file, note=_FOCUS_SWIN)
      for name, file, ap in (("focus_detr_swin_t_12ep", "focus_detr_swin_tiny_224_4scale_12ep.zip", 50.0),
                             ("focus_detr_swin_t_24ep", "focus_detr_swin_tiny_224_4scale_24ep.zip", 51.2),
                             ("focus_detr_swin_b_36ep", "focus_detr_swin_base_384_4scale_22k_36ep.pth", 56.2))],
    Release("salience_detr_swin_l_12ep", "official-salience-detr", "salience_detr_swin_l_800_1333_coco_1x.pth", 56.5,
            url=_SALIENCE_URL + "salience_detr_swin_l_800_1333_coco_1x.pth"),
    *[Release(f"salience_detr_r50_{epochs}ep", "official-salience-detr", file, ap, url=_SALIENCE_URL + file)
      for epochs, file, ap in ((12, "salience_detr_resnet50_800_1333_coco_1x.pth", 50.0),
                               (24, "salience_detr_resnet50_800_1333_coco_2x.pth", 51.2))],
    *[Release(f"{preset}_{epochs}ep", "official-sam-detr", f"{preset}_{epochs}ep.pth", ap, drive_id=drive_id,
              overrides=_DC5 if "_dc5_" in preset else (), note=_SAM_NAME)
      for preset, epochs, ap, drive_id in (("sam_detr_r50", 12, 33.1, "1RXGs50nXkYBlYKFjI8nzt2ZDfLEVsLJZ"),
                                           ("sam_detr_r50", 50, 39.8, "11BZHGv2UAtqECX10MZ3VMS81RqGQM5Aq"),
                                           ("sam_detr_smca_r50", 12, 36.0, "16ucFXgf0lrgzLArdmFzn3oOn3eGUrCU4"),
                                           ("sam_detr_smca_r50", 50, 41.8, "1XHDkMsVB-zncVRsf21Z1-hPxJJCi7TGN"),
                                           ("sam_detr_dc5_r50", 12, 38.3, "18kZUCGLIQKerzcIlh_Hh87V3wUkrTwEu"),
                                           ("sam_detr_dc5_r50", 50, 43.3, "1XYLr3yhqmmT3RWIJ_4SN1S-bO4BtWgcX"),
                                           ("sam_detr_smca_dc5_r50", 12, 40.6, "1gDfRo1DEv43d6DUMF1n_Lzv2lkRv0huE"),
                                           ("sam_detr_smca_dc5_r50", 50, 45.0, "1q_iWQOZl1zXtaVD4vI4V9piwj2tkE8ek"))],
]
ZOO: dict[str, Release] = {r.name: r for r in _RELEASES}


def pretrained_run(name: str) -> Path:
    """The run folder converted from the released checkpoint ``name`` (see ``ZOO``)."""
    if name not in ZOO:
        close = close_names(name, ZOO)
        raise SparsedetError(f"unknown zoo name {name!r}{'; did you mean ' + ', '.join(close) + '?' if close else ''} "
                             "(`sparsedet zoo` lists them)")
    release = ZOO[name]
    run = cache_root() / "runs" / name
    if (run / CONFIG).is_file() and (run / WEIGHTS).is_file():
        return run
    convert = " ".join(["sparsedet convert --from", release.source, "FILE --out RUN", *release.overrides])
    path = fetch(release.file, release.url, release.drive_id,
                 fix=f"Download {release.file} yourself and put it at {cache_root() / 'downloads' / release.file} "
                 f"(or run `{convert}`){'; ' + release.note if release.note else ''}")
    partial = run.with_name(run.name + ".converting")
    shutil.rmtree(partial, ignore_errors=True)
    from .convert.sources import convert_to_run  # not the package's convert, which sits above api.py
    try:
        convert_to_run(release.source, path, partial, list(release.overrides))
    except SparsedetError as e:
        shutil.rmtree(partial, ignore_errors=True)
        forget(path)
        origin = mirror_url(release.file) or release.url or f"Google Drive file {release.drive_id}"
        raise SparsedetError(f"{name}: the downloaded {release.file} ({origin}) is not the released checkpoint, "
                             f"so it was removed from the cache; run again to download it afresh ({e})") from None
    shutil.rmtree(run, ignore_errors=True)
    partial.rename(run)
    return run


def format_zoo() -> str:
    """The table ``sparsedet zoo`` prints: name, published AP, converter source, file."""
    rows = [(r.name, f"{r.ap:.1f}", r.source, r.file) for r in _RELEASES]
    widths = [max(len(row[i]) for row in [("name", "AP", "source", "file"), *rows]) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [("name", "AP", "source", "file"), *rows])
