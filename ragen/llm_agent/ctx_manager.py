"""Context manager: renders the multi-turn chat, parses answers, and builds token rows incrementally.

A row is built in token ids, never by re-tokenizing generated text, so the loss mask is exact:

* turn 1: the chat template of ``[system, user]`` with ``add_generation_prompt=True`` (+ the ``<answer>``
  prefill when ``agent_proxy.prefill_answer``) — loss mask 0;
* each response: exactly the ids the model returned — loss mask 1; when the model stopped without the
  end-of-turn token (length limit) an end-of-turn token is appended with loss mask 0;
* each next user message: the template's rendering of ``<end-of-turn>\\n<|im_start|>user\\n...`` taken as
  the suffix after the assistant turn (+ prefill) — loss mask 0.

At construction a sample dialogue built this way is compared with the template's own tokenization of the
same dialogue, so a tokenizer whose chat-template boundaries differ is refused instead of silently
producing rows the model never sees at inference.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ragen.config import AgentProxyConfig

__all__ = ["ContextManager", "Dialogue", "PREFILL"]

PREFILL = "<answer>"
_SENTINEL = "@@RAGEN_ASSISTANT_SENTINEL@@"
# content of an answer tag that contains no further opening tag (so "<answer><answer>x</answer>" -> "x")
_ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)


@dataclass
class Dialogue:
    """One row under construction (one trajectory)."""

    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    # per turn: (start, end) of the generated ids in the row (end exclusive; start == end if nothing generated)
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    # per turn: index of the token that carries the turn's score (its last generated token)
    turn_reward_pos: list[int] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


class ContextManager:
    """Builds and parses the chat of the agent proxy."""

    def __init__(self, proxy: AgentProxyConfig, tokenizer: Any, check_template: bool = True):
        """``proxy``: the run's ``agent_proxy`` section (turns, action separator, think / prefill)."""
        if not isinstance(proxy, AgentProxyConfig):
            raise TypeError(f"ContextManager takes the agent_proxy section (ragen.config.AgentProxyConfig), got "
                            f"{type(proxy).__name__}: pass run.agent_proxy")
        self.tokenizer = tokenizer
        self.max_turn = proxy.max_turn
        self.action_sep = proxy.action_sep
        self.max_actions_per_turn = proxy.max_actions_per_turn
        self.enable_think = proxy.enable_think
        self.prefill_answer = proxy.prefill_answer
        self.prefill = PREFILL if self.prefill_answer else ""
        self.eot_token, self.eot_id = self._end_of_turn(tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.eot_id
        if check_template:
            self._check_template_boundaries()

    # ------------------------------------------------------------------ tokenizer helpers
    @staticmethod
    def _end_of_turn(tokenizer: Any) -> tuple[str, int]:
        vocab_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(vocab_id, int) and vocab_id >= 0 and vocab_id != unk:
            return "<|im_end|>", vocab_id
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither <|im_end|> nor an eos token")
        return tokenizer.eos_token, int(tokenizer.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ prompt texts
    def format_hint(self, max_actions: int | None = None) -> str:
        """The answer format; the multi-action sentence only when more than one action fits in a turn."""
        cap = self.max_actions_per_turn if max_actions is None else min(self.max_actions_per_turn, max_actions)
        if self.enable_think:
            hint = "Reply in the format <think>your brief reasoning</think><answer>your action</answer>."
        else:
            hint = "Reply in the format <answer>your action</answer>."
        if cap > 1:
            hint += (f" You may give up to {cap} actions in one answer, separated by "
                     f"\"{self.action_sep}\", for example <answer>A {self.action_sep} B</answer>.")
        return hint

    def system_prompt(self) -> str:
        return ("You are an agent playing a text game. Each turn you read the game state and answer with "
                "your next action(s) in the required format.")

    def format_reminder(self) -> str:
        if self.enable_think:
            return "Reply with <think>...</think><answer>...</answer>."
        return "Reply with <answer>...</answer>."

    def _status(self, turn: int, actions_left: int | None) -> str:
        turns_left = max(0, self.max_turn - turn + 1)
        status = f"Turn {turn} of {self.max_turn} ({turns_left} left including this one)."
        if actions_left is not None:
            status += f" Actions left: {actions_left}."
        return status

    def first_user_message(self, instruction: str, obs: str, actions_left: int | None = None) -> str:
        parts = []
        if instruction:
            parts.append(instruction.strip())
        parts.append(self.format_hint(actions_left))
        parts.append(self._status(1, actions_left))
        parts.append("State:\n" + obs)
        return "\n".join(parts)

    def next_user_message(self, obs: str, reward: float, turn: int, actions_left: int | None = None,
                          format_ok: bool = True, invalid_actions: list[str] | None = None,
                          dropped_actions: list[str] | None = None) -> str:
        feedback = f"Reward: {float(reward):g}."
        if not format_ok:
            feedback += " Your reply had no valid <answer>...</answer>, so no action was taken."
        else:
            if invalid_actions:
                feedback += " Invalid action(s): " + ", ".join(invalid_actions) + "."
            if dropped_actions:
                feedback += (f" More than {self.max_actions_per_turn} action(s): not taken: "
                             + ", ".join(dropped_actions) + ".")
        return "\n".join([feedback, self._status(turn, actions_left), "State:\n" + obs, self.format_reminder()])

    # ------------------------------------------------------------------ token rows
    def start(self, instruction: str, obs: str, actions_left: int | None = None) -> Dialogue:
        """Prompt ids of turn 1 (system + first user message + generation prompt + prefill)."""
        messages = [{"role": "system", "content": self.system_prompt()},
                    {"role": "user", "content": self.first_user_message(instruction, obs, actions_left)}]
        ids = self.encode(self._render(messages, add_generation_prompt=True) + self.prefill)
        return Dialogue(input_ids=ids, loss_mask=[0] * len(ids), messages=messages)

    def user_suffix_text(self, message: str) -> str:
        """What the template puts after an assistant turn's end-of-turn token: the next user turn and the
        generation prompt (e.g. ``\\n<|im_start|>user\\n{message}<|im_end|>\\n<|im_start|>assistant\\n``)."""
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                    {"role": "assistant", "content": _SENTINEL}, {"role": "user", "content": message}]
        text = self._render(messages, add_generation_prompt=True)
        marker = _SENTINEL + self.eot_token
        idx = text.find(marker)
        if idx < 0:
            raise ValueError("the chat template does not close an assistant turn with "
                             f"{self.eot_token!r}; only ChatML-style templates are supported")
        return text[idx + len(marker):]

    def append_response(self, dlg: Dialogue, gen_ids: list[int]) -> tuple[str, int]:
        """Append the generated ids (loss mask 1) and, when missing, a closing end-of-turn (loss mask 0).

        Returns ``(text, n_generated)`` where ``text`` is the generated text without special tokens."""
        gen_ids = [int(t) for t in gen_ids]
        start = len(dlg.input_ids)
        dlg.input_ids.extend(gen_ids)
        dlg.loss_mask.extend([1] * len(gen_ids))
        end = len(dlg.input_ids)
        if not gen_ids or gen_ids[-1] != self.eot_id:
            dlg.input_ids.append(self.eot_id)
            dlg.loss_mask.append(0)
        dlg.turn_spans.append((start, end))
        # the score sits on the last generated token; with nothing generated, on the closing token
        dlg.turn_reward_pos.append(end - 1 if end > start else len(dlg.input_ids) - 1)
        text = self.decode(gen_ids, skip_special_tokens=True)
        dlg.messages.append({"role": "assistant", "content": self.prefill + text})
        return text, len(gen_ids)

    def append_user(self, dlg: Dialogue, message: str) -> None:
        """Append the next user message and the generation prompt (+ prefill), loss mask 0."""
        ids = self.encode(self.user_suffix_text(message) + self.prefill)
        dlg.input_ids.extend(ids)
        dlg.loss_mask.extend([0] * len(ids))
        dlg.messages.append({"role": "user", "content": message})

    def dialogue_text(self, dlg: Dialogue) -> str:
        return self.decode(dlg.input_ids)

    def format_example(self, action: str) -> str:
        """A well-formed reply choosing ``action`` (what follows the prefill when it is on)."""
        full = f"<answer>{action}</answer>"
        return full[len(self.prefill):] if full.startswith(self.prefill) else full

    # ------------------------------------------------------------------ parsing
    def parse_response(self, text: str) -> tuple[list[str], bool]:
        """``(actions, format_ok)`` from a generated reply (which follows the prefill when it is on): every
        action of the answer, also beyond ``max_actions_per_turn`` (the caller takes the first ones and
        penalises the rest: nothing is dropped silently)."""
        full = self.prefill + (text or "")
        match = _ANSWER_RE.search(full)
        if match is None:
            return [], False
        actions = [a.strip() for a in match.group(1).split(self.action_sep)]
        actions = [a for a in actions if a]
        if not actions:
            return [], False
        return actions, True

    # ------------------------------------------------------------------ self-check
    def _check_template_boundaries(self) -> None:
        """Build a 2-turn dialogue incrementally and compare with the template's own tokenization."""
        answer = "<answer>Left</answer>"
        if self.prefill:
            reply = answer[len(self.prefill):]
        else:
            reply = ("<think>go</think>" if self.enable_think else "") + answer
        dlg = self.start("Instruction line.", "state one", actions_left=3)
        self.append_response(dlg, self.encode(reply) + [self.eot_id])
        second = self.next_user_message("state two", 0.0, 2, actions_left=2)
        self.append_user(dlg, second)
        messages = dlg.messages
        expected = self.encode(self._render(messages, add_generation_prompt=True) + self.prefill)
        if expected != dlg.input_ids:
            raise ValueError("incremental token rows do not match the chat template's tokenization at the "
                             "turn boundaries; this tokenizer/template is not supported by the agent proxy")
