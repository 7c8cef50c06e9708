"""Hand check (not run by CI): the engine's loss on models dumped by `QG_HF_DUMP=DIR cargo test --release
--test model dump_for_transformers_check` equals transformers' LlamaForCausalLM loss on the same weights
(tied and untied, default and llama3 RoPE). Usage: /work/pyref/bin/python rust/tests/model_hf_check.py DIR"""
import json, os, sys, numpy as np, torch
from transformers import LlamaConfig, LlamaForCausalLM
root = sys.argv[1]
for case in sorted(os.listdir(root)):
    d = os.path.join(root, case)
    cfg = LlamaConfig.from_pretrained(d)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).float().eval()
    run = json.load(open(os.path.join(d, "run.json")))
    sd = {}
    for t in run["tensors"]:
        a = np.fromfile(os.path.join(d, t["name"] + ".bin"), dtype="<f4").reshape(t["shape"])
        sd[t["name"]] = torch.from_numpy(a.copy())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = cfg.tie_word_embeddings
    assert not unexpected, unexpected
    assert set(missing) <= ({"lm_head.weight"} if tied else set()), missing
    if tied: assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    b, t = run["b"], run["t"]
    toks = torch.tensor(run["tokens"]).reshape(b, t + 1)
    with torch.no_grad():
        logits = model(toks[:, :t]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1)).item()
    print(case, "rope", cfg.rope_parameters.get("rope_type"), "tied", tied, "ours", run["loss"], "hf", loss, "diff", abs(loss - run["loss"]))
