"""morphkit batch: many jobs, one model load, failures reported, reruns skipped, split across processes."""

import json
import os
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app
from morphkit.batch import read_jobs
from morphkit.errors import InputError
from tests.conftest import REPO, make_photo

FAST = ["--model", "tiny", "--steps", "4", "--lora-steps", "3", "--frames", "3", "-q"]


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def write_jobs(path, jobs):
    path.write_text("\n".join(json.dumps(job) for job in jobs) + "\n")
    return path


@pytest.fixture
def images(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return make_photo(tmp_path / "a.png", seed=1), make_photo(tmp_path / "b.png", seed=2)


def test_job_lines_folders_and_defaults(tmp_path, images):
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", [
        {"images": ["a.png", "b.png"], "frames": 5, "output-dir": "out/ab"},
        {"command": "stylize", "images": "a.png", "strength": 0.3},
        {"images": ["a.png"]},
        {"images": ["a.png", "b.png"], "framez": 3},
    ]), {"frames": 7, "strength": 0.9, "model": "tiny"}, tmp_path / "root")
    ab, style, single, typo = jobs
    assert ab.images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]  # relative to the job file
    assert ab.options == {"frames": 5, "model": "tiny", "output_dir": str(tmp_path / "out" / "ab")}
    assert style.options["strength"] == 0.3 and "frames" not in style.options  # a default only where it applies
    assert style.options["output_dir"] == str(tmp_path / "root" / "a")
    assert "two or more images" in single.error and "unknown morph settings: framez" in typo.error
    assert ab.name == "ab" or ab.name == "a-b"
    assert len({job.name for job in jobs}) == 4  # repeated names get -2, -3, ...

    # settings and inputs are checked as the jobs are read, before any model loads
    checked = read_jobs(write_jobs(tmp_path / "checked.jsonl", [
        {"images": ["a.png", "gone.png"]},
        {"images": ["a.png", "b.png"], "pacing": "wobbly"},
        {"command": "stylize", "images": ["a.png"], "strength": 7},
        {"images": ["a.png", "b.png"]},
    ]), {"model": "tiny"})
    assert [job.error is None for job in checked] == [False, False, False, True]
    assert "gone.png" in checked[0].error and "--pacing" in checked[1].error and "--strength" in checked[2].error

    folder = tmp_path / "pairs"
    (folder / "chain").mkdir(parents=True)
    for name in ("x1.png", "x2.png", "chain/k1.png", "chain/k2.png", "chain/k3.png"):
        make_photo(folder / name)
    found = {job.name: len(job.images) for job in read_jobs(folder)}
    assert found == {"chain": 3, "x1-x2": 2}
    make_photo(folder / "x3.png")
    with pytest.raises(InputError, match="odd number"):
        read_jobs(folder)


def test_bad_settings_fail_their_jobs_as_they_are_read_and_the_others_run(tmp_path, images, monkeypatch):
    from morphkit import train

    def no_fit(*args, **kwargs):
        raise AssertionError("a job with a bad setting got as far as fitting")

    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"images": ["a.png", "b.png"]}, {"images": ["b.png", "a.png"]}])
    monkeypatch.setattr(train, "fit_loras", no_fit)
    done = run_cli("batch", jobs, "-o", tmp_path / "out", *FAST, "--pacing", "wobbly")  # a bad default: every job
    assert done.exit_code == 1 and "Traceback" not in done.output
    report = json.loads((tmp_path / "out" / "batch_report.json").read_text())
    assert report["failed"] == 2 and all("--pacing" in job["error"] for job in report["jobs"])
    monkeypatch.undo()

    # a value of the wrong type fails its own job, in the user's words; the good job beside it runs
    jobs = write_jobs(tmp_path / "mixed.jsonl", [{"images": ["a.png", "b.png"], "name": "good"},
                                                 {"command": "stylize", "images": ["a.png"], "guidance": "7"}])
    done = run_cli("batch", jobs, "-o", tmp_path / "mixed", *FAST)
    assert done.exit_code == 1 and "Traceback" not in done.output
    report = {job["name"]: job for job in json.loads((tmp_path / "mixed" / "batch_report.json").read_text())["jobs"]}
    assert report["good"]["status"] == "done", report
    assert [j["error"] for n, j in report.items() if n != "good"][0].startswith("--guidance must be")


def test_a_batch_with_a_corrupt_image_reports_it_and_a_rerun_does_nothing_new(tmp_path, images, monkeypatch):
    from morphkit import train

    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"images": ["a.png", "b.png"], "name": "ab"},
        {"command": "stylize", "images": ["b.png"], "name": "style"},
        {"images": ["a.png", "corrupt.png"], "name": "broken"},
    ])
    out = tmp_path / "out"
    first = run_cli("batch", jobs, "-o", out, *FAST)
    assert first.exit_code == 1, first.output
    report = json.loads((out / "batch_report.json").read_text())
    status = {job["name"]: job for job in report["jobs"]}
    assert (report["done"], report["failed"]) == (2, 1)
    assert "corrupt.png" in status["broken"]["error"] and status["broken"]["outputs"] == {}
    assert set(status["ab"]["outputs"]) == {"gif", "mp4", "png"} and (out / "ab" / "morph.gif").is_file()
    assert (out / "style" / "b.png").is_file() and "stylize" in status["style"]["timings"]
    assert "broken" in first.output and "2 done, 0 skipped, 1 failed" in first.output
    stamps = {p: p.stat().st_mtime_ns for p in (out / "ab").rglob("*") if p.is_file()}
    stamps.update({p: p.stat().st_mtime_ns for p in (out / "style").iterdir()})

    def no_fitting(*args, **kwargs):
        raise AssertionError("a rerun fits nothing")

    monkeypatch.setattr(train, "fit_lora", no_fitting)
    monkeypatch.setattr(train, "fit_loras", no_fitting)
    again = run_cli("batch", jobs, "-o", out, *FAST)
    assert again.exit_code == 1 and "0 done, 2 skipped, 1 failed" in again.output, again.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing written again


def test_accelerate_launch_splits_the_jobs_across_two_processes(tmp_path, images):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"command": "stylize", "images": ["a.png"], "name": "one"},
        {"command": "stylize", "images": ["b.png"], "name": "two"},
        {"command": "stylize", "images": ["a.png"], "name": "three", "seed": 1},
    ])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(port), "-m", "morphkit", "batch", str(jobs), "-o", str(tmp_path / "out"), "--steps", "4",
              "--model", "tiny", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "out" / "batch_report.json").read_text())
    assert report["processes"] == 2 and [job["name"] for job in report["jobs"]] == ["one", "two", "three"]
    assert all(job["status"] == "done" for job in report["jobs"])
    assert {job["rank"] for job in report["jobs"]} == {0, 1}  # really split: two processes ran jobs
    assert done.stdout.count("3 jobs in") == 1  # one summary, from the main process
