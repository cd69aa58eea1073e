"""Command line: ``sparsedet <verb>`` runs the verb (its grammar: ``cli_parser.py``). Every verb has
``--help``."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_export import cmd_export
from .cli_parser import build_parser
from .cli_serve import cmd_serve
from .errors import SparsedetError
from .filewrite import atomic_write
from .jsonfile import read_json_object
from .plugins import load_plugins

if TYPE_CHECKING:  # the verbs import what they need when they run (a quick --help)
    from .config import Config, TrainConfig


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
    load_plugins()  # third-party encoders and presets, before any name is looked up
    parser = build_parser()
    args = parse_args(argv, parser)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    # The command's warnings read `warning: message`; the caller's format comes back afterwards (a
    # program calling main keeps its own). formatwarning rather than showwarning, so that a caller
    # recording warnings (catch_warnings(record=True), pytest.warns) still records them.
    previous = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        return COMMANDS[args.command](args) or 0
    except SparsedetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


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
    """Config, model and datasets for a new training run; the class table comes from the training data.
    ``weights``: the model (and the image sizes it trained at, ``data.*`` besides the paths) from that
    run, the schedule (``train.*``) from `_fine_tuning_schedule`; then the overrides."""
    from .api import Detector
    from .config import apply_overrides
    from .engine.checkpoint import load_config
    from .engine.rng import seed_everything
    from .data.datasets import make_datasets
    from .presets import get_preset
    from .resolve import resolve_model
    if bool(preset) == bool(weights):
        raise SparsedetError("give exactly one of --preset NAME, --weights RUN or --resume RUN")
    weights = resolve_model(weights, "train").path() if weights else weights  # a zoo name: its cached run folder
    config = load_config(weights) if weights else get_preset(preset)
    if weights:
        config.train = _fine_tuning_schedule(config.preset)[0]
        config.model.score_threshold = None  # chosen again on the new val split
    # A new run's data are the ones given now, never a fine-tuned run's old ones.
    apply_overrides(config, {f"data.{k}": data.get(k) or "" for k in ("train", "val", "images")})
    apply_overrides(config, overrides)
    config, train_set, val_set = make_datasets(config)
    m = config.model
    m.classes, m.category_ids, m.num_classes = train_set.classes, train_set.category_ids, len(train_set.classes)
    seed_everything(config.train.seed)  # the initial weights follow train.seed
    model = Detector.for_finetuning(weights, config) if weights else Detector.from_config(config, backbone_weights=True)
    return config, model, train_set, val_set


def _fine_tuning_schedule(preset: str) -> tuple[TrainConfig, str]:
    """The ``train`` section a fine-tune starts from, and where it comes from: the defaults of the
    preset the run started from, not the run's own (a demo's time budget and train.max_steps=1000000
    would carry over), else TrainConfig's defaults."""
    from .config import TrainConfig
    from .presets import PRESETS, get_preset
    if preset in PRESETS:
        return get_preset(preset).train, f"schedule from preset {preset}'s defaults"
    named = f"an unknown preset {preset!r}" if preset else "no preset"
    return TrainConfig(), f"schedule from the library's defaults (TrainConfig: the run names {named})"


def _training_origin(preset: str | None, weights: str | None, config: Config, overrides: list[str]) -> str:
    """The summary's line on where a new run's model and schedule come from."""
    text = (f"model from {weights}, {_fine_tuning_schedule(config.preset)[1]}" if weights
            else f"model and schedule from preset {preset}")
    return text + (", then the overrides given" if overrides else "")


def cmd_train(args) -> int:
    from .engine import distributed
    from .engine.interrupt import TrainingInterrupted, resume_command
    from .data.datasets import make_datasets
    from .engine.build import build_trainer, set_threads
    from .tools.report import RunReport
    data = {"train": args.train_ann, "val": args.val_ann, "images": args.images}
    args.overrides = _with_device(args)
    if args.resume:
        from .api import Detector
        from .config import apply_overrides
        from .engine.checkpoint import load_config, split_resume_target
        run, checkpoint = split_resume_target(args.resume)
        if args.preset or args.weights or (args.out and Path(args.out) != run):
            raise SparsedetError("--resume RUN continues RUN as it was configured; leave out --preset, --weights "
                                 "and --out (overrides such as train.max_steps=... are allowed)")
        config = load_config(checkpoint or run)
        apply_overrides(config, {f"data.{k}": v for k, v in data.items() if v is not None})
        apply_overrides(config, args.overrides)
        config, train_set, val_set = make_datasets(config)
        if train_set.category_ids != config.model.category_ids:
            raise SparsedetError(f"{config.data.train} does not have the categories {args.resume} was trained on")
        model, out = Detector.from_config(config), run  # the checkpoint holds the backbone
        origin = f"model and schedule from {args.resume} (resumed)"
    else:
        if not args.train_ann:
            raise SparsedetError("--train is required (or --resume RUN)")
        config, model, train_set, val_set = _prepare_training(args.preset, args.weights, args.overrides, data)
        # None: build_trainer takes the first free runs/train, runs/train2, ...
        out, origin = args.out, _training_origin(args.preset, args.weights, config, args.overrides)
    set_threads(config.train.threads)
    trainer = build_trainer(model, config, train_set, val_set, out, progress=not args.no_progress, origin=origin)
    trainer.hooks.append(RunReport())
    try:
        if args.resume:
            path = trainer.resume(checkpoint)
            if trainer.ctx.is_main:
                print(f"resumed {path} at step {trainer.step}")
        trainer.fit()
    except TrainingInterrupted as stop:  # every process stopped at the step they agreed on
        if trainer.ctx.is_main:
            print(f"interrupted by {stop.signal_name} at step {stop.step}; saved a resumable checkpoint in "
                  f"{stop.run_dir / 'checkpoints'}. Continue with:\n  "
                  f"{resume_command(stop.run_dir, trainer.ctx.distributed)}", file=sys.stderr, flush=True)
        code = stop.exit_code
    except BaseException:
        distributed.teardown()
        raise
    else:
        if trainer.ctx.is_main:
            print(f"saved {trainer.out_dir}")
        code = 0
    return distributed.exit_together(code)


def _with_device(args) -> list[str]:
    """The overrides, with ``--device D`` (train, demo) as ``train.device=D`` after them: the flag wins."""
    return [*args.overrides, f"train.device={args.device}"] if args.device else list(args.overrides)


def cmd_eval(args) -> int:
    from .data.coco import open_detection_dataset
    from .engine.evaluator import evaluate_coco, format_metrics, load_results
    if args.plots:
        from .tools.plots import pyplot
        pyplot()  # a missing matplotlib fails before the evaluation, not after it
    if args.results:
        given = [flag for flag, used in (("--precision", args.precision != "fp32"), ("--device", args.device),
                                         ("--corr", args.corr), ("--runtime", args.runtime != "onnxruntime")) if used]
        if given:
            raise SparsedetError(f"{given[0]} sets how --weights RUN runs; a --results file is already computed: "
                                 "leave it out")
        results = load_results(args.results)
        metrics = evaluate_coco(args.val_ann, results)
        out = Path(args.out or ".")
        gt = open_detection_dataset(args.val_ann, "val", args.images).coco if args.plots else None
    else:
        from .data.transforms import build_transforms
        from .engine.evaluator import evaluate
        from .api import load_ref
        from .resolve import resolve_model
        if args.batch_size < 1:
            raise SparsedetError(f"--batch-size must be at least 1, got {args.batch_size}")
        ref = resolve_model(args.weights, "eval")
        model = load_ref(ref, ema=args.ema, device=args.device, runtime=args.runtime)  # the runtime checked first
        _say_runtime(model)
        tf = build_transforms(False, [model.config.eval_size], model.config.eval_max_size)
        dataset = open_detection_dataset(args.val_ann, "val", args.images, tf)
        metrics, results = evaluate(model, dataset, args.batch_size, precision=args.precision, corr=args.corr)
        gt = dataset.coco
        name = _dataset_name(args.val_ann) + ("_ema" if args.ema else "")
        weights = ref.path()  # a zoo name evaluates into its cached run folder
        beside = weights.parent / f"{weights.stem}_eval" if ref.kind == "exported" else weights / "eval"
        out = Path(args.out) if args.out else beside / name
    print(format_metrics(metrics))
    if "corr" in metrics:
        from .engine.corr import format_corr
        print(format_corr(metrics["corr"]))
    payload = json.dumps(metrics, indent=2)
    atomic_write(out / "metrics.json", lambda p: Path(p).write_text(payload), "evaluation metrics (metrics.json)")
    print(f"wrote {out / 'metrics.json'}")
    if args.plots:
        from .engine.thresholds import PREDICT_DEFAULT, Threshold
        from .tools.plots import write_eval_plots
        threshold = Threshold.of(args.confusion_threshold, None if args.results else model.config, PREDICT_DEFAULT)
        written = write_eval_plots(gt, results, out, threshold.value)
        print(f"wrote {', '.join(p.name for p in written)} in {out}; the confusion matrix counts detections scored "
              f"at least {threshold}")
        _warn_if_empty(sum(r["score"] >= threshold.value for r in results), threshold,
                       max((r["score"] for r in results), default=None), f"the {len(gt['images'])} val images",
                       "--confusion-threshold")
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
    from .api import load_ref
    from .models.postprocess import check_threshold
    from .resolve import resolve_model
    from .tools.predict import collect_inputs, predict_to_folder
    if args.threshold is not None:
        check_threshold(args.threshold)  # before the model loads
    model = load_ref(resolve_model(args.weights, "predict"), device=args.device, runtime=args.runtime)
    _say_runtime(model)
    files, videos = collect_inputs(args.inputs)
    seen = predict_to_folder(model, files, Path(args.out), args.threshold, args.top_k, args.precision,
                             args.batch_size, videos=videos, save_txt=args.save_txt, max_frames=args.max_frames,
                             verbose=True)
    if files:
        print(seen.total())
    drawn = ([f"{len(files) - len(seen.skipped)} drawn images"] * bool(files)
             + [f"{len(videos)} drawn videos"] * bool(videos))
    print(f"wrote {Path(args.out) / 'predictions.json'}, {' and '.join(drawn)}"
          + (f" and YOLO labels in {Path(args.out) / 'labels'}" if args.save_txt else "")
          + f": {seen.detections} detections scored above {seen.threshold}")
    _warn_if_empty(seen.detections, seen.threshold, seen.best_score,
                   f"{seen.images} image{'s' * (seen.images != 1)}", "--threshold")
    if seen.skipped:
        names = ", ".join(map(str, seen.skipped[:5])) + (", ..." if len(seen.skipped) > 5 else "")
        count = len(seen.skipped)
        warnings.warn(f"skipped {count} unreadable file{'s' * (count > 1)}: {names}")
    return 1 if seen.skipped and args.strict else 0


def _say_runtime(model) -> None:
    """Name what computes an exported file's detections (runtime, version, inference precision,
    threads): they differ in the last digits from one runtime to another."""
    from .tools.onnx_model import OnnxDetector
    if isinstance(model, OnnxDetector):
        print(f"{model.path} runs in {model.session.label}")


def _warn_if_empty(shown: int, threshold, best: float | None, where: str, flag: str) -> None:
    """Say so when ``threshold`` (an ``engine.thresholds.Threshold``) left ``where`` without a detection."""
    from .engine.thresholds import nothing_shown
    if not shown:
        warnings.warn(nothing_shown(threshold, best, where, flag))


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
    from .api import load_ref
    from .config import parse_overrides
    from .engine.thresholds import Threshold
    from .resolve import resolve_model
    from .tools.viz import visualize
    if not Path(args.image).is_file():
        raise SparsedetError(f"image not found: {args.image}")
    ref = resolve_model(args.target, "viz")
    overrides = parse_overrides(args.overrides + _deprecated_set(args))
    model = load_ref(ref, device=args.device or "cpu", overrides=overrides)
    if ref.kind == "preset":
        warnings.warn(f"{args.target} is a preset with random weights: the figures show an untrained model")
    facts = visualize(model, args.image, args.out, args.query, args.layer, args.threshold)
    corr, threshold = facts["corr"], Threshold(facts["threshold"], facts["threshold_origin"])
    figures = "tokens_per_level,tokens_per_layer,decoder_query," + ("dam," if corr else "") + "detections"
    print(f"query {facts['decoder']['query']}, decoder layer {facts['decoder']['layer']}; tokens updated per "
          f"encoder layer {facts['tokens_per_layer']}; {facts['detections']} detections scored above {threshold}; "
          f"Corr {'n/a (no sampling points)' if corr is None else format(corr['mean'], '.3f')}; wrote {args.out}/"
          f"{{{figures}}}.png and viz.json")
    _warn_if_empty(facts["detections"], threshold, facts["best_score"], args.image, "--threshold")
    return 0


def cmd_bench(args) -> int:
    import torch

    from .api import load_ref
    from .config import parse_overrides
    from .resolve import resolve_model
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
    refs = {target: resolve_model(target, "bench") for target in args.targets}
    for ref in refs.values():
        ref.check_runtime(args.runtime)  # before anything prints or downloads
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
                model = load_ref(refs[target], device="cpu", runtime=args.runtime, overrides=chosen)
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
    from .data.check import check_dataset, format_report
    report = check_dataset(args.ann, args.images)
    print(format_report(report) if report.problems else
          f"{args.ann}: no problems found: {report.counts}")
    return 0 if report.clean else 1


def cmd_demo(args) -> int:
    import shutil
    import time

    from .data.synthetic import write_synthetic
    from .engine.build import build_trainer, set_threads
    from .engine.hooks import SpeedWatch
    from .tools.demo import show_predictions
    out = Path(args.out)
    shutil.rmtree(out / "run", ignore_errors=True)  # the demo starts over each time
    t0 = time.perf_counter()
    info = write_synthetic(out / "data", n_train=400, n_val=100, size=256, seed=args.seed)
    print(f"[1/4] synthetic dataset: {info['num_images']['train']} train / {info['num_images']['val']} val images "
          f"in {out / 'data'}")
    if args.steps < 1:
        raise SparsedetError(f"--steps must be at least 1, got {args.steps}")
    # Steps, not minutes, set the recipe: the learning rate follows whichever of the two is further
    # along (engine.plan), so a busy machine stops at its budget with its schedule finished.
    overrides = [f"train.minutes={args.minutes}", f"train.max_steps={args.steps}", "train.eval_every=-1",
                 f"train.seed={args.seed}"] + _with_device(args)
    config, model, train_set, val_set = _prepare_training(args.preset, None, overrides,
                                                          {"train": info["train"], "val": info["val"]})
    print(f"[2/4] training {args.preset} for {config.train.max_steps} steps or {config.train.minutes:g} min, "
          "whichever ends first")
    set_threads(config.train.threads)
    trainer = build_trainer(model, config, train_set, val_set, out / "run", progress=True,
                            origin=_training_origin(args.preset, None, config, overrides))
    metrics = trainer.fit()
    payload = json.dumps({"step": trainer.step, **metrics}, indent=2)
    atomic_write(out / "metrics.json", lambda p: Path(p).write_text(payload), "demo metrics (metrics.json)")
    print(f"[3/4] AP {metrics['AP']:.3f} after {trainer.step} steps; wrote {out / 'metrics.json'}")
    slowdown = next((h.slowdown for h in trainer.hooks if isinstance(h, SpeedWatch) and h.slowdown), None)
    if slowdown is not None and trainer.step < config.train.max_steps:
        print(f"      the machine was busy: training fell from {slowdown[0]:.2f} to {slowdown[1]:.2f} steps/s, so "
              f"{config.train.minutes:g} min gave {trainer.step} of {config.train.max_steps} steps; rerun on a quieter "
              "machine or with a larger --minutes for the full result")
    print(f"[4/4] {show_predictions(model, Path(info['val']), Path(info['val']).parent, out)} "
          f"(total {time.perf_counter() - t0:.0f} s)")
    return 0


# The verb a parse names (cli_parser: set_defaults(command=...)) -> the function that runs it.
COMMANDS = {"demo": cmd_demo, "synth": cmd_synth, "train": cmd_train, "eval": cmd_eval, "predict": cmd_predict,
            "plot": cmd_plot, "convert": cmd_convert, "export": cmd_export, "bench": cmd_bench, "viz": cmd_viz,
            "serve": cmd_serve, "check_data": cmd_check_data, "presets": cmd_presets, "zoo": cmd_zoo}


if __name__ == "__main__":
    sys.exit(main())
