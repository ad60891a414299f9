"""What the node reads of a real NVIDIA GPU, and what it decides from it: a check for a machine
with one (CI has none, so the tests cover the decisions with plain values only).

It samples the GPU through the node's own NVML reader (`governor.gpus.Nvml`) while idle, while
another process (the owner's, as far as the node knows) computes on it, and with that same process
counted as one of our runners; it turns each sample into the heartbeat's typed record
(`protocol.swarm.GpuRecord`), and asks the share policy what the owner's use means. The load is
a PyTorch matrix-product loop holding 4 GiB, started here as a child process.

    python -m bench.gpu_readings [--out bench/results/gpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dragonswarm.governor.gpus import GpuSample, Nvml
from dragonswarm.governor.policy import GpuPolicy, gpu_budget, owner_on_gpu
from dragonswarm.protocol.swarm import GpuRecord

LOAD = """
import sys, time, torch
hold = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")  # 4 GiB held, as a game's textures
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    a @ a
    torch.cuda.synchronize()
"""


def reading(nvml: Nvml, ours: set[int], label: str, policy: GpuPolicy) -> dict[str, Any]:
    samples: list[GpuSample] = []
    for _ in range(4):  # per-process utilisation is read since the last reading: let one window pass
        time.sleep(0.5)
        samples = nvml.sample(ours)
    s = samples[0]
    record = GpuRecord.model_validate(dataclasses.asdict(s))  # what a heartbeat carries
    return {
        "phase": label,
        "record": record.model_dump(),
        "owner_on_gpu": owner_on_gpu(s.owner_util, policy),
        "budget_at_share_0.5_GiB": round(gpu_budget(s.mem_total, s.mem_used, s.ours_mem, 0.5, policy) / 2**30, 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/gpu")
    args = ap.parse_args(argv)
    nvml = Nvml.open()
    if nvml is None:
        sys.exit("gpu_readings: no NVIDIA GPU readable through NVML here (nvidia-ml-py and a driver are needed)")
    policy = GpuPolicy()
    rows = [reading(nvml, set(), "idle", policy)]
    load = subprocess.Popen([sys.executable, "-c", LOAD, "20"], stdout=subprocess.PIPE, text=True)
    try:
        assert load.stdout is not None and load.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        rows.append(reading(nvml, set(), "another process computing (the owner)", policy))
        rows.append(reading(nvml, {load.pid}, "the same process counted as our runner", policy))
    finally:
        load.kill()
        load.wait()
    nvml.close()
    checks = {
        "the owner's process is seen with its memory": rows[1]["record"]["owner_mem"] >= 4 << 30,
        "the owner at work is owner activity": rows[1]["owner_on_gpu"] is True,
        "our runner's memory is counted as ours": rows[2]["record"]["ours_mem"] >= 4 << 30,
        "our runner's use is not the owner's": rows[2]["owner_on_gpu"] is False,
        "an idle card is not owner activity": rows[0]["owner_on_gpu"] is False,
    }
    result = {"machine": platform.node(), "python": platform.python_version(), "readings": rows, "checks": checks}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["# What the node reads of a real GPU", "",
             f"`python -m bench.gpu_readings` on {rows[0]['record']['name']} (Python {result['python']}). "
             "A PyTorch matrix-product loop holding 4 GiB plays the owner, then our runner.", "",
             "| phase | util | memory used / total (GiB) | ours / owner's (GiB) | owner's util | owner busy | "
             "budget at share 0.5 (GiB) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        g = r["record"]
        lines.append(f"| {r['phase']} | {g['util']:.2f} | {g['mem_used'] / 2**30:.1f} / {g['mem_total'] / 2**30:.1f} | "
                     f"{g['ours_mem'] / 2**30:.1f} / {g['owner_mem'] / 2**30:.1f} | {g['owner_util']} | "
                     f"{r['owner_on_gpu']} | {r['budget_at_share_0.5_GiB']} |")  # fmt: skip
    lines += ["", *(f"- {'ok' if ok else 'FAILED'}: {what}" for what, ok in checks.items())]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
