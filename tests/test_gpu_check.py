"""benchmarks/gpu_check.py, rehearsed on the CPU: a GPU session has minutes, and the check must not fail it."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def gpu_check(*args, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_the_dry_run_runs_every_part_and_brings_back_its_files(tmp_path):
    done = gpu_check(out=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [(p["name"], p["status"]) for p in report["parts"]] == [
        ("cuda tests", "passed"), ("sd15 512 bf16", "passed"), ("sdxl 1024 bf16", "passed")]
    assert report["threads"] >= 1 and "cpu_flags" in report
    # what a device call brings back: at most 8 files, each model's rows among them
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) <= 8 and {"tiny-cpu-fp32.json", "tiny-cpu.json"} <= set(names)
    assert not [n for n in names if n.endswith(".part")]  # every file replaced whole
    rows = json.loads((tmp_path / "tiny-cpu-fp32.json").read_text())["seconds"]
    assert rows["reference: whole morph"] > 0 and rows["speed-up (reference / morphkit)"] > 0
    assert rows["speed-up (reference / morphkit defaults)"] > 0
    defaults_only = json.loads((tmp_path / "tiny-cpu.json").read_text())["seconds"]
    assert "morphkit: whole morph" not in defaults_only and "reference: whole morph" not in defaults_only


def test_a_budget_too_small_skips_the_parts_and_says_so(tmp_path):
    done = gpu_check("--budget", "1", out=tmp_path)
    assert done.returncode == 1
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert all(p["status"].startswith("skipped: ") for p in report["parts"]), report["parts"]
    assert "skipped" in (tmp_path / "gpu-check.md").read_text()
