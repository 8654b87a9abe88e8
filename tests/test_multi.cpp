// MultiAdapter: batches whose rows use different adapters (or none) on one
// frozen base. Every row's logits equal that row run alone with its adapter,
// every adapter's gradient equals the sum of its rows' gradients run alone,
// padding on either side changes nothing at real positions, prefix K/V
// projections run once per adapter (not per row), and misuse is refused.
#include <cmath>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include "autograd/flops.h"
#include "peft/multi.h"
#include "peft/registry.h"
#include "tests/peft_testing.h"

using namespace peftlab;
using namespace peftlab::peft;
using namespace peftlab::peft_testing;
using Catch::Contains;

namespace {

constexpr int64_t kVocab = 48;

// Adapters on one sharpened base, each moved away from its init so that it
// visibly changes its rows (LoRA's B and BitFit's deltas start at zero).
struct Tenants {
    GPT base{tiny_config(), 20};
    std::vector<std::unique_ptr<Adapter>> owned;

    Tenants() { sharpen(base); }
    Adapter* add(const std::string& method, int64_t n, const std::string& layers, bool reparam = false) {
        AdapterOptions o;
        o.n = n;
        o.layers = layers;
        for (const char* prefix_form : {"prefix", "prefix-kv"})
            o.section(prefix_form) = {{"reparam", reparam}, {"reparam_hidden", 16}};
        o.init = "random";
        o.seed = owned.size() + 1;
        return add(method, o);
    }
    Adapter* add_lora(int64_t rank, std::vector<std::string> targets, const std::string& layers) {
        AdapterOptions o;
        o.section("lora") = {{"r", rank}, {"target_modules", targets}};
        o.layers = layers;
        o.seed = owned.size() + 1;
        return add("lora", o);
    }
    Adapter* add(const std::string& method, const AdapterOptions& o) {
        owned.push_back(make_adapter(method, o));
        owned.back()->attach(base);
        perturb(owned.back()->parameters(), 100 + owned.size(), 0.2f);
        return owned.back().get();
    }
};

// Largest |logit difference| and largest gradient difference relative to
// max(1, largest |gradient|) of its tensor.
struct Diffs {
    float logits = 0.f, grads = 0.f;
};

// Runs one forward and backward of a padded batch through a MultiAdapter
// (row b uses adapters[rows[b]] or, for -1, none), then each row alone with
// its adapter activated singly (no hooks for -1), and checks that logits agree
// at real positions and that each adapter's gradient from the batch equals the
// sum of its rows' gradients. The loss is the sum over rows of each row's mean
// cross-entropy, so that sum is exact. Returns the largest differences seen.
Diffs check_mixed_batch(GPT& base, const std::vector<Adapter*>& adapters, const std::vector<int32_t>& rows,
                        bool left_padded, uint64_t seed) {
    const int64_t B = int64_t(rows.size());
    Rng rng(seed);
    std::vector<std::vector<int32_t>> tokens, targets;
    for (int64_t b = 0; b < B; ++b) {
        const int64_t len = 2 + (b * 3) % 5;  // 2..6: every row shorter than the batch is padded
        tokens.push_back(random_tokens(rng, len, kVocab));
        targets.push_back(random_tokens(rng, len, kVocab));
    }
    ModelInput in = padded_batch(tokens, left_padded, /*extra=*/1);
    // Each row's source: its first 1 + b % len tokens (only an infix reads it).
    auto source_of = [&](int64_t b) { return int32_t(1 + b % int64_t(tokens[size_t(b)].size())); };
    for (int64_t b = 0; b < B; ++b) in.source_len.push_back(int32_t(first_real(in, b)) + source_of(b));
    std::vector<int32_t> batch_targets(size_t(B * in.T), -1);
    for (int64_t b = 0; b < B; ++b) {
        const int64_t start = first_real(in, b);
        for (size_t i = 0; i < targets[size_t(b)].size(); ++i)
            batch_targets[size_t(b * in.T + start) + i] = targets[size_t(b)][i];
    }
    for (Adapter* a : adapters) zero_grads(a->parameters());

    MultiAdapter multi(adapters);
    multi.set_rows(rows);
    base.set_hooks(&multi);
    const Tensor mixed = base.forward(in);
    backward(sum_of_row_losses(mixed, batch_targets));
    base.set_hooks(nullptr);
    std::vector<NamedTensors> mixed_grads;
    for (Adapter* a : adapters) {
        NamedTensors g;
        for (const auto& [name, t] : a->parameters()) g.emplace_back(name, t.grad().clone());
        mixed_grads.push_back(g);
        zero_grads(a->parameters());
    }

    Diffs worst;
    for (int32_t a = -1; a < int32_t(adapters.size()); ++a) {
        bool used = false;
        for (int64_t b = 0; b < B; ++b) {
            if (rows[size_t(b)] != a) continue;
            used = true;
            INFO("row " << b << " (adapter " << a << ", " << (left_padded ? "left" : "right") << "-padded)");
            ModelInput alone_in = single_row(tokens[size_t(b)]);
            alone_in.source_len = {source_of(b)};
            const int64_t len = alone_in.T, start = first_real(in, b);
            Tensor alone;
            if (a < 0) {
                NoGradGuard no_grad;
                alone = base.forward(alone_in);
            } else {
                adapters[size_t(a)]->activate(base);
                alone = base.forward(alone_in);
                backward(cross_entropy(alone, targets[size_t(b)], -1));  // adds up over this adapter's rows
                base.set_hooks(nullptr);
            }
            const float d = max_diff_rows(mixed, b, start, alone, 0, 0, len);
            worst.logits = std::max(worst.logits, d);
            CHECK(d < 1e-5f);
            if (a >= 0) {  // the adapter does change its row, so the agreement means something
                NoGradGuard no_grad;
                CHECK(max_diff_rows(mixed, b, start, base.forward(alone_in), 0, 0, len) > 1e-3f);
            }
        }
        if (a < 0) continue;
        const NamedTensors& params = adapters[size_t(a)]->parameters();
        for (size_t i = 0; i < params.size(); ++i) {
            INFO("adapter " << a << " (" << adapters[size_t(a)]->method() << "): " << params[i].first);
            const Tensor reference = params[i].second.grad();  // zeros if no row used it
            const Tensor& got = mixed_grads[size_t(a)][i].second;
            const float d = max_diff(got, reference) / std::max(1.f, max_abs(reference));
            worst.grads = std::max(worst.grads, d);
            CHECK(d <= 2e-5f);
            // A bias on every key shifts all of a query's scores equally, which
            // softmax ignores: BitFit's k_proj delta has no gradient to speak of.
            const bool key_bias = params[i].first.find("k_proj.bias_delta") != std::string::npos;
            if (used && !key_bias) CHECK(max_abs(reference) > 1e-6f);
            if (!used) CHECK(max_abs(got) == 0.f);
        }
        zero_grads(params);
    }
    return worst;
}

void check_both_paddings(GPT& base, const std::vector<Adapter*>& adapters, const std::vector<int32_t>& rows,
                         const std::string& what) {
    Diffs left = check_mixed_batch(base, adapters, rows, true, 7);
    Diffs right = check_mixed_batch(base, adapters, rows, false, 8);
    WARN(fmt::format("{}: max |logit diff| {:.3g} (left-padded), {:.3g} (right-padded); max relative |grad diff| {:.3g}, {:.3g}",
                     what, left.logits, right.logits, left.grads, right.grads));
}

// Forward FLOPs of one batch of B rows of 5 tokens, rows[b] = pattern[b % size].
uint64_t forward_flops(GPT& base, ModelHooks* hooks, MultiAdapter* multi, const std::vector<int32_t>& pattern,
                       int64_t B) {
    ModelInput in;
    in.B = B;
    in.T = 5;
    for (int64_t i = 0; i < B * 5; ++i) in.tokens.push_back(int32_t((7 * i + 3) % kVocab));
    if (multi) {
        std::vector<int32_t> rows;
        for (int64_t b = 0; b < B; ++b) rows.push_back(pattern[size_t(b) % pattern.size()]);
        multi->set_rows(rows);
    }
    NoGradGuard no_grad;
    base.set_hooks(hooks);
    flops::reset();
    base.forward(in);
    const uint64_t total = flops::totals()[int(flops::Phase::Forward)];
    base.set_hooks(nullptr);
    return total;
}

}  // namespace

TEST_CASE("multi: prompt-tuned rows with different n equal their solo runs, gradients add up", "[multi]") {
    Tenants t;
    std::vector<Adapter*> a = {t.add("prompt", 2, "all"), t.add("prompt", 5, "all")};
    check_both_paddings(t.base, a, {0, 1, -1, 1, 0}, "prompt");
}

TEST_CASE("multi: hidden-state prefix rows equal their solo runs, gradients add up", "[multi]") {
    Tenants t;
    std::vector<Adapter*> a = {t.add("prefix", 2, "all"), t.add("prefix", 4, "0,2"), t.add("prefix", 3, "top:1", true)};
    check_both_paddings(t.base, a, {1, 0, 2, -1, 1, 0}, "prefix");
}

TEST_CASE("multi: key/value prefix rows equal their solo runs, gradients add up", "[multi]") {
    Tenants t;
    std::vector<Adapter*> a = {t.add("prefix-kv", 3, "top:2"), t.add("prefix-kv", 1, "all"),
                               t.add("prefix-kv", 2, "bottom:1", true)};
    check_both_paddings(t.base, a, {0, 1, -1, 0, 2, 1}, "prefix-kv");
}

TEST_CASE("multi: LoRA rows with different ranks and targets equal their solo runs, gradients add up", "[multi]") {
    Tenants t;
    std::vector<Adapter*> a = {t.add_lora(2, {"q_proj", "v_proj"}, "all"),
                               t.add_lora(4, {"q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj"}, "0,2")};
    check_both_paddings(t.base, a, {0, -1, 1, 1, 0}, "lora");
}

TEST_CASE("multi: a batch mixing prompt, prefix, prefix-kv, LoRA, BitFit and no adapter", "[multi]") {
    Tenants t;
    std::vector<Adapter*> a = {t.add("prompt", 3, "all"),
                               t.add("prefix", 2, "0,2"),
                               t.add("prefix-kv", 4, "top:2", true),
                               t.add_lora(4, {"q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj"}, "all"),
                               t.add("bitfit", 1, "1"),
                               t.add("prefix-kv", 2, "all")};  // in the table, on no row: gets no gradient
    check_both_paddings(t.base, a, {0, 1, 2, 3, 4, -1, 2, 3, 0}, "mix");
}

TEST_CASE("multi: every registered method that leaves the base unchanged mixes with prompt rows and no adapter",
          "[multi]") {
    for (const std::string& method : method_names()) {
        if (make_adapter(method)->changes_base()) continue;
        DYNAMIC_SECTION(method) {
            Tenants t;
            AdapterOptions o;
            o.n = 2;
            o.layers = "top:2";
            o.init = "random";
            o.seed = 3;
            std::vector<Adapter*> a = {t.add(method, o), t.add("prompt", 3, "all"), t.add(method, o)};
            check_both_paddings(t.base, a, {0, 1, -1, 2, 0}, method);
        }
    }
}

TEST_CASE("multi: prefix K/V projections run once per adapter, not once per row", "[multi]") {
    Tenants t;
    const GPTConfig& cfg = t.base.config();
    const uint64_t C = uint64_t(cfg.d_model), L = uint64_t(cfg.n_layers);
    // LN1 (8 per element) and the K and V projections (2*N*C*C + N*C bias each)
    // of N prefix vectors in every layer.
    auto projection_flops = [&](uint64_t N) { return L * (8 * N * C + 2 * (2 * N * C * C + N * C)); };

    Adapter* p3 = t.add("prefix", 3, "all");
    Adapter* p2 = t.add("prefix", 2, "all");
    // f(B) = P + B * X: what does not scale with the rows is the intercept
    // P = 2 f(B) - f(2B), which must be the projections of the prefix vectors.
    {
        const uint64_t f1 = forward_flops(t.base, p3, nullptr, {}, 1), f2 = forward_flops(t.base, p3, nullptr, {}, 2),
                       f4 = forward_flops(t.base, p3, nullptr, {}, 4);
        CHECK(f4 - f2 == 2 * (f2 - f1));
        CHECK(2 * f1 - f2 == projection_flops(3));  // the shared [n, C] prefix, projected once
    }
    {
        MultiAdapter one({p3});
        const uint64_t f1 = forward_flops(t.base, &one, &one, {0}, 1), f2 = forward_flops(t.base, &one, &one, {0}, 2),
                       f4 = forward_flops(t.base, &one, &one, {0}, 4);
        CHECK(f4 - f2 == 2 * (f2 - f1));
        CHECK(2 * f1 - f2 == projection_flops(2 * 3));  // table: the adapter and the empty "none" entry
    }
    {
        MultiAdapter two({p3, p2});
        const std::vector<int32_t> pattern = {0, 1, 1, -1};
        const uint64_t f4 = forward_flops(t.base, &two, &two, pattern, 4),
                       f8 = forward_flops(t.base, &two, &two, pattern, 8),
                       f16 = forward_flops(t.base, &two, &two, pattern, 16);
        CHECK(f16 - f8 == 2 * (f8 - f4));
        CHECK(2 * f4 - f8 == projection_flops(3 * 3));  // 2 adapters + "none", padded to n_max = 3
    }
}

TEST_CASE("multi: unknown adapters, wrong row counts, full fine-tuning and foreign bases are refused", "[multi]") {
    Tenants t;
    Adapter* prompt = t.add("prompt", 2, "all");
    Adapter* lora = t.add_lora(2, {"q_proj"}, "all");
    MultiAdapter multi({prompt, lora});
    CHECK_THROWS_WITH(multi.set_rows({0, 2}), Contains("row 1 names adapter 2") && Contains("there are 2"));
    CHECK_THROWS_WITH(multi.set_rows({-2}), Contains("row 0 names adapter -2"));

    multi.set_rows({0, -1});
    ModelInput in = single_row({1, 2, 3});
    in.B = 3;
    in.T = 1;
    t.base.set_hooks(&multi);
    CHECK_THROWS_WITH(t.base.forward(in), Contains("2 row assignments") && Contains("3 rows"));
    t.base.set_hooks(nullptr);
    CHECK(tape_size() == 0);
    CHECK_NOTHROW(t.base.forward(in));  // the model is unharmed

    GPT other(tiny_config(), 21);
    auto full = make_adapter("full");
    full->attach(other);
    auto other_prompt = make_adapter("prompt");
    other_prompt->attach(other);
    CHECK_THROWS_WITH(MultiAdapter({other_prompt.get(), full.get()}), Contains("adapter 1 (full) trains the base"));
    CHECK_THROWS_WITH(MultiAdapter({full.get()}), Contains("full"));
    CHECK_THROWS_WITH(MultiAdapter({prompt, other_prompt.get()}), Contains("adapter 1 is attached to another base"));
    auto detached = make_adapter("lora");
    CHECK_THROWS_WITH(MultiAdapter({prompt, detached.get()}), Contains("adapter 1 is null or not attached"));
    CHECK_THROWS_WITH(MultiAdapter({nullptr}), Contains("adapter 0 is null"));
}

TEST_CASE("multi: a merged adapter is refused, when built and when merged later (no row runs on merged weights)",
          "[multi]") {
    // Before the fix a MultiAdapter took a merged LoRA, and every other row then ran on its merged weights.
    Tenants t;
    Adapter* prompt = t.add("prompt", 2, "all");
    Adapter* lora = t.add_lora(2, {"q_proj", "v_proj"}, "all");
    const ModelInput in = single_row({1, 2, 3});
    auto logits_with = [&](ModelHooks* hooks) {
        NoGradGuard no_grad;
        t.base.set_hooks(hooks);
        Tensor l = t.base.forward(in);
        t.base.set_hooks(nullptr);
        return l;
    };
    const Tensor prompt_alone = logits_with(prompt);

    lora->merge();
    CHECK_THROWS_WITH(MultiAdapter({prompt, lora}), Contains("adapter 1 (lora) is merged into the base"));
    lora->unmerge();

    MultiAdapter multi({prompt, lora});
    multi.set_rows({0});
    const Tensor mixed = logits_with(&multi);
    CHECK(max_diff(mixed, prompt_alone) < 1e-5f);
    lora->merge();  // after construction: refused at the next forward
    t.base.set_hooks(&multi);
    CHECK_THROWS_WITH(t.base.forward(in), Contains("is merged into the base"));
    t.base.set_hooks(nullptr);
    lora->unmerge();
    CHECK(bitwise_equal(logits_with(&multi), mixed));
}

TEST_CASE("multi: adapts_linear is false only where linear_delta gives no delta (every method, every Linear)", "[multi]") {
    // MultiAdapter skips gathering an adapter's rows for a Linear it does not adapt: a false answer
    // where a delta exists would silently drop it.
    Tenants t;
    Rng rng(5);
    int adapted = 0;
    for (const std::string& method : method_names()) {
        AdapterOptions o;
        o.n = 2;
        o.init = "random";
        o.section("lora")["target_modules"] = {"q_proj", "v_proj", "fc"};
        Adapter* a = t.add(method, o);
        for (auto& [name, w] : t.base.named_parameters()) {
            if (name.size() < 7 || name.compare(name.size() - 7, 7, ".weight") != 0 || w.ndim() != 2 ||
                name.find("wte") != std::string::npos || name.find("wpe") != std::string::npos)
                continue;
            const std::string path = name.substr(0, name.size() - 7);
            ForwardInfo info;
            info.B = 2;
            const Tensor x = Tensor::normal({2, 3, w.dim(1)}, rng, 0.f, 1.f);
            const Tensor y = Tensor::normal({2, 3, w.dim(0)}, rng, 0.f, 1.f);
            const bool delta = a->linear_delta(path, x, info).defined() || a->linear_input(path, x, info).defined() ||
                               a->linear_output(path, x, y, info).defined();
            INFO(method << " " << path);
            if (!a->adapts_linear(path)) CHECK_FALSE(delta);
            adapted += delta;
        }
        if (a->changes_base()) t.base.freeze();  // it unfreezes the base; the next adapters expect it frozen
    }
    CHECK(adapted >= 3 * t.base.config().n_layers);  // LoRA on q, v, fc and BitFit on every Linear
}
