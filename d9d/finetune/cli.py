"""Command line: ``python -m d9d.finetune --config run.json`` (under ``torchrun`` for several processes)."""

import argparse
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from d9d.finetune.config import FinetuneConfig
from d9d.finetune.preflight import check_inputs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m d9d.finetune",
        description="Fine-tune a Hugging Face model with a d9d PEFT stack under FSDP2 (launch with torchrun for "
        "several processes). Without --config the default demo run is used.",
    )
    p.add_argument("--config", type=Path, help="JSON file with a FinetuneConfig (unknown keys are rejected)")
    p.add_argument("--work-dir", type=Path, help="override work_dir")
    p.add_argument("--steps", type=int, help="override steps")
    p.add_argument("--resume", action="store_true", help="override checkpoint.resume to true")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p


def load_config(path: Path | None, overrides: dict) -> FinetuneConfig:
    """The config from ``path`` (or the defaults) with top-level ``overrides`` applied, validated once.

    Raises:
        ValueError: If the file is missing or not JSON, or an override goes through a field that is not an object
            (the message names it).
        pydantic.ValidationError: If a key is unknown or a value is invalid (the error names it).
    """
    raw: dict = {}
    if path is not None:
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"config file {str(path)!r} must hold a JSON object, got {type(raw).__name__}")
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                field = ".".join(parents[: depth + 1])
                raise ValueError(f"cannot set {dotted} (a command-line override): config field {field!r} is "
                                 f"{json.dumps(node)}, not an object")
        node[leaf] = value
    return FinetuneConfig.model_validate(raw)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}): {err.error_count()} error(s)"]
    for e in err.errors():
        where = ".".join(str(part) for part in e["loc"]) or "<root>"
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        lines.append(f"  {where}: {e['msg']}{got}")
    return "\n".join(lines)


def _reports_here() -> bool:
    # Under torchrun every rank validates the same config and reaches the same verdict: one rank per node says it.
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _validated_config(args: argparse.Namespace) -> FinetuneConfig | None:
    """The config with the command line's overrides, its input paths checked; None after reporting an error."""
    overrides: dict = {}
    if args.work_dir is not None:
        overrides["work_dir"] = str(args.work_dir)
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.resume:
        overrides["checkpoint.resume"] = True
    source = str(args.config) if args.config else "defaults"
    try:
        cfg = load_config(args.config, overrides)
        if not args.print_config:
            check_inputs(cfg)
    except ValidationError as e:
        message = _format_validation_error(e, source)
    except ValueError as e:
        message = f"error: {e}"
    else:
        return cfg
    if _reports_here():
        print(message, file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    """Parses arguments, validates the config and runs; returns the process exit status.

    Exit status 2: the config or an input path is invalid (found before transformers is imported or any process
    group is set up); 1: the run failed. Each failure is printed once (see ``d9d.finetune.session``).
    """
    args = _parser().parse_args(argv)
    cfg = _validated_config(args)
    if cfg is None:
        return 2
    if args.print_config:
        print(cfg.model_copy(update={"peft": cfg.peft_config()}).model_dump_json(indent=2))
        return 0
    from d9d.finetune.run import run_finetune
    from d9d.finetune.session import RunFailedError

    try:
        summary = run_finetune(cfg)
    except RunFailedError as e:
        if e.print_here:
            print(f"error: {e.message}", file=sys.stderr)
        return 1
    failed = [r for r in summary.reproduction if not r["ok"]]
    if failed:
        print(f"error: the exports do not reproduce the adapted model: {[r['what'] for r in failed]}", file=sys.stderr)
        return 1
    return 0
