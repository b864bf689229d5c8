"""One training step of safesteer against the reference design, on the same model and the same batch.

    python benchmarks/bench_step.py                                   # the built-in default model
    python benchmarks/bench_step.py --model smollm2-135m-instruct --prompts 4 --rollouts 8 --json out.json

safesteer  LoRA student; the teacher is the same weights with the adapter off plus the steering hook;
           the loss reads the S slice of the log-probabilities chunk by chunk (Trainer.update: the
           code `safesteer align` runs).
safesteer, from_steering
           the same with lora_layers=from_steering: the adapter only on the steering layer and above,
           so teacher and student share one no-grad pass through the layers below it.
reference  the released code's design: full fine-tune of the student, a second fp32 copy of the model
           as the teacher, and a full-vocabulary log_softmax materialised for both models before the
           S columns are gathered.

Each design runs in its own subprocess, so its peak RSS (getrusage ru_maxrss) is its own. The rollouts
are sampled once, in another subprocess, and every design scores exactly that batch; sampling costs the
same in all designs, so it is timed once and reported on its own. On step 1 every student still equals
the base model, so all losses must agree: a check that the designs compute the same thing.
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


def worker_safesteer(args, lora_layers: str = "all") -> dict:
    from safesteer.train.config import TrainConfig
    from safesteer.train.trainer import Trainer

    model, tokenizer, spec, ids = _setup(args)
    batch = _load_batch(args.batch_file)
    config = TrainConfig(steps=args.steps, learning_rate=1e-4, checkpoint_every=10**6, lora_layers=lora_layers)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, tokenizer, spec, ids, ["unused"], config, out, progress=False)
        setup_rss, setup_peak = _current_rss_gib(), _peak_rss_gib()
        rows = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            row = trainer.update(batch)
            rows.append({"seconds": time.perf_counter() - t0, "loss": row["loss"]})
    return {"steps": rows, "setup_rss_gib": setup_rss, "setup_peak_rss_gib": setup_peak, "peak_rss_gib": _peak_rss_gib()}


def worker_reference(args) -> dict:
    import copy

    import torch

    model, tokenizer, spec, ids = _setup(args)
    batch = _load_batch(args.batch_file)
    student = model.requires_grad_(True)
    teacher = copy.deepcopy(model).requires_grad_(False).eval()  # the second full fp32 copy
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0)
    s_ids = torch.tensor(ids)
    inputs = batch.model_inputs()
    mask = batch.completion_mask.float()
    keep = mask.shape[1]  # logits only for the completion positions, as the released code asks for
    setup_rss, setup_peak = _current_rss_gib(), _peak_rss_gib()
    rows = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
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
        rows.append({"seconds": time.perf_counter() - t0, "loss": float(loss.detach())})
        del lt, ls, per_token, loss
    return {"steps": rows, "setup_rss_gib": setup_rss, "setup_peak_rss_gib": setup_peak, "peak_rss_gib": _peak_rss_gib()}


def worker_safesteer_from_steering(args) -> dict:
    return worker_safesteer(args, lora_layers="from_steering")


WORKERS = {"rollouts": worker_rollouts, "safesteer": worker_safesteer,
           "safesteer_from_steering": worker_safesteer_from_steering, "reference": worker_reference}


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
    """The last step's time: the first one also pays for one-off allocations."""
    return result["steps"][-1]["seconds"]


def main(argv=None) -> int:
    from safesteer.io.models import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prompts", type=int, default=2, help="prompts in the batch")
    p.add_argument("--rollouts", type=int, default=4, help="rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=2, help="steps per design; the last one is reported")
    p.add_argument("--run", default=None, help="take the direction and S from this run directory")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", choices=tuple(WORKERS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        args.batch_file = str(Path(tmp) / "batch.pt")
        rollouts = _spawn(args, "rollouts")
        ours = _spawn(args, "safesteer")
        shared = _spawn(args, "safesteer_from_steering")
        ref = _spawn(args, "reference")

    t_ours, t_shared, t_ref = _step_seconds(ours), _step_seconds(shared), _step_seconds(ref)
    result = {
        "model": args.model, "batch": rollouts,
        "safesteer": ours, "safesteer_from_steering": shared, "reference": ref,
        "speedup": t_ref / t_ours,
        "memory_ratio": ours["peak_rss_gib"] / ref["peak_rss_gib"],
        "speedup_from_steering": t_ref / t_shared,
        "memory_ratio_from_steering": shared["peak_rss_gib"] / ref["peak_rss_gib"],
        "from_steering_vs_safesteer": t_ours / t_shared,
        "step1_loss_safesteer": ours["steps"][0]["loss"], "step1_loss_reference": ref["steps"][0]["loss"],
        "step1_loss_safesteer_from_steering": shared["steps"][0]["loss"],
    }
    print(f"model {args.model}; batch {rollouts['sequences']} sequences, prompt {rollouts['prompt_len']} + "
          f"completion {rollouts['completion_len']} tokens ({rollouts['valid_tokens']} valid); "
          f"sampling them took {rollouts['seconds']:.1f} s (same for all designs, not included below)")
    print(f"{'':<25}{'step (s)':>10}{'peak RSS (GiB)':>16}{'RSS after setup':>17}{'peak in setup':>15}"
          f"{'step-1 loss':>14}")
    for name, r in (("safesteer", ours), ("safesteer, from_steering", shared), ("reference", ref)):
        print(f"{name:<25}{_step_seconds(r):>10.2f}{r['peak_rss_gib']:>16.2f}{r['setup_rss_gib']:>17.2f}"
              f"{r['setup_peak_rss_gib']:>15.2f}{r['steps'][0]['loss']:>14.4e}")
    print(f"safesteer vs reference: {result['speedup']:.2f}x faster per step, "
          f"{result['memory_ratio']:.2f}x the peak memory")
    print(f"safesteer, from_steering vs reference: {result['speedup_from_steering']:.2f}x faster per step, "
          f"{result['memory_ratio_from_steering']:.2f}x the peak memory "
          f"({result['from_steering_vs_safesteer']:.2f}x faster than safesteer with the adapter on every layer)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
