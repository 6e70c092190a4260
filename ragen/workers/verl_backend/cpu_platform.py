"""veRL's worker groups on CPU processes: a CPU platform for veRL and the few work-arounds it needs.

veRL 0.9.1 picks its device through a platform registry (``verl/plugin/platform``): ``VERL_PLATFORM`` names the
platform, ``VERL_USE_EXTERNAL_MODULES`` names modules every process imports with ``import verl``
(``verl/__init__.py:49-52``).  :func:`activate` registers :class:`PlatformCPU` here (the driver) and sets both
variables in the Ray job's environment, so that each worker imports this module and gets the same platform;
``VERL_ENGINE_DEVICE=cuda`` lets veRL's engine registry hand out its FSDP engines, which are registered for
cuda/npu only (``verl/workers/engine/base.py:405``, ``verl/workers/engine/fsdp/transformer_impl.py:1143,1594``)
while every tensor stays on the CPU.  The platform reports Ray's ``GPU`` resource, so veRL's resource pools,
which always ask for GPUs (``verl/single_controller/ray/base.py:208-212``), schedule on the logical GPUs
``ray_kwargs.ray_init.num_gpus`` declares (ragen/verl_plugin/launch.py).

:func:`apply_workarounds` patches three places of veRL 0.9.1 that cannot run on a CPU whatever the platform
says; it runs only in a process whose platform is this one.  Each names the veRL file:line it works around, and
``tests/test_verl_cpu.py`` fails as soon as veRL changes one of those places, so the patch can be dropped.
"""
from __future__ import annotations

import contextlib
import functools
import os
from types import SimpleNamespace
from typing import Any

import psutil
import torch

PLATFORM_NAME = "cpu"
ENV_VARS = {
    "VERL_PLATFORM": PLATFORM_NAME,
    "VERL_USE_EXTERNAL_MODULES": __name__,
    "VERL_ENGINE_DEVICE": "cuda",  # the key veRL registered its FSDP engines under
}


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def _host_memory(*args: Any, **kwargs: Any) -> tuple[int, int]:
    memory = psutil.virtual_memory()
    return memory.available, memory.total


# torch.<device>-like namespace: what veRL calls on get_torch_device(), answered for host memory and the CPU RNG
CPU_DEVICE_MODULE = SimpleNamespace(
    is_available=lambda: True,
    device_count=lambda: 1,
    current_device=lambda: PLATFORM_NAME,
    set_device=_noop,
    synchronize=_noop,
    empty_cache=_noop,
    ipc_collect=_noop,
    reset_peak_memory_stats=_noop,
    set_per_process_memory_fraction=_noop,
    memory_allocated=_zero,
    memory_reserved=_zero,
    max_memory_allocated=_zero,
    max_memory_reserved=_zero,
    mem_get_info=_host_memory,
    manual_seed=torch.manual_seed,
    manual_seed_all=torch.manual_seed,
    get_rng_state=lambda *args, **kwargs: torch.get_rng_state(),
    set_rng_state=lambda state, *args, **kwargs: torch.set_rng_state(state),
    get_device_name=lambda *args, **kwargs: "CPU",  # verl/utils/flops_counter.py:80-85 looks it up as a string
    current_stream=torch.cpu.current_stream,
    stream=torch.cpu.stream,
    Stream=torch.cpu.Stream,
    Event=torch.cpu.Event,
)


def _platform_base():
    from verl.plugin.platform import PlatformBase

    return PlatformBase


class PlatformCPU(_platform_base()):
    """veRL platform of CPU worker processes: gloo collectives, Ray's ``GPU`` resource as logical devices."""

    @property
    def device_name(self) -> str:
        return PLATFORM_NAME

    @property
    def vendor_name(self) -> str:
        return PLATFORM_NAME

    @property
    def device_module(self) -> Any:
        return CPU_DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return False  # never auto-detected: only VERL_PLATFORM=cpu selects it

    def current_device(self) -> str:
        return PLATFORM_NAME  # veRL moves tensors with .to(current_device()); an int would mean cuda:N

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"  # what Ray sets for the logical GPUs; nothing reads it on a CPU

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def register() -> type:
    """Register :class:`PlatformCPU` as veRL platform ``cpu`` (idempotent)."""
    from verl.plugin.platform import PlatformRegistry

    if PlatformRegistry.get(PLATFORM_NAME) is not PlatformCPU:
        PlatformRegistry.register(platform=PLATFORM_NAME)(PlatformCPU)
    return PlatformCPU


def is_active() -> bool:
    """Whether this process runs veRL on the CPU platform."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME


def activate() -> dict[str, str]:
    """Make this process (the driver) use the CPU platform and return the environment the workers need.

    Sets the variables of :data:`ENV_VARS` here and replaces veRL's platform singleton (it may already have been
    resolved to the CUDA fallback by an earlier import).  The driver builds no engine: the work-arounds are
    applied in the workers only.
    """
    from verl.plugin.platform import get_platform, set_platform

    register()
    modules = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    # first: a module listed before it may ask veRL for the platform while it is imported
    os.environ.update({**ENV_VARS, "VERL_USE_EXTERNAL_MODULES": ",".join(dict.fromkeys([__name__, *modules]))})
    if not isinstance(get_platform(), PlatformCPU):
        set_platform(PlatformCPU())
    return dict(ENV_VARS)


# ------------------------------------------------------------------------------------------------ work-arounds
_APPLIED: set[str] = set()


def _gloo_process_group() -> None:
    """veRL's training worker starts its process group with the backend ``f"cpu:gloo,{device}:{collective}"``
    (``verl/workers/engine_workers.py:89`` -> ``verl/utils/distributed.py:89``), which on the CPU platform reads
    ``cpu:gloo,cpu:gloo`` and torch refuses it (a device named twice): start it with plain gloo."""
    from verl.utils import distributed
    from verl.workers import engine_workers

    engine_workers.initialize_global_process_group_ray = functools.partial(
        distributed.initialize_global_process_group_ray, backend="gloo")


def sdpa_value_model() -> None:
    """veRL loads the critic's value model with ``attn_implementation="flash_attention_2"`` hard-coded
    (``verl/utils/model.py:641-649``, ignoring ``override_config.attn_implementation``); FlashAttention 2 needs
    CUDA and the flash_attn package.  Load it the same way with the attention the model config asks for (sdpa).
    Also applied on GPUs where flash_attn does not import (the veRL plugin, ragen/verl_plugin/__init__.py)."""
    from verl.utils import model as verl_model

    def load_value_model(local_path, torch_dtype, model_config, trust_remote_code):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(
            pretrained_model_name_or_path=local_path, torch_dtype=torch_dtype, config=model_config,
            attn_implementation=getattr(model_config, "_attn_implementation", None) or "sdpa",
            trust_remote_code=trust_remote_code)

    verl_model.load_valuehead_model = load_value_model


def _no_offload_for_frozen_models() -> None:
    """FSDP2 gives every forward-only model (the reference) ``CPUOffloadPolicy(pin_memory=True)``
    (``verl/workers/engine/fsdp/transformer_impl.py:459-462``); pinning host memory needs an accelerator.  On a
    CPU the parameters already live in host memory: no offload policy."""
    from torch.distributed.fsdp import OffloadPolicy
    from verl.workers.engine.fsdp import transformer_impl

    transformer_impl.CPUOffloadPolicy = lambda **kwargs: OffloadPolicy()


WORKAROUNDS = {
    "gloo_process_group": _gloo_process_group,
    "sdpa_value_model": sdpa_value_model,
    "no_offload_for_frozen_models": _no_offload_for_frozen_models,
}


def apply_workarounds() -> None:
    """Apply each work-around once, in a process that runs the CPU platform."""
    if not is_active():
        raise RuntimeError("the CPU work-arounds of veRL apply only with VERL_PLATFORM=cpu")
    for name, patch in WORKAROUNDS.items():
        if name not in _APPLIED:
            patch()
            _APPLIED.add(name)


# A worker process imports this module through VERL_USE_EXTERNAL_MODULES while `import verl` runs: register the
# platform before anything asks veRL for it, then patch (the patched modules import verl's own, already loaded).
register()
if is_active():
    apply_workarounds()
