"""Textual-inversion embedding files: new tokens' vectors, as pivotal tuning writes them and other tools read them.

The layout is the one A1111, ComfyUI and diffusers' `load_textual_inversion` accept: a safetensors file with one
tensor per text encoder, `clip_l` (SD 1.x's CLIP ViT-L, and SDXL's first encoder) and `clip_g` (SDXL's
OpenCLIP ViT-bigG), each of shape (tokens, width). morphkit adds to the header the token names the vectors were
trained as (`<s0>`, `<s1>`, …) and the abstraction they stood for (`TOK`), so that prompts can use either.

    save_embedding("out/me_emb.safetensors", {"clip_l": vectors}, ["<s0>", "<s1>"], "TOK")
    tokens = load_embedding(pipe, "out/me_emb.safetensors")   # then "a photo of <s0><s1>" works
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import InputError
from .families import family_of
from .io import atomic_write, check_can_write
from .lora_files import read_tensors
from .lora_files.names import shown

EMBEDDING_KEYS = ("clip_l", "clip_g")  # each text encoder's key is its family's (`TextEncoder.embedding_key`)
MAX_TOKENS = 64


@dataclass
class Embedding:
    vectors: dict[str, torch.Tensor]  # "clip_l" / "clip_g" -> (tokens, width)
    tokens: list[str]  # the names to add to the tokenizers
    abstraction: str | None = None  # what the tokens stand for in prompts (pivotal tuning's TOK)

    def in_prompt(self, prompt: str) -> str:
        """`prompt` with the abstraction (when recorded) replaced by the tokens, as in training."""
        if self.abstraction and self.abstraction in prompt and not any(t in prompt for t in self.tokens):
            return prompt.replace(self.abstraction, "".join(self.tokens))
        return prompt


def save_embedding(path: str | os.PathLike, vectors: dict[str, torch.Tensor], tokens: list[str],
                   abstraction: str | None = None, overwrite: bool = False) -> Path:
    """Write an embedding file atomically (see the module's docstring); refuses to replace one without `overwrite`."""
    path = check_can_write(path, overwrite, "embedding file")
    header = {"format": "pt", "morphkit.tokens": json.dumps(tokens)}
    if abstraction:
        header["morphkit.token_abstraction"] = abstraction
    with atomic_write(path) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in vectors.items()}, str(tmp), metadata=header)
    return path


def _plain_token(token) -> bool:
    return isinstance(token, str) and 0 < len(token) <= 64 and token.isprintable() and not any(c.isspace() for c in token)


def read_embedding(path: str | os.PathLike, allow_pickle: bool = False) -> Embedding:
    """Read an embedding file: morphkit's, A1111's (`emb_params` or one tensor) or SDXL's (`clip_l` + `clip_g`)."""
    path = Path(path)
    tensors, header = read_tensors(path, allow_pickle, what="embedding file")
    if "clip_l" not in tensors and "clip_g" not in tensors:
        if len(tensors) != 1:
            raise InputError(f"{shown(path)} is not an embedding file: it holds {len(tensors)} tensors and no clip_l or "
                             "clip_g. An embedding file holds one tensor per text encoder.")
        tensors = {"clip_l": next(iter(tensors.values()))}
    vectors = {k: v.float() for k, v in tensors.items() if k in EMBEDDING_KEYS}
    count = {v.shape[0] if v.dim() == 2 else 1 for v in vectors.values()}
    if len(count) != 1 or any(v.dim() not in (1, 2) or not torch.isfinite(v).all() for v in vectors.values()):
        raise InputError(f"{shown(path)}: its vectors must be finite and of shape (tokens, width), the same number of "
                         "tokens for every text encoder.")
    n = count.pop()
    if n > MAX_TOKENS:
        raise InputError(f"{shown(path)} holds {n} token vectors; at most {MAX_TOKENS} are read.")
    vectors = {k: v.reshape(n, -1) for k, v in vectors.items()}
    return Embedding(vectors, _tokens(path, header, n), _abstraction(header))


def _tokens(path: Path, header: dict, n: int) -> list[str]:
    try:
        tokens = json.loads(header.get("morphkit.tokens") or "null")
    except ValueError:
        tokens = None
    if isinstance(tokens, list) and len(tokens) == n and all(_plain_token(t) for t in tokens) and len(set(tokens)) == n:
        return tokens
    stem = "".join(c for c in path.stem if c.isalnum() or c in "_-")[:48] or "embedding"
    return [f"<{stem}>"] if n == 1 else [f"<{stem}_{i}>" for i in range(n)]  # A1111 names a file's tokens so


def _abstraction(header: dict) -> str | None:
    value = header.get("morphkit.token_abstraction")
    return value if _plain_token(value) else None


def load_embedding(pipe, source: str | os.PathLike | Embedding, allow_pickle: bool = False) -> Embedding:
    """Add an embedding's tokens to every text encoder of `pipe` (diffusers' loader); it must have vectors for
    each of them and none for encoders the model lacks."""
    embedding = source if isinstance(source, Embedding) else read_embedding(source, allow_pickle)
    where = "the embedding" if isinstance(source, Embedding) else shown(source)
    family = family_of(pipe)
    if extra := sorted(set(embedding.vectors) - {te.embedding_key for te in family.text_encoders}):
        raise InputError(f"{where} has vectors for {', '.join(extra)}, a text encoder {family.label} models do not have "
                         "(an SDXL embedding on an SD 1.x model?). Use an embedding made for this model.")
    for te in family.text_encoders:
        encoder, tokenizer = getattr(pipe, te.attr), getattr(pipe, te.tokenizer)
        if te.embedding_key not in embedding.vectors:
            raise InputError(f"{where} has no {te.embedding_key} vectors for this model's {te.attr}; it was made for "
                             "another model.")
        vectors = embedding.vectors[te.embedding_key]
        width = encoder.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            raise InputError(f"{where}: its {te.embedding_key} vectors are {vectors.shape[1]} wide, but this model's "
                             f"{te.attr} takes {width}. The embedding was made for another model.")
        if any(t in tokenizer.get_vocab() for t in embedding.tokens):
            continue  # loaded already
        pipe.load_textual_inversion(vectors.to(encoder.dtype), token=embedding.tokens, text_encoder=encoder,
                                    tokenizer=tokenizer)
    return embedding


def read_embeddings(paths, allow_pickle: bool = False) -> list[Embedding]:
    """Read every embedding file of a command (`--embedding`, repeated) before the model loads."""
    return [read_embedding(path, allow_pickle) for path in paths or ()]


def use_embeddings(pipe, embeddings: list[Embedding]):
    """Load `embeddings` into `pipe`; returns what prompts become: each abstraction replaced by its tokens."""
    for embedding in embeddings:
        load_embedding(pipe, embedding)

    def in_prompt(prompt: str) -> str:
        for embedding in embeddings:
            prompt = embedding.in_prompt(prompt)
        return prompt

    return in_prompt


def embeddings_fingerprint(paths) -> str:
    """What the embedding files contribute to cache keys: their contents' hashes ('' for none)."""
    from .io import sha256_file

    return ",".join(sha256_file(p)[:16] for p in paths or ())
