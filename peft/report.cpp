#include "peft/report.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <stdexcept>

#include <fmt/format.h>

#include "autograd/tape.h"
#include "nn/optim.h"
#include "peft/registry.h"

namespace peftlab::peft {

void ReportSettings::validate() const {
    if (batch < 1) throw std::invalid_argument(fmt::format("report: batch = {} must be >= 1", batch));
    if (seq < 2)
        throw std::invalid_argument(
            fmt::format("report: seq = {} must be >= 2 (a decoded token needs at least one cached token)", seq));
}

std::vector<std::string> reported_methods() { return method_names(); }

std::string group_of(const std::string& name) {
    auto starts = [&](const char* p) { return name.rfind(p, 0) == 0; };
    if (starts("wte.") || starts("wpe.") || name == "prompt_embeddings") return "embed";
    if (starts("ln_f.") || starts("head.")) return "head";
    // Training-time encoders that produce the inference tensors (a prefix MLP,
    // a prompt encoder): "<x>_mlp.*" or "<x>_encoder.*".
    const std::string head = name.substr(0, name.find('.'));
    if (head.size() < name.size() &&
        ((head.size() > 4 && head.compare(head.size() - 4, 4, "_mlp") == 0) ||
         (head.size() > 8 && head.compare(head.size() - 8, 8, "_encoder") == 0)))
        return "reparam";
    if (starts("blocks.")) {
        size_t dot = name.find('.', 7);
        std::string idx = name.substr(7, dot == std::string::npos ? std::string::npos : dot - 7);
        if (dot != std::string::npos && !idx.empty() && std::all_of(idx.begin(), idx.end(), ::isdigit))
            return "blocks." + idx;
    }
    throw std::invalid_argument(fmt::format("report: cannot place tensor '{}' in a group (embed: wte., wpe., "
                                            "prompt_embeddings; blocks.<l>.; head: ln_f., head.; reparam: "
                                            "<x>_mlp., <x>_encoder.)",
                                            name));
}

// ---- the analytic model ------------------------------------------------------------
//
// One training step is walked op by op as GPT::forward runs it, and every op
// adds what autograd/flops.h says it costs (peft/cost.h). Where GPT::forward
// calls a hook, the walk asks the adapter for its cost terms (Adapter::cost_*),
// so no method has a case here.
namespace {

using u64 = uint64_t;
using cost::Sym;

// The training step, walked as GPT::forward and the adapter run it.
struct StepWalk {
    const GPTConfig& cfg;
    const Adapter& a;
    int64_t B, T;
    cost::Tally t{};
    std::vector<bool> recompute{};  // [L]: the block's forward runs again in backward
    std::vector<bool> block_rg{};  // each block's output requires grad
    bool input_rg = false;         // block 0's input (embeddings and any prefix) requires grad

    // A base weight: frozen, or a parameter for a method that trains the base.
    Sym base_param() const { return a.changes_base() ? cost::kParam : cost::kFrozen; }

    Sym linear_at(int l, const std::string& module, int64_t R, int64_t in, int64_t out, Sym x) {
        const std::string path = fmt::format("blocks.{}.{}", l, module);
        x = a.cost_linear_input(path, t, cfg, R, in, x);
        const Sym w = base_param();
        Sym b = base_param();
        if (a.cost_bias_delta(path, cfg)) b = cost::add(t, out, b, cost::kParam);
        Sym y = cost::linear(t, R, in, out, x, w, &b);
        return a.cost_linear(path, t, cfg, R, in, out, x, y);
    }

    // The LayerNorm at `path` on R rows of C, with the gain and bias the adapter gives it.
    Sym layer_norm_at(const std::string& path, int64_t R, Sym x) {
        Sym gamma = base_param(), beta = base_param();
        a.cost_layer_norm(path, cfg, gamma, beta);
        return cost::layer_norm(t, R, cfg.d_model, x, gamma, beta);
    }

    Sym dropout(int64_t n, Sym x) { return cfg.dropout > 0.f ? cost::unary(t, n, 2, 1, x) : x; }

    // Block l on x [B, S, C].
    Sym block(int l, Sym x, int64_t S) {
        const int64_t C = cfg.d_model, F = cfg.d_ff, H = cfg.n_heads, R = B * S;
        Sym h = layer_norm_at(fmt::format("blocks.{}.ln1", l), R, x);
        Sym q = linear_at(l, "attn.q_proj", R, C, C, h);
        Sym k = linear_at(l, "attn.k_proj", R, C, C, h);
        Sym v = linear_at(l, "attn.v_proj", R, C, C, h);
        int64_t Tk = S;
        const cost::KeyValueCost p = a.cost_layer_prefix(l, t, cfg, cost::StepShape{B, T}, base_param());
        if (p.n > 0) {
            k = cost::derived(k.rg || p.k.rg);  // concat
            v = cost::derived(v.rg || p.v.rg);
            Tk += p.n;
        }
        Sym att = cost::attention(t, B, H, S, Tk, C / H, q, k, v);
        att = dropout(R * C, linear_at(l, "attn.o_proj", R, C, C, att));
        Sym x1 = cost::add(t, R * C, x, att);
        Sym h2 = layer_norm_at(fmt::format("blocks.{}.ln2", l), R, x1);
        Sym f = cost::unary(t, R * F, 8, 16, linear_at(l, "mlp.fc", R, C, F, h2));  // gelu
        Sym y = dropout(R * C, linear_at(l, "mlp.proj", R, F, C, f));
        return cost::add(t, R * C, x1, y);
    }

    flops::Counts run() {
        const int64_t C = cfg.d_model, V = cfg.vocab, N = B * T;
        a.cost_begin_forward(t, cfg, cost::StepShape{B, T});
        // Embeddings: token + position (a gather each), summed.
        const Sym emb = base_param();
        Sym x = cost::add(t, N * C, cost::embedding(t, N, C, emb), cost::embedding(t, N, C, emb));
        x = dropout(N * C, x);
        int64_t S = T;
        Sym p;
        if (const int64_t n = a.cost_input_prefix(t, cfg, cost::StepShape{B, T}, p); n > 0) {  // concatenated
            if (a.options().positions == "hf")  // + wpe rows 0..n-1 (a gather), expanded to every row
                p = cost::add(t, B * n * C, p, cost::expand(t, B * n * C, cost::embedding(t, n, C, emb)));
            x = cost::derived(x.rg || p.rg);
            S += n;
        }
        input_rg = x.rg;
        for (int l = 0; l < cfg.n_layers; ++l) {
            const uint64_t forward_before = t.c[size_t(flops::Phase::Forward)];
            x = block(l, x, S);
            block_rg.push_back(x.rg);
            // Recomputed only where the block's output needs a gradient (checkpoint records nothing otherwise).
            if (recompute[size_t(l)] && x.rg)
                t.c[size_t(flops::Phase::Recompute)] += t.c[size_t(flops::Phase::Forward)] - forward_before;
        }
        // The prompt positions are sliced off; final LN; LM head (tied: wte).
        x = layer_norm_at("ln_f", N, x);
        Sym logits = cost::linear(t, N, C, V, x, base_param(), nullptr);
        Sym loss = cost::cross_entropy(t, N, V, logits);
        if (!loss.rg) t.c[1] = t.c[2] = t.c[size_t(flops::Phase::Recompute)] = 0;  // no backward
        return t.c;
    }
};

// GPT's parameter count in closed form (no allocation): embeddings V*d + P*d (P = max_seq),
// per block 2 LayerNorms (4d), q,k,v,o (4d^2+4d), MLP (2*d*F + F + d); ln_f 2d;
// an untied head V*d.
int64_t base_param_count(const GPTConfig& c) {
    const int64_t d = c.d_model, F = c.d_ff, V = c.vocab;
    const int64_t block = 4 * d + 4 * d * d + 4 * d + 2 * d * F + F + d;
    return V * d + c.max_seq * d + c.n_layers * block + 2 * d + (c.tie_embeddings ? 0 : V * d);
}

StepWalk walk_step(const GPTConfig& cfg, const ReportSettings& s, const Adapter& a) {
    cfg.validate();
    s.validate();
    StepWalk walk{cfg, a, s.batch, s.seq};
    walk.recompute.assign(size_t(cfg.n_layers), false);
    std::vector<int> chosen;
    try {
        chosen = parse_layers(s.recompute, cfg.n_layers);
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(fmt::format("report: recompute: {}", e.what()));
    }
    for (int l : chosen) walk.recompute[size_t(l)] = true;
    walk.run();
    return walk;
}

}  // namespace

std::vector<LayerGroup> analytic_groups(const GPTConfig& cfg, const std::string& method, const AdapterOptions& o) {
    const std::unique_ptr<Adapter> a = make_adapter(method, o);
    std::vector<LayerGroup> g;
    g.push_back({"embed", 0, {}});
    for (int l = 0; l < cfg.n_layers; ++l) g.push_back({fmt::format("blocks.{}", l), 0, {}});
    g.push_back({"head", 0, {}});
    for (const cost::ParamGroup& p : a->cost_groups(cfg)) {
        auto it = std::find_if(g.begin(), g.end(), [&](const LayerGroup& e) { return e.group == p.group; });
        if (it == g.end()) g.push_back({p.group, p.params, {}});
        else it->trainable_params += p.params;
    }
    return g;
}

flops::Counts analytic_step_flops(const GPTConfig& cfg, const ReportSettings& s, const std::string& method,
                                  const AdapterOptions& o) {
    const std::unique_ptr<Adapter> a = make_adapter(method, o);
    flops::Counts c = walk_step(cfg, s, *a).t.c;
    // AdamW: 12 per element of every parameter that received a gradient (all
    // trainable ones the loss reaches).
    int64_t updated = 0;
    for (const cost::ParamGroup& g : a->cost_groups(cfg))
        if (g.updated) updated += g.params;
    if (c[1] + c[2] == 0) updated = 0;
    c[3] = 12 * u64(updated);
    return c;
}

uint64_t analytic_inference_flops(const GPTConfig& cfg, const ReportSettings& s, const std::string& method,
                                  const AdapterOptions& o) {
    cfg.validate();
    s.validate();
    const std::unique_ptr<Adapter> a = make_adapter(method, o);
    const int64_t C = cfg.d_model, F = cfg.d_ff, H = cfg.n_heads, V = cfg.vocab, T = s.seq;
    // One token, B = 1: wte + wpe add C; per block LN1 8C, q/k/v/o 4(2C^2 + C),
    // attention over Tk keys 4*Tk*C + 5*H*Tk, residual adds 2C, LN2 8C,
    // fc 2CF + F, gelu 8F, proj 2FC + C; final LN 8C, head 2CV; plus the
    // adapter's own terms as deployed (cached prefix keys, extra ops).
    u64 total = u64(C) + u64(8 * C + 2 * C * V) + u64(a->cost_decode_extra(cfg));
    for (int l = 0; l < cfg.n_layers; ++l) {
        const int64_t Tk = T + a->cost_decode_keys(l, cfg);
        total += u64(8 * C * C + 4 * C * F + 23 * C + 9 * F + 4 * Tk * C + 5 * H * Tk);
    }
    return total;
}

BackwardReach analytic_backward_reach(const GPTConfig& cfg, const std::string& method, const AdapterOptions& o) {
    const std::unique_ptr<Adapter> a = make_adapter(method, o);
    ReportSettings s;
    s.batch = 1;
    s.seq = 2;
    const StepWalk walk = walk_step(cfg, s, *a);
    BackwardReach out;
    // A block does backward work (dX or dW) when its output requires grad.
    for (int l = 0; l < cfg.n_layers; ++l)
        if (walk.block_rg[size_t(l)]) out.blocks.push_back(l);
    out.to_input = walk.input_rg;
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
    model.set_recompute(parse_layers(s.recompute, cfg.n_layers));
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
// then count the forward of token T. A mergeable adapter is merged first (and
// unmerged after), as deployed for one tenant.
uint64_t measure_decode(GPT& model, Adapter& adapter, const ReportSettings& s) {
    NoGradGuard no_grad;
    model.eval();
    if (adapter.mergeable()) adapter.merge();
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
    const uint64_t total = flops::totals()[0];
    if (adapter.mergeable()) adapter.unmerge();
    return total;
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
    const BackwardReach reach = analytic_backward_reach(cfg, method, opts);
    r.backward_blocks = reach.blocks;
    r.backward_to_input = reach.to_input;
    r.per_layer = analytic_groups(cfg, method, opts);
    const int64_t base_params = base_param_count(cfg);

    if (!measure) {
        r.trainable_params = 0;
        for (const LayerGroup& g : r.per_layer) r.trainable_params += g.trainable_params;
        r.total_params = base_params + (adapter->changes_base() ? 0 : r.trainable_params);
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
        r.total_params = model.num_params() + (adapter->changes_base() ? 0 : r.trainable_params);
        measure_step(model, *adapter, s, r);
        r.inference_flops_per_token_measured = measure_decode(model, *adapter, s);
    }
    r.trainable_pct = r.total_params ? 100.0 * double(r.trainable_params) / double(r.total_params) : 0.0;
    r.bytes.params = 4 * r.trainable_params;
    r.bytes.grads = 4 * r.trainable_params;
    r.bytes.allreduce = 4 * r.trainable_params;
    if (!measure) r.bytes.optimizer = 2 * 4 * r.trainable_params;
    return r;
}

double ring_allreduce_seconds(double bytes, int ranks, double bandwidth, double latency) {
    if (ranks <= 1) return 0.0;
    const double steps = 2.0 * (ranks - 1);
    return steps / ranks * bytes / bandwidth + steps * latency;
}

ScalePoint scale_point(const flops::Counts& step, double allreduce_bytes, int ranks, double flops_per_s,
                       double bandwidth, double latency) {
    if (ranks < 1 || !(flops_per_s > 0) || !(bandwidth > 0) || !(latency >= 0))
        throw std::invalid_argument(fmt::format(
            "scale_point: ranks = {}, flops_per_s = {}, bandwidth = {}, latency = {} (need >= 1, > 0, > 0, >= 0)",
            ranks, flops_per_s, bandwidth, latency));
    ScalePoint p;
    p.ranks = ranks;
    const double split = double(step[0]) + double(step[1]) + double(step[2]);
    p.compute_s = (split / ranks + double(step[3])) / flops_per_s;
    p.comm_s = ring_allreduce_seconds(allreduce_bytes, ranks, bandwidth, latency);
    return p;
}

ScaleLimit scale_limit(const flops::Counts& step, double allreduce_bytes, int max_ranks, double flops_per_s,
                       double bandwidth, double latency) {
    ScaleLimit lim;
    const double t1 = scale_point(step, allreduce_bytes, 1, flops_per_s, bandwidth, latency).step_s();
    double best = t1;
    for (int k = 2; k <= max_ranks; ++k) {
        const double t = scale_point(step, allreduce_bytes, k, flops_per_s, bandwidth, latency).step_s();
        if (t < best) best = t, lim.fastest_ranks = k;
        if (t1 / (k * t) >= 0.5) lim.half_efficiency_ranks = k;
    }
    return lim;
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
              {"allreduce_per_step", bytes.allreduce},
              {"activations_peak", opt(bytes.activations_peak)}}},
            {"flops", fl},
            {"inference_flops_per_token", inference_flops_per_token},
            {"inference_flops_per_token_measured", opt(inference_flops_per_token_measured)},
            {"backward_blocks", backward_blocks},
            {"backward_to_input", backward_to_input},
            {"per_layer", layers},
            {"flops_by_region", regions}};
}

}  // namespace peftlab::peft
