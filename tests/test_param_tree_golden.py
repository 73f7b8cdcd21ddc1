"""Golden parameter trees (issue 12): every parameter's path, shape, dtype and logical axes of the
shipped model families, checked against files under tests/golden/, so a rename (or a changed shape or
partitioning axis) cannot slip through a refactor; checkpoints, t5x checkpoints and converted Hugging
Face checkpoints all rely on these names (shared/DESIGN.md: t5x's T5.1.1 checkpoint tree).

Covered: T5.1.1 small, unrolled and scanned; MMT4 on T5.1.1 small with each representator (patches, ViT-B/32,
EfficientNet-Lite0, precomputed features); the MoE model of mmt_jax/gin/models/moe_tiny_catalog.gin
(T5.1.1 tiny, 8 experts, top-2, MoE in the odd decoder layers). Trees come from `jax.eval_shape` of
`EncoderDecoderModel.get_initial_variables` (what the trainer initialises), so nothing is computed.

A change that is meant (a new parameter, a deliberate rename with a checkpoint migration) is recorded
by regenerating the files and reviewing their diff:

    MMT_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_param_tree_golden.py
"""
import json
import os
import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from mmt_jax.layers.moe import MoeConfig
from mmt_jax.model import EncoderDecoderModel
from mmt_jax.models.config import ModelConfig
from mmt_jax.models.mmt4 import FusionConfig
from mmt_jax.models.t5 import t5_config
from mmt_jax.checkpoints import hf_t5
from mmt_jax.vision.efficientnet import efficientnet_config
from mmt_jax.vision.vit import vit_config

GOLDEN_DIR = Path(__file__).parent / "golden"
REGEN = os.environ.get("MMT_REGEN_GOLDEN", "") not in ("", "0")
REGEN_COMMAND = "MMT_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_param_tree_golden.py"

TEXT_LENGTH, TARGET_LENGTH = 8, 4


def _t5_small():
    return ModelConfig(t5_config("small"))


def _mmt4(**fusion):
    return ModelConfig(t5_config("small"), FusionConfig(**fusion))


def _moe():
    # mmt_jax/gin/models/moe_tiny_catalog.gin: t5_tiny_catalog.gin (T5.1.1 tiny, vocabulary 896) + MoE.
    return ModelConfig(t5_config("tiny", vocab_size=896,
                                 moe=MoeConfig(num_experts=8, num_selected=2, aux_loss_weight=0.1),
                                 decoder_moe_layers="odd"))


# name: (what it is, ModelConfig factory, image inputs {feature: shape without batch})
CONFIGS = {
    "t5_1_1_small": ("T5.1.1 small, text only: t5_config('small')", _t5_small, {}),
    "t5_1_1_small_scanned": ("T5.1.1 small with scanned layer stacks (layers/layer_stack.py: "
                             "layers_{i}/X -> layers/X [num_layers, ...]): "
                             "t5_config('small', scan_layers=True, remat_policy='full')",
                             lambda: ModelConfig(t5_config("small", scan_layers=True,
                                                           remat_policy="full")), {}),
    "mmt4_patches": ("MMT4 on T5.1.1 small, 32 px patches of 224 px images",
                     lambda: _mmt4(representator="patches", patch_size=32),
                     {"encoder_images": (224, 224, 3)}),
    "mmt4_vit": ("MMT4 on T5.1.1 small, ViT-B/32 at 224 px (the paper's ViT)",
                 lambda: _mmt4(representator="vit", network=vit_config("B/32")),
                 {"encoder_images": (224, 224, 3)}),
    "mmt4_lite0": ("MMT4 on T5.1.1 small, EfficientNet-Lite0 at 224 px",
                   lambda: _mmt4(representator="efficientnet", network=efficientnet_config("lite0")),
                   {"encoder_images": (224, 224, 3)}),
    "mmt4_precomputed": ("MMT4 on T5.1.1 small, precomputed features of width 1472 "
                         "(mmt_jax/gin/models/mmt4_tiny_lite0.gin's Lite0 4x4 map + pixels)",
                         lambda: _mmt4(representator="precomputed", feature_dim=1472),
                         {"encoder_image_features": (32, 1472)}),
    "moe_tiny_catalog": ("MoE: mmt_jax/gin/models/moe_tiny_catalog.gin (T5.1.1 tiny, vocabulary 896, 8 experts, "
                         "top-2, MoE in the odd decoder layers)", _moe, {}),
}


def _axes_names(meta) -> list[str] | None:
    names = getattr(meta, "names", meta)
    return None if names is None else [None if n is None else str(n) for n in names]


@functools.lru_cache(maxsize=None)
def param_tree(name: str) -> list[dict]:
    """One entry per parameter, sorted by path: path, shape, dtype, logical axes."""
    _, factory, image_inputs = CONFIGS[name]
    model = EncoderDecoderModel(factory().module())
    shapes = {"encoder_input_tokens": (1, TEXT_LENGTH), "decoder_input_tokens": (1, TARGET_LENGTH),
              "decoder_target_tokens": (1, TARGET_LENGTH), "decoder_loss_weights": (1, TARGET_LENGTH)}
    shapes.update({k: (1,) + s for k, s in image_inputs.items()})
    variables = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    axes = traverse_util.flatten_dict(variables.get("params_axes", {}), sep="/")
    # params_axes holds `<param>_axes` beside where `<param>` lives in params.
    axes = {re.sub(r"_axes$", "", path): _axes_names(meta) for path, meta in axes.items()}
    entries = []
    for path in sorted(params):
        x = params[path]
        entries.append({"path": path, "shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name,
                        "axes": axes.pop(path, None)})
    # Axes recorded for no parameter are themselves a tree change.
    entries += [{"path": path, "shape": None, "dtype": None, "axes": names, "orphan_axes": True}
                for path, names in sorted(axes.items())]
    return entries


def _golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


def _write_golden(name: str, entries: list[dict]) -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    count = sum(_size(e["shape"]) for e in entries if e["shape"] is not None)
    # Keys in a fixed order (path first), one parameter per line, for readable diffs.
    lines = ["{",
             f'  "model": {json.dumps(CONFIGS[name][0])},',
             f'  "regenerate": {json.dumps(REGEN_COMMAND)},',
             f'  "num_tensors": {len(entries)},',
             f'  "num_parameters": {count},',
             '  "params": [']
    lines += [f"    {json.dumps(e)}" + ("," if i < len(entries) - 1 else "")
              for i, e in enumerate(entries)]
    lines += ["  ]", "}"]
    _golden_path(name).write_text("\n".join(lines) + "\n")


def _read_golden(name: str) -> dict:
    path = _golden_path(name)
    if not path.exists():
        pytest.fail(f"{path} is missing; create it with: {REGEN_COMMAND}", pytrace=False)
    return json.loads(path.read_text())


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _describe(entry: dict) -> str:
    return f"shape={entry['shape']} dtype={entry['dtype']} axes={entry['axes']}"


def tree_diff(golden: list[dict], actual: list[dict], limit: int = 40) -> list[str]:
    """Compact lines: missing paths, new paths, changed shape/dtype/axes (at most `limit` of each)."""
    want = {e["path"]: e for e in golden}
    have = {e["path"]: e for e in actual}
    missing = sorted(set(want) - set(have))
    new = sorted(set(have) - set(want))
    changed = sorted(p for p in set(want) & set(have) if want[p] != have[p])
    lines = []
    for title, paths, show in (
            ("missing (in the golden file, not in the model)", missing,
             lambda p: f"  - {p}  {_describe(want[p])}"),
            ("new (in the model, not in the golden file)", new,
             lambda p: f"  + {p}  {_describe(have[p])}"),
            ("changed", changed,
             lambda p: f"  ~ {p}: {_describe(want[p])} -> {_describe(have[p])}")):
        if paths:
            lines.append(f"{len(paths)} {title}:")
            lines += [show(p) for p in paths[:limit]]
            if len(paths) > limit:
                lines.append(f"  ... and {len(paths) - limit} more")
    return lines


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_tree_matches_golden(name):
    actual = param_tree(name)
    if REGEN:
        _write_golden(name, actual)
    golden = _read_golden(name)
    diff = tree_diff(golden["params"], actual)
    if diff:
        pytest.fail(f"parameter tree of {name!r} ({CONFIGS[name][0]}) differs from "
                    f"{_golden_path(name)}:\n" + "\n".join(diff) +
                    "\nA rename breaks every existing checkpoint and converted HF/t5x checkpoint. "
                    f"If the change is intended, regenerate and review the diff: {REGEN_COMMAND}",
                    pytrace=False)
    assert golden["num_tensors"] == len(actual)
    assert golden["num_parameters"] == sum(_size(e["shape"]) for e in actual)


def test_golden_files_are_sorted_and_complete():
    """The files themselves: one per config, sorted paths, float32 parameters, axes everywhere."""
    assert sorted(p.stem for p in GOLDEN_DIR.glob("*.json")) == sorted(CONFIGS)
    for name in CONFIGS:
        params = _read_golden(name)["params"]
        paths = [e["path"] for e in params]
        assert paths == sorted(set(paths)), name
        for e in params:
            assert e["dtype"] == "float32", (name, e)
            assert e["axes"] is not None and len(e["axes"]) == len(e["shape"]), (name, e)


# Hugging Face tensor shapes of google/t5-v1_1-small (config.json: vocab 32128, d_model 512, d_kv 64,
# d_ff 1024, 6 heads, 32 buckets), written out by hand as an independent reference; torch Linear
# weights are [out, in].
_HF_T5_1_1_SMALL_SHAPES = [
    (r"shared\.weight|lm_head\.weight", (32128, 512)),
    (r".*\.(SelfAttention|EncDecAttention)\.[qkv]\.weight", (384, 512)),
    (r".*\.(SelfAttention|EncDecAttention)\.o\.weight", (512, 384)),
    (r".*\.relative_attention_bias\.weight", (32, 6)),
    (r".*layer_norm\.weight", (512,)),
    (r".*\.DenseReluDense\.wi_[01]\.weight", (1024, 512)),
    (r".*\.DenseReluDense\.wo\.weight", (512, 1024)),
]


def _hf_shape(tensor: str) -> tuple[int, ...]:
    for pattern, shape in _HF_T5_1_1_SMALL_SHAPES:
        if re.fullmatch(pattern, tensor):
            return shape
    raise AssertionError(f"no Hugging Face T5.1.1 small shape known for {tensor}")


def test_t5_1_1_small_golden_is_what_the_hf_import_covers():
    """Every golden T5.1.1-small path has a Hugging Face tensor of the right (transposed) shape, and
    every HF tensor the import reads lands on a golden path: converted checkpoints keep loading."""
    golden = {e["path"]: e for e in _read_golden("t5_1_1_small")["params"]}
    names = hf_t5.name_map(t5_config("small"))
    assert sorted(set(golden) - set(names)) == [], "golden paths no HF tensor fills"
    assert sorted(set(names) - set(golden)) == [], "HF tensors mapped to paths the model lacks"
    hf_tensors = [hf for hf, _ in names.values()]
    assert len(hf_tensors) == len(set(hf_tensors)) == 8 * 9 + 8 * 14 + 6
    for path, (hf, transpose) in names.items():
        expected = _hf_shape(hf)
        assert tuple(golden[path]["shape"]) == (expected[::-1] if transpose else expected), (path, hf)


# Parameters that exist only in MMT4 (the image branch) or the MoE layers, beyond the text T5's.
# (the relative position tables of Eq. 3's image-text pairs and of image grid positions included).
_MMT4_ONLY = re.compile(r"image_fusion/.*|encoder/relpos_bias/"
                        r"(cross_segment_embedding|grid_row_embedding|grid_col_embedding)")
_MOE_ONLY = re.compile(r"(encoder|decoder)/layers_\d+/mlp/(router/.*|expert/.*)")


def test_scanned_golden_is_the_unrolled_tree_stacked():
    """The documented mapping (layers/layer_stack.py): `layers_{i}/X [shape] (axes)` of the unrolled
    tree is `layers/X [num_layers, shape] (layers, axes)` of the scanned one; nothing else differs."""
    unrolled = _read_golden("t5_1_1_small")["params"]
    depth = {stack: len({e["path"].split("/")[1] for e in unrolled
                         if e["path"].startswith(f"{stack}/layers_")})
             for stack in ("encoder", "decoder")}
    expected = {}
    for e in unrolled:
        stack, name, rest = (e["path"].split("/", 2) + [None, None])[:3]
        if name is not None and re.fullmatch(r"layers_\d+", name):
            expected[f"{stack}/layers/{rest}"] = ([depth[stack]] + e["shape"], ["layers"] + e["axes"])
        else:
            expected[e["path"]] = (e["shape"], e["axes"])
    scanned = {e["path"]: (e["shape"], e["axes"])
               for e in _read_golden("t5_1_1_small_scanned")["params"]}
    assert scanned == expected


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - {"t5_1_1_small", "t5_1_1_small_scanned"}))
def test_other_goldens_are_the_hf_tree_plus_known_extras(name):
    """MMT4 and MoE trees: the text T5's HF-importable tree, plus only image-branch or MoE params
    (a text-only or converted HF checkpoint initialises everything else)."""
    golden = {e["path"] for e in _read_golden(name)["params"]}
    t5 = CONFIGS[name][1]().t5
    names = set(hf_t5.name_map(t5))
    extra = sorted(golden - names)
    if name.startswith("mmt4"):
        assert sorted(names - golden) == []
        assert [p for p in extra if not _MMT4_ONLY.fullmatch(p)] == []
        assert extra, "MMT4 without image-branch parameters"
    else:
        # MoE layers replace the dense MLP of the placed layers (mlp/wi_*, wo come from experts).
        placed = {f"decoder/layers_{i}/" for i in range(1, t5.num_decoder_layers, 2)}
        dense_mlp_of_placed = {p for p in names if p.split("mlp/")[0] in placed and "/mlp/" in p}
        assert sorted(names - golden) == sorted(dense_mlp_of_placed)
        assert [p for p in extra if not _MOE_ONLY.fullmatch(p)] == []
        assert any("/expert/" in p for p in extra) and any("/router/" in p for p in extra)
