#include "peft/attention_shift.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include <fmt/format.h>

#include "autograd/ops.h"
#include "autograd/tape.h"

namespace peftlab::peft {

namespace {

// One layer's attention as a forward saw it.
struct Observed {
    Tensor h, q, k, key_valid;  // h, q [B, Tq, C]; k [B, Tk, C]; key_valid [B, (Tq,) Tk] or undefined
};

// Records every layer's attention inputs, passing every hook on to the model's own.
class Recorder final : public ForwardingHooks {
public:
    Recorder(ModelHooks* inner, int n_layers) : ForwardingHooks(inner), layers(size_t(n_layers)) {}
    void observe_attention(int layer, const Tensor& h, const Tensor& q, const Tensor& k, const Tensor& key_valid,
                           int n_heads, const ForwardInfo& info) override {
        ForwardingHooks::observe_attention(layer, h, q, k, key_valid, n_heads, info);
        layers.at(size_t(layer)) = {h, q, k, key_valid};
    }
    std::vector<Observed> layers;
};

// Runs `model` on `in` with a Recorder around its hooks (restored afterwards).
std::vector<Observed> record(GPT& model, const ModelInput& in) {
    ModelHooks* own = model.hooks();
    Recorder rec(own, model.config().n_layers);
    model.set_hooks(&rec);
    try {
        model.forward(in);
    } catch (...) {
        model.set_hooks(own);
        throw;
    }
    model.set_hooks(own);
    for (size_t l = 0; l < rec.layers.size(); ++l)
        if (!rec.layers[l].q.defined())
            throw std::logic_error(fmt::format("attention_shift: layer {} reported no attention", l));
    return rec.layers;
}

// The distribution over the last T keys of query `i` (an index into the last
// T queries) of head `head` in row `b`: softmax over every key the query may
// see (causal rule of ops.h: key j <= query index + Tk - Tq; key_valid), then
// the first Tk - T columns dropped and the rest renormalised. Empty when the
// query sees no content key.
std::vector<double> content_distribution(const Tensor& q, const Tensor& k, const Tensor& key_valid, int64_t T,
                                         int n_heads, int64_t b, int64_t i, int head) {
    const int64_t Tq = q.dim(1), Tk = k.dim(1), C = q.dim(2), Dh = C / n_heads;
    const int64_t qi = Tq - T + i;        // the query's row in q
    const int64_t last = qi + (Tk - Tq);  // the last key it may see
    const float* qr = q.data() + (b * Tq + qi) * C + head * Dh;
    // key_valid [B, Tk], or [B, Tq, Tk] per query (an infix's keys).
    const float* valid = !key_valid.defined()     ? nullptr
                         : key_valid.ndim() == 3 ? key_valid.data() + (b * Tq + qi) * Tk
                                                 : key_valid.data() + b * Tk;
    std::vector<double> logit(size_t(last + 1), -INFINITY);
    double top = -INFINITY;
    for (int64_t j = 0; j <= last; ++j) {
        if (valid && valid[j] == 0.f) continue;
        const float* kr = k.data() + (b * Tk + j) * C + head * Dh;
        double s = 0;
        for (int64_t d = 0; d < Dh; ++d) s += double(qr[d]) * double(kr[d]);
        logit[size_t(j)] = s / std::sqrt(double(Dh));
        top = std::max(top, logit[size_t(j)]);
    }
    if (top == -INFINITY) return {};
    std::vector<double> p(size_t(last + 1), 0.0);
    double z = 0;
    for (int64_t j = 0; j <= last; ++j) z += p[size_t(j)] = std::isinf(logit[size_t(j)]) ? 0.0 : std::exp(logit[size_t(j)] - top);
    const int64_t first_content = Tk - T;
    std::vector<double> content(p.begin() + first_content, p.end());
    double mass = 0;
    for (double& v : content) mass += (v /= z);
    if (mass <= 0) return {};
    for (double& v : content) v /= mass;
    return content;
}

double total_variation(const std::vector<double>& a, const std::vector<double>& b) {
    double tv = 0;
    for (size_t j = 0; j < a.size(); ++j) tv += std::abs(a[j] - b[j]);
    return 0.5 * tv;
}

// rows [Tq - T, Tq) of x [B, Tq, C]: the content positions.
Tensor last_rows(const Tensor& x, int64_t T) { return x.dim(1) == T ? x : slice(x, 1, x.dim(1) - T, x.dim(1)); }

double mean_of(const std::vector<std::vector<double>>& m) {
    double s = 0;
    size_t n = 0;
    for (const auto& row : m)
        for (double v : row) s += v, ++n;
    return n ? s / double(n) : 0.0;
}

}  // namespace

double AttentionShift::max_local() const {
    double m = 0;
    for (const auto& row : local_max)
        for (double v : row) m = std::max(m, v);
    return m;
}
double AttentionShift::mean_local() const { return mean_of(local_mean); }
double AttentionShift::mean_end_to_end() const { return mean_of(end_to_end_mean); }

nlohmann::json AttentionShift::to_json() const {
    return {{"n_layers", n_layers},
            {"n_heads", n_heads},
            {"queries", queries},
            {"measure", "total variation between content-renormalised attention distributions"},
            {"local_mean", local_mean},
            {"local_max", local_max},
            {"end_to_end_mean", end_to_end_mean},
            {"end_to_end_max", end_to_end_max},
            {"max_local", max_local()},
            {"mean_local", mean_local()},
            {"mean_end_to_end", mean_end_to_end()}};
}

std::string AttentionShift::markdown() const {
    std::string md = "| layer |";
    for (int h = 0; h < n_heads; ++h) md += fmt::format(" head {} local / end-to-end |", h);
    md += "\n|---|";
    for (int h = 0; h < n_heads; ++h) md += "---|";
    md += '\n';
    for (int l = 0; l < n_layers; ++l) {
        md += fmt::format("| {} |", l);
        for (int h = 0; h < n_heads; ++h)
            md += fmt::format(" {:.2e} / {:.3f} |", local_mean[size_t(l)][size_t(h)], end_to_end_mean[size_t(l)][size_t(h)]);
        md += '\n';
    }
    return md;
}

AttentionShift attention_shift(GPT& base, GPT& adapted, const ModelInput& in) {
    const GPTConfig &cb = base.config(), &ca = adapted.config();
    if (cb.n_layers != ca.n_layers || cb.n_heads != ca.n_heads || cb.d_model != ca.d_model)
        throw std::invalid_argument(fmt::format(
            "attention_shift: base (L={}, H={}, d={}) and adapted model (L={}, H={}, d={}) differ", cb.n_layers,
            cb.n_heads, cb.d_model, ca.n_layers, ca.n_heads, ca.d_model));
    NoGradGuard no_grad;
    const bool base_training = base.training(), adapted_training = adapted.training();
    base.eval();
    adapted.eval();
    std::vector<Observed> ob = record(base, in), oa = record(adapted, in);
    if (base_training) base.train();
    if (adapted_training) adapted.train();

    const int L = cb.n_layers, H = cb.n_heads;
    const int64_t B = in.B, T = in.T;
    // The content keys' validity [B, T] (padding is never a key).
    Tensor content_valid = Tensor::ones({B, T});
    if (!in.valid.empty())
        for (int64_t i = 0; i < B * T; ++i) content_valid.data()[i] = in.valid[size_t(i)] ? 1.f : 0.f;

    AttentionShift out;
    out.n_layers = L;
    out.n_heads = H;
    auto grid = [&] { return std::vector<std::vector<double>>(size_t(L), std::vector<double>(size_t(H), 0.0)); };
    out.local_mean = out.local_max = out.end_to_end_mean = out.end_to_end_max = grid();
    for (int l = 0; l < L; ++l) {
        const Observed& a = oa[size_t(l)];
        const Observed& b0 = ob[size_t(l)];
        // The base's own projections of the adapted model's layer input, content rows only.
        const CausalSelfAttention& attn = base.blocks[size_t(l)]->attn;
        const Tensor h = last_rows(a.h, T);
        const Tensor q_local = attn.q_proj.forward(h, ForwardContext{}), k_local = attn.k_proj.forward(h, ForwardContext{});
        const Tensor q_base = last_rows(b0.q, T), k_base = last_rows(b0.k, T);
        int64_t n = 0;
        for (int64_t r = 0; r < B; ++r)
            for (int64_t i = 0; i < T; ++i) {
                if (!in.valid.empty() && !in.valid[size_t(r * T + i)]) continue;
                for (int hd = 0; hd < H; ++hd) {
                    const std::vector<double> pa = content_distribution(a.q, a.k, a.key_valid, T, H, r, i, hd);
                    const std::vector<double> pl = content_distribution(q_local, k_local, content_valid, T, H, r, i, hd);
                    const std::vector<double> pb = content_distribution(q_base, k_base, content_valid, T, H, r, i, hd);
                    if (pa.empty() || pl.empty() || pb.empty()) continue;
                    const double tl = total_variation(pl, pa), te = total_variation(pb, pa);
                    out.local_mean[size_t(l)][size_t(hd)] += tl;
                    out.end_to_end_mean[size_t(l)][size_t(hd)] += te;
                    out.local_max[size_t(l)][size_t(hd)] = std::max(out.local_max[size_t(l)][size_t(hd)], tl);
                    out.end_to_end_max[size_t(l)][size_t(hd)] = std::max(out.end_to_end_max[size_t(l)][size_t(hd)], te);
                    if (hd == 0) ++n;
                }
            }
        for (int hd = 0; hd < H; ++hd) {
            out.local_mean[size_t(l)][size_t(hd)] /= double(std::max<int64_t>(n, 1));
            out.end_to_end_mean[size_t(l)][size_t(hd)] /= double(std::max<int64_t>(n, 1));
        }
        out.queries = n;
    }
    return out;
}

}  // namespace peftlab::peft
