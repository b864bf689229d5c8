"""Generation speed: evaluation-style greedy answers and training rollouts, old path vs new, side by side.

    python benchmarks/bench_generate.py                  # the default model, about 4 minutes on 2 idle cores
    python benchmarks/bench_generate.py --quick          # about a minute
    python benchmarks/bench_generate.py --compile        # also static KV cache + torch.compile (minutes more)
    python benchmarks/bench_generate.py --json out.json

What is measured, each in this one process and interleaved (old, new, old, new: a busy machine slows
both alike; the faster of the two repeats is reported):

* peak     a bf16 and an fp32 matrix product of the model's MLP shape ([tokens, d] x [d, 4.9d]); the FLOP
           limit on tokens/s is that peak over 2 x (weights used per token: every linear layer plus the
           output head), i.e. what generation would reach if it ran at matrix-product speed;
* eval     greedy answers to held-out AdvBench + edgy prompts (64 new tokens, what `safesteer eval` runs),
           through `core.generation.generate_responses`. old: float32 weights, transformers generate on fixed
           batches of 16 (the previous default, MKL's float32 products). new: generation dtype "auto" (bf16 where the CPU has
           avx512_bf16 / AMX), continuous batching (finished answers make room for waiting prompts), batch
           --eval-batch (default: the EvalConfig default). new_unshared_prefix: new, with every row prefilling
           its whole prompt instead of starting from the cache of the system turn all prompts share.
           new_unpacked: new, with oneDNN reordering every bf16 weight on each call instead of once
           (`core.prepack`). new_float32: new in float32 (what a CPU without fast bf16 runs), its
           layers prepacked for oneDNN. Full mode also sweeps engine x batch in bf16;
* rollouts the cpu preset's training rollouts: 2 prompts x 4 samples of 48 tokens, T=1, from a LoRA student
           (r=16 on layer 17 and above). old: the float32 student with the previous forward-hook sampler
           (float64 Gumbel noise over the whole vocabulary per row and token, reproduced below). new:
           `train.rollout.RolloutModel` (persistent bf16 copy, adapter synced before each step) with the
           `core.sampling.RowSampler` logits processor (one uniform per row and token, inverse CDF), frozen
           layers prepacked. new_unpacked: the same without prepacking;
* sampler  the two samplers alone on [8, V] float32 logits (per call, i.e. per generated token).

tok/s counts completion tokens (up to and including each row's end of turn).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


# ----------------------------------------------------------------------------- the previous sampler (old path)


def _old_gumbel_choice(logits, generators, temperature, top_p):
    """The sampler before issue #11: float64 Gumbel-max over the whole vocabulary, per row and token."""
    scores = logits.double() / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)
        mass = sorted_scores.softmax(-1).cumsum(-1)
        drop = mass <= 1 - top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    noise = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device, dtype=torch.float64)
                         for g in generators])
    return (scores - torch.log(-torch.log(noise))).argmax(-1)


@contextlib.contextmanager
def _old_seeded_sampling(model, seeds, temperature=1.0, top_p=1.0):
    """The previous forward hook: replaces the last position's logits by a one-hot of the Gumbel draw."""
    from safesteer.core.anatomy import unwrap_model

    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def hook(_module, _args, output):
        logits = output.logits[:, -1]
        chosen = _old_gumbel_choice(logits, generators, temperature, top_p)
        onehot = torch.full_like(logits, float("-inf"))
        onehot.scatter_(-1, chosen[:, None], 0.0)
        output.logits = onehot[:, None, :]
        return output

    handle = unwrap_model(model).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- measurements


def gemm_peak(dtype: torch.dtype, d: int, seconds: float) -> float:
    """GFLOP/s of [2048, d] x [d, 4.875 d] products (the default model's MLP shape), best of a few runs."""
    m, k, n = 2048, d, int(4.875 * d)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best


def flops_per_token(model) -> float:
    """2 x the weights every generated token multiplies: all linear layers and the output head."""
    n = sum(p.numel() for p in model.parameters())  # tied weights counted once
    embed = model.get_input_embeddings().weight  # a lookup, no multiply
    head = model.get_output_embeddings().weight
    return 2.0 * (n - embed.numel() + (head.numel() if head is embed else 0))


def eval_prompts(n: int):
    from safesteer.io.prompts import builtin_splits, seeded_subset

    splits = builtin_splits(0)
    half = n // 2
    return (seeded_subset(splits["harmful"]["eval"], half, 0) + seeded_subset(splits["edgy"]["eval"], n - half, 0))


@contextlib.contextmanager
def unshared_prefix():
    """greedy_continuous as it was before it ran the prompts' common prefix once: every row prefills its whole prompt."""
    from safesteer.core import forward  # greedy_continuous looks the helper up there on every call

    real = forward.shared_prefix_length
    forward.shared_prefix_length = lambda *args, **kwargs: 0
    try:
        yield
    finally:
        forward.shared_prefix_length = real


@contextlib.contextmanager
def unpacked():
    """bf16 linear layers as before core.prepack: oneDNN reorders each weight on every call."""
    from safesteer.core import prepack

    real = prepack.prepack_available
    prepack.prepack_available = lambda: False
    try:
        yield
    finally:
        prepack.prepack_available = real


def run_eval(model, tokenizer, prompts, max_new_tokens, batch_size, dtype, engine="continuous",
             cache_implementation=None) -> dict:
    from safesteer.core.generation import GenerationConfig, generate_responses

    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype, engine=engine)
    t0 = time.perf_counter()
    if cache_implementation:
        model.generation_config.cache_implementation = cache_implementation
    try:
        rows, stats = generate_responses(model, tokenizer, prompts, config, progress=False)
    finally:
        model.generation_config.cache_implementation = None
    seconds = time.perf_counter() - t0  # the cast to bf16 and back included
    return {"tok_s": stats.new_tokens / seconds, "tokens": stats.new_tokens, "seconds": seconds, "batch": batch_size,
            "dtype": config.resolved(model).dtype, "engine": engine, "responses": [r["response"] for r in rows]}


def make_student(model, steering_layer: int):
    from safesteer.train.config import TrainConfig
    from safesteer.train.trainer import prepare_student

    student = prepare_student(model, TrainConfig.from_preset("cpu"), steering_layer)
    with torch.no_grad():  # a trained adapter, not the zero-initialised one: its weights must matter
        g = torch.Generator().manual_seed(0)
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    return student.eval()


def run_rollouts(student, tokenizer, instructions, per_prompt, max_new_tokens, path: str, rollout_model=None) -> dict:
    from safesteer.core.sampling import rollout_seeds, seeded_sampling
    from safesteer.train.rollout import sample_rollouts

    seeds = rollout_seeds(42, range(len(instructions)), per_prompt)
    t0 = time.perf_counter()
    if path == "old":
        with _old_seeded_sampling(student, seeds):
            batch = sample_rollouts(student, tokenizer, instructions, per_prompt, max_new_tokens)
    else:
        sampler = rollout_model.synced(student)  # per step: the adapter into the bf16 copy (timed)
        with seeded_sampling(sampler, seeds):
            batch = sample_rollouts(sampler, tokenizer, instructions, per_prompt, max_new_tokens)
    seconds = time.perf_counter() - t0
    tokens = int(batch.completion_mask.sum())
    return {"tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
            "row_steps_s": batch.completion_mask.numel() / seconds, "sequences": batch.sequences}


def sampler_alone(vocab: int, rows: int, calls: int) -> dict:
    from safesteer.core.sampling import inverse_cdf_choice

    logits = torch.randn(rows, vocab) * 3
    gens = [torch.Generator().manual_seed(i) for i in range(rows)]
    out = {}
    for name, fn in (("old_gumbel_ms", _old_gumbel_choice), ("new_inverse_cdf_ms", inverse_cdf_choice)):
        fn(logits, gens, 1.0, 1.0)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(logits, gens, 1.0, 1.0)
        out[name] = (time.perf_counter() - t0) / calls * 1e3
    return out


def best(a: dict, b: dict) -> dict:
    return a if a["tok_s"] >= b["tok_s"] else b


def main(argv=None) -> int:
    from safesteer.eval.suites import EvalConfig
    from safesteer.io.models import DEFAULT_MODEL, load_model
    from safesteer.io.prompts import builtin_splits

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--quick", action="store_true", help="a one-minute version: fewer prompts, one repeat, no sweep")
    p.add_argument("--eval-prompts", type=int, default=None, help="eval prompts (default 64; --quick 32)")
    p.add_argument("--eval-batch", type=int, default=EvalConfig().batch_size, help="batch of the new eval path")
    p.add_argument("--steering-layer", type=int, default=17, help="LoRA from this layer up (the cpu preset's choice)")
    p.add_argument("--compile", action="store_true", help="also measure a static KV cache with torch.compile")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    quick = args.quick
    n_eval = args.eval_prompts or (32 if quick else 64)
    eval_tokens = 32 if quick else 64
    repeats = 1 if quick else 2
    result: dict = {"model": args.model, "threads": torch.get_num_threads(), "quick": quick,
                    "load_avg_start": os.getloadavg()}

    model, tokenizer = load_model(args.model, dtype="float32")
    d = model.config.hidden_size
    fpt = flops_per_token(model)
    peak = {"bf16": gemm_peak(torch.bfloat16, d, 1.5 if quick else 3), "fp32": gemm_peak(torch.float32, d, 1.5 if quick else 3)}
    result["peak_gflops"] = peak
    result["gflop_per_token"] = fpt / 1e9
    result["limit_tok_s"] = {k: v / (fpt / 1e9) for k, v in peak.items()}
    print(f"model {args.model}: {fpt / 1e9:.2f} GFLOP per token; GEMM peak bf16 {peak['bf16']:.0f} GFLOP/s, fp32 "
          f"{peak['fp32']:.0f} GFLOP/s on {torch.get_num_threads()} threads -> limit {result['limit_tok_s']['bf16']:.0f} "
          f"tok/s bf16, {result['limit_tok_s']['fp32']:.0f} tok/s fp32", flush=True)

    # -- evaluation-style greedy generation
    prompts = eval_prompts(n_eval)
    runs = {"old": None, "new": None, "new_unshared_prefix": None, "new_unpacked": None, "new_float32": None}
    for _ in range(repeats):
        with unpacked():  # the previous default as it was: MKL's float32 products
            measured = {"old": run_eval(model, tokenizer, prompts, eval_tokens, 16, "float32", "generate")}
        measured["new"] = run_eval(model, tokenizer, prompts, eval_tokens, args.eval_batch, "auto", "continuous")
        # What a CPU without fast bf16 gets: float32, continuous batching, prepacked (oneDNN) float32 layers.
        measured["new_float32"] = run_eval(model, tokenizer, prompts, eval_tokens, args.eval_batch, "float32", "continuous")
        with unshared_prefix():  # the same engine with every prompt's system turn run per row, as before
            measured["new_unshared_prefix"] = run_eval(model, tokenizer, prompts, eval_tokens, args.eval_batch, "auto",
                                                       "continuous")
        with unpacked():  # the same engine with oneDNN reordering every bf16 weight per call, as before
            measured["new_unpacked"] = run_eval(model, tokenizer, prompts, eval_tokens, args.eval_batch, "auto", "continuous")
        runs = {k: v if runs[k] is None else best(runs[k], v) for k, v in measured.items()}
    agree = sum(a == b for a, b in zip(runs["old"]["responses"], runs["new"]["responses"])) / len(prompts)
    result["eval"] = {k: {kk: vv for kk, vv in v.items() if kk != "responses"} for k, v in runs.items()}
    result["eval"]["identical_responses_old_vs_new"] = agree
    result["eval"]["prompts"], result["eval"]["max_new_tokens"] = n_eval, eval_tokens
    print(f"eval ({n_eval} prompts, {eval_tokens} new tokens, greedy): old fp32 generate batch 16 "
          f"{runs['old']['tok_s']:.1f} tok/s; new {runs['new']['dtype']} continuous batch {args.eval_batch} "
          f"{runs['new']['tok_s']:.1f} tok/s "
          f"({runs['new']['tok_s'] / runs['old']['tok_s']:.2f}x); identical answers {agree:.0%}", flush=True)
    same = sum(a == b for a, b in zip(runs["new"]["responses"], runs["new_unshared_prefix"]["responses"])) / len(prompts)
    result["eval"]["identical_responses_shared_vs_unshared_prefix"] = same
    print(f"  the prompts' shared system turn run once: {runs['new']['tok_s']:.1f} tok/s vs "
          f"{runs['new_unshared_prefix']['tok_s']:.1f} tok/s per row ({runs['new']['tok_s'] / runs['new_unshared_prefix']['tok_s']:.2f}x); "
          f"identical answers {same:.0%}", flush=True)
    same = sum(a == b for a, b in zip(runs["old"]["responses"], runs["new_float32"]["responses"])) / len(prompts)
    result["eval"]["identical_responses_old_vs_new_float32"] = same
    print(f"  float32 (a CPU without fast bf16): continuous batch {args.eval_batch} with prepacked layers "
          f"{runs['new_float32']['tok_s']:.1f} tok/s vs old {runs['old']['tok_s']:.1f} tok/s "
          f"({runs['new_float32']['tok_s'] / runs['old']['tok_s']:.2f}x); identical answers {same:.0%}", flush=True)
    same = sum(a == b for a, b in zip(runs["new"]["responses"], runs["new_unpacked"]["responses"])) / len(prompts)
    result["eval"]["identical_responses_packed_vs_unpacked"] = same
    print(f"  bf16 weights prepacked once: {runs['new']['tok_s']:.1f} tok/s vs {runs['new_unpacked']['tok_s']:.1f} tok/s "
          f"reordered per call ({runs['new']['tok_s'] / runs['new_unpacked']['tok_s']:.2f}x); identical answers {same:.0%}",
          flush=True)
    if not quick:
        sweep: dict = {}
        for engine in ("continuous", "generate"):
            for b in (16, 32, 64):
                sweep[f"{engine} {b}"] = round(run_eval(model, tokenizer, prompts, eval_tokens, b, "auto", engine)["tok_s"], 1)
        result["eval"]["batch_sweep_new_dtype_tok_s"] = sweep
        print(f"eval sweep ({runs['new']['dtype']}, engine and batch): " + ", ".join(f"{k}: {v}" for k, v in sweep.items()),
              flush=True)
    if args.compile:
        t0 = time.perf_counter()
        model.forward = torch.compile(model.forward, dynamic=False)
        first = run_eval(model, tokenizer, prompts[:args.eval_batch], eval_tokens, args.eval_batch, "auto", "generate",
                         "static")
        compile_s = time.perf_counter() - t0
        again = run_eval(model, tokenizer, prompts, eval_tokens, args.eval_batch, "auto", "generate", "static")
        plain = run_eval(model, tokenizer, prompts, eval_tokens, args.eval_batch, "auto", "generate")
        same = sum(a == b for a, b in zip(again["responses"], plain["responses"])) / len(prompts)
        result["eval"]["static_compiled"] = {"first_call_s": compile_s, "tok_s": again["tok_s"],
                                             "identical_to_dynamic_cache": same}
        result["eval"]["static_compiled"]["dynamic_generate_tok_s"] = plain["tok_s"]
        print(f"static cache + torch.compile (transformers generate, batch {args.eval_batch}): first call {compile_s:.0f} s, "
              f"then {again['tok_s']:.1f} tok/s vs {plain['tok_s']:.1f} tok/s with the dynamic cache; identical answers "
              f"{same:.0%}", flush=True)
        model.forward = model.forward._torchdynamo_orig_callable if hasattr(model.forward, "_torchdynamo_orig_callable") else model.forward
        torch._dynamo.reset()

    # -- training rollouts (cpu preset: 2 prompts x 4 rollouts x 48 tokens, LoRA from the steering layer)
    from safesteer.train.rollout import RolloutModel

    instructions = [p.text for p in builtin_splits(0)["harmful"]["train"][:2]]
    student = make_student(model, args.steering_layer)
    t0 = time.perf_counter()
    rollout_model = RolloutModel(student, torch.bfloat16)
    copy_s = time.perf_counter() - t0
    with unpacked():
        unpacked_model = RolloutModel(student, torch.bfloat16)
    rolls = {"old": None, "new": None, "new_unpacked": None}
    for _ in range(repeats + 1):
        with unpacked():
            measured = {"old": run_rollouts(student, tokenizer, instructions, 4, 48, "old")}
        measured.update({"new": run_rollouts(student, tokenizer, instructions, 4, 48, "new", rollout_model),
                         "new_unpacked": run_rollouts(student, tokenizer, instructions, 4, 48, "new", unpacked_model)})
        rolls = {k: v if rolls[k] is None else best(rolls[k], v) for k, v in measured.items()}
    del unpacked_model
    result["rollouts"] = {**{k: {kk: vv for kk, vv in v.items() if kk != "sequences"} for k, v in rolls.items()},
                          "batch": 8, "max_new_tokens": 48, "bf16_copy_build_s": copy_s,
                          "identical_packed_vs_unpacked": torch.equal(rolls["new"]["sequences"],
                                                                      rolls["new_unpacked"]["sequences"])}
    print(f"rollouts (8 x 48 tokens, LoRA student): old fp32 + Gumbel hook {rolls['old']['tok_s']:.1f} tok/s; new bf16 "
          f"copy + inverse-CDF processor {rolls['new']['tok_s']:.1f} tok/s ({rolls['new']['tok_s'] / rolls['old']['tok_s']:.2f}x); "
          f"building the copy once took {copy_s:.1f} s", flush=True)
    print(f"  bf16 weights prepacked once: {rolls['new']['tok_s']:.1f} tok/s vs {rolls['new_unpacked']['tok_s']:.1f} tok/s "
          f"reordered per call ({rolls['new']['tok_s'] / rolls['new_unpacked']['tok_s']:.2f}x); identical rollouts: "
          f"{result['rollouts']['identical_packed_vs_unpacked']}", flush=True)

    # -- the samplers alone
    vocab = model.get_output_embeddings().weight.shape[0]
    result["sampler"] = sampler_alone(vocab, 8, 10 if quick else 30)
    s = result["sampler"]
    print(f"sampler alone, [8, {vocab}] logits: old Gumbel {s['old_gumbel_ms']:.1f} ms/token, new inverse CDF "
          f"{s['new_inverse_cdf_ms']:.1f} ms/token; x48 tokens = {48 * s['old_gumbel_ms'] / 1e3:.2f} s vs "
          f"{48 * s['new_inverse_cdf_ms'] / 1e3:.2f} s per rollout batch", flush=True)
    result["load_avg_end"] = os.getloadavg()
    print(f"load average at start {result['load_avg_start'][0]:.2f}, at end {result['load_avg_end'][0]:.2f} "
          f"(above ~0.5 the machine was shared: the numbers are lower bounds)")
    print(f"limit (FLOP bound at the measured GEMM peak): {result['limit_tok_s']['bf16']:.0f} tok/s bf16, "
          f"{result['limit_tok_s']['fp32']:.0f} tok/s fp32")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
