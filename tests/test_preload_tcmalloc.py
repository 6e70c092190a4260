"""The entry points' allocator switch (preload_tcmalloc.py): the choice, the environment it builds, the relaunch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

import preload_tcmalloc as pt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = (
    "import preload_tcmalloc as pt\n"
    "pt.relaunch_with_tcmalloc()\n"
    "print('mapped' if any(pt.LIBRARY in line for line in open('/proc/self/maps')) else 'not-mapped')\n"
)


def test_bad_choice_names_the_variable_and_the_choices():
    with pytest.raises(SystemExit, match=r"RAGEN_ALLOCATOR='jemalloc' is not one of auto, tcmalloc, system"):
        pt.chosen_allocator({"RAGEN_ALLOCATOR": "jemalloc"})


def test_system_and_already_preloaded_leave_the_environment_alone(monkeypatch):
    monkeypatch.setattr(pt, "tcmalloc_library", lambda: "libtcmalloc_minimal.so.4")
    env = {"RAGEN_ALLOCATOR": "system", "LD_PRELOAD": "libfoo.so"}
    assert pt.with_tcmalloc(env) == env
    env = {"LD_PRELOAD": "/x/libtcmalloc_minimal.so.4"}
    assert pt.with_tcmalloc(env) == env


def test_auto_adds_tcmalloc_in_front_of_an_existing_preload(monkeypatch):
    monkeypatch.setattr(pt, "tcmalloc_library", lambda: "libtcmalloc_minimal.so.4")
    assert pt.with_tcmalloc({})["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    assert pt.with_tcmalloc({"LD_PRELOAD": "libfoo.so"})["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libfoo.so"


def test_missing_library_is_fine_for_auto_and_an_error_for_tcmalloc(monkeypatch):
    monkeypatch.setattr(pt, "tcmalloc_library", lambda: None)
    assert pt.with_tcmalloc({"PATH": "/bin"}) == {"PATH": "/bin"}
    with pytest.raises(SystemExit, match="libtcmalloc-minimal4"):
        pt.with_tcmalloc({"RAGEN_ALLOCATOR": "tcmalloc"})


def _probe(allocator: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(RAGEN_ALLOCATOR=allocator, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(pt.tcmalloc_library() is None, reason="libtcmalloc-minimal4 not installed (scripts/setup.sh)")
def test_relaunch_runs_the_process_under_tcmalloc_once():
    assert _probe("auto", "trainer.device=cpu") == "mapped"  # cpu: the same on a machine with a GPU
    assert _probe("system", "trainer.device=cpu") == "not-mapped"


# ------------------------------------------------------------------------------------- CPU run or GPU run
@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(pt, "GPU_DEVICE_GLOBS", (str(tmp_path / "nvidia[0-9]*"),))
    return tmp_path


@pytest.fixture
def gpu(no_gpu):
    (no_gpu / "nvidia0").touch()
    return no_gpu


@pytest.mark.parametrize("argv", [
    [],
    ["--config-name", "archer"],
    ["--config-name", "archer_verl", "trainer.device=cpu", "trainer.n_gpus_per_node=2"],
    ["actor_rollout_ref.rollout.name=vllm"],  # the local backend's vLLM-CPU server
    ["trainer.device=cuda", "trainer.device=cpu"],  # Hydra: the last one wins
])
def test_cpu_runs_are_preloaded(no_gpu, argv):
    assert pt.gpu_run(argv, {}) is None
    want, why = pt.wants_tcmalloc(argv, {})
    assert want and why.startswith("CPU run (trainer.device=")


@pytest.mark.parametrize("argv, why", [
    (["trainer.device=cuda"], "trainer.device=cuda"),
    (["++trainer.device='CUDA'"], "trainer.device=cuda"),
    (["--config-name", "archer_verl", "trainer.backend=verl", "actor_rollout_ref.rollout.name=sglang",
      "trainer.device=cpu"], "trainer.backend=verl with actor_rollout_ref.rollout.name=sglang"),
    (["--set", "trainer.device=cuda"], "trainer.device=cuda"),  # run_archer_example.py's overrides
])
def test_gpu_runs_are_not_preloaded(no_gpu, argv, why):
    assert pt.gpu_run(argv, {}) == why
    want, reason = pt.wants_tcmalloc(argv, {})
    assert not want and why in reason and "RAGEN_ALLOCATOR=tcmalloc forces it" in reason


def test_auto_device_follows_the_visible_gpus(gpu):
    assert pt.gpu_run([], {}) == "trainer.device=auto with a GPU visible"
    assert pt.gpu_run(["trainer.device=auto"], {"CUDA_VISIBLE_DEVICES": "0,1"}) is not None
    assert pt.gpu_run([], {"CUDA_VISIBLE_DEVICES": ""}) is None  # torch sees no GPU either
    assert pt.gpu_run([], {"CUDA_VISIBLE_DEVICES": "-1"}) is None
    assert pt.gpu_run(["trainer.device=cpu"], {}) is None


def test_the_allocator_variable_overrides_the_device_rule(gpu):
    assert pt.wants_tcmalloc([], {"RAGEN_ALLOCATOR": "system"}) == (False, "RAGEN_ALLOCATOR=system")
    want, why = pt.wants_tcmalloc([], {"RAGEN_ALLOCATOR": "tcmalloc"})
    assert want and why == "RAGEN_ALLOCATOR=tcmalloc, forced on a GPU run (trainer.device=auto with a GPU visible; " \
                           "untested there)"


def test_relaunch_logs_the_allocator_and_why_without_reexecuting(no_gpu, monkeypatch, capsys):
    def no_exec(*args):
        raise AssertionError(f"unexpected relaunch {args}")

    monkeypatch.setattr(pt.os, "execve", no_exec)
    monkeypatch.delenv("RAGEN_ALLOCATOR", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    line = pt.relaunch_with_tcmalloc(["trainer.device=cuda"])
    assert line.startswith("allocator: glibc malloc (GPU run (trainer.device=cuda)")
    assert capsys.readouterr().err == line + "\n"
    monkeypatch.setenv("LD_PRELOAD", "/x/libtcmalloc_minimal.so.4")  # set before the script: it stays
    assert pt.relaunch_with_tcmalloc(["trainer.device=cuda"]).startswith(
        "allocator: tcmalloc (LD_PRELOAD was set before this script; it would not preload: GPU run")
    assert pt.relaunch_with_tcmalloc([]).startswith("allocator: tcmalloc (CPU run (trainer.device=auto, no GPU")
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setattr(pt, "tcmalloc_library", lambda: None)
    assert "not installed: apt-get install -y libtcmalloc-minimal4" in pt.relaunch_with_tcmalloc([])


@pytest.mark.skipif(pt.tcmalloc_library() is None, reason="libtcmalloc-minimal4 not installed (scripts/setup.sh)")
def test_a_gpu_command_line_is_not_relaunched():
    assert _probe("auto", "trainer.device=cuda") == "not-mapped"


# ------------------------------------------------------------------------- what inherits the preload
RAY_PROBE = textwrap.dedent('''
    import json, os, sys
    import preload_tcmalloc as pt
    pt.relaunch_with_tcmalloc()
    import ray

    def libs(pid="self"):
        with open(f"/proc/{pid}/maps") as fh:
            return sorted({line.split()[-1] for line in fh if "malloc" in line and ".so" in line})

    @ray.remote
    def work():
        import torch
        torch.manual_seed(0)
        layer = torch.nn.Linear(32, 8)
        loss = layer(torch.randn(64, 32)).square().mean()
        loss.backward()
        return {"libs": libs(), "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""),
                "grad": float(layer.weight.grad.abs().sum()), "pid": os.getpid()}

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _temp_dir=sys.argv[1])
    try:
        worker = ray.get(work.remote(), timeout=120)
        parents = {}  # this process' descendants: Ray's GCS, raylet and the worker
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    parents[int(pid)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
        mine, grew = {os.getpid()}, True
        while grew:
            found = {pid for pid, parent in parents.items() if parent in mine} - mine
            mine |= found
            grew = bool(found)
        ray_procs = {}
        for pid in mine - {os.getpid()}:
            try:
                name = os.path.basename(open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")[0].decode())
                if name in ("gcs_server", "raylet"):
                    ray_procs[name] = libs(pid)
            except OSError:
                pass
        print("RESULT " + json.dumps({"driver": libs(), "worker": worker, "ray": ray_procs}))
    finally:
        ray.shutdown()
''')


@pytest.mark.slow
@pytest.mark.skipif(pt.tcmalloc_library() is None, reason="libtcmalloc-minimal4 not installed (scripts/setup.sh)")
def test_ray_processes_and_workers_started_under_the_preload_have_tcmalloc_and_run_torch():
    """What veRL's trainer on trainer.device=cpu starts (its FSDP workers and rollout servers are Ray workers)."""
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # socket paths must stay under 108 characters
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "RAY_ADDRESS")}
        env.update(RAGEN_ALLOCATOR="auto", PYTHONPATH=ROOT, RAY_AUTH_MODE="disabled")
        out = subprocess.run([sys.executable, "-c", RAY_PROBE, ray_tmp, "trainer.device=cpu"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "allocator: tcmalloc (CPU run" in out.stderr
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    worker = result["worker"]
    assert pt.LIBRARY in worker["LD_PRELOAD"]
    assert any(pt.LIBRARY in lib for lib in worker["libs"]), worker
    assert worker["grad"] > 0 and worker["grad"] == worker["grad"]  # the backward ran, finite
    # Ray's own processes take it too, in place of the jemalloc Ray preloads into them otherwise
    assert sorted(result["ray"]) == ["gcs_server", "raylet"], result
    for name, libs in result["ray"].items():
        assert any(pt.LIBRARY in lib for lib in libs) and not any("jemalloc" in lib for lib in libs), (name, libs)


STAND_IN_SERVER = textwrap.dedent('''
    import json, sys
    mapped = any("tcmalloc_minimal" in line for line in open("/proc/self/maps"))
    print(json.dumps({"ready": 0.0, "vllm": "mapped" if mapped else "not-mapped", "max_model_len": 8}), flush=True)
    for line in sys.stdin:
        if json.loads(line)["op"] == "quit":
            break
''')


@pytest.mark.skipif(pt.tcmalloc_library() is None, reason="libtcmalloc-minimal4 not installed (scripts/setup.sh)")
def test_the_vllm_cpu_server_process_inherits_the_preload(tmp_path, monkeypatch):
    """VllmCpuEngine keeps LD_PRELOAD in its server's environment (a stand-in server reports its own maps)."""
    from ragen.workers import vllm_cpu

    script = tmp_path / "server.py"
    script.write_text(STAND_IN_SERVER)
    monkeypatch.setattr(vllm_cpu, "SERVER", script)
    for preload, expected in ((pt.tcmalloc_library(), "mapped"), ("", "not-mapped")):
        monkeypatch.setenv("LD_PRELOAD", preload)
        engine = vllm_cpu.VllmCpuEngine(sys.executable, "model-dir", threads=1)
        try:
            engine.start()
            assert engine.version == expected
        finally:
            engine.close()
