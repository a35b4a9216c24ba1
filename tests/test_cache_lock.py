"""A cache shared by processes: two processes that need the same LoRAs or inversions at once make each once."""

import multiprocessing

import numpy as np
import pytest
import torch

from tests.conftest import make_photo

RUNS = {  # with LoRAs (each fitted once), and tuning-free (no LoRA, so both processes reach the inversion at once)
    "loras": (dict(steps=4, lora_steps=30, inversion="ddim"), ("lora_a", "lora_b")),
    "inversions": (dict(steps=20, tuning_free=True), ("inversion_a", "inversion_b")),
}


def prepare_in_a_process(images, cache_dir, options, out_queue):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    from morphkit.morph import MorphSettings, prepare_pair

    settings = MorphSettings(model="tiny", prompt="a photo", device="cpu", formats=(), cache_dir=cache_dir, **options)
    prepared = prepare_pair(*images, settings, progress=False)
    out_queue.put((prepared.hits, [n.numpy().copy() for n in prepared.noises]))  # not tensors: torch shares a
    # tensor put on a queue through memory that this process frees when it ends


@pytest.mark.parametrize("run", sorted(RUNS))
def test_two_processes_needing_the_same_entries_make_each_once(tmp_path, run):
    options, entries = RUNS[run]
    images = [str(make_photo(tmp_path / "a.png", seed=1)), str(make_photo(tmp_path / "b.png", seed=2))]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=prepare_in_a_process, args=(images, str(tmp_path / "cache"), options, queue))
                 for _ in range(2)]
    for p in processes:
        p.start()
    results = [queue.get(timeout=600) for _ in processes]
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    for entry in entries:  # one process made each entry; the other waited for it and read it
        assert sorted(hits[entry] for hits, _ in results) == [False, True], (entry, [hits for hits, _ in results])
    (_, first), (_, second) = results
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    kind = "lora" if run == "loras" else "inversion"
    assert len(list((tmp_path / "cache" / kind).glob("*.safetensors"))) == 2
