#!/usr/bin/python3
"""GPT-2 as Hugging Face transformers computes it (modeling_gpt2.py: GPT2LMHeadModel), in plain
torch, for the parity tests of nn/hf_gpt2 and the position convention (tests/test_hf_gpt2.cpp).

    /usr/bin/python3 tools/hf_gpt2_reference.py OUT_DIR            # small fixtures (make fixtures)
    /usr/bin/python3 tools/hf_gpt2_reference.py --shape tiny|small|xl DIR  # random checkpoint (F32):
                                    # tiny (GPT-2's vocabulary, d 64, L 2) for end-to-end runs, small / XL for timing

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
import re
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


def gpt2_forward(p, cfg, ids, prompt=None, past=None, lora=None, positions="hf", peft_lora=None, peft_ia3=None):
    """logits [B, T, V] of the real tokens. prompt [n, C]: prepended input embeddings; past:
    per layer (key, value) [n, C]; lora: per layer {"q": (A, B), "v": (A, B)}; peft_lora:
    {"h.N.attn.c_attn" (any Conv1D module): (A [r, in], B [out, r], scaling)} as HF PEFT's
    lora.Linear wraps a Conv1D: base(x) + lora_B(lora_A(x)) * scaling; peft_ia3: {module: (ia3_l,
    is_feedforward)} as ia3.Linear: base(x) * ia3_l.flatten(), or base(x * ia3_l.flatten())."""
    peft_lora, peft_ia3 = peft_lora or {}, peft_ia3 or {}

    def conv1d(x, name):
        ia3, ff = peft_ia3.get(name, (None, False))
        if ia3 is not None and ff:
            x = x * ia3.flatten()
        y = x @ p[name + ".weight"] + p[name + ".bias"]
        if ia3 is not None and not ff:
            y = y * ia3.flatten()
        if name in peft_lora:
            A, Bm, scaling = peft_lora[name]
            y = y + (x @ A.T @ Bm.T) * scaling
        return y

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
        qkv = conv1d(a, h_ + "attn.c_attn")
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
        x = x + conv1d(o, h_ + "attn.c_proj")
        m = layer_norm(x, p[h_ + "ln_2.weight"], p[h_ + "ln_2.bias"], eps)
        m = gelu_new(conv1d(m, h_ + "mlp.c_fc"))
        x = x + conv1d(m, h_ + "mlp.c_proj")
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
    peft_adapters(out, cfg, p, ids, gen, exp)
    write_safetensors(os.path.join(out, "expected.safetensors"), exp)


# ---- Hugging Face PEFT adapter directories, and how PEFT applies them to GPT-2 -------------
# What PeftModel.save_pretrained writes (adapter_config.json + adapter_model.safetensors, keys
# "base_model.model.<module>.<param>"), read back the way peft loads them onto GPT2LMHeadModel:
#   LORA (peft/tuners/lora): a module is targeted when its name equals a target_modules entry or
#     ends with "." + entry (and, with layers_to_transform, its ".<layers_pattern>.<i>." index is
#     listed); its rank / alpha are the first rank_pattern / alpha_pattern key matching
#     r".*\.{key}$", else r / lora_alpha; scaling = alpha / r (no rslora). On GPT-2's Conv1D
#     (weight [in, out], fan_in_fan_out true) lora_A is nn.Linear(in, r), lora_B nn.Linear(r, out).
#   PROMPT_TUNING: prompt_embeddings [n, C] prepended as inputs_embeds (positions 0..n-1).
#   IA3 (peft/tuners/ia3): target / feedforward modules matched as LoRA's; ia3_l [out, 1] scales a
#     module's output, [1, in] (feed-forward) its input.
#   PREFIX_TUNING (no projection): prompt_embeddings [n, 2*L*C] is PrefixEncoder's embedding;
#     get_prompt views its output [B, n, 2*L*C] as [B, n, 2L, H, C/H], permutes to
#     [2L, B, H, n, C/H] and splits in pairs: layer l's (key, value) = rows 2l and 2l+1.
PEFT_COMMON = {"task_type": "CAUSAL_LM", "base_model_name_or_path": "tests/fixtures/hf_gpt2/f32",
               "revision": None, "inference_mode": True}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        assert h["dtype"] == "F32", (path, name, h["dtype"])
        a, b = h["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[a:b]), dtype=torch.float32).reshape(h["shape"]).clone()
    return out


def write_adapter(path, config, tensors):
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "adapter_model.safetensors"), tensors)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({**PEFT_COMMON, **config}, f, indent=2)


def peft_forward(path, p, cfg, ids):
    """Logits of the real tokens with the adapter directory at `path` loaded as HF PEFT does."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        ac = json.load(f)
    sd = {k: t.double() for k, t in read_safetensors(os.path.join(path, "adapter_model.safetensors")).items()}
    L, C, H = cfg["n_layer"], cfg["n_embd"], cfg["n_head"]
    if ac["peft_type"] == "PROMPT_TUNING":
        return gpt2_forward(p, cfg, ids, prompt=sd["prompt_embeddings"], positions="hf")
    if ac["peft_type"] == "PREFIX_TUNING":
        n, Bn = ac["num_virtual_tokens"], ids.shape[0]
        pkv = sd["prompt_embeddings"].unsqueeze(0).expand(Bn, -1, -1)
        pkv = pkv.reshape(Bn, n, L * 2, H, C // H).permute([2, 0, 3, 1, 4]).split(2)
        # [2, B, H, n, C/H] per layer -> (key, value) [n, C], heads merged as GPT-2 splits them
        past = [(kv[0][0].transpose(0, 1).reshape(n, C), kv[1][0].transpose(0, 1).reshape(n, C)) for kv in pkv]
        return gpt2_forward(p, cfg, ids, past=past, positions="hf")
    if ac["peft_type"] == "IA3":  # every layer (IA3Config has no layers_to_transform)
        ia3 = {}
        for l in range(L):
            for mod in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                name = f"transformer.h.{l}.{mod}"
                if any(name == t or name.endswith("." + t) for t in ac["target_modules"]):
                    ff = any(name == t or name.endswith("." + t) for t in ac["feedforward_modules"])
                    ia3[f"h.{l}.{mod}"] = (sd.pop(f"base_model.model.{name}.ia3_l"), ff)
        assert not sd, (path, "unused tensors", list(sd))
        return gpt2_forward(p, cfg, ids, peft_ia3=ia3)
    assert ac["peft_type"] == "LORA" and not ac.get("use_rslora") and not ac.get("use_dora")
    lora, layers = {}, ac.get("layers_to_transform")
    for l in range(L):
        for mod in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            name = f"transformer.h.{l}.{mod}"
            if not any(name == t or name.endswith("." + t) for t in ac["target_modules"]):
                continue
            if layers is not None:
                idx = int(re.match(rf".*\.{ac['layers_pattern']}\.(\d+)\.", name).group(1))
                if idx not in ([layers] if isinstance(layers, int) else layers):
                    continue
            r = next((v for k, v in ac.get("rank_pattern", {}).items() if re.match(rf".*\.{k}$", name)), ac["r"])
            alpha = next((v for k, v in ac.get("alpha_pattern", {}).items() if re.match(rf".*\.{k}$", name)),
                         ac["lora_alpha"])
            A, Bm = sd.pop(f"base_model.model.{name}.lora_A.weight"), sd.pop(f"base_model.model.{name}.lora_B.weight")
            assert A.shape[0] == r and Bm.shape[1] == r, (path, name)
            lora[f"h.{l}.{mod}"] = (A, Bm, alpha / r)
    assert not sd, (path, "unused tensors", list(sd))
    return gpt2_forward(p, cfg, ids, peft_lora=lora)


def peft_adapters(out, cfg, p, ids, gen, exp):
    """adapters/<name>: one directory per case, and exp["peft.<name>.logits"] under HF PEFT."""
    C, L = cfg["n_embd"], cfg["n_layer"]
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float32) * 0.5
    key = lambda l, mod, part: f"base_model.model.transformer.h.{l}.{mod}.lora_{part}.weight"
    lora_common = {"peft_type": "LORA", "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": True,
                   "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
                   "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}

    def qv_block(r):
        """lora_B [3C, 2r] of q and v LoRAs of rank r fused: q rows use columns 0..r-1, v rows r..2r-1."""
        Bm = torch.zeros(3 * C, 2 * r)
        Bm[:C, :r], Bm[2 * C:, r:] = rnd(C, r), rnd(C, r)
        return Bm

    cases = {}
    # q and v LoRAs of rank 2 (alpha 4) as one c_attn LoRA of rank 4 (alpha 8).
    cases["lora_qv"] = ({**lora_common, "r": 4, "lora_alpha": 8.0, "target_modules": ["c_attn"]},
                        {key(l, "attn.c_attn", part): (rnd(4, C) if part == "A" else qv_block(2))
                         for l in range(L) for part in ("A", "B")})
    # Layer 1 only; c_attn (q, v) of rank 4 beside attn.c_proj of rank 2 through the patterns.
    cases["lora_mixed"] = ({**lora_common, "r": 4, "lora_alpha": 8.0, "target_modules": ["c_attn", "attn.c_proj"],
                            "rank_pattern": {"attn.c_proj": 2}, "alpha_pattern": {"attn.c_proj": 4.0},
                            "layers_to_transform": [1], "layers_pattern": "h"},
                           {key(1, "attn.c_attn", "A"): rnd(4, C), key(1, "attn.c_attn", "B"): qv_block(2),
                            key(1, "attn.c_proj", "A"): rnd(2, C), key(1, "attn.c_proj", "B"): rnd(C, 2)})
    # As HF PEFT trains it: dense c_attn B (k rows too), "c_proj" (attention and MLP) and c_fc.
    dense = {}
    for l in range(L):
        for mod, (i, o) in {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C),
                            "mlp.c_proj": (4 * C, C)}.items():
            dense[key(l, mod, "A")], dense[key(l, mod, "B")] = rnd(2, i), rnd(o, 2) * 0.5
    cases["lora_dense"] = ({**lora_common, "r": 2, "lora_alpha": 6.0, "target_modules": ["c_attn", "c_proj", "c_fc"]},
                           dense)
    prompt_learning = {"num_virtual_tokens": N_VIRTUAL, "token_dim": C, "num_transformer_submodules": 1,
                       "num_attention_heads": cfg["n_head"], "num_layers": L, "modules_to_save": None}
    cases["prompt"] = ({"peft_type": "PROMPT_TUNING", **prompt_learning, "prompt_tuning_init": "RANDOM"},
                       {"prompt_embeddings": rnd(N_VIRTUAL, C)})
    cases["prefix"] = ({"peft_type": "PREFIX_TUNING", **prompt_learning, "encoder_hidden_size": C,
                        "prefix_projection": False},
                       {"prompt_embeddings": rnd(N_VIRTUAL, 2 * L * C)})
    # IA3 as PEFT's GPT-2 default would hold it for scaled keys, values and the MLP's inner activation:
    # c_attn [3C, 1] with q rows 1, mlp.c_proj feed-forward [1, F].
    ia3 = {}
    for l in range(L):
        v = torch.ones(3 * C, 1)
        v[C:] = 1 + rnd(2 * C, 1)
        ia3[f"base_model.model.transformer.h.{l}.attn.c_attn.ia3_l"] = v
        ia3[f"base_model.model.transformer.h.{l}.mlp.c_proj.ia3_l"] = 1 + rnd(1, 4 * C)
    cases["ia3"] = ({"peft_type": "IA3", "target_modules": ["c_attn", "mlp.c_proj"],
                     "feedforward_modules": ["mlp.c_proj"], "fan_in_fan_out": True, "init_ia3_weights": True,
                     "modules_to_save": None}, ia3)
    for name, (config, tensors) in cases.items():
        path = os.path.join(out, "adapters", name)
        write_adapter(path, config, tensors)
        exp[f"peft.{name}.logits"] = peft_forward(path, p, cfg, ids)


def big(shape, out):
    """A random checkpoint of GPT-2 small or XL's shape (or tiny: GPT-2's vocabulary, d 64, L 2), F32, hub layout, written tensor by
    tensor so the script itself never holds two copies."""
    shapes = {"tiny": dict(vocab_size=50257, n_positions=256, n_embd=64, n_layer=2, n_head=2),
              "small": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
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
    elif len(sys.argv) == 4 and sys.argv[1] == "--shape" and sys.argv[2] in ("tiny", "small", "xl"):
        big(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__.split("\n\n")[1])


if __name__ == "__main__":
    main()
