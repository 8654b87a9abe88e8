// The Petrov et al. (ICLR 2024) digit tasks (datasets/petrov.h) and the
// attention-shift diagnostic (peft/attention_shift.h).
#include <algorithm>
#include <map>
#include <set>
#include <sstream>

#include <catch2/catch.hpp>

#include "datasets/petrov.h"
#include "datasets/task.h"
#include "peft/attention_shift.h"
#include "autograd/ops.h"
#include "autograd/tape.h"
#include "peft/registry.h"
#include "tests/peft_testing.h"

using namespace peftlab;
using namespace peftlab::data;

namespace {

std::vector<int> words(const std::string& s) {
    std::istringstream in(s);
    std::vector<int> out;
    for (int v; in >> v;) out.push_back(v);
    return out;
}

std::map<int, int> counts(const std::vector<int>& v) {
    std::map<int, int> c;
    for (int x : v) ++c[x];
    return c;
}

}  // namespace

TEST_CASE("petrov tasks: outputs satisfy the paper's definitions, checked as properties", "[petrov]") {
    for (const std::string& name : petrov_task_names()) {
        Task t = make_task("petrov-" + name, 300, 20, 100, 7);
        CHECK(t.name == "petrov-" + name);
        CHECK(t.metric_name() == "exact_match");
        for (const auto* split : {&t.train, &t.valid, &t.test})
            for (const Example& ex : *split) {
                const std::vector<int> in = words(ex.source), out = words(ex.target);
                REQUIRE(in.size() == 10);
                REQUIRE(out.size() == 10);
                for (int d : in) REQUIRE((d >= 1 && d <= 8));
                if (name == "sort-asc" || name == "sort-desc") {
                    CHECK(counts(out) == counts(in));  // a permutation of the input
                    for (size_t i = 1; i < out.size(); ++i)
                        CHECK((name == "sort-asc" ? out[i - 1] <= out[i] : out[i - 1] >= out[i]));
                } else if (name == "add1" || name == "add2") {
                    const int k = name == "add1" ? 1 : 2;  // the paper's inp + k, position by position, no modulo
                    for (size_t i = 0; i < in.size(); ++i) CHECK(out[i] == in[i] + k);
                } else if (name == "sort-asc-add1") {
                    std::vector<int> minus(out);
                    for (int& v : minus) v -= 1;
                    CHECK(counts(minus) == counts(in));
                    CHECK(std::is_sorted(out.begin(), out.end()));
                } else if (name == "reverse") {
                    for (size_t i = 0; i < in.size(); ++i) CHECK(out[i] == in[in.size() - 1 - i]);
                } else {  // hist: equal digits carry equal counts, and a digit with count c occurs c times
                    for (size_t i = 0; i < in.size(); ++i) {
                        CHECK(out[i] == counts(in)[in[i]]);
                        for (size_t j = 0; j < in.size(); ++j)
                            if (in[i] == in[j]) CHECK(out[i] == out[j]);
                    }
                    int sum_over_distinct = 0;  // each distinct digit's count, once: the length
                    std::set<int> seen;
                    for (size_t i = 0; i < in.size(); ++i)
                        if (seen.insert(in[i]).second) sum_over_distinct += out[i];
                    CHECK(sum_over_distinct == 10);
                }
            }
        CHECK(t.score(t.test, std::vector<std::string>(t.test.size(), "1 2 3")).value == 0.0);
        std::vector<std::string> right;
        for (const Example& ex : t.test) right.push_back(" " + ex.target);
        CHECK(t.score(t.test, right).value == 1.0);
        CHECK(t.score(t.test, right).extra.at("digit_accuracy") == 1.0);
        // The first five output words right, the rest missing: half the digits.
        std::vector<std::string> half;
        for (const Example& ex : t.test) {
            const std::vector<int> w = words(ex.target);
            half.push_back(petrov_text(std::vector<int>(w.begin(), w.begin() + 5)));
        }
        const Score hs = t.score(t.test, half);
        CHECK(hs.value == 0.0);
        CHECK(hs.extra.at("digit_accuracy") == Approx(0.5));
    }
    CHECK_THROWS_WITH(petrov_output("sort-asc", {1, 2}), Catch::Contains("2 digits"));
    CHECK_THROWS_WITH(petrov_output("sort-asc", {1, 2, 3, 4, 5, 6, 7, 8, 9, 1}), Catch::Contains("digit 9"));
    CHECK_THROWS_WITH(petrov_output("nope", std::vector<int>(10, 1)), Catch::Contains("unknown task \"nope\""));
}

TEST_CASE("petrov tasks: a fixed quarter of inputs is held out, disjoint from training, deterministic", "[petrov]") {
    // The hash split over uniform inputs: about a quarter.
    Rng rng(3);
    int test = 0;
    const int n = 20000;
    for (int i = 0; i < n; ++i) {
        std::vector<int> in(10);
        for (int& d : in) d = 1 + int(rng.below(8));
        test += petrov_is_test_input(in);
    }
    CHECK(std::abs(double(test) / n - 0.25) < 0.015);

    Task a = make_task("petrov-sort-asc", 500, 50, 200, 1), b = make_task("petrov-hist", 500, 50, 200, 2);
    std::set<std::string> train_inputs;
    for (const Task* t : {&a, &b}) {
        for (const Example& ex : t->train) {
            CHECK_FALSE(petrov_is_test_input(words(ex.source)));
            train_inputs.insert(ex.source);
        }
        for (const Example& ex : t->valid) CHECK_FALSE(petrov_is_test_input(words(ex.source)));
        for (const Example& ex : t->test) CHECK(petrov_is_test_input(words(ex.source)));
    }
    for (const Task* t : {&a, &b})  // no test input of any task is a training input of any task
        for (const Example& ex : t->test) CHECK(train_inputs.count(ex.source) == 0);
    // Half of the draws favour repeats, as the paper's sampler: far more inputs
    // with <= 5 distinct digits than uniform draws give (~7%).
    int repeats = 0;
    for (const Example& ex : a.train) {
        const std::vector<int> in = words(ex.source);
        repeats += std::set<int>(in.begin(), in.end()).size() <= 5;
    }
    CHECK(repeats > int(a.train.size()) * 4 / 10);

    Task a2 = make_task("petrov-sort-asc", 500, 50, 200, 1);
    REQUIRE(a2.test.size() == a.test.size());
    for (size_t i = 0; i < a.test.size(); ++i) CHECK(a2.test[i].source == a.test[i].source);
    for (size_t i = 0; i < a.train.size(); ++i) CHECK(a2.train[i].source == a.train[i].source);
    CHECK(make_task("petrov-sort-asc", 500, 50, 200, 9).test[0].source != a.test[0].source);
}

TEST_CASE("petrov corpus: the four pretraining tasks, no marker, training inputs only", "[petrov]") {
    Task t = make_task("petrov-hist", 10, 5, 5, 0);
    REQUIRE(t.corpus);
    CHECK(t.corpus_id == make_task("petrov-add1", 10, 5, 5, 0).corpus_id);  // one base for every petrov task
    const std::string text = petrov_corpus(2000, 5);
    CHECK(text == petrov_corpus(2000, 5));
    std::istringstream lines(text);
    std::map<std::string, int> by_task;
    int n = 0;
    for (std::string line; std::getline(lines, line); ++n) {
        const size_t sep = line.find(std::string(kSeparator));
        REQUIRE(sep != std::string::npos);
        const std::vector<int> in = words(line.substr(0, sep)), out = words(line.substr(sep + kSeparator.size()));
        CHECK_FALSE(petrov_is_test_input(in));
        std::string which;
        for (const char* task : {"sort-asc", "sort-desc", "add1", "add2"})
            if (petrov_output(task, in) == out) which += which.empty() ? task : "";
        CHECK_FALSE(which.empty());
        ++by_task[which];
    }
    CHECK(n == 2000);
    for (const char* task : {"sort-asc", "sort-desc", "add1", "add2"})
        CHECK(std::abs(by_task[task] - 500) < 100);
}

TEST_CASE("attention shift: a prefix leaves content attention unchanged at every layer, LoRA on q/k does not",
          "[petrov][attention_diagnostic]") {
    using namespace peftlab::peft_testing;
    const GPTConfig cfg = tiny_config(3);
    GPT base(cfg, 11);
    ModelInput in;
    in.B = 2;
    in.T = 9;
    Rng rng(4);
    for (int64_t i = 0; i < in.B * in.T; ++i) in.tokens.push_back(int32_t(rng.below(uint32_t(cfg.vocab))));
    in.valid.assign(size_t(in.B * in.T), 1);
    in.valid[size_t(in.T)] = in.valid[size_t(in.T + 1)] = 0;  // row 1 left-padded by two
    in.positions.assign(size_t(in.B * in.T), 0);
    for (int64_t b = 0; b < in.B; ++b)
        for (int64_t t = 0, p = 0; t < in.T; ++t) in.positions[size_t(b * in.T + t)] = in.valid[size_t(b * in.T + t)] ? int32_t(p++) : 0;

    auto shift_of = [&](const std::string& method, peft::AdapterOptions opts) {
        GPT adapted(cfg, 11);
        auto adapter = peft::make_adapter(method, opts);
        adapter->activate(adapted);
        perturb(adapter->parameters(), 5, 0.5f);  // LoRA's B starts at zero
        return peft::attention_shift(base, adapted, in);
    };
    peft::AdapterOptions o;
    o.n = 4;
    o.init = "random";
    in.source_len = {4, 7};  // where an infix sits (row 1's two padding columns included)
    for (const std::string& m : {std::string("prefix"), std::string("prefix-kv"), std::string("infix")}) {
        const peft::AttentionShift s = shift_of(m, o);
        INFO(m);
        CHECK(s.n_layers == 3);
        CHECK(s.queries == in.B * in.T - 2);
        CHECK(s.max_local() < 1e-5);
        CHECK(s.mean_end_to_end() > 1e-5);  // later layers read changed inputs (a random tiny model moves little)
        for (int h = 0; h < s.n_heads; ++h) CHECK(s.end_to_end_max[0][size_t(h)] < 1e-5);  // the first layer does not
    }
    peft::AdapterOptions lo;
    lo.sections["lora"] = {{"r", 2}, {"target_modules", {"q_proj", "k_proj"}}};
    const peft::AttentionShift s = shift_of("lora", lo);
    CHECK(s.mean_local() > 0.02);
    for (int l = 0; l < s.n_layers; ++l)
        for (int h = 0; h < s.n_heads; ++h) CHECK(s.local_mean[size_t(l)][size_t(h)] > 1e-3);
    {
        // Layer 0 against an independent computation: both models read the same
        // embeddings there, so local and end-to-end TV are both the TV between
        // softmax(q k^T / sqrt(Dh)) (the library's causal softmax, in float) of
        // the base's projections and of the LoRA-adapted ones.
        GPT adapted(cfg, 11);
        auto adapter = peft::make_adapter("lora", lo);
        adapter->activate(adapted);
        perturb(adapter->parameters(), 5, 0.5f);
        ModelInput one;
        one.B = 1;
        one.T = 7;
        one.tokens.assign(in.tokens.begin(), in.tokens.begin() + 7);
        const peft::AttentionShift s1 = peft::attention_shift(base, adapted, one);
        NoGradGuard no_grad;
        std::vector<int32_t> pos(7);
        for (int32_t t = 0; t < 7; ++t) pos[size_t(t)] = t;
        const Tensor x = reshape(add(base.wte.forward(one.tokens), base.wpe.forward(pos)), {1, 7, cfg.d_model});
        const Tensor h = base.blocks[0]->ln1.forward(x);
        const int H = cfg.n_heads;
        const int64_t Dh = cfg.d_model / H;
        ForwardContext with_hooks;
        with_hooks.hooks = adapted.hooks();
        with_hooks.info = ForwardInfo{1, 7, true, false, {}};
        auto probs = [&](const CausalSelfAttention& attn, const ForwardContext& ctx) {
            auto heads = [&](const Tensor& t) { return permute(reshape(t, {1, 7, H, Dh}), {0, 2, 1, 3}); };  // [1, H, 7, Dh]
            const Tensor q = heads(attn.q_proj.forward(h, ctx)), k = heads(attn.k_proj.forward(h, ctx));
            return softmax(mul_scalar(matmul(q, k, false, true), 1.f / std::sqrt(float(Dh))), true);  // [1, H, 7, 7]
        };
        const Tensor pb = probs(base.blocks[0]->attn, ForwardContext{}), pa = probs(adapted.blocks[0]->attn, with_hooks);
        for (int hd = 0; hd < H; ++hd) {
            double tv = 0;
            for (int64_t i = 0; i < 7; ++i)
                for (int64_t j = 0; j < 7; ++j) {
                    const int64_t at = (hd * 7 + i) * 7 + j;
                    tv += 0.5 * std::abs(double(pb.data()[at]) - double(pa.data()[at])) / 7.0;
                }
            CHECK(tv > 1e-3);
            CHECK(s1.local_mean[0][size_t(hd)] == Approx(tv).margin(1e-5));
            CHECK(s1.end_to_end_mean[0][size_t(hd)] == Approx(tv).margin(1e-5));
        }
    }
    // LoRA on the MLP only: attention at layer 0 untouched, locally untouched everywhere.
    peft::AdapterOptions mlp;
    mlp.sections["lora"] = {{"r", 1}, {"target_modules", {"fc", "proj"}}};
    const peft::AttentionShift sm = shift_of("lora", mlp);
    CHECK(sm.max_local() < 1e-5);
    CHECK(sm.mean_end_to_end() > 1e-3);
    // The same model twice: nothing moves.
    CHECK(peft::attention_shift(base, base, in).mean_end_to_end() < 1e-9);
    GPTConfig other = cfg;
    other.n_heads = 2;
    GPT wrong(other, 1);
    CHECK_THROWS_WITH(peft::attention_shift(base, wrong, in), Catch::Contains("differ"));
}
