"""The `safesteer` command line.

    safesteer generate --model qwen2.5-coder-0.5b-instruct --prompts advbench --limit 32 --out responses.jsonl
    safesteer direction --out runs/demo            # stage 1: refusal direction -> teacher
    safesteer tokens --out runs/demo               # stage 2: safety tokens S
    safesteer align --out runs/demo                # all stages, training, evaluation summary
    safesteer eval --model A --model B ...         # safety, over-refusal, capability
    safesteer compare --out runs/cmp --run cpu=runs/demo --teacher runs/demo   # the trade-off, point by point

Each stage module contributes its own sub-command through `add_cli(subparsers)`; this file builds the
one parser from them, holds the shared options and turns user-fixable errors into one line instead of
a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import sys
import types
import typing
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import SafesteerError

# Modules that add sub-commands, in the order they appear in --help.
STAGE_MODULES = ("teacher.direction", "teacher.tokens", "teacher.gate", "chat", "pipeline", "eval.suites", "eval.compare",
                 "report.build", "memory")


def add_command(subparsers, name: str, func: Callable[[argparse.Namespace], int], *, model: bool = False,
                out: str | None = None, prompts: Mapping[str, str] | None = None,
                presets: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """A sub-command on `subparsers` that runs `func(args)`: with the model options (`model`), a required --out
    (its help `out`), prompt-set options (`prompts`, see `add_prompt_args`) and --preset auto|NAME...
    (`presets`, resolved by `resolve_preset`) when asked for.
    The first line of `func`'s docstring is the command's one-line help, the rest its description. Each
    module's `add_cli` calls this, then adds its config dataclass with `add_config_args`."""
    summary, _, details = inspect.cleandoc(func.__doc__ or name).partition("\n\n")
    p = subparsers.add_parser(name, help=summary, description=" ".join(details.split()) or summary)
    if model:
        add_model_args(p)
    if out:
        p.add_argument("--out", required=True, help=out)
    if prompts:
        add_prompt_args(p, prompts)
    if presets is not None:
        p.add_argument("--preset", choices=("auto", *presets), default="auto",
                       help="auto: paper on a CUDA device, cpu-gated otherwise (its stages: cpu's); the options below "
                            "override the preset's "
                            "values (shown in their help where the presets differ)")
    p.set_defaults(func=func)
    return p


def resolve_preset(choice: str, stage: bool = False) -> str:
    """The preset name for --preset CHOICE: `auto` is paper with CUDA and cpu-gated without. `stage`: the
    direction / token preset that goes with it (cpu-gated trains on cpu's stages), so every stage agrees."""
    from .train.config import default_preset, stage_preset

    name = default_preset() if choice == "auto" else choice
    return stage_preset(name) if stage else name


def add_model_args(p: argparse.ArgumentParser, default: str | None = None, *, repeatable: bool = False) -> None:
    """--model, --dtype, --device, --trust-remote-code. `repeatable`: --model may be given several times (a list)."""
    from .io.models import BUILTIN_MODELS, DEFAULT_MODEL

    kinds = f"hub id, local HF directory, .gguf file or built-in alias ({', '.join(BUILTIN_MODELS)})"
    if repeatable:
        p.add_argument("--model", action="append", default=None,
                       help=f"model to evaluate (repeatable; the first is the reference): {kinds}; default: {DEFAULT_MODEL}")
    else:
        p.add_argument("--model", default=default or DEFAULT_MODEL, help=f"{kinds}; default: %(default)s")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from the model repo (off unless you ask for it)")


def load_model_from_args(args: argparse.Namespace, name: str | None = None):
    from .io.models import load_model

    return load_model(name or args.model, dtype=args.dtype, device=args.device,
                      trust_remote_code=args.trust_remote_code)


def add_prompt_args(p: argparse.ArgumentParser, prompts: Mapping[str, str], default: str | None = None) -> None:
    """Options naming prompt sets (`prompts`: flag -> what the set is for), each a built-in set, a file or
    hf:NAME, and --field for the column holding the prompt text in files."""
    from .io.prompts import BUILTIN_SETS

    for flag, what in prompts.items():
        p.add_argument(flag, default=default, help=f"{what}: built-in set ({', '.join(BUILTIN_SETS)}), a "
                                                   f".jsonl/.json/.csv/.txt file or hf:org/name[:split]")
    p.add_argument("--field", default=None, help="field/column holding the prompt text in a file or dataset")


# ----------------------------------------------------------------------------- config dataclasses as options


FIELD_DEFAULT = object()  # add_config_args(default=FIELD_DEFAULT): an absent option leaves the field's default
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _boolean(text: str) -> bool:
    if text.strip().lower() in _TRUE + _FALSE:
        return text.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {text!r}")


def value_parser(annotation: Any) -> Callable[[str], Any]:
    """How one command-line value of a config field with this type annotation is read.

    int, float, str and bool (true/false, yes/no, on/off, 1/0) as such; tuple[int, ...] as `utils.int_list`
    ('6-14', '8,10,12'); other tuples as comma-separated items; `X | None` also takes 'none'.
    """
    from .utils import int_list

    parts = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kind = parts[0] if optional and len(parts) == 1 else (str if optional else annotation)
    if typing.get_origin(kind) is tuple:
        item = (typing.get_args(kind) or (str,))[0]
        parse = int_list if item is int else lambda text: tuple(item(t.strip()) for t in text.split(",") if t.strip())
    elif kind is bool:
        parse = _boolean
    elif kind in (int, float, str):
        parse = kind
    else:
        parse = str
    if not optional:
        return parse

    def optional_value(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else parse(text)

    optional_value.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in its errors
    return optional_value


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def config_option(name: str, prefix: str = "") -> str:
    """The option `add_config_args` gives the config field `name`: --PREFIXname-with-dashes."""
    return "--" + prefix + name.replace("_", "-")


def stage_options(stage: str, *names: str) -> str:
    """For a stage's error messages, which cannot tell the command that ran: the options that set these
    fields of the stage's config in `safesteer STAGE` and in `safesteer align` (prefixed STAGE., see
    pipeline.add_cli), e.g. "`safesteer tokens` --horizon; `safesteer align` --tokens.horizon"."""
    return (f"`safesteer {stage}` {', '.join(config_option(n) for n in names)}; "
            f"`safesteer align` {', '.join(config_option(n, stage + '.') for n in names)}")


def add_config_args(p, config_cls: type, names: Iterable[str] | None = None, *, default: Any = None,
                    prefix: str = "", flags: Mapping[str, str | Sequence[str]] | None = None,
                    types: Mapping[str, Callable[[str], Any]] | None = None,
                    choices: Mapping[str, Sequence[Any]] | None = None, helps: Mapping[str, str] | None = None,
                    presets: Mapping[str, Mapping[str, Any]] | None = None,
                    metavar: str | Mapping[str, str] | None = None,
                    show_default: bool = True) -> None:
    """One option per field of the config dataclass `config_cls` (all fields, or `names` in that order) on `p`
    (a parser or argument group): the one way every command turns its settings into flags.

    A field `n_tokens` becomes --PREFIXn-tokens (dest PREFIXn_tokens; `flags[name]` gives other option
    strings), parsed by its type annotation (`value_parser`, or `types[name]`), with the help from the
    field's metadata (`utils.help_field`; `helps[name]` for dataclasses without it) plus its default, or
    each preset's value where the `presets` (name -> field values over the defaults) differ. Booleans
    become --x/--no-x; tuples may be given comma-separated and repeated. `default` is what an absent
    option leaves: None lets the caller tell "not given" from a value (a preset fills it in),
    argparse.SUPPRESS leaves the attribute out, FIELD_DEFAULT the field's default. `config_values` reads
    the values back.
    """
    hints = typing.get_type_hints(config_cls)
    by_name = {f.name: f for f in dataclasses.fields(config_cls)}
    for f in (by_name[name] for name in names) if names is not None else by_name.values():
        value = _field_default(f)
        option = (flags or {}).get(f.name) or config_option(f.name, prefix)
        options = (option,) if isinstance(option, str) else tuple(option)
        text = ((helps or {}).get(f.name) or f.metadata.get("help", "")).replace("%", "%%")
        by_preset = {name: values.get(f.name, value) for name, values in (presets or {}).items()}
        if len(set(map(_shown, by_preset.values()))) > 1:  # the presets disagree: each one's value
            notes = [f"{name} preset: {_shown(v)}" for name, v in by_preset.items()]
        else:
            stated = isinstance(value, bool) or value is None or "default" in text  # said already, or no value
            notes = [] if not show_default or stated else [f"default: {_shown(value)}"]
        text += f" ({'; '.join(notes)})" if notes else ""
        kw: dict[str, Any] = {"dest": prefix + f.name, "help": text,
                              "default": value if default is FIELD_DEFAULT else default}
        if hints[f.name] is bool:
            p.add_argument(*options, action=argparse.BooleanOptionalAction, **kw)
            continue
        parse = (types or {}).get(f.name) or value_parser(hints[f.name])
        if typing.get_origin(hints[f.name]) is tuple or tuple in map(typing.get_origin, typing.get_args(hints[f.name])):
            kw["action"] = "extend"  # --suites safety,drift and --harmful a --harmful b alike
            kw["default"] = None if kw["default"] is not argparse.SUPPRESS else argparse.SUPPRESS
        shown = metavar.get(f.name) if isinstance(metavar, Mapping) else metavar
        shown = shown or (f.name.upper() if prefix else None)  # not DIRECTION.N_TRAIN
        p.add_argument(*options, type=parse, choices=(choices or {}).get(f.name), metavar=shown, **kw)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_values(args: argparse.Namespace, config_cls: type, prefix: str = "") -> dict[str, Any]:
    """The fields of `config_cls` that `add_config_args(..., prefix=prefix)` left on `args` (lists as tuples)."""
    out = {}
    for f in dataclasses.fields(config_cls):
        if hasattr(args, prefix + f.name):
            value = getattr(args, prefix + f.name)
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def parse_assignments(items: Sequence[str] | None, config_cls: type, flag: str) -> dict[str, Any]:
    """KEY=VALUE strings (align's --direction-config / --tokens-config) -> typed settings of `config_cls`,
    read as the matching option would be (`value_parser`)."""
    hints = typing.get_type_hints(config_cls)
    known = [f.name for f in dataclasses.fields(config_cls)]
    out = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise SafesteerError(f"{flag} {item!r}: use KEY=VALUE with KEY one of {', '.join(known)}")
        try:
            out[key] = value_parser(hints[key])(raw.strip())
        except ValueError as exc:
            raise SafesteerError(f"{flag} {item!r}: {exc}") from None
    return out


# GenerationConfig carries no help in its fields; its options are described here.
GENERATE_HELP = {"max_new_tokens": "new tokens per answer", "do_sample": "sample instead of greedy decoding",
                 "temperature": "sampling temperature", "top_p": "nucleus sampling threshold",
                 "batch_size": "prompts per generation batch", "seed": "seed of sampling",
                 "num_samples": "completions per prompt (with --sample)",
                 "dtype": "dtype of the weights while generating: auto, float32, bfloat16 (default: the model's own)"}


def _cmd_generate(args: argparse.Namespace) -> int:
    """answer a prompt set with a model; resumable JSONL output

    Batched generation (left padding). Rerunning with the same --out skips prompts already answered by the
    same model with the same settings; an --out holding answers of another model or other settings is refused.
    """
    from .core.generation import GenerationConfig, generate_responses
    from .eval.judges import KeywordRefusalJudge
    from .eval.stats import Rate
    from .eval.suites import ModelEntry, model_fingerprint
    from .io.prompts import load_prompts

    prompts = load_prompts(args.prompts, field=args.field, limit=args.limit)
    config = GenerationConfig(**config_values(args, GenerationConfig))
    model, tokenizer = load_model_from_args(args)
    # The weights, not the name: the file's answers are reused only for the very model that wrote them.
    fingerprint = model_fingerprint(ModelEntry(args.model, model, tokenizer))
    rows, stats = generate_responses(model, tokenizer, prompts, config, out_path=args.out, extra={"model": args.model},
                                     fingerprint=fingerprint)
    verdicts = KeywordRefusalJudge().judge([r["prompt"] for r in rows], [r["response"] for r in rows])
    refused = Rate(sum(bool(v.refused) for v in verdicts), len(verdicts))
    speed = stats.new_tokens / stats.seconds if stats.seconds > 0 and stats.new_tokens else float("nan")
    print(f"wrote {len(rows)} responses to {args.out} ({stats.generated} new, {stats.new_tokens} tokens, "
          f"{speed:.1f} tok/s at batch {config.batch_size})")
    print(f"refusal rate (keyword judge): {refused}")
    return 0


def _add_generate(sub) -> None:
    from .core.generation import GenerationConfig

    p = add_command(sub, "generate", _cmd_generate, model=True,
                    out="responses JSONL (appended to; resumable by the same model with the same settings)")
    add_prompt_args(p, {"--prompts": "the prompts"}, default="advbench")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    add_config_args(p, GenerationConfig, default=FIELD_DEFAULT, flags={"do_sample": "--sample", "dtype": "--generation-dtype"},
                    helps=GENERATE_HELP)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="safesteer", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"safesteer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    for name in STAGE_MODULES:
        try:
            module = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{name}":
                continue  # stage not part of this build
            raise
        if hasattr(module, "add_cli"):
            module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    prog = "safesteer"  # names the command in one-line errors once it is known
    try:  # Ctrl-C while the parser imports torch is an interrupt like any other: one line, no traceback
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        prog = f"safesteer {args.command}"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Launched by accelerate/torchrun: join the process group before any model is placed, so
            # each process uses its own device.
            from .parallel import init

            init()
        return int(args.func(args) or 0)
    except SafesteerError as exc:
        _end_progress_bars()
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        _end_progress_bars()
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk anywhere else than the checkpoint and the model (they say so themselves)
        from .utils import is_disk_full

        if not is_disk_full(exc):
            raise
        _end_progress_bars()
        print(f"{prog}: error: no space left on the disk" + (f" while writing {exc.filename}" if exc.filename else "")
              + "; free some space and rerun the same command to resume, or point --out at a folder on another disk",
              file=sys.stderr)
        return 2


def _end_progress_bars() -> None:
    """Close the progress bars a failed command left open, so that its one-line message starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or ()):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the message
            pass


if __name__ == "__main__":
    sys.exit(main())
