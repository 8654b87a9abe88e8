#include "peft/report.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <stdexcept>

#include <fmt/format.h>

#include "autograd/tape.h"
#include "nn/optim.h"
#include "peft/lora.h"
#include "peft/registry.h"

namespace peftlab::peft {

void ReportSettings::validate() const {
    if (batch < 1) throw std::invalid_argument(fmt::format("report: batch = {} must be >= 1", batch));
    if (seq < 2)
        throw std::invalid_argument(
            fmt::format("report: seq = {} must be >= 2 (a decoded token needs at least one cached token)", seq));
}

namespace {
struct Preset {
    const char* name;
    int64_t d;
    int L, H;
};
constexpr Preset kPresets[] = {
    {"gpt2", 768, 12, 12}, {"gpt2-medium", 1024, 24, 16}, {"gpt2-large", 1280, 36, 20}, {"gpt2-xl", 1600, 48, 25}};
}  // namespace

std::vector<std::string> preset_names() {
    std::vector<std::string> out;
    for (const Preset& p : kPresets) out.push_back(p.name);
    return out;
}

GPTConfig preset_config(const std::string& name) {
    for (const Preset& p : kPresets)
        if (name == p.name) {
            GPTConfig c;
            c.vocab = 50257;
            c.max_seq = 1024;
            c.d_model = p.d;
            c.n_layers = p.L;
            c.n_heads = p.H;
            c.d_ff = 4 * p.d;
            c.tie_embeddings = true;  // as released: 124,439,808 parameters for gpt2
            return c;
        }
    std::string known;
    for (const std::string& n : preset_names()) known += (known.empty() ? "" : ", ") + n;
    throw std::invalid_argument(fmt::format("unknown preset '{}' (known: {})", name, known));
}

std::vector<std::string> reported_methods() { return {"full", "prompt", "prefix", "prefix-kv", "lora", "bitfit"}; }

std::string group_of(const std::string& name) {
    auto starts = [&](const char* p) { return name.rfind(p, 0) == 0; };
    if (starts("wte.") || starts("wpe.") || name == "prompt_embeddings") return "embed";
    if (starts("ln_f.") || starts("head.")) return "head";
    if (starts("prefix_mlp.")) return "reparam";
    if (starts("blocks.")) {
        size_t dot = name.find('.', 7);
        std::string idx = name.substr(7, dot == std::string::npos ? std::string::npos : dot - 7);
        if (dot != std::string::npos && !idx.empty() && std::all_of(idx.begin(), idx.end(), ::isdigit))
            return "blocks." + idx;
    }
    throw std::invalid_argument(fmt::format("report: cannot place tensor '{}' in a group (embed, blocks.<l>, "
                                            "head, reparam)",
                                            name));
}

// ---- the analytic model ------------------------------------------------------------
//
// One training step is walked op by op as GPT::forward runs it, and every op
// adds what autograd/flops.h says it costs: its forward, and in the backward
// one term per input whose gradient is computed. A gradient is computed only
// for an input that requires grad (a trainable parameter, or something
// computed from one); it counts as dW when that input is a trainable leaf and
// as dX otherwise. So a frozen weight costs no dW GEMM, and dX is paid in a
// layer exactly when something below it, or in it, is trainable.
namespace {

using u64 = uint64_t;

// What the model needs to know of a tensor: whether its gradient is computed
// (it requires grad) and whether it is a trainable leaf (that gradient is dW).
struct Sym {
    bool rg = false;
    bool leaf = false;
};
constexpr Sym kFrozen{false, false};
constexpr Sym kParam{true, true};
Sym derived(bool rg) { return {rg, false}; }  // an op's output

struct Tally {
    flops::Counts c{};
    void fwd(int64_t n) { c[0] += u64(n); }
    // Backward term for the gradient of `to`, if it is computed.
    void grad(Sym to, int64_t n) {
        if (to.rg) c[to.leaf ? 2 : 1] += u64(n);
    }
    void dx(int64_t n) { c[1] += u64(n); }
};

// ---- ops, costs as in flops.h ----
// linear x [R, in] @ W[out, in]^T (+ b[out]): 2*R*in*out (+ R*out); backward
// dX and dW GEMMs 2*R*in*out each, db R*out.
Sym op_linear(Tally& t, int64_t R, int64_t in, int64_t out, Sym x, Sym w, const Sym* bias) {
    const int64_t gemm = 2 * R * in * out;
    t.fwd(gemm + (bias ? R * out : 0));
    t.grad(x, gemm);
    t.grad(w, gemm);
    if (bias) t.grad(*bias, R * out);
    return derived(x.rg || w.rg || (bias && bias->rg));
}
// add with broadcasting: 1 per output element, backward 1 per output element per input.
Sym op_add(Tally& t, int64_t n_out, Sym a, Sym b) {
    t.fwd(n_out);
    t.grad(a, n_out);
    t.grad(b, n_out);
    return derived(a.rg || b.rg);
}
// element-wise map: mul_scalar (1, 1), tanh (1, 2), gelu (8, 16), dropout (2, 1).
Sym op_unary(Tally& t, int64_t n, int fwd_cost, int bwd_cost, Sym a) {
    t.fwd(fwd_cost * n);
    t.grad(a, bwd_cost * n);
    return derived(a.rg);
}
// layer_norm over rows of D: 8 per element; backward dx 12, dgamma 2, dbeta 2.
Sym op_layer_norm(Tally& t, int64_t R, int64_t D, Sym x, Sym gamma, Sym beta) {
    t.fwd(8 * R * D);
    t.grad(x, 12 * R * D);
    t.grad(gamma, 2 * R * D);
    t.grad(beta, 2 * R * D);
    return derived(x.rg || gamma.rg || beta.rg);
}
// Fused attention, per row and head: QK^T and PV 2*Tq*Tk*Dh each, softmax
// 5*Tq*Tk; backward dV, dQ, dK 2*Tq*Tk*Dh each as needed, and dP (2*Tq*Tk*Dh)
// plus softmax backward (4*Tq*Tk) once if dQ or dK is.
Sym op_attention(Tally& t, int64_t B, int64_t H, int64_t Tq, int64_t Tk, int64_t Dh, Sym q, Sym k, Sym v) {
    const int64_t gemm = 2 * B * H * Tq * Tk * Dh, soft = B * H * Tq * Tk;
    t.fwd(2 * gemm + 5 * soft);
    t.grad(v, gemm);
    if (q.rg || k.rg) t.dx(gemm + 4 * soft);
    t.grad(q, gemm);
    t.grad(k, gemm);
    return derived(q.rg || k.rg || v.rg);
}
// embedding: a gather (0); backward scatter-add 1 per gathered element.
Sym op_embedding(Tally& t, int64_t N, int64_t D, Sym w) {
    t.grad(w, N * D);
    return derived(w.rg);
}
// expand [1, n, C] -> [B, n, C] is add(zeros, reshape(a)); the reshape makes
// its input's gradient a dX term even for a parameter.
Sym op_expand(Tally& t, int64_t n_out, Sym a) { return op_add(t, n_out, kFrozen, derived(a.rg)); }
// cross_entropy: 6 per logit; backward 3 per logit.
Sym op_cross_entropy(Tally& t, int64_t N, int64_t V, Sym logits) {
    t.fwd(6 * N * V);
    t.grad(logits, 3 * N * V);
    return derived(logits.rg);
}
// concat, slice, reshape, index_rows: memory only.

// Where a method puts its trainable tensors.
struct MethodShape {
    bool full = false;
    int64_t prompt_n = 0;        // virtual tokens at the input
    bool prefix_hidden = false;  // "prefix": hidden states prepended to the layer input
    bool prefix_kv = false;      // "prefix-kv": keys and values prepended in attention
    int64_t prefix_n = 0;
    bool reparam = false;
    int64_t reparam_hidden = 0;
    std::set<std::string> lora_targets;  // "attn.q_proj", "mlp.fc", ...
    int64_t lora_rank = 0;
    bool bitfit = false;
    std::vector<bool> in_layer;  // block l holds trainable tensors (prefix, LoRA, BitFit)
    int64_t prefix_slots = 0;    // matrices the reparameterization MLP emits
    bool prefix_used() const { return (prefix_hidden || prefix_kv) && prefix_slots > 0 && prefix_n > 0; }
};

MethodShape shape_of(const GPTConfig& cfg, const std::string& method, const AdapterOptions& o) {
    MethodShape m;
    m.in_layer.assign(size_t(cfg.n_layers), false);
    std::vector<int> chosen = parse_layers(o.layers, cfg.n_layers);
    auto mark = [&](bool on) {
        if (on)
            for (int l : chosen) m.in_layer[size_t(l)] = true;
    };
    if (method == "full") {
        m.full = true;
        m.in_layer.assign(size_t(cfg.n_layers), true);
    } else if (method == "prompt") {
        m.prompt_n = o.n;
    } else if (method == "prefix" || method == "prefix-kv") {
        (method == "prefix" ? m.prefix_hidden : m.prefix_kv) = true;
        m.prefix_n = o.n;
        m.reparam = o.reparam;
        m.reparam_hidden = o.reparam_hidden;
        m.prefix_slots = int64_t(chosen.size()) * (m.prefix_kv ? 2 : 1);
        mark(o.n > 0);
    } else if (method == "lora") {
        for (const std::string& t : o.lora_targets) {
            if (t == "q_proj" || t == "k_proj" || t == "v_proj" || t == "o_proj") m.lora_targets.insert("attn." + t);
            else if (t == "fc" || t == "proj") m.lora_targets.insert("mlp." + t);
            else
                throw std::invalid_argument(fmt::format(
                    "lora adapter: target '{}' is not one of q_proj, k_proj, v_proj, o_proj, fc, proj", t));
        }
        m.lora_rank = o.lora_rank;
        mark(!m.lora_targets.empty());
    } else if (method == "bitfit") {
        m.bitfit = true;
        mark(true);
    } else {
        std::string known;
        for (const std::string& n : reported_methods()) known += (known.empty() ? "" : ", ") + n;
        throw std::invalid_argument(
            fmt::format("report: no analytic FLOP model for method '{}' (modelled: {}; add a case to "
                        "peft/report.cpp)",
                        method, known));
    }
    return m;
}

// The training step, walked as GPT::forward and the adapters run it.
struct StepWalk {
    const GPTConfig& cfg;
    const MethodShape& m;
    int64_t B, T;
    Tally t;

    Sym base_param() const { return m.full ? kParam : kFrozen; }

    // Linear::forward at `path` of block l: the base linear, then the hooks' delta.
    Sym linear_at(int l, const std::string& path, int64_t R, int64_t in, int64_t out, Sym x) {
        const Sym w = base_param(), b = base_param();
        Sym y = op_linear(t, R, in, out, x, w, &b);
        const bool here = m.in_layer[size_t(l)];
        if (here && m.lora_targets.count(path)) {
            // (alpha/r) * (x A^T) B^T, then added: A [r, in], B [out, r].
            Sym u = op_linear(t, R, in, m.lora_rank, x, kParam, nullptr);
            u = op_linear(t, R, m.lora_rank, out, u, kParam, nullptr);
            u = op_unary(t, R * out, 1, 1, u);
            y = op_add(t, R * out, y, u);
        }
        if (here && m.bitfit) y = op_add(t, R * out, y, kParam);  // bias delta [out], broadcast
        return y;
    }

    Sym dropout(int64_t n, Sym x) { return cfg.dropout > 0.f ? op_unary(t, n, 2, 1, x) : x; }

    // Block l on x [B, S, C].
    Sym block(int l, Sym x, int64_t S) {
        const int64_t C = cfg.d_model, F = cfg.d_ff, H = cfg.n_heads, R = B * S, n = m.prefix_n;
        const Sym ln = base_param();
        Sym h = op_layer_norm(t, R, C, x, ln, ln);
        Sym q = linear_at(l, "attn.q_proj", R, C, C, h);
        Sym k = linear_at(l, "attn.k_proj", R, C, C, h);
        Sym v = linear_at(l, "attn.v_proj", R, C, C, h);
        int64_t Tk = S;
        if (m.in_layer[size_t(l)] && (m.prefix_hidden || m.prefix_kv)) {
            // The prefix matrix [n, C]: a parameter, or a slice of the MLP output.
            const Sym p = m.reparam ? derived(true) : kParam;
            Sym pk = p, pv = p;
            if (m.prefix_hidden) {
                // LN1 and the K/V projections of the n vectors, once per batch.
                Sym hp = op_layer_norm(t, n, C, p, ln, ln);
                const Sym w = base_param();
                pk = op_linear(t, n, C, C, hp, w, &w);
                pv = op_linear(t, n, C, C, hp, w, &w);
            }
            pk = op_expand(t, B * n * C, pk);
            pv = op_expand(t, B * n * C, pv);
            k = derived(k.rg || pk.rg);  // concat
            v = derived(v.rg || pv.rg);
            Tk += n;
        }
        Sym a = op_attention(t, B, H, S, Tk, C / H, q, k, v);
        a = dropout(R * C, linear_at(l, "attn.o_proj", R, C, C, a));
        Sym x1 = op_add(t, R * C, x, a);
        Sym h2 = op_layer_norm(t, R, C, x1, ln, ln);
        Sym f = op_unary(t, R * F, 8, 16, linear_at(l, "mlp.fc", R, C, F, h2));  // gelu
        Sym y = dropout(R * C, linear_at(l, "mlp.proj", R, F, C, f));
        return op_add(t, R * C, x1, y);
    }

    flops::Counts run() {
        const int64_t C = cfg.d_model, V = cfg.vocab, N = B * T;
        // Reparameterization MLP, once per forward: P = fc2(tanh(fc1(P'))),
        // P' [n, C] -> [n, S*C]. Its backward runs only if a prefix uses it.
        Tally mlp;
        if (m.reparam) {
            const int64_t n = m.prefix_n, h = m.reparam_hidden;
            Sym u = op_linear(mlp, n, C, h, kParam, kParam, &kParam);
            u = op_unary(mlp, n * h, 1, 2, u);  // tanh
            op_linear(mlp, n, h, m.prefix_slots * C, u, kParam, &kParam);
            t.c[0] += mlp.c[0];
            if (m.prefix_used()) {
                t.c[1] += mlp.c[1];
                t.c[2] += mlp.c[2];
            }
        }
        // Embeddings: token + position (a gather each), summed.
        const Sym emb = base_param();
        Sym x = op_add(t, N * C, op_embedding(t, N, C, emb), op_embedding(t, N, C, emb));
        x = dropout(N * C, x);
        int64_t S = T;
        if (m.prompt_n > 0) {  // prompt [n, C] expanded to every row, concatenated
            Sym p = op_expand(t, B * m.prompt_n * C, kParam);
            x = derived(x.rg || p.rg);
            S += m.prompt_n;
        }
        for (int l = 0; l < cfg.n_layers; ++l) x = block(l, x, S);
        // The prompt positions are sliced off; final LN; LM head (tied: wte).
        const Sym ln = base_param();
        x = op_layer_norm(t, N, C, x, ln, ln);
        Sym logits = op_linear(t, N, C, V, x, base_param(), nullptr);
        Sym loss = op_cross_entropy(t, N, V, logits);
        if (!loss.rg) t.c[1] = t.c[2] = 0;  // nothing trainable reached the loss: no backward
        return t.c;
    }
};

int64_t reparam_params(const GPTConfig& cfg, const MethodShape& m) {
    const int64_t n = m.prefix_n, d = cfg.d_model, h = m.reparam_hidden, S = m.prefix_slots;
    return n * d + h * d + h + S * d * h + S * d;
}

}  // namespace

std::vector<LayerGroup> analytic_groups(const GPTConfig& cfg, const std::string& method, const AdapterOptions& o) {
    const MethodShape m = shape_of(cfg, method, o);
    const int64_t d = cfg.d_model, F = cfg.d_ff, V = cfg.vocab;
    std::vector<LayerGroup> g;
    g.push_back({"embed", m.full ? V * d + cfg.max_seq * d : m.prompt_n * d, {}});
    for (int l = 0; l < cfg.n_layers; ++l) {
        int64_t p = 0;
        if (m.full) p = 4 * d * d + 2 * d * F + F + 9 * d;
        else if (m.in_layer[size_t(l)] && !m.reparam && (m.prefix_hidden || m.prefix_kv))
            p = (m.prefix_kv ? 2 : 1) * m.prefix_n * d;
        else if (m.in_layer[size_t(l)] && m.bitfit) p = 5 * d + F;
        else if (m.in_layer[size_t(l)])
            for (const std::string& t : m.lora_targets) p += m.lora_rank * (d + (t.rfind("mlp.", 0) == 0 ? F : d));
        g.push_back({fmt::format("blocks.{}", l), p, {}});
    }
    g.push_back({"head", m.full ? 2 * d + (cfg.tie_embeddings ? 0 : V * d) : 0, {}});
    if (m.reparam) g.push_back({"reparam", reparam_params(cfg, m), {}});
    return g;
}

flops::Counts analytic_step_flops(const GPTConfig& cfg, const ReportSettings& s, const std::string& method,
                                  const AdapterOptions& o) {
    cfg.validate();
    s.validate();
    const MethodShape m = shape_of(cfg, method, o);
    StepWalk walk{cfg, m, s.batch, s.seq, {}};
    flops::Counts c = walk.run();
    // AdamW: 12 per element of every parameter that received a gradient (all
    // trainable ones, except a reparameterization MLP no prefix reads).
    int64_t updated = 0;
    for (const LayerGroup& g : analytic_groups(cfg, method, o))
        if (g.group != "reparam" || m.prefix_used()) updated += g.trainable_params;
    if (c[1] + c[2] == 0) updated = 0;
    c[3] = 12 * u64(updated);
    return c;
}

uint64_t analytic_inference_flops(const GPTConfig& cfg, const ReportSettings& s, const std::string& method,
                                  const AdapterOptions& o) {
    cfg.validate();
    s.validate();
    const MethodShape m = shape_of(cfg, method, o);
    const int64_t C = cfg.d_model, F = cfg.d_ff, H = cfg.n_heads, V = cfg.vocab, T = s.seq;
    // One token, B = 1: wte + wpe add C; per block LN1 8C, q/k/v/o 4(2C^2 + C),
    // attention over Tk keys 4*Tk*C + 5*H*Tk, residual adds 2C, LN2 8C,
    // fc 2CF + F, gelu 8F, proj 2FC + C; final LN 8C, head 2CV.
    u64 total = u64(C) + u64(8 * C + 2 * C * V);
    for (int l = 0; l < cfg.n_layers; ++l) {
        int64_t Tk = T + m.prompt_n;
        if (m.in_layer[size_t(l)] && (m.prefix_hidden || m.prefix_kv)) Tk += m.prefix_n;
        total += u64(8 * C * C + 4 * C * F + 23 * C + 9 * F + 4 * Tk * C + 5 * H * Tk);
        if (m.in_layer[size_t(l)] && m.bitfit) total += u64(5 * C + F);  // bias deltas added to 6 outputs
    }
    return total;
}

std::vector<int> analytic_backward_blocks(const GPTConfig& cfg, const std::string& method, const AdapterOptions& o) {
    const MethodShape m = shape_of(cfg, method, o);
    std::vector<int> out;
    bool flowing = m.full || m.prompt_n > 0;  // dX reaches the block input
    for (int l = 0; l < cfg.n_layers; ++l) {
        flowing = flowing || m.in_layer[size_t(l)];
        if (flowing) out.push_back(l);
    }
    return out;
}

// ---- measurement ----------------------------------------------------------------------
namespace {

// Random tokens and next-token targets for B rows of T, from the seed.
ModelInput random_batch(const GPTConfig& cfg, int64_t B, int64_t T, Rng& rng, std::vector<int32_t>& targets) {
    ModelInput in;
    in.B = B;
    in.T = T;
    for (int64_t i = 0; i < B * T; ++i) in.tokens.push_back(int32_t(rng.below(uint32_t(cfg.vocab))));
    targets.clear();
    for (int64_t i = 0; i < B * T; ++i) targets.push_back(int32_t(rng.below(uint32_t(cfg.vocab))));
    return in;
}

// Index of group g in the map, appended if the analytic layout lacks it.
size_t group_index(std::vector<LayerGroup>& groups, const std::string& g) {
    for (size_t i = 0; i < groups.size(); ++i)
        if (groups[i].group == g) return i;
    groups.push_back({g, 0, {}});
    return groups.size() - 1;
}

// One real training step (forward, loss, backward, AdamW update) with the
// counters reset just before it.
//
// Memory: a warm-up forward + backward first gives every parameter that the
// loss reaches its gradient buffer (then zeroed in place, so the measured step
// sees fresh gradients). The bytes alive when the measured step starts are
// then the base weights, the adapter's tensors, their gradients and AdamW's
// moments, and activations_peak = mem::peak_bytes() during the step minus
// those bytes: the tensors saved for backward (attention probabilities,
// layer-norm statistics, inputs of linears whose dW or dX is needed), logits
// and their softmax, non-leaf gradients in flight and op temporaries, at
// their highest point together.
void measure_step(GPT& model, Adapter& adapter, const ReportSettings& s, MethodReport& r) {
    const GPTConfig& cfg = model.config();
    const NamedTensors& params = adapter.parameters();
    AdamW opt(params);
    Rng rng(s.seed ^ 0x5EEDBA7Cull);
    std::vector<int32_t> targets;
    ModelInput in = random_batch(cfg, s.batch, s.seq, rng, targets);
    model.train();
    auto forward_backward = [&] {
        Tensor loss = model.loss(in, targets);
        if (loss.requires_grad()) backward(loss);
    };
    forward_backward();
    for (const auto& [name, t] : params)
        if (t.has_grad()) std::fill_n(t.impl()->gcell->grad->data, t.numel(), 0.f);

    const int64_t before = mem::current_bytes();
    mem::reset_peak();
    flops::reset();
    forward_backward();
    opt.step();
    r.measured = flops::totals();
    r.measured_by_region = flops::by_region();
    r.bytes.activations_peak = mem::peak_bytes() - before;
    r.bytes.optimizer = opt.state_bytes();

    // Gradient L2 norm per group, summed in double in parameter order.
    std::vector<double> sq(r.per_layer.size(), 0.0);
    for (const auto& [name, t] : params) {
        const size_t i = group_index(r.per_layer, group_of(name));
        sq.resize(r.per_layer.size(), 0.0);
        if (!t.has_grad()) continue;
        const float* gd = t.impl()->gcell->grad->data;
        for (int64_t j = 0; j < t.numel(); ++j) sq[i] += double(gd[j]) * double(gd[j]);
    }
    for (size_t i = 0; i < sq.size(); ++i) r.per_layer[i].grad_norm = std::sqrt(sq[i]);
    opt.zero_grad();
}

// One cached decoding step: prefill T - 1 tokens (prefixes enter the cache),
// then count the forward of token T. LoRA is merged first.
uint64_t measure_decode(GPT& model, Adapter& adapter, const ReportSettings& s) {
    NoGradGuard no_grad;
    model.eval();
    if (auto* lora = dynamic_cast<LoRA*>(&adapter)) lora->merge();
    Rng rng(s.seed ^ 0xDEC0DEull);
    ModelInput prefill;
    prefill.B = 1;
    prefill.T = s.seq - 1;
    for (int64_t i = 0; i < prefill.T; ++i) prefill.tokens.push_back(int32_t(rng.below(uint32_t(model.config().vocab))));
    KVCache cache;
    model.forward(prefill, &cache);
    ModelInput next;
    next.B = 1;
    next.T = 1;
    next.tokens = {int32_t(rng.below(uint32_t(model.config().vocab)))};
    next.positions = {int32_t(s.seq - 1)};
    flops::reset();
    model.forward(next, &cache);
    return flops::totals()[0];
}

}  // namespace

MethodReport report_method(const GPTConfig& cfg, const ReportSettings& s, const std::string& method,
                           const AdapterOptions& opts, bool measure) {
    cfg.validate();
    s.validate();
    if (s.seq > cfg.max_seq)
        throw std::invalid_argument(
            fmt::format("report: seq = {} exceeds the model's max_seq = {}", s.seq, cfg.max_seq));
    MethodReport r;
    r.method = method;
    std::unique_ptr<Adapter> adapter = make_adapter(method, opts);
    const ParamFormula f = adapter->formula(cfg);
    r.formula_params = f.count;
    r.formula = f.text;
    r.analytic = analytic_step_flops(cfg, s, method, opts);
    r.inference_flops_per_token = analytic_inference_flops(cfg, s, method, opts);
    r.backward_blocks = analytic_backward_blocks(cfg, method, opts);
    r.per_layer = analytic_groups(cfg, method, opts);
    const int64_t base_params = make_adapter("full", {})->formula(cfg).count;

    if (!measure) {
        r.trainable_params = 0;
        for (const LayerGroup& g : r.per_layer) r.trainable_params += g.trainable_params;
        r.total_params = base_params + (method == "full" ? 0 : r.trainable_params);
    } else {
        GPT model(cfg, s.seed);
        AdapterOptions o = opts;
        o.seed = s.seed;
        adapter = make_adapter(method, o);
        adapter->activate(model);
        // The map as the adapter names its tensors.
        for (LayerGroup& g : r.per_layer) g.trainable_params = 0;
        r.trainable_params = 0;
        for (const auto& [name, t] : adapter->parameters()) {
            r.per_layer[group_index(r.per_layer, group_of(name))].trainable_params += t.numel();
            r.trainable_params += t.numel();
        }
        r.total_params = model.num_params() + (method == "full" ? 0 : r.trainable_params);
        measure_step(model, *adapter, s, r);
        r.inference_flops_per_token_measured = measure_decode(model, *adapter, s);
    }
    r.trainable_pct = r.total_params ? 100.0 * double(r.trainable_params) / double(r.total_params) : 0.0;
    r.bytes.params = 4 * r.trainable_params;
    r.bytes.grads = 4 * r.trainable_params;
    if (!measure) r.bytes.optimizer = 2 * 4 * r.trainable_params;
    return r;
}

double MethodReport::max_relative_gap() const {
    if (!measured) return 0.0;
    double worst = 0.0;
    auto gap = [&](u64 a, u64 m) {
        worst = std::max(worst, std::fabs(double(a) - double(m)) / std::max(double(a), 1.0));
    };
    for (int p = 0; p < flops::kPhases; ++p) gap(analytic[size_t(p)], (*measured)[size_t(p)]);
    if (inference_flops_per_token_measured) gap(inference_flops_per_token, *inference_flops_per_token_measured);
    return worst;
}

nlohmann::json MethodReport::to_json() const {
    using nlohmann::json;
    auto opt = [](const auto& o) { return o ? json(*o) : json(nullptr); };
    json fl = json::object();
    for (int p = 0; p < flops::kPhases; ++p)
        fl[flops::phase_name(flops::Phase(p))] = {
            {"analytic", analytic[size_t(p)]},
            {"measured", measured ? json((*measured)[size_t(p)]) : json(nullptr)}};
    json regions = json::object();
    for (const auto& [name, c] : measured_by_region) {
        json rc = json::object();
        for (int p = 0; p < flops::kPhases; ++p) rc[flops::phase_name(flops::Phase(p))] = c[size_t(p)];
        regions[name.empty() ? "(top)" : name] = rc;
    }
    json layers = json::array();
    for (const LayerGroup& g : per_layer)
        layers.push_back({{"group", g.group}, {"trainable_params", g.trainable_params}, {"grad_norm", opt(g.grad_norm)}});
    return {{"method", method},
            {"trainable_params", trainable_params},
            {"formula_params", formula_params},
            {"formula", formula},
            {"total_params", total_params},
            {"trainable_pct", trainable_pct},
            {"bytes",
             {{"params", bytes.params},
              {"grads", bytes.grads},
              {"optimizer", bytes.optimizer},
              {"activations_peak", opt(bytes.activations_peak)}}},
            {"flops", fl},
            {"inference_flops_per_token", inference_flops_per_token},
            {"inference_flops_per_token_measured", opt(inference_flops_per_token_measured)},
            {"backward_blocks", backward_blocks},
            {"per_layer", layers},
            {"flops_by_region", regions}};
}

}  // namespace peftlab::peft
