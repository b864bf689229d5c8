"""One whole training step (rollouts + update) of safesteer, before and after issue #11, and of the reference design.

    python benchmarks/bench_step.py                                   # the built-in default model, ~4 min idle
    python benchmarks/bench_step.py --model smollm2-135m-instruct --prompts 4 --rollouts 8 --json out.json

new        the code `safesteer align` runs with the cpu preset: LoRA student on the steering layer and above
           (teacher = adapter off + steering hook, one shared no-grad pass below that layer), rollouts from a
           persistent bf16 copy of the student (generation_dtype auto, on a CPU with avx512_bf16/AMX) with the
           per-row inverse-CDF sampler, bf16 autocast of the decoder layers with float32 output heads (bf16 auto,
           same CPUs), and a loss that skips activation checkpointing for a lone chunk and computes S's
           log-probabilities, the rest bucket and their gradient from one pass of exponentials
           (core.loss._SliceLogProbs) (Trainer.train_step).
old        the same design as it was before issue #11: float32 training, rollouts from the float32 student with
           the float64 Gumbel forward-hook sampler (reproduced in bench_generate.py), the lone loss chunk
           checkpointed, the loss's plain autograd formulas (core.loss.FUSED_SLICE off), linear layers without
           core.prepack.
new, all layers (--all-layers)
           new with the adapter on every layer (no shared lower pass).
reference  the released code's design: full fine-tune of the student, a second fp32 copy of the model
           as the teacher, a full-vocabulary log_softmax materialised for both models before the S
           columns are gathered; rollouts sampled from the float32 student with transformers' own sampler
           (linear layers without core.prepack).

Each design runs in its own subprocess, so its peak RSS (getrusage ru_maxrss) is its own and includes
sampling (and the bf16 copy). Every design first scores one shared batch (sampled once, in another
subprocess) with an update: on that step every student still equals the base model, so the float32
designs' step-1 losses (old, reference) must agree, a check that they compute the same thing. new trains
under bf16 autocast where the CPU has fast bf16, so its loss differs by the layers' rounding: 1.5% on the
default run's own direction, S and rollouts, far more with the seeded stand-ins (random S tokens, a loss of
~1e-6, so rounding is most of it). Then each runs --steps whole steps (its own rollouts for the same prompts,
then the update), timed; the last is reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_SAFETY_TOKENS = 50


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def _setup(args):
    """Model, tokenizer, a steering spec and S: the run's own if --run is given, else seeded stand-ins."""
    import torch

    from safesteer.core.anatomy import decoder_layers
    from safesteer.core.steering import add_direction
    from safesteer.io.models import load_model

    model, tokenizer = load_model(args.model)

    class Spec:
        def __init__(self, direction, layer, coeff=1.0):
            self.direction, self.layer, self.coeff = direction, layer, coeff

        def teacher(self, m):
            return add_direction(m, self.direction, self.layer, self.coeff)

    if args.run:
        from safesteer.teacher.direction import load_direction
        from safesteer.teacher.tokens import load_safety_tokens

        return model, tokenizer, load_direction(args.run), load_safety_tokens(args.run)
    # Cost does not depend on which direction or tokens: seeded stand-ins of the right shape.
    g = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    direction = torch.randn(d, generator=g) * 8.0 / d**0.5
    layer = int(0.6 * len(decoder_layers(model)))
    ids = torch.randperm(model.get_output_embeddings().weight.shape[0], generator=g)[:N_SAFETY_TOKENS].tolist()
    return model, tokenizer, Spec(direction, layer), ids


def _load_batch(path):
    import torch

    from safesteer.train.rollout import RolloutBatch

    data = torch.load(path, weights_only=True)
    return RolloutBatch(sequences=data["sequences"], attention_mask=data["attention_mask"],
                        completion_mask=data["completion_mask"], prompt_len=int(data["prompt_len"]),
                        prompt_index=data["prompt_index"], responses=[""] * len(data["prompt_index"]),
                        finished=[False] * len(data["prompt_index"]))


def worker_rollouts(args) -> dict:
    import torch

    from safesteer.io.prompts import stage_prompts
    from safesteer.train.rollout import sample_rollouts

    model, tokenizer, _, _ = _setup(args)
    prompts = [p.text for p in stage_prompts(None, "train", "harmful")[: args.prompts]]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    batch = sample_rollouts(model, tokenizer, prompts, args.rollouts, args.max_new_tokens)
    seconds = time.perf_counter() - t0
    torch.save({"sequences": batch.sequences, "attention_mask": batch.attention_mask,
                "completion_mask": batch.completion_mask, "prompt_len": batch.prompt_len,
                "prompt_index": batch.prompt_index}, args.batch_file)
    return {"seconds": seconds, "sequences": len(batch.prompt_index), "prompt_len": batch.prompt_len,
            "completion_len": batch.completion_mask.shape[1], "valid_tokens": int(batch.completion_mask.sum())}


def _prompts(args) -> list[str]:
    from safesteer.io.prompts import stage_prompts

    return [p.text for p in stage_prompts(None, "train", "harmful")[: args.prompts]]


def _without_prepacking() -> None:
    """Linear layers as before core.prepack (MKL's float32 sgemm, oneDNN's per-call weight reorder in bf16): what the
    old and reference designs ran with."""
    from safesteer.core import prepack

    prepack.prepack_available = lambda: False


def _trainer_worker(args, lora_layers: str, old: bool) -> dict:
    import safesteer.core.loss as loss_module
    import safesteer.train.trainer as trainer_module
    from safesteer.train.config import TrainConfig
    from safesteer.train.trainer import Trainer

    model, tokenizer, spec, ids = _setup(args)
    batch = _load_batch(args.batch_file)
    config = TrainConfig(steps=args.steps + 1, learning_rate=1e-4, checkpoint_every=10**6, lora_layers=lora_layers,
                         prompts_per_step=args.prompts, rollouts_per_prompt=args.rollouts,
                         max_new_tokens=args.max_new_tokens,
                         generation_dtype="float32" if old else "auto", bf16="off" if old else "auto")
    if old:  # the code path before issue #11
        _without_prepacking()
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_generate import _old_seeded_sampling

        loss_module.CHECKPOINT_SINGLE_CHUNK = True
        loss_module.FUSED_SLICE = False
        trainer_module.seeded_sampling = _old_seeded_sampling
    prompts = _prompts(args)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, tokenizer, spec, ids, prompts, config, out, progress=False)
        setup_rss, setup_peak = _current_rss_gib(), _peak_rss_gib()
        t0 = time.perf_counter()
        first = trainer.update(batch)  # the shared batch: step-1 loss check
        rows = [{"seconds": time.perf_counter() - t0, "loss": first["loss"], "update_only": True}]
        for step in range(args.steps):
            t0 = time.perf_counter()
            row = trainer.train_step(prompts, positions=range(len(prompts)))
            rows.append({"seconds": time.perf_counter() - t0, "loss": row["loss"], "rollout_s": row["time_rollout_s"],
                         "update_s": row["time_teacher_s"] + row["time_student_s"],
                         "rollout_dtype": row.get("rollout_dtype"), "tokens": row["completion_tokens"]})
    return {"steps": rows, "setup_rss_gib": setup_rss, "setup_peak_rss_gib": setup_peak, "peak_rss_gib": _peak_rss_gib()}


def worker_new(args) -> dict:
    return _trainer_worker(args, "from_steering", old=False)


def worker_old(args) -> dict:
    return _trainer_worker(args, "from_steering", old=True)


def worker_new_all_layers(args) -> dict:
    return _trainer_worker(args, "all", old=False)


def worker_reference(args) -> dict:
    import copy

    import torch

    from safesteer.train.rollout import sample_rollouts

    _without_prepacking()
    model, tokenizer, spec, ids = _setup(args)
    batch = _load_batch(args.batch_file)
    student = model.requires_grad_(True)
    teacher = copy.deepcopy(model).requires_grad_(False).eval()  # the second full fp32 copy
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0)
    s_ids = torch.tensor(ids)
    prompts = _prompts(args)
    setup_rss, setup_peak = _current_rss_gib(), _peak_rss_gib()

    def update(batch):
        inputs = batch.model_inputs()
        mask = batch.completion_mask.float()
        keep = mask.shape[1]  # logits only for the completion positions, as the released code asks for
        with torch.no_grad(), spec.teacher(teacher):
            lt = torch.log_softmax(teacher(**inputs, logits_to_keep=keep).logits.float(), dim=-1)[..., s_ids]
        student.train()
        ls = torch.log_softmax(student(**inputs, logits_to_keep=keep).logits.float(), dim=-1)[..., s_ids]
        per_token = (ls.exp() * (ls - lt)).sum(-1)
        loss = ((per_token * mask).sum(1) / mask.sum(1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        student.eval()
        return float(loss.detach())

    t0 = time.perf_counter()
    rows = [{"seconds": None, "loss": update(batch), "update_only": True}]
    rows[0]["seconds"] = time.perf_counter() - t0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        rollouts = sample_rollouts(student, tokenizer, prompts, args.rollouts, args.max_new_tokens)
        t1 = time.perf_counter()
        loss = update(rollouts)
        rows.append({"seconds": time.perf_counter() - t0, "loss": loss, "rollout_s": t1 - t0,
                     "update_s": time.perf_counter() - t1, "rollout_dtype": "float32",
                     "tokens": float(rollouts.completion_mask.sum(1).float().mean())})
    return {"steps": rows, "setup_rss_gib": setup_rss, "setup_peak_rss_gib": setup_peak, "peak_rss_gib": _peak_rss_gib()}


WORKERS = {"rollouts": worker_rollouts, "new": worker_new, "old": worker_old, "new_all_layers": worker_new_all_layers,
           "reference": worker_reference}


def _spawn(args, worker: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--model", args.model, "--prompts", str(args.prompts),
           "--rollouts", str(args.rollouts), "--max-new-tokens", str(args.max_new_tokens), "--steps", str(args.steps),
           "--batch-file", args.batch_file] + (["--run", args.run] if args.run else [])
    print(f"[bench] {worker} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the {worker} worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _step_seconds(result: dict) -> float:
    """The last whole step's time (rollouts + update): the first ones also pay for one-off allocations."""
    return result["steps"][-1]["seconds"]


def main(argv=None) -> int:
    import os

    from safesteer.io.models import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--rollouts", type=int, default=4, help="rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=2, help="whole steps per design after the shared one; the last is reported")
    p.add_argument("--all-layers", action="store_true", help="also run new with the adapter on every layer")
    p.add_argument("--run", default=None, help="take the direction and S from this run directory")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", choices=tuple(WORKERS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0

    load_start = os.getloadavg()[0]
    designs = ["new", "old", *(["new_all_layers"] if args.all_layers else []), "reference"]
    with tempfile.TemporaryDirectory() as tmp:
        args.batch_file = str(Path(tmp) / "batch.pt")
        rollouts = _spawn(args, "rollouts")
        results = {name: _spawn(args, name) for name in designs}

    t = {name: _step_seconds(r) for name, r in results.items()}
    ref = results["reference"]
    result = {"model": args.model, "batch": rollouts, **results,
              "speedup_new_vs_reference": t["reference"] / t["new"],
              "memory_new_vs_reference": results["new"]["peak_rss_gib"] / ref["peak_rss_gib"],
              "speedup_new_vs_old": t["old"] / t["new"],
              "memory_new_vs_old": results["new"]["peak_rss_gib"] / results["old"]["peak_rss_gib"],
              "step1_losses": {name: r["steps"][0]["loss"] for name, r in results.items()},
              "load_avg": [load_start, os.getloadavg()[0]]}
    print(f"model {args.model}; {rollouts['sequences']} rollouts per step (prompt {rollouts['prompt_len']} + up to "
          f"{rollouts['completion_len']} tokens). Whole step = rollouts + teacher + student + optimizer update.")
    print(f"{'':<18}{'step (s)':>10}{'rollouts (s)':>14}{'update (s)':>12}{'rollout dtype':>15}{'peak RSS (GiB)':>16}"
          f"{'step-1 loss':>14}")
    for name, r in results.items():
        last = r["steps"][-1]
        print(f"{name:<18}{last['seconds']:>10.2f}{last['rollout_s']:>14.2f}{last['update_s']:>12.2f}"
              f"{last['rollout_dtype']:>15}{r['peak_rss_gib']:>16.2f}{r['steps'][0]['loss']:>14.4e}")
    print(f"new vs reference: {result['speedup_new_vs_reference']:.2f}x faster per whole step, "
          f"{result['memory_new_vs_reference']:.2f}x the peak memory")
    print(f"new vs old: {result['speedup_new_vs_old']:.2f}x faster per whole step, "
          f"{result['memory_new_vs_old']:.2f}x the peak memory")
    print(f"load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end (above ~0.5 the machine was shared)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
