"""Hugging Face T5 checkpoints <-> our parameter tree, without torch.

A Hugging Face checkpoint is a directory with `config.json` and `model.safetensors` (or sharded
`model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`). T5.1.1 and Flan-T5
(`feed_forward_proj="gated-gelu"`, a separate `lm_head.weight`, unscaled) and the original T5
(`"relu"`, head tied to `shared.weight`, decoder output scaled by 1/sqrt(d_model)) are recognised.

Which head a `config.json` means depends on the transformers version that wrote it. Transformers 4
ties and scales iff `tie_word_embeddings` (default true). Transformers 5 writes
`"tie_word_embeddings": true` for every T5 and says `"scale_decoder_outputs"` instead; it scales iff
that is true and uses `lm_head.weight` when the file holds one that differs from `shared.weight`:

  tie_word_embeddings   scale_decoder_outputs   head                                   ours
  true or absent        absent or true          shared.weight, scaled (original T5)    tied
  false                 absent or false         lm_head.weight, unscaled (T5.1.1)      untied
  true or absent        false                   lm_head.weight, else shared.weight;    untied
                                                unscaled (T5.1.1 saved by transformers 5)
  false                 true                    refused: versions 4 and 5 disagree

A tied head with a stored `lm_head.weight` unequal to `shared.weight` is refused, naming the tensor:
transformers 4 would drop it, transformers 5 would use it. Exports write both fields (equal), which
both versions read the same way.

Torch `Linear` weights are `[out, in]`; our kernels are `[in, out]`, so every kernel is transposed.
"""
import json
import os
from typing import Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from mmt_jax.errors import CheckpointFormatError
from mmt_jax.layers import layer_stack
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


def _head_fields(hf_config: Mapping) -> tuple[bool, bool]:
    """(tie_word_embeddings, scaled head) of a `config.json`, by the module docstring's table."""
    for field in ("tie_word_embeddings", "scale_decoder_outputs"):
        if not isinstance(hf_config.get(field, True), bool):
            raise CheckpointFormatError(
                f"config.json: {field} is {hf_config[field]!r}; it must be true or false")
    tie = hf_config.get("tie_word_embeddings", True)
    scaled = hf_config.get("scale_decoder_outputs", tie)
    if scaled and not tie:
        raise CheckpointFormatError(
            "config.json: tie_word_embeddings false with scale_decoder_outputs true is an untied, "
            "scaled head, which transformers 4 reads unscaled and transformers 5 scaled; set both "
            "to the same value")
    return tie, scaled


UNKNOWN_VALUE = "unknown {field} {value!r}; known: {known}"


def config_field(hf_config: Mapping, field: str, default, allowed, problem: str):
    """`hf_config[field]` (or `default`), or a CheckpointFormatError saying `problem` (formatted
    with `field`, `value` and the sorted `known` values) when it is not one of `allowed`."""
    value = hf_config.get(field, default)
    if value not in allowed:
        raise CheckpointFormatError("config.json: " + problem.format(
            field=field, value=value, known=sorted(allowed)))
    return value


def config_from_hf(hf_config: Mapping) -> T5Config:
    """Maps a Hugging Face T5 `config.json` dict (transformers 4 or 5) to `T5Config`."""
    config_field(hf_config, "model_type", "t5", ("t5", "mt5"),
                 "{field} {value!r} is not a T5 layout")
    proj = config_field(hf_config, "feed_forward_proj", "relu", _ACTIVATIONS, UNKNOWN_VALUE)
    try:
        return T5Config(
            vocab_size=hf_config["vocab_size"], emb_dim=hf_config["d_model"],
            num_heads=hf_config["num_heads"], head_dim=hf_config["d_kv"], mlp_dim=hf_config["d_ff"],
            num_encoder_layers=hf_config["num_layers"],
            num_decoder_layers=hf_config.get("num_decoder_layers") or hf_config["num_layers"],
            mlp_activations=_ACTIVATIONS[proj],
            logits_via_embedding=_head_fields(hf_config)[1],
            dropout_rate=0.0,
            relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6))
    except KeyError as e:
        raise CheckpointFormatError(f"config.json: missing field {e.args[0]!r}") from None


def config_to_hf(config: T5Config) -> dict:
    """The `config.json` dict of `config`; transformers 4 and 5 both read its head the same way."""
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
        "scale_decoder_outputs": bool(config.logits_via_embedding),
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


def _file_holding(directory: str, tensor: str) -> str:
    """The weights file of a checkpoint directory that lists `tensor`."""
    index = os.path.join(directory, WEIGHTS_INDEX_FILE)
    if not os.path.exists(index):
        return os.path.join(directory, WEIGHTS_FILE)
    with open(index) as f:
        return os.path.join(directory, json.load(f)["weight_map"].get(tensor, WEIGHTS_INDEX_FILE))


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as numpy arrays (bfloat16 kept as ml_dtypes.bfloat16)."""
    tensors = {}
    for path in _weight_files(directory):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: listed in {WEIGHTS_INDEX_FILE} but missing")
        try:
            # framework="flax" reads bfloat16, which numpy alone cannot name; converted at once.
            with safetensors.safe_open(path, framework="flax") as f:
                for key in f.keys():
                    tensor = np.asarray(f.get_tensor(key))
                    if tensor.dtype.kind != "f" and tensor.dtype != ml_dtypes.bfloat16:
                        raise CheckpointFormatError(f"{path}: tensor {key!r} has dtype "
                                                    f"{tensor.dtype}; T5 weights are floating point")
                    tensors[key] = tensor
        except safetensors.SafetensorError as e:
            raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors


def params_from_hf_tensors(tensors: Mapping[str, np.ndarray], config: T5Config,
                           dtype=np.float32, lm_head_file: str = "the checkpoint"
                           ) -> dict[str, np.ndarray]:
    """Flat `{our/param/path: array}` from Hugging Face tensors; raises naming the tensor at fault.

    A tied `config` accepts a stored `lm_head.weight` only as an exact copy of `shared.weight`;
    lm_head_file: where that tensor was read from, for the error.
    """
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
    if config.logits_via_embedding and "lm_head.weight" in tensors:
        if not np.array_equal(tensors["lm_head.weight"], tensors["shared.weight"]):
            raise CheckpointFormatError(
                f"{lm_head_file}: tensor 'lm_head.weight' differs from 'shared.weight', but "
                "config.json ties them (a scaled, original-T5 head): transformers 4 would ignore "
                "it and transformers 5 use it. A separate head needs tie_word_embeddings and "
                "scale_decoder_outputs false")
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
    try:
        with open(config_path, encoding="utf-8") as f:
            hf_config = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointFormatError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(hf_config, dict):
        raise CheckpointFormatError(f"{config_path}: expected a JSON object, got "
                                    f"{type(hf_config).__name__}")
    return hf_config


def load_hf_t5(directory: str, dtype=np.float32) -> tuple[T5Config, dict]:
    """Reads a Hugging Face T5 checkpoint directory -> (`T5Config`, nested params dict of numpy arrays)."""
    hf_config = read_hf_config(directory)
    config = config_from_hf(hf_config)
    tensors = read_safetensors(directory)
    tie, _ = _head_fields(hf_config)
    if (tie and not config.logits_via_embedding and "lm_head.weight" not in tensors
            and "shared.weight" in tensors):
        # An unscaled head saved tied by transformers 5, which ties a head the file does not hold.
        tensors["lm_head.weight"] = tensors["shared.weight"]
    try:
        flat = params_from_hf_tensors(tensors, config, dtype,
                                      lm_head_file=_file_holding(directory, "lm_head.weight"))
    except CheckpointFormatError as e:
        raise (e if directory in str(e) else CheckpointFormatError(f"{directory}: {e}")) from None
    return config, traverse_util.unflatten_dict(flat, sep="/")


def save_hf_t5(params: Mapping, config: T5Config, directory: str) -> None:
    """Writes `config.json` + `model.safetensors` that transformers' `T5ForConditionalGeneration` reads
    (a scanned model's stacked layers unrolled first)."""
    os.makedirs(directory, exist_ok=True)
    flat = traverse_util.flatten_dict(layer_stack.unscanned(params), sep="/")
    tensors = {}
    for ours, (hf, transpose) in name_map(config).items():
        value = np.asarray(flat[ours], np.float32)
        tensors[hf] = np.ascontiguousarray(value.T if transpose else value)
    safetensors.numpy.save_file(tensors, os.path.join(directory, WEIGHTS_FILE),
                                metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config_to_hf(config), f, indent=2)

