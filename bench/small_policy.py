"""A small from-scratch policy for CPU benchmarks, packaged as an ordinary local Hugging Face directory.

The real SmolLM2-135M needs 1-2 minutes per training step on 2 CPU cores, far too slow for a benchmark of
tens of runs.  This module builds a policy that goes through exactly the same code path
(``model_path=<dir>`` -> ``ragen.models.resolve_model_path`` -> ``AutoTokenizer`` / ``AutoModelForCausalLM``
/ ``AutoModelForTokenClassification``):

* **Tokenizer** - a word-level ``PreTrainedTokenizerFast`` built with the ``tokenizers`` library.  The
  pre-tokenizer isolates every piece matched by ``␣?[A-Z]?[a-z]+ | ␣?[A-Z] | ␣?digit | one whitespace
  char | one other char``, so words with their leading space (" frozen", "Left"), single grid symbols
  ("P", "_", "#", "√"), digits, punctuation and newlines are separate tokens; the decoder (``Fuse``) simply
  concatenates, so
  ``decode(encode(text)) == text`` for every in-vocabulary text (whitespace included).  The vocabulary is
  the words of the texts the context manager renders for Bandit / FrozenLake / Sokoban (system prompt,
  format hints, status and feedback lines, env instructions and observations) plus every printable ASCII
  character; anything else maps to ``<unk>``.  ``<answer>``, ``</answer>``, ``<think>``, ``</think>`` and
  ``||`` are single (non-special) added tokens, ``<|im_start|>`` / ``<|im_end|>`` are special tokens,
  ``eos = pad = <|im_end|>`` and the ``chat_template`` is ChatML, so the context manager's template
  boundary check passes.  With ``agent_proxy.prefill_answer=true`` a well-formed reply is the three
  tokens ``Left`` ``</answer>`` ``<|im_end|>``; multi-action replies (``Left || Down</answer>``) are
  also expressible.
* **Model** - a ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads, tied embeddings, ~0.1M parameters)
  initialised at random, saved with ``save_pretrained`` together with the tokenizer.
* **Format warm-up** (:func:`format_warmup`) - a random model never answers in format, so it gets a short
  supervised warm-up: a few hundred Adam steps of cross-entropy on the rows the real ``AgentProxy``
  builds when a stub policy answers every turn with ``<answer>`` + a *uniformly random valid action*
  (+ ``</answer><|im_end|>``); the loss covers only the reply tokens (the row's loss mask).  Because the
  action is random and independent of the state, the warm-up teaches the format and nothing about the
  task: the warmed-up policy picks actions roughly uniformly.  It is done once per task and saved; every
  estimator and seed then starts from that directory (``model_path=<dir>``, nothing is copied).
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Iterable
from typing import Any

import torch

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
TAGS = ["<answer>", "</answer>", "<think>", "</think>", "||"]
PIECE_RE = r" ?[A-Z]?[a-z]+| ?[A-Z]| ?[0-9]|\s|[^A-Za-z0-9\s]"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# valid actions per env type (the stub policy of the warm-up draws from these uniformly)
ACTIONS = {
    "frozenlake": ["Left", "Down", "Right", "Up"],
    "sokoban": ["Up", "Down", "Left", "Right"],
    "bandit": ["Phoenix", "Dragon"],
}
MODEL_DEFAULTS = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=4096)


# --------------------------------------------------------------------------------------------- tokenizer
def _make_tokenizer(words: Iterable[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    alnum = [chr(c) for c in range(48, 58)] + [chr(c) for c in range(65, 91)] + [chr(c) for c in range(97, 123)]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t", "√"] + [" " + c for c in alnum]
    for tok in SPECIALS + TAGS + chars + sorted(set(words)):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_RE), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"], chat_template=CHATML_TEMPLATE,
    )
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAGS])
    return tok


def _corpus(config: Any) -> list[str]:
    """Texts the context manager renders for the three envs, both with and without the think format."""
    from omegaconf import OmegaConf

    from ragen.config import parse_config
    from ragen.env import make_env
    from ragen.llm_agent.ctx_manager import ContextManager

    boot = _make_tokenizer([])  # character-level bootstrap (words -> <unk>); only used to build the texts
    texts: list[str] = []
    rng = random.Random(0)
    for think in (True, False):
        cfg = OmegaConf.merge(config, {"agent_proxy": {"enable_think": think}})
        ctx = ContextManager(parse_config(cfg).agent_proxy, boot, check_template=False)
        texts += [ctx.system_prompt(), ctx.format_hint(1), ctx.format_hint(5), ctx.format_reminder()]
        for env_type, env_cfg in (("bandit", {}), ("frozenlake", {"size": 4}),
                                  ("sokoban", {"dim_room": [6, 6], "num_boxes": 1})):
            for seed in range(3):
                env = make_env(env_type, env_cfg)
                obs = str(env.reset(seed=seed))
                texts.append(ctx.first_user_message(env.instruction, obs, 5))
                for turn in range(2, 4):
                    obs, reward, done, _ = env.step(rng.choice(ACTIONS[env_type]))
                    texts.append(ctx.next_user_message(str(obs), reward, turn, 3, format_ok=(turn % 2 == 0),
                                                       invalid_actions=["Jump"]))
                    if done:
                        break
                env.close()
    texts.append("You pulled Phoenix and scored 0.1. You pulled Dragon and scored 1.")
    texts.append("system user assistant")  # ChatML roles
    return texts


def build_tokenizer(config: Any):
    words = set()
    for text in _corpus(config):
        for w in re.findall(PIECE_RE, text):
            if len(w.strip()) > 1:  # every word both with and without its leading space
                words.update({w.strip(), " " + w.strip()})
    return _make_tokenizer(words)


def build_policy_dir(out_dir: str, config: Any, seed: int = 0, **model_kwargs: Any) -> str:
    """Write a fresh (random) small Llama + tokenizer as a local HF directory; returns ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(config)
    kw = dict(MODEL_DEFAULTS)
    kw.update(model_kwargs)
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------- warm-up
class RandomFormatWorkers:
    """Stub workers for ``AgentProxy``: every reply is ``<prefill>`` + a uniformly random valid action +
    ``</answer><|im_end|>`` (no model involved)."""

    def __init__(self, tokenizer: Any, actions: list[str], prefill: bool, seed: int = 0):
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        head = "" if prefill else "<answer>"
        eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.replies = [tokenizer(head + a + "</answer>", add_special_tokens=False)["input_ids"] + [eot]
                        for a in actions]
        self.pad = tokenizer.pad_token_id

    def generate(self, prompts):
        from verl import DataProto

        n = prompts.batch["input_ids"].shape[0]
        width = max(len(r) for r in self.replies)
        responses = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i in range(n):
            reply = self.replies[self.rng.randrange(len(self.replies))]
            responses[i, : len(reply)] = torch.tensor(reply)
            mask[i, : len(reply)] = 1
        return DataProto.from_dict(tensors={"responses": responses, "response_mask": mask})


def format_warmup(model_dir: str, config: Any, env_type: str, steps: int = 150, batch_rows: int = 8,
                  lr: float = 3e-3, n_rollouts: int = 12, seed: int = 0,
                  log: callable | None = print) -> dict[str, float]:
    """Supervised format warm-up of the policy in ``model_dir`` (overwritten in place).

    ``config`` is the composed task config (its prompts, turn limits and prefill setting are the ones the
    RL runs use).  Rows come from ``AgentProxy.rollout("train")`` driven by :class:`RandomFormatWorkers`
    with env seeds far from every training / validation seed.  Returns a small report (loss, time).
    """
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragen.llm_agent.agent_proxy import AgentProxy

    start = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = OmegaConf.merge(config, {"seed": {"train": 900_000 + 10_000 * seed, "val": 0}})
    stub = RandomFormatWorkers(tok, ACTIONS[env_type], bool(cfg.agent_proxy.prefill_answer), seed=seed)
    proxy = AgentProxy(cfg, stub, tokenizer=tok)
    rows: list[tuple[list[int], list[int]]] = []
    for k in range(n_rollouts):
        batch = proxy.rollout("train", k)
        for b in range(len(batch)):
            length = int(batch.batch["attention_mask"][b].sum())
            rows.append((batch.batch["input_ids"][b, :length].tolist(),
                         batch.batch["loss_mask"][b, :length].tolist()))
    rnd = random.Random(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    pad = tok.pad_token_id
    losses = []
    for step in range(steps):
        pick = [rows[rnd.randrange(len(rows))] for _ in range(batch_rows)]
        width = max(len(r[0]) for r in pick)
        ids = torch.full((len(pick), width), pad, dtype=torch.long)
        att = torch.zeros((len(pick), width), dtype=torch.long)
        lm = torch.zeros((len(pick), width), dtype=torch.float32)
        for i, (r_ids, r_mask) in enumerate(pick):
            ids[i, : len(r_ids)] = torch.tensor(r_ids)
            att[i, : len(r_ids)] = 1
            lm[i, : len(r_ids)] = torch.tensor(r_mask, dtype=torch.float32)
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        target = ids[:, 1:]
        weight = lm[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                reduction="none").view_as(weight)
        loss = (nll * weight).sum() / weight.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"  format warm-up step {step:4d}/{steps}  reply CE {loss.item():.3f}")
    model.eval()
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    report = {"env_type": env_type, "steps": steps, "rows": len(rows), "final_loss": sum(losses[-20:]) / 20,
              "wall_s": time.time() - start}
    with open(os.path.join(model_dir, "format_warmup.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    return report


__all__ = ["ACTIONS", "CHATML_TEMPLATE", "RandomFormatWorkers", "build_policy_dir", "build_tokenizer",
           "format_warmup"]
