#!/usr/bin/env python3
"""Make the chat-template fixtures under tests/fixtures/chat/ (run by hand, never by CI).

    /work/pyref/bin/python tools/chat_fixtures.py

Needs `transformers` and `jinja2` (`/work/pyref/bin/pip install transformers jinja2`).

Writes three model folders, each a copy of one tokenizer fixture of tests/fixtures/tok/ plus a
chat template in one of the three places transformers reads one from:

  llama3/  tokenizer_config.json with `chat_template` a string (Meta-Llama-3-8B-Instruct's)
  llama2/  tokenizer_config.json with `chat_template` the named list [{name, template}]
           whose "default" is Llama-2-7b-chat-hf's template
  zephyr/  chat_template.jinja (zephyr-7b-beta's template); tokenizer_config.json also holds a
           decoy `chat_template` string, which transformers ignores because the .jinja file wins

and expected.json: for each folder and conversation, the text transformers'
`apply_chat_template(..., tokenize=False)` renders with add_generation_prompt false and true,
and the ids of `apply_chat_template(..., tokenize=True)` (no generation prompt), which qgalore's
lib/chat_template.ts and lib/finetune_data.ts must reproduce exactly.
"""

import json
import os
import shutil
import sys

import jinja2
import transformers
from transformers import AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "chat")

# meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json "chat_template".
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# meta-llama/Llama-2-7b-chat-hf, tokenizer_config.json "chat_template" (the Jinja text holds the
# two characters backslash-n inside its string literals, which Jinja turns into newlines).
LLAMA2 = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    r"{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    r"{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    r"{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    r"{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    r"{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    r"{% endif %}{% endfor %}"
)

# HuggingFaceH4/zephyr-7b-beta, tokenizer_config.json "chat_template".
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + "
    "eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# A second named template, so the list form has an entry that must NOT be used.
TOOL_USE = "{% for message in messages %}TOOL {{ message['content'] }}\n{% endfor %}"

CONVERSATIONS = {
    "single": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
    ],
    "multi": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "  Name a colour.  "},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And a fruit?\nOne word."},
        {"role": "assistant", "content": " Pear \n"},
    ],
    "open": [
        {"role": "user", "content": "Say hello in French."},
    ],
}


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def make_folder(name, tok_source, config_extra, jinja_file=None):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    src = os.path.join(ROOT, "tok", tok_source)
    shutil.copyfile(os.path.join(src, "tokenizer.json"), os.path.join(d, "tokenizer.json"))
    gen = os.path.join(src, "generation_config.json")
    if os.path.exists(gen):
        shutil.copyfile(gen, os.path.join(d, "generation_config.json"))
    with open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.update(config_extra)
    write_json(os.path.join(d, "tokenizer_config.json"), config)
    if jinja_file is not None:
        with open(os.path.join(d, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(jinja_file)
    return d


def ids_of(out):
    # transformers 5 returns a BatchEncoding by default, 4.x a list.
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return [int(i) for i in out]


def main():
    folders = {
        "llama3": make_folder("llama3", "llama3", {"chat_template": LLAMA3}),
        "llama2": make_folder(
            "llama2",
            "llama2",
            {"chat_template": [
                {"name": "tool_use", "template": TOOL_USE},
                {"name": "default", "template": LLAMA2},
            ]},
        ),
        "zephyr": make_folder(
            "zephyr", "llama2", {"chat_template": "DECOY {{ messages }}"}, jinja_file=ZEPHYR
        ),
    }
    expected = {
        "transformers": transformers.__version__,
        "jinja2": jinja2.__version__,
        "conversations": CONVERSATIONS,
        "renders": {},
    }
    for name, d in folders.items():
        tok = AutoTokenizer.from_pretrained(d)
        per = {}
        for cname, conv in CONVERSATIONS.items():
            entry = {}
            for gen in (False, True):
                key = "with_generation_prompt" if gen else "text"
                entry[key] = tok.apply_chat_template(
                    conv, tokenize=False, add_generation_prompt=gen
                )
            entry["ids"] = ids_of(tok.apply_chat_template(conv, tokenize=True))
            # Same ids as tokenizing the rendered text without special tokens (what
            # lib/finetune_data.ts does).
            plain = tok(entry["text"], add_special_tokens=False)["input_ids"]
            if plain != entry["ids"]:
                sys.exit(f"{name}/{cname}: apply_chat_template ids differ from encode(text)")
            per[cname] = entry
        expected["renders"][name] = per
    # Llama-2's template refuses a conversation whose roles do not alternate.
    tok = AutoTokenizer.from_pretrained(folders["llama2"])
    try:
        tok.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
        )
        sys.exit("llama2 template accepted two user turns in a row")
    except Exception as e:  # jinja2 TemplateError
        expected["llama2_error"] = str(e)
    write_json(os.path.join(OUT, "expected.json"), expected)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
