#!/usr/bin/env python3
"""Make the Hugging Face fidelity fixtures in tests/fixtures/hf/ with `transformers` itself.

Run by hand (CI never runs Python; the outputs are committed):

    /work/pyref/bin/python tools/hf_fixtures.py [--data tinyshakespeare.txt] [--out tests/fixtures/hf]

Deterministic: fixed seeds, single-threaded torch, and every file is written the way
`transformers` writes it (save_pretrained), so the engine's tests compare against what real
users' files look like. Everything the tests need is recomputed from the SAVED folders (reloaded
with from_pretrained), never from the in-memory objects, so the expected values belong to the
stored bits. See tests/fixtures/hf/README.md for the layout.
"""

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile

import tokenizers
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizer, PreTrainedTokenizerFast

# The multilingual test text. Written with escapes so the exact code points (ZWJ, variation
# selectors, CR LF, tabs, trailing spaces) survive any editor.
MULTILINGUAL = (
    "Hello, world! The quick brown fox jumps over the lazy dog.\n"
    "Accents: caf\u00e9, na\u00efve, fa\u00e7ade, r\u00e9sum\u00e9, \u00c5ngstr\u00f6m, se\u00f1or, "
    "S\u00e3o Paulo, \u0141\u00f3d\u017a, Dvo\u0159\u00e1k, \u0153uvre.\n"
    "Deutsch: Die Stra\u00dfe ist gro\u00df; F\u00fc\u00dfe, \u00c4pfel und \u1e9e.\n"
    "\u4e2d\u6587\uff1a\u6211\u4eec\u6b63\u5728\u6d4b\u8bd5\u5206\u8bcd\u5668\u3002\n"
    "\u65e5\u672c\u8a9e\uff1a\u6771\u4eac\u3067\u30e9\u30fc\u30e1\u30f3\u3092\u98df\u3079\u307e\u3057\u305f\u3002"
    "\u30ab\u30bf\u30ab\u30ca\u3068\u3072\u3089\u304c\u306a\u3002\n"
    "\ud55c\uad6d\uc5b4: \uc548\ub155\ud558\uc138\uc694, \uc138\uacc4!\n"
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629: \u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645\n"
    "\u05e2\u05d1\u05e8\u05d9\u05ea: \u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd\n"
    "\u0420\u0443\u0441\u0441\u043a\u0438\u0439: \u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! "
    "\u0421\u044a\u0435\u0448\u044c \u0435\u0449\u0451 \u044d\u0442\u0438\u0445 \u0431\u0443\u043b\u043e\u043a.\n"
    "\u0939\u093f\u0928\u094d\u0926\u0940: \u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e\n"
    "Emoji: \U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 "
    "\U0001f3f3\ufe0f\u200d\U0001f308 \u2764\ufe0f \U0001f1ef\U0001f1f5 \U0001f600\n"
    "def f(x):\n"
    "\tif x > 0:\n"
    "\t\treturn x * 2  # twice\n"
    "\treturn -x\n"
    "Spaces:    four, then  two, then\t\ttabs.\n"
    "Numbers: 1234567, 3.14159, 2026-12-02, 1,000,000 and 0x7f.\n"
    "Contractions: I'm, you're, it's, we've, they'll, he'd, DON'T.\n"
    "Windows line\r\n"
    "another one\r\n"
    "\n"
    "\n"
    "after two blank lines, trailing spaces   \n"
    "   leading spaces and the end"
)

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The passage whose tokens feed the models (the opening of tinyshakespeare is the usual one).
PASSAGE_CHARS = (0, 2000)
SEQ_LEN = 40
BATCH_LEN = 24
NEW_TOKENS = 16
# Positions of the single sequence and of each batch row whose full logits go to logits.bin; the
# per-token losses of every position are in expected.json, so these rows plus the loss cover all.
SINGLE_POSITIONS = [0, 1, 2, 3, 9, 19, 29, 39]
BATCH_POSITIONS = [0, 11, 23]

# Tiny LLaMA shapes. head_dim 8 (hidden 32, 4 heads) keeps the f32 files small; the llama3 one has
# head_dim 16 so that its 8 frequencies fall in all three llama3 bands (kept, smoothed, divided).
MODELS = [
    {
        "name": "mha-untied-theta1e4", "tokenizer": "tok-spm", "dtype": "float32", "seed": 1,
        "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "legacy_config": True,
    },
    {
        "name": "gqa-tied-theta5e5", "tokenizer": "tok-bbpe", "dtype": "float32", "seed": 2,
        "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
    },
    {
        "name": "gqa-llama3-scaling", "tokenizer": "tok-bbpe", "dtype": "float32", "seed": 3,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
        "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "legacy_config": True,
    },
    {
        "name": "mha-bf16-sharded", "tokenizer": "tok-spm", "dtype": "bfloat16", "seed": 4,
        "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "max_shard_size": "50KB",
    },
    {
        "name": "gqa-f16", "tokenizer": "tok-bbpe", "dtype": "float16", "seed": 5,
        "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
    },
]
INIT_STD = 0.2  # large enough that logits spread (greedy margins stay far above 1e-4)
ALPHABET = 90  # characters of tok-spm's base alphabet
NORM_JITTER = 0.1  # norms != 1 so a test notices a norm weight that is ignored or misplaced


def write_text(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def to_json(obj, indent=0):
    """Indented JSON, but a list of numbers stays on one line (ids and logits stay readable)."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {to_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and not all(isinstance(x, (int, float)) for x in obj):
        return "[\n" + ",\n".join(inner + to_json(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def write_json(path, obj):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(to_json(obj) + "\n")


def train_spm(corpus_lines, vocab_size):
    """LLaMA-2 style: BPE over Metaspace words, byte fallback, <unk>/<s>/</s> then <0x00>..<0xFF>."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Train on whitespace-split words (as SentencePiece does) so no merge spans a word boundary;
    # the saved tokenizer uses split=False like LlamaTokenizer.
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    specials = ["<unk>", "<s>", "</s>"]
    # The alphabet is chosen here (most frequent first, ties by code point) because the trainer's
    # own limit_alphabet breaks ties in hash order, which changes the vocabulary from run to run.
    # Characters left out (most CJK, emoji...) go through byte fallback, as rare ones do in LLaMA 2.
    counts = {}
    for line in corpus_lines:
        for ch in line.replace(" ", "\u2581"):
            counts[ch] = counts.get(ch, 0) + 1
    alphabet = sorted(counts, key=lambda ch: (-counts[ch], ord(ch)))[:ALPHABET]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 256, special_tokens=specials, initial_alphabet=alphabet,
        limit_alphabet=len(alphabet), show_progress=False,
    )
    trainer_tok.train_from_iterator(corpus_lines, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    ordered = [tok for tok, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1])]
    assert ordered[:3] == specials, ordered[:3]
    vocab = {}
    for tok in specials + [f"<0x{b:02X}>" for b in range(256)] + ordered[3:]:
        vocab[tok] = len(vocab)
    assert len(vocab) == vocab_size, len(vocab)
    merges = [tuple(m) for m in trained["merges"]]
    # LlamaTokenizer builds exactly the pipeline transformers 5.x uses for LLaMA (and rebuilds it
    # from vocab+merges on load): no normalizer, Metaspace(prepend_scheme=first, split=False),
    # decoder Replace/ByteFallback/Fuse/Strip, TemplateProcessing "<s> $A".
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)


def train_bbpe(corpus_texts, vocab_size):
    """LLaMA-3 style: Split(llama3 regex) + ByteLevel(no prefix, no regex), specials at the end."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus_texts, trainer)
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tok.add_special_tokens([bos, eos])
    bos_id = tok.token_to_id(bos)
    assert bos_id == vocab_size - 2 and tok.get_vocab_size() == vocab_size
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        ),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)


def save_tokenizer(hf_tok, folder, extra_config=None):
    hf_tok.save_pretrained(folder)
    if extra_config:
        # Keys the Hub's own files carry but transformers 5.x does not write back.
        path = os.path.join(folder, "tokenizer_config.json")
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        cfg.update(extra_config)
        write_json(path, dict(sorted(cfg.items())))


def expected_ids(folder, text):
    """Ids and decoded text as AutoTokenizer gives them; also checks the raw tokenizer.json agrees."""
    auto = AutoTokenizer.from_pretrained(folder)
    raw = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))

    def one(s):
        with_sp = auto.encode(s, add_special_tokens=True)
        without = auto.encode(s, add_special_tokens=False)
        # The engine reads tokenizer.json directly: it must give what transformers gives.
        assert raw.encode(s, add_special_tokens=True).ids == with_sp, s
        assert raw.encode(s, add_special_tokens=False).ids == without, s
        decoded = auto.decode(with_sp, skip_special_tokens=True)
        assert raw.decode(with_sp, skip_special_tokens=True) == decoded, s
        return {
            "text": s,
            "ids": with_sp,
            "ids_no_special": without,
            "decoded": decoded,
            "roundtrip": decoded == s,
        }

    lines = text.split("\n")
    return {
        "tokenizer_class": type(auto).__name__,
        "vocab_size": len(auto),
        "bos_token": auto.bos_token, "bos_token_id": auto.bos_token_id,
        "eos_token": auto.eos_token, "eos_token_id": auto.eos_token_id,
        "unk_token": auto.unk_token, "unk_token_id": auto.unk_token_id,
        "source": "multilingual.txt",
        "note": "ids = AutoTokenizer.encode(text) (add_special_tokens=True); ids_no_special with "
                "add_special_tokens=False; decoded = decode(ids, skip_special_tokens=True). "
                "lines = text.split('\\n') (a CR stays at the end of the CRLF lines).",
        "full": one(text),
        "lines": [one(s) for s in lines],
    }


def build_model(spec, vocab_size, bos_id, eos_id):
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        rope_parameters=dict(spec["rope_parameters"]),
        tie_word_embeddings=spec["tie_word_embeddings"],
        rms_norm_eps=spec["rms_norm_eps"],
        initializer_range=INIT_STD,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_JITTER * torch.randn_like(p))
    model.eval()
    return model


def legacy_config(config_json):
    """The same model in the transformers 4.x layout: rope_theta + rope_scaling, torch_dtype."""
    out = {}
    for k, v in config_json.items():
        if k == "rope_parameters":
            out["rope_theta"] = v["rope_theta"]
            scaling = {kk: vv for kk, vv in v.items() if kk != "rope_theta"}
            out["rope_scaling"] = None if scaling.get("rope_type") == "default" else scaling
        elif k == "dtype":
            out["torch_dtype"] = v
        elif k == "transformers_version":
            out[k] = "4.46.0"
        else:
            out[k] = v
    return out


@torch.no_grad()
def reference_outputs(folder, single, batch, eos_id):
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    x = torch.tensor([single])
    out = model(x, labels=x)
    logits = out.logits[0]
    lp = torch.log_softmax(logits[:-1], dim=-1)
    single_nll = (-lp.gather(1, x[0, 1:, None])[:, 0]).tolist()

    xb = torch.tensor(batch)
    outb = model(xb, labels=xb)
    lpb = torch.log_softmax(outb.logits[:, :-1], dim=-1)
    batch_nll = (-lpb.gather(2, xb[:, 1:, None])[..., 0]).tolist()

    gen = model.generate(
        x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS,
        pad_token_id=eos_id, output_scores=True, return_dict_in_generate=True,
    )
    new_ids = gen.sequences[0, x.shape[1]:].tolist()
    margins = []
    for s in gen.scores:
        top2 = torch.topk(s[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))

    blocks = [logits[SINGLE_POSITIONS]] + [outb.logits[b][BATCH_POSITIONS] for b in range(len(batch))]
    rotary = model.model.rotary_emb
    return {
        "model": model,
        "inv_freq": rotary.inv_freq.tolist(),
        "attention_scaling": float(rotary.attention_scaling),
        "loss": float(out.loss),
        "single_nll": single_nll,
        "argmax": logits.argmax(-1).tolist(),
        "batch_loss": float(outb.loss),
        "batch_nll": batch_nll,
        "new_ids": new_ids,
        "margins": margins,
        "blocks": blocks,
    }


def rope_inv_freq_f64(rope, head_dim):
    """Rotary inverse frequencies from the config alone, in float64 (llama3 as Llama 3.1 defines it)."""
    import math

    inv = [rope["rope_theta"] ** (-(2 * i) / head_dim) for i in range(head_dim // 2)]
    if rope.get("rope_type", "default") == "default":
        return inv
    assert rope["rope_type"] == "llama3", rope
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def independent_logits(folder, rows):
    """A plain float64 LLaMA forward from config.json and the stored tensors, sharing no code with
    transformers' modeling: it shows the fixture is reproducible from the documented conventions
    (rotate-half RoPE on [out, in] q/k weights, GQA by repeating kv heads, RMSNorm weight * x/rms,
    SiLU-gated MLP, lm_head = embed_tokens when tied) and how far f32 rounding moves the logits."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        c = json.load(f)
    w = {}
    for fname in os.listdir(folder):
        if fname.endswith(".safetensors"):
            w.update({k: v.to(torch.float64) for k, v in load_file(os.path.join(folder, fname)).items()})
    h_, nh, nkv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    eps = c["rms_norm_eps"]
    x_ids = torch.tensor(rows)
    b, t = x_ids.shape
    inv = torch.tensor(rope_inv_freq_f64(c["rope_parameters"], hd), dtype=torch.float64)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def rope(q):
        half = hd // 2
        rot = torch.cat([-q[..., half:], q[..., :half]], -1)
        return q * cos + rot * sin

    x = w["model.embed_tokens.weight"][x_ids]
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, w[p + "input_layernorm.weight"])
        q = (a @ w[p + "self_attn.q_proj.weight"].T).view(b, t, nh, hd).transpose(1, 2)
        k = (a @ w[p + "self_attn.k_proj.weight"].T).view(b, t, nkv, hd).transpose(1, 2)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).view(b, t, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5 + mask, -1)
        o = (att @ v).transpose(1, 2).reshape(b, t, nh * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        m = rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = m @ w[p + "mlp.gate_proj.weight"].T, m @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return rms(x, w["model.norm.weight"]) @ head.T


def safetensors_layout(folder):
    """Names, shapes and dtypes as stored (read from the headers, not through torch)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    layout = {}
    for fname in files:
        with open(os.path.join(folder, fname), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                layout[k] = {"file": fname, "dtype": v["dtype"], "shape": v["shape"]}
    return dict(sorted(layout.items()))


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/tinyshakespeare.txt")
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "hf"))
    args = ap.parse_args()

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    with open(args.data, encoding="utf-8", newline="") as f:
        shakespeare = f.read()

    write_text(os.path.join(out, "multilingual.txt"), MULTILINGUAL)
    write_text(os.path.join(out, ".gitattributes"),
               "# Fixtures are compared byte for byte: no line-ending conversion (multilingual.txt has CRLF lines).\n"
               "* -text\n")
    versions = {
        "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
        "tokenizers": tokenizers.__version__,
    }

    # --- tokenizers ---
    corpus_lines = shakespeare.split("\n") + MULTILINGUAL.split("\n")
    toks = {
        "tok-spm": (train_spm(corpus_lines, 500), {"add_bos_token": True, "add_eos_token": False}),
        "tok-bbpe": (train_bbpe([shakespeare, MULTILINGUAL], 600), None),
    }
    tok_info = {}
    for name, (hf_tok, extra) in toks.items():
        folder = os.path.join(out, name)
        shutil.rmtree(folder, ignore_errors=True)
        save_tokenizer(hf_tok, folder, extra)
        exp = expected_ids(folder, MULTILINGUAL)
        exp["made_with"] = versions
        write_json(os.path.join(folder, "expected_ids.json"), exp)
        tok_info[name] = exp
        print(f"{name}: vocab {exp['vocab_size']}, multilingual text -> {len(exp['full']['ids'])} ids, "
              f"roundtrip {exp['full']['roundtrip']}")

    # --- models ---
    for spec in MODELS:
        name, tok_name = spec["name"], spec["tokenizer"]
        info = tok_info[tok_name]
        tok_folder = os.path.join(out, tok_name)
        auto = AutoTokenizer.from_pretrained(tok_folder)
        start, end = PASSAGE_CHARS
        single = auto.encode(shakespeare[start:end], add_special_tokens=True)[:SEQ_LEN]
        stream = auto.encode(shakespeare[10000:14000], add_special_tokens=False)
        batch = [stream[:BATCH_LEN], stream[BATCH_LEN:2 * BATCH_LEN]]
        assert len(single) == SEQ_LEN and all(len(r) == BATCH_LEN for r in batch)

        model = build_model(spec, info["vocab_size"], info["bos_token_id"], info["eos_token_id"])
        folder = os.path.join(out, name)
        shutil.rmtree(folder, ignore_errors=True)
        dtype = getattr(torch, spec["dtype"])
        save_kw = {"max_shard_size": spec["max_shard_size"]} if "max_shard_size" in spec else {}
        model.to(dtype).save_pretrained(folder, **save_kw)
        for fname in os.listdir(tok_folder):
            if fname != "expected_ids.json":
                shutil.copy(os.path.join(tok_folder, fname), os.path.join(folder, fname))

        ref = reference_outputs(folder, single, batch, info["eos_token_id"])
        vocab = info["vocab_size"]
        with open(os.path.join(folder, "logits.bin"), "wb") as f:
            for block in ref["blocks"]:
                f.write(block.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())

        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config_json = json.load(f)
        if spec.get("legacy_config"):
            legacy = legacy_config(config_json)
            write_json(os.path.join(folder, "config.legacy.json"), legacy)
            # The old layout must describe the same model: transformers gives the same logits.
            with tempfile.TemporaryDirectory() as tmp:
                for fname in os.listdir(folder):
                    shutil.copy(os.path.join(folder, fname), os.path.join(tmp, fname))
                write_json(os.path.join(tmp, "config.json"), legacy)
                again = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager")
                with torch.no_grad():
                    a = again(torch.tensor([single])).logits
                    b = ref["model"](torch.tensor([single])).logits
                assert torch.equal(a, b), f"{name}: legacy config gives other logits"

        # An independent float64 forward must land within the tolerance the engine's tests use.
        exact_single = independent_logits(folder, [single])
        exact_batch = independent_logits(folder, batch)
        with torch.no_grad():
            hf_single = ref["model"](torch.tensor([single])).logits.double()
            hf_batch = ref["model"](torch.tensor(batch)).logits.double()
        f64_diff = max(float((exact_single - hf_single).abs().max()), float((exact_batch - hf_batch).abs().max()))
        assert f64_diff < 1e-4, f"{name}: transformers' f32 logits are {f64_diff} from a float64 forward"
        inv_diff = max(abs(a - b) / b for a, b in zip(rope_inv_freq_f64(config_json["rope_parameters"],
                                                                      config_json["head_dim"]), ref["inv_freq"]))
        assert inv_diff < 1e-6, f"{name}: rope frequencies differ from the llama3 formula by {inv_diff}"

        offset = 0
        blocks = [{"input": "single", "row": 0, "positions": SINGLE_POSITIONS}] + [
            {"input": "batch", "row": r, "positions": BATCH_POSITIONS} for r in range(len(batch))
        ]
        for blk in blocks:
            blk["shape"] = [len(blk["positions"]), vocab]
            blk["offset_bytes"] = offset
            offset += len(blk["positions"]) * vocab * 4
        stopped = info["eos_token_id"] in ref["new_ids"]
        expected = {
            "model": name,
            "tokenizer": tok_name,
            "stored_dtype": spec["dtype"],
            "compute": "LlamaForCausalLM.from_pretrained(dir, dtype=torch.float32, attn_implementation='eager'): "
                       "stored values upcast to f32, every logit and loss computed in f32",
            "made_with": versions,
            "seed": spec["seed"],
            "init_std": INIT_STD,
            "norm_weights": f"1 + {NORM_JITTER} * N(0,1) (not ones)",
            "inputs": {
                "single": single,
                "single_text": "AutoTokenizer.encode(tinyshakespeare[0:2000])[:40] (BOS first)",
                "batch": batch,
                "batch_text": "AutoTokenizer.encode(tinyshakespeare[10000:14000], add_special_tokens=False), "
                              "rows [0:24] and [24:48]",
            },
            "rope_inv_freq": ref["inv_freq"],
            "rope_attention_scaling": ref["attention_scaling"],
            "f64_max_abs_diff": f64_diff,
            "f64_note": "max |transformers f32 logits - an independent float64 forward| over all positions "
                        "of single and batch (tools/hf_fixtures.py independent_logits): f32 rounding alone",
            "loss": ref["loss"],
            "loss_note": "HF loss with labels=input_ids: mean over the 39 next-token predictions",
            "token_nll": ref["single_nll"],
            "argmax": ref["argmax"],
            "batch_loss": ref["batch_loss"],
            "batch_loss_note": "mean over both rows (2 x 23 predictions)",
            "batch_token_nll": ref["batch_nll"],
            "greedy": {
                "call": f"generate(single, do_sample=False, max_new_tokens={NEW_TOKENS}) with the saved "
                        "generation_config (eos_token_id set)",
                "new_ids": ref["new_ids"],
                "stopped_at_eos": stopped,
                "eos_token_id": info["eos_token_id"],
                "top1_minus_top2": ref["margins"],
                "min_margin": min(ref["margins"]),
            },
            "logits": {
                "file": "logits.bin",
                "dtype": "float32",
                "byte_order": "little",
                "layout": "blocks back to back, each row-major [positions, vocab]",
                "blocks": blocks,
                "total_bytes": offset,
            },
            "safetensors": safetensors_layout(folder),
            "sha256": {f: sha256(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
                       if f.endswith(".safetensors")},
        }
        write_json(os.path.join(folder, "expected.json"), expected)
        print(f"{name}: loss {ref['loss']:.6f} batch {ref['batch_loss']:.6f} greedy {ref['new_ids']} "
              f"min margin {min(ref['margins']):.4f}{' (EOS)' if stopped else ''}, f64 diff {f64_diff:.2e}")

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"total {total} bytes in {out}")
    if total >= 2 * 1024 * 1024:
        sys.exit(f"fixtures are {total} bytes: over the 2 MB budget")


if __name__ == "__main__":
    main()
