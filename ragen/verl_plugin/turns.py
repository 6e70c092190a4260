"""A veRL dialogue row -> its turns, the utterance critic's transitions.

A row of veRL's V1 trainer is one dialogue: ``prompts`` (the first prompt), ``responses`` (everything after it)
and ``response_mask`` (1 on generated tokens, 0 on environment / tool tokens).  A turn is a maximal run of 1 in the
mask: its state is the dialogue before the run, its reply the run's tokens.  Rewards and ends come from the
agent loop:

* rows of the plugin's ``ragen_env`` agent loop carry ``extra_fields["ragen_turns"]`` (per turn: ``start`` in
  the response, ``num_tokens``, ``reward``, ``done``), which also lists turns whose reply was empty (no run in
  the mask); the runs must agree with it, else the row is refused;
* any other agent loop: one turn per run; ``extra_fields["turn_scores"]`` when it has one score per run, else the
  row's score (the sum of ``rm_scores``) on the last turn; only the last turn is done.

The records have the keys of the local backend's ``turn_records`` (``obs``, ``action``, ``reward``,
``next_obs``, ``done``, ``num_tokens``): texts are decoded from the row's tokens (special tokens kept in states,
dropped in replies), as :class:`~ragen.llm_agent.agent_proxy.AgentProxy` records them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ragen.verl_plugin.agent_loop import TURNS_FIELD


class TurnLayoutError(ValueError):
    """A row whose turns cannot be rebuilt (no generated turn, or a mask that disagrees with its agent loop)."""


def mask_runs(response_mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` (end exclusive) of the runs of 1 in a ``[L]`` mask."""
    mask = response_mask.to(torch.bool).flatten()
    if mask.numel() == 0:
        return []
    padded = torch.nn.functional.pad(mask.to(torch.int8), (1, 1))
    edges = padded[1:] - padded[:-1]
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def rebuild_turns(prompt_ids: Sequence[int], response_ids: Sequence[int], response_mask: torch.Tensor,
                  extra_fields: dict[str, Any], row_score: float, decode: Callable[..., str],
                  agent_name: str = "?") -> list[dict[str, Any]]:
    """The turns of one row as ``turn_records`` (see the module docstring); ``decode(ids, skip_special_tokens)``."""
    response_ids = [int(t) for t in response_ids]
    runs = mask_runs(response_mask)
    listed = extra_fields.get(TURNS_FIELD) if isinstance(extra_fields, dict) else None
    if listed is not None:
        turns = [(int(t["start"]), int(t["num_tokens"]), float(t["reward"]), bool(t["done"])) for t in listed]
        generated = [(start, start + n) for start, n, _, _ in turns if n > 0]
        if generated != runs:
            raise TurnLayoutError(f"agent loop {agent_name!r}: its {TURNS_FIELD} list turns at {generated} but the "
                                  f"response mask has runs at {runs}")
    else:
        scores = extra_fields.get("turn_scores") if isinstance(extra_fields, dict) else None
        if scores is None or len(scores) != len(runs):
            scores = [0.0] * (len(runs) - 1) + [float(row_score)] if runs else []
        turns = [(start, end - start, float(score), k == len(runs) - 1)
                 for k, ((start, end), score) in enumerate(zip(runs, scores))]
    if not runs:
        raise TurnLayoutError(f"agent loop {agent_name!r} returned a dialogue with no generated token (response mask "
                              "all 0): it has no turn to learn from")
    prompt = [int(t) for t in prompt_ids]
    states = [decode(prompt + response_ids[:start], skip_special_tokens=False) for start, _, _, _ in turns]
    records = []
    for k, (start, n, reward, done) in enumerate(turns):
        last = k == len(turns) - 1
        records.append({"obs": states[k], "action": decode(response_ids[start:start + n], skip_special_tokens=True),
                        "reward": reward, "next_obs": "" if (done or last) else states[k + 1],
                        "done": bool(done or last), "num_tokens": n})
    return records


def batch_turns(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                masks: Sequence[torch.Tensor], row_scores: Sequence[float], extras: Sequence[dict[str, Any]],
                agent_names: Sequence[str], padding: Sequence[bool],
                decode: Callable[..., str]) -> list[list[dict[str, Any]]]:
    """:func:`rebuild_turns` of every row of a batch; veRL's synthetic padding rows get no turns."""
    return [[] if pad else rebuild_turns(p, r, m, extra or {}, score, decode, str(name))
            for p, r, m, score, extra, name, pad in zip(prompts, responses, masks, row_scores, extras, agent_names,
                                                        padding)]
