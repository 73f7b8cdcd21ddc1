"""Hugging Face T5 checkpoints <-> our parameter tree, without torch.

A Hugging Face checkpoint is a directory with `config.json` and `model.safetensors` (or sharded
`model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`). T5.1.1 and Flan-T5
(`feed_forward_proj="gated-gelu"`, `tie_word_embeddings=false`, a separate `lm_head.weight`) and the
original T5 (`"relu"`, tied embeddings, decoder output scaled by 1/sqrt(d_model)) are recognised.

Torch `Linear` weights are `[out, in]`; our kernels are `[in, out]`, so every kernel is transposed.
"""
import json
import os
from typing import Mapping

import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from mmt_jax.models.t5 import T5Config, param_shapes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

_ACTIVATIONS = {  # feed_forward_proj -> our mlp_activations
    "relu": ("relu",),
    "gelu": ("gelu_exact",),
    "gated-gelu": ("gelu", "linear"),
    "gated-relu": ("relu", "linear"),
    "gated-silu": ("silu", "linear"),
}


class CheckpointFormatError(ValueError):
    """A checkpoint that cannot be mapped onto the model: names the file or tensor at fault."""


def config_from_hf(hf_config: Mapping) -> T5Config:
    """Maps a Hugging Face T5 `config.json` dict to `T5Config`."""
    if hf_config.get("model_type", "t5") not in ("t5", "mt5"):
        raise CheckpointFormatError(
            f"config.json: model_type {hf_config.get('model_type')!r} is not a T5 layout")
    proj = hf_config.get("feed_forward_proj", "relu")
    if proj not in _ACTIVATIONS:
        raise CheckpointFormatError(
            f"config.json: unknown feed_forward_proj {proj!r}; known: {sorted(_ACTIVATIONS)}")
    try:
        return T5Config(
            vocab_size=hf_config["vocab_size"], emb_dim=hf_config["d_model"],
            num_heads=hf_config["num_heads"], head_dim=hf_config["d_kv"], mlp_dim=hf_config["d_ff"],
            num_encoder_layers=hf_config["num_layers"],
            num_decoder_layers=hf_config.get("num_decoder_layers") or hf_config["num_layers"],
            mlp_activations=_ACTIVATIONS[proj],
            # Absent means tied: the original T5 convention, and transformers' default.
            logits_via_embedding=hf_config.get("tie_word_embeddings", True) is not False,
            dropout_rate=0.0,
            relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6))
    except KeyError as e:
        raise CheckpointFormatError(f"config.json: missing field {e.args[0]!r}") from None


def config_to_hf(config: T5Config) -> dict:
    reverse = {v: k for k, v in _ACTIVATIONS.items()}
    proj = reverse.get(tuple(config.mlp_activations))
    if proj is None:
        raise CheckpointFormatError(f"activations {config.mlp_activations} have no Hugging Face name")
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": config.vocab_size, "d_model": config.emb_dim, "d_kv": config.head_dim,
        "d_ff": config.mlp_dim, "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers, "num_heads": config.num_heads,
        "feed_forward_proj": proj, "tie_word_embeddings": bool(config.logits_via_embedding),
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "layer_norm_epsilon": config.layer_norm_epsilon, "dropout_rate": config.dropout_rate,
        "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def _mlp_names(config: T5Config):
    if len(config.mlp_activations) == 1:
        return [("wi", "wi")]
    return [(f"wi_{i}", f"wi_{i}") for i in range(len(config.mlp_activations))]


def name_map(config: T5Config) -> dict[str, tuple[str, bool]]:
    """Our flat param path -> (Hugging Face tensor name, transpose?)."""
    names = {"token_embedder/embedding": ("shared.weight", False)}
    attn = {"query": "q", "key": "k", "value": "v", "out": "o"}
    mlp = _mlp_names(config) + [("wo", "wo")]
    for stack, n_layers in (("encoder", config.num_encoder_layers),
                            ("decoder", config.num_decoder_layers)):
        names[f"{stack}/relpos_bias/rel_embedding"] = (
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True)
        for i in range(n_layers):
            ours, hf = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
            if stack == "encoder":
                blocks = [("attention", "pre_attention_layer_norm", "SelfAttention")]
            else:
                blocks = [("self_attention", "pre_self_attention_layer_norm", "SelfAttention"),
                          ("encoder_decoder_attention", "pre_cross_attention_layer_norm",
                           "EncDecAttention")]
            for j, (module, norm, hf_module) in enumerate(blocks):
                names[f"{ours}/{norm}/scale"] = (f"{hf}.{j}.layer_norm.weight", False)
                for our_proj, hf_proj in attn.items():
                    names[f"{ours}/{module}/{our_proj}/kernel"] = (
                        f"{hf}.{j}.{hf_module}.{hf_proj}.weight", True)
            j = len(blocks)
            names[f"{ours}/pre_mlp_layer_norm/scale"] = (f"{hf}.{j}.layer_norm.weight", False)
            for our_w, hf_w in mlp:
                names[f"{ours}/mlp/{our_w}/kernel"] = (f"{hf}.{j}.DenseReluDense.{hf_w}.weight", True)
        norm = "encoder_norm" if stack == "encoder" else "decoder_norm"
        names[f"{stack}/{norm}/scale"] = (f"{stack}.final_layer_norm.weight", False)
    if not config.logits_via_embedding:
        names["decoder/logits_dense/kernel"] = ("lm_head.weight", True)
    return names


def _weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, WEIGHTS_INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, name) for name in files]
    single = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.exists(single):
        raise FileNotFoundError(
            f"{directory}: no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE}); a Hugging Face checkpoint "
            "directory holds config.json and model.safetensors (PyTorch .bin files are not read)")
    return [single]


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as numpy arrays (bfloat16 kept as ml_dtypes.bfloat16)."""
    tensors = {}
    for path in _weight_files(directory):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: listed in {WEIGHTS_INDEX_FILE} but missing")
        # framework="flax" reads bfloat16, which numpy alone cannot name; we convert to numpy at once.
        with safetensors.safe_open(path, framework="flax") as f:
            for key in f.keys():
                tensors[key] = np.asarray(f.get_tensor(key))
    return tensors


def params_from_hf_tensors(tensors: Mapping[str, np.ndarray], config: T5Config,
                           dtype=np.float32) -> dict[str, np.ndarray]:
    """Flat `{our/param/path: array}` from Hugging Face tensors; raises naming the tensor at fault."""
    tensors = dict(tensors)
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
        tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    names = name_map(config)
    shapes = param_shapes(config)
    flat = {}
    for ours, (hf, transpose) in names.items():
        if hf not in tensors:
            raise CheckpointFormatError(
                f"tensor {hf!r} (for {ours}) is missing from the checkpoint; is config.json's "
                f"layout ({config.mlp_activations}, tied={config.logits_via_embedding}) the right one?")
        value = np.asarray(tensors[hf])
        value = value.T if transpose else value
        expected = shapes[ours]
        if value.shape != expected:
            raise CheckpointFormatError(
                f"tensor {hf!r} has shape {tuple(np.shape(tensors[hf]))}, but config.json implies "
                f"{expected[::-1] if transpose else expected} (for {ours})")
        flat[ours] = value.astype(dtype)
    known = {hf for hf, _ in names.values()}
    # Tied copies of the embedding, and tensors transformers itself ignores.
    known |= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
              "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
    if config.logits_via_embedding:
        known.add("lm_head.weight")
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise CheckpointFormatError(
            f"tensor {unknown[0]!r} (and {len(unknown) - 1} more) does not belong to a T5 layout "
            f"with config.json's sizes; unknown layout")
    return flat


def read_hf_config(directory: str) -> dict:
    """The `config.json` of a Hugging Face checkpoint directory (clear errors if either is missing)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: missing; a Hugging Face checkpoint needs config.json")
    with open(config_path) as f:
        return json.load(f)


def load_hf_t5(directory: str, dtype=np.float32) -> tuple[T5Config, dict]:
    """Reads a Hugging Face T5 checkpoint directory -> (`T5Config`, nested params dict of numpy arrays)."""
    config = config_from_hf(read_hf_config(directory))
    flat = params_from_hf_tensors(read_safetensors(directory), config, dtype)
    return config, traverse_util.unflatten_dict(flat, sep="/")


def save_hf_t5(params: Mapping, config: T5Config, directory: str) -> None:
    """Writes `config.json` + `model.safetensors` that transformers' `T5ForConditionalGeneration` reads."""
    os.makedirs(directory, exist_ok=True)
    flat = traverse_util.flatten_dict(params, sep="/")
    tensors = {}
    for ours, (hf, transpose) in name_map(config).items():
        value = np.asarray(flat[ours], np.float32)
        tensors[hf] = np.ascontiguousarray(value.T if transpose else value)
    if config.logits_via_embedding:
        tensors["lm_head.weight"] = tensors["shared.weight"]
    safetensors.numpy.save_file(tensors, os.path.join(directory, WEIGHTS_FILE),
                                metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config_to_hf(config), f, indent=2)

