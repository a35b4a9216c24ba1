"""LoRA files: kohya <-> diffusers, `morphkit lora info/convert/mix/fuse`, and reading strangers' files safely."""

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import morphkit
from cli.main import app
from morphkit.errors import LoRAError
from morphkit.lora import (
    LoraShape,
    adapter_metadata,
    adapter_weights,
    add_lora,
    fuse_lora,
    load_lora,
    lora_state_dict,
    save_lora,
)
from morphkit.lora_files import (
    convert_lora,
    kohya_module_name,
    lora_info,
    mix_loras,
    module_from_kohya,
    read_lora_file,
)
from tests.conftest import unet_probe

runner = CliRunner()
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(pipe, path, seed=0, rank=4, alpha=2.0, targets=TARGETS, fmt="diffusers", name="made"):
    """A LoRA with random non-zero factors on `pipe.unet`, saved to `path`; the adapter is removed again."""
    add_lora(pipe.unet, LoraShape(rank=rank, alpha=alpha, targets=targets), name)
    g = torch.Generator().manual_seed(seed)
    for n, p in pipe.unet.named_parameters():
        if f".{name}." in n and "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    save_lora(path, lora_state_dict(pipe.unet, name), adapter_metadata(pipe.unet, name), {"steps": 1}, format=fmt)
    pipe.unet.delete_adapters(name)
    return path


def probe_with(pipe, path, weight=1.0, name="probe"):
    load_lora(pipe.unet, path, name)
    with adapter_weights(pipe.unet, {name: weight}):
        out = unet_probe(pipe.unet)
    pipe.unet.delete_adapters(name)
    return out


# ---- kohya names --------------------------------------------------------------------------

def expected_tiny_kohya_modules():
    """Written out by hand from the tiny UNet's structure: one transformer block in down block 1 and in
    the mid block, two in up block 0 (layers_per_block + 1)."""
    blocks = ["down_blocks_1_attentions_0", "mid_block_attentions_0", "up_blocks_0_attentions_0",
              "up_blocks_0_attentions_1"]
    return {f"lora_unet_{b}_transformer_blocks_0_{attn}_{proj}" for b in blocks for attn in ("attn1", "attn2")
            for proj in ("to_q", "to_k", "to_v", "to_out_0")}


def test_kohya_file_has_exactly_the_expected_keys_and_alpha(tiny_pipe, tmp_path):
    path = random_lora(tiny_pipe, tmp_path / "k.safetensors", rank=4, alpha=2.0, fmt="kohya")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
    modules = expected_tiny_kohya_modules()
    assert keys == {f"{m}.{leaf}" for m in modules for leaf in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(a.shape == () and a.item() == 2.0 for a in alphas.values())  # strength alpha/rank = 0.5
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"


def test_kohya_names_for_every_layer_of_full_size_sd15():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from morphkit.models import SD15_CONFIG

    with torch.device("meta"):  # the full-size architecture, never run
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD15_CONFIG), subfolder="unet"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(SD15_CONFIG), subfolder="text_encoder"))
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert kohya_module_name("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya_module_name("unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj") == \
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"
    attention = [n for n in names if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert len(attention) == 16 * 2 * 4  # 16 transformer blocks, attn1 + attn2, four projections
    for name in names:
        assert module_from_kohya(kohya_module_name("unet." + name)) == "unet." + name
    for name, m in te.named_modules():
        if isinstance(m, torch.nn.Linear):
            full = "text_encoder.text_model." + name.removeprefix("text_model.")
            assert module_from_kohya(kohya_module_name(full)) == full
    assert kohya_module_name("text_encoder.text_model.encoder.layers.11.self_attn.q_proj") == \
        "lora_te_text_model_encoder_layers_11_self_attn_q_proj"


# ---- convert ------------------------------------------------------------------------------

def test_diffusers_kohya_diffusers_is_exact_and_both_act_the_same(tiny_pipe, tmp_path):
    src = random_lora(tiny_pipe, tmp_path / "d.safetensors", rank=4, alpha=3.0,
                      targets=("to_q", "to_v", "proj_in", "ff.net.0.proj"))
    kohya = convert_lora(src, tmp_path / "k.safetensors", to="kohya")
    back = convert_lora(kohya, tmp_path / "d2.safetensors", to="diffusers")
    with safe_open(str(src), "pt") as a, safe_open(str(back), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    assert read_lora_file(kohya).format == "kohya" and read_lora_file(back).format == "diffusers"

    out_d, out_k = probe_with(tiny_pipe, src), probe_with(tiny_pipe, kohya)
    assert torch.equal(out_d, out_k)
    assert (out_d - unet_probe(tiny_pipe.unet)).abs().max() > 1e-3

    # and stock diffusers reads the kohya file to the same effect (alpha 3 on rank 4 included)
    from diffusers import StableDiffusionPipeline

    fresh = StableDiffusionPipeline.from_pretrained(morphkit.tiny.tiny_model_path(), safety_checker=None,
                                                    requires_safety_checker=False)
    fresh.load_lora_weights(str(kohya))
    assert (unet_probe(fresh.unet) - out_d).abs().max() < 1e-5


def test_convert_cli_and_info(tiny_pipe, tmp_path):
    src = random_lora(tiny_pipe, tmp_path / "d.safetensors", rank=4, alpha=4.0)
    dst = tmp_path / "k.safetensors"
    result = runner.invoke(app, ["lora", "convert", str(src), str(dst), "--to", "kohya"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["lora", "convert", str(src), str(dst), "--to", "kohya"])
    assert again.exit_code == 4 and "--overwrite" in again.output

    report = lora_info(dst)
    assert report["format"] == "kohya" and report["unet_modules"] == 32 and report["text_encoder_modules"] == 0
    assert report["ranks"] == {4: 32} and report["alphas"] == {4.0: 32}
    assert report["targets"]["unet attn1.to_q"] == 4 and report["base"].startswith("unknown")  # tiny: width 32
    shown = runner.invoke(app, ["lora", "info", str(dst)])
    assert shown.exit_code == 0 and "kohya" in shown.output and "ss_network_dim: 4" in shown.output
    as_json = json.loads(runner.invoke(app, ["lora", "info", str(dst), "--json"]).output)
    assert as_json["modules"] == 32


def test_info_names_the_base_architecture(tmp_path):
    def kohya(path, width, extra=()):
        down = torch.zeros(4, width)
        t = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": down,
             "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4),
             "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(4.0)}
        for key in extra:
            t[key] = torch.zeros(4, 4) if "down" in key else torch.zeros(4, 4)
        save_file(t, str(path))
        return path

    assert lora_info(kohya(tmp_path / "a.safetensors", 768))["base"] == "SD 1.x"
    assert lora_info(kohya(tmp_path / "b.safetensors", 1024))["base"] == "SD 2.x"
    xl = kohya(tmp_path / "c.safetensors", 2048, ["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                                                   "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"])
    assert lora_info(xl)["base"] == "SDXL" and lora_info(xl)["text_encoder_modules"] == 1


# ---- mix ----------------------------------------------------------------------------------

def test_mix_by_concatenation_equals_set_adapters_blend(tiny_pipe, tmp_path):
    a = random_lora(tiny_pipe, tmp_path / "a.safetensors", seed=1, rank=4, alpha=2.0)
    b = random_lora(tiny_pipe, tmp_path / "b.safetensors", seed=2, rank=8, alpha=8.0,
                    targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.2"), fmt="kohya")
    result = mix_loras([f"{a}:0.7", f"{b}:0.4"], tmp_path / "ab.safetensors")
    assert {m.rank for m in result.lora.modules.values()} == {12, 8}  # ff.net.2 only in b
    load_lora(tiny_pipe.unet, a, "a")
    load_lora(tiny_pipe.unet, b, "b")
    with adapter_weights(tiny_pipe.unet, {"a": 0.7, "b": 0.4}):
        blended = unet_probe(tiny_pipe.unet)
    tiny_pipe.unet.delete_adapters(["a", "b"])
    mixed = probe_with(tiny_pipe, tmp_path / "ab.safetensors")
    assert (mixed - blended).abs().max() < 1e-5
    assert (mixed - unet_probe(tiny_pipe.unet)).abs().max() > 1e-3


def test_mix_reduced_by_svd_reports_what_it_loses(tiny_pipe, tmp_path):
    a = random_lora(tiny_pipe, tmp_path / "a.safetensors", seed=1, rank=4)
    b = random_lora(tiny_pipe, tmp_path / "b.safetensors", seed=2, rank=4)
    full = mix_loras([f"{a}:0.5", f"{b}:0.5"], tmp_path / "full.safetensors")
    exact = mix_loras([f"{a}:0.5", f"{b}:0.5"], tmp_path / "r8.safetensors", rank=8)  # rank 8 holds it all
    small = mix_loras([f"{a}:0.5", f"{b}:0.5"], tmp_path / "r2.safetensors", rank=2)
    assert exact.lost_energy < 1e-6 and 0.05 < small.lost_energy < 0.95
    assert {m.rank for m in small.lora.modules.values()} == {2}
    for name, m in full.lora.modules.items():
        assert torch.allclose(exact.lora.modules[name].delta(), m.delta(), atol=1e-6)
        # the rank-2 update is the best one: its error is exactly the dropped singular values
        s = torch.linalg.svdvals(m.delta())
        err = (small.lora.modules[name].delta() - m.delta()).norm()
        assert torch.isclose(err, s[2:].norm(), rtol=1e-3, atol=1e-7)
    cli = runner.invoke(app, ["lora", "mix", f"{a}:0.5", f"{b}:0.5", "--out", str(tmp_path / "c.safetensors"),
                              "--rank", "2"])
    assert cli.exit_code == 0 and "kept" in cli.output, cli.output


def test_mix_refuses_loras_of_different_models(tiny_pipe, tmp_path):
    a = random_lora(tiny_pipe, tmp_path / "a.safetensors")
    t = {k: v for k, v in read_lora_file(a).modules.items()}
    name = next(iter(t))
    bad = {f"{kohya_module_name(name)}.lora_down.weight": torch.ones(4, 7),
           f"{kohya_module_name(name)}.lora_up.weight": torch.ones(t[name].up.shape[0], 4)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoRAError, match="different models"):
        mix_loras([str(a), str(tmp_path / "bad.safetensors")], tmp_path / "m.safetensors")


# ---- fuse ---------------------------------------------------------------------------------

def test_fuse_gives_a_single_file_model_equal_to_base_plus_lora(tiny_pipe, tmp_path):
    lora = random_lora(tiny_pipe, tmp_path / "a.safetensors", rank=4, alpha=2.0, fmt="kohya")
    expected = probe_with(tiny_pipe, lora, weight=0.8)
    result = runner.invoke(app, ["lora", "fuse", "--model", "tiny", "--lora", f"{lora}:0.8", "--out",
                                 str(tmp_path / "fused.safetensors"), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "fused.safetensors"), "pt") as f:  # the original SD layout, as A1111 reads it
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    fused = morphkit.load_pipeline(str(tmp_path / "fused.safetensors"), device="cpu")  # diffusers' from_single_file
    assert (unet_probe(fused.unet) - expected).abs().max() < 1e-5
    for part in ("vae", "text_encoder"):
        ours, base = getattr(fused, part).state_dict(), getattr(tiny_pipe, part).state_dict()
        assert all(torch.equal(ours[k], base[k]) for k in base)


def test_fuse_refuses_what_it_cannot_do(tiny_pipe, tmp_path):
    lora = random_lora(tiny_pipe, tmp_path / "a.safetensors")
    with pytest.raises(LoRAError, match="safetensors"):
        fuse_lora("tiny", [str(lora)], tmp_path / "fused.ckpt")
    with pytest.raises(LoRAError, match="fp16, bf16 or fp32"):
        fuse_lora("tiny", [str(lora)], tmp_path / "fused.safetensors", dtype="int8")


# ---- reading safely -----------------------------------------------------------------------

class _Marker:
    """Unpickling this object runs code: it creates a marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_crafted_pickle_never_runs(tiny_pipe, tmp_path, suffix):
    marker = tmp_path / "pwned"
    evil = tmp_path / f"evil{suffix}"
    with open(evil, "wb") as f:
        pickle.dump({"lora_unet_x.lora_down.weight": _Marker(marker)}, f)
    with pytest.raises(LoRAError) as refused:
        load_lora(tiny_pipe.unet, evil, "evil")
    assert "pickle" in str(refused.value)
    with pytest.raises(LoRAError):
        load_lora(tiny_pipe.unet, evil, "evil", allow_pickle=True)  # weights_only=True refuses the object
    result = runner.invoke(app, ["lora", "info", str(evil), "--allow-pickle"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not marker.exists()


def test_pickle_with_only_tensors_loads_when_allowed(tiny_pipe, tmp_path):
    lora = random_lora(tiny_pipe, tmp_path / "a.safetensors")
    with safe_open(str(lora), "pt") as f:
        torch.save({k: f.get_tensor(k) for k in f.keys()}, tmp_path / "a.pt")
    with pytest.raises(LoRAError, match="--allow-pickle"):
        read_lora_file(tmp_path / "a.pt")
    assert len(read_lora_file(tmp_path / "a.pt", allow_pickle=True).modules) == 32


def test_broken_files_are_rejected_with_clear_messages(tiny_pipe, tmp_path):
    good = random_lora(tiny_pipe, tmp_path / "a.safetensors")
    with safe_open(str(good), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    key = sorted(tensors)[0]
    nan = dict(tensors, **{key: tensors[key].clone().fill_(float("nan"))})
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(LoRAError, match="NaN"):
        load_lora(tiny_pipe.unet, tmp_path / "nan.safetensors", "x")

    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(LoRAError, match="truncated"):
        load_lora(tiny_pipe.unet, tmp_path / "cut.safetensors", "x")

    (tmp_path / "photo.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(LoRAError, match="image"):
        read_lora_file(tmp_path / "photo.safetensors")

    up_key = next(k for k in tensors if "lora_B" in k)
    wrong = dict(tensors, **{up_key: torch.zeros(tensors[up_key].shape[0], 3)})
    save_file(wrong, str(tmp_path / "rank.safetensors"), metadata=meta)
    with pytest.raises(LoRAError, match="contradict"):
        read_lora_file(tmp_path / "rank.safetensors")
    assert "pt" == meta["format"] and os.path.getsize(good) > 0


def test_lora_for_another_architecture_is_refused(tiny_pipe, tmp_path):
    xl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
          "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4)}
    save_file(xl, str(tmp_path / "xl.safetensors"))
    with pytest.raises(LoRAError, match="SDXL"):
        load_lora(tiny_pipe.unet, tmp_path / "xl.safetensors", "x")
    sd15 = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(64, 4)}
    save_file(sd15, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(LoRAError, match="SD 1.x") as wrong:
        load_lora(tiny_pipe.unet, tmp_path / "sd15.safetensors", "x")
    assert "(4, 768)" in str(wrong.value)


def test_single_file_layout_of_full_size_sd15_round_trips_through_diffusers():
    """The LDM names written by `lora fuse` for the full-size SD 1.5 UNet and VAE are exactly the ones
    diffusers' own single-file converter reads back (built on the meta device, never run)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils

    from morphkit.checkpoint import unet_to_ldm, vae_to_ldm
    from morphkit.models import SD15_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD15_CONFIG), subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(SD15_CONFIG), subfolder="vae"))
    ldm_unet = unet_to_ldm(unet.state_dict(), unet.config)
    assert "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight" in ldm_unet
    assert "model.diffusion_model.input_blocks.9.0.op.weight" in ldm_unet  # the third downsampler
    assert "model.diffusion_model.input_blocks.12.0.op.weight" not in ldm_unet  # the last block has none
    back = single_file_utils.convert_ldm_unet_checkpoint(ldm_unet, unet.config)
    assert set(back) == set(unet.state_dict())
    ldm_vae = vae_to_ldm(vae.state_dict(), vae.config)
    assert set(single_file_utils.convert_ldm_vae_checkpoint(ldm_vae, vae.config)) == set(vae.state_dict())
    assert single_file_utils.infer_diffusers_model_type(ldm_unet) == "v1"


def test_text_encoder_part_acts_as_in_stock_diffusers_and_is_undone(tiny_pipe, tmp_path):
    """A kohya LoRA with a text-encoder part (as civitai files have): morphkit's fused-for-the-call text
    encoder gives the prompt embedding stock diffusers gives with its adapter layers, and the weights
    come back bit for bit afterwards."""
    from diffusers import StableDiffusionPipeline

    from morphkit.lora import text_encoder_loras
    from morphkit.models import encode_prompt

    g = torch.Generator().manual_seed(3)
    tensors = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj", "out_proj"):
            key = f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(4, 32, generator=g) * 0.3
            tensors[f"{key}.lora_up.weight"] = torch.randn(32, 4, generator=g) * 0.3
            tensors[f"{key}.alpha"] = torch.tensor(2.0)
    unet_part = random_lora(tiny_pipe, tmp_path / "u.safetensors", fmt="kohya")
    with safe_open(str(unet_part), "pt") as f:
        tensors.update({k: f.get_tensor(k) for k in f.keys()})
    save_file(tensors, str(tmp_path / "both.safetensors"))
    lora = read_lora_file(tmp_path / "both.safetensors")
    assert lora_info(tmp_path / "both.safetensors")["text_encoder_modules"] == 6

    before = {k: v.clone() for k, v in tiny_pipe.text_encoder.state_dict().items()}
    plain = encode_prompt(tiny_pipe, "a photo")
    with text_encoder_loras(tiny_pipe.text_encoder, [(lora, 0.5)]) as changed:
        ours = encode_prompt(tiny_pipe, "a photo")
    assert changed == 6 and (ours - plain).abs().max() > 1e-3
    assert all(torch.equal(v, before[k]) for k, v in tiny_pipe.text_encoder.state_dict().items())

    stock = StableDiffusionPipeline.from_pretrained(morphkit.tiny.tiny_model_path(), safety_checker=None,
                                                    requires_safety_checker=False)
    stock.load_lora_weights(str(tmp_path / "both.safetensors"), adapter_name="x")
    stock.set_adapters(["x"], [0.5])
    assert (encode_prompt(stock, "a photo") - ours).abs().max() < 1e-5


def test_kohya_keys_for_full_size_sd15_match_a_hand_built_list():
    """The keys morphkit writes for a default-target LoRA on the full-size SD 1.5 UNet (built from its
    config on the meta device, never run), against the list written out from SD 1.5's structure."""
    from diffusers import UNet2DConditionModel

    from morphkit.lora_files import LoraFile, LoraModule, kohya_state_dict
    from morphkit.models import SD15_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD15_CONFIG), subfolder="unet"))
    adapted = [n for n, _ in unet.named_modules() if n.endswith(TARGETS)]
    one = LoraModule(torch.zeros(1, 1), torch.zeros(1, 1), 1.0)
    written = set(kohya_state_dict(LoraFile({"unet." + n: one for n in adapted})))

    blocks = ([f"down_blocks_{i}_attentions_{j}" for i in range(3) for j in range(2)]
              + [f"up_blocks_{i}_attentions_{j}" for i in (1, 2, 3) for j in range(3)] + ["mid_block_attentions_0"])
    expected = {f"lora_unet_{b}_transformer_blocks_0_{attn}_{proj}.{leaf}" for b in blocks
                for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out_0")
                for leaf in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert written == expected and len(expected) == 16 * 8 * 3


# ---- every kind of file, each by its own math ----------------------------------------------

Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # tiny: Linear 64 -> 64
CONV = "down_blocks.1.resnets.0.conv1"  # tiny: Conv2d 32 -> 64, 3x3


def kname(path):
    return kohya_module_name("unet." + path)


def rand(*shape, seed=[0]):
    seed[0] += 1
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed[0])) * 0.2


def layer(pipe, path):
    return dict(pipe.unet.named_modules())[path]


def merged_weight(pipe, path, tensors, weight=1.0, tmp=None):
    """The layer's weight while morphkit applies the file built from `tensors` (read back from disk)."""
    from morphkit.lora import merged_updates

    save_file(tensors, str(tmp))
    lora = read_lora_file(tmp)
    with merged_updates(pipe, [(lora, weight)], ("unet",)):
        return layer(pipe, path).weight.detach().clone(), lora


def test_locon_tucker_equals_the_three_convolutions_it_stands_for(tiny_pipe, tmp_path):
    """LyCORIS's Tucker LoCon runs x -> up(mid(down(x))); the merged weight must do the same in one conv."""
    import torch.nn.functional as F

    w0 = layer(tiny_pipe, CONV).weight.detach().clone()
    down, mid, up = rand(4, 32, 1, 1), rand(4, 4, 3, 3), rand(64, 4, 1, 1)
    t = {f"{kname(CONV)}.lora_down.weight": down, f"{kname(CONV)}.lora_mid.weight": mid,
         f"{kname(CONV)}.lora_up.weight": up, f"{kname(CONV)}.alpha": torch.tensor(2.0)}
    merged, lora = merged_weight(tiny_pipe, CONV, t, 0.7, tmp_path / "locon.safetensors")
    x = rand(1, 32, 9, 9)
    chained = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * (2.0 / 4)
    assert torch.allclose(F.conv2d(x, merged - w0, padding=1), 0.7 * chained, atol=1e-5)
    assert lora.format == "lycoris" and lora.kinds == {"locon-tucker": 1}
    assert torch.equal(layer(tiny_pipe, CONV).weight, w0)  # put back bit for bit


def test_loha_and_lokr_equal_their_dense_definitions(tiny_pipe, tmp_path):
    w0 = layer(tiny_pipe, Q).weight.detach().clone()
    w1a, w1b, w2a, w2b = rand(64, 3), rand(3, 64), rand(64, 3), rand(3, 64)
    loha = {f"{kname(Q)}.hada_w1_a": w1a, f"{kname(Q)}.hada_w1_b": w1b, f"{kname(Q)}.hada_w2_a": w2a,
            f"{kname(Q)}.hada_w2_b": w2b, f"{kname(Q)}.alpha": torch.tensor(1.5)}
    merged, _ = merged_weight(tiny_pipe, Q, loha, 1.0, tmp_path / "loha.safetensors")
    expected = torch.empty(64, 64)
    for i in range(64):  # the Hadamard product, element by element
        for j in range(64):
            expected[i, j] = (w1a[i] @ w1b[:, j]) * (w2a[i] @ w2b[:, j]) * 1.5 / 3
    assert torch.allclose(merged - w0, expected, atol=1e-6)

    w1, w2a, w2b = rand(4, 8), rand(16, 2), rand(2, 8)  # W1 full (4x8), W2 = w2a @ w2b (16x8): 64x64
    lokr = {f"{kname(Q)}.lokr_w1": w1, f"{kname(Q)}.lokr_w2_a": w2a, f"{kname(Q)}.lokr_w2_b": w2b,
            f"{kname(Q)}.alpha": torch.tensor(1.0)}
    merged, _ = merged_weight(tiny_pipe, Q, lokr, 1.0, tmp_path / "lokr.safetensors")
    w2, expected = w2a @ w2b, torch.zeros(64, 64)
    for i in range(4):  # the Kronecker product, block by block; scale alpha / rank = 1 / 2
        for j in range(8):
            expected[i * 16:(i + 1) * 16, j * 8:(j + 1) * 8] = w1[i, j] * w2 * 0.5
    assert torch.allclose(merged - w0, expected, atol=1e-6)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_dora_scale_rescales_by_the_norm_of_the_merged_weight(tiny_pipe, tmp_path, axis):
    w0 = layer(tiny_pipe, Q).weight.detach().clone()
    down, up = rand(4, 64), rand(64, 4)
    scale = (rand(64, 1).abs() + 0.5) if axis == "output" else (rand(1, 64).abs() + 0.5)
    t = {f"{kname(Q)}.lora_down.weight": down, f"{kname(Q)}.lora_up.weight": up, f"{kname(Q)}.alpha": torch.tensor(4.0),
         f"{kname(Q)}.dora_scale": scale}
    merged, lora = merged_weight(tiny_pipe, Q, t, 0.6, tmp_path / "dora.safetensors")
    full = w0 + up @ down
    norms = [full[i].norm() for i in range(64)] if axis == "output" else [full[:, j].norm() for j in range(64)]
    rescaled = torch.stack([full[i] * scale[i, 0] / norms[i] for i in range(64)]) if axis == "output" else \
        torch.stack([full[:, j] * scale[0, j] / norms[j] for j in range(64)], 1)
    assert torch.allclose(merged, w0 + 0.6 * (rescaled - w0), atol=1e-5)
    assert lora.kinds == {"lora+dora": 1}


def test_diffusers_dora_acts_as_peft_dora(tiny_pipe, tmp_path):
    """A diffusers-format DoRA file (PEFT's `lora_magnitude_vector`), made by PEFT itself: morphkit's merged
    weights and the adapter form morph uses both give PEFT's own DoRA output."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_pipe.unet
    base = unet_probe(unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["to_q", "to_v"]), "d")
    g = torch.Generator().manual_seed(5)
    for n, p in unet.named_parameters():
        if ".d." in n and ("lora_B" in n or "magnitude" in n):
            p.data = p.data * (1 + 0.3 * torch.rand(p.shape, generator=g)) if "magnitude" in n else \
                torch.randn(p.shape, generator=g) * 0.1
    with torch.no_grad():
        peft_out = unet_probe(unet)
    state = {"unet." + k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name="d").items()}
    unet.delete_adapters("d")
    assert any(k.endswith("lora_magnitude_vector") for k in state)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.use_dora": True})}
    save_file(state, str(tmp_path / "dora.safetensors"), metadata=meta)
    lora = read_lora_file(tmp_path / "dora.safetensors")
    assert lora.format == "diffusers" and set(lora.kinds) == {"lora+dora"}

    from morphkit.lora import merged_updates

    with merged_updates(tiny_pipe, [(lora, 1.0)], ("unet",)):
        merged_out = unet_probe(unet)
    assert (merged_out - peft_out).abs().max() < 1e-4 and (peft_out - base).abs().max() > 1e-3
    assert (probe_with(tiny_pipe, tmp_path / "dora.safetensors") - peft_out).abs().max() < 1e-4  # morph's way


def test_comfyui_lorasave_file_is_read_and_applied(tiny_pipe, tmp_path):
    """ComfyUI's LoraSave layout: `diffusion_model.<LDM path>` with lora_up/lora_down, `.diff` for 1-D weights,
    `.diff_b` for biases, and `text_encoders.clip_l.transformer.<path>` for the text encoder."""
    ldm_q = "input_blocks.3.1.transformer_blocks.0.attn1.to_q"  # tiny: down_blocks.1.attentions.0 -> input_blocks.3.1
    up, down, norm_diff, bias_diff = rand(64, 2), rand(2, 64), rand(64), rand(64)
    te_up, te_down = rand(32, 2), rand(2, 32)
    t = {f"diffusion_model.{ldm_q}.lora_up.weight": up, f"diffusion_model.{ldm_q}.lora_down.weight": down,
         "diffusion_model.input_blocks.3.1.norm.diff": norm_diff, "diffusion_model.input_blocks.3.1.proj_in.diff_b": bias_diff,
         "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight": te_up,
         "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight": te_down}
    save_file(t, str(tmp_path / "comfy.safetensors"))
    report = lora_info(tmp_path / "comfy.safetensors")
    assert report["format"] == "comfyui" and report["text_encoder_modules"] == 1 and report["unet_modules"] == 3
    assert report["loaders"]["ComfyUI"] == "yes"

    from morphkit.lora import merged_updates

    lora = read_lora_file(tmp_path / "comfy.safetensors")
    blocks = "down_blocks.1.attentions.0"
    before = {n: layer(tiny_pipe, n).state_dict() for n in (Q, f"{blocks}.norm", f"{blocks}.proj_in")}
    before = {n: {k: v.clone() for k, v in sd.items()} for n, sd in before.items()}
    with merged_updates(tiny_pipe, [(lora, 1.0)], ("unet", "text_encoder")) as changed:
        assert changed == 4
        assert torch.allclose(layer(tiny_pipe, Q).weight, before[Q]["weight"] + up @ down, atol=1e-6)
        assert torch.allclose(layer(tiny_pipe, f"{blocks}.norm").weight, before[f"{blocks}.norm"]["weight"] + norm_diff)
        assert torch.allclose(layer(tiny_pipe, f"{blocks}.proj_in").bias, before[f"{blocks}.proj_in"]["bias"] + bias_diff)
    assert torch.equal(layer(tiny_pipe, f"{blocks}.proj_in").bias, before[f"{blocks}.proj_in"]["bias"])
    with pytest.warns(UserWarning, match="no LoRA form"):  # morph's adapters hold the weight update, not the rest
        load_lora(tiny_pipe.unet, lora, "comfy")


def test_text_encoder_part_round_trip_loads_in_stock_diffusers(tiny_pipe, tmp_path):
    """kohya -> diffusers -> kohya with a text-encoder part: the diffusers file loads in stock diffusers'
    load_lora_weights (transformers 5 here), changes the prompt embedding as morphkit does, and the kohya
    file written back names the text encoder `lora_te_text_model_encoder_layers_*`."""
    from diffusers import StableDiffusionPipeline

    from morphkit.lora import text_encoder_loras
    from morphkit.models import encode_prompt

    t = {}
    for proj in ("q_proj", "v_proj"):
        key = f"lora_te_text_model_encoder_layers_1_self_attn_{proj}"
        t.update({f"{key}.lora_down.weight": rand(4, 32), f"{key}.lora_up.weight": rand(32, 4) * 3,
                  f"{key}.alpha": torch.tensor(2.0 if proj == "q_proj" else 4.0)})
    unet_part = random_lora(tiny_pipe, tmp_path / "u.safetensors", fmt="kohya")
    with safe_open(str(unet_part), "pt") as f:
        t.update({k: f.get_tensor(k) for k in f.keys()})
    save_file(t, str(tmp_path / "k.safetensors"))
    with pytest.warns(UserWarning, match="A1111"):
        convert_lora(tmp_path / "k.safetensors", tmp_path / "d.safetensors", to="diffusers")
    stock = StableDiffusionPipeline.from_pretrained(morphkit.tiny.tiny_model_path(), safety_checker=None,
                                                    requires_safety_checker=False)
    plain = encode_prompt(stock, "a photo")
    stock.load_lora_weights(str(tmp_path / "d.safetensors"), adapter_name="x")
    with text_encoder_loras(tiny_pipe.text_encoder, [(read_lora_file(tmp_path / "k.safetensors"), 1.0)]):
        ours = encode_prompt(tiny_pipe, "a photo")
    theirs = encode_prompt(stock, "a photo")
    assert (theirs - plain).abs().max() > 1e-3 and (theirs - ours).abs().max() < 1e-5

    # a transformers-5 diffusers file (`text_encoder.encoder.layers.*`) converts to kohya's text_model names
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        t5 = {k.replace("text_encoder.text_model.", "text_encoder."): f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    save_file(t5, str(tmp_path / "d5.safetensors"), metadata=meta)
    convert_lora(tmp_path / "d5.safetensors", tmp_path / "k2.safetensors", to="kohya")
    with safe_open(str(tmp_path / "k2.safetensors"), "pt") as f:
        te_keys = {k for k in f.keys() if k.startswith("lora_te")}
        assert te_keys and all(k.startswith("lora_te_text_model_encoder_layers_1_") for k in te_keys)
        assert f.get_tensor("lora_te_text_model_encoder_layers_1_self_attn_v_proj.alpha").item() == 4.0


def test_convert_non_lora_kinds_to_kohya_by_svd(tiny_pipe, tmp_path):
    w1a, w1b, w2a, w2b = rand(64, 2), rand(2, 64), rand(64, 2), rand(2, 64)
    t = {f"{kname(Q)}.hada_w1_a": w1a, f"{kname(Q)}.hada_w1_b": w1b, f"{kname(Q)}.hada_w2_a": w2a,
         f"{kname(Q)}.hada_w2_b": w2b, f"{kname(Q)}.alpha": torch.tensor(2.0)}
    save_file(t, str(tmp_path / "loha.safetensors"))
    dense = read_lora_file(tmp_path / "loha.safetensors").modules["unet." + Q].delta()
    exact = runner.invoke(app, ["lora", "convert", str(tmp_path / "loha.safetensors"), str(tmp_path / "k4.safetensors"),
                                "--to", "kohya", "--rank", "4"])  # a LoHa of dim 2 has rank <= 2 x 2
    assert exact.exit_code == 0 and "kept 100.00%" in exact.output, exact.output
    assert torch.allclose(read_lora_file(tmp_path / "k4.safetensors").modules["unet." + Q].delta(), dense, atol=1e-6)
    small = runner.invoke(app, ["lora", "convert", str(tmp_path / "loha.safetensors"), str(tmp_path / "k1.safetensors"),
                                "--to", "kohya", "--rank", "1"])
    s = torch.linalg.svdvals(dense)
    lost = float((s[1:] ** 2).sum() / (s**2).sum())
    assert small.exit_code == 0 and f"kept {1 - lost:.2%}" in small.output, small.output

    dora = {f"{kname(Q)}.lora_down.weight": rand(2, 64), f"{kname(Q)}.lora_up.weight": rand(64, 2),
            f"{kname(Q)}.dora_scale": rand(64, 1).abs() + 1}
    save_file(dora, str(tmp_path / "dora.safetensors"))
    refused = runner.invoke(app, ["lora", "convert", str(tmp_path / "dora.safetensors"), str(tmp_path / "x.safetensors"),
                                  "--to", "kohya"])
    assert refused.exit_code == 2 and "--model" in refused.output and not (tmp_path / "x.safetensors").exists()
    with_base = runner.invoke(app, ["lora", "convert", str(tmp_path / "dora.safetensors"), str(tmp_path / "x.safetensors"),
                                    "--to", "kohya", "--model", "tiny", "--rank", "64"])
    assert with_base.exit_code == 0 and "kept 100.00%" in with_base.output, with_base.output


def test_info_says_which_tools_load_the_file(tiny_pipe, tmp_path):
    kohya = random_lora(tiny_pipe, tmp_path / "k.safetensors", fmt="kohya")
    shown = runner.invoke(app, ["lora", "info", str(kohya)]).output
    assert "loads as is in: morphkit yes; diffusers yes; ComfyUI yes; A1111 yes" in shown
    diffusers = lora_info(random_lora(tiny_pipe, tmp_path / "d.safetensors"))
    assert diffusers["loaders"]["A1111"].startswith("no") and diffusers["loaders"]["ComfyUI"].startswith("partly")
    xl = {f"lora_te{i}_text_model_encoder_layers_0_mlp_fc1.{leaf}": torch.zeros(4, 4) for i in (1, 2)
          for leaf in ("lora_down.weight", "lora_up.weight")}
    save_file(xl, str(tmp_path / "xl.safetensors"))
    report = lora_info(tmp_path / "xl.safetensors")  # both text encoders share module paths: both are counted
    assert report["text_encoder_modules"] == 2 and report["text_encoder_2_modules"] == 1 and report["base"] == "SDXL"


def test_training_header_is_useful_and_holds_no_absolute_path(tiny_pipe, tmp_path, photo):
    from morphkit.train import TrainSettings, train_lora

    with pytest.warns(UserWarning, match="conv_in"):
        TrainSettings.resolve(data=str(photo), targets="to_q,conv_in")
    out = tmp_path / "deep" / "out"
    train_lora(str(photo), "a photo of sks, red", pipe=tiny_pipe, output_dir=out, name="me", steps=1, rank=2,
               targets="to_q,conv1", checkpointing_steps=0, progress=False)
    with safe_open(str(out / "me.safetensors"), "pt") as f:
        meta = f.metadata()
    assert not [k for k, v in meta.items() if str(tmp_path) in v or '"/' in v or v.startswith("/")], meta
    assert meta["ss_output_name"] == "me" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2"}
    assert json.loads(meta["ss_tag_frequency"]) == {"photo.png": {"a photo of sks": 1, "red": 1}}
    assert json.loads(meta["morphkit.settings"])["data"] == "photo.png"
    assert "sks" in meta["morphkit.settings"]

    train_lora(str(photo), "a photo of sks", pipe=tiny_pipe, output_dir=out, name="private", steps=1, rank=2,
               checkpointing_steps=0, progress=False, metadata_prompt=False, overwrite=True)
    with safe_open(str(out / "private.safetensors"), "pt") as f:
        meta = f.metadata()
    assert "ss_tag_frequency" not in meta and not any("sks" in v for v in meta.values())


def test_rank_and_alpha_that_vary_by_module_are_recorded(tmp_path):
    from morphkit.lora_files import LoraFile, LoraModule, save_lora_file

    lora = LoraFile({"unet." + Q: LoraModule(rand(2, 64), rand(64, 2), 1.0),
                     "unet." + Q.replace("to_q", "to_k"): LoraModule(rand(4, 64), rand(64, 4), 4.0),
                     "unet." + Q.replace("to_q", "to_v"): LoraModule(rand(4, 64), rand(64, 4), 4.0)})
    save_lora_file(tmp_path / "k.safetensors", lora)
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and json.loads(meta["morphkit.rank_pattern"])[kname(Q)] == 2
    assert json.loads(meta["morphkit.alpha_pattern"])[kname(Q)] == 1.0


def test_adapter_form_of_every_kind_acts_as_the_merged_weights(tiny_pipe, tmp_path):
    """What morph and invert load (LoRA layers) gives the UNet output that the merged weights give."""
    from morphkit.lora import merged_updates

    t = {f"{kname(Q)}.hada_w1_a": rand(64, 2), f"{kname(Q)}.hada_w1_b": rand(2, 64), f"{kname(Q)}.hada_w2_a": rand(64, 2),
         f"{kname(Q)}.hada_w2_b": rand(2, 64), f"{kname(Q)}.alpha": torch.tensor(1.0)}
    kq = kname(Q.replace("to_q", "to_k"))
    t.update({f"{kq}.lokr_w1": rand(8, 8), f"{kq}.lokr_w2": rand(8, 8)})  # a full Kronecker product: rank 64
    t.update({f"{kname(CONV)}.lora_down.weight": rand(2, 32, 1, 1), f"{kname(CONV)}.lora_mid.weight": rand(2, 2, 3, 3),
              f"{kname(CONV)}.lora_up.weight": rand(64, 2, 1, 1)})
    save_file(t, str(tmp_path / "mixed.safetensors"))
    lora = read_lora_file(tmp_path / "mixed.safetensors")
    assert lora.kinds == {"locon-tucker": 1, "loha": 1, "lokr": 1}
    with merged_updates(tiny_pipe, [(lora, 0.8)], ("unet",)):
        merged = unet_probe(tiny_pipe.unet)
    adapters = probe_with(tiny_pipe, tmp_path / "mixed.safetensors", weight=0.8)
    assert (adapters - merged).abs().max() < 1e-5 and (merged - unet_probe(tiny_pipe.unet)).abs().max() > 1e-3


def test_stylize_applies_a_loha_as_its_nearest_exact_lora_would(tiny_pipe, photo, tmp_path):
    t = {}
    for name, m in read_lora_file(random_lora(tiny_pipe, tmp_path / "shape.safetensors", fmt="kohya")).modules.items():
        out, inp = m.up.shape[0], m.down.shape[1]  # a LoHa on every attention projection
        t.update({f"{kohya_module_name(name)}.hada_w1_a": rand(out, 2), f"{kohya_module_name(name)}.hada_w1_b": rand(2, inp) * 10,
                  f"{kohya_module_name(name)}.hada_w2_a": rand(out, 2), f"{kohya_module_name(name)}.hada_w2_b": rand(2, inp) * 10})
    save_file(t, str(tmp_path / "loha.safetensors"))
    convert_lora(tmp_path / "loha.safetensors", tmp_path / "lora.safetensors", to="kohya", rank=4)  # exact: rank 2 x 2
    from morphkit.models import load_controlnet
    from morphkit.stylize import controlnet_pipeline

    fast = dict(pipe=controlnet_pipeline(tiny_pipe, load_controlnet("tiny", device="cpu")), steps=3, save=False,
                progress=False)
    plain, loha, lora = (morphkit.stylize(photo, loras, **fast).images[0] for loras in
                         ([], [f"{tmp_path / 'loha.safetensors'}:0.9"], [f"{tmp_path / 'lora.safetensors'}:0.9"]))
    import numpy as np

    a, b, c = (np.asarray(im, dtype=np.float32) for im in (plain, loha, lora))
    assert np.abs(b - c).max() <= 1 and np.abs(b - a).mean() > 0.05  # merged vs adapters: rounding only
