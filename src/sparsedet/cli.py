"""Command line: ``sparsedet <verb>``. Every verb has ``--help``."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .config import PRECISIONS
from .errors import SparsedetError
from .jsonfile import read_json_object
from .tools.convert import SOURCES

PRECISION_HELP = ("precision of the forward pass: fp32 (default), bf16 or fp16 (autocast; fp16 on CUDA only); "
                  "boxes and scores come back in fp32")
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available, else cpu; an .onnx file runs on the CPU)"


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The verb's arguments, every key=value override in ``args.overrides`` wherever it stood."""
    parser = parser or build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a verb's key=value overrides to its first positional only when no option sits
    # between them (`convert --from S FILE --out RUN k=v`): collect the ones it left over.
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return args.func(args) or 0
    except SparsedetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsedet", description="Efficient detection transformers: train, evaluate, "
                                "predict and convert on CPU or GPU.")
    sub = p.add_subparsers(title="verbs", metavar="VERB")

    s = sub.add_parser("demo", help="synth -> train -> eval -> predict on a synthetic dataset",
                       description="Writes a synthetic COCO dataset, trains a small model for --minutes, evaluates "
                       "it and draws predictions. Outputs DIR/metrics.json and DIR/predictions.png.")
    s.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget (default 10)")
    s.add_argument("--preset", default="dino_tiny", help="model preset (default dino_tiny)")
    s.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("synth", help="write a deterministic synthetic COCO (or YOLO) dataset",
                       description="Writes DIR/train.json, DIR/val.json and the images they reference; with "
                       "--format yolo also a YOLO copy in DIR/yolo (data.yaml, images/, labels/).")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--train", type=int, default=400, help="training images (default 400)")
    s.add_argument("--val", type=int, default=100, help="validation images (default 100)")
    s.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", choices=["coco", "yolo"], default="coco", help="yolo: also write DIR/yolo")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("train", help="train a model on a COCO or YOLO dataset (one process or torchrun)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Trains PRESET (or fine-tunes --weights RUN, or continues --resume RUN) and writes "
                       "into --out: model.safetensors + config.json (+ ema.safetensors with train.ema=true), "
                       "metrics.jsonl (one object per logged step and per evaluation), metrics.json (last "
                       "evaluation), checkpoints/ (the newest train.keep_checkpoints step checkpoints and the best "
                       "by AP, each resumable) and, when tensorboard is installed, tensorboard/.\n\n"
                       "Data: --train/--val take a COCO json or a YOLO data.yaml (or its folder; its val split is "
                       "used when --val is not given).\n\n"
                       "Any config field is an override key.sub=value, e.g. train.max_steps=500 train.batch_size=4 "
                       "train.precision=bf16 train.ema=true train.accumulate=2 train.schedule=cosine train.seed=1 "
                       "train.log_every=10 train.checkpoint_every=500.\n\n"
                       "Several GPUs or machines: launch the same command with torchrun, e.g.\n"
                       "  torchrun --nproc_per_node 8 -m sparsedet train --preset dino_r50 --train ... --out RUN\n"
                       "(multi-node: add --nnodes N --node_rank R --rdzv_endpoint HOST:PORT). train.batch_size is "
                       "per process; NCCL on GPUs, Gloo on CPUs.\n\n"
                       "Ctrl-C (SIGINT) or SIGTERM stops at the end of the current step, saves a resumable checkpoint "
                       "and prints the --resume command; the exit status is 130 (SIGINT) or 143 (SIGTERM). A second "
                       "signal quits at once without saving.")
    s.add_argument("--preset", help="model preset (see `sparsedet presets`)")
    s.add_argument("--weights", help="fine-tune from this run folder or zoo name (another class set is fine: class "
                   "heads restart)")
    s.add_argument("--resume", metavar="RUN", help="continue this run exactly from its newest checkpoint; data and "
                   "settings come from RUN/config.json, overrides may change them (e.g. train.max_steps)")
    s.add_argument("--train", dest="train_ann", help="training data: COCO json, or YOLO data.yaml or its folder")
    s.add_argument("--val", dest="val_ann", help="validation data (COCO json or YOLO yaml)")
    s.add_argument("--images", help="COCO image root (default: each json's folder)")
    s.add_argument("--out", help="run folder to write (with --resume: RUN)")
    s.add_argument("--no-progress", action="store_true",
                   help="no progress bars: plain log lines every train.log_every steps (for nohup and batch logs)")
    s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="COCO AP of a run folder, an exported .onnx file or a results file",
                       description="Either --weights RUN (runs the model on --val; RUN may also be an .onnx file "
                       "from `sparsedet export`, run in onnxruntime) or --results DET.json (a COCO results file). "
                       "Prints a table and writes DIR/metrics.json: by default RUN/eval/DATA/metrics.json (DATA: "
                       "the --val json's or yaml's dataset name, plus _ema with --ema; MODEL_eval/DATA beside an "
                       ".onnx file), so the training metrics in RUN/metrics.json stay; --out RUN replaces those. "
                       "With --plots also pr_curve.png, pr_curve_iou50.png, confusion_matrix.png and "
                       "confusion_matrix.json beside it (needs pip install 'sparsedet[viz]').")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="run folder, zoo name (`sparsedet zoo`) or exported .onnx file")
    src.add_argument("--results", help="COCO results json")
    s.add_argument("--ema", action="store_true", help="evaluate the run's EMA weights (ema.safetensors)")
    s.add_argument("--val", required=True, dest="val_ann",
                   help="ground truth: COCO json, or YOLO data.yaml or its folder (its val split)")
    s.add_argument("--images", help="image root (default: the json's folder)")
    s.add_argument("--out", help="folder for metrics.json (default: RUN/eval/DATA, or . for --results)")
    s.add_argument("--batch-size", type=int, default=4, help="images per forward (default 4)")
    s.add_argument("--device", help=DEVICE_HELP)
    s.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    s.add_argument("--plots", action="store_true",
                   help="also draw precision-recall curves (per class and over all classes; IoU 0.50:0.95 and 0.50) "
                   "and a confusion matrix with a background row and column")
    s.add_argument("--confusion-threshold", type=float, default=0.5, metavar="T",
                   help="minimum score of the detections the confusion matrix counts (default 0.5)")
    s.add_argument("--corr", action="store_true",
                   help="also Corr, per encoder layer and its mean: the share of the decoder's attention map (Sparse "
                   "DETR's DAM) on the tokens the encoder kept, per image, averaged over images (1 for dense "
                   "encoders; an error for the single-level kinds, which have no sampling points); written to "
                   "metrics.json as \"corr\"")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("predict", help="detect objects in images, videos and streams",
                       description="Writes DIR/predictions.json (COCO results entries plus file_name and "
                       "category_name, and frame for a video; boxes in original pixels), one drawn PNG per image and "
                       "one drawn DIR/NAME_pred.mp4 per video. Videos (.mp4, .mov, .avi, .mkv, .webm, ...), stream "
                       "URLs (rtsp://..., http://...) and webcams (0, /dev/video0) are read frame by frame with "
                       "PyAV (pip install 'sparsedet[video]'); Ctrl-C ends a live stream and keeps what was seen.")
    s.add_argument("--weights", required=True, help="run folder, zoo name (`sparsedet zoo`), or an .onnx file from "
                   "`sparsedet export` (run in onnxruntime)")
    s.add_argument("inputs", nargs="+", metavar="SOURCE", help="image, video, folder (searched recursively), "
                   "stream URL or webcam index")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--threshold", type=float, default=0.5, help="minimum score (default 0.5)")
    s.add_argument("--top-k", type=int, default=None, help="at most K detections per image")
    s.add_argument("--batch-size", type=int, default=4, help="images or frames per forward (default 4)")
    s.add_argument("--device", help=DEVICE_HELP)
    s.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    s.add_argument("--save-txt", action="store_true", help="also write YOLO labels DIR/labels/NAME.txt (a video: "
                   "NAME_FRAME.txt): one line `class cx cy w h score` per detection, normalised to the image; "
                   "class is the index among the model's classes")
    s.add_argument("--max-frames", type=int, help="read at most this many frames of each video or stream")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("plot", help="draw a run's training curves (loss terms, lr, AP) as PNGs",
                       description="Reads RUN/metrics.jsonl (written by `sparsedet train`) and writes loss.png "
                       "(the total and each loss term over steps: final decoder layer solid, encoder and denoising "
                       "parts dashed, earlier decoder layers thin grey), lr.png and, when the run was evaluated, "
                       "ap.png (AP, AP50, AP75; EMA dashed) into RUN or --out. Needs pip install 'sparsedet[viz]'.")
    s.add_argument("run", metavar="RUN", help="run folder")
    s.add_argument("--out", help="folder for the PNGs (default: RUN)")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("convert", help="convert a released checkpoint into a run folder",
                       description="Sources: hf-deformable-detr, hf-conditional-detr (a folder written by Hugging "
                       "Face save_pretrained); official-deformable-detr (fundamentalvision/Deformable-DETR .pth); "
                       "official-conditional-detr (Atten4Vis/ConditionalDETR .pth); official-dino (an "
                       "IDEA-Research/DINO .pth); official-sparse-detr (a kakaobrain/sparse-detr .pth); "
                       "official-focus-detr (a Focus-DETR detectron2 .pth or the released .zip); official-salience-detr (a "
                       "xiuqhou/Salience-DETR .pth); official-sam-detr (a ZhangGongjie/SAM-DETR .pth). Official "
                       "files are read without unpickling code. Trailing key=value pairs set what a checkpoint "
                       "cannot tell.")
    s.add_argument("--from", dest="source", required=True, choices=sorted(SOURCES))
    s.add_argument("path", help="checkpoint file or folder")
    s.add_argument("--out", required=True, help="run folder to write")
    s.add_argument("overrides", nargs="*", help="config overrides, e.g. encoder.object_tokens=300")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("export", help="write a run or preset as ONNX and check it in onnxruntime",
                       description="Writes one ONNX file: inputs images [B,3,H,W] in [0,1] (padded), mask [B,H,W] "
                       "(True on padding), sizes [B,2] (original height, width); outputs the top-k boxes (xyxy, "
                       "original pixels, clipped), scores and labels (category ids), post-processing included. "
                       "Then runs it in onnxruntime on sample images against PyTorch (boxes within 0.5 px, scores "
                       "within 1e-3, same labels), prints the figures, and exits 1 keeping the file as "
                       "*.mismatch.onnx when they disagree. Needs pip install 'sparsedet[export]'.")
    s.add_argument("target", metavar="RUN_OR_PRESET")
    s.add_argument("--out", required=True, help="the .onnx file to write")
    s.add_argument("--size", help="fix the input at HEIGHTxWIDTH (default: any height and width, the batch padded "
                   "to its largest image)")
    s.add_argument("--opset", type=int, default=18, help="ONNX opset, 16 to 19 (default 18)")
    s.add_argument("--top-k", type=int, default=None, help="detections per image (default: the model's top_k)")
    s.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="weights and dense layers of the file (default fp32); fp16 is for GPU runtimes: "
                   "onnxruntime on a CPU runs it slower than fp32")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("bench", help="parameters, GFLOPs and latency per stage of presets or runs",
                       description="Counts multiply-adds per stage (backbone, neck, encoder, queries, decoder, "
                       "heads) with deformable attention and token sparsity included, times the model (warm-up, "
                       "then median/min/max per stage and whole), and prints the environment. Presets run with "
                       "random weights (cost does not depend on them). With --plot, draws each run's AP "
                       "(RUN/metrics.json) against its GFLOPs.")
    s.add_argument("targets", nargs="+", metavar="PRESET_OR_RUN", help="presets, run folders, zoo names or .onnx "
                   "files, then any config overrides key.sub=value (e.g. encoder.keep_ratio=0.2)")
    s.add_argument("--size", action="append", metavar="HxW",
                   help="input size, repeatable (default: each model's own, a 4:3 image resized as evaluation "
                   "resizes it: 800x1067 for the R50 presets, the mean resized COCO val2017 image the papers' "
                   "GFLOPs correspond to; 256x341 for the tiny ones)")
    s.add_argument("--batch", type=int, default=1, help="images per forward (default 1); GFLOPs are per image")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--precision", choices=PRECISIONS, default="fp32", help="precision of the timed runs: fp32 "
                   "(default), bf16 or fp16 (autocast; fp16 on CUDA only); each row says what ran")
    s.add_argument("--dtype", choices=PRECISIONS, help=argparse.SUPPRESS)  # deprecated spelling of --precision
    s.add_argument("--runs", type=int, default=10, help="timed runs (default 10; 0 counts cost only)")
    s.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--sweep", metavar="KEY=V1,V2,...", help="one row per value, e.g. keep_ratio=0.1,0.2,0.3")
    s.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # deprecated: positional k=v
    s.add_argument("--json", help="also write the results to this file")
    s.add_argument("--plot", metavar="PNG", help="draw AP against GFLOPs of the given runs, and Corr per encoder "
                   "layer beside it for runs whose metrics.json has one (`sparsedet eval --corr --out RUN`); "
                   "needs [viz]")
    s.set_defaults(func=cmd_bench, overrides=[])  # key=value after an option lands here (see main)

    s = sub.add_parser("viz", help="figures of kept tokens, decoder sampling and detections for one image",
                       description="Runs PRESET_OR_RUN on IMAGE and writes into --out: tokens_per_level.png (tokens "
                       "the first encoder layer updates, one panel per feature level, drawn at their strides), "
                       "tokens_per_layer.png (one panel per encoder layer), decoder_query.png (sampling points and "
                       "attention weights of one query, or its cross-attention map for the single-level decoders), "
                       "dam.png (the decoder attention map of all queries per level, kept tokens of the first "
                       "encoder layer outlined; deformable decoders only), detections.png and viz.json (what was "
                       "drawn, and \"corr\": the image's share of decoder attention on the kept tokens per encoder "
                       "layer, null for the single-level decoders). Dense encoders show every token.")
    s.add_argument("target", metavar="PRESET_OR_RUN")
    s.add_argument("image", metavar="IMAGE")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--query", type=int, help="decoder query to show (default: the highest-scoring one)")
    s.add_argument("--layer", type=int, default=-1, help="decoder layer to show (default: the last)")
    s.add_argument("--threshold", type=float, default=0.3, help="minimum score of drawn detections (default 0.3)")
    s.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # deprecated: positional k=v
    s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    s.set_defaults(func=cmd_viz)

    s = sub.add_parser("check-data", help="validate a COCO or YOLO dataset",
                       description="Decodes every image and reports missing/unreadable images, size mismatches, "
                       "degenerate or out-of-bounds boxes, duplicate ids, unknown category ids and images without "
                       "annotations; for a YOLO dataset (every split): label lines with an unknown class index or "
                       "coordinates outside [0, 1], and images without a label file (counted). A train or val split "
                       "without a single box is an error. Exit 0 when clean, 1 on errors.")
    s.add_argument("--ann", required=True, metavar="DATA",
                   help="COCO json, or YOLO data.yaml or its folder (all its splits are checked)")
    s.add_argument("--images", help="COCO image root (default: the json's folder)")
    s.set_defaults(func=cmd_check_data)

    s = sub.add_parser("presets", help="list the model presets")
    s.set_defaults(func=cmd_presets)

    s = sub.add_parser("zoo", help="list the released checkpoints that --weights takes by name",
                       description="Name, published COCO AP, converter source and released file of each official "
                       "checkpoint. --weights NAME (eval, predict, train) and Detector.from_pretrained(NAME) download "
                       "the file once into $SPARSEDET_HOME (default ~/.cache/sparsedet), check it, convert it once "
                       "and load the converted run; later uses need no network. SPARSEDET_MIRROR=URL fetches "
                       "URL/FILE instead.")
    s.set_defaults(func=cmd_zoo)
    return p


def cmd_zoo(args) -> int:
    from .tools.zoo import format_zoo
    print(format_zoo())
    return 0


def cmd_presets(args) -> int:
    import textwrap

    from .presets import PRESETS
    width = max(map(len, PRESETS)) + 2
    for name, fn in PRESETS.items():
        description = " ".join((fn.__doc__ or "").split())
        lines = textwrap.wrap(description, 100 - width, break_on_hyphens=False) or [""]
        print(f"{name:{width}s}{lines[0]}")
        for line in lines[1:]:
            print(" " * width + line)
    return 0


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments -> (targets, key=value overrides); an existing path is a target even
    when its name holds '='."""
    overrides = [a for a in items if "=" in a and not Path(a).exists()]
    return [a for a in items if a not in overrides], overrides


def _deprecated_set(args) -> list[str]:
    """``--set k=v`` (bench, viz), the old spelling of the positional overrides every verb takes."""
    if args.set:
        warnings.warn("--set is deprecated and will be removed; give overrides as positional key.sub=value, as "
                      "in train and demo", FutureWarning)
    return list(args.set)


def cmd_synth(args) -> int:
    from .data.synthetic import write_synthetic
    info = write_synthetic(args.out, n_train=args.train, n_val=args.val, size=args.size, seed=args.seed,
                           format=args.format)
    counts = info["num_images"]
    print(f"wrote {info['train']} and {info['val']} ({counts['train']} + {counts['val']} images)"
          + (f" and the YOLO copy {info['yolo']}" if args.format == "yolo" else ""))
    return 0


def _prepare_training(preset: str | None, weights: str | None, overrides: list[str], data: dict):
    """Config, model and datasets for a new training run; the class table comes from the training data."""
    from .api import Detector
    from .config import apply_overrides
    from .engine.checkpoint import load_config
    from .engine.rng import seed_everything
    from .data.datasets import make_datasets
    from .presets import get_preset
    from .tools.zoo import resolve_run
    if bool(preset) == bool(weights):
        raise SparsedetError("give exactly one of --preset NAME, --weights RUN or --resume RUN")
    weights = resolve_run(weights) if weights else weights
    config = load_config(weights) if weights else get_preset(preset)
    # A new run's data are the ones given now, never a fine-tuned run's old ones.
    apply_overrides(config, {f"data.{k}": data.get(k) or "" for k in ("train", "val", "images")})
    apply_overrides(config, overrides)
    config, train_set, val_set = make_datasets(config)
    m = config.model
    m.classes, m.category_ids, m.num_classes = train_set.classes, train_set.category_ids, len(train_set.classes)
    seed_everything(config.train.seed)  # the initial weights follow train.seed
    model = Detector.for_finetuning(weights, config) if weights else Detector.from_config(config, backbone_weights=True)
    return config, model, train_set, val_set


def cmd_train(args) -> int:
    from .engine import distributed
    from .engine.interrupt import TrainingInterrupted
    from .data.datasets import make_datasets
    from .engine.build import build_trainer, set_threads
    data = {"train": args.train_ann, "val": args.val_ann, "images": args.images}
    if args.resume:
        from .api import Detector
        from .config import apply_overrides
        from .engine.checkpoint import load_config
        if args.preset or args.weights or (args.out and Path(args.out) != Path(args.resume)):
            raise SparsedetError("--resume RUN continues RUN as it was configured; leave out --preset, --weights "
                                 "and --out (overrides such as train.max_steps=... are allowed)")
        config = load_config(args.resume)
        apply_overrides(config, {f"data.{k}": v for k, v in data.items() if v is not None})
        apply_overrides(config, args.overrides)
        config, train_set, val_set = make_datasets(config)
        if train_set.category_ids != config.model.category_ids:
            raise SparsedetError(f"{config.data.train} does not have the categories {args.resume} was trained on")
        model, out = Detector.from_config(config), args.resume  # the checkpoint holds the backbone
    else:
        if not args.train_ann or not args.out:
            raise SparsedetError("--train and --out are required (or --resume RUN)")
        config, model, train_set, val_set = _prepare_training(args.preset, args.weights, args.overrides, data)
        out = args.out
    set_threads(config.train.threads)
    trainer = build_trainer(model, config, train_set, val_set, out, progress=not args.no_progress)
    try:
        if args.resume:
            path = trainer.resume()
            if trainer.ctx.is_main:
                print(f"resumed {path} at step {trainer.step}")
        trainer.fit()
    except TrainingInterrupted as stop:
        if trainer.ctx.is_main:
            launcher = "torchrun ... -m sparsedet" if trainer.ctx.distributed else "sparsedet"
            print(f"interrupted by {stop.signal_name} at step {stop.step}; saved a resumable checkpoint in "
                  f"{stop.run_dir / 'checkpoints'}. Continue with:\n  {launcher} train --resume {stop.run_dir}",
                  file=sys.stderr, flush=True)
        return stop.exit_code
    finally:
        distributed.teardown()
    if trainer.ctx.is_main:
        print(f"saved {out}")
    return 0


def cmd_eval(args) -> int:
    from .data.coco import open_detection_dataset
    from .engine.evaluator import evaluate_coco, format_metrics, load_results
    if args.plots:
        from .tools.plots import pyplot
        pyplot()  # a missing matplotlib fails before the evaluation, not after it
    if args.results:
        given = [flag for flag, used in (("--precision", args.precision != "fp32"), ("--device", args.device),
                                         ("--corr", args.corr)) if used]
        if given:
            raise SparsedetError(f"{given[0]} sets how --weights RUN runs; a --results file is already computed: "
                                 "leave it out")
        results = load_results(args.results)
        metrics = evaluate_coco(args.val_ann, results)
        out = Path(args.out or ".")
        gt = open_detection_dataset(args.val_ann, "val", args.images).coco if args.plots else None
    else:
        from .api import load_detector
        from .data.transforms import build_transforms
        from .engine.evaluator import evaluate
        from .tools.zoo import resolve_run
        if args.batch_size < 1:
            raise SparsedetError(f"--batch-size must be at least 1, got {args.batch_size}")
        args.weights = str(resolve_run(args.weights))  # a zoo name evaluates into its cached run folder
        model = load_detector(args.weights, ema=args.ema, device=args.device)
        tf = build_transforms(False, [model.config.eval_size], model.config.eval_max_size)
        dataset = open_detection_dataset(args.val_ann, "val", args.images, tf)
        metrics, results = evaluate(model, dataset, args.batch_size, precision=args.precision, corr=args.corr)
        gt = dataset.coco
        name = _dataset_name(args.val_ann) + ("_ema" if args.ema else "")
        weights = Path(args.weights)
        beside = weights.parent / f"{weights.stem}_eval" if weights.is_file() else weights / "eval"
        out = Path(args.out) if args.out else beside / name
    print(format_metrics(metrics))
    if "corr" in metrics:
        from .engine.corr import format_corr
        print(format_corr(metrics["corr"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'metrics.json'}")
    if args.plots:
        from .tools.plots import write_eval_plots
        written = write_eval_plots(gt, results, out, args.confusion_threshold)
        print(f"wrote {', '.join(p.name for p in written)} in {out}")
    return 0


def _dataset_name(path: str) -> str:
    """A dataset's short name: a COCO json's file name without .json (instances_val2017), or a YOLO
    dataset's folder name (for its data.yaml or the folder itself)."""
    path = Path(path).resolve()
    if path.is_dir() or path.suffix.lower() in (".yaml", ".yml"):
        path = path if path.is_dir() else path.parent
        return path.name or "data"
    return path.stem


def cmd_predict(args) -> int:
    from .api import load_detector
    from .models.postprocess import check_threshold
    from .tools.predict import collect_inputs, predict_to_folder
    check_threshold(args.threshold)
    model = load_detector(args.weights, device=args.device)
    files, videos = collect_inputs(args.inputs)
    predict_to_folder(model, files, Path(args.out), args.threshold, args.top_k, args.precision, args.batch_size,
                      videos=videos, save_txt=args.save_txt, max_frames=args.max_frames)
    drawn = [f"{len(files)} drawn images"] * bool(files) + [f"{len(videos)} drawn videos"] * bool(videos)
    print(f"wrote {Path(args.out) / 'predictions.json'}, {' and '.join(drawn)}"
          + (f" and YOLO labels in {Path(args.out) / 'labels'}" if args.save_txt else ""))
    return 0


def cmd_plot(args) -> int:
    from .tools.plots import plot_training
    written = plot_training(args.run, args.out)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_convert(args) -> int:
    from .tools.convert import convert_to_run
    convert_to_run(args.source, args.path, args.out, args.overrides)
    print(f"wrote {args.out}")
    return 0


def cmd_viz(args) -> int:
    from .config import parse_overrides
    from .tools.bench import check_target, load_model
    from .tools.viz import visualize
    from .tools.zoo import resolve_run
    if not Path(args.image).is_file():
        raise SparsedetError(f"image not found: {args.image}")
    check_target(args.target)
    args.target = str(resolve_run(args.target))
    model = load_model(args.target, parse_overrides(args.overrides + _deprecated_set(args)))
    if not Path(args.target).is_dir():
        warnings.warn(f"{args.target} is a preset with random weights: the figures show an untrained model")
    facts = visualize(model, args.image, args.out, args.query, args.layer, args.threshold)
    corr = facts["corr"]
    figures = "tokens_per_level,tokens_per_layer,decoder_query," + ("dam," if corr else "") + "detections"
    print(f"query {facts['decoder']['query']}, decoder layer {facts['decoder']['layer']}; tokens updated per "
          f"encoder layer {facts['tokens_per_layer']}; {facts['detections']} detections; Corr "
          f"{'n/a (no sampling points)' if corr is None else format(corr['mean'], '.3f')}; wrote {args.out}/"
          f"{{{figures}}}.png and viz.json")
    return 0


def cmd_export(args) -> int:
    from .tools import bench
    from .tools.export import describe
    if args.target.lower().endswith(".onnx"):
        raise SparsedetError(f"{args.target} is already an ONNX file; export takes a run folder or a preset")
    from .tools.zoo import resolve_run
    bench.check_target(args.target)
    args.target = str(resolve_run(args.target))
    model = bench.load_model(args.target)
    if not Path(args.target).is_dir():
        warnings.warn(f"{args.target} is a preset with random weights: the file computes an untrained model")
    size = bench.parse_size(args.size) if args.size else None
    report = model.export_onnx(args.out, size=size, opset=args.opset, top_k=args.top_k, precision=args.precision)
    print(f"wrote {args.out}; onnxruntime against PyTorch: {describe(report)}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from .config import parse_overrides
    from .tools import bench
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch < 1 or args.runs < 0 or args.warmup < 0:
        raise SparsedetError("--batch must be at least 1, --runs and --warmup at least 0")
    if args.dtype:
        warnings.warn("--dtype is deprecated and will be removed; use --precision", FutureWarning)
        args.precision = args.dtype
    from .engine.device import resolve_device
    device = resolve_device(args.device or "auto", fix="--device cpu")
    args.targets, positional = _split_overrides(args.targets + args.overrides)
    for target in args.targets:
        bench.check_target(target)
    sizes = [bench.parse_size(s) for s in args.size or []]
    overrides = parse_overrides(positional + _deprecated_set(args))
    key, values = bench.parse_sweep(args.sweep) if args.sweep else (None, [None])
    if args.plot and key:
        raise SparsedetError("--plot draws trained runs as they are; leave out --sweep")
    env = bench.environment(device, args.precision)
    print(bench.format_environment(env))
    print(bench.CONVENTION)
    results = []
    for target in args.targets:
        for size in sizes or [None]:
            rows = []
            for value in values:
                chosen = {**overrides, **({key: value} if key else {})}
                model = bench.load_model(target, chosen)
                size = size or bench.default_size(model.config)
                row = bench.bench_model(model, size, args.batch, device, args.precision, args.runs, args.warmup,
                                        True)
                rows.append({"model": target, "overrides": chosen, **row})
                if not key:
                    print(bench.format_result(target, row))
            if key:
                print(f"{target}  {size[0]}x{size[1]}  sweep of {key}")
                print(bench.format_sweep(key, values, rows))
            results += rows
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"convention": bench.CONVENTION, "environment": env,
                                               "results": results}, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        points = []
        for target in args.targets:
            metrics = Path(target) / "metrics.json"
            if not metrics.is_file():
                raise SparsedetError(f"--plot needs run folders with metrics.json (from `sparsedet train` with "
                                     f"--val, or `sparsedet eval --out RUN`); {metrics} not found")
            recorded = read_json_object(metrics, "metrics")
            if recorded.get("AP") is None:
                raise SparsedetError(f"{metrics} has no AP entry")
            gflops = next(r["gflops"]["total"] for r in results if r["model"] == target)
            points.append((Path(target).name, gflops, recorded["AP"], recorded.get("corr")))
        bench.plot_ap_vs_gflops(points, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_check_data(args) -> int:
    from .data.check import check_dataset, format_problems
    problems = check_dataset(args.ann, args.images)
    print(format_problems(problems) if problems else f"{args.ann}: no problems found")
    return 1 if any(p.severity == "error" for p in problems) else 0


def cmd_demo(args) -> int:
    import shutil
    import time

    from .data.synthetic import write_synthetic
    from .engine.build import build_trainer
    from .tools.demo import show_predictions
    out = Path(args.out)
    shutil.rmtree(out / "run", ignore_errors=True)  # the demo starts over each time
    t0 = time.perf_counter()
    info = write_synthetic(out / "data", n_train=400, n_val=100, size=256, seed=args.seed)
    print(f"[1/4] synthetic dataset: {info['num_images']['train']} train / {info['num_images']['val']} val images "
          f"in {out / 'data'}")
    overrides = [f"train.minutes={args.minutes}", "train.max_steps=1000000", "train.eval_every=-1",
                 f"train.seed={args.seed}"] + args.overrides
    config, model, train_set, val_set = _prepare_training(args.preset, None, overrides,
                                                          {"train": info["train"], "val": info["val"]})
    print(f"[2/4] training {args.preset} for {args.minutes:g} min")
    trainer = build_trainer(model, config, train_set, val_set, out / "run", progress=True)
    metrics = trainer.fit()
    (out / "metrics.json").write_text(json.dumps({"step": trainer.step, **metrics}, indent=2))
    print(f"[3/4] AP {metrics['AP']:.3f} after {trainer.step} steps; wrote {out / 'metrics.json'}")
    print(f"[4/4] {show_predictions(model, Path(info['val']), Path(info['val']).parent, out)} "
          f"(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
