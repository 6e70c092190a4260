"""This package's environments as a veRL agent loop: ``agent_name = ragen_env`` in a dataset row.

One row = one episode: the row's ``extra_info`` names the environment (``env_tag``, ``seed``) and carries the run
settings the episode needs as JSON (``ragen``: ``agent_proxy``, ``es_manager.format_penalty``, the env's
``custom_envs`` entry and the per-turn reply cap), written by ``python -m ragen.verl_plugin.dataset``.  The
episode is played with the local backend's own pieces: :class:`~ragen.llm_agent.ctx_manager.ContextManager`
(prompts, chat tokens, answer parsing) and :func:`~ragen.llm_agent.agent_proxy.play_turn` (env step, format
penalty, per-turn score), so prompts, tokens and rewards equal the local backend's.

Output (``AgentLoopOutput``): ``prompt_ids`` = the first prompt; ``response_ids`` = every later token, mask 1 on
generated tokens and 0 on end-of-turn closers and user messages; ``reward_score`` = the episode's score (sum of
the turn scores) on the last token; ``extra_fields["ragen_turns"]`` = per turn ``start`` (offset in the
response), ``num_tokens``, ``reward``, ``done``, from which the plugin's trainer rebuilds the turns.  Every turn of
a dialogue is generated under one request id, so a load balancer keeps it on the replica that has its prefix.
Each reply is sampled with a seed made of the env seed, the row's session (``rollout.n`` index) and the turn, so a
resumed run samples what an uninterrupted one would.
"""
from __future__ import annotations

import functools
import json
import logging
import uuid
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput, register
from verl.utils.profiler import simple_timer

from ragen.config import RunConfig, parse_config
from ragen.llm_agent.agent_proxy import play_turn
from ragen.llm_agent.ctx_manager import ContextManager
from ragen.llm_agent.es_manager import EnvStateManager
from ragen.utils import mix_seed

logger = logging.getLogger(__name__)

AGENT_NAME = "ragen_env"
TURNS_FIELD = "ragen_turns"


class PromptTooLongError(ValueError):
    """A dialogue outgrew the rollout's prompt or response budget before a generate call."""


def episode_config(settings: dict[str, Any]) -> RunConfig:
    """The run configuration one episode reads: the row's sections over the schema's defaults, one env group of
    one env of the row's tag (the env seed comes from the row)."""
    tag = settings["env_tag"]
    groups = {"env_groups": 1, "group_size": 1, "env_configs": {"tags": [tag], "n_groups": [1]}}
    return parse_config({
        "agent_proxy": settings["agent_proxy"],
        "es_manager": {"format_penalty": settings["format_penalty"], "train": groups, "val": groups},
        "custom_envs": {tag: settings["env"]},
    })


@functools.lru_cache(maxsize=16)
def _context(settings_json: str, tokenizer: Any) -> tuple[RunConfig, ContextManager]:
    run = episode_config(json.loads(settings_json))
    # the chat template is checked once per settings, not per episode
    return run, ContextManager(run.agent_proxy, tokenizer)


def row_settings(extra_info: Any) -> tuple[str, int]:
    """``(settings JSON, seed)`` of a dataset row; a row the dataset writer did not make names what is missing."""
    if not isinstance(extra_info, dict) or "ragen" not in extra_info or "seed" not in extra_info:
        raise ValueError(f"agent loop {AGENT_NAME!r}: the dataset row has no extra_info.ragen / extra_info.seed; "
                         "write the dataset with `python -m ragen.verl_plugin.dataset`")
    return str(extra_info["ragen"]), int(extra_info["seed"])


@register(AGENT_NAME)
class RagenEnvAgentLoop(AgentLoopBase):
    """A multi-turn episode of a ``ragen.env`` environment."""

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        settings_json, seed = row_settings(kwargs.get("extra_info"))
        settings = json.loads(settings_json)
        run, ctx = _context(settings_json, self.tokenizer)
        esm = EnvStateManager.for_run(run, "train")
        state = esm.reset_env(0, seed, uid=f"{settings['env_tag']}-seed{seed}")
        dialogue = ctx.start(state.instruction, state.obs, state.actions_left)
        prompt_len = len(dialogue.input_ids)
        prompt_budget, response_budget = self.rollout_config.prompt_length, self.rollout_config.response_length
        if prompt_len > prompt_budget:
            raise PromptTooLongError(f"agent loop {AGENT_NAME!r}: the first prompt has {prompt_len} tokens, over "
                                     f"data.max_prompt_length / rollout.prompt_length = {prompt_budget}")
        reply_cap = int(settings["reply_tokens"])
        request_id = uuid.uuid4().hex  # one id for every turn: the replica that holds the prefix serves them all
        params = {**sampling_params, "stop_token_ids": [ctx.eot_id]}
        turns: list[dict[str, Any]] = []
        metrics: dict[str, float] = {}
        versions: dict[str, Any] = {}
        obs_text = ctx.dialogue_text(dialogue)
        for turn in range(1, run.agent_proxy.max_turn + 1):
            used = len(dialogue.input_ids) - prompt_len
            if used + reply_cap > response_budget:
                raise PromptTooLongError(
                    f"agent loop {AGENT_NAME!r}: turn {turn} could need {used + reply_cap} response tokens, over "
                    f"actor_rollout_ref.rollout.response_length = {response_budget} (data.max_response_length); "
                    f"`python -m ragen.verl_plugin.dataset` prints the lengths this dataset needs")
            with simple_timer("generate_sequences", metrics):
                output = await self.server_manager.generate(
                    request_id=request_id, prompt_ids=list(dialogue.input_ids),
                    sampling_params={**params, "max_tokens": reply_cap,
                                     "seed": mix_seed(seed, int(kwargs.get("session_id", 0)), turn)})
            start = len(dialogue.input_ids) - prompt_len
            # the weight versions that generated the dialogue: veRL's staleness tags (agent_loop_tq.py:215-218)
            versions.setdefault("min_global_steps", output.extra_fields.get("min_global_steps"))
            versions["max_global_steps"] = output.extra_fields.get("max_global_steps")
            gen_ids = list(output.token_ids)[:reply_cap]
            record, _ = play_turn(ctx, esm, 0, dialogue, gen_ids, turn, run.agent_proxy.max_turn,
                                  run.es_manager.format_penalty, obs_text=obs_text, close_last_reply=False)
            turns.append({"start": start, "num_tokens": record["num_tokens"], "reward": record["reward"],
                          "done": record["done"]})
            obs_text = record["next_obs"]
            if record["done"]:
                break
        response_ids = dialogue.input_ids[prompt_len:]
        return AgentLoopOutput(
            prompt_ids=dialogue.input_ids[:prompt_len], response_ids=response_ids,
            response_mask=dialogue.loss_mask[prompt_len:], reward_score=float(sum(t["reward"] for t in turns)),
            num_turns=2 * len(turns) + 1, metrics=AgentLoopMetrics(**metrics),
            extra_fields={**versions, TURNS_FIELD: turns, "reply_tokens": reply_cap,
                          "turn_scores": [t["reward"] for t in turns],
                          "episode_success": bool(state.success), "env_tag": settings["env_tag"]})
