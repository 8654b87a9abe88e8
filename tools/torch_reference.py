#!/usr/bin/python3
"""PyTorch reference for the parity test (tests/test_parity.cpp), in the manner of llm.c's
train_gpt2.py / test_gpt2.c.

    /usr/bin/python3 tools/torch_reference.py <model.safetensors> <expected.safetensors>

Reads the parameters and batch written by tools/write_parity_model.cpp, rebuilds peftlab's GPT
in plain torch ops and writes, as F32 safetensors:
    logits         [B, T, V]  forward on the batch
    loss           []         mean cross-entropy over targets != -1
    grad.<name>    like <name> d(loss)/d(parameter), for every parameter
    adamw_losses   [5]        adamw_losses[k] = loss on the same batch AFTER k+1 steps of
                              torch.optim.AdamW(lr 1e-2, betas (0.9, 0.999), eps 1e-8,
                              weight_decay 0.01, one group holding every parameter); the loss
                              before the first step is `loss`.

Precision: everything is computed in float64 and rounded to float32 only when written, so the
expected values carry no float32 rounding of their own and the C++ test measures its own error
alone. The script also reruns in float32 and prints how far torch's float32 lands from the
float64 result, the noise floor against which the C++ errors can be judged.

Runs on Debian's python3-torch (1.13, CPU). The `safetensors` package is not available there,
so the format is read and written here with struct + json.
"""
import json
import math
import os
import struct
import sys
import tempfile

import torch
import torch.nn.functional as F

ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
ADAMW_STEPS = 5
LN_EPS = 1e-5


def read_safetensors(path):
    """-> ({name: float64 tensor}, metadata dict). Only F32 tensors, which is all we write."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        sys.exit(f"{path}: {len(blob)} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        sys.exit(f"{path}: header length {n} runs past the end of the file ({len(blob)} bytes)")
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            sys.exit(f"{path}: tensor '{name}' has dtype {info['dtype']}, expected F32")
        begin, end = info["data_offsets"]
        shape = info["shape"]
        if end - begin != 4 * math.prod(shape) or end > len(data):
            sys.exit(f"{path}: tensor '{name}' offsets {begin}..{end} do not fit shape {shape}")
        flat = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.float32) if end > begin \
            else torch.zeros(0, dtype=torch.float32)
        tensors[name] = flat.reshape(shape).to(torch.float64)
    return tensors, metadata


def write_safetensors(path, tensors, metadata):
    """F32, names sorted, header space-padded to a multiple of 8; temp file then rename."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.float32).contiguous()
        raw = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for raw in chunks:
                f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make a committed file private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def attention(x, p, prefix, n_heads, valid):
    """x [B, T, C] (already LN1'd); causal, padding keys (valid == 0) never attended."""
    B, T, C = x.shape
    Dh = C // n_heads

    def heads(name):  # [B, T, C] -> [B, H, T, Dh]
        y = F.linear(x, p[f"{prefix}.{name}.weight"], p[f"{prefix}.{name}.bias"])
        return y.view(B, T, n_heads, Dh).transpose(1, 2)

    q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
    scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)  # [B, H, T, T]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # key j > query i
    padding = (valid == 0).view(B, 1, 1, T)
    scores = scores.masked_fill(future | padding, float("-inf"))
    # Right padding leaves key 0 valid in every row, so no row is fully masked (which
    # would give NaN here and zeros in peftlab).
    a = torch.softmax(scores, dim=-1) @ v  # [B, H, T, Dh]
    a = a.transpose(1, 2).reshape(B, T, C)
    return F.linear(a, p[f"{prefix}.o_proj.weight"], p[f"{prefix}.o_proj.bias"])


def forward(p, cfg, tokens, valid):
    """logits [B, T, V] of peftlab's GPT: pre-LN blocks, learned positions, untied head."""
    B, T = tokens.shape
    C = cfg["d_model"]

    def ln(x, name):
        return F.layer_norm(x, (C,), p[f"{name}.weight"], p[f"{name}.bias"], LN_EPS)

    x = p["wte.weight"][tokens] + p["wpe.weight"][torch.arange(T)]
    for l in range(cfg["n_layers"]):
        b = f"blocks.{l}"
        x = x + attention(ln(x, f"{b}.ln1"), p, f"{b}.attn", cfg["n_heads"], valid)
        h = F.linear(ln(x, f"{b}.ln2"), p[f"{b}.mlp.fc.weight"], p[f"{b}.mlp.fc.bias"])
        x = x + F.linear(F.gelu(h, approximate="tanh"), p[f"{b}.mlp.proj.weight"], p[f"{b}.mlp.proj.bias"])
    x = ln(x, "ln_f")
    head = p["wte.weight"] if cfg["tie_embeddings"] else p["head.weight"]
    return F.linear(x, head)


def loss_fn(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)


def run(model, cfg, dtype):
    """-> dict of the expected tensors, computed in `dtype`."""
    params = {k: v.to(dtype).clone().requires_grad_(True) for k, v in model.items() if not k.startswith("input.")}
    tokens = model["input.tokens"].long()
    targets = model["input.targets"].long()
    valid = model["input.valid"]

    logits = forward(params, cfg, tokens, valid)
    loss = loss_fn(logits, targets)
    loss.backward()
    out = {"logits": logits.detach(), "loss": loss.detach()}
    out.update({f"grad.{k}": p.grad.detach().clone() for k, p in params.items()})

    opt = torch.optim.AdamW(list(params.values()), **ADAMW)
    losses = []
    for _ in range(ADAMW_STEPS):
        # The first step reuses the gradients computed above.
        opt.step()
        opt.zero_grad()
        step_loss = loss_fn(forward(params, cfg, tokens, valid), targets)
        step_loss.backward()
        losses.append(step_loss.detach())
    out["adamw_losses"] = torch.stack(losses)
    return out


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} <model.safetensors> <expected.safetensors>")
    model_path, out_path = sys.argv[1:]
    torch.set_num_threads(1)  # bitwise-reproducible fixture
    model, meta = read_safetensors(model_path)
    if "config" not in meta:
        sys.exit(f"{model_path}: metadata has no 'config'")
    cfg = json.loads(meta["config"])
    if cfg["dropout"] != 0:
        sys.exit(f"{model_path}: config dropout = {cfg['dropout']}; the reference needs 0")

    ref = run(model, cfg, torch.float64)
    f32 = run(model, cfg, torch.float32)
    # k_proj.bias is left out: its gradient is zero in exact arithmetic (softmax ignores a
    # score shift shared by all keys), so both sides hold only rounding noise.
    grads = [k for k in ref if k.startswith("grad.") and not k.endswith("attn.k_proj.bias")]
    worst = max(grads, key=lambda k: rel_err(f32[k].double(), ref[k]))
    print(f"torch float32 vs float64: logits {rel_err(f32['logits'].double(), ref['logits']):.2e}, "
          f"loss {rel_err(f32['loss'].double(), ref['loss']):.2e}, "
          f"worst gradient {rel_err(f32[worst].double(), ref[worst]):.2e} ({worst[5:]}), "
          f"adamw losses {rel_err(f32['adamw_losses'].double(), ref['adamw_losses']):.2e}")
    print(f"loss {ref['loss'].item():.6f}; after AdamW steps: "
          + " ".join(f"{x:.6f}" for x in ref["adamw_losses"].tolist()))

    out_meta = {
        "source": os.path.basename(model_path),
        "torch": torch.__version__,
        "precision": "computed in float64, stored as float32",
        "adamw": json.dumps({**ADAMW, "steps": ADAMW_STEPS}),
        "adamw_losses": "loss after each AdamW step; the loss before the first is `loss`",
    }
    write_safetensors(out_path, ref, out_meta)
    print(f"wrote {out_path}: {len(ref)} tensors")


if __name__ == "__main__":
    main()
