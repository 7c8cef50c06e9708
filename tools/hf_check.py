#!/usr/bin/env python3
"""Check a LLaMA model folder with Hugging Face `transformers` itself (run by hand, never by CI).

    /work/pyref/bin/python tools/hf_check.py DIR [--ref REFDIR] [--ids FILE.json] [--text TEXT]

Loads DIR with LlamaForCausalLM.from_pretrained (weights upcast to float32, eager attention) and
its tokenizer with AutoTokenizer when tokenizer files are there, and prints ONE JSON line:

    {"dir", "stored_dtypes", "config": {...}, "loading": {"missing_keys", "unexpected_keys",
     "mismatched_keys"}, "tokens", "loss", "expected_loss"?,
     "tokenizer": {...}?, "ref"?: {"dir", "loss", "max_abs_diff", "max_abs_diff_all",
     "bit_identical", "only_in_dir", "only_in_ref", "mismatched"}}

The ids come from --ids (a JSON list of ids, a list of equal-length rows, or an object with
"input_ids", "ids" or "inputs": {"single": [...]} such as a fixture's expected.json), else from
--text tokenized with DIR's tokenizer, else from DIR's or REFDIR's expected.json. The loss is
transformers' own (labels = inputs, shifted inside the model), the number qgalore's export must
reproduce. --ref compares every stored tensor of DIR with REFDIR's by name (values read from the
safetensors files as stored, compared in float64), the check that export -> reload kept weights.

Errors are one line on stderr and exit status 1.
"""

import argparse
import json
import os
import sys


class CheckError(Exception):
    pass


def tensor_files(folder):
    """The safetensors files of a model folder, sharded or not."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckError(f"{index}: no 'weight_map' object")
        return sorted({os.path.join(folder, v) for v in weight_map.values()})
    if os.path.isfile(single):
        return [single]
    raise CheckError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")


def read_tensors(folder):
    from safetensors import safe_open

    out = {}
    for path in tensor_files(folder):
        if not os.path.isfile(path):
            raise CheckError(f"{path}: named in the index but missing")
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def load_ids(args):
    def from_obj(obj, where):
        if isinstance(obj, dict):
            for key in ("input_ids", "ids"):
                if key in obj:
                    return from_obj(obj[key], where)
            if isinstance(obj.get("inputs"), dict) and "single" in obj["inputs"]:
                return from_obj(obj["inputs"]["single"], where)
            raise CheckError(f"{where}: no 'input_ids', 'ids' or 'inputs.single' field")
        if isinstance(obj, list) and obj and all(isinstance(x, int) for x in obj):
            return [obj]
        if (isinstance(obj, list) and obj and all(isinstance(r, list) and r for r in obj)
                and all(isinstance(x, int) for r in obj for x in r)):
            if len({len(r) for r in obj}) != 1:
                raise CheckError(f"{where}: rows of different lengths")
            return obj
        raise CheckError(f"{where}: ids must be a non-empty list of integers or of equal-length rows")

    if args.ids:
        try:
            with open(args.ids, encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckError(f"{args.ids}: {e}") from None
        return from_obj(obj, args.ids), args.ids
    if args.text is not None:
        return None, "--text"
    for folder in (args.dir, args.ref):
        if folder and os.path.isfile(os.path.join(folder, "expected.json")):
            path = os.path.join(folder, "expected.json")
            with open(path, encoding="utf-8") as f:
                return from_obj(json.load(f), path), path
    raise CheckError("no ids: give --ids FILE.json or --text TEXT (no expected.json in DIR or REFDIR)")


def has_tokenizer(folder):
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model"))


def load_model(folder):
    import torch
    from transformers import LlamaForCausalLM

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise CheckError(f"{folder}: no config.json")
    model, info = LlamaForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    model.eval()
    # transformers fills a missing tensor with random values and only warns: surface it.
    return model, {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}


def loss_of(model, ids):
    import torch

    vocab = model.config.vocab_size
    bad = [x for r in ids for x in r if not 0 <= x < vocab]
    if bad:
        raise CheckError(f"id {bad[0]} is outside the model's vocabulary (vocab_size {vocab})")
    x = torch.tensor(ids)
    with torch.no_grad():
        return float(model(x, labels=x).loss)


def main():
    ap = argparse.ArgumentParser(description="Loss and weight check of a LLaMA folder with transformers.")
    ap.add_argument("dir", help="model folder (config.json + safetensors, e.g. a qgalore export)")
    ap.add_argument("--ref", help="reference model folder: compare weights and loss against it")
    ap.add_argument("--ids", help="JSON file with the input ids")
    ap.add_argument("--text", help="text to tokenize with DIR's tokenizer instead of --ids")
    args = ap.parse_args()

    for folder in (args.dir, args.ref):
        if folder and not os.path.isdir(folder):
            raise CheckError(f"{folder}: not a folder")

    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    ids, ids_from = load_ids(args)
    report = {"dir": args.dir}

    tok = None
    if has_tokenizer(args.dir):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.dir)
    if args.text is not None:
        if tok is None:
            raise CheckError(f"{args.dir}: --text needs a tokenizer (tokenizer.json) in the folder")
        ids = [tok.encode(args.text)]

    model, loading = load_model(args.dir)
    cfg = model.config
    stored = read_tensors(args.dir)
    report["stored_dtypes"] = sorted({str(t.dtype).replace("torch.", "") for t in stored.values()})
    report["config"] = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "tie_word_embeddings": cfg.tie_word_embeddings, "rope_parameters": cfg.rope_parameters,
    }
    report["loading"] = loading
    report["ids_from"] = ids_from
    report["tokens"] = sum(len(r) for r in ids)
    report["loss"] = loss_of(model, ids)
    expected = os.path.join(args.dir, "expected.json")
    if os.path.isfile(expected) and ids_from == expected:
        with open(expected, encoding="utf-8") as f:
            report["expected_loss"] = json.load(f).get("loss")

    if tok is not None:
        report["tokenizer"] = {
            "class": type(tok).__name__, "size": len(tok),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "fits_model": len(tok) <= cfg.vocab_size,
        }

    if args.ref:
        ref_model, _ = load_model(args.ref)
        ref_stored = read_tensors(args.ref)
        diffs, mismatched, identical = {}, [], True
        for name in sorted(set(stored) & set(ref_stored)):
            a, b = stored[name], ref_stored[name]
            if a.shape != b.shape:
                mismatched.append(f"{name}: {list(a.shape)} vs {list(b.shape)}")
                identical = False
                continue
            identical = identical and a.dtype == b.dtype and bool((a == b).all())
            diffs[name] = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        only_dir = sorted(set(stored) - set(ref_stored))
        only_ref = sorted(set(ref_stored) - set(stored))
        report["ref"] = {
            "dir": args.ref,
            "loss": loss_of(ref_model, ids),
            "max_abs_diff_all": max(diffs.values(), default=0.0),
            "bit_identical": identical and not only_dir and not only_ref,
            "only_in_dir": only_dir,
            "only_in_ref": only_ref,
            "mismatched": mismatched,
            "max_abs_diff": diffs,
        }
        if tok is not None and has_tokenizer(args.ref):
            from transformers import AutoTokenizer

            ref_tok = AutoTokenizer.from_pretrained(args.ref)
            sample = "Hello, world! caf\u00e9 \u4e2d\u6587 \U0001f44d\n\tx = 1234567  "
            report["ref"]["same_token_ids"] = tok.encode(sample) == ref_tok.encode(sample)

    print(json.dumps(report))


if __name__ == "__main__":
    try:
        main()
    except CheckError as e:
        print(f"hf_check: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # a file transformers cannot read: one line, no trace
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"hf_check: {type(e).__name__}: {msg}", file=sys.stderr)
        sys.exit(1)
