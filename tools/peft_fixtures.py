#!/usr/bin/env python3
"""Make the QLoRA / PEFT fixtures in tests/fixtures/peft/ with bitsandbytes and peft themselves.

Run by hand from the repository root (CI never runs Python; the outputs are committed):

    /work/pyref/bin/python tools/peft_fixtures.py [--out tests/fixtures/peft]

Deterministic: fixed seeds, one torch thread, PYTHONHASHSEED=0 (peft writes `target_modules`
from a Python set, whose order depends on string hashing); running it again rewrites identical
bytes. See tests/fixtures/peft/README.md for what each file holds and how the tests use it.

1. `nf4.safetensors` + `nf4.json`: a test tensor quantized by `bitsandbytes.functional.quantize_4bit`
   to NF4, blocksize 64, with double quantization (`compress_statistics=True`), everything the
   quant_state holds, and the dequantized tensor. The second level is recorded twice: as
   bitsandbytes' CPU backend computes it (its native 8-bit kernel, the path `quantize_4bit` takes
   on this machine) and as bitsandbytes' reference torch kernel (`backends/default/ops.py`, exact
   nearest code; the CUDA kernel's rule) computes it.
2. `<adapter>/`: PEFT LoRA adapters on the tiny Hugging Face fixture models (tests/fixtures/hf/),
   written by `PeftModel.save_pretrained`, with non-zero lora_B, and `logits.safetensors`: the
   logits `peft` computes with the adapter loaded back from disk, after `merge_and_unload`, and of
   the base model alone, on fixed token ids.
"""

import argparse
import json
import os
import shutil
import sys

if os.environ.get("PYTHONHASHSEED") != "0":
    # set iteration order (peft's target_modules) must not depend on the run
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import bitsandbytes
import bitsandbytes.functional as bnbf
import peft
import safetensors
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

HF = "tests/fixtures/hf"
BUDGET = 1024 * 1024  # bytes, all fixtures together

# (name, base model folder, LoraConfig arguments, seed)
ADAPTERS = [
    ("qv-r4", "mha-untied-theta1e4", dict(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]), 11),
    ("all-r8-rslora", "gqa-tied-theta5e5", dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True), 12),
]

# Token ids fed to every adapted model: 2 rows of 8, below both fixtures' vocab sizes (500, 600).
IDS = [[1, 17, 243, 88, 401, 5, 499, 64], [1, 300, 12, 12, 250, 77, 3, 410]]


def made_with() -> dict:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "safetensors": safetensors.__version__,
    }


def nf4_test_tensor() -> torch.Tensor:
    """[129, 131] = 16899 elements: 264 full blocks of 64 and a partial block of 3 (odd, so the
    packed codes end in a pad nibble), 265 block constants = one full group of 256 and a partial
    group of 9 at the second level. Rows get different scales so the absmax values spread; block 3
    is all zeros (absmax 0: bnb's 1e-38 floor); block 10 holds every NF4 midpoint exactly (absmax
    0.5, so x·(1/absmax) lands on the midpoints: ties go to the lower code)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(129, 131, generator=g, dtype=torch.float32)
    x *= (0.01 + 0.05 * torch.rand(129, 1, generator=g)).float()
    flat = x.view(-1)
    flat[3 * 64 : 4 * 64] = 0.0
    code = bnbf.get_4bit_type("nf4", device="cpu").float()
    mids = (code[:-1] + code[1:]) / 2
    blk = torch.zeros(64)
    blk[0] = 0.5
    blk[1:16] = mids * 0.5
    blk[16:31] = -mids * 0.5
    blk[31] = -0.5
    blk[32:] = torch.linspace(-0.49, 0.49, 32)
    flat[10 * 64 : 11 * 64] = blk
    return x


def default_quantize_blockwise(a: torch.Tensor, code: torch.Tensor, blocksize: int):
    """bitsandbytes' reference torch kernel (backends/default/ops.py) for quantize_blockwise,
    called through the dispatcher's CompositeExplicitAutograd key instead of the CPU kernel."""
    ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(ks, a, code, blocksize)


def make_nf4(out: str) -> None:
    x = nf4_test_tensor()
    packed, qs = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    deq = bnbf.dequantize_4bit(packed, qs)
    packed_plain, qs_plain = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
    deq_plain = bnbf.dequantize_4bit(packed_plain, qs_plain)
    assert torch.equal(packed, packed_plain)
    absmax = qs_plain.absmax.float()
    offset = qs.offset.float().reshape(1)
    assert torch.equal(offset, absmax.mean().reshape(1))
    # the second level as bitsandbytes' reference kernel computes it
    q_ref, a2_ref = default_quantize_blockwise(absmax - offset, qs.state2.code, 256)
    # and bnb's own dequantization of that state (absmax = dyn[q]·absmax2 + offset, then codes)
    qs_ref = bnbf.QuantState(
        absmax=q_ref, shape=qs.shape, dtype=qs.dtype, blocksize=64, code=qs.code, quant_type="nf4",
        offset=qs.offset, state2=bnbf.QuantState(absmax=a2_ref, code=qs.state2.code, blocksize=256, dtype=torch.float32),
    )
    deq_ref = bnbf.dequantize_4bit(packed, qs_ref)
    tensors = {
        "input": x.contiguous(),
        "codes": packed.reshape(-1).contiguous(),  # u8[⌈n/2⌉], element 2i in the high nibble
        "nf4_code": qs.code.float().contiguous(),  # the 16 levels
        "absmax": absmax.contiguous(),  # first level (compress_statistics=False)
        "dequantized_plain": deq_plain.contiguous(),
        "offset": offset.contiguous(),
        "dynamic_code": qs.state2.code.float().contiguous(),  # create_dynamic_map(signed=True)
        # second level, bnb CPU backend (native kernel), what quantize_4bit returned
        "qabsmax": qs.absmax.reshape(-1).contiguous(),
        "absmax2": qs.state2.absmax.float().contiguous(),
        "dequantized": deq.contiguous(),
        # second level, bnb reference torch kernel (exact nearest on midpoints)
        "qabsmax_ref": q_ref.reshape(-1).contiguous(),
        "absmax2_ref": a2_ref.float().contiguous(),
        "dequantized_ref": deq_ref.contiguous(),
    }
    # the same tensor stored as bf16, as a Hugging Face bf16 checkpoint hands it to Linear4bit:
    # bnb quantizes its f32 conversion (`A.reshape(-1).float()`), so the engine's import (bf16 →
    # f32, exact) followed by its f32 quantization must give these codes and constants
    xb = x.to(torch.bfloat16)
    packed_b, qs_b = bnbf.quantize_4bit(xb, blocksize=64, compress_statistics=True, quant_type="nf4")
    q_ref_b, _ = default_quantize_blockwise(
        bnbf.quantize_4bit(xb, blocksize=64, compress_statistics=False, quant_type="nf4")[1].absmax.float() - qs_b.offset.float(),
        qs_b.state2.code, 256,
    )
    tensors.update({
        "input_bf16": xb.contiguous(),
        "codes_bf16": packed_b.reshape(-1).contiguous(),
        "qabsmax_bf16": qs_b.absmax.reshape(-1).contiguous(),
        "absmax2_bf16": qs_b.state2.absmax.float().contiguous(),
        "offset_bf16": qs_b.offset.float().reshape(1).contiguous(),
    })
    save_file(tensors, os.path.join(out, "nf4.safetensors"), metadata={"format": "pt"})
    state = qs.as_dict(packed=False)
    fields = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    fields["offset"] = float(qs.offset)
    fields["nested_blocksize"] = qs.state2.blocksize
    fields["shape"] = list(qs.shape)
    fields["dtype"] = str(qs.dtype).removeprefix("torch.")
    fields["quant_type"] = qs.quant_type
    fields["blocksize"] = qs.blocksize
    fields["numel"] = x.numel()
    fields["qabsmax_diff_native_vs_ref"] = [int(i) for i in torch.nonzero(qs.absmax.reshape(-1) != q_ref.reshape(-1)).reshape(-1)]
    fields["qabsmax_bf16_diff_native_vs_ref"] = [int(i) for i in torch.nonzero(qs_b.absmax.reshape(-1) != q_ref_b.reshape(-1)).reshape(-1)]
    doc = {
        "made_with": made_with(),
        "quantize": "bitsandbytes.functional.quantize_4bit(input, blocksize=64, compress_statistics=True, quant_type='nf4')",
        "quant_state": fields,
    }
    with open(os.path.join(out, "nf4.json"), "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"nf4: {x.numel()} elements, {absmax.numel()} blocks; native vs reference qabsmax differ at {fields['qabsmax_diff_native_vs_ref']}")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float().contiguous()


def make_adapter(out: str, name: str, base: str, args: dict, seed: int) -> None:
    base_dir = f"{HF}/{base}"
    dst = os.path.join(out, name)
    if os.path.exists(dst):
        shutil.rmtree(dst)
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **args))
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(dst)
    # everything below from the SAVED folder, so the logits belong to the stored bits
    ids = torch.tensor(IDS, dtype=torch.int64)
    base_model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_logits = logits(base_model, ids)
    adapted = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32), dst).eval()
    adapted_logits = logits(adapted, ids)
    merged = adapted.merge_and_unload().eval()
    merged_logits = logits(merged, ids)
    save_file(
        {"ids": ids.to(torch.int32), "base": base_logits, "adapted": adapted_logits, "merged": merged_logits},
        os.path.join(dst, "logits.safetensors"),
        # one metadata key only: the writer orders a header map by hash, so more would change the bytes per run
        metadata={"format": "pt"},
    )
    d_adapter = (adapted_logits - base_logits).abs().max().item()
    d_merge = (merged_logits - adapted_logits).abs().max().item()
    print(f"{name}: on {base}, |adapted - base| max {d_adapter:.4g}, |merged - adapted| max {d_merge:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/peft")
    a = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    make_nf4(a.out)
    for name, base, args, seed in ADAPTERS:
        make_adapter(a.out, name, base, args, seed)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(a.out) for f in fs)
    print(f"total {total} bytes")
    if total > BUDGET:
        sys.exit(f"fixtures are {total} bytes, over the {BUDGET}-byte budget")


if __name__ == "__main__":
    main()
