"""``masksup-med registry …``: the MLflow model registry from the terminal."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import mlflow

from masksup_med.tracking.registry import register_checkpoint

__all__ = ["add_registry_commands"]


def _tracking_uri(args: argparse.Namespace) -> str:
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        raise SystemExit(
            "error: no tracking store given: pass --tracking-uri (e.g. sqlite:///outputs/glas/mlflow.db or "
            "http://127.0.0.1:5000) or set MLFLOW_TRACKING_URI."
        )
    return uri


def _client(args: argparse.Namespace) -> mlflow.MlflowClient:
    uri = _tracking_uri(args)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _list(args: argparse.Namespace) -> int:
    models = _client(args).search_registered_models()
    if not models:
        print("no registered models")
        return 0
    print(f"{'NAME':<32} {'LATEST':>6}  ALIASES")
    for model in sorted(models, key=lambda m: m.name):
        latest = max((int(v.version) for v in model.latest_versions), default=0)
        aliases = ", ".join(f"{alias}=v{version}" for alias, version in sorted(model.aliases.items()))
        print(f"{model.name:<32} {latest:>6}  {aliases or '-'}")
    return 0


def _show(args: argparse.Namespace) -> int:
    client = _client(args)
    model = client.get_registered_model(args.name)
    print(f"model {model.name}")
    for listed in sorted(client.search_model_versions(f"name='{args.name}'"), key=lambda v: int(v.version)):
        version = client.get_model_version(args.name, listed.version)  # search results omit aliases
        aliases = ", ".join(sorted(version.aliases)) or "-"
        print(f"  version {version.version}  aliases: {aliases}  run: {version.run_id}")
        for key in sorted(version.tags):
            print(f"    {key}: {version.tags[key]}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    _client(args).set_registered_model_alias(args.name, args.alias, str(args.version))
    print(f"{args.name} version {args.version} now has alias {args.alias!r}")
    return 0


def _bundle_name(config: Path) -> str | None:
    """The bundle a ``<bundle>/configs/train.json`` belongs to (None for a config elsewhere)."""
    parent = config.resolve().parent
    return parent.parent.name if parent.name == "configs" else None


def _register(args: argparse.Namespace) -> int:
    from monai.bundle import ConfigParser

    from masksup_med.tracking.model_format import build_network, network_definition

    parser = ConfigParser()
    parser.read_config(args.config)
    definition = network_definition(args.config)
    in_channels = int(build_network(definition, str(args.config)).in_channels)
    input_shape = (in_channels, *(int(s) for s in parser.get_parsed_content("image_size")))
    threshold = float(parser.get_parsed_content("threshold")) if "threshold" in parser else 0.5
    version = register_checkpoint(
        args.checkpoint,
        definition,
        args.name,
        _tracking_uri(args),
        input_shape,
        run_id=args.run_id,
        tags={"registered_by": "masksup-med registry register"},
        alias=args.alias,
        bundle=args.bundle or _bundle_name(args.config),
        threshold=threshold,
        config_file=args.config,
    )
    print(
        f"registered {args.checkpoint} as {args.name} version {version.version}"
        + (f" (alias {args.alias})" if args.alias else "")
    )
    return 0


def add_registry_commands(commands: argparse._SubParsersAction) -> None:
    """Add the ``registry`` command group (list, show, promote, register)."""
    registry = commands.add_parser("registry", help="browse and manage the MLflow model registry")
    registry.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    actions = registry.add_subparsers(dest="action", metavar="ACTION", required=True)

    actions.add_parser("list", help="registered models, latest version and aliases").set_defaults(handler=_list)

    show = actions.add_parser("show", help="every version of a model with its aliases and tags")
    show.add_argument("name")
    show.set_defaults(handler=_show)

    promote = actions.add_parser("promote", help="point an alias (e.g. champion) at a version")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.add_argument("--alias", default="champion", help="alias to set (default: champion)")
    promote.set_defaults(handler=_promote)

    register = actions.add_parser("register", help="register a checkpoint by hand (e.g. after a failed upload)")
    register.add_argument("checkpoint", type=Path)
    register.add_argument(
        "--config", required=True, type=Path, help="the bundle's train.json (its network_def, image_size and threshold)"
    )
    register.add_argument("--name", required=True, help="registered model name, e.g. masksup-glas")
    register.add_argument("--run-id", help="attach the model to this training run")
    register.add_argument("--alias", default="candidate", help="alias for the new version (default: candidate)")
    register.add_argument(
        "--bundle",
        help="the bundle the model was trained with (version tag 'bundle'; default: "
        "BUNDLE of a BUNDLE/configs/train.json --config)",
    )
    register.set_defaults(handler=_register)
