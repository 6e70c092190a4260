"""veRL's advantage-estimator registry: our ``archer`` and ``bi_level_gae`` adapters, and how a trainer calls any
registered estimator with the inputs veRL's own ``compute_advantage`` does not pass.

veRL's ``compute_advantage`` (verl/trainer/ppo/ray_trainer.py:250-258) hands a custom estimator only
``token_level_rewards``, ``response_mask``, ``config`` (the ``algorithm`` section) and ``index``.  ArCHer also needs
the token critic's ``values`` and the utterance critic's ``turn_q`` / ``turn_v``.  Two ways to supply them:

* a trainer that calls the estimator itself (``AgentTrainer``) passes them as keywords (:func:`run_estimator`);
* a trainer that keeps veRL's own ``compute_advantage`` (the veRL plugin's ``archer`` trainer, so that veRL's KL
  penalty and rollout correction stay veRL's) wraps the call in :func:`critic_inputs`, which the adapters read.

The adapters read every ArCHer setting from ``config``: ``high_level_gamma`` and ``archer.alpha`` (the keys of
``algorithm`` in veRL's config; ``AgentTrainer`` builds the same layout from a ``train.py`` config).  A missing
key is an error naming it: the one default of each key lives in :mod:`ragen.config`.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from verl.trainer.ppo import core_algos as verl_core_algos
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, get_adv_estimator_fn

from ragen.trainer.core_algos import compute_archer_advantage_return, compute_bi_level_gae_advantage_return

__all__ = [
    "MissingValuesError",
    "MissingSettingError",
    "critic_inputs",
    "register_with_verl",
    "run_estimator",
    "check_estimator",
    "estimator_parameters",
    "ESTIMATOR_INPUTS",
]


class MissingValuesError(ValueError):
    """Raised when a critic-based estimator is reached without the critic's values."""


class MissingSettingError(KeyError):
    """Raised when the estimator's config lacks one of its settings (the message names the key)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


_HOW_TO_GET_VALUES = (
    "veRL's compute_advantage does not pass the critic's values to custom estimators. Turn the critic on "
    "(critic.enable=True; config/archer.yaml does) and let ragen's AgentTrainer call the estimator, run veRL's "
    "main_ppo with trainer.v1.trainer_mode=archer (the ragen plugin's trainer supplies them), or call "
    "ragen.trainer.core_algos.{fn}(...) yourself with values=<token critic values [B, T]>."
)

# the tensors a trainer hands the adapters around veRL's compute_advantage (see critic_inputs)
_CRITIC_INPUTS: contextvars.ContextVar[dict[str, torch.Tensor] | None] = contextvars.ContextVar(
    "ragen_critic_inputs", default=None)


@contextlib.contextmanager
def critic_inputs(**tensors: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the adapters take ``values`` / ``turn_q`` / ``turn_v`` from here when their caller
    (veRL's ``compute_advantage``) passes none.  Rows must be in the order of the batch the estimator gets."""
    unknown = set(tensors) - {"values", "turn_q", "turn_v"}
    if unknown:
        raise ValueError(f"critic_inputs: unknown inputs {sorted(unknown)} (allowed: values, turn_q, turn_v)")
    token = _CRITIC_INPUTS.set({k: v for k, v in tensors.items() if v is not None})
    try:
        yield
    finally:
        _CRITIC_INPUTS.reset(token)


def _setting(config: Any, path: str, where: str) -> Any:
    """``config.<path>`` (a dict, DictConfig or veRL's AlgoConfig); a missing key names itself."""
    node = config
    for part in path.split("."):
        value = node.get(part, None) if node is not None and hasattr(node, "get") else None
        if value is None:
            raise MissingSettingError(
                f"adv_estimator {where!r}: algorithm.{path} is missing from the estimator's config. With veRL's "
                f"main_ppo set +algorithm.{path}=... or use trainer.v1.trainer_mode=archer (the ragen plugin fills "
                f"every ArCHer key from ragen's schema); with train.py the run config supplies it.")
        node = value
    return node


def _discounts(config: Any, where: str) -> dict[str, float]:
    return {"gamma": _setting(config, "gamma", where), "lam": _setting(config, "lam", where),
            "high_level_gamma": _setting(config, "high_level_gamma", where)}


def _given(name: str, value: torch.Tensor | None) -> torch.Tensor | None:
    """An explicit keyword wins; else what :func:`critic_inputs` holds."""
    if value is not None:
        return value
    held = _CRITIC_INPUTS.get()
    return held.get(name) if held else None


def _require_values(name: str, values: torch.Tensor | None, fn: str) -> torch.Tensor:
    values = _given("values", values)
    if values is None:
        raise MissingValuesError(
            f"adv_estimator '{name}' was reached without token values. " + _HOW_TO_GET_VALUES.format(fn=fn))
    return values


def _archer_from_verl(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    index: Any = None,
    values: torch.Tensor | None = None,
    turn_q: torch.Tensor | None = None,
    turn_v: torch.Tensor | None = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``archer`` as veRL calls it (keyword arguments of ``compute_advantage``), plus ``values`` and the tables."""
    turn_q, turn_v = _given("turn_q", turn_q), _given("turn_v", turn_v)
    values = _given("values", values)
    if values is None and (turn_q is None or turn_v is None):
        _require_values("archer", values, "compute_archer_advantage_return")
    alpha = _setting(config, "archer.alpha", "archer")
    if values is None:
        if alpha != 0:
            _require_values("archer", values, "compute_archer_advantage_return")
        # pure utterance level: the token values enter neither the advantages nor anything that is trained
        values = torch.zeros_like(token_level_rewards)
    return compute_archer_advantage_return(token_level_rewards, values, response_mask, archer_alpha=alpha,
                                           turn_q=turn_q, turn_v=turn_v, **_discounts(config, "archer"))


def _bi_level_gae_from_verl(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    index: Any = None,
    values: torch.Tensor | None = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``bi_level_gae`` as veRL calls it, plus ``values``."""
    values = _require_values("bi_level_gae", values, "compute_bi_level_gae_advantage_return")
    return compute_bi_level_gae_advantage_return(token_level_rewards, values, response_mask,
                                                 **_discounts(config, "bi_level_gae"))


VERL_ESTIMATORS = {"archer": _archer_from_verl, "bi_level_gae": _bi_level_gae_from_verl}

# What our trainer can hand an estimator (veRL's compute_advantage keywords, plus the critic's values and the
# utterance critic's per-turn tables, plus gamma / lam / norm_adv_by_std_in_grpo for veRL's gae and grpo).
ESTIMATOR_INPUTS = ("token_level_rewards", "response_mask", "config", "index", "values", "turn_q", "turn_v",
                    "gamma", "lam", "norm_adv_by_std_in_grpo")


def estimator_parameters(name: str) -> tuple[set[str], bool]:
    """``(required keyword names, accepts **kwargs)`` of the registered estimator ``name``."""
    params = inspect.signature(get_adv_estimator_fn(name)).parameters.values()
    required = {p.name for p in params
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return required, any(p.kind is p.VAR_KEYWORD for p in params)


def check_estimator(name: str) -> None:
    """``ValueError`` when ``name`` is not registered or needs an input our trainer cannot give."""
    register_with_verl()
    if name not in ADV_ESTIMATOR_REGISTRY:
        raise ValueError(f"algorithm.adv_estimator={name!r} is not in veRL's estimator registry (registered: "
                         f"{', '.join(sorted(ADV_ESTIMATOR_REGISTRY))})")
    missing = estimator_parameters(name)[0] - set(ESTIMATOR_INPUTS)
    if missing:
        raise ValueError(f"algorithm.adv_estimator={name!r} needs {sorted(missing)}, which the agent trainer does not "
                         f"produce (it gives: {', '.join(ESTIMATOR_INPUTS)})")


def run_estimator(name: str, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Call the estimator registered as ``name`` in veRL's registry with the inputs it declares.

    ``inputs`` are keywords from :data:`ESTIMATOR_INPUTS`; an estimator that takes ``**kwargs`` gets them all.
    This is how the trainer reaches every estimator, veRL's ``gae`` / ``grpo``, ours, and any a user registers.
    """
    unknown = set(inputs) - set(ESTIMATOR_INPUTS)
    if unknown:
        raise ValueError(f"run_estimator: unknown inputs {sorted(unknown)}")
    required, takes_all = estimator_parameters(name)
    fn = get_adv_estimator_fn(name)
    names = set(inspect.signature(fn).parameters)
    given = {k: v for k, v in inputs.items() if takes_all or k in names}
    missing = required - set(given)
    if missing:
        raise MissingValuesError(f"adv_estimator '{name}' needs {sorted(missing)}; the critic is off or the "
                                 "trainer did not compute them")
    return fn(**given)


def register_with_verl() -> None:
    """Put ``archer`` and ``bi_level_gae`` in veRL's registry (idempotent: safe to call again)."""
    for name, adapter in VERL_ESTIMATORS.items():
        if verl_core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is not adapter:
            verl_core_algos.register_adv_est(name)(adapter)
