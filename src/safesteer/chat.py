"""`safesteer chat`: talk to the base model and the steered teacher side by side.

    safesteer chat --steer runs/demo                       # interactive; "exit" or Ctrl-D ends it
    safesteer chat --steer runs/demo --prompt "How do I clean a showerhead?"

Each message is answered independently (one user turn, no history), greedily, by the base model and
by the same model with the refusal direction added: a quick look at what the teacher does, including
its over-refusal of harmless requests.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any, Callable

BASE_LABEL = "base model"
STEERED_LABEL = "steered teacher"


def format_exchange(message: str, base: str, steered: str, steer_note: str = "", width: int = 100) -> str:
    """The two answers as labelled blocks; answers keep their own line breaks, long lines are wrapped."""

    def block(label: str, text: str) -> str:
        rule = f"── {label} " + "─" * max(3, width - len(label) - 4)
        body = "\n".join(textwrap.fill(line, width, replace_whitespace=False) if line else ""
                         for line in (text.strip("\n") or "(empty answer)").split("\n"))
        return f"{rule}\n{body}"

    steered_label = f"{STEERED_LABEL} ({steer_note})" if steer_note else STEERED_LABEL
    return "\n".join([f">>> {message}", block(BASE_LABEL, base), block(steered_label, steered), ""])


def answer_both(model: Any, tokenizer: Any, message: str, teacher_ctx: Callable, max_new_tokens: int) -> tuple[str, str]:
    from .core.anatomy import format_prompts
    from .core.generation import GenerationConfig, generate_batch

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, batch_size=1)
    formatted = format_prompts(tokenizer, [message])
    base = generate_batch(model, tokenizer, formatted, config)["responses"][0]
    steered = generate_batch(model, tokenizer, formatted, config, context=teacher_ctx)["responses"][0]
    return base, steered


def _cmd_chat(args: argparse.Namespace) -> int:
    """compare the base model and the steered teacher on your own messages

    Every message is answered twice: by the base model and by the steered teacher (the base model with the
    refusal direction of --steer added).
    """
    from .cli import load_model_from_args
    from .core.steering import add_direction
    from .teacher.direction import load_direction

    spec = load_direction(Path(args.steer))  # fail before loading the model
    layer = spec.layer
    coeff = spec.coeff if args.coeff is None else args.coeff
    model, tokenizer = load_model_from_args(args)
    spec.check(model)
    teacher_ctx = lambda: add_direction(model, spec.direction, layer, coeff)  # noqa: E731
    note = f"layer {layer}, coeff {coeff:g}"

    def respond(message: str) -> None:
        base, steered = answer_both(model, tokenizer, message, teacher_ctx, args.max_new_tokens)
        print(format_exchange(message, base, steered, note), flush=True)

    if args.prompt is not None:
        respond(args.prompt)
        return 0
    print(f"chatting with {args.model}: base vs steered ({note}); 'exit' or Ctrl-D to quit")
    while True:
        try:
            message = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if message.lower() in ("exit", "quit"):
            return 0
        if message:
            respond(message)


def add_cli(subparsers) -> None:
    from .cli import add_command

    p = add_command(subparsers, "chat", _cmd_chat, model=True)
    p.add_argument("--steer", required=True, help="directory with direction.safetensors/.json (a run directory)")
    p.add_argument("--prompt", default=None, help="answer this one message and exit (default: interactive)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--coeff", type=float, default=None, help="steering coefficient (default: the one in direction.json)")
