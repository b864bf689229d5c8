"""The model card: OUT/model/README.md, in the Hugging Face convention, from a run directory's artifacts.

    write_model_card("runs/demo")     # what `safesteer align` calls after training and after its summary

YAML front matter (base_model, library_name, tags, license when known), then the base model, the
method with every departure from the paper's settings named plainly, the settings beside the paper's,
the before/after table with 95% intervals (from the summary's results, when it exists), the judge and
its limits, and intended use and limits. Like the HTML report, it is rendered from artifacts only
(templates/model_card.md.j2) and written atomically; a rerun of `align` regenerates it, so it picks
up the summary once there is one.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..utils import write_text_atomic
from .build import evaluation_view, load_run, percent, template_environment

CARD_NAME = "README.md"
CARD_TEMPLATE = "model_card.md.j2"
PAPER = "SafeSteer (arXiv 2606.02530)"

# Built-in aliases: the hub model each GGUF was converted from, and its license.
BUILTIN_SOURCES = {
    "qwen2.5-coder-0.5b-instruct": ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "apache-2.0"),
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}

LOSS_TEXT = {
    "localized": "the paper's localized term sum_S p_s (log p_s - log p_t) over the safety tokens S",
    "localized_renorm": "reverse KL over S after renormalising student and teacher over S",
    "localized_forward": "forward KL sum_S p_t (log p_t - log p_s) over S",
    "localized_bucket": "reverse KL over the tokens of S plus one bucket for the rest of the vocabulary (a proper "
                        "divergence, >= 0)",
    "full_reverse": "reverse KL over the whole vocabulary (not localized to S)",
}


def _front_matter_of(readme: Path) -> dict:
    """The YAML front matter of a model card, {} when there is none or it does not parse."""
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
        if text.startswith("---"):
            data = yaml.safe_load(text.split("---", 2)[1])
            return data if isinstance(data, dict) else {}
    except (OSError, ValueError, yaml.YAMLError):
        pass
    return {}


def base_model_source(identity: dict) -> tuple[str | None, str | None, str]:
    """(hub id for `base_model`, license, how it was loaded) of the base model, None where unknown."""
    name, kind = str(identity.get("name") or "?"), identity.get("kind")
    if kind == "builtin" and name in BUILTIN_SOURCES:
        hub_id, license_id = BUILTIN_SOURCES[name]
        sha = identity.get("gguf_sha256") or ""
        return hub_id, license_id, f"safesteer's built-in alias `{name}` (a GGUF of {hub_id}, sha256 {sha[:12]})"
    if kind == "hub":
        return name, None, f"the Hugging Face hub model `{name}`"
    if kind == "local":
        meta = _front_matter_of(Path(name) / CARD_NAME)
        license_id = meta.get("license") if isinstance(meta.get("license"), str) else None
        return None, license_id, f"the local model directory `{name}`"
    return None, None, f"`{name}` ({kind or 'unknown kind'})"


def _paper_configs(family: str) -> dict[str, dict]:
    from ..teacher.direction import DirectionConfig
    from ..teacher.tokens import SafetyTokenConfig
    from ..train.config import TrainConfig

    tokens = SafetyTokenConfig.from_preset("paper")
    horizon, floor = tokens.resolve(family)
    return {"train": asdict(TrainConfig.from_preset("paper", family)), "direction": asdict(DirectionConfig.from_preset("paper")),
            "tokens": {**asdict(tokens), "horizon": horizon, "min_steered_prob": floor}}


def extensions(train: dict, tokens: dict, direction: dict, paper: dict[str, dict]) -> list[str]:
    """Each way this run's method departs from the paper's, as a sentence (sizes are settings, not here)."""
    out = []
    loss = train.get("loss")
    if loss and loss != paper["train"]["loss"]:
        out.append(f"Loss `{loss}`: {LOSS_TEXT.get(loss, loss)}, instead of the paper's `localized` term.")
    if train.get("finetune") == "lora" and paper["train"]["finetune"] != "lora":
        out.append(f"A LoRA student (r={train.get('lora_r')}, alpha={train.get('lora_alpha')}, on "
                   f"{train.get('lora_targets')}) instead of a full fine-tune; the teacher is the student with its "
                   f"adapter switched off plus the steering hook, so no second copy of the model is kept.")
    if train.get("finetune") == "lora" and train.get("lora_layers") == "from_steering":
        out.append("The adapter sits only on the steering layer and above; teacher and student share one pass "
                   "through the layers below it.")
    for key, label in (("temperature", "Rollout temperature"), ("top_p", "Rollout top-p")):
        if key in train and train[key] != paper["train"][key]:
            out.append(f"{label} {train[key]:g} (on-policy sampling is {paper['train'][key]:g}).")
    if tokens:
        floor, k_prime = tokens.get("min_steered_prob"), tokens.get("top_k_per_position")
        if floor is not None and floor != paper["tokens"]["min_steered_prob"]:
            out.append(f"Safety tokens must have a mean steered probability >= {floor:g} (paper: "
                       f"{paper['tokens']['min_steered_prob']:g}), so S holds tokens the teacher actually emits.")
        if k_prime is not None and k_prime != paper["tokens"]["top_k_per_position"]:
            out.append(f"Each scored position votes for its top K'={k_prime} tokens (paper: "
                       f"K'={paper['tokens']['top_k_per_position']}).")
        if tokens.get("rank_by", "delta") != "delta":
            out.append("Safety tokens ranked by p_t x delta (teacher probability times the log-ratio), not by delta.")
        if tokens.get("method", "vote") != "vote":
            out.append("Safety tokens are the top K by mean score, not by votes.")
    out.extend(training_extensions(train))
    if direction.get("induce_fraction") is not None:
        out.append(f"Refusal direction: a relative induce filter (adding the direction must move the harmless "
                   f"refusal score {direction['induce_fraction']:g} of the way to the harmful baseline) instead of the "
                   f"paper's mean score >= {paper['direction']['induce_threshold']:g}.")
    return out


def training_extensions(train: dict) -> list[str]:
    """The declared extensions of stage 3 beyond the paper (method.md), each as a sentence."""
    out = []
    if train.get("contrast") and (train.get("contrast_prompts_per_step") or 0) > 0:
        coeff = train.get("contrast_coeff", 0.0) or 0.0
        teacher = "the unsteered model" if coeff == 0 else f"the model steered with coefficient {coeff:g}"
        out.append(f"Beyond the paper: contrast prompts ({train['contrast']}), {train['contrast_prompts_per_step']} "
                   f"per step beside the harmful ones, with {teacher} as their teacher and loss weight "
                   f"{train.get('contrast_weight', 1.0):g}" + (", one rollout of each the student's greedy "
                   "continuation" if train.get("contrast_greedy") else "") + ": the student keeps answering what "
                   "sounds sensitive but is fair.")
    if (train.get("opening_tokens") or 0) > 0 and train.get("opening_weight", 1.0) != 1.0:
        out.append(f"Beyond the paper: the first {train['opening_tokens']} completion positions weigh "
                   f"{train['opening_weight']:g}x in the loss (where a refusal is decided).")
    if train.get("gate") == "on":
        out.append("Beyond the paper: a gated teacher, which steers each harmful rollout by the harmfulness its "
                   "prompt scores at the last instruction token (gate.json).")
    return out


SETTINGS = (  # (artifact, key, label) in the settings table
    ("train", "preset", "preset"), ("train", "steps", "steps"), ("train", "prompts_per_step", "prompts per step"),
    ("train", "rollouts_per_prompt", "rollouts per prompt"), ("train", "max_new_tokens", "rollout length (tokens)"),
    ("train", "loss", "loss"), ("train", "finetune", "fine-tune"), ("train", "lora_r", "LoRA rank"),
    ("train", "lora_layers", "LoRA layers"), ("train", "learning_rate", "learning rate"),
    ("train", "warmup_ratio", "warm-up ratio"), ("train", "seed", "seed"),
    ("tokens", "n_tokens", "|S| (K)"), ("tokens", "top_k_per_position", "votes per position (K')"),
    ("tokens", "min_steered_prob", "token probability floor"), ("tokens", "horizon", "token horizon (H)"),
    ("tokens", "samples_per_prompt", "teacher samples per prompt (M)"), ("tokens", "rank_by", "token ranking"),
    ("direction", "max_layer_frac", "direction layer cut-off (x depth)"), ("direction", "kl_threshold", "direction KL filter"),
    ("direction", "induce_fraction", "direction induce filter (relative)"),
    ("direction", "layers", "direction layers searched"), ("direction", "positions", "direction positions searched"),
)


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def card_context(run_dir: str | Path) -> dict | None:
    """What templates/model_card.md.j2 needs; None when RUN_DIR/model holds no trained model yet."""
    import yaml

    run = load_run(run_dir)
    record = run.run_record
    if not isinstance(record, dict):
        return None
    identity = record.get("base_model") if isinstance(record.get("base_model"), dict) else {}
    family = str(identity.get("family") or "qwen")
    train = record.get("config") if isinstance(record.get("config"), dict) else {}
    token_data = run.safety_tokens if isinstance(run.safety_tokens, dict) else {}
    tokens = {**(token_data.get("config") or {}), **{k: v for k, v in (token_data.get("resolved") or {}).items()
                                                    if k in ("horizon", "min_steered_prob")}}
    direction = run.direction if isinstance(run.direction, dict) else {}
    direction_config = direction.get("config") or {}
    paper = _paper_configs(family)
    hub_id, license_id, loaded_from = base_model_source(identity)
    adapter = record.get("saved_as") == "adapter"

    front = {}
    if hub_id:
        front["base_model"] = hub_id
    front["library_name"] = "peft" if adapter else "transformers"
    if license_id:
        front["license"] = license_id
    front["pipeline_tag"] = "text-generation"
    front["tags"] = ["safesteer", "safety", "refusal", "alignment", "on-policy-distillation", "activation-steering"] \
        + (["lora"] if train.get("finetune") == "lora" else [])

    sources = {"train": train, "tokens": tokens, "direction": direction_config}
    unset = {"layers": "all", "positions": "all"}  # what a None means for these settings

    def shown(value: Any, key: str) -> str:
        return unset[key] if value is None and key in unset else _shown(value)

    settings = [(label, shown(sources[where].get(key), key), shown(paper[where].get(key), key))
                for where, key, label in SETTINGS if key in sources[where]]
    safety = record.get("safety_tokens") or {}
    view = evaluation_view(run)
    table, judge = [], None
    if view is not None:
        judge = view.judge
        for metric, by_model in view.rates.items():
            table.append([metric] + [
                f"{percent(r['rate'])} [{percent(r['ci_low'])}-{percent(r['ci_high'])}] ({r['k']}/{r['n']})" if r else "-"
                for r in (by_model.get(m) for m in view.models)])
        for metric, by_model in view.scalars.items():
            table.append([metric] + [f"{by_model[m]:.3g}" if m in by_model else "0 (reference)" if m == view.models[0]
                                     else "-" for m in view.models])
    name = hub_id or str(identity.get("name") or "model")
    return {
        "front_matter": yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(),
        "title": f"{name.rsplit('/', 1)[-1]} + SafeSteer",
        "paper": PAPER,
        "base": {"name": name, "loaded_from": loaded_from, "architecture": identity.get("architecture"),
                 "n_layers": identity.get("n_layers"), "family": family},
        "adapter": adapter,
        "preset": train.get("preset") or (run.timings or {}).get("preset"),
        "extensions": extensions(train, tokens, direction_config, paper),
        "direction": {"layer": direction.get("layer", (record.get("direction") or {}).get("layer")),
                      "position": direction.get("position"), "coeff": direction.get("coeff")},
        "safety_tokens": [repr(str(t)) for t in (safety.get("texts") or [])],
        "train_prompts": (record.get("train_prompts") or {}).get("n"),
        "steps_done": record.get("steps_done"),
        "settings": settings,
        "evaluation": {"models": view.models if view else [], "rows": table, "source": view.source if view else None},
        "judge": judge,
        "keyword_judge": judge is None or str(judge).startswith("keyword"),
        "versions": record.get("versions") or {},
    }


def build_model_card(run_dir: str | Path) -> str | None:
    context = card_context(run_dir)
    if context is None:
        return None
    return template_environment().get_template(CARD_TEMPLATE).render(context)


def write_model_card(run_dir: str | Path) -> Path | None:
    """Write RUN_DIR/model/README.md atomically; None (and nothing written) without a trained model."""
    text = build_model_card(run_dir)
    if text is None:
        return None
    target = Path(run_dir) / "model" / CARD_NAME
    write_text_atomic(target, text)
    return target
