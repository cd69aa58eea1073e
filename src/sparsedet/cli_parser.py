"""The command line's grammar: every verb, its options and their help (``sparsedet <verb> --help``).
``cli.py`` runs the verb a parse names (``args.command``)."""
from __future__ import annotations

import argparse

from .config import PRECISIONS
from .tools.convert import SOURCES
from .tools.runtimes import RUNTIMES, runtime_help

PRECISION_HELP = ("precision of the forward pass: fp32 (default), bf16 or fp16 (autocast; fp16 on CUDA only); "
                  "boxes and scores come back in fp32")
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available, else cpu; an .onnx file runs on the CPU)"
TRAIN_DEVICE_HELP = ("cpu, cuda, cuda:N or auto (the same as the override train.device=...; default auto: cuda when "
                     "available, else cpu; under torchrun each process takes cuda:LOCAL_RANK)")
RUNTIME_HELP = runtime_help()  # the built-in runtimes (a plug-in's is a choice too, from the same table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsedet", description="Efficient detection transformers: train, evaluate, "
                                "predict and convert on CPU or GPU.")
    sub = p.add_subparsers(title="verbs", metavar="VERB")

    s = sub.add_parser("demo", help="synth -> train -> eval -> predict on a synthetic dataset",
                       description="Writes a synthetic COCO dataset, trains a small model for --steps or --minutes, "
                       "whichever ends first, evaluates it and draws predictions. Outputs DIR/metrics.json and "
                       "DIR/predictions.png.")
    s.add_argument("--steps", type=int, default=2000,
                   help="training steps (default 2000: AP about 0.5 on the synthetic val split)")
    s.add_argument("--minutes", type=float, default=10.0,
                   help="training wall-clock budget, stopping earlier on a slow or busy machine (default 10)")
    s.add_argument("--preset", default="dino_tiny", help="model preset (default dino_tiny)")
    s.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", help=TRAIN_DEVICE_HELP)
    add_overrides(s)
    s.set_defaults(command="demo")

    s = sub.add_parser("synth", help="write a deterministic synthetic COCO (or YOLO) dataset",
                       description="Writes DIR/train.json, DIR/val.json and the images they reference; with "
                       "--format yolo also a YOLO copy in DIR/yolo (data.yaml, images/, labels/).")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--train", type=int, default=400, help="training images (default 400)")
    s.add_argument("--val", type=int, default=100, help="validation images (default 100)")
    s.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", choices=["coco", "yolo"], default="coco", help="yolo: also write DIR/yolo")
    s.set_defaults(command="synth")

    s = sub.add_parser("train", help="train a model on a COCO or YOLO dataset (one process or torchrun)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Trains PRESET (or fine-tunes --weights RUN, or continues --resume RUN) and writes "
                       "into --out (default: the first free runs/train, runs/train2, ...): model.safetensors + "
                       "config.json (+ ema.safetensors with train.ema=true), metrics.jsonl (one object per logged "
                       "step and per evaluation), steps.csv (every step's lr and loss terms), metrics.json (last "
                       "evaluation), checkpoints/ (the newest train.keep_checkpoints step checkpoints and the best "
                       "by AP, each resumable) and, when tensorboard is installed, tensorboard/. At the end: "
                       "results.csv (a row per log line and evaluation), loss.png, lr.png and ap.png (with "
                       "pip install 'sparsedet[viz]') and val_predictions.png (val images, ground truth left, "
                       "predictions right).\n\n"
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
                       "signal quits at once without saving. A failed write (disk full) stops with one line naming "
                       "the newest intact checkpoint and the --resume command; the exit status is 2.")
    s.add_argument("--preset", help="model preset (see `sparsedet presets`)")
    s.add_argument("--weights", help="fine-tune from this run folder or zoo name (another class set is fine: class "
                   "heads restart)")
    s.add_argument("--resume", metavar="RUN", help="continue this run exactly from its newest checkpoint (or from "
                   "RUN/checkpoints/step_N when given that); data and settings come from RUN/config.json, overrides "
                   "may change them (e.g. train.max_steps)")
    s.add_argument("--train", dest="train_ann", help="training data: COCO json, or YOLO data.yaml or its folder")
    s.add_argument("--val", dest="val_ann", help="validation data (COCO json or YOLO yaml)")
    s.add_argument("--images", help="COCO image root (default: each json's folder, or its images/ folder when the "
                   "files are there)")
    s.add_argument("--out", help="run folder to write (default: the first free runs/train, runs/train2, ...; "
                   "with --resume: RUN)")
    s.add_argument("--no-progress", action="store_true",
                   help="no progress bars: plain log lines every train.log_every steps (for nohup and batch logs)")
    s.add_argument("--device", help=TRAIN_DEVICE_HELP)
    add_overrides(s)
    s.set_defaults(command="train")

    s = sub.add_parser("eval", help="COCO AP of a run folder, an exported .onnx file or a results file",
                       description="Either --weights RUN (runs the model on --val; RUN may also be an .onnx file "
                       "from `sparsedet export`, run in onnxruntime or, with --runtime openvino, OpenVINO) or "
                       "--results DET.json (a COCO results file). Prints a table and writes DIR/metrics.json: by "
                       "default RUN/eval/DATA/metrics.json (DATA: the --val json's or yaml's dataset name, plus "
                       "_ema with --ema; MODEL_eval/DATA beside an .onnx file), so the training metrics in "
                       "RUN/metrics.json stay; --out RUN replaces those. With --plots also pr_curve.png, "
                       "pr_curve_iou50.png, confusion_matrix.png and confusion_matrix.json beside it (needs pip "
                       "install 'sparsedet[viz]').")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="run folder, zoo name (`sparsedet zoo`) or exported .onnx file")
    src.add_argument("--results", help="COCO results json")
    s.add_argument("--ema", action="store_true", help="evaluate the run's EMA weights (ema.safetensors)")
    s.add_argument("--val", required=True, dest="val_ann",
                   help="ground truth: COCO json, or YOLO data.yaml or its folder (its val split)")
    s.add_argument("--images", help="image root (default: the json's folder, or its images/ folder when the "
                   "files are there)")
    s.add_argument("--out", help="folder for metrics.json (default: RUN/eval/DATA, or . for --results)")
    add_runtime_options(s, "images per forward (default 4)")
    s.add_argument("--plots", action="store_true",
                   help="also draw precision-recall curves (per class and over all classes; IoU 0.50:0.95 and 0.50) "
                   "and a confusion matrix with a background row and column")
    s.add_argument("--confusion-threshold", type=float, default=None, metavar="T",
                   help="minimum score of the detections the confusion matrix counts (default: the run's, recorded "
                   "at the end of its training; else 0.5)")
    s.add_argument("--corr", action="store_true",
                   help="also Corr, per encoder layer and its mean: the share of the decoder's attention map (Sparse "
                   "DETR's DAM) on the tokens the encoder kept, per image, averaged over images (1 for dense "
                   "encoders; an error for the single-level kinds, which have no sampling points); written to "
                   "metrics.json as \"corr\"")
    s.set_defaults(command="eval")

    s = sub.add_parser("predict", help="detect objects in images, videos and streams",
                       description="Writes DIR/predictions.json (COCO results entries plus file_name and "
                       "category_name, and frame for a video; boxes in original pixels), one drawn PNG per image and "
                       "one drawn DIR/NAME_pred.mp4 per video. Videos (.mp4, .mov, .avi, .mkv, .webm, ...), stream "
                       "URLs (rtsp://..., http://...) and webcams (0, /dev/video0) are read frame by frame with "
                       "PyAV (pip install 'sparsedet[video]'); Ctrl-C ends a live stream and keeps what was seen. "
                       "Prints a line per image (detections counted by class, ms in the model) and a total. An "
                       "image file that cannot be read is skipped with a warning and counted at the end.")
    s.add_argument("--weights", required=True, help="run folder, zoo name (`sparsedet zoo`), or an .onnx file from "
                   "`sparsedet export` (run in onnxruntime, or in OpenVINO with --runtime openvino)")
    s.add_argument("inputs", nargs="+", metavar="SOURCE", help="image, video, folder (searched recursively), "
                   "stream URL or webcam index")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--threshold", type=float, default=None, help="minimum score (default: the run's, recorded at "
                   "the end of its training from its val split; else 0.5)")
    s.add_argument("--top-k", type=int, default=None, help="at most K detections per image")
    add_runtime_options(s, "images or frames per forward (default 4)")
    s.add_argument("--save-txt", action="store_true", help="also write YOLO labels DIR/labels/NAME.txt (a video: "
                   "NAME_FRAME.txt): one line `class cx cy w h score` per detection, normalised to the image; "
                   "class is the index among the model's classes")
    s.add_argument("--max-frames", type=int, help="read at most this many frames of each video or stream")
    s.add_argument("--strict", action="store_true", help="exit 1 when an image file could not be read (it is "
                   "skipped with a warning either way, and the others are written)")
    s.set_defaults(command="predict")

    s = sub.add_parser("serve", help="an HTTP detection service with a web page (FastAPI + uvicorn)",
                       description="Serves --weights over HTTP: POST /v1/predict (an image as the raw body, or the "
                       "multipart field 'file'; ?threshold=&max_detections=) answers JSON detections equal to "
                       "`sparsedet predict`'s; POST /v1/tokens the tokens a sparse encoder kept; GET /health, "
                       "/v1/model, /metrics (Prometheus) and / (a web page that works offline). Concurrent requests "
                       "run as one batch; a full queue answers 503 with Retry-After. SIGTERM or Ctrl-C stops "
                       "accepting, answers the requests in flight and exits 0. Needs pip install "
                       "'sparsedet[serve]'. Details: docs/serve.md.")
    s.add_argument("--weights", required=True, help="run folder, zoo name (`sparsedet zoo`), or an .onnx file from "
                   "`sparsedet export` (run in onnxruntime, or in OpenVINO with --runtime openvino)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only; "
                   "0.0.0.0 listens on every interface)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--max-batch", type=int, help="at most this many images per forward (default: 8 on a GPU; 2 on a "
                   "CPU, where larger batches answered fewer images per second: docs/serve.md)")
    s.add_argument("--max-wait-ms", type=float, default=5.0, help="how long the first request of a batch waits for "
                   "others (default 5 ms)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait for the model; beyond, 503 "
                   "with Retry-After (default 64)")
    s.add_argument("--max-bytes", type=int, default=20 * 1024 * 1024, help="largest request body (default 20 MiB; "
                   "larger: 413)")
    s.add_argument("--max-pixels", type=int, default=50_000_000, help="largest image, width x height (default 50 "
                   "million; larger: 413)")
    s.add_argument("--grace", type=float, default=30.0, help="seconds a stop waits for the requests in flight "
                   "(default 30)")
    s.add_argument("--device", help=DEVICE_HELP)
    s.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    s.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime", help=RUNTIME_HELP)
    s.add_argument("--workers", type=int, help="batches run side by side (default: 2 on a CPU with 2 or more cores, "
                   "each on half of them: more images per second than one batch on every core; 1 on a GPU and in "
                   "OpenVINO)")
    s.add_argument("--threads", type=int, help="CPU threads of each worker's forward (torch, or an .onnx file's "
                   "runtime; default: the cores shared among the workers). Replicas on one machine: divide the "
                   "cores among them")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    s.set_defaults(command="serve")

    s = sub.add_parser("plot", help="draw a run's training curves (loss terms, lr, AP) as PNGs",
                       description="Reads RUN/steps.csv and RUN/metrics.jsonl (written by `sparsedet train`, which "
                       "also draws these at its end) and writes loss.png (the total and each loss term over steps, "
                       "every step's value: final decoder layer solid, encoder and denoising parts dashed, earlier "
                       "decoder layers thin grey), lr.png and, when the run was evaluated, ap.png (AP, AP50, AP75; "
                       "EMA dashed) into RUN or --out. A run without steps.csv (older versions) plots its log lines. "
                       "Needs pip install 'sparsedet[viz]'.")
    s.add_argument("run", metavar="RUN", help="run folder")
    s.add_argument("--out", help="folder for the PNGs (default: RUN)")
    s.set_defaults(command="plot")

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
    s.set_defaults(command="convert")

    s = sub.add_parser("export", help="write a run or preset as ONNX and check it in onnxruntime",
                       description="Writes one ONNX file: inputs images [B,3,H,W] in [0,1] (padded), mask [B,H,W] "
                       "(True on padding), sizes [B,2] (original height, width); outputs the top-k boxes (xyxy, "
                       "original pixels, clipped), scores and labels (category ids), post-processing included. "
                       "Then runs it in onnxruntime on sample images against PyTorch (boxes within 0.5 px, scores "
                       "within 1e-3, same labels), prints the figures, and exits 2 keeping the file as "
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
    s.add_argument("--device", help="where PyTorch traces the model and computes the detections the file is "
                   "checked against: cpu (default), cuda or cuda:N (the check itself runs onnxruntime on the CPU)")
    q = s.add_argument_group("int8", "post-training static quantisation for CPUs (docs/export.md, INT8): the float "
                             "file is checked against PyTorch, quantised with ranges from --calibration images, then "
                             "both files are scored (COCO AP) on --val; the export refuses a file that loses more "
                             "than --max-ap-drop AP")
    q.add_argument("--int8", action="store_true", help="write an int8 file (needs --calibration)")
    q.add_argument("--calibration", metavar="DATA", help="calibration images: COCO json, or YOLO data.yaml (its "
                   "train split)")
    q.add_argument("--calibration-images", type=int, default=64, metavar="N",
                   help="images of DATA to calibrate on, the first N (default 64)")
    q.add_argument("--val", metavar="DATA", help="data the AP of both files is measured on (default: the "
                   "calibration json, or the YOLO yaml's val split)")
    q.add_argument("--images", help="COCO image root of the json files (default: each json's folder, or its images/)")
    q.add_argument("--keep-float", metavar="GROUPS", help="layer groups left in float, comma-separated: backbone, "
                   "neck, encoder-sampling, encoder-attention, encoder-ffn, token-scoring, query-selection, "
                   "decoder-sampling, decoder-attention, decoder-ffn, heads, other; 'none' quantises every layer "
                   "(default: the measured recipe, docs/export.md)")
    q.add_argument("--max-ap-drop", type=float, default=0.01, help="largest AP loss accepted (default 0.01); a file "
                   "that loses more is kept as *.rejected.onnx and the export exits 2")
    s.set_defaults(command="export")

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
    s.add_argument("--device", help=DEVICE_HELP)
    s.add_argument("--precision", choices=PRECISIONS, default="fp32", help="precision of the timed runs: fp32 "
                   "(default), bf16 or fp16 (autocast; fp16 on CUDA only); each row says what ran")
    s.add_argument("--dtype", choices=PRECISIONS, help=argparse.SUPPRESS)  # deprecated spelling of --precision
    s.add_argument("--runs", type=int, default=10, help="timed runs (default 10; 0 counts cost only)")
    s.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    s.add_argument("--threads", type=int, help="CPU threads of torch and of an .onnx file's runtime (default: "
                   "torch's choice)")
    s.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime", help=RUNTIME_HELP)
    s.add_argument("--sweep", metavar="KEY=V1,V2,...", help="one row per value, e.g. keep_ratio=0.1,0.2,0.3")
    s.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # deprecated: positional k=v
    s.add_argument("--json", help="also write the results to this file")
    s.add_argument("--plot", metavar="PNG", help="draw AP against GFLOPs of the given runs, and Corr per encoder "
                   "layer beside it for runs whose metrics.json has one (`sparsedet eval --corr --out RUN`); "
                   "needs [viz]")
    s.set_defaults(command="bench", overrides=[])  # key=value after an option lands here (see main)

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
    s.add_argument("--threshold", type=float, default=None, help="minimum score of drawn detections (default: the "
                   "run's, recorded at the end of its training from its val split; else 0.3)")
    s.add_argument("--device", help="cpu (default), cuda or cuda:N: where the model runs (the figures are drawn on "
                   "the CPU)")
    s.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # deprecated: positional k=v
    add_overrides(s)
    s.set_defaults(command="viz")

    s = sub.add_parser("check-data", help="validate a COCO or YOLO dataset",
                       description="Decodes every image and reports missing/unreadable images, size mismatches, "
                       "degenerate or out-of-bounds boxes, duplicate ids, unknown category ids and images without "
                       "annotations; for a YOLO dataset (every split): label lines with an unknown class index or "
                       "coordinates outside [0, 1], and images without a label file (counted). A train or val split "
                       "without a single box is an error. A problem met more than once is summarised with at most 5 "
                       "examples; the dataset's images, boxes and classes are counted. Exit 0 when clean, 1 on errors.")
    s.add_argument("--ann", required=True, metavar="DATA",
                   help="COCO json, or YOLO data.yaml or its folder (all its splits are checked)")
    s.add_argument("--images", help="COCO image root (default: the json's folder, or its images/ folder when the "
                   "files are there)")
    s.set_defaults(command="check_data")

    s = sub.add_parser("presets", help="list the model presets")
    s.set_defaults(command="presets")

    s = sub.add_parser("zoo", help="list the released checkpoints that --weights takes by name",
                       description="Name, published COCO AP, converter source and released file of each official "
                       "checkpoint. --weights NAME (eval, predict, train) and Detector.from_pretrained(NAME) download "
                       "the file once into $SPARSEDET_HOME (default ~/.cache/sparsedet), check it, convert it once "
                       "and load the converted run; later uses need no network. SPARSEDET_MIRROR=URL fetches "
                       "URL/FILE instead.")
    s.set_defaults(command="zoo")
    return p


def add_runtime_options(s: argparse.ArgumentParser, batch_help: str) -> None:
    """--batch-size, --device, --precision and --runtime, as every verb that runs a model for its
    outputs has them."""
    s.add_argument("--batch-size", type=int, default=4, help=batch_help)
    s.add_argument("--device", help=DEVICE_HELP)
    s.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    s.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime", help=RUNTIME_HELP)


def add_overrides(s: argparse.ArgumentParser) -> None:
    """Positional key.sub=value config overrides (``cli.parse_args`` also collects those after options)."""
    s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
