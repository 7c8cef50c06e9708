"""Makes the tokenizer fixtures under tests/fixtures/tok/ (run by hand, not by CI):

  /work/pyref/bin/python tools/tok_fixtures.py [tinyshakespeare.txt] && deno fmt tests/fixtures/tok

Two small tokenizers trained by Hugging Face `tokenizers` on tinyshakespeare (vocab < 1000,
so the files stay small), each in a model folder as `transformers` reads it:
  llama2/  SentencePiece-style BPE with byte fallback: Prepend("▁") + Replace(" ", "▁")
           normalizer, <unk> <s> </s>, <0x00>..<0xFF>, BOS added by the post-processor.
  llama3/  byte-level BPE with LLaMA 3's split regex, <|begin_of_text|> <|end_of_text|>
           <|eot_id|>, BOS by the post-processor, two EOS ids in generation_config.json.
and ids.json: the ids Python gives for a multilingual text (with and without special
tokens), from `tokenizers.Tokenizer` and from `transformers.AutoTokenizer`.
"""

import json
import os
import sys

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "tok")
CORPUS = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/tinyshakespeare.txt"

TEXT = (
    "Hello, world! The quick brown fox jumps over the lazy dog.\n"
    "Café déjà vu: naïve façade, Ærøskøbing, señor.\n"
    "中文：你好，世界。日本語：こんにちは、世界！カタカナ\n"
    "العربية: مرحبا بالعالم\n"
    "Русский: Привет, мир!\n"
    "Emoji: 👋🏽 🚀 ❤️ 👨‍👩‍👧\n"
    "def f(x):\n\treturn x  *  2\t# tab\n"
    "    four spaces,   three,  two\n\n\n"
    "Numbers 1234567 and 3.14159; <s> and </s> and <|end_of_text|> inside text.\n"
    "  trailing spaces   \n"
)

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def corpus_lines():
    with open(CORPUS, encoding="utf-8") as f:
        text = f.read()
    return [p for p in text.split("\n\n") if p]


def llama2():
    # Train the merges on the plain model, then rebuild it the way LLaMA 2 lays out its vocab:
    # <unk> <s> </s>, the 256 byte tokens, then the learned pieces.
    tmp = Tokenizer(models.BPE(unk_token="<unk>"))
    tmp.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tmp.pre_tokenizer = pre_tokenizers.Split(Regex("▁[^▁]*|[^▁]+"), "isolated")
    trainer = trainers.BpeTrainer(vocab_size=700, limit_alphabet=80, show_progress=False)
    tmp.train_from_iterator(corpus_lines(), trainer)
    learned = json.loads(tmp.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for tok, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>"]]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {
            "__type": "AddedToken",
            "content": "<s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    return tok, config, generation


def llama3():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))],
            ),
        ]
    )
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    generation = {
        "bos_token_id": tok.token_to_id("<|begin_of_text|>"),
        "eos_token_id": [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")],
    }
    return tok, config, generation


def main():
    from transformers import AutoTokenizer

    ids = {"text": TEXT}
    for name, make in [("llama2", llama2), ("llama3", llama3)]:
        tok, config, generation = make()
        folder = os.path.join(OUT, name)
        os.makedirs(folder, exist_ok=True)
        tok.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
        raw = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        hf = AutoTokenizer.from_pretrained(folder)
        plain = raw.encode(TEXT, add_special_tokens=False).ids
        special = raw.encode(TEXT, add_special_tokens=True).ids
        assert hf.encode(TEXT, add_special_tokens=False) == plain, name
        assert hf.encode(TEXT, add_special_tokens=True) == special, name
        ids[name] = {
            "vocab_size": raw.get_vocab_size(with_added_tokens=True),
            "bos_id": hf.bos_token_id,
            "eos_id": hf.eos_token_id,
            "ids": plain,
            "ids_special": special,
            "decoded": raw.decode(plain),
            "decoded_special": raw.decode(special, skip_special_tokens=False),
            "decoded_skip": raw.decode(special, skip_special_tokens=True),
        }
        print(name, len(plain), "ids, vocab", ids[name]["vocab_size"])
    with open(os.path.join(OUT, "ids.json"), "w") as f:
        json.dump(ids, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
