#include "nn/optim.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <stdexcept>

#include <fmt/format.h>

#include "autograd/flops.h"
#include "autograd/threads.h"

namespace peftlab {
namespace {

// Gradient-norm partial sums cover fixed chunks, so the summation order (and
// with it the result) does not depend on how many threads computed them.
constexpr int64_t kNormChunk = 65536;

// Largest step count a float holds exactly (state_dict stores steps as float).
constexpr double kMaxExactStep = 16777216.0;

}  // namespace

NamedTensors trainable_named_parameters(const Module& m) {
    NamedTensors out;
    for (auto& [name, t] : m.named_parameters())
        if (t.requires_grad()) out.emplace_back(name, t);
    return out;
}

// ---- Optimizer ------------------------------------------------------------------
Optimizer::Optimizer(NamedTensors params, double lr) : params_(std::move(params)), steps_(params_.size(), 0), lr_(lr) {
    std::set<std::string> names;
    std::set<const TensorImpl*> impls;
    for (auto& [name, t] : params_) {
        if (!t.defined()) throw std::invalid_argument(fmt::format("optimizer: parameter '{}' is undefined", name));
        if (!t.requires_grad())
            throw std::invalid_argument(fmt::format(
                "optimizer: parameter '{}' does not require grad (pass only trainable tensors)", name));
        if (!names.insert(name).second)
            throw std::invalid_argument(fmt::format("optimizer: parameter name '{}' appears twice", name));
        if (!impls.insert(t.impl()).second)
            throw std::invalid_argument(
                fmt::format("optimizer: parameter '{}' is the same tensor as an earlier one", name));
    }
    if (!(lr >= 0.0)) throw std::invalid_argument(fmt::format("optimizer: lr = {} must be >= 0", lr));
}

void Optimizer::allocate_slots() {
    const size_t n_slots = slot_names().size();
    slots_.assign(params_.size(), {});
    for (size_t i = 0; i < params_.size(); ++i)
        for (size_t k = 0; k < n_slots; ++k) slots_[i].push_back(Tensor::zeros(params_[i].second.shape()));
}

void Optimizer::step() {
    flops::Scope scope(flops::Phase::Optimizer);
    std::vector<float*> slot_ptrs;
    for (size_t i = 0; i < params_.size(); ++i) {
        Tensor& p = params_[i].second;
        if (!p.has_grad()) continue;
        slot_ptrs.clear();
        for (Tensor& s : slots_[i]) slot_ptrs.push_back(s.data());
        const int64_t n = p.numel();
        update(p.data(), p.impl()->gcell->grad->data, n, ++steps_[i], slot_ptrs.data());
        flops::add(flops_per_element() * uint64_t(n));
    }
}

void Optimizer::zero_grad() {
    for (auto& [name, t] : params_) t.zero_grad();
}

int64_t Optimizer::state_bytes() const {
    int64_t bytes = 0;
    for (const auto& per_param : slots_)
        for (const Tensor& s : per_param) bytes += s.numel() * int64_t(sizeof(float));
    return bytes;
}

NamedTensors Optimizer::state_dict() const {
    const std::vector<std::string> slot = slot_names();
    NamedTensors out;
    for (size_t i = 0; i < params_.size(); ++i) {
        for (size_t k = 0; k < slot.size(); ++k) out.emplace_back(params_[i].first + "." + slot[k], slots_[i][k]);
        out.emplace_back(params_[i].first + ".step", Tensor::full({}, float(steps_[i])));
    }
    return out;
}

void Optimizer::load_state_dict(const NamedTensors& state) {
    std::map<std::string, const Tensor*> given;
    for (auto& [name, t] : state)
        if (!given.emplace(name, &t).second)
            throw std::invalid_argument(fmt::format("optimizer state: key '{}' appears twice", name));

    const NamedTensors expected = state_dict();
    for (auto& [name, want] : expected) {
        auto it = given.find(name);
        if (it == given.end()) throw std::invalid_argument(fmt::format("optimizer state: missing key '{}'", name));
        if (it->second->shape() != want.shape())
            throw std::invalid_argument(fmt::format("optimizer state: key '{}' has shape {}, expected {}", name,
                                                    shape_str(it->second->shape()), shape_str(want.shape())));
    }
    if (given.size() != expected.size())
        for (auto& entry : given) {
            const std::string& name = entry.first;  // not a structured binding: clang 14 cannot capture one
            if (std::none_of(expected.begin(), expected.end(), [&](auto& e) { return e.first == name; }))
                throw std::invalid_argument(
                    fmt::format("optimizer state: unexpected key '{}' (not a state slot of any parameter)", name));
        }
    std::vector<int64_t> steps(params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
        const std::string key = params_[i].first + ".step";
        const float s = given.at(key)->item();
        if (!(s >= 0.f && double(s) <= kMaxExactStep && s == std::floor(s)))
            throw std::invalid_argument(
                fmt::format("optimizer state: key '{}' = {} is not a whole number in [0, 2^24]", key, s));
        steps[i] = int64_t(s);
    }
    const std::vector<std::string> slots = slot_names();
    for (size_t i = 0; i < params_.size(); ++i)
        for (size_t k = 0; k < slots.size(); ++k) {
            if (!slot_nonnegative(k)) continue;
            const std::string key = params_[i].first + "." + slots[k];
            const Tensor& t = *given.at(key);
            const float* v = t.data();
            const float* bad = std::find_if(v, v + t.numel(), [](float x) { return !(x >= 0.f); });
            if (bad != v + t.numel())
                throw std::invalid_argument(fmt::format("optimizer state: key '{}' holds {} at element {} (of {}); "
                                                        "this slot is never negative",
                                                        key, *bad, bad - v, t.numel()));
        }

    // Everything checked: from here on nothing throws.
    for (size_t i = 0; i < params_.size(); ++i)
        for (size_t k = 0; k < slots.size(); ++k) slots_[i][k].copy_from(*given.at(params_[i].first + "." + slots[k]));
    steps_ = std::move(steps);
}

// ---- SGD ------------------------------------------------------------------------
SGD::SGD(NamedTensors params, const SGDOptions& opts) : Optimizer(std::move(params), opts.lr), opts_(opts) {
    if (!(opts.momentum >= 0.0 && opts.momentum < 1.0))
        throw std::invalid_argument(fmt::format("SGD: momentum = {} must be in [0, 1)", opts.momentum));
    if (!(opts.weight_decay >= 0.0))
        throw std::invalid_argument(fmt::format("SGD: weight_decay = {} must be >= 0", opts.weight_decay));
    allocate_slots();
}

std::vector<std::string> SGD::slot_names() const {
    if (opts_.momentum == 0.0) return {};
    return {"momentum_buffer"};
}

void SGD::update(float* p, const float* g, int64_t n, int64_t t, float* const* slots) {
    const float neg_lr = float(-lr());
    const float wd = float(opts_.weight_decay);
    const float mom = float(opts_.momentum);
    float* buf = opts_.momentum != 0.0 ? slots[0] : nullptr;
    const bool first = t == 1;
    parallel_region(n > kParallelMin, [&] {
#pragma omp for simd schedule(static)
        for (int64_t j = 0; j < n; ++j) {
            float d = wd != 0.f ? g[j] + wd * p[j] : g[j];
            if (buf) {
                buf[j] = first ? d : buf[j] * mom + d;
                d = buf[j];
            }
            p[j] = p[j] + neg_lr * d;
        }
    });
}

// ---- AdamW ----------------------------------------------------------------------
AdamW::AdamW(NamedTensors params, const AdamWOptions& opts) : Optimizer(std::move(params), opts.lr), opts_(opts) {
    auto bad = [](const char* field, double v, const char* range) {
        throw std::invalid_argument(fmt::format("AdamW: {} = {} must be in {}", field, v, range));
    };
    if (!(opts.beta1 >= 0.0 && opts.beta1 < 1.0)) bad("beta1", opts.beta1, "[0, 1)");
    if (!(opts.beta2 >= 0.0 && opts.beta2 < 1.0)) bad("beta2", opts.beta2, "[0, 1)");
    if (!(opts.eps > 0.0)) bad("eps", opts.eps, "(0, inf)");
    if (!(opts.weight_decay >= 0.0)) bad("weight_decay", opts.weight_decay, "[0, inf)");
    allocate_slots();
}

void AdamW::update(float* p, const float* g, int64_t n, int64_t t, float* const* slots) {
    // Scalars as torch computes them (Python doubles), rounded to float where
    // they meet the tensors.
    const double lr = this->lr();
    const double bias1 = 1.0 - std::pow(opts_.beta1, double(t));
    const double bias2 = 1.0 - std::pow(opts_.beta2, double(t));
    const float decay = float(1.0 - lr * opts_.weight_decay);
    const float b1 = float(opts_.beta1), one_minus_b1 = float(1.0 - opts_.beta1);
    const float b2 = float(opts_.beta2), one_minus_b2 = float(1.0 - opts_.beta2);
    const float neg_step_size = float(-(lr / bias1));
    const float bias2_sqrt = float(std::sqrt(bias2));
    const float eps = float(opts_.eps);
    float* m = slots[0];
    float* v = slots[1];
    parallel_region(n > kParallelMin, [&] {
#pragma omp for simd schedule(static)
        for (int64_t j = 0; j < n; ++j) {
            const float pj = p[j] * decay;
            m[j] = m[j] * b1 + one_minus_b1 * g[j];
            v[j] = v[j] * b2 + one_minus_b2 * g[j] * g[j];
            const float denom = std::sqrt(v[j]) / bias2_sqrt + eps;
            p[j] = pj + neg_step_size * m[j] / denom;
        }
    });
}

// ---- clipping ---------------------------------------------------------------------
double grad_norm(const NamedTensors& params) {
    double total = 0.0;
    std::vector<double> partial;
    for (auto& [name, t] : params) {
        if (!t.has_grad()) continue;
        const float* g = t.impl()->gcell->grad->data;
        const int64_t n = t.numel();
        const int64_t chunks = (n + kNormChunk - 1) / kNormChunk;
        partial.assign(size_t(chunks), 0.0);
        parallel_for(chunks, n > kParallelMin, [&](int64_t c) {
            double s = 0.0;
            for (int64_t j = c * kNormChunk; j < std::min(n, (c + 1) * kNormChunk); ++j) s += double(g[j]) * g[j];
            partial[size_t(c)] = s;
        });
        for (double s : partial) total += s;
    }
    return std::sqrt(total);
}

double clip_grad_norm(const NamedTensors& params, double max_norm) {
    if (!(max_norm > 0.0))
        throw std::invalid_argument(fmt::format("clip_grad_norm: max_norm = {} must be > 0", max_norm));
    const double norm = grad_norm(params);
    if (!std::isfinite(norm) || norm <= max_norm) return norm;
    const float scale = float(max_norm / (norm + 1e-6));
    for (auto& [name, t] : params) {
        if (!t.has_grad()) continue;
        float* g = t.impl()->gcell->grad->data;
        const int64_t n = t.numel();
        parallel_region(n > kParallelMin, [&] {
#pragma omp for simd schedule(static)
            for (int64_t j = 0; j < n; ++j) g[j] *= scale;
        });
    }
    return norm;
}

// ---- schedule -----------------------------------------------------------------------
void LRSchedule::validate() const {
    auto bad = [](const char* field, auto v, const char* why) {
        throw std::invalid_argument(fmt::format("LRSchedule: {} = {} {}", field, v, why));
    };
    if (!(peak_lr >= 0.0)) bad("peak_lr", peak_lr, "must be >= 0");
    if (warmup_steps < 0) bad("warmup_steps", warmup_steps, "must be >= 0");
    if (total_steps < 1) bad("total_steps", total_steps, "must be >= 1");
    if (warmup_steps > total_steps) bad("warmup_steps", warmup_steps, "must be <= total_steps");
    if (!(min_ratio >= 0.0 && min_ratio <= 1.0)) bad("min_ratio", min_ratio, "must be in [0, 1]");
}

double LRSchedule::at(int64_t step) const {
    validate();
    if (step < 0) throw std::invalid_argument(fmt::format("LRSchedule::at: step {} is negative", step));
    if (step < warmup_steps) return peak_lr * double(step + 1) / double(warmup_steps);
    if (decay == Decay::Constant) return peak_lr;
    // Progress 0 at the first step after warmup, 1 at step total_steps (one past
    // the last), so no step is spent at a floor of 0.
    const int64_t span = total_steps - warmup_steps;
    const double progress = span == 0 ? 1.0 : std::min(1.0, double(step - warmup_steps) / double(span));
    const double shape = decay == Decay::Linear ? 1.0 - progress : 0.5 * (1.0 + std::cos(M_PI * progress));
    return peak_lr * (min_ratio + (1.0 - min_ratio) * shape);
}

}  // namespace peftlab
