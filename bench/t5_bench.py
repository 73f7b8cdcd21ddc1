"""Our JAX/Flax T5 against Hugging Face transformers' PyTorch T5 of the same config, in one process.

Measures, for each size:
  1. a training step (forward, backward, AdamW update; float32, dropout off, plain token-mean cross
     entropy on both sides): ours = `jax.jit(train_step)` with the state donated; theirs = eager
     PyTorch and `torch.compile` of the model;
  2. greedy decoding of a fixed number of new tokens: ours = `jax.jit(model.predict_batch)` (with
     `--int8`, also on `quantization.quantize_params` of the same weights); theirs =
     `model.generate(do_sample=False, num_beams=1, min_new_tokens=max_new_tokens=N)`.

Both sides start from the same weights (the Hugging Face model is converted with
`mmt_jax.checkpoints.hf_t5`), so the first training losses and the decoded tokens are printed as a check
that the two do the same work. Contenders are warmed up (compiled) first and then timed in alternating
rounds, so machine-load drift affects all of them alike; figures are medians over all timed steps.

    .venv/bin/python bench/t5_bench.py --sizes tiny,small --rounds 5 --steps 4 --json bench/out.json
"""
import argparse
import copy
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings

import numpy as np

# Size name -> Hugging Face T5 config fields (T5.1.1 layout: gated-gelu MLP, untied output head).
SIZES = {
    "tiny": dict(d_model=128, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=32),
    "small": dict(d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64),
}
VOCAB = 32128
EOS_ID = 1


INT8 = "ours int8 (quantization.py)"
BF16 = "ours, bfloat16"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,small", help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    p.add_argument("--steps", type=int, default=4,
                   help="timed train steps (and decode calls) per contender per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per contender before timing")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--enc-len", type=int, default=256)
    p.add_argument("--dec-len", type=int, default=32, help="decoder length (train) and new tokens (decode)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--skip-compile", action="store_true", help="no torch.compile contender")
    p.add_argument("--loss-chunk", type=int, default=None, metavar="N",
                   help="also time our train step with the loss made N target positions at a time "
                        "(loss_chunk_length: no whole [batch, length, vocab] logits)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--int8", action="store_true",
                   help="also decode with int8 dense kernels and activations (mmt_jax/quantization.py)")
    p.add_argument("--bf16", action="store_true",
                   help="also time our train step and decoding with bfloat16 activations "
                        "(T5Config.dtype; parameters and optimizer stay float32)")
    p.add_argument("--hf-attn", default=None, choices=["eager", "sdpa"],
                   help="transformers attention implementation (default: transformers' choice)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="also write all results to this file")
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown size(s) {unknown}; known: {sorted(SIZES)}")
    return args


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def command_line() -> str:
    exe = sys.executable
    try:
        rel = os.path.relpath(exe)
        exe = rel if not rel.startswith("..") else exe
    except ValueError:
        pass
    return shlex.join([exe, *sys.argv])


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ---- model construction -------------------------------------------------------------------------

def build_hf_model(size: str, seed: int, attn_impl=None):
    """An untied T5.1.1 `T5ForConditionalGeneration` (transformers 5.x ties lm_head by default; see
    tests/hf_reference.py), with transformers' own initialisation except the head, whose EOS row is
    zeroed so that greedy decoding never prefers EOS (both sides then decode all tokens)."""
    import torch
    import transformers
    torch.manual_seed(seed)
    fields = dict(SIZES[size], vocab_size=VOCAB, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=EOS_ID, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128)
    config = transformers.T5Config(**fields)
    if attn_impl:
        config._attn_implementation = attn_impl
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():
        head = torch.randn_like(model.shared.weight) * fields["d_model"] ** -0.5
        head[EOS_ID] = 0.0
        model.lm_head.weight = torch.nn.Parameter(head)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not model.config.scale_decoder_outputs
    return model


def to_ours(hf_model):
    """(T5Config, nested numpy params) of the same weights, via the package's HF importer."""
    from flax import traverse_util
    from mmt_jax.checkpoints import hf_t5
    hf_config = dict(hf_model.config.to_dict(), tie_word_embeddings=False)
    config = hf_t5.config_from_hf(hf_config)
    tensors = {k: v.detach().cpu().numpy() for k, v in hf_model.state_dict().items()}
    flat = hf_t5.params_from_hf_tensors(tensors, config)
    return config, traverse_util.unflatten_dict(flat, sep="/")


def bfloat16(config):
    """The same model computing its activations in bfloat16."""
    import dataclasses
    import jax.numpy as jnp
    return dataclasses.replace(config, dtype=jnp.bfloat16)


def make_batch(args, seed):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, VOCAB, size=(args.batch, args.enc_len)).astype(np.int32)
    targets = rng.integers(2, VOCAB, size=(args.batch, args.dec_len)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((args.batch, 1), np.int32), targets[:, :-1]], axis=1)
    return enc, dec_in, targets


# ---- contenders -----------------------------------------------------------------------------------

def jax_train_contender(config, params_np, batch_np, args, loss_chunk_length=None):
    import jax
    import jax.numpy as jnp
    import optax
    from mmt_jax.model import EncoderDecoderModel
    from mmt_jax.models.t5 import EncoderDecoder
    from mmt_jax.training.train_state import TrainState, train_step

    model = EncoderDecoderModel(EncoderDecoder(config), z_loss=0.0, label_smoothing=0.0,
                                loss_chunk_length=loss_chunk_length)
    tx = optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.weight_decay)
    state = TrainState.create(jax.tree_util.tree_map(jnp.array, params_np), tx)
    enc, dec_in, targets = batch_np
    batch = {"encoder_input_tokens": jnp.asarray(enc), "decoder_input_tokens": jnp.asarray(dec_in),
             "decoder_target_tokens": jnp.asarray(targets)}
    step = jax.jit(functools.partial(train_step, model), donate_argnums=0)
    holder = {"state": state}

    def call():
        new_state, metrics = step(holder["state"], batch, None)
        jax.block_until_ready((new_state, metrics))
        holder["state"] = new_state
        return float(metrics["cross_ent_loss"].compute())

    # XLA's own count of the compiled step's scratch memory (activations, gradients, logits)
    call.temp_mib = step.lower(state, batch, None).compile().memory_analysis().temp_size_in_bytes / 2**20
    return call


def torch_train_contender(hf_model, batch_np, args, compile_model: bool):
    import torch
    model = copy.deepcopy(hf_model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=args.weight_decay)
    enc, dec_in, targets = (torch.as_tensor(x, dtype=torch.long) for x in batch_np)
    mask = torch.ones_like(enc)
    forward = torch.compile(model) if compile_model else model

    def call():
        opt.zero_grad(set_to_none=True)
        out = forward(input_ids=enc, attention_mask=mask, decoder_input_ids=dec_in, labels=targets)
        out.loss.backward()
        opt.step()
        return float(out.loss.detach())

    return call


def jax_decode_contender(config, params_np, enc_np, args, int8=False):
    import jax
    import jax.numpy as jnp
    from mmt_jax import quantization
    from mmt_jax.model import EncoderDecoderModel
    from mmt_jax.models.t5 import EncoderDecoder

    # eos_id=-1: never stop early, so every row decodes all tokens (as min_new_tokens forces on theirs).
    model = EncoderDecoderModel(EncoderDecoder(config), eos_id=-1)
    params = jax.tree_util.tree_map(
        jnp.array, quantization.quantize_params(params_np) if int8 else params_np)
    batch = {"encoder_input_tokens": jnp.asarray(enc_np),
             "decoder_input_tokens": jnp.zeros((args.batch, args.dec_len), jnp.int32)}
    predict = jax.jit(model.predict_batch)

    def call():
        return np.asarray(jax.block_until_ready(predict(params, batch)))

    return call


def torch_decode_contender(hf_model, enc_np, args):
    import torch
    model = hf_model.eval()
    enc = torch.as_tensor(enc_np, dtype=torch.long)
    mask = torch.ones_like(enc)

    def call():
        with torch.inference_mode():
            out = model.generate(input_ids=enc, attention_mask=mask, max_new_tokens=args.dec_len,
                                 min_new_tokens=args.dec_len, do_sample=False, num_beams=1)
        out = out[:, 1:].numpy()  # drop the decoder start token
        assert out.shape == (args.batch, args.dec_len), out.shape
        return out

    return call


def run_rounds(contenders, rounds, steps, warmup, label):
    """Warms up each contender, then times them in alternating rounds. `contenders`: name -> call.
    Returns name -> dict(times=[...], warmup_s=[...], first=value, error=str|None)."""
    results = {}
    live = {}
    for name, call in contenders.items():
        res = results[name] = dict(times=[], warmup_s=[], first=None, error=None)
        try:
            for i in range(max(warmup, 1)):
                t0 = time.perf_counter()
                value = call()
                res["warmup_s"].append(time.perf_counter() - t0)
                if i == 0:
                    res["first"] = value
            live[name] = call
            print(f"  [{label}] warm-up {name}: " +
                  ", ".join(f"{t:.3f}s" for t in res["warmup_s"]), flush=True)
        except Exception as e:  # noqa: BLE001 - a failing peer (torch.compile) is reported, not fatal
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            res["error"] = msg[:300]
            print(f"  [{label}] {name} FAILED during warm-up: {res['error']}", flush=True)
    for r in range(rounds):
        line = []
        for name, call in live.items():
            for _ in range(steps):
                t0 = time.perf_counter()
                call()
                results[name]["times"].append(time.perf_counter() - t0)
            line.append(f"{name} {median(results[name]['times'][-steps:]):.4f}s")
        print(f"  [{label}] round {r + 1}/{rounds}: " + ", ".join(line), flush=True)
    for res in results.values():
        res["median_s"] = median(res["times"])
        res["min_s"] = min(res["times"]) if res["times"] else float("nan")
    return results


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    cores = usable_cores()
    import jax
    import torch
    import transformers
    import flax
    import optax

    threads = args.threads or cores
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")

    header = dict(
        command=command_line(), python=platform.python_version(), jax=jax.__version__,
        jaxlib=getattr(jax.lib, "__version__", None) or jax.__version__, flax=flax.__version__,
        optax=optax.__version__, torch=torch.__version__, transformers=transformers.__version__,
        platform=platform.platform(), processor=platform.processor() or platform.machine(),
        cores=cores, torch_threads=torch.get_num_threads(), jax_devices=str(jax.devices()),
        xla_flags=os.environ.get("XLA_FLAGS", ""), batch=args.batch, enc_len=args.enc_len,
        dec_len=args.dec_len, rounds=args.rounds, steps=args.steps, warmup=args.warmup, lr=args.lr,
        weight_decay=args.weight_decay)
    print("# T5 benchmark: mmt_jax (JAX/Flax) vs transformers (PyTorch)")
    print(f"command: {header['command']}")
    print(f"python {header['python']} | jax {header['jax']} | flax {header['flax']} | optax "
          f"{header['optax']} | torch {header['torch']} | transformers {header['transformers']}")
    print(f"{header['platform']} | {cores} usable cores | torch threads {header['torch_threads']} | "
          f"jax devices {header['jax_devices']} | XLA_FLAGS={header['xla_flags']!r}")
    print(f"batch {args.batch}, encoder length {args.enc_len}, decoder length / new tokens "
          f"{args.dec_len}, float32, dropout off, AdamW lr {args.lr} wd {args.weight_decay}; "
          f"{args.rounds} rounds x {args.steps} steps per contender after {args.warmup} warm-up",
          flush=True)

    all_results = dict(header=header, sizes={})
    rows = []
    for size in args.sizes:
        print(f"\n## {size}: {SIZES[size]}, vocab {VOCAB}, gated-gelu, untied head", flush=True)
        hf_model = build_hf_model(size, args.seed, args.hf_attn)
        n_params = sum(p.numel() for p in hf_model.parameters())
        attn_impl = hf_model.config._attn_implementation
        config, params_np = to_ours(hf_model)
        print(f"  {n_params / 1e6:.1f}M parameters; transformers attention: {attn_impl}", flush=True)
        batch_np = make_batch(args, args.seed + 1)
        size_res = all_results["sizes"][size] = dict(params=n_params, hf_attn=attn_impl,
                                                       config=config.to_json_dict()
                                                       if hasattr(config, "to_json_dict") else
                                                       str(config))

        if not args.skip_train:
            tokens = args.batch * (args.enc_len + args.dec_len)
            contenders = {"ours (jax.jit)": jax_train_contender(config, params_np, batch_np, args),
                          "torch eager": torch_train_contender(hf_model, batch_np, args, False)}
            if args.loss_chunk:
                contenders[f"ours, loss chunk {args.loss_chunk}"] = jax_train_contender(
                    config, params_np, batch_np, args, args.loss_chunk)
            if args.bf16:
                contenders[BF16] = jax_train_contender(bfloat16(config), params_np, batch_np, args)
            if not args.skip_compile:
                contenders["torch.compile"] = torch_train_contender(hf_model, batch_np, args, True)
            res = run_rounds(contenders, args.rounds, args.steps, args.warmup, f"{size} train")
            for name, call in contenders.items():
                if hasattr(call, "temp_mib"):
                    res[name]["temp_mib"] = call.temp_mib
                    print(f"  {name}: compiled step's temporary memory {call.temp_mib:.1f} MiB")
            firsts = {k: v["first"] for k, v in res.items() if v["first"] is not None}
            print("  loss after warm-up step 1 (same weights and batch; should agree): " +
                  ", ".join(f"{k} {v:.5f}" for k, v in firsts.items()))
            ours = res["ours (jax.jit)"]
            for name, r in res.items():
                r["tokens_per_s"] = tokens / r["median_s"] if r["times"] else float("nan")
                r["ours_over_theirs"] = (ours["tokens_per_s"] / r["tokens_per_s"]
                                         if not name.startswith("ours") and r["times"] else None)
                r["compile_or_first_call_s"] = r["warmup_s"][0] if r["warmup_s"] else None
                rows.append(dict(size=size, task="train step", contender=name, unit="s/step",
                                 median_s=r["median_s"], min_s=r["min_s"], rate=r["tokens_per_s"],
                                 rate_unit="tokens/s (enc+dec)", ratio=r["ours_over_theirs"],
                                 error=r["error"], first_call_s=r["compile_or_first_call_s"]))
            size_res["train"] = dict(tokens_per_step=tokens, results=res, first_losses=firsts)

        if not args.skip_decode:
            new_tokens = args.batch * args.dec_len
            enc_np = batch_np[0]
            contenders = {"ours (jax.jit predict_batch)":
                          jax_decode_contender(config, params_np, enc_np, args),
                          "HF generate (eager)": torch_decode_contender(hf_model, enc_np, args)}
            if args.int8:
                contenders[INT8] = jax_decode_contender(config, params_np, enc_np, args, int8=True)
            if args.bf16:
                contenders[BF16] = jax_decode_contender(bfloat16(config), params_np, enc_np, args)
            res = run_rounds(contenders, args.rounds, args.steps, args.warmup, f"{size} decode")
            a, b = (res[k]["first"] for k in list(contenders)[:2])
            if args.int8 and res[INT8]["times"] and a is not None:
                print(f"  int8 over float32: {res['ours (jax.jit predict_batch)']['median_s'] / res[INT8]['median_s']:.2f}x "
                      f"the tokens/s; greedy tokens identical to float32's: "
                      f"{np.mean(np.asarray(res[INT8]['first']) == a) * 100:.1f}%")
            agree = None
            if a is not None and b is not None:
                agree = float(np.mean(a == b))
                print(f"  greedy tokens identical: {agree * 100:.1f}% of {a.size}; "
                      f"EOS in ours: {int(np.sum(a == EOS_ID))}, in theirs: {int(np.sum(b == EOS_ID))}")
            ours = res["ours (jax.jit predict_batch)"]
            for name, r in res.items():
                r["new_tokens_per_s"] = new_tokens / r["median_s"] if r["times"] else float("nan")
                r["ours_over_theirs"] = (ours["new_tokens_per_s"] / r["new_tokens_per_s"]
                                         if not name.startswith("ours") and r["times"]
                                         else None)
                r["first"] = None if r["first"] is None else np.asarray(r["first"]).tolist()
                rows.append(dict(size=size, task=f"greedy {args.dec_len} tokens", contender=name,
                                 unit="s/batch", median_s=r["median_s"], min_s=r["min_s"],
                                 rate=r["new_tokens_per_s"],
                                 rate_unit="new tokens/s", ratio=r["ours_over_theirs"],
                                 error=r["error"], first_call_s=r["warmup_s"][0] if r["warmup_s"] else None))
            size_res["decode"] = dict(new_tokens_per_call=new_tokens, results=res,
                                      token_agreement=agree)
        del hf_model

    # ---- summary table --------------------------------------------------------------------------
    print("\n## Results (medians; ratio = our throughput / theirs, > 1 means ours is faster)\n")
    print(f"`{header['command']}`  ")
    print(f"jax {header['jax']}, torch {header['torch']}, transformers {header['transformers']}, "
          f"{cores} CPU cores, float32, batch {args.batch}, encoder {args.enc_len} / decoder "
          f"{args.dec_len} tokens, {args.rounds} rounds x {args.steps} steps\n")
    print("| size | task | contender | median s | min s | throughput | ours / theirs | first call s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["error"]:
            print(f"| {r['size']} | {r['task']} | {r['contender']} | n/a | n/a | n/a | n/a | "
                  f"n/a ({r['error'][:120].replace('|', '/')}) |")
            continue
        unit = "tok/s" if r["task"] == "train step" else "new tok/s"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        first = "" if r["first_call_s"] is None else f"{r['first_call_s']:.1f}"
        print(f"| {r['size']} | {r['task']} | {r['contender']} | {r['median_s']:.4f} | {r['min_s']:.4f} | "
              f"{r['rate']:,.0f} {unit} | {ratio} | {first} |")
    print("\nthroughput and ratio from the median; train = (encoder + decoder) tokens per second; "
          "decode = generated tokens per second (encoder pass included). min = fastest timed call "
          "(less sensitive to other load on the machine). first call = warm-up call incl. compilation.")

    if args.json:
        all_results["rows"] = rows
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(all_results, f, indent=1, default=str)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
