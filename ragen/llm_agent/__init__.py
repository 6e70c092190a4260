"""Multi-turn rollouts: env state manager, chat/context manager and the agent proxy."""
from .agent_proxy import AgentProxy, build_batch, left_pad
from .ctx_manager import PREFILL, ContextManager, Dialogue
from .es_manager import EnvState, EnvStateManager

__all__ = ["AgentProxy", "ContextManager", "Dialogue", "EnvState", "EnvStateManager", "PREFILL",
           "build_batch", "left_pad"]
