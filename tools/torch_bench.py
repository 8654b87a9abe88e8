#!/usr/bin/python3
"""PyTorch side of `make bench`: the same GPT, PEFT methods, step and generation as peftlab.

Model (as nn/gpt.h): token + learned position embeddings, L pre-LN blocks with separate
q/k/v/o projections (bias), GELU (tanh form), final LayerNorm, untied head without bias.
Methods (as peft/): full; prompt (n vectors prepended to the input embeddings); prefix
(hidden-state form: LN1 and the K/V projections of n vectors per layer, once per batch);
prefix-kv (n keys and values per layer); lora (rank r on q and v: r 8, lora_alpha 16 unless set). A training
step is forward + cross-entropy + backward + AdamW (lr 1e-3, weight decay 0.01).
Generation: greedy with a preallocated KV cache (prefix keys/values enter it once).

Two ways to run it:
  python3 tools/torch_bench.py --config small --method full --steps 5    # standalone
  python3 tools/torch_bench.py --serve                                    # bench's worker
The worker reads one JSON command per line on stdin and answers one JSON line on stdout;
it holds several sessions (models) at once, each named by "id":
  {"cmd": "setup", "id", "kind": "train"|"generate", "vocab", "d_model", "layers", "heads",
   "d_ff", "seq", "batch", "method", "n", "options", "warmup", ...}
     -> {"ok": true, "peak_rss_growth_bytes": ...}  (how far the worker's resident memory rose
        above its level before the setup, at its highest during setup and warm-up: what the
        session adds to the worker's peak, for the bench's --max-memory)
  ("options": the method's own settings as peftlab's --methods METHOD:KEY=VALUE gives them; a
   setting this side does not implement is an error, so the bench shows no comparison for it)
  {"cmd": "step", "id"}  -> {"ms": ...}   one training step, or one whole generate() call
  {"cmd": "end", "id"}   -> {"ok": true}  drops the session
Errors answer {"error": "..."} and the worker carries on.
Threads: --threads (torch.set_num_threads). Run it with the OpenMP build of OpenBLAS
(LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp) so that torch's OpenMP pool
and OpenBLAS share one set of threads; the hello line says which BLAS was loaded.
"""
import argparse
import ctypes
import json
import math
import os
import resource
import sys
import time

try:
    import torch
except (ImportError, OSError) as e:  # optional: one line for the bench's "PyTorch side skipped", not a traceback
    sys.exit(f"torch_bench.py: PyTorch is not importable ({e}); on Debian: apt-get install python3-torch")
import torch.nn as nn
import torch.nn.functional as F

from bench_shapes import CONFIGS


def blas_info():
    """The BLAS libraries mapped into this process, and OpenBLAS's kernel and thread count."""
    libs = set()
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            name = os.path.basename(path)
            if ("blas" in name or "lapack" in name or "mkl" in name or "dnnl" in name) and ".so" in name:
                libs.add(os.path.realpath(path))
    info = {"libraries": sorted(libs)}
    for path in sorted(libs):
        if "openblas" not in path or "libblas" in os.path.basename(path) or "lapack" in path:
            continue
        lib = ctypes.CDLL(path)  # already loaded: the same handle
        lib.openblas_get_corename.restype = ctypes.c_char_p
        lib.openblas_get_config.restype = ctypes.c_char_p
        info["openblas"] = path
        info["core"] = lib.openblas_get_corename().decode()
        info["config"] = lib.openblas_get_config().decode()
        info["openblas_threads"] = lib.openblas_get_num_threads()
    return info


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(x)); base frozen."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.empty(r, base.in_features).uniform_(-1 / math.sqrt(base.in_features),
                                                                         1 / math.sqrt(base.in_features)))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.A), self.B)


class Block(nn.Module):
    def __init__(self, C, H, Fd):
        super().__init__()
        self.H = H
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.q, self.k, self.v, self.o = (nn.Linear(C, C) for _ in range(4))
        self.fc, self.proj = nn.Linear(C, Fd), nn.Linear(Fd, C)

    def prefix_kv(self, hidden):
        """Hidden-state prefix [n, C] -> its keys and values [n, C]."""
        h = self.ln1(hidden)
        return self.k(h), self.v(h)

    def forward(self, x, mask, pk=None, pv=None, cache=None, pos=0):
        """x [B, T, C]; mask [T, Tk] additive or None; pk, pv [n, C] prefix keys/values;
        cache: (K, V) [B, H, Tmax, Dh] written at [pos, pos + T), attended up to pos + T."""
        B, T, C = x.shape
        H, Dh = self.H, C // self.H
        h = self.ln1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        if pk is not None:
            k = torch.cat([pk.expand(B, -1, -1), k], 1)
            v = torch.cat([pv.expand(B, -1, -1), v], 1)
        q = q.view(B, T, H, Dh).transpose(1, 2)
        k = k.view(B, -1, H, Dh).transpose(1, 2)
        v = v.view(B, -1, H, Dh).transpose(1, 2)
        if cache is not None:
            K, V = cache
            K[:, :, pos:pos + k.shape[2]] = k
            V[:, :, pos:pos + v.shape[2]] = v
            end = pos + k.shape[2]
            k, v = K[:, :, :end], V[:, :, :end]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(Dh))
        if mask is not None:
            att = att + mask
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + self.o(y)
        return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, d_model, layers, heads, d_ff, max_seq):
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(max_seq, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, d_ff) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)


class Method:
    """A PEFT method on a GPT: its trainable tensors and its forward."""

    # Settings of each method's own options this side implements (peftlab's names and defaults).
    OPTIONS = {"lora": {"r": 8, "lora_alpha": 16.0}}

    def __init__(self, model, name, n, options):
        self.model, self.name, self.n = model, name, n
        unknown = sorted(set(options) - set(self.OPTIONS.get(name, {})))
        if unknown:
            raise ValueError(f"torch_bench: {name}'s settings {unknown} are not implemented here")
        opts = dict(self.OPTIONS.get(name, {}), **options)
        C, L = model.wte.weight.shape[1], len(model.blocks)
        if name != "full":
            for p in model.parameters():
                p.requires_grad_(False)
        self.prompt = self.hidden = self.keys = self.values = None
        if name == "base":  # generation without an adapter
            self.params = []
        elif name == "full":
            self.params = list(model.parameters())
        elif name == "prompt":
            self.prompt = nn.Parameter(torch.randn(n, C) * 0.02)
            self.params = [self.prompt]
        elif name == "prefix":
            self.hidden = [nn.Parameter(torch.randn(n, C) * 0.02) for _ in range(L)]
            self.params = self.hidden
        elif name == "prefix-kv":
            self.keys = [nn.Parameter(torch.randn(n, C) * 0.02) for _ in range(L)]
            self.values = [nn.Parameter(torch.randn(n, C) * 0.02) for _ in range(L)]
            self.params = self.keys + self.values
        elif name == "lora":
            for b in model.blocks:
                b.q = LoRALinear(b.q, opts["r"], opts["lora_alpha"])
                b.v = LoRALinear(b.v, opts["r"], opts["lora_alpha"])
            self.params = [p for b in model.blocks for m in (b.q, b.v) for p in (m.A, m.B)]
        else:
            raise ValueError(f"torch_bench: unknown method '{name}'")

    def n_prefix(self):
        return self.n if self.name in ("prefix", "prefix-kv") else 0

    def layer_prefixes(self):
        """Per layer (keys, values) [n, C] or (None, None); hidden prefixes are projected here, once."""
        m = self.model
        if self.hidden is not None:
            return [b.prefix_kv(p) for b, p in zip(m.blocks, self.hidden)]
        if self.keys is not None:
            return list(zip(self.keys, self.values))
        return [(None, None)] * len(m.blocks)

    def forward(self, idx, caches=None, pos=0, prefixes=None):
        """idx [B, T] -> logits [B, T, V]. With caches, the tokens sit at positions pos..pos+T-1
        after the prefix entries already cached (prefixes: None on decoding steps)."""
        m = self.model
        B, T = idx.shape
        x = m.wte(idx) + m.wpe(torch.arange(pos, pos + T))
        n_prompt = self.prompt.shape[0] if self.prompt is not None else 0
        if n_prompt and pos == 0:
            x = torch.cat([self.prompt.expand(B, -1, -1), x], 1)
        if prefixes is None and caches is None:
            prefixes = self.layer_prefixes()
        n_pre, Tq = self.n_prefix(), x.shape[1]
        # Causal with the n_pre prefix keys first: query i sees keys j <= i + n_pre.
        # A single decoded token sees the whole cache: no mask.
        mask = torch.full((Tq, n_pre + Tq), float("-inf")).triu(n_pre + 1) if Tq > 1 else None
        cache_pos = 0 if pos == 0 else n_pre + n_prompt + pos
        for l, b in enumerate(m.blocks):
            pk, pv = prefixes[l] if prefixes is not None else (None, None)
            x = b(x, mask, pk, pv, caches[l] if caches is not None else None, cache_pos)
        if n_prompt and pos == 0:
            x = x[:, n_prompt:]
        return m.head(m.ln_f(x))


def make(spec):
    torch.manual_seed(spec.get("seed", 0))
    max_seq = max(spec["seq"], spec.get("prompt_len", 0) + spec.get("new_tokens", 0))
    model = GPT(spec["vocab"], spec["d_model"], spec["layers"], spec["heads"], spec["d_ff"], max_seq)
    method = Method(model, spec["method"], spec.get("n", 16), spec.get("options", {}))
    return model, method


class TrainSession:
    def __init__(self, spec):
        self.model, self.method = make(spec)
        B, T, V = spec["batch"], spec["seq"], spec["vocab"]
        g = torch.Generator().manual_seed(1)
        self.idx = torch.randint(0, V, (B, T), generator=g)
        self.targets = torch.randint(0, V, (B * T,), generator=g)
        self.opt = torch.optim.AdamW(self.method.params, lr=1e-3, weight_decay=0.01,
                                     foreach=spec.get("foreach", True))
        self.model.train()

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        logits = self.method.forward(self.idx)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), self.targets)
        if any(p.numel() for p in self.method.params):  # n = 0: nothing to train, forward and loss only
            loss.backward()
            self.opt.step()
        return loss.item()


class GenerateSession:
    """Greedy decoding of `batch` prompts of prompt_len tokens by new_tokens tokens."""

    def __init__(self, spec):
        self.model, self.method = make(spec)
        self.model.eval()
        B, P, V = spec["batch"], spec["prompt_len"], spec["vocab"]
        self.new_tokens = spec["new_tokens"]
        g = torch.Generator().manual_seed(2)
        self.prompts = torch.randint(0, V, (B, P), generator=g)

    @torch.inference_mode()
    def step(self):
        m, meth = self.model, self.method
        B, P = self.prompts.shape
        C, L, H = m.wte.weight.shape[1], len(m.blocks), m.blocks[0].H
        n_pre = meth.n_prefix() + (meth.prompt.shape[0] if meth.prompt is not None else 0)
        Tmax = n_pre + P + self.new_tokens
        caches = [(torch.empty(B, H, Tmax, C // H), torch.empty(B, H, Tmax, C // H)) for _ in range(L)]
        logits = meth.forward(self.prompts, caches, 0, meth.layer_prefixes())
        out = []
        for i in range(self.new_tokens):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
            if i + 1 < self.new_tokens:
                logits = meth.forward(tok, caches, P + i)
        return torch.cat(out, 1)


def status_kib(field):
    """A "VmRSS"/"VmHWM" line of /proc/self/status, in KiB (None where unreadable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def setup_with_growth(spec):
    """run_session(spec) and the worker's peak RSS growth during it, in bytes. Writing 5 to
    /proc/self/clear_refs resets VmHWM to the current RSS (Linux >= 4.0, proc(5)); where that
    fails the growth is measured against the older peak, a lower bound."""
    before = status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    session = run_session(spec)
    peak = status_kib("VmHWM")
    growth = max(0, peak - before) * 1024 if peak is not None and before is not None else 0
    return session, growth


def run_session(spec):
    session = (TrainSession if spec["kind"] == "train" else GenerateSession)(spec)
    for _ in range(spec.get("warmup", 1)):
        session.step()
    return session


def serve():
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "blas": blas_info()}), flush=True)
    sessions = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            sid = cmd.get("id", 0)
            if cmd["cmd"] == "setup":
                sessions.pop(sid, None)
                sessions[sid], growth = setup_with_growth(cmd)
                reply = {"ok": True, "peak_rss_growth_bytes": growth}
            elif cmd["cmd"] == "step":
                t0 = time.perf_counter()
                sessions[sid].step()
                reply = {"ms": (time.perf_counter() - t0) * 1e3}
            elif cmd["cmd"] == "end":
                sessions.pop(sid, None)
                reply = {"ok": True}
            else:
                reply = {"error": f"unknown command '{cmd['cmd']}'"}
        except Exception as e:  # the bench reports it and carries on without torch numbers
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", action="store_true", help="JSON-lines worker for experiments/bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--method", default="full")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seq", type=int, default=0, help="override the config's T")
    ap.add_argument("--generate", action="store_true", help="time generation instead of training")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-foreach", action="store_true", help="AdamW's per-tensor loop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve:
        serve()
        return
    spec = dict(CONFIGS[args.config], method=args.method, n=args.n, foreach=not args.no_foreach)
    if args.seq:
        spec["seq"] = args.seq
    if args.generate:
        spec.update(kind="generate", batch=8, prompt_len=64, new_tokens=64)
    else:
        spec["kind"] = "train"
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "blas": blas_info()}))
    session = run_session(spec)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        session.step()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    med = times[len(times) // 2]
    tokens = spec["batch"] * (spec["new_tokens"] if args.generate else spec["seq"])
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(f"{args.config} {args.method}: median {med:.1f} ms, {tokens / med * 1e3:.0f} tokens/s, "
          f"peak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
