"""A cache shared by processes: two processes that need the same LoRA at once fit it once and share the file."""

import multiprocessing

import numpy as np
import torch

from tests.conftest import make_photo


def prepare_in_a_process(images, cache_dir, out_queue):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    from morphkit.lora import lora_state_dict
    from morphkit.morph import MorphSettings, prepare_pair

    settings = MorphSettings(model="tiny", prompt="a photo", steps=4, lora_steps=30, device="cpu", formats=(),
                             cache_dir=cache_dir, inversion="ddim")
    prepared = prepare_pair(*images, settings, progress=False)
    weights = {k: v.numpy().copy() for k, v in lora_state_dict(prepared.pipe.unet, "img0").items()}  # not tensors:
    # torch shares a tensor put on a queue through memory this process frees when it ends
    out_queue.put((prepared.hits, weights))


def test_two_processes_needing_the_same_loras_fit_them_once(tmp_path):
    images = [str(make_photo(tmp_path / "a.png", seed=1)), str(make_photo(tmp_path / "b.png", seed=2))]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=prepare_in_a_process, args=(images, str(tmp_path / "cache"), queue))
                 for _ in range(2)]
    for p in processes:
        p.start()
    results = [queue.get(timeout=600) for _ in processes]
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    for side in ("lora_a", "lora_b"):  # one process fitted each LoRA; the other read it from the cache
        assert sorted(hits[side] for hits, _ in results) == [False, True], results[0][0]
    (_, first), (_, second) = results
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    assert len(list((tmp_path / "cache" / "lora").glob("*.safetensors"))) == 2
