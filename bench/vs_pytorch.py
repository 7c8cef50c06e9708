"""PyTorch side of bench/vs_pytorch.ts (benchmark only; never run by CI or the tests).

Called by bench/vs_pytorch.ts with the interpreter of the local venv (.venv/vs-pytorch), one process
per measurement, so that each side's peak RSS is its own:

  python bench/vs_pytorch.py gemm  --threads 2 --size 2048
  python bench/vs_pytorch.py train --threads 2 --spec '{...}'

`--spec` is the JSON that vs_pytorch.ts builds from the engine's own config of the case (the
model shape, the optimizer settings and lr); nothing about the model is restated here. With
`"precision": "bf16"` the forward and the loss run under
`torch.autocast("cpu", dtype=torch.bfloat16)` (weights, gradients and optimizer state stay fp32,
as ours keeps them under `--precision bf16`). Prints one JSON line on stdout.
"""

import argparse
import json
import os
import sys
import time


def threads_from_argv() -> int:
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
    return 2


# Thread pools are sized when torch is imported: set them first.
_T = str(threads_from_argv())
for _k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_k] = _T
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(int(_T))
try:
    torch.set_num_interop_threads(1)
except RuntimeError:
    pass

NOTES: list = []


def vm_hwm() -> int:
    """Peak resident set of this process (bytes), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "galore_torch", "q_galore_torch", "bitsandbytes"):
        try:
            from importlib.metadata import version

            out[name] = version(name.replace("_", "-"))
        except Exception as e:  # noqa: BLE001
            out[name] = f"unavailable: {e}"
    out["mkl"] = torch.backends.mkl.is_available()
    out["mkldnn"] = torch.backends.mkldnn.is_available()
    return out


def gemm(size: int, iters: int) -> dict:
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    c = torch.empty(size, size)
    torch.mm(a, b, out=c)  # warm-up
    best = float("inf")
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        dt = time.perf_counter() - t0
        times.append(dt)
        best = min(best, dt)
    times.sort()
    med = times[len(times) // 2]
    flops = 2.0 * size**3
    return {
        "torch_gemm_gflops": round(flops / med / 1e9, 1),
        "torch_gemm_gflops_best": round(flops / best / 1e9, 1),
        "size": size,
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }


# ---------------------------------------------------------------------------------------------
# Running q-galore-torch on the CPU.
#
# q_galore_torch 1.0 calls torch.cuda.synchronize() after every parameter update, which raises
# on a machine without a CUDA driver; on the CPU there is nothing to wait for, so it is made a
# no-op here when CUDA is unavailable. Its INT8 layer (QGaLoreLinear) lives in the Q-GaLore
# repository's utils, not in the PyPI package, so the INT8 linear below implements the interface
# that the package's QGaLoreAdamW8bit expects: a uint8 weight Parameter with `scales`, `zeros`,
# `group_size` and `stochastic_round` attributes whose gradient goes to `weight.float_grad`.
# ---------------------------------------------------------------------------------------------


def patch_cuda_sync() -> None:
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
        NOTES.append("torch.cuda.synchronize made a no-op (no CUDA here; q-galore-torch calls it)")


def quantize_groups(w: torch.Tensor, group: int):
    """Asymmetric 8-bit quantization in groups of `group` consecutive elements (uint8 codes)."""
    shape = w.shape
    g = w.reshape(-1, group)
    hi = g.amax(dim=1, keepdim=True)
    lo = g.amin(dim=1, keepdim=True)
    scales = (hi - lo).clamp(min=1e-5) / 255.0
    zeros = (-torch.round(lo / scales)).clamp_(0, 255)
    q = torch.clamp(torch.round(g / scales) + zeros, 0, 255)
    return q.reshape(shape).to(torch.uint8), scales, zeros


def dequantize(weight: torch.Tensor, dtype) -> torch.Tensor:
    f = weight.to(dtype).reshape(-1, weight.group_size)
    f.sub_(weight.zeros).mul_(weight.scales)
    return f.reshape(weight.shape)


class Int8MatMul(torch.autograd.Function):
    """y = x · dequant(W)ᵀ; the weight gradient is accumulated into W.float_grad."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ dequantize(weight, x.dtype).t()

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx = gy @ dequantize(weight, gy.dtype)
        out_f, in_f = weight.shape
        gw = gy.reshape(-1, out_f).t() @ x.reshape(-1, in_f)
        if getattr(weight, "float_grad", None) is not None:
            weight.float_grad += gw
        else:
            weight.float_grad = gw
        return gx, None


class Int8Linear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, group: int, stochastic_round: bool):
        super().__init__()
        assert linear.bias is None
        q, scales, zeros = quantize_groups(linear.weight.data, group)
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.weight.scales = scales
        self.weight.zeros = zeros
        self.weight.group_size = group
        self.weight.stochastic_round = stochastic_round
        self.weight.float_grad = None

    def forward(self, x):
        return Int8MatMul.apply(x, self.weight)


def qgalore_for_current_bnb(base):
    """QGaLoreAdamW8bit with an update_step that bitsandbytes 0.50 accepts."""
    from bitsandbytes.optim.optimizer import Optimizer2State

    class Adapted(base):
        def update_step(self, group, p, gindex, pindex, flag_use_float_grad=False):
            if not flag_use_float_grad:
                return Optimizer2State.update_step(self, group, p, gindex, pindex)
            saved = p.grad
            p.grad = p.float_grad  # p.data is float here (q-galore dequantized it)
            try:
                return Optimizer2State.update_step(self, group, p, gindex, pindex)
            finally:
                p.grad = saved

    return Adapted


PROJECTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projected_linears(model):
    """The 7 matrices of every decoder block: the ones our engine projects (and, for qgalore,
    keeps in INT8); embeddings, lm_head and norms are plain."""
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in PROJECTED
    ]


def build_model(model_cfg: dict):
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        vocab_size=model_cfg["vocab_size"],
        hidden_size=model_cfg["hidden_size"],
        intermediate_size=model_cfg["intermediate_size"],
        num_attention_heads=model_cfg["num_attention_heads"],
        num_key_value_heads=model_cfg["num_key_value_heads"],
        num_hidden_layers=model_cfg["num_hidden_layers"],
        max_position_embeddings=model_cfg["max_position_embeddings"],
        rms_norm_eps=model_cfg["rms_norm_eps"],
        initializer_range=model_cfg["initializer_range"],
        tie_word_embeddings=bool(model_cfg.get("tie_word_embeddings", False)),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )
    if model_cfg.get("rope_scaling"):
        raise SystemExit("vs_pytorch.py: rope_scaling is not supported by this benchmark")
    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": model_cfg["rope_theta"]}
    else:
        kw["rope_theta"] = model_cfg["rope_theta"]
    cfg = LlamaConfig(**kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()  # attn_implementation: the default (sdpa)
    model.train()
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    shape = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
    }
    return model, shape


def build_optimizer(model, spec: dict):
    o = spec["optimizer"]
    name = o["name"]
    lr = spec["lr"]
    betas = (o["beta1"], o["beta2"])
    if name == "adamw":
        opt = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=betas, eps=o["eps"], weight_decay=o["weight_decay"]
        )
        return opt, "torch.optim.AdamW"
    proj = [m.weight for _, m in projected_linears(model)]
    ids = {id(p) for p in proj}
    regular = [p for p in model.parameters() if id(p) not in ids]
    if name == "galore":
        from galore_torch import GaLoreAdamW

        group = {
            "params": proj,
            "rank": o["rank"],
            "update_proj_gap": o["update_gap"],
            "scale": o["galore_scale"],
            "proj_type": "std",
        }
        opt = GaLoreAdamW(
            [{"params": regular}, group],
            lr=lr,
            betas=betas,
            eps=o["eps"],
            weight_decay=o["weight_decay"],
        )
        return opt, "galore_torch.GaLoreAdamW"
    if name == "qgalore":
        patch_cuda_sync()
        from q_galore_torch import QGaLoreAdamW8bit

        # INT8 weights for the projected matrices (the engine's weight_bits 8)
        for full, mod in projected_linears(model):
            parent = model.get_submodule(full.rsplit(".", 1)[0])
            setattr(
                parent,
                full.rsplit(".", 1)[1],
                Int8Linear(mod, o["weight_group_size"], bool(o["stochastic_round"])),
            )
        proj = [m.weight for n, m in model.named_modules() if isinstance(m, Int8Linear)]
        ids = {id(p) for p in proj}
        regular = [p for p in model.parameters() if id(p) not in ids]
        group = {
            "params": proj,
            "rank": o["rank"],
            "update_proj_gap": o["update_gap"],
            "scale": o["galore_scale"],
            "proj_type": "std",
            "quant": o["proj_bits"] < 16,
            "quant_n_bit": o["proj_bits"],
            "quant_group_size": o["proj_group_size"],
            "cos_threshold": o["cos_threshold"],
            "gamma_proj": o["gamma"],
            "queue_size": o["queue_size"],
        }
        opt = qgalore_for_current_bnb(QGaLoreAdamW8bit)(
            [{"params": regular}, group],
            lr=lr,
            betas=betas,
            eps=o["eps"],
            weight_decay=o["weight_decay"],
        )
        # QGaLoreAdamW8bit passes (percentile_clipping, block_wise) positionally where
        # bitsandbytes ≥ 0.44 takes (max_unorm, skip_zeros): undo that (no unorm limit, no
        # zero skipping, as Q-GaLore ran them).
        opt.args.max_unorm = 0.0
        opt.args.skip_zeros = False
        NOTES.append(
            "q-galore-torch 1.0 adapted to bitsandbytes 0.50 at run time: its update_step "
            "(old positional kernel signatures, config['percentile_clipping']) is replaced by "
            "bitsandbytes' own Optimizer2State.update_step with float_grad as the gradient; "
            "max_unorm/skip_zeros reset to 0/False (the package passes percentile_clipping/"
            "block_wise there); 8-bit blockwise Adam runs on bitsandbytes' CPU kernels"
        )
        return opt, "q_galore_torch.QGaLoreAdamW8bit (INT8 linear of vs_pytorch.py; see notes)"
    raise SystemExit(f"vs_pytorch.py: optimizer {name}: unknown; allowed: adamw, galore, qgalore")


def clip_(model, max_norm: float) -> None:
    """clip_grad_norm_(…, max_norm) over every gradient, INT8 weights' float_grad included (the
    gradients of those weights live there, where clip_grad_norm_ would not see them)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grads += [
        p.float_grad for p in model.parameters() if getattr(p, "float_grad", None) is not None
    ]
    if not grads:
        return
    norms = torch._foreach_norm(grads, 2.0)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef)


def batches(path: str, b: int, t: int):
    """Step s's batch: b windows of t + 1 bytes at offsets (s·b + i)·(t + 1) (mod the file);
    the same formula as bench/vs_pytorch.ts uses for our side."""
    with open(path, "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
    n = data.numel() - (t + 1)

    def get(s: int) -> torch.Tensor:
        rows = [data[((s * b + i) * (t + 1)) % n:][: t + 1] for i in range(b)]
        return torch.stack(rows)

    return get


MATMUL = {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "addbmm", "_addmm_activation"}
LAYOUT = {"copy_", "clone", "contiguous", "cat", "_to_copy", "to", "empty", "empty_like",
          "zeros", "zeros_like", "zero_", "fill_", "stack", "as_strided", "view", "reshape",
          "_reshape_alias", "_unsafe_view", "transpose", "t", "expand", "slice", "select",
          "unsqueeze", "squeeze", "permute", "split", "chunk", "narrow", "new_empty_strided",
          "empty_strided", "resize_", "detach", "alias", "unbind", "index_select"}


def category(op: str) -> str:
    name = op.split("::", 1)[-1]
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in MATMUL:
        return "matmul"
    if "log_softmax" in name or "nll_loss" in name or "cross_entropy" in name:
        return "loss"
    if "embedding" in name:
        return "embedding"
    if name in LAYOUT:
        return "copies/layout"
    return "elementwise/other"


PHASES = ("forward", "backward", "clip", "optimizer")


def train(spec: dict) -> dict:
    model, shape = build_model(spec["model"])
    params = sum(p.numel() for p in model.parameters())
    opt, opt_name = build_optimizer(model, spec)
    b, t = spec["batch"], spec["seq"]
    get = batches(spec["data"], b, t)
    lr_note = "constant lr (no schedule)"
    vocab = spec["model"]["vocab_size"]
    ce = torch.nn.functional.cross_entropy
    rf = torch.profiler.record_function

    # the norms' forward gets its own label in the profile (their backward is elementwise ops)
    try:
        from transformers.models.llama import modeling_llama

        norm_forward = modeling_llama.LlamaRMSNorm.forward

        def labelled(self, x):
            with rf("rmsnorm"):
                return norm_forward(self, x)

        modeling_llama.LlamaRMSNorm.forward = labelled
    except Exception as e:  # noqa: BLE001
        NOTES.append(f"norm label unavailable: {e}")

    fwd_s = bwd_s = clip_s = opt_s = 0.0
    precision = spec.get("precision", "fp32")
    if precision not in ("fp32", "bf16"):
        raise SystemExit(f"vs_pytorch.py train: precision {precision}: must be fp32 or bf16")
    # bf16: autocast the forward and the loss (the backward follows the forward's dtypes)
    if precision == "bf16":
        amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    else:
        import contextlib

        amp = contextlib.nullcontext

    def step(s: int, timed: bool):
        nonlocal fwd_s, bwd_s, clip_s, opt_s
        tok = get(s)
        x, y = tok[:, :-1], tok[:, 1:]
        t0 = time.perf_counter()
        with rf("forward"), amp():
            logits = model(input_ids=x).logits
            loss = ce(logits.reshape(-1, vocab), y.reshape(-1))
        t1 = time.perf_counter()
        with rf("backward"):
            loss.backward()
        t2 = time.perf_counter()
        with rf("clip"):
            if spec["clip"] > 0:
                clip_(model, spec["clip"])
        t3 = time.perf_counter()
        with rf("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if timed:
            fwd_s += t1 - t0
            bwd_s += t2 - t1
            clip_s += t3 - t2
            opt_s += t4 - t3
        return t4 - t0, float(loss.detach())

    losses = []
    for s in range(spec["warmup"]):
        losses.append(step(s, False)[1])
    times = []
    cpu0 = time.process_time()
    for s in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        dt, loss = step(s, True)
        times.append(dt)
        losses.append(loss)
    cpu_per_step = (time.process_time() - cpu0) / spec["steps"]
    rss_train = vm_hwm()

    profile = None
    if spec.get("profile", True):
        profile = torch_profile(step, spec["warmup"] + spec["steps"])

    n = spec["steps"]
    srt = sorted(times)
    med = srt[n // 2] if n % 2 else 0.5 * (srt[n // 2 - 1] + srt[n // 2])
    return {
        "side": "pytorch",
        "precision": precision,
        "autocast": 'torch.autocast("cpu", dtype=torch.bfloat16)' if precision == "bf16" else None,
        "optimizer_impl": opt_name,
        "params": params,
        "model_shape": shape,
        "lr": spec["lr"],
        "lr_note": lr_note,
        "step_s": [round(x, 4) for x in times],
        "median_step_s": round(med, 4),
        "tokens_per_s": round(b * t / med, 1),
        "losses": [round(x, 4) for x in losses],
        "cpu_s_per_step": round(cpu_per_step, 4),
        "tokens_per_cpu_s": round(b * t / cpu_per_step, 1),
        "timing_per_step": {
            "forward_s": round(fwd_s / n, 4),
            "backward_s": round(bwd_s / n, 4),
            "clip_s": round(clip_s / n, 4),
            "optimizer_s": round(opt_s / n, 4),
        },
        "profile": profile,
        "peak_rss_self": rss_train,
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "notes": NOTES,
    }


def torch_profile(step, s: int) -> dict:
    """One extra step (not timed) under torch.profiler: self CPU seconds by op category and by
    phase, the forward of the norms, and the 12 heaviest ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(s, False)
    events = prof.events()
    by_cat: dict = {}
    by_phase: dict = {}
    by_op: dict = {}
    norm_fwd = 0.0
    for ev in events:
        if ev.name in PHASES or ev.name == "rmsnorm":
            if ev.name == "rmsnorm":
                norm_fwd += ev.cpu_time_total / 1e6
            else:
                by_phase[ev.name] = by_phase.get(ev.name, 0.0) + ev.cpu_time_total / 1e6
            continue
        self_s = ev.self_cpu_time_total / 1e6
        if self_s <= 0:
            continue
        # the nearest labelled phase above this op
        phase, p = None, ev.cpu_parent
        while p is not None:
            if p.name in PHASES:
                phase = p.name
                break
            p = p.cpu_parent
        cat = "optimizer" if phase == "optimizer" else category(ev.name)
        if phase == "clip":
            cat = "clip"
        by_cat[cat] = by_cat.get(cat, 0.0) + self_s
        by_op[ev.name] = by_op.get(ev.name, 0.0) + self_s
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    r = lambda d: {k: round(v, 4) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
    return {
        "what": "one untimed step under torch.profiler (self CPU seconds; profiler overhead "
        "included)",
        "by_category": r(by_cat),
        "by_phase": r(by_phase),
        "norm_forward_s": round(norm_fwd, 4),
        "top_ops": r(dict(top)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["gemm", "train", "versions"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--spec", type=str, default=None)
    a = ap.parse_args()
    if a.mode == "gemm":
        out = gemm(a.size, a.iters)
    elif a.mode == "versions":
        out = versions()
    else:
        if a.spec is None:
            raise SystemExit("vs_pytorch.py train: --spec JSON is required")
        out = train(json.loads(a.spec))
    out.setdefault("peak_rss_self", vm_hwm())
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
