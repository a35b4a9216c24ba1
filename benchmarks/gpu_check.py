"""The one-command GPU check: whoever has a CUDA GPU runs this first.

    python benchmarks/gpu_check.py            # about 5-8 minutes on an H100
    python benchmarks/gpu_check.py --quick    # the CUDA tests and the SD 1.5 benchmark only

It runs, each in its own process with a time limit:
1. the test suite's CUDA-marked tests (`pytest -m cuda`: fp16/bf16 morphs with exact fp32 ends, the GPU against
   the CPU with the attention store on the device, LoRA fitting in half precision);
2. the full-size SD 1.5 benchmark at 512 px in bf16 (`bench_morph.py --size sd15 --dtype bf16`: every stage with
   its peak GPU memory, the whole morph against the straightforward reference);
3. full-size SDXL at 1024 px in bf16 (`bench_morph.py --size sdxl --dtype bf16 --no-reference`).
Then it writes benchmarks/results/gpu-check.json and .md (device, versions, each part's status, time and output
tail, and the benchmark tables), and benchmarks/results/summary.json gets `gpu_sd15_512_seconds`.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

PARTS = [  # name, command, time limit in seconds
    ("cuda tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"], 240),
    ("sd15 512 bf16", [sys.executable, "benchmarks/bench_morph.py", "--size", "sd15", "--dtype", "bf16"], 300),
    ("sdxl 1024 bf16", [sys.executable, "benchmarks/bench_morph.py", "--size", "sdxl", "--dtype", "bf16",
                        "--no-reference"], 300),
]


def run_part(name: str, command: list[str], limit: int) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
        status, output = ("passed" if done.returncode == 0 else f"failed (exit {done.returncode})"), done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status, output = f"timed out after {limit} s", (e.stdout or b"").decode(errors="replace") if isinstance(
            e.stdout, bytes) else (e.stdout or "")
    seconds = round(time.perf_counter() - start, 1)
    print(f"[gpu_check] {name}: {status} in {seconds} s", flush=True)
    return {"name": name, "command": " ".join(command[1:]), "status": status, "seconds": seconds,
            "output_tail": output[-4000:]}


def device_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Only the CUDA tests and the SD 1.5 benchmark.")
    args = parser.parse_args()
    info = device_info()
    if "gpu" not in info:
        sys.exit("gpu_check: no CUDA device here. It is for machines with one; on the CPU run the test suite and "
                 "benchmarks/bench_summary.py.")
    parts = [run_part(*part) for part in (PARTS[:2] if args.quick else PARTS)]
    tables = {}
    for stem in ("sd15-cuda-bf16", "sdxl-cuda-bf16"):
        path = RESULTS / f"{stem}.json"
        if path.is_file():
            tables[stem] = json.loads(path.read_text())
    report = {"command": "python benchmarks/gpu_check.py" + (" --quick" if args.quick else ""), "device": info,
              "parts": parts, "benchmarks": tables}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# GPU check", "", f"Command: `{report['command']}`  ", f"Device: {json.dumps(info)}", "",
             "| part | status | seconds |", "|---|---|---:|"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']} |" for p in parts]
    for stem, table in tables.items():
        lines += ["", f"## {stem}", "", "| stage | seconds | peak GPU GiB |", "|---|---:|---:|"]
        memory = table.get("peak_gpu_memory_gib") or {}
        for stage, seconds in table["seconds"].items():
            lines.append(f"| {stage} | {seconds} | {memory.get(stage, '') if isinstance(memory, dict) else ''} |")
    (RESULTS / "gpu-check.md").write_text("\n".join(lines) + "\n")
    sd15 = tables.get("sd15-cuda-bf16", {}).get("seconds", {})
    if "morphkit defaults (attention interpolation, AdaIN, even pacing): whole morph" in sd15:
        summary_path = RESULTS / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        summary["gpu_sd15_512_seconds"] = sd15["morphkit defaults (attention interpolation, AdaIN, even pacing): whole morph"]
        summary["gpu_sd15_512_device"] = info["gpu"]
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    sys.exit(0 if all(p["status"] == "passed" for p in parts) else 1)


if __name__ == "__main__":
    main()
