"""``masksup-med train | evaluate | predict | serve``: the jobs a deployment runs (the Docker entrypoint).

``train``, ``evaluate`` and ``predict`` run a MONAI bundle as a subprocess of this Python
(``python -m monai.bundle run …``) and return its exit code; bundle overrides (``--max_epochs 2``,
``--image_size "[128,128]"``, …) are passed through verbatim. ``serve`` wraps a registered model
with the bundle's preprocessing (:mod:`masksup_med.serving.model`) and runs MLflow's scoring server app on it,
behind request limits (:mod:`masksup_med.serving.app`). ``predict`` and ``serve`` find a registered
model's store as training wrote it and its bundle from the version's ``bundle`` tag.

Bundles are looked up under a bundles root: ``--bundles-dir``, else ``$MASKSUP_BUNDLES_DIR``, else
the ``bundles/`` folder of the source checkout the package runs from, else ``./bundles``. ``predict``
and ``serve`` run a registered model with the bundle it was trained with (its version tag ``bundle``);
``--bundle`` chooses one by hand. Without ``--model``, ``predict --bundle NAME`` and ``serve --bundle NAME``
run the model bundle NAME ships (``NAME/models/model.pt``, listed with its checksum in ``NAME/large_files.yml``;
:mod:`masksup_med.run.shipped`): no training and no MLflow store. ``--tta`` averages each mask over flipped
copies of the image (:class:`masksup_med.inference.FlipInferer`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["add_deploy_commands", "bundle_command", "bundles_root"]

BUNDLES_ENV = "MASKSUP_BUNDLES_DIR"
DEFAULT_BUNDLE = "glas"
FORMATS = {"auto": "auto", "png": ".png", "nifti": ".nii.gz"}  # auto: by the inputs (data.formats.mask_suffix_for)


def bundles_root(explicit: str | os.PathLike | None = None) -> Path:
    """Where bundles live: ``explicit``, ``$MASKSUP_BUNDLES_DIR``, the checkout's ``bundles/``, or ``./bundles``."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(BUNDLES_ENV, "").strip()
    if from_env:
        return Path(from_env)
    checkout = Path(__file__).resolve().parents[2] / "bundles"  # masksup_med/cli/deploy.py -> the checkout
    if checkout.is_dir():
        return checkout
    return Path.cwd() / "bundles"


def bundle_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of bundle ``name`` (must hold ``configs/train.json``); SystemExit naming what is there."""
    base = bundles_root(root)
    folder = base / name
    if not (folder / "configs" / "train.json").is_file():
        found = (
            sorted(p.name for p in base.iterdir() if (p / "configs" / "train.json").is_file()) if base.is_dir() else []
        )
        raise SystemExit(
            f"error: no bundle {name!r} under {base} (expected {folder / 'configs' / 'train.json'}); "
            f"bundles there: {', '.join(found) or 'none'}. Set --bundles-dir or ${BUNDLES_ENV}."
        )
    return folder.resolve()


def _has_override(overrides: Sequence[str], key: str) -> bool:
    flag = f"--{key}"
    return any(arg == flag or arg.startswith(flag + "=") for arg in overrides)


def _override_value(overrides: Sequence[str], key: str) -> str | None:
    flag = f"--{key}"
    for i, arg in enumerate(overrides):
        if arg == flag and i + 1 < len(overrides):
            return overrides[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def bundle_command(config_file: str | os.PathLike, run_id: str, folder: Path, overrides: Sequence[str]) -> list[str]:
    """``python -m monai.bundle run RUN_ID --config_file CONFIG --bundle_root FOLDER OVERRIDES…`` for this Python."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(config_file)]
    if not _has_override(overrides, "bundle_root"):
        cmd += ["--bundle_root", str(folder)]
    return cmd + list(overrides)


def _run_bundle(
    folder: Path, run_id: str, configs: Sequence[str], overrides: Sequence[str], env: dict[str, str] | None = None
) -> int:
    """Run ``configs`` of the bundle in ``folder``, merged in order (a bundle runs from any working directory)."""
    files = [str(folder / "configs" / name) for name in configs]
    config = files[0] if len(files) == 1 else str(files)
    return _run(bundle_command(config, run_id, folder, overrides), env)


def _run(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` in the foreground (``env``: extra environment); forward SIGTERM to it; return its exit code."""
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env={**os.environ, **env} if env else None)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = list(args.overrides or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return extra


def _asks_help(args: argparse.Namespace) -> bool:
    """``masksup-med train glas --help``: the help of this command, not of the bundle runner."""
    if _overrides(args) in (["-h"], ["--help"]):
        args.command_parser.print_help()
        return True
    return False


def _train(args: argparse.Namespace) -> int:
    if _asks_help(args):
        return 0
    folder = bundle_dir(args.bundle, args.bundles_dir)
    return _run_bundle(folder, "training", ["train.json"], _overrides(args))


def _evaluate(args: argparse.Namespace) -> int:
    if _asks_help(args):
        return 0
    folder = bundle_dir(args.bundle, args.bundles_dir)
    overrides = _overrides(args)
    source = _override_value(overrides, "model_source")
    if source and not _has_override(overrides, "image_size"):
        size = _model_image_size(source, _store(folder, overrides))  # a registered model runs at its training size
        if size:
            overrides += ["--image_size", str(size)]
    return _run_bundle(folder, "evaluating", ["train.json", "evaluate.json"], overrides)


def _tracking_env(tracking_uri: str | None) -> dict[str, str] | None:
    """The environment a bundle subprocess needs to use ``tracking_uri`` (None: inherit this one's)."""
    return {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else None


def _store(folder: Path, overrides: Sequence[str], tracking_uri: str | None = None) -> str:
    """The MLflow store a bundle run uses: ``tracking_uri``, ``$MLFLOW_TRACKING_URI``, else the SQLite
    store in the bundle's ``output_dir`` (from the overrides, else the bundle's ``train.json``)."""
    import json

    from masksup_med.tracking.store import resolve_tracking_uri

    if tracking_uri:
        return tracking_uri
    output_dir = _override_value(overrides, "output_dir")
    if output_dir is None:
        output_dir = json.loads((folder / "configs" / "train.json").read_text())["output_dir"]
    return resolve_tracking_uri(output_dir)


def _model_image_size(source: str, store: str) -> list[int] | None:
    """The training size of a registered/logged model in ``store``, from its signature (None for files).

    Any failure leaves the size to the bundle (which then reports the problem).
    """
    if not source.startswith(("models:/", "runs:/")):
        return None
    from masksup_med.serving.model import model_input_size
    from masksup_med.tracking.store import using_store

    try:
        with using_store(store):
            return model_input_size(source)
    except Exception as e:  # noqa: BLE001 - the bundle run reports it properly
        print(f"warning: could not read the input size of {source} from {store}: {e}", file=sys.stderr)
        return None


def _require_existing_store(uri: str) -> str:
    """``uri``, unless it is a SQLite file that does not exist (MLflow would create an empty store there)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise SystemExit(
                f"error: no MLflow store at {path} (nothing was trained or registered there). Pass --tracking-uri "
                "(e.g. sqlite:///outputs/glas/mlflow.db, where training wrote it) or set MLFLOW_TRACKING_URI."
            )
    return uri


def _registry_store(args: argparse.Namespace, overrides: Sequence[str] = ()) -> str:
    """Where ``models:/`` sources are looked up: ``--tracking-uri``, ``$MLFLOW_TRACKING_URI``, else the SQLite
    store in the output_dir of ``--bundle`` (default glas), where training wrote it; it must exist."""
    given = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if given:
        return _require_existing_store(given)
    return _require_existing_store(_store(bundle_dir(args.bundle or DEFAULT_BUNDLE, args.bundles_dir), overrides))


def bundle_for_model(args: argparse.Namespace, store: str | None) -> str:
    """``--bundle``, else the ``bundle`` tag of the registered version ``--model`` names (a name or a path),
    else glas with a warning (a checkpoint file, or a version without the tag)."""
    if args.bundle:
        return args.bundle
    registered = bool(store) and str(args.model).startswith("models:/")
    if registered:
        from masksup_med.tracking.registry import registered_bundle

        try:
            tagged = registered_bundle(args.model, store)
        except Exception as e:  # noqa: BLE001 - loading the model reports it properly
            print(f"warning: could not read the bundle tag of {args.model}: {e}", file=sys.stderr)
            tagged = None
        if tagged:
            name = Path(tagged.rstrip("/")).name
            print(f"{args.model} was trained with bundle {name} (its version tag 'bundle')", file=sys.stderr)
            return name
    why = "no version tag 'bundle'" if registered else "a checkpoint file carries no bundle"
    print(
        f"warning: {args.model} names no bundle ({why}); using the {DEFAULT_BUNDLE} bundle's preprocessing. "
        "Pass --bundle to choose the one it was trained with.",
        file=sys.stderr,
    )
    return DEFAULT_BUNDLE


def _is_registered(source: str) -> bool:
    return str(source).startswith(("models:/", "runs:/"))


def model_or_shipped(args: argparse.Namespace) -> str:
    """``--model``, else the model ``--bundle`` ships (checked against its checksum now); SystemExit naming
    what is missing."""
    from masksup_med.errors import UserError
    from masksup_med.run.shipped import LARGE_FILES, shipped_model, verify_shipped

    if args.model:
        return args.model
    if not args.bundle:
        raise SystemExit(
            "error: pass --model (models:/NAME@ALIAS or a checkpoint file), or --bundle NAME to run the model "
            "that bundle ships (e.g. --bundle kvasir_seg)"
        )
    folder = bundle_dir(args.bundle, args.bundles_dir)
    shipped = shipped_model(folder)
    if shipped is None:
        raise SystemExit(
            f"error: bundle {args.bundle} ships no model ({folder / LARGE_FILES} does not list models/model.pt); "
            "pass --model with a registered model or a training run's models/model.pt"
        )
    try:
        verify_shipped(shipped)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"running the model bundle {args.bundle} ships: {shipped}", file=sys.stderr)
    return str(shipped)


def _predict(args: argparse.Namespace) -> int:
    from masksup_med.data.limits import InputLimits

    given = {key: getattr(args, key) for key in ("max_pixels", "max_image_bytes") if getattr(args, key) is not None}
    try:
        InputLimits(**given)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    overrides = _overrides(args)
    args.model = model_or_shipped(args)
    store = _registry_store(args, overrides) if _is_registered(args.model) else None
    folder = bundle_dir(bundle_for_model(args, store), args.bundles_dir)
    input_dir = Path(args.input)
    if not input_dir.is_dir():
        raise SystemExit(f"error: input folder {input_dir} does not exist")
    cmd_overrides = [
        "--model_source",
        args.model,
        "--input_dir",
        str(input_dir.resolve()),
        "--prediction_dir",
        str(Path(args.output).resolve()),
    ]
    if FORMATS[args.format]:
        cmd_overrides += ["--output_ext", FORMATS[args.format]]
    if args.overlays:
        cmd_overrides += ["--save_overlays", "true"]
    if args.skip_bad_inputs:
        cmd_overrides += ["--skip_bad_inputs", "true"]
    if args.tta:
        cmd_overrides += ["--tta_flips", "true"]
    for key in ("max_pixels", "max_image_bytes"):
        if getattr(args, key) is not None:
            cmd_overrides += [f"--{key}", str(getattr(args, key))]
    if store and not _has_override(overrides, "image_size"):
        size = _model_image_size(args.model, store)
        if size:
            cmd_overrides += ["--image_size", str(size)]
    return _run_bundle(
        folder,
        "inferring",
        ["train.json", "inference.json"],
        cmd_overrides + overrides,
        env=_tracking_env(store or args.tracking_uri),
    )


def _serve(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from masksup_med.serving.app import server_command
    from masksup_med.serving.limits import InputLimits
    from masksup_med.serving.model import build_serving_model

    try:
        limits = InputLimits(
            max_body_bytes=args.max_body_bytes,
            max_pixels=args.max_pixels,
            max_image_bytes=args.max_image_bytes,
            max_images=args.max_images,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    args.model = model_or_shipped(args)
    store = _registry_store(args) if _is_registered(args.model) else None
    folder = bundle_dir(bundle_for_model(args, store), args.bundles_dir)
    workdir = Path(tempfile.mkdtemp(prefix="masksup-serve-"))
    proc: subprocess.Popen | None = None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        try:
            model_dir = build_serving_model(
                args.model,
                folder / "configs" / "train.json",
                workdir / "model",
                device=args.device,
                threshold=args.threshold,
                tracking_uri=store,
                limits=limits,
                tta_flips=args.tta,
            )
        except (MlflowException, ValueError, OSError) as e:
            where = f" from {store}" if store else ""
            raise SystemExit(f"error: cannot serve {args.model}{where}: {e}") from None
        print(
            f"serving {args.model} with bundle {folder.name}{' (flip TTA)' if args.tta else ''} "
            f"on http://{args.host}:{args.port} "
            f"(POST /invocations, GET /ping); limits: {limits}",
            file=sys.stderr,
            flush=True,
        )
        cmd, env = server_command(model_dir, args.host, args.port, args.workers, args.timeout)
        proc = subprocess.Popen(cmd, env={**os.environ, **env})
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir, ignore_errors=True)


def _bundle_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundles-dir",
        metavar="DIR",
        help=f"folder holding the bundles (default: ${BUNDLES_ENV}, else the checkout's bundles/, else ./bundles)",
    )


def add_deploy_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``train``, ``evaluate``, ``predict`` and ``serve``."""
    from masksup_med.data.limits import InputLimits

    defaults = InputLimits()
    passthrough = (
        "bundle overrides, passed verbatim to `python -m monai.bundle run` "
        "(e.g. --dataset_dir /data/glas --output_dir /outputs/glas --max_epochs 50)"
    )

    bundle_jobs = (
        (
            "train",
            _train,
            "train a bundle (python -m monai.bundle run training)",
            "Train BUNDLE with its configs/train.json. Every argument after BUNDLE is a bundle override.",
            "masksup-med train glas --dataset_dir /data/glas --output_dir /outputs/glas --max_epochs 100",
        ),
        (
            "evaluate",
            _evaluate,
            "test-set report of a bundle (python -m monai.bundle run evaluating)",
            (
                "Evaluate BUNDLE with configs/train.json + configs/evaluate.json (per-image CSV, summary JSON). "
                "Every argument after BUNDLE is a bundle override, e.g. --model_source models:/masksup-glas@champion."
            ),
            "masksup-med evaluate glas --dataset_dir /data/glas --output_dir /outputs/glas",
        ),
    )
    for name, handler, summary, description, example in bundle_jobs:
        job = commands.add_parser(name, help=summary, description=description, epilog=f"example: {example}")
        _bundle_options(job)
        job.add_argument("bundle", metavar="BUNDLE", help="bundle name: glas, cvc_clinicdb or kvasir_seg")
        job.add_argument("overrides", nargs=argparse.REMAINDER, metavar="OVERRIDES", help=passthrough)
        job.set_defaults(handler=handler, command_parser=job)

    predict = commands.add_parser(
        "predict",
        help="masks for a folder of images (python -m monai.bundle run inferring)",
        description="Write a mask for every PNG/JPEG/BMP/TIFF image in --input, each at the image's own size, "
        "as <stem>_mask.png in --output. A registered model is run with the bundle it was trained with (its "
        "version tag 'bundle') at the size it was trained at (from its signature). Each image is checked "
        "from its header against --max-pixels / --max-image-bytes before it is decoded; an image over them "
        "or unreadable is skipped, and so is one whose output name in --output is a symbolic link (never "
        "followed or replaced). Two images with one stem (a.png, a.jpg) refuse the run before anything is "
        "written. The run ends with a summary (masks written, inputs skipped and why) and exits non-zero "
        "when an input was skipped, unless --skip-bad-inputs. "
        "Further bundle overrides may follow after `--`.",
        epilog=(
            "example: masksup-med predict --model models:/masksup-glas@champion "
            "--input /data/new --output /outputs/masks"
        ),
    )
    _bundle_options(predict)
    predict.add_argument(
        "--model",
        metavar="SOURCE",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, or a checkpoint file (model.pt); default: the model "
        "--bundle ships (BUNDLE/models/model.pt, checked against its checksum), e.g. --bundle kvasir_seg",
    )
    predict.add_argument("--input", required=True, metavar="DIR", help="folder of images")
    predict.add_argument("--output", required=True, metavar="DIR", help="folder for the masks (<stem>_mask.png)")
    predict.add_argument(
        "--bundle",
        help="bundle whose inference config runs (default: the registered version's 'bundle' tag, else glas); "
        "without --model, its shipped model runs",
    )
    predict.add_argument(
        "--tta",
        action="store_true",
        help="test-time flips: average each mask over the image, its horizontal and its vertical flip "
        "(three network passes per image)",
    )
    predict.add_argument(
        "--format",
        choices=sorted(FORMATS),
        default="auto",
        help="auto (default: NIfTI for NIfTI, DICOM, MetaImage or NRRD inputs, with their affine; PNG otherwise), "
        "png (0/255) or nifti (.nii.gz, 0/1)",
    )
    predict.add_argument(
        "--overlays", action="store_true", help="also write <stem>_overlay.png for a person to look at"
    )
    predict.add_argument(
        "--skip-bad-inputs",
        action="store_true",
        help="exit 0 when inputs were skipped (over the limits, unreadable, output name taken by a link); "
        "they are still listed in the closing summary",
    )
    predict.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        metavar="N",
        help=f"largest image, width x height, read from its header before decoding "
        f"(default: {defaults.max_pixels:,}); larger: skipped",
    )
    predict.add_argument(
        "--max-image-bytes",
        type=int,
        default=None,
        metavar="N",
        help=f"largest image decoded, width x height x channels x bytes per sample "
        f"(default: {defaults.max_image_bytes:,}); larger: skipped",
    )
    predict.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI for models:/ sources (default: $MLFLOW_TRACKING_URI, else the "
        "SQLite store in the output_dir of --bundle or glas, where training wrote it; it must exist)",
    )
    predict.add_argument("overrides", nargs="*", metavar="-- OVERRIDES", help="bundle overrides, e.g. -- --device cpu")
    predict.set_defaults(handler=_predict)

    serve = commands.add_parser(
        "serve",
        help="serve a model over REST (MLflow scoring server: images in, masks out)",
        description="Serve a registered model, a checkpoint file or the model a bundle ships with MLflow's "
        "scoring server: GET /ping is the health check, "
        "POST /invocations takes base64-encoded image files in column 'image' and answers with "
        "base64 PNG masks (0/255) at each image's size. See docker/README.md for the request format.",
        epilog="example: masksup-med serve --model models:/masksup-glas@champion --port 8080   (binds 127.0.0.1: "
        "the server has no authentication; put it behind an authenticating proxy to expose it)",
    )
    _bundle_options(serve)
    serve.add_argument(
        "--model",
        metavar="SOURCE",
        help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint file (model.pt); default: the model "
        "--bundle ships, e.g. --bundle kvasir_seg (no MLflow store needed)",
    )
    serve.add_argument(
        "--bundle",
        help="bundle whose preprocessing is used (default: the registered version's 'bundle' tag, else glas); "
        "without --model, its shipped model is served",
    )
    serve.add_argument(
        "--tta",
        action="store_true",
        help="test-time flips: average each mask over the image and its two flips (three passes per image)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    serve.add_argument("--workers", type=int, default=1, help="server worker processes (default: 1)")
    serve.add_argument("--timeout", type=int, default=None, help="seconds allowed per request (MLflow default: 60)")
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.max_body_bytes,
        metavar="N",
        help=f"largest request body, base64 images included (default: {defaults.max_body_bytes:,}); larger: 413",
    )
    serve.add_argument(
        "--max-pixels",
        type=int,
        default=defaults.max_pixels,
        metavar="N",
        help=f"largest image, width x height, read from its header before decoding "
        f"(default: {defaults.max_pixels:,}); larger: 413",
    )
    serve.add_argument(
        "--max-image-bytes",
        type=int,
        default=defaults.max_image_bytes,
        metavar="N",
        help=f"largest image decoded, width x height x channels x bytes per sample "
        f"(default: {defaults.max_image_bytes:,}); larger: 413",
    )
    serve.add_argument(
        "--max-images",
        type=int,
        default=defaults.max_images,
        metavar="N",
        help=f"most images in one request (default: {defaults.max_images}); more: 413",
    )
    serve.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, …")
    serve.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="probability threshold (default: the registered model's, else 0.5)",
    )
    serve.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the SQLite "
        "store in the output_dir of --bundle or glas, as predict; it must exist)",
    )
    serve.set_defaults(handler=_serve)
