"""The `safesteer` command line.

    safesteer generate --model qwen2.5-coder-0.5b-instruct --prompts advbench --limit 32 --out responses.jsonl
    safesteer direction --out runs/demo            # stage 1: refusal direction -> teacher
    safesteer tokens --out runs/demo               # stage 2: safety tokens S
    safesteer align --out runs/demo                # all stages, training, evaluation summary
    safesteer eval --model A --model B ...         # safety, over-refusal, capability

Each stage module contributes its own sub-command through `add_cli(subparsers)`; this file builds the
one parser from them, holds the shared options and turns user-fixable errors into one line instead of
a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import SafesteerError

# Modules that add sub-commands, in the order they appear in --help.
STAGE_MODULES = ("teacher.direction", "teacher.tokens", "chat", "pipeline", "eval.suites", "report.build", "memory")


def add_model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    from .io.models import BUILTIN_MODELS, DEFAULT_MODEL

    p.add_argument("--model", default=default or DEFAULT_MODEL,
                   help=f"hub id, local HF directory, .gguf file or built-in alias ({', '.join(BUILTIN_MODELS)}); "
                        f"default: %(default)s")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from the model repo (off unless you ask for it)")


def load_model_from_args(args: argparse.Namespace, name: str | None = None):
    from .io.models import load_model

    return load_model(name or args.model, dtype=args.dtype, device=args.device,
                      trust_remote_code=args.trust_remote_code)


def add_prompt_args(p: argparse.ArgumentParser, default: str | None = "advbench", flag: str = "--prompts") -> None:
    from .io.prompts import BUILTIN_SETS

    p.add_argument(flag, default=default,
                   help=f"built-in set ({', '.join(BUILTIN_SETS)}), a .jsonl/.json/.csv/.txt file or hf:org/name[:split]")
    p.add_argument("--field", default=None, help="field/column holding the prompt text in a file or dataset")


def add_config_args(p, config_cls: type, names: Iterable[str] | None = None, *, default: Any = None,
                    types: Mapping[str, Callable[[str], Any]] | None = None,
                    choices: Mapping[str, Sequence[Any]] | None = None, metavar: str | None = None,
                    show_default: str | None = None) -> None:
    """One option per field of the config dataclass `config_cls` (all fields, or `names` in that order) on `p`
    (a parser or argument group): --field-name, dest field_name, help from the field's metadata.

    `default` is what an absent option leaves: None lets the caller tell "not given" from a value (a preset
    fills it in), argparse.SUPPRESS leaves the attribute out. Booleans become --x/--no-x. Other fields parse
    with `types[name]`, else the type of the field's default (float for a None default); `choices[name]` and
    `metavar` are passed on. `show_default`, e.g. " (default: {})", appends the field's default to the help of
    non-boolean fields whose help does not state its default already.
    """
    by_name = {f.name: f for f in dataclasses.fields(config_cls)}
    for f in (by_name[name] for name in names) if names is not None else by_name.values():
        flag = "--" + f.name.replace("_", "-")
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = f.metadata.get("help", "")
        if isinstance(value, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        if show_default and "default:" not in help_text:
            help_text += show_default.format(value)
        kind = (types or {}).get(f.name) or (float if value is None else type(value))
        p.add_argument(flag, dest=f.name, type=kind, default=default, choices=(choices or {}).get(f.name),
                       metavar=metavar, help=help_text)


def _cmd_generate(args: argparse.Namespace) -> int:
    from .core.generation import GenerationConfig, generate_responses
    from .eval.judges import KeywordRefusalJudge
    from .eval.stats import Rate
    from .io.prompts import load_prompts

    prompts = load_prompts(args.prompts, field=args.field, limit=args.limit)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                              top_p=args.top_p, batch_size=args.batch_size, seed=args.seed, num_samples=args.num_samples)
    model, tokenizer = load_model_from_args(args)
    rows, stats = generate_responses(model, tokenizer, prompts, config, out_path=args.out, extra={"model": args.model})
    verdicts = KeywordRefusalJudge().judge([r["prompt"] for r in rows], [r["response"] for r in rows])
    refused = Rate(sum(bool(v.refused) for v in verdicts), len(verdicts))
    speed = stats.new_tokens / stats.seconds if stats.seconds > 0 and stats.new_tokens else float("nan")
    print(f"wrote {len(rows)} responses to {args.out} ({stats.generated} new, {stats.new_tokens} tokens, "
          f"{speed:.1f} tok/s at batch {args.batch_size})")
    print(f"refusal rate (keyword judge): {refused}")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="answer a prompt set with a model; resumable JSONL output",
                       description="Batched generation (left padding). Rerunning with the same --out skips prompts "
                                   "already answered with the same settings.")
    add_model_args(p)
    add_prompt_args(p)
    p.add_argument("--out", required=True, help="responses JSONL (appended to; resumable)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt (with --sample)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Launched by accelerate/torchrun: join the process group before any model is placed, so
        # each process uses its own device.
        from .parallel import init

        init()
    try:
        return int(args.func(args) or 0)
    except SafesteerError as exc:
        print(f"safesteer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"safesteer {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
