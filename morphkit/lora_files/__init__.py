"""LoRA files in the formats people have: reading them safely, converting, inspecting, mixing.

Every format is read into one plain form, `LoraFile`: for each adapted module (named
`unet.<module path>`, `text_encoder.<path>` or `text_encoder_2.<path>`) an `Update` that knows its own math
(`updates`: LoRA, LoCon with a Tucker core, LoHa, LoKr, full differences, each optionally with DoRA's
magnitude and a bias update).

- **kohya** (kohya sd-scripts, A1111, ComfyUI, civitai): ``lora_unet_<path with '_' for '.'>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``; ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for the text encoders.
- **LyCORIS**: the same names with ``lora_mid``, ``hada_*``, ``lokr_*``, ``dora_scale``, ``diff`` / ``diff_b`` leaves.
- **diffusers** (diffusers' scripts, PEFT): ``unet.<path>.lora_A.weight`` / ``.lora_B.weight``
  (``.lora_magnitude_vector`` for DoRA); rank and alpha in the header entry ``lora_adapter_metadata``.
- **ComfyUI** (its LoraSave node): ``diffusion_model.<LDM path>.lora_up.weight`` / ``.lora_down.weight``,
  ``.diff``, ``.diff_b``; ``text_encoders.clip_l.transformer.<path>`` for the text encoder.

Modules: `names` (naming, printing, header patterns), `updates` (the math), `reading`, `writing`,
`inspect`, `mixing`, `merging` (finding layers in a model), `spec` (`FILE:WEIGHT`).
"""

from .inspect import describe, family_of_lora, guess_base, info_lines, loaders, lora_info, made_for
from .merging import ConvertResult, check_family, find_layer, for_unet, part_of, weight_of
from .mixing import MixResult, check_weight, mix_lora_files, mix_loras
from .names import (
    KOHYA_PREFIXES,
    PART_TO_KOHYA,
    canonical_name,
    kohya_module_name,
    module_from_kohya,
    pattern_value,
    printable,
    shown,
    text_encoder_path,
)
from .reading import (
    DIFFUSERS_METADATA_KEY,
    build_update,
    check_regular_file,
    detect_format,
    read_lora_file,
    read_tensors,
)
from .spec import parse_lora_spec
from .updates import (
    MAX_UPDATE,
    DiffModule,
    LohaModule,
    LokrModule,
    LoraFile,
    LoraModule,
    Update,
    as_lora,
    dora_rescale,
    identity_factors,
    nearest_lora,
)
from .writing import (
    DIFFUSERS_FORMAT_WARNING,
    FORMATS,
    LoraCompatibilityWarning,
    clean_header,
    convert_lora,
    convert_lora_report,
    diffusers_state_dict,
    info_header,
    kohya_dropped_targets,
    kohya_header,
    kohya_name,
    kohya_state_dict,
    lora_from_peft,
    lora_from_peft_parts,
    peft_metadata,
    save_lora_file,
    tag_frequency,
    to_plain_lora,
    warn_kohya_dropped,
)
