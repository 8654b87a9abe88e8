#!/usr/bin/python3
"""GPT-2 as Hugging Face transformers computes it (modeling_gpt2.py: GPT2LMHeadModel), in plain
torch, for the parity tests of nn/hf_gpt2 and the position convention (tests/test_hf_gpt2.cpp).

    /usr/bin/python3 tools/hf_gpt2_reference.py OUT_DIR            # small fixtures (make fixtures)
    /usr/bin/python3 tools/hf_gpt2_reference.py --shape small|xl DIR # random GPT-2 small / XL
                                                                     # checkpoint (F32) for timing

What is reproduced from transformers (read from modeling_gpt2.py and pytorch_utils.Conv1D, not
imported: transformers is not packaged for Debian):
  - Conv1D: y = x @ W + b with W stored [in, out]; c_attn fuses q, k, v as columns [0,C) [C,2C)
    [2C,3C) of one [C, 3C] weight; heads split C as [H, C/H].
  - embeddings: wte(ids) + wpe(position_ids), position_ids = past_length .. past_length + T - 1,
    where past_length is the length of past_key_values; with inputs_embeds the position
    embeddings are added to every input vector (prompt vectors included).
  - block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); mlp = c_proj(gelu_new(c_fc(h))),
    gelu_new(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); LayerNorm eps
    layer_norm_epsilon.
  - attention: softmax(q k^T / sqrt(C/H) + causal mask) v, keys = past keys ++ new keys, query i
    (absolute position past_length + i) sees keys 0 .. past_length + i; then c_proj.
  - head: ln_f, then logits = h @ wte^T (lm_head tied: absent from the files).
  - loss: labels shifted by one, mean cross-entropy.
Hub layout written: config.json + model.safetensors with the h.N.attn.bias / masked_bias buffers
older files hold, keys with or without "transformer.", sharded model.safetensors.index.json.

HF PEFT semantics for the adapters (peft/tuners, peft_model.py PeftModelForCausalLM):
  - prompt tuning: inputs_embeds = cat(prompt [n, C], wte(ids)) -> the n prompt vectors get
    position embeddings 0..n-1 and real tokens n..n+T-1; logits of the real tokens are compared.
  - prefix tuning: past_key_values = per layer (key, value) [n, C] (heads split as [H, C/H]),
    prefix attention mask of ones -> real tokens at positions n..n+T-1.
  - LoRA on q and v: delta = (lora_alpha / r) * x A^T B^T, A [r, C], B [C, r] (the same as one
    fused c_attn LoRA of rank 2r whose k rows are zero).
Also the `keep` convention (AdapterHub; peftlab's default for its own bases): real tokens at
0..T-1, prompt vectors without position embedding.

Everything is computed in float64 from float32 weights and written as F32, so the expected
values carry no float32 rounding of their own. Debian's python3-torch has no `safetensors`
package: the format is written here with struct + json.
"""
import json
import math
import os
import struct
import sys

import torch

SMALL = dict(vocab_size=50, n_positions=24, n_embd=16, n_layer=2, n_head=2)
B, T, N_VIRTUAL, LORA_R, LORA_ALPHA = 2, 6, 3, 2, 4.0


def config_json(shape):
    cfg = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1, "bos_token_id": 50256,
        "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
        "n_inner": None, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "summary_type": "cls_index", "use_cache": True,
    }
    cfg.update(shape)
    cfg["n_ctx"] = cfg["n_positions"]
    return cfg


def write_safetensors(path, tensors, dtype="F32"):
    """tensors: {name: float tensor}; written in name order as F32 or BF16 (round to nearest)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.float32).contiguous()
        if dtype == "BF16":
            raw = t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        else:
            raw = t.numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)


def write_dir(path, cfg, tensors, dtype="F32", shards=1):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if shards == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), tensors, dtype)
        return
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        write_safetensors(os.path.join(path, fname), part, dtype)
        weight_map.update({n: fname for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)


def random_gpt2(cfg, gen, std=0.2):
    """Hub-named float32 parameters (no prefix). std 0.2 (not GPT-2's 0.02) so that the small
    test model's logits and gradients are far from uniform."""
    C, F, V, P = cfg["n_embd"], cfg["n_inner"] or 4 * cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]

    def rnd(*shape, scale=std):
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * scale

    p = {"wte.weight": rnd(V, C), "wpe.weight": rnd(P, C), "ln_f.weight": 1 + rnd(C, scale=0.1),
         "ln_f.bias": rnd(C, scale=0.1)}
    for l in range(cfg["n_layer"]):
        h = f"h.{l}."
        for ln in ("ln_1", "ln_2"):
            p[h + ln + ".weight"] = 1 + rnd(C, scale=0.1)
            p[h + ln + ".bias"] = rnd(C, scale=0.1)
        p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"] = rnd(C, 3 * C), rnd(3 * C, scale=0.1)
        p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"] = rnd(C, C), rnd(C, scale=0.1)
        p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"] = rnd(C, F), rnd(F, scale=0.1)
        p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"] = rnd(F, C), rnd(C, scale=0.1)
    return p


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def layer_norm(x, w, b, eps):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)


def gpt2_forward(p, cfg, ids, prompt=None, past=None, lora=None, positions="hf"):
    """logits [B, T, V] of the real tokens. prompt [n, C]: prepended input embeddings; past:
    per layer (key, value) [n, C]; lora: per layer {"q": (A, B), "v": (A, B)}."""
    C, H, L = cfg["n_embd"], cfg["n_head"], cfg["n_layer"]
    Dh, eps = C // H, cfg["layer_norm_epsilon"]
    Bn, Tn = ids.shape
    n_prompt = 0 if prompt is None else prompt.shape[0]
    past_len = 0 if past is None else past[0][0].shape[0]
    wte, wpe = p["wte.weight"], p["wpe.weight"]
    x = wte[ids]
    if prompt is not None:
        pr = prompt.unsqueeze(0).expand(Bn, -1, -1)
        if positions == "hf":  # inputs_embeds: every input vector gets wpe(0 .. n+T-1)
            x = torch.cat([pr, x], 1) + wpe[torch.arange(n_prompt + Tn)]
        else:  # keep: real tokens at 0..T-1, prompt vectors without position embedding
            x = torch.cat([pr, x + wpe[torch.arange(Tn)]], 1)
    else:
        start = past_len if positions == "hf" else 0
        x = x + wpe[torch.arange(start, start + Tn)]
    S = x.shape[1]
    for l in range(L):
        h_ = f"h.{l}."
        a = layer_norm(x, p[h_ + "ln_1.weight"], p[h_ + "ln_1.bias"], eps)
        qkv = a @ p[h_ + "attn.c_attn.weight"] + p[h_ + "attn.c_attn.bias"]
        q, k, v = qkv.split(C, dim=2)
        if lora is not None:
            scale = LORA_ALPHA / LORA_R
            A, Bm = lora[l]["q"]
            q = q + scale * (a @ A.T @ Bm.T)
            A, Bm = lora[l]["v"]
            v = v + scale * (a @ A.T @ Bm.T)
        if past is not None:
            pk, pv = past[l]
            k = torch.cat([pk.unsqueeze(0).expand(Bn, -1, -1), k], 1)
            v = torch.cat([pv.unsqueeze(0).expand(Bn, -1, -1), v], 1)

        def heads(t):
            return t.reshape(Bn, t.shape[1], H, Dh).transpose(1, 2)

        qh, kh, vh = heads(q), heads(k), heads(v)
        w = qh @ kh.transpose(-1, -2) / math.sqrt(Dh)
        Sk = kh.shape[2]
        # query i sits at absolute position (Sk - S) + i and sees keys 0 .. (Sk - S) + i
        allowed = torch.arange(Sk).unsqueeze(0) <= (torch.arange(S).unsqueeze(1) + (Sk - S))
        w = w.masked_fill(~allowed, torch.finfo(w.dtype).min)
        o = (torch.softmax(w, dim=-1) @ vh).transpose(1, 2).reshape(Bn, S, C)
        x = x + o @ p[h_ + "attn.c_proj.weight"] + p[h_ + "attn.c_proj.bias"]
        m = layer_norm(x, p[h_ + "ln_2.weight"], p[h_ + "ln_2.bias"], eps)
        m = gelu_new(m @ p[h_ + "mlp.c_fc.weight"] + p[h_ + "mlp.c_fc.bias"])
        x = x + m @ p[h_ + "mlp.c_proj.weight"] + p[h_ + "mlp.c_proj.bias"]
    x = layer_norm(x, p["ln_f.weight"], p["ln_f.bias"], eps)
    return (x @ wte.T)[:, n_prompt:]


def token_losses(logits, ids):
    """[B, T-1]: cross-entropy of token t+1 given the logits at t (labels shifted as HF)."""
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    return -lp.gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)


def fixtures(out):
    gen = torch.Generator().manual_seed(20261130)
    cfg = config_json(SMALL)
    p32 = random_gpt2(cfg, gen)
    C, L, P = cfg["n_embd"], cfg["n_layer"], cfg["n_positions"]
    mask = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
    # F32: hub names without prefix, with the causal-mask buffers older files hold.
    plain = dict(p32)
    for l in range(L):
        plain[f"h.{l}.attn.bias"] = mask
        plain[f"h.{l}.attn.masked_bias"] = torch.tensor(-1e4)
    write_dir(os.path.join(out, "f32"), cfg, plain)
    prefixed = {"transformer." + k: t for k, t in p32.items()}
    write_dir(os.path.join(out, "bf16"), cfg, prefixed, dtype="BF16")
    write_dir(os.path.join(out, "sharded"), cfg, prefixed, shards=2)

    p = {k: t.double() for k, t in p32.items()}
    pbf = {k: t.to(torch.bfloat16).double() for k, t in p32.items()}
    ids = torch.randint(0, cfg["vocab_size"], (B, T), generator=gen)
    exp = {"input_ids": ids.double()}
    logits = gpt2_forward(p, cfg, ids)
    exp["f32.logits"], exp["f32.losses"] = logits, token_losses(logits, ids)
    exp["bf16.logits"] = gpt2_forward(pbf, cfg, ids)

    def grads(params, fn):
        for t in params:
            t.requires_grad_(True)
        lg = fn()
        token_losses(lg, ids).mean().backward()
        return lg.detach(), [t.grad for t in params]

    f32 = lambda shape, s=0.5: (torch.randn(*shape, generator=gen, dtype=torch.float32) * s).double()
    prompt = f32((N_VIRTUAL, C))
    exp["prompt.embeddings"] = prompt
    exp["prompt.keep.logits"] = gpt2_forward(p, cfg, ids, prompt=prompt, positions="keep")
    exp["prompt.hf.logits"], (exp["prompt.hf.grad"],) = grads(
        [prompt], lambda: gpt2_forward(p, cfg, ids, prompt=prompt, positions="hf"))

    past = [(f32((N_VIRTUAL, C)), f32((N_VIRTUAL, C))) for _ in range(L)]
    flat = [t for kv in past for t in kv]
    for l in range(L):
        exp[f"prefix.key.{l}"], exp[f"prefix.value.{l}"] = past[l]
    exp["prefix.keep.logits"] = gpt2_forward(p, cfg, ids, past=past, positions="keep")
    lg, gs = grads(flat, lambda: gpt2_forward(p, cfg, ids, past=past, positions="hf"))
    exp["prefix.hf.logits"] = lg
    for l in range(L):
        exp[f"prefix.hf.grad.key.{l}"], exp[f"prefix.hf.grad.value.{l}"] = gs[2 * l], gs[2 * l + 1]

    lora = [{m: (f32((LORA_R, C)), f32((C, LORA_R))) for m in ("q", "v")} for _ in range(L)]
    flat = [t for d in lora for m in ("q", "v") for t in d[m]]
    lg, gs = grads(flat, lambda: gpt2_forward(p, cfg, ids, lora=lora))
    exp["lora.logits"] = lg
    i = 0
    for l in range(L):
        for m in ("q", "v"):
            for part in ("A", "B"):
                exp[f"lora.{m}.{part}.{l}"] = lora[l][m][0 if part == "A" else 1]
                exp[f"lora.grad.{m}.{part}.{l}"] = gs[i]
                i += 1
    write_safetensors(os.path.join(out, "expected.safetensors"), exp)


def big(shape, out):
    """A random checkpoint of GPT-2 small or XL's shape, F32, hub layout, written tensor by
    tensor so the script itself never holds two copies."""
    shapes = {"small": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
              "xl": dict(vocab_size=50257, n_positions=1024, n_embd=1600, n_layer=48, n_head=25)}
    cfg = config_json(shapes[shape])
    gen = torch.Generator().manual_seed(1)
    C, F = cfg["n_embd"], 4 * cfg["n_embd"]
    specs = {"wte.weight": (cfg["vocab_size"], C), "wpe.weight": (cfg["n_positions"], C),
             "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for l in range(cfg["n_layer"]):
        h = f"h.{l}."
        specs.update({h + "ln_1.weight": (C,), h + "ln_1.bias": (C,), h + "ln_2.weight": (C,),
                      h + "ln_2.bias": (C,), h + "attn.c_attn.weight": (C, 3 * C),
                      h + "attn.c_attn.bias": (3 * C,), h + "attn.c_proj.weight": (C, C),
                      h + "attn.c_proj.bias": (C,), h + "mlp.c_fc.weight": (C, F), h + "mlp.c_fc.bias": (F,),
                      h + "mlp.c_proj.weight": (F, C), h + "mlp.c_proj.bias": (C,)})
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(specs):
        n = 4 * math.prod(specs[name])
        header[name] = {"dtype": "F32", "shape": list(specs[name]), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in sorted(specs):
            t = torch.randn(*specs[name], generator=gen, dtype=torch.float32) * 0.02
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                t += 1
            f.write(t.numpy().tobytes())


def main():
    if len(sys.argv) == 2 and not sys.argv[1].startswith("-"):
        fixtures(sys.argv[1])
    elif len(sys.argv) == 4 and sys.argv[1] == "--shape" and sys.argv[2] in ("small", "xl"):
        big(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__.split("\n\n")[1])


if __name__ == "__main__":
    main()
