"""On an accelerator: T5.1.1-base and MMT4-base train-step MFU in bfloat16, greedy decoding tokens/s,
and the same for Hugging Face's PyTorch T5 (eager and torch.compile) on the same GPU, in one process.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu_bench.py          # GPU, under 5 minutes
    PYTHONPATH=. .venv/bin/python bench/gpu_bench.py --tiny             # CPU check of every code path

Measures, in this order (a timeout leaves the parts already done, printed and in $OUT/gpu_bench.md):
  1. the device's bf16 matmul peak, measured with a jitted 8192^3 (tiny: 1024^3) bf16 matmul in JAX,
     beside the nominal dense bf16 peak of the card (H100 SXM / H200: 989 TFLOP/s);
  2. T5.1.1-base train step (forward, backward, AdamW), ours: `jax.jit(train_step)` with the state
     donated, float32 parameters and bfloat16 activations (`T5Config.dtype`); MFU and the compiled
     step's memory (`memory_analysis()`: arguments, outputs, temporaries; device peak from
     `memory_stats()`);
  3. greedy decoding, ours: `jax.jit(model.predict_batch)` (mmt_jax/decoding.py) with bfloat16 weights;
  4. MMT4-base train step (ViT-B/16 at 224 px -> Linear -> LayerNorm, fused with the T5.1.1-base
     encoder; ours only: there is no PyTorch MMT4 to compare with);
  5. the PyTorch peers on the same card, same weights (converted with `mmt_jax.checkpoints.hf_t5`):
     `T5ForConditionalGeneration` trained with float32 parameters under
     `torch.autocast(bfloat16)` (the same mixed precision as ours) and `torch.optim.AdamW(fused=True)`
     (foreach on CPU), eager and `torch.compile(model)`; greedy `generate` with bfloat16 weights
     (`model.to(bfloat16)`, as ours), eager and with transformers' compiled static-cache decoding
     (`cache_implementation="static"`), the latter only while the time budget allows.

Model FLOPs (MFU numerator): matmul FLOPs of one forward pass x 3 for a train step (backward = 2x
forward), 2 FLOPs per multiply-add, attention score and value products counted over full (not causal-
halved) matrices, embeddings and elementwise work not counted; see `t5_forward_flops` and
`vit_forward_flops`. XLA's own count of the compiled step (`cost_analysis()`) is printed beside it.

Dropout off, plain token-mean cross entropy on both sides (no z-loss, no label smoothing); the EOS
row of the output layer is zeroed so both decoders generate every token (as bench/t5_bench.py).
"""
import argparse
import copy
import dataclasses
import functools
import json
import os
import platform
import sys
import time
import types
import warnings

# Before JAX starts: grow on demand instead of taking 75% of the card, so PyTorch in this process
# has memory too (JAX's pool keeps what it has grown to; its parts run first).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: t5_bench's helpers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import numpy as np  # noqa: E402

import t5_bench  # noqa: E402  (build_hf_model, to_ours, make_batch, run_rounds, command_line, VOCAB)

T5_BASE_HF = dict(d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64)
t5_bench.SIZES.setdefault("base", T5_BASE_HF)  # the T5.1.1-base shape, for build_hf_model

# Nominal dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, matched against the device name.
NOMINAL_PEAKS = [("H200", 989.0), ("GH200", 989.0), ("H100 PCIE", 756.0), ("H100 NVL", 835.0),
                 ("H100", 989.0), ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0),
                 ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0)]

PARTS = ("t5", "decode", "mmt4", "torch", "torch-decode", "compile")
FULL = dict(dtype="bfloat16", t5_size="base", batch=64, enc_len=512, dec_len=128,
            dec_batch=64, dec_enc_len=512, new_tokens=128,
            mmt4_batch=64, mmt4_text_len=256, mmt4_dec_len=128, vit="B/16",
            warmup=3, steps=10, dec_warmup=1, dec_steps=3, peak_n=8192, budget_s=200)
TINY = dict(dtype="bfloat16", t5_size="tiny", batch=4, enc_len=64, dec_len=16,
            dec_batch=4, dec_enc_len=64, new_tokens=8,
            mmt4_batch=2, mmt4_text_len=32, mmt4_dec_len=16, vit="tiny",
            warmup=2, steps=3, dec_warmup=1, dec_steps=2, peak_n=1024, budget_s=1e9)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes and few steps (a CPU check)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the optional compiled `generate` once this many seconds have passed")
    p.add_argument("--skip-torch-compile", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="folder for gpu_bench.md / gpu_bench.json (default: $OUT, if set)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {PARTS} (default: all)")
    p.add_argument("--steps", type=int, default=None, help="timed train steps (default 10; tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up train steps (default 3; tiny 2)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing each JAX train step, trace this many more steps with "
                        "jax.profiler and print the device ops that take the most time")
    p.add_argument("--ftz-atomics", action="store_true",
                   help="add the LLVM option -nvptx-allow-ftz-atomics to XLA_FLAGS (CUDA only): jaxlib "
                        "0.10.2+ lowers f32 scatter-add to a compare-and-swap loop, very slow under "
                        "index contention (jax-ml/jax#38806); gradients of small-table lookups "
                        "(relative position bias, segment embeddings) are such scatters")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if args.parts - set(PARTS):
        p.error(f"unknown part(s) {sorted(args.parts - set(PARTS))}; known: {PARTS}")
    args.lr, args.weight_decay = 1e-4, 0.01
    return args


def cuda_plugin_installed() -> bool:
    import importlib.util
    return any(importlib.util.find_spec(f"jax_cuda{v}_plugin") is not None for v in (12, 13))


def set_xla_flags(args):
    """Before JAX starts: with --ftz-atomics, native f32 atomics in scatters; with --profile, no
    command buffers (CUDA graphs hide the ops inside them from the profiler). CUDA only."""
    if not cuda_plugin_installed():
        return
    flags = os.environ.get("XLA_FLAGS", "").split()
    if args.ftz_atomics and not any("nvptx-allow-ftz-atomics" in f for f in flags):
        prefix = "--xla_backend_extra_options="
        for i, flag in enumerate(flags):
            if flag.startswith(prefix):
                flags[i] = flag + ",-nvptx-allow-ftz-atomics"
                break
        else:
            flags.append(prefix + "-nvptx-allow-ftz-atomics")
    if args.profile and not any(f.startswith("--xla_gpu_enable_command_buffer") for f in flags):
        flags.append("--xla_gpu_enable_command_buffer=")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def install_missing_dependency_stand_ins():
    """mmt_jax.model imports `seqio` (for its default feature-converter class) and `clu.metrics` (the
    loss's metric objects) at module level; an accelerator image without them still runs the Model
    with these stand-ins: a placeholder converter class and a minimal `Average` metric."""
    stood_in = []
    try:
        import seqio  # noqa: F401
    except ImportError:
        seqio = types.ModuleType("seqio")
        seqio.EncDecFeatureConverter = type("EncDecFeatureConverter", (), {})
        sys.modules["seqio"] = seqio
        stood_in.append("seqio")
    try:
        import clu.metrics  # noqa: F401
    except ImportError:
        import jax.numpy as jnp
        from flax import struct

        @struct.dataclass
        class Average:
            total: object
            count: object

            @classmethod
            def from_model_output(cls, values, mask=None, **_):
                values = jnp.asarray(values, jnp.float32)
                if mask is None:
                    return cls(jnp.sum(values), jnp.asarray(values.size, jnp.float32))
                mask = jnp.asarray(mask, jnp.float32)
                return cls(jnp.sum(values * mask), jnp.sum(mask))

            def compute(self):
                return self.total / self.count

        clu, metrics = types.ModuleType("clu"), types.ModuleType("clu.metrics")
        metrics.Average = Average
        clu.metrics = metrics
        sys.modules["clu"], sys.modules["clu.metrics"] = clu, metrics
        stood_in.append("clu.metrics")
    return stood_in


# ---- model FLOPs ------------------------------------------------------------------------------------

def t5_forward_flops(batch, enc_len, dec_len, d_model, heads_x_kv, d_ff, enc_layers, dec_layers,
                     vocab, mlp_inputs=2):
    """Matmul FLOPs of one T5 forward pass (2 per multiply-add). Per encoder layer and token: q, k,
    v, o projections 4*2*d*hk, gated MLP (mlp_inputs + 1)*2*d*d_ff; per encoder layer and example:
    scores and values 2*2*Le^2*hk. Per decoder layer: self-attention as the encoder's (Ld), cross-
    attention q, o on decoder tokens 2*2*d*hk, k, v on encoder tokens 2*2*d*hk, scores and values
    2*2*Ld*Le*hk; then the untied output layer 2*d*vocab per decoder token."""
    enc_tok, dec_tok = batch * enc_len, batch * dec_len
    mlp = (mlp_inputs + 1) * 2 * d_model * d_ff
    proj = 4 * 2 * d_model * heads_x_kv
    enc = enc_layers * (enc_tok * (proj + mlp) + batch * 2 * 2 * enc_len * enc_len * heads_x_kv)
    dec = dec_layers * (dec_tok * (proj + 2 * 2 * d_model * heads_x_kv + mlp)
                        + enc_tok * 2 * 2 * d_model * heads_x_kv
                        + batch * 2 * 2 * dec_len * (dec_len + enc_len) * heads_x_kv)
    return enc + dec + dec_tok * 2 * d_model * vocab


def vit_forward_flops(batch, vit, out_dim):
    """Matmul FLOPs of a ViT forward over `batch` images plus MMT4's projection to `out_dim`:
    patch embedding 2*P*(p*p*3)*D; per layer and token 4*2*D^2 + 2*2*D*mlp; per layer and image
    2*2*T^2*D (T = P + 1 with CLS); projection 2*T*D*out_dim."""
    patches = (vit.image_size // vit.patch_size) ** 2
    tokens, width = patches + 1, vit.hidden_size
    per_image = (2 * patches * vit.patch_size ** 2 * 3 * width
                 + vit.num_layers * (tokens * (4 * 2 * width * width + 2 * 2 * width * vit.mlp_dim)
                                     + 2 * 2 * tokens * tokens * width)
                 + 2 * tokens * width * out_dim)
    return batch * per_image


def t5_flops_of(config, batch, enc_len, dec_len):
    return t5_forward_flops(batch, enc_len, dec_len, config.emb_dim, config.num_heads * config.head_dim,
                            config.mlp_dim, config.num_encoder_layers, config.num_decoder_layers,
                            config.vocab_size, mlp_inputs=len(config.mlp_activations))


# ---- helpers ----------------------------------------------------------------------------------------

def nominal_peak(name: str):
    upper = name.upper()
    for key, tflops in NOMINAL_PEAKS:
        if key in upper:
            return tflops
    return None


def measure_matmul_peak(n: int, dtype, reps: int = 20):
    """TFLOP/s of a jitted `[n, n] @ [n, n]` in `dtype` (f32 accumulation), best of 3 timings of
    `reps` back-to-back calls."""
    import jax
    import jax.numpy as jnp
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32).astype(dtype))
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        outs = [matmul(a, b) for _ in range(reps)]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - t0) / reps)
        del outs
    return 2 * n ** 3 / best / 1e12


def memory_summary(compiled):
    """{'argument', 'output', 'alias', 'temp', 'generated_code'}: bytes, from `memory_analysis()`."""
    try:
        analysis = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - some backends do not implement it
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    if analysis is None:
        return {"error": "memory_analysis() returned None on this backend"}
    out = {}
    for key in ("argument", "output", "alias", "temp", "generated_code"):
        value = getattr(analysis, f"{key}_size_in_bytes", None)
        if value is not None:
            out[key] = int(value)
    return out


def xla_flops(compiled):
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        return float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # noqa: BLE001
        return None


def device_peak_bytes():
    import jax
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        stats = None
    if not stats:
        return None
    return dict(peak=stats.get("peak_bytes_in_use"), in_use=stats.get("bytes_in_use"),
                limit=stats.get("bytes_limit"))


def gib(n):
    return "n/a" if n is None else f"{n / 2 ** 30:.2f} GiB"


def short_error(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


class Report:
    """Collects rows and notes; prints each as it comes and rewrites $OUT/gpu_bench.md each time."""

    def __init__(self, args, header):
        self.args, self.header = args, header
        self.rows, self.memory, self.notes, self.profiles = [], [], [], {}
        self.started = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.started

    def note(self, text):
        print(f"  note: {text}", flush=True)
        self.notes.append(text)

    def add(self, **row):
        self.rows.append(row)
        self.write()

    def table(self):
        h = self.header
        lines = [f"## gpu_bench: {h['device']}", "",
                 f"`{h['command']}`  ",
                 f"jax {h['jax']} ({h['jax_backend']}), torch {h['torch']}, transformers "
                 f"{h['transformers']}, python {h['python']}, XLA_FLAGS={h['xla_flags']!r}; "
                 f"{h['shapes']}", "",
                 f"peak bf16: nominal {h['nominal_peak']} TFLOP/s, measured {h['measured_peak']:.3g} "
                 f"TFLOP/s ({h['peak_matmul']}, in this run); MFU = model FLOPs / step time / peak; model FLOPs = "
                 "3 x forward matmul FLOPs (train), see the script's docstring", "",
                 "| model | task | contender | median | throughput | model TFLOP/s | MFU (nominal) "
                 "| MFU (measured peak) | ours / this | first call s |",
                 "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            if r.get("error"):
                lines.append(f"| {r['model']} | {r['task']} | {r['contender']} | n/a | | | | | | "
                             f"n/a: {r['error'][:150].replace('|', '/')} |")
                continue
            tflops = r.get("tflops")
            fmt = (lambda v, f: "" if v is None else f.format(v))
            lines.append(
                f"| {r['model']} | {r['task']} | {r['contender']} | {r['median_s'] * 1e3:.1f} ms | "
                f"{r['rate']:,.0f} {r['rate_unit']} | {fmt(tflops, '{:.3g}')} | "
                f"{fmt(r.get('mfu_nominal'), '{:.1%}')} | {fmt(r.get('mfu_measured'), '{:.1%}')} | "
                f"{fmt(r.get('ratio'), '{:.2f}x')} | {fmt(r.get('first_s'), '{:.1f}')} |")
        if self.memory:
            lines += ["", "| compiled step | arguments | outputs | aliased | temporaries | "
                          "device peak so far |", "|---|---:|---:|---:|---:|---:|"]
            for m in self.memory:
                a = m["analysis"]
                if "error" in a:
                    lines.append(f"| {m['name']} | n/a: {a['error'][:100]} | | | | {gib(m['peak'])} |")
                else:
                    lines.append(f"| {m['name']} | {gib(a.get('argument'))} | {gib(a.get('output'))} "
                                 f"| {gib(a.get('alias'))} | {gib(a.get('temp'))} | {gib(m['peak'])} |")
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(self):
        if not self.args.out:
            return
        os.makedirs(self.args.out, exist_ok=True)
        with open(os.path.join(self.args.out, "gpu_bench.md"), "w") as f:
            f.write(self.table())
        with open(os.path.join(self.args.out, "gpu_bench.json"), "w") as f:
            json.dump(dict(header=self.header, rows=self.rows, memory=self.memory, notes=self.notes,
                           profiles=self.profiles),
                      f, indent=1, default=str)


def timed(report, name, call, warmup, steps, label):
    """t5_bench.run_rounds for one contender: warm-up calls (compilation), then `steps` timed calls."""
    res = t5_bench.run_rounds({name: call}, 1, steps, warmup, label)[name]
    res["first_s"] = res["warmup_s"][0] if res["warmup_s"] else None
    return res


def profile_steps(call, steps, compiled, label, top=15):
    """Traces `steps` calls with jax.profiler and prints the device ops taking the most time: the
    HLO op, its opcode and fusion kind, and the JAX operation it came from (HLO metadata op_name).
    Returns the printed lines."""
    import collections
    import glob
    import re
    import tempfile
    import jax
    from jax.profiler import ProfileData

    directory = tempfile.mkdtemp(prefix="gpu_bench_trace_")
    jax.profiler.start_trace(directory)
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            call()
    finally:
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
    paths = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        return [f"  [{label}] profile: no trace written"]
    data = ProfileData.from_file(paths[0])
    planes = [pl for pl in data.planes if pl.name.startswith("/device:")]
    on_device = bool(planes)
    planes = planes or [pl for pl in data.planes if pl.name.startswith("/host:CPU")]
    totals, counts = collections.Counter(), collections.Counter()
    for plane in planes:
        for line in plane.lines:
            if on_device and not line.name.startswith("Stream"):
                continue
            for event in line.events:
                stats = {k: v for k, v in event.stats}
                name = stats.get("hlo_op") or (event.name if on_device else None)
                if name is None or event.name.startswith("end: "):
                    continue
                totals[str(name)] += event.duration_ns
                counts[str(name)] += 1
    hlo = compiled.as_text() or ""
    busy = sum(totals.values()) / 1e6 / steps
    lines = [f"  [{label}] profile of {steps} steps: {wall / steps * 1e3:.1f} ms/step wall, "
             f"{busy:.1f} ms/step in {'device kernels' if on_device else 'XLA ops (host)'}; top ops:"]
    for name, ns in totals.most_common(top):
        match = re.search(r"^\s*(?:ROOT )?%?" + re.escape(name) + r" = ([^ ]+) ([\w-]+)\((.*)$", hlo,
                          re.MULTILINE)
        what = origin = ""
        if match:
            kind = re.search(r"kind=(\w+)", match.group(3))
            what = f"{match.group(2)}{'/' + kind.group(1) if kind else ''} -> {match.group(1)[:40]}"
            op_name = re.search(r'op_name="([^"]*)"', match.group(3))
            origin = op_name.group(1)[-150:] if op_name else ""
        lines.append(f"    {ns / 1e6 / steps:8.2f} ms/step {ns / 1e6 / steps / max(busy, 1e-9):6.1%} "
                     f"x{counts[name] / steps:g} {name} | {what} | {origin}")
    print("\n".join(lines), flush=True)
    return lines


# ---- JAX contenders ---------------------------------------------------------------------------------

def jax_train(report, name, model, params, batch, flops, args):
    """Compiles and times one donated train step; records throughput, MFU and compiled memory."""
    import jax
    import optax
    from mmt_jax.training.train_state import TrainState, train_step

    tx = optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.weight_decay)
    holder = {"state": TrainState.create(params, tx)}
    t0 = time.perf_counter()
    compiled = jax.jit(functools.partial(train_step, model), donate_argnums=0).lower(
        holder["state"], batch, None).compile()
    compile_s = time.perf_counter() - t0
    analysis = memory_summary(compiled)
    counted = xla_flops(compiled)
    print(f"  [{name}] compiled in {compile_s:.1f}s; memory_analysis: "
          + (analysis.get("error") or ", ".join(f"{k} {gib(v)}" for k, v in analysis.items()))
          + (f"; XLA cost_analysis {counted / 1e12:.2f} TFLOP vs model FLOPs {flops / 1e12:.2f} TFLOP"
             if counted else ""), flush=True)

    def call():
        state, metrics = compiled(holder["state"], batch, None)
        holder["state"] = state
        return float(metrics["cross_ent_loss"].compute())

    res = timed(report, name, call, args.warmup, args.steps, name)
    res["first_s"] = compile_s + (res["first_s"] or 0.0)  # compilation + the first call
    if args.profile:
        try:
            report.profiles[name] = profile_steps(call, args.profile, compiled, name)
        except Exception as e:  # noqa: BLE001 - a diagnostic; the timing stands without it
            print(f"  [{name}] profile FAILED: {short_error(e)}", flush=True)
    peak = device_peak_bytes()
    report.memory.append(dict(name=name, analysis=analysis, peak=peak and peak["peak"],
                              compile_s=compile_s, xla_flops=counted))
    del holder
    return res, compile_s


def jax_decode(model, params, batch):
    import jax
    predict = jax.jit(model.predict_batch)

    def call():
        return np.asarray(jax.block_until_ready(predict(params, batch)))

    return call


# ---- PyTorch contenders -----------------------------------------------------------------------------

def torch_train(hf_model, batch_np, device, args, compile_model):
    import torch
    model = copy.deepcopy(hf_model).to(device).train()
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=args.weight_decay, **fused)
    enc, dec_in, targets = (torch.as_tensor(x, dtype=torch.long, device=device) for x in batch_np)
    mask = torch.ones_like(enc)
    forward = torch.compile(model) if compile_model else model

    def call():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            out = forward(input_ids=enc, attention_mask=mask, decoder_input_ids=dec_in, labels=targets)
        out.loss.backward()
        opt.step()
        return float(out.loss.detach())

    return call, model


def torch_generate(model, enc_np, new_tokens, device, compiled):
    import torch
    enc = torch.as_tensor(enc_np, dtype=torch.long, device=device)
    mask = torch.ones_like(enc)
    extra = {}
    if compiled:
        from transformers import CompileConfig
        config = CompileConfig() if device.type == "cuda" else CompileConfig(mode="default")
        config._compile_all_devices = device.type != "cuda"  # the CPU check compiles too
        extra = dict(cache_implementation="static", compile_config=config)

    def call():
        with torch.inference_mode():
            out = model.generate(input_ids=enc, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, num_beams=1, **extra)
        out = out[:, 1:].cpu().numpy()  # drop the decoder start token
        assert out.shape == (enc_np.shape[0], new_tokens), out.shape
        if compiled and not hasattr(model, "_compiled_call"):
            raise RuntimeError("generate did not compile the forward (transformers' auto-compile "
                               "criteria not met)")
        return out

    return call


# ---- main -------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    set_xla_flags(args)
    import jax
    import jax.numpy as jnp
    stood_in = install_missing_dependency_stand_ins()
    import flax
    import torch
    from flax import traverse_util
    import transformers
    from mmt_jax.model import EncoderDecoderModel
    from mmt_jax.models.mmt4 import FusionConfig
    from mmt_jax.models.t5 import EncoderDecoder, t5_config
    from mmt_jax.vision.vit import vit_config

    dtype = jnp.dtype(args.dtype)
    jax_device = jax.devices()[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = (torch.cuda.get_device_name(0) if device.type == "cuda"
                   else f"{platform.processor() or platform.machine()} CPU")
    nominal = nominal_peak(jax_device.device_kind) if jax_device.platform == "gpu" else None
    t0 = time.perf_counter()
    measured = measure_matmul_peak(args.peak_n, dtype)
    peak_s = time.perf_counter() - t0
    shapes = (f"{args.dtype}; T5.1.1-{args.t5_size} train batch {args.batch}, {args.enc_len} input / "
              f"{args.dec_len} target tokens; decode batch {args.dec_batch}, {args.dec_enc_len} input "
              f"tokens, {args.new_tokens} new tokens; MMT4 ViT-{args.vit} batch {args.mmt4_batch}, "
              f"{args.mmt4_text_len} text / {args.mmt4_dec_len} target tokens; {args.warmup} warm-up + "
              f"{args.steps} timed train steps, {args.dec_warmup} + {args.dec_steps} decode calls")
    header = dict(command=t5_bench.command_line(), device=f"{device_name} (jax: {jax_device.device_kind})",
                  jax=jax.__version__, jax_backend=jax.default_backend(), flax=flax.__version__,
                  torch=torch.__version__, transformers=transformers.__version__,
                  python=platform.python_version(), nominal_peak=nominal, measured_peak=measured,
                  peak_matmul=f"{args.peak_n}^3 {args.dtype} matmul in JAX",
                  shapes=shapes, xla_flags=os.environ.get("XLA_FLAGS", ""), stood_in=stood_in)
    report = Report(args, header)
    print(f"# gpu_bench on {header['device']}")
    print(f"command: {header['command']}")
    print(f"jax {jax.__version__} ({jax.default_backend()}) | flax {flax.__version__} | torch "
          f"{torch.__version__} | transformers {transformers.__version__} | python "
          f"{header['python']} | XLA_FLAGS={header['xla_flags']!r}")
    print(shapes)
    print(f"bf16 peak: nominal {nominal} TFLOP/s; measured {measured:.1f} TFLOP/s "
          f"({args.peak_n}^3 matmul, {peak_s:.1f}s)", flush=True)
    if args.ftz_atomics and "nvptx-allow-ftz-atomics" not in header["xla_flags"]:
        report.note("--ftz-atomics not applied: no jax CUDA plugin installed")
    if stood_in:
        report.note(f"{', '.join(stood_in)} not installed: mmt_jax.model ran with this script's "
                    "stand-ins (see install_missing_dependency_stand_ins)")
    def mfu_fields(flops, seconds):
        tflops = flops / seconds / 1e12
        return dict(tflops=tflops, mfu_nominal=tflops / nominal if nominal else None,
                    mfu_measured=tflops / measured)

    # ---- shared weights ----------------------------------------------------------------------------
    hf_model = t5_bench.build_hf_model(args.t5_size, args.seed)
    config, params_np = t5_bench.to_ours(hf_model)
    config = dataclasses.replace(config, dtype=dtype)
    n_params = sum(p.numel() for p in hf_model.parameters())
    print(f"T5.1.1-{args.t5_size}: {n_params / 1e6:.1f}M parameters, transformers attention "
          f"{hf_model.config._attn_implementation}", flush=True)
    batch_np = t5_bench.make_batch(argparse.Namespace(batch=args.batch, enc_len=args.enc_len,
                                                      dec_len=args.dec_len), args.seed + 1)
    enc_np, dec_in_np, targets_np = batch_np
    batch = {"encoder_input_tokens": jnp.asarray(enc_np), "decoder_input_tokens": jnp.asarray(dec_in_np),
             "decoder_target_tokens": jnp.asarray(targets_np)}
    t5_flops = 3 * t5_flops_of(config, args.batch, args.enc_len, args.dec_len)
    train_tokens = args.batch * (args.enc_len + args.dec_len)
    print(f"T5 train model FLOPs per step: {t5_flops / 1e12:.3f} TFLOP", flush=True)

    # ---- 2. ours: T5 train step ------------------------------------------------------------------
    ours_train = ours_train_s = ours_dec = ours_tokens = None
    if "t5" in args.parts:
        t5_model = EncoderDecoderModel(EncoderDecoder(config), z_loss=0.0, label_smoothing=0.0)
        params = jax.tree_util.tree_map(jnp.asarray, params_np)
        ours_train, _ = jax_train(report, "T5 train (jax)", t5_model, params, batch, t5_flops, args)
        ours_train_s = ours_train["median_s"]
        report.add(model=f"T5.1.1-{args.t5_size}", task="train step", contender="ours (jax.jit)",
                   median_s=ours_train_s, rate=train_tokens / ours_train_s, rate_unit="tok/s",
                   first_s=ours_train["first_s"], loss=ours_train["first"],
                   **mfu_fields(t5_flops, ours_train_s))
        print(f"  -> ours T5 train: {ours_train_s * 1e3:.1f} ms/step, "
              f"{report.rows[-1]['tflops']:.1f} TFLOP/s, MFU {report.rows[-1]['mfu_nominal'] or 0:.1%} "
              f"nominal / {report.rows[-1]['mfu_measured']:.1%} measured (elapsed {report.elapsed():.0f}s)",
              flush=True)

    # ---- 3. ours: greedy decoding ----------------------------------------------------------------
    dec_enc = enc_np[:args.dec_batch, :args.dec_enc_len]
    if dec_enc.shape != (args.dec_batch, args.dec_enc_len):
        dec_enc = t5_bench.make_batch(argparse.Namespace(batch=args.dec_batch, enc_len=args.dec_enc_len,
                                                         dec_len=1), args.seed + 2)[0]
    new_tokens = args.dec_batch * args.new_tokens
    if "decode" in args.parts:
        decode_model = EncoderDecoderModel(EncoderDecoder(config), eos_id=-1)
        params_bf16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params_np)
        dec_batch = {"encoder_input_tokens": jnp.asarray(dec_enc),
                     "decoder_input_tokens": jnp.zeros((args.dec_batch, args.new_tokens), jnp.int32)}
        ours_dec = timed(report, "ours decode", jax_decode(decode_model, params_bf16, dec_batch),
                         args.dec_warmup, args.dec_steps, "T5 greedy (jax)")
        report.add(model=f"T5.1.1-{args.t5_size}", task=f"greedy {args.new_tokens} tokens",
                   contender="ours (jax.jit predict_batch)", median_s=ours_dec["median_s"],
                   rate=new_tokens / ours_dec["median_s"], rate_unit="new tok/s", first_s=ours_dec["first_s"])
        ours_tokens = ours_dec["first"]
        del params_bf16, dec_batch
        print(f"  -> ours greedy: {new_tokens / ours_dec['median_s']:,.0f} new tok/s "
              f"(elapsed {report.elapsed():.0f}s)", flush=True)

    # ---- 4. ours: MMT4 train step ----------------------------------------------------------------
    if "mmt4" in args.parts:
        try:
            vit = vit_config(args.vit, dtype=dtype)
            fusion = FusionConfig(representator="vit", network=vit)
            mmt4_module = EncoderDecoder(config, fusion)
            # An explicit converter class: the default for an image model is imported from
            # mmt_jax.data.feature_converter, which imports TensorFlow (absent on accelerator images).
            mmt4_model = EncoderDecoderModel(mmt4_module, z_loss=0.0, label_smoothing=0.0,
                                             feature_converter_cls=type("NoConverter", (), {}))
            rng = np.random.default_rng(args.seed + 3)
            b, lt, ld = args.mmt4_batch, args.mmt4_text_len, args.mmt4_dec_len
            targets = rng.integers(2, config.vocab_size, size=(b, ld)).astype(np.int32)
            mmt4_batch = {
                "encoder_input_tokens": jnp.asarray(rng.integers(2, config.vocab_size, (b, lt)), jnp.int32),
                "encoder_images": jnp.asarray(rng.uniform(-1, 1, (b, vit.image_size, vit.image_size, 3)),
                                              jnp.float32),
                "decoder_input_tokens": jnp.asarray(
                    np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1)),
                "decoder_target_tokens": jnp.asarray(targets)}
            shapes_in = {k: v.shape for k, v in mmt4_batch.items()}
            variables = jax.jit(lambda key: mmt4_model.get_initial_variables(key, shapes_in))(
                jax.random.key(args.seed))
            # The T5 part takes the shared T5.1.1-base weights; the image branch keeps its initialisation.
            flat = traverse_util.flatten_dict(variables["params"])
            for path, value in traverse_util.flatten_dict(params_np).items():
                assert flat[path].shape == value.shape, path
                flat[path] = jnp.asarray(value)
            mmt4_params = traverse_util.unflatten_dict(flat)
            del variables, flat
            lv = vit.num_tokens
            mmt4_flops = 3 * (t5_flops_of(config, b, lv + lt, ld)
                              + vit_forward_flops(b, vit, config.emb_dim))
            print(f"MMT4 (ViT-{args.vit}, {lv} image + {lt} text encoder tokens): model FLOPs per step "
                  f"{mmt4_flops / 1e12:.3f} TFLOP", flush=True)
            res, _ = jax_train(report, "MMT4 train (jax)", mmt4_model, mmt4_params, mmt4_batch, mmt4_flops,
                               args)
            del mmt4_params, mmt4_batch
            report.add(model=f"MMT4-{args.t5_size} (ViT-{args.vit})", task="train step",
                       contender="ours (jax.jit)", median_s=res["median_s"],
                       rate=b * (lv + lt + ld) / res["median_s"], rate_unit="tok/s",
                       first_s=res["first_s"], **mfu_fields(mmt4_flops, res["median_s"]))
            print(f"  -> ours MMT4 train: {res['median_s'] * 1e3:.1f} ms/step, MFU "
                  f"{report.rows[-1]['mfu_nominal'] or 0:.1%} nominal / "
                  f"{report.rows[-1]['mfu_measured']:.1%} measured (elapsed {report.elapsed():.0f}s)",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on to the PyTorch peers
            report.add(model=f"MMT4-{args.t5_size} (ViT-{args.vit})", task="train step",
                       contender="ours (jax.jit)", error=short_error(e))
            print(f"  MMT4 FAILED: {short_error(e)}", flush=True)
        report.note("MMT4 has no PyTorch implementation to compare with; its row is ours only. Its token "
                    "count is image vectors (CLS + patches) + text + target tokens.")

    # ---- 5. PyTorch peers ------------------------------------------------------------------------
    def torch_train_row(name, compile_model):
        try:
            call, model = torch_train(hf_model, batch_np, device, args, compile_model)
            res = timed(report, name, call, args.warmup, args.steps, f"T5 train ({name})")
            if res["error"]:
                raise RuntimeError(res["error"])
            s = res["median_s"]
            report.add(model=f"T5.1.1-{args.t5_size}", task="train step", contender=name, median_s=s,
                       rate=train_tokens / s, rate_unit="tok/s",
                       ratio=s / ours_train_s if ours_train_s else None,
                       first_s=res["first_s"], loss=res["first"], **mfu_fields(t5_flops, s))
            print(f"  -> {name}: {s * 1e3:.1f} ms/step, MFU {report.rows[-1]['mfu_nominal'] or 0:.1%} "
                  f"nominal; first loss {res['first']:.4f}" + (
                      f"; ours / {name} = {s / ours_train_s:.2f}x; ours' first loss "
                      f"{ours_train['first']:.4f}" if ours_train_s else "")
                  + f" (elapsed {report.elapsed():.0f}s)", flush=True)
        except Exception as e:  # noqa: BLE001
            report.add(model=f"T5.1.1-{args.t5_size}", task="train step", contender=name,
                       error=short_error(e))
            print(f"  {name} FAILED: {short_error(e)}", flush=True)
            model = None
        if device.type == "cuda":
            report.note(f"{name} train peak memory (torch.cuda.max_memory_allocated): "
                        f"{gib(torch.cuda.max_memory_allocated())}")
            torch.cuda.reset_peak_memory_stats()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def torch_decode_row(name, compiled):
        model = None
        try:
            model = copy.deepcopy(hf_model).to(device=device, dtype=torch.bfloat16).eval()
            res = timed(report, name, torch_generate(model, dec_enc, args.new_tokens, device, compiled),
                        args.dec_warmup, args.dec_steps, f"T5 greedy ({name})")
            if res["error"]:
                raise RuntimeError(res["error"])
            s = res["median_s"]
            report.add(model=f"T5.1.1-{args.t5_size}", task=f"greedy {args.new_tokens} tokens",
                       contender=name, median_s=s, rate=new_tokens / s, rate_unit="new tok/s",
                       ratio=s / ours_dec["median_s"] if ours_dec else None,
                       first_s=res["first_s"])
            versus = ""
            if ours_dec:
                agree = float(np.mean(res["first"] == ours_tokens))
                versus = (f"; ours / {name} = {s / ours_dec['median_s']:.2f}x; greedy tokens "
                          f"identical to ours: {agree:.1%} (bf16 on both sides: rounding may flip "
                          "near-ties)")
            print(f"  -> {name}: {new_tokens / s:,.0f} new tok/s{versus} (elapsed "
                  f"{report.elapsed():.0f}s)", flush=True)
        except Exception as e:  # noqa: BLE001
            report.add(model=f"T5.1.1-{args.t5_size}", task=f"greedy {args.new_tokens} tokens",
                       contender=name, error=short_error(e))
            print(f"  {name} FAILED: {short_error(e)}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if "torch" in args.parts:
        torch_train_row("torch eager (autocast bf16)", False)
    if "torch-decode" in args.parts:
        torch_decode_row("HF generate eager (bf16)", False)
    if args.skip_torch_compile:
        report.note("torch.compile skipped (--skip-torch-compile)")
    elif "compile" in args.parts:
        torch_train_row("torch.compile (autocast bf16)", True)
        if "torch-decode" not in args.parts:
            pass
        elif report.elapsed() < args.budget_s:
            torch_decode_row("HF generate static cache + torch.compile (bf16)", True)
        else:
            report.note(f"compiled `generate` skipped: {report.elapsed():.0f}s elapsed, over the "
                        f"{args.budget_s:.0f}s budget kept for it (its compile takes a minute or more)")

    report.note(f"ours / this = this contender's time / ours (> 1: ours faster). Train tokens per step "
                f"= batch x (input + target) = {train_tokens:,}; decode throughput counts generated "
                "tokens, encoder pass included. Torch trains float32 parameters under "
                "torch.autocast(bfloat16) with AdamW(fused=True) on CUDA; ours float32 parameters "
                "with bfloat16 activations and optax.adamw. Decoding: bfloat16 weights on both sides.")
    report.note(f"total wall time {report.elapsed():.0f}s")
    report.write()
    print("\n" + report.table(), flush=True)
    if args.out:
        print(f"wrote {os.path.join(args.out, 'gpu_bench.md')} and gpu_bench.json")


if __name__ == "__main__":
    main()
