#!/usr/bin/env python3
"""Load a LoRA adapter folder (one qgalore wrote) with `peft` and print the logits it gives.

    /work/pyref/bin/python tools/peft_check.py ADAPTER_DIR --base MODEL_DIR [--ref LOGITS.safetensors] [--ids JSON]

Loads MODEL_DIR with `LlamaForCausalLM.from_pretrained`, the adapter with
`PeftModel.from_pretrained(model, ADAPTER_DIR)` (warnings about the adapter, e.g. unexpected or
missing keys, are errors here), and prints one JSON line: the adapter's config as peft parsed it,
the number of LoRA modules peft built, the logits on the token ids (`--ids`, default: the ids of
`--ref`, or [[1, 2, 3, 4]]), and with `--ref` (a tests/fixtures/peft/<name>/logits.safetensors)
the max |Δ| against its `adapted` logits. Exits 1 if that is above 1e-5.
"""

import argparse
import json
import logging
import sys
import warnings

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("adapter")
    ap.add_argument("--base", required=True, help="the Hugging Face model folder the adapter belongs to")
    ap.add_argument("--ref", help="logits.safetensors with `ids` and `adapted` to compare with")
    ap.add_argument("--ids", help="JSON list of token-id rows")
    ap.add_argument("--full", action="store_true", help="print every logit, not a summary")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ref = load_file(a.ref) if a.ref else None
    if a.ids:
        ids = torch.tensor(json.loads(a.ids), dtype=torch.int64)
    elif ref is not None:
        ids = ref["ids"].to(torch.int64)
    else:
        ids = torch.tensor([[1, 2, 3, 4]], dtype=torch.int64)

    base = LlamaForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    # peft reports keys it could not place as warnings: a check must not let them pass
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        logging.getLogger("peft").setLevel(logging.ERROR)
        model = PeftModel.from_pretrained(base, a.adapter).eval()
    cfg = model.peft_config["default"]
    lora_modules = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    out = {
        "adapter": a.adapter,
        "config": {
            "r": cfg.r,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout,
            "use_rslora": cfg.use_rslora,
            "target_modules": sorted(cfg.target_modules) if not isinstance(cfg.target_modules, str) else cfg.target_modules,
        },
        "lora_modules": lora_modules,
        "ids": ids.tolist(),
        "logits_shape": list(logits.shape),
        "logits_sum": float(logits.double().sum()),
        "logits_first": [round(float(x), 6) for x in logits[0, 0, :5]],
    }
    if a.full:
        out["logits"] = logits.tolist()
    bad = False
    if ref is not None:
        d = float((logits - ref["adapted"]).abs().max())
        out["max_abs_diff_vs_ref"] = d
        bad = d > 1e-5
    print(json.dumps(out))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
