// Optimizers, checkpoints and the Trainer, on a tiny GPT (V 32, C 32, 2 layers, T 8).
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "autograd/flops.h"
#include "autograd/ops.h"
#include "autograd/tape.h"
#include "autograd/threads.h"
#include "nn/checkpoint.h"
#include "nn/gpt.h"
#include "nn/optim.h"
#include "nn/safetensors.h"
#include "nn/trainer.h"
#include "tests/testing.h"

using namespace peftlab;
using peftlab::testing::TempDir;
using Catch::Contains;
namespace fs = std::filesystem;

namespace {

constexpr int64_t kT = 8;

GPTConfig tiny_config(float dropout = 0.f) {
    GPTConfig c;
    c.vocab = 32;
    c.d_model = 32;
    c.n_layers = 2;
    c.n_heads = 2;
    c.d_ff = 64;
    c.max_seq = kT;
    c.dropout = dropout;
    return c;
}

// B rows of T random tokens; targets are the next tokens.
struct Batch {
    ModelInput in;
    std::vector<int32_t> targets;
};

Batch random_batch(Rng& rng, int64_t B, int64_t vocab = 32) {
    Batch b;
    b.in.B = B;
    b.in.T = kT;
    for (int64_t r = 0; r < B; ++r) {
        std::vector<int32_t> seq(kT + 1);
        for (auto& t : seq) t = int32_t(rng.below(uint32_t(vocab)));
        b.in.tokens.insert(b.in.tokens.end(), seq.begin(), seq.end() - 1);
        b.targets.insert(b.targets.end(), seq.begin() + 1, seq.end());
    }
    return b;
}

// Rows [from, to) of a batch.
Batch rows(const Batch& b, int64_t from, int64_t to) {
    Batch out;
    out.in.B = to - from;
    out.in.T = kT;
    out.in.tokens.assign(b.in.tokens.begin() + from * kT, b.in.tokens.begin() + to * kT);
    out.targets.assign(b.targets.begin() + from * kT, b.targets.begin() + to * kT);
    return out;
}

Tensor batch_loss(GPT& model, const Batch& b) { return lm_loss(model.forward(b.in), b.targets); }

using Snapshot = std::vector<std::vector<float>>;

Snapshot snapshot(const NamedTensors& ts) {
    Snapshot s;
    for (auto& [name, t] : ts) s.push_back(t.to_vector());
    return s;
}

bool bitwise_equal(const Snapshot& a, const Snapshot& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (a[i].size() != b[i].size() || std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)) != 0)
            return false;
    return true;
}

// Sets t's gradient to exactly `g` (backward of sum(t * g)).
void set_grad(const Tensor& t, const std::vector<float>& g) {
    Tensor(t).zero_grad();
    backward(sum(mul(t, Tensor::from_data(t.shape(), g))));
}

int64_t padded_bytes(int64_t numel) { return (numel * 4 + 63) / 64 * 64; }

TrainOptions quiet_options(int64_t steps) {
    TrainOptions o;
    o.steps = steps;
    o.log_every = 0;
    return o;
}

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
    std::vector<nlohmann::json> out;
    std::ifstream in(path);
    for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
    return out;
}

}  // namespace

// ---- optimizers ------------------------------------------------------------------------

TEST_CASE("AdamW steps match the update computed by hand in double", "[train]") {
    Tensor p = Tensor::from_data({3}, {0.5f, -1.0f, 2.0f}).set_requires_grad(true);
    AdamWOptions o;
    o.lr = 0.1;
    o.weight_decay = 0.1;
    AdamW opt({{"p", p}}, o);
    const std::vector<std::vector<float>> grads = {{0.3f, -0.2f, 1e-3f}, {-0.1f, 0.4f, 2.0f}};
    std::vector<double> pd = {0.5, -1.0, 2.0}, m(3, 0.0), v(3, 0.0);
    for (int t = 1; t <= 2; ++t) {
        set_grad(p, grads[size_t(t - 1)]);
        flops::reset();
        opt.step();
        CHECK(flops::totals()[size_t(flops::Phase::Optimizer)] == 12u * 3u);
        for (size_t j = 0; j < 3; ++j) {
            const double g = grads[size_t(t - 1)][j];
            pd[j] *= 1.0 - o.lr * o.weight_decay;
            m[j] = o.beta1 * m[j] + (1 - o.beta1) * g;
            v[j] = o.beta2 * v[j] + (1 - o.beta2) * g * g;
            const double mhat = m[j] / (1 - std::pow(o.beta1, t)), vhat = v[j] / (1 - std::pow(o.beta2, t));
            pd[j] -= o.lr * mhat / (std::sqrt(vhat) + o.eps);
            CHECK(p.data()[j] == Approx(pd[j]).epsilon(1e-6));
        }
    }
    CHECK(opt.param_steps(0) == 2);
    const NamedTensors state = opt.state_dict();
    REQUIRE(state.size() == 3);
    CHECK(state[0].first == "p.exp_avg");
    CHECK(state[1].first == "p.exp_avg_sq");
    CHECK(state[2].first == "p.step");
    CHECK(state[2].second.item() == 2.f);
    CHECK(state[0].second.data()[1] == Approx(m[1]).epsilon(1e-6));
}

TEST_CASE("AdamW matches torch.optim.AdamW 1.13 over three steps", "[train]") {
    // Produced by torch 1.13 (foreach=False) from these inputs: lr 0.01, wd 0.05,
    // defaults otherwise; the grads of step t are g * t.
    Tensor p = Tensor::from_data({4}, {0.25f, -0.75f, 1.5f, 0.0f}).set_requires_grad(true);
    AdamWOptions o;
    o.lr = 0.01;
    o.weight_decay = 0.05;
    AdamW opt({{"p", p}}, o);
    const std::vector<float> g = {0.125f, -2.0f, 1e-4f, 0.5f};
    for (int t = 1; t <= 3; ++t) {
        std::vector<float> gt = g;
        for (float& x : gt) x *= float(t);
        set_grad(p, gt);
        opt.step();
    }
    const std::vector<float> torch_result = {0x1.c3655ap-3f, -0x1.707712p-1f, 0x1.77f1fap+0f, -0x1.deb104p-6f};
    for (size_t j = 0; j < 4; ++j) CHECK(p.data()[j] == torch_result[j]);
}

TEST_CASE("SGD with momentum and weight decay follows torch.optim.SGD", "[train]") {
    Tensor p = Tensor::from_data({2}, {1.0f, -2.0f}).set_requires_grad(true);
    SGD opt({{"p", p}}, SGDOptions{0.1, 0.9, 0.01});
    double buf[2] = {0, 0}, pd[2] = {1.0, -2.0};
    const std::vector<std::vector<float>> grads = {{0.5f, -1.0f}, {0.25f, 0.75f}};
    for (int t = 0; t < 2; ++t) {
        set_grad(p, grads[size_t(t)]);
        flops::reset();
        opt.step();
        CHECK(flops::totals()[size_t(flops::Phase::Optimizer)] == 4u * 2u);
        for (int j = 0; j < 2; ++j) {
            const double d = grads[size_t(t)][size_t(j)] + 0.01 * pd[j];
            buf[j] = t == 0 ? d : 0.9 * buf[j] + d;  // the first step takes the gradient as is
            pd[j] -= 0.1 * buf[j];
            CHECK(p.data()[j] == Approx(pd[j]).epsilon(1e-6));
        }
    }
    CHECK(opt.state_bytes() == 2 * 4);
    SGD plain({{"p", p}}, SGDOptions{0.1, 0.0, 0.0});
    CHECK(plain.state_bytes() == 0);
    CHECK(plain.state_dict().size() == 1);  // just the step count
}

TEST_CASE("a parameter without a gradient is skipped and keeps its own step count", "[train]") {
    Tensor a = Tensor::from_data({2}, {1.f, 2.f}).set_requires_grad(true);
    Tensor b = Tensor::from_data({2}, {3.f, 4.f}).set_requires_grad(true);
    AdamW opt({{"a", a}, {"b", b}});
    set_grad(a, {1.f, 1.f});
    opt.step();
    CHECK(b.to_vector() == std::vector<float>{3.f, 4.f});
    CHECK(opt.param_steps(0) == 1);
    CHECK(opt.param_steps(1) == 0);
}

TEST_CASE("optimizer state exists only for the trainable parameters", "[train]") {
    GPT model(tiny_config(), 1);
    model.freeze();
    model.blocks[1]->unfreeze();
    model.ln_f.unfreeze();
    const NamedTensors trainable = trainable_named_parameters(model);
    REQUIRE(!trainable.empty());
    int64_t padded = 0;
    for (auto& [name, t] : trainable) {
        CHECK((name.rfind("blocks.1.", 0) == 0 || name.rfind("ln_f.", 0) == 0));
        padded += 2 * padded_bytes(t.numel());
    }
    const int64_t before = mem::current_bytes();
    AdamW opt(trainable);
    CHECK(opt.state_bytes() == 2 * 4 * model.num_trainable());
    CHECK(mem::current_bytes() - before == padded);  // allocated through Storage, so accounted
    CHECK(opt.state_dict().size() == 3 * trainable.size());

    NamedTensors with_frozen = trainable;
    with_frozen.emplace_back("wte.weight", model.wte.weight);
    CHECK_THROWS_WITH(AdamW(with_frozen), Contains("wte.weight") && Contains("does not require grad"));
}

TEST_CASE("optimizer load_state_dict checks every key before changing anything", "[train]") {
    Tensor p = Tensor::from_data({2}, {1.f, 2.f}).set_requires_grad(true);
    AdamW opt({{"p", p}});
    set_grad(p, {0.5f, -0.5f});
    opt.step();
    const NamedTensors good = opt.state_dict();
    const Snapshot before = snapshot(good);

    NamedTensors missing(good.begin(), good.end() - 1);
    CHECK_THROWS_WITH(opt.load_state_dict(missing), Contains("missing key 'p.step'"));
    NamedTensors extra = good;
    extra.emplace_back("q.exp_avg", Tensor::zeros({2}));
    CHECK_THROWS_WITH(opt.load_state_dict(extra), Contains("unexpected key 'q.exp_avg'"));
    NamedTensors bad_shape = good;
    bad_shape[0].second = Tensor::zeros({3});
    CHECK_THROWS_WITH(opt.load_state_dict(bad_shape), Contains("'p.exp_avg'") && Contains("[3]"));
    NamedTensors bad_step = {{"p.exp_avg", Tensor::zeros({2})}, {"p.exp_avg_sq", Tensor::zeros({2})},
                             {"p.step", Tensor::full({}, 1.5f)}};
    CHECK_THROWS_WITH(opt.load_state_dict(bad_step), Contains("p.step"));
    // A second moment below zero (a damaged file) would make the update's sqrt NaN steps later.
    NamedTensors negative = good;
    negative[1].second = Tensor::from_data({2}, {0.f, -1e-3f});
    REQUIRE(negative[1].first == "p.exp_avg_sq");
    CHECK_THROWS_WITH(opt.load_state_dict(negative),
                      Contains("'p.exp_avg_sq' holds -0.001 at element 1 (of 2)") && Contains("never negative"));
    CHECK(bitwise_equal(snapshot(opt.state_dict()), before));
    CHECK(opt.param_steps(0) == 1);
}

TEST_CASE("clip_grad_norm returns the global norm and scales to max_norm", "[train]") {
    Tensor a = Tensor::zeros({2}).set_requires_grad(true);
    Tensor b = Tensor::zeros({1}).set_requires_grad(true);
    Tensor unused = Tensor::zeros({3}).set_requires_grad(true);
    const NamedTensors ps = {{"a", a}, {"b", b}, {"unused", unused}};
    set_grad(a, {3.f, 4.f});
    set_grad(b, {12.f});
    CHECK(grad_norm(ps) == 13.0);
    CHECK(clip_grad_norm(ps, 20.0) == 13.0);  // below the limit: untouched
    CHECK(a.grad().to_vector() == std::vector<float>{3.f, 4.f});
    CHECK(clip_grad_norm(ps, 6.5) == 13.0);
    CHECK(a.grad().data()[0] == Approx(1.5).epsilon(1e-6));
    CHECK(a.grad().data()[1] == Approx(2.0).epsilon(1e-6));
    CHECK(b.grad().data()[0] == Approx(6.0).epsilon(1e-6));
    CHECK(grad_norm(ps) == Approx(6.5).epsilon(1e-6));
    CHECK(!unused.has_grad());

    // Chunked double summation: the same bits whatever the thread count.
    Tensor big = Tensor::zeros({300001}).set_requires_grad(true);
    Rng rng(5);
    std::vector<float> g(300001);
    for (float& x : g) x = rng.normal();
    set_grad(big, g);
    const int saved = threads();
    set_threads(1);
    const double one = grad_norm({{"big", big}});
    set_threads(2);
    const double two = grad_norm({{"big", big}});
    set_threads(saved);
    CHECK(std::memcmp(&one, &two, sizeof one) == 0);
}

TEST_CASE("LR schedule: linear warmup then cosine or linear decay to the floor", "[train]") {
    LRSchedule s;
    s.peak_lr = 1.0;
    s.warmup_steps = 4;
    s.total_steps = 12;  // decay over steps 4..11, reaching the floor at 12
    s.min_ratio = 0.1;
    CHECK(s.at(0) == Approx(0.25));
    CHECK(s.at(3) == Approx(1.0));
    CHECK(s.at(4) == Approx(1.0));
    CHECK(s.at(6) == Approx(0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI / 4))));
    CHECK(s.at(8) == Approx(0.55));
    CHECK(s.at(11) == Approx(0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * 7 / 8))));
    CHECK(s.at(12) == Approx(0.1));
    CHECK(s.at(100) == Approx(0.1));
    s.decay = LRSchedule::Decay::Linear;
    CHECK(s.at(6) == Approx(0.775));
    CHECK(s.at(11) == Approx(0.1 + 0.9 / 8));
    s.decay = LRSchedule::Decay::Constant;
    CHECK(s.at(10) == 1.0);
    s.warmup_steps = 20;
    CHECK_THROWS_WITH(s.at(0), Contains("warmup_steps = 20"));
}

TEST_CASE("gradient accumulation over k micro-batches equals one batch of k*b rows", "[train]") {
    Rng data(3);
    const Batch full = random_batch(data, 4);
    GPT one(tiny_config(), 11), acc(tiny_config(), 11);
    backward(batch_loss(one, full));
    for (int i = 0; i < 2; ++i) backward(mul_scalar(batch_loss(acc, rows(full, 2 * i, 2 * i + 2)), 0.5f));
    const NamedTensors a = one.named_parameters(), b = acc.named_parameters();
    for (size_t i = 0; i < a.size(); ++i) {
        const std::vector<float> ga = a[i].second.grad().to_vector(), gb = b[i].second.grad().to_vector();
        for (size_t j = 0; j < ga.size(); ++j) REQUIRE(gb[j] == Approx(ga[j]).margin(1e-6).epsilon(1e-4));
    }

    // The Trainer does the same: grad_accum 2 of 2 rows vs 1 of 4, three SGD steps.
    auto train = [&](GPT& model, int k) {
        for (auto& [n, t] : model.named_parameters()) Tensor(t).zero_grad();
        SGD opt(trainable_named_parameters(model), SGDOptions{0.5, 0.9, 0.0});
        TrainOptions o = quiet_options(3);
        o.grad_accum = k;
        Trainer trainer(trainable_named_parameters(model), opt,
                        [&](int64_t step, Rng&, const dist::Shard& shard) -> MicroBatchLoss {
                            Rng r{uint64_t(step)};
                            const Batch b = rows(random_batch(r, 4), shard.begin(4), shard.end(4));
                            return {batch_loss(model, b), counted_targets(b.targets)};
                        },
                        o);
        return trainer.run();
    };
    const TrainSummary s1 = train(one, 1), s2 = train(acc, 2);
    for (size_t i = 0; i < 3; ++i) CHECK(s2.losses[i] == Approx(s1.losses[i]).epsilon(1e-5));
    for (size_t i = 0; i < a.size(); ++i) {
        const std::vector<float> pa = a[i].second.to_vector(), pb = b[i].second.to_vector();
        for (size_t j = 0; j < pa.size(); ++j) REQUIRE(pb[j] == Approx(pa[j]).margin(1e-5).epsilon(1e-4));
    }
}

TEST_CASE("gradient accumulation weighs micro-batches by counted tokens, as one batch; deterministic",
          "[train][grad_accum]") {
    // Two rows: row 0 counts 1 target token, row 1 counts 5 (the rest are -1,
    // as the source part of a conditional example). One batch's loss is the
    // mean over those 6 tokens (lm_loss's definition, as torch's
    // cross_entropy(ignore_index=-1)); split in two micro-batches the update
    // must be the same. Averaging the two micro-batch means instead (1/k each)
    // weighs row 0's single token 3x too much: checked to differ.
    Rng data(5);
    Batch batch = random_batch(data, 2);
    for (int64_t t = 0; t < kT; ++t) {
        if (t != 3) batch.targets[size_t(t)] = -1;            // row 0: 1 counted token
        if (t < 3) batch.targets[size_t(kT + t)] = -1;        // row 1: 5 counted tokens
    }
    REQUIRE(counted_targets(rows(batch, 0, 1).targets) == 1);
    REQUIRE(counted_targets(rows(batch, 1, 2).targets) == 5);

    auto train = [&](int k, int steps, bool token_weighted) {
        auto model = std::make_unique<GPT>(tiny_config(), 21);
        SGD opt(trainable_named_parameters(*model), SGDOptions{0.5, 0.0, 0.0});
        TrainOptions o = quiet_options(steps);
        o.grad_accum = k;
        Trainer trainer(trainable_named_parameters(*model), opt,
                        [&](int64_t, Rng&, const dist::Shard& shard) -> MicroBatchLoss {
                            const Batch b = rows(batch, shard.begin(2), shard.end(2));
                            return {batch_loss(*model, b), token_weighted ? counted_targets(b.targets) : 1};
                        },
                        o);
        const TrainSummary s = trainer.run();
        return std::make_pair(s, snapshot(model->named_parameters()));
    };
    const auto [s_one, w_one] = train(1, 2, true);
    const auto [s_acc, w_acc] = train(2, 2, true);
    const auto [s_mean, w_mean] = train(2, 2, false);  // the old 1/k weighting
    const Snapshot w0 = snapshot(GPT(tiny_config(), 21).named_parameters());
    REQUIRE(s_acc.losses.size() == 2);
    for (size_t i = 0; i < 2; ++i) CHECK(s_acc.losses[i] == Approx(s_one.losses[i]).epsilon(1e-6));
    double max_err = 0, max_update = 0, max_mean_err = 0;
    for (size_t i = 0; i < w_one.size(); ++i)
        for (size_t j = 0; j < w_one[i].size(); ++j) {
            max_update = std::max(max_update, double(std::fabs(w_one[i][j] - w0[i][j])));
            max_err = std::max(max_err, double(std::fabs(w_acc[i][j] - w_one[i][j])));
            max_mean_err = std::max(max_mean_err, double(std::fabs(w_mean[i][j] - w_one[i][j])));
        }
    REQUIRE(max_update > 1e-3);               // the steps did move the weights
    CHECK(max_err < 1e-6 + 1e-4 * max_update);  // token-weighted: one batch, to float rounding
    CHECK(max_mean_err > 0.1 * max_update);   // mean of means: a different update
    // The reported loss is the token-weighted mean, not the mean of the two means.
    CHECK(s_mean.losses[0] != Approx(s_one.losses[0]).epsilon(1e-3));

    // Same inputs, same bits.
    const auto [s_again, w_again] = train(2, 2, true);
    CHECK(s_again.losses == s_acc.losses);
    CHECK(bitwise_equal(w_again, w_acc));

    // A loss function that draws a different global batch per micro-batch is refused.
    GPT model(tiny_config(), 1);
    SGD opt(trainable_named_parameters(model), SGDOptions{0.1, 0.0, 0.0});
    TrainOptions o = quiet_options(1);
    o.grad_accum = 2;
    Trainer bad(trainable_named_parameters(model), opt,
                [&](int64_t, Rng& rng, const dist::Shard& shard) {
                    return batch_loss(model, random_batch(rng, shard.index + 1));  // draws more for shard 1
                },
                o);
    CHECK_THROWS_WITH(bad.run(), Contains("drew differently from the data generator"));
    clear_tape();
}

// ---- checkpoints -------------------------------------------------------------------------

TEST_CASE("save_model / load_model round trip is bitwise", "[train]") {
    TempDir tmp;
    GPT a(tiny_config(), 1), b(tiny_config(), 2);
    const std::string path = tmp.path("model.safetensors");
    save_model(path, a, {{"note", "hello"}});
    REQUIRE(!bitwise_equal(snapshot(a.named_parameters()), snapshot(b.named_parameters())));
    const Metadata meta = load_model(path, b);
    CHECK(bitwise_equal(snapshot(a.named_parameters()), snapshot(b.named_parameters())));
    CHECK(meta.at("note") == "hello");
    CHECK(meta.at("format") == kModelFormat);

    const std::unique_ptr<GPT> c = load_model_new(path);
    CHECK(c->config() == a.config());
    CHECK(bitwise_equal(snapshot(a.named_parameters()), snapshot(c->named_parameters())));
    CHECK_THROWS_WITH(save_model(path, a, {{"config", "{}"}}), Contains("reserved key 'config'"));
}

TEST_CASE("damaged or mismatched checkpoints are rejected naming file and key, model untouched", "[train]") {
    TempDir tmp;
    GPT source(tiny_config(), 1), target(tiny_config(), 2);
    const Snapshot untouched = snapshot(target.named_parameters());
    const std::string good = tmp.path("good.safetensors");
    save_model(good, source);
    const Metadata meta = load_safetensors(good).metadata;
    auto expect_rejected = [&](const std::string& path, const std::string& key) {
        CHECK_THROWS_WITH(load_model(path, target), Contains(path) && Contains(key));
        CHECK(bitwise_equal(snapshot(target.named_parameters()), untouched));
    };

    NamedTensors params = source.named_parameters();
    SECTION("missing key") {
        NamedTensors less(params.begin(), params.end() - 1);
        save_named(tmp.path("missing.safetensors"), less, meta);
        expect_rejected(tmp.path("missing.safetensors"), "missing tensor '" + params.back().first + "'");
    }
    SECTION("unexpected key") {
        params.emplace_back("blocks.9.extra", Tensor::zeros({2}));
        save_named(tmp.path("extra.safetensors"), params, meta);
        expect_rejected(tmp.path("extra.safetensors"), "unexpected tensor 'blocks.9.extra'");
    }
    SECTION("wrong shape") {
        params[3].second = Tensor::zeros({7});
        save_named(tmp.path("shape.safetensors"), params, meta);
        expect_rejected(tmp.path("shape.safetensors"), "'" + params[3].first + "' has shape [7]");
    }
    SECTION("wrong config") {
        GPTConfig other = tiny_config();
        other.d_ff = 128;
        GPT wider(other, 1);
        save_model(tmp.path("config.safetensors"), wider);
        expect_rejected(tmp.path("config.safetensors"), "field 'd_ff' is 128 in the file but 64");
    }
    SECTION("not a model file") {
        save_named(tmp.path("format.safetensors"), params, {{"format", "something-else"}});
        expect_rejected(tmp.path("format.safetensors"), "'format' is 'something-else'");
    }
    SECTION("truncated file") {
        std::ifstream in(good, std::ios::binary);
        std::stringstream ss;
        ss << in.rdbuf();
        const std::string bytes = ss.str();
        write_file_atomic(tmp.path("cut.safetensors"), bytes.substr(0, bytes.size() - 100));
        // safetensors names the tensor whose bytes run past the end.
        expect_rejected(tmp.path("cut.safetensors"), "truncated");
    }
    SECTION("generic named tensors are checked the same way") {
        const std::string path = tmp.path("named.safetensors");
        save_named(path, {{"a", Tensor::ones({2})}, {"b", Tensor::ones({3})}});
        Tensor a = Tensor::zeros({2}), b = Tensor::zeros({4});
        CHECK_THROWS_WITH(load_named_into(path, {{"a", a}, {"b", b}}), Contains(path) && Contains("'b'"));
        CHECK_THROWS_WITH(load_named_into(path, {{"a", a}}), Contains("unexpected tensor 'b'"));
        CHECK(a.to_vector() == std::vector<float>{0.f, 0.f});
        Tensor b3 = Tensor::zeros({3});
        load_named_into(path, {{"a", a}, {"b", b3}});
        CHECK(b3.to_vector() == std::vector<float>{1.f, 1.f, 1.f});
    }
}

// ---- Trainer ---------------------------------------------------------------------------------

TEST_CASE("Trainer: a tiny model overfits one batch, frozen weights stay bitwise unchanged", "[train]") {
    TempDir tmp;
    GPT model(tiny_config(), 1);
    model.wpe.freeze();
    model.blocks[0]->ln1.freeze();
    const NamedTensors all = model.named_parameters();
    NamedTensors frozen;
    for (auto& [n, t] : all)
        if (!t.requires_grad()) frozen.push_back({n, t});
    REQUIRE(frozen.size() == 3);
    const Snapshot frozen_before = snapshot(frozen), all_before = snapshot(all);

    Rng data(42);
    const Batch batch = random_batch(data, 4);
    AdamWOptions ao;
    ao.lr = 1e-2;
    ao.weight_decay = 0.0;
    AdamW opt(trainable_named_parameters(model), ao);
    TrainOptions o = quiet_options(150);
    o.out_dir = tmp.path("run");
    o.eval_every = 50;
    o.tokens_per_step = 4 * kT;
    Trainer trainer(trainable_named_parameters(model), opt, [&](int64_t, Rng&, const dist::Shard&) { return batch_loss(model, batch); },
                    o, [&](int64_t) {
                        return std::map<std::string, double>{{"loss", batch_loss(model, batch).item()}};
                    });
    const TrainSummary s = trainer.run();
    CHECK(s.completed);
    CHECK(s.steps == 150);
    CHECK(s.losses.size() == 150);
    CHECK(s.losses.front() > 3.0);  // ~ln 32 at init
    CHECK(s.final_loss < 0.05);
    CHECK(s.final_eval.at("loss") < 0.05);
    CHECK(s.tokens_per_s > 0);

    CHECK(bitwise_equal(snapshot(frozen), frozen_before));
    const Snapshot all_after = snapshot(all);
    for (size_t i = 0; i < all.size(); ++i)
        if (all[i].second.requires_grad()) CHECK(all_after[i] != all_before[i]);

    // metrics.csv: a header, one row per step, eval columns filled at steps 50, 100, 150.
    std::ifstream csv(tmp.path("run/metrics.csv"));
    std::string header, line;
    std::getline(csv, header);
    CHECK(header == "step,loss,lr,grad_norm,ms_per_step,tokens_per_s,eval_loss");
    int n_rows = 0, n_eval = 0;
    while (std::getline(csv, line)) {
        ++n_rows;
        n_eval += line.back() != ',';
    }
    CHECK(n_rows == 150);
    CHECK(n_eval == 3);
    const auto jsonl = read_jsonl(tmp.path("run/metrics.jsonl"));
    REQUIRE(jsonl.size() == 150);
    CHECK(jsonl[49].contains("eval_loss"));
    CHECK(jsonl[149]["loss"].get<double>() == s.final_loss);
    CHECK(fs::exists(trainer.checkpoint_path()));
}

TEST_CASE("Trainer: resuming from a mid-run checkpoint reproduces the uninterrupted run bitwise", "[train]") {
    TempDir tmp;
    LRSchedule sched;
    sched.peak_lr = 3e-3;
    sched.warmup_steps = 3;
    sched.total_steps = 12;
    sched.min_ratio = 0.1;

    // Dropout and fresh random batches each step: every generator must come back.
    struct Run {
        GPT model;
        AdamW opt;
        std::optional<int64_t> crash_at;
        Run(uint64_t seed) : model(tiny_config(0.1f), seed), opt(trainable_named_parameters(model)) {}
        TrainSummary train(const std::string& dir, bool resume, const LRSchedule& sched) {
            TrainOptions o = quiet_options(12);
            o.grad_accum = 2;
            o.clip_norm = 0.5;
            o.schedule = sched;
            o.ckpt_every = 4;
            o.out_dir = dir;
            o.resume = resume;
            o.data_seed = 77;
            o.rngs = {{"dropout", &model.dropout_rng()}};
            Trainer t(trainable_named_parameters(model), opt,
                      [&](int64_t step, Rng& data, const dist::Shard& shard) {
                          if (crash_at && step == *crash_at) throw std::runtime_error("simulated crash");
                          const Batch global = random_batch(data, 4);  // split in two micro-batches
                          return batch_loss(model, rows(global, shard.begin(4), shard.end(4)));
                      },
                      o);
            return t.run();
        }
    };

    Run straight(7);
    const TrainSummary full = straight.train(tmp.path("straight"), false, sched);
    REQUIRE(full.losses.size() == 12);

    Run crashed(7);
    crashed.crash_at = 6;  // after the checkpoint at step 4 and two more logged steps
    CHECK_THROWS_WITH(crashed.train(tmp.path("resumed"), false, sched), Contains("simulated crash"));
    clear_tape();
    CHECK(read_jsonl(tmp.path("resumed/metrics.jsonl")).size() == 6);

    Run resumed(99);  // other initial weights: everything must come from the checkpoint
    const TrainSummary rest = resumed.train(tmp.path("resumed"), true, sched);
    CHECK(rest.completed);
    CHECK(rest.start_step == 4);
    REQUIRE(rest.losses.size() == 8);
    for (size_t i = 0; i < 8; ++i) CHECK(rest.losses[i] == full.losses[i + 4]);
    CHECK(bitwise_equal(snapshot(resumed.model.named_parameters()), snapshot(straight.model.named_parameters())));
    CHECK(bitwise_equal(snapshot(resumed.opt.state_dict()), snapshot(straight.opt.state_dict())));

    // Rows past the checkpoint were dropped, so the file reads like one run.
    const auto rows = read_jsonl(tmp.path("resumed/metrics.jsonl"));
    REQUIRE(rows.size() == 12);
    for (size_t i = 0; i < 12; ++i) {
        CHECK(rows[i]["step"].get<int64_t>() == int64_t(i + 1));
        CHECK(rows[i]["loss"].get<double>() == full.losses[i]);
    }

    // A checkpoint past this run's end (from a longer run, or edited) is refused before it loads.
    {
        Rng data;
        fs::create_directories(tmp.path("long"));
        save_training_state(tmp.path("long/checkpoint.safetensors"), trainable_named_parameters(straight.model),
                            straight.opt, {{"data", &data}}, TrainingState{5000, {}});
    }
    Run other(11);
    const Snapshot untouched = snapshot(other.model.named_parameters());
    CHECK_THROWS_WITH(other.train(tmp.path("long"), true, sched),
                      Contains("is at step 5000, past this run's 12 steps"));
    clear_tape();
    CHECK(bitwise_equal(snapshot(other.model.named_parameters()), untouched));
}

TEST_CASE("Trainer: a NaN loss stops before the optimizer steps; the last checkpoint stays loadable", "[train]") {
    TempDir tmp;
    GPT model(tiny_config(), 3);
    AdamW opt(trainable_named_parameters(model));
    TrainOptions o = quiet_options(10);
    o.ckpt_every = 3;
    o.out_dir = tmp.path("run");
    Snapshot at_step6, at_step7;
    Trainer trainer(trainable_named_parameters(model), opt,
                    [&](int64_t step, Rng& data, const dist::Shard&) {
                        if (step == 6) at_step6 = snapshot(model.named_parameters());
                        if (step == 7) at_step7 = snapshot(model.named_parameters());
                        Tensor loss = batch_loss(model, random_batch(data, 2));
                        return step == 7 ? mul_scalar(loss, NAN) : loss;
                    },
                    o);
    const TrainSummary s = trainer.run();
    CHECK(!s.completed);
    CHECK_THAT(s.stop_reason, Contains("step 8 of 10") && Contains("nan") &&
                                  Contains(trainer.checkpoint_path()) && Contains("(step 6)"));
    CHECK(s.steps == 7);
    CHECK(s.losses.size() == 7);
    CHECK(tape_size() == 0);
    CHECK(bitwise_equal(snapshot(model.named_parameters()), at_step7));  // not stepped

    GPT reloaded(tiny_config(), 4);
    AdamW reopt(trainable_named_parameters(reloaded));
    Rng data;
    const TrainingState st = load_training_state(trainer.checkpoint_path(), trainable_named_parameters(reloaded),
                                                 reopt, {{"data", &data}});
    CHECK(st.step == 6);
    CHECK(bitwise_equal(snapshot(reloaded.named_parameters()), at_step6));
    CHECK(read_jsonl(tmp.path("run/metrics.jsonl")).size() == 7);
}

TEST_CASE("Trainer: early stopping ends at the best evaluation's tensors; a resumed run stops alike", "[train]") {
    TempDir tmp;
    // valid_loss after update k: the best is step 3; steps 4 and 5 do not
    // improve on it (3.0 is not < 3.0), so patience 2 stops after step 5 of 12.
    const std::map<int64_t, double> script{{1, 5.0}, {2, 4.0}, {3, 3.0}, {4, 3.0}, {5, 3.5}};
    struct Run {
        GPT model{tiny_config(), 5};
        AdamW opt{trainable_named_parameters(model)};
        std::map<int64_t, Snapshot> seen;  // the weights at each evaluation
        std::optional<int64_t> crash_at;
        TrainSummary train(const std::string& dir, bool resume, const std::map<int64_t, double>& script) {
            TrainOptions o = quiet_options(12);
            o.eval_every = 1;
            o.ckpt_every = 2;
            o.out_dir = dir;
            o.resume = resume;
            o.data_seed = 3;
            o.patience = 2;
            o.early_stop_metric = "valid_loss";
            Trainer t(trainable_named_parameters(model), opt,
                      [&](int64_t step, Rng& data, const dist::Shard&) -> MicroBatchLoss {
                          if (crash_at && step == *crash_at) throw std::runtime_error("simulated crash");
                          return batch_loss(model, random_batch(data, 2));
                      },
                      o,
                      [&](int64_t completed) {
                          seen[completed] = snapshot(model.named_parameters());
                          return std::map<std::string, double>{{"valid_loss", script.at(completed)},
                                                               {"other", double(completed)}};
                      });
            return t.run();
        }
    };
    Run straight;
    const TrainSummary s = straight.train(tmp.path("straight"), false, script);
    CHECK(s.completed);
    CHECK(s.stopped_early);
    CHECK(s.steps == 5);
    CHECK(s.losses.size() == 5);
    CHECK(s.best_step == 3);
    CHECK(s.final_eval == std::map<std::string, double>{{"valid_loss", 3.0}, {"other", 3.0}});
    CHECK(bitwise_equal(snapshot(straight.model.named_parameters()), straight.seen.at(3)));
    CHECK(!bitwise_equal(straight.seen.at(3), straight.seen.at(5)));

    // Killed during update 5: resumes from the checkpoint of step 4 (best copy
    // and count included) and stops after the same update, with the same tensors.
    Run crashed;
    crashed.crash_at = 4;
    CHECK_THROWS_WITH(crashed.train(tmp.path("resumed"), false, script), Contains("simulated crash"));
    clear_tape();
    Run resumed;
    const TrainSummary r = resumed.train(tmp.path("resumed"), true, script);
    CHECK(r.start_step == 4);
    CHECK(r.stopped_early);
    CHECK(r.steps == 5);
    CHECK(r.best_step == 3);
    CHECK(bitwise_equal(snapshot(resumed.model.named_parameters()), straight.seen.at(3)));
    CHECK(bitwise_equal(resumed.seen.at(5), straight.seen.at(5)));

    // Started again after the stop: nothing left to train, the same best tensors.
    Run again;
    const TrainSummary a = again.train(tmp.path("resumed"), true, script);
    CHECK(a.start_step == 5);
    CHECK(a.losses.empty());
    CHECK(a.stopped_early);
    CHECK(bitwise_equal(snapshot(again.model.named_parameters()), straight.seen.at(3)));

    // Patience that runs out only at the last update is no early stop; the run
    // still ends at its best evaluation (step 10).
    Run patient;
    const std::map<int64_t, double> late{{1, 5.0}, {2, 4.0}, {3, 3.0}, {4, 3.0}, {5, 2.5},  {6, 9.0},
                                         {7, 2.0}, {8, 1.0}, {9, 5.0}, {10, 0.5}, {11, 7.0}, {12, 8.0}};
    const TrainSummary p = patient.train(tmp.path("patient"), false, late);
    CHECK(!p.stopped_early);
    CHECK(p.steps == 12);
    CHECK(p.best_step == 10);
    CHECK(bitwise_equal(snapshot(patient.model.named_parameters()), patient.seen.at(10)));
}

TEST_CASE("Trainer: early stopping's options are checked and a missing metric is named", "[train]") {
    GPT model(tiny_config(), 5);
    AdamW opt(trainable_named_parameters(model));
    auto loss_fn = [&](int64_t, Rng& data, const dist::Shard&) -> MicroBatchLoss {
        return batch_loss(model, random_batch(data, 2));
    };
    auto eval_fn = [](int64_t) { return std::map<std::string, double>{{"valid_loss", 1.0}, {"accuracy", 0.5}}; };
    TrainOptions o = quiet_options(3);
    o.patience = 2;
    CHECK_THROWS_WITH(Trainer(trainable_named_parameters(model), opt, loss_fn, o, eval_fn),
                      Contains("patience = 2 needs early_stop_metric"));
    o.early_stop_metric = "valid_loss";
    CHECK_THROWS_WITH(Trainer(trainable_named_parameters(model), opt, loss_fn, o),
                      Contains("patience = 2 needs an eval function"));
    o.patience = -1;
    CHECK_THROWS_WITH(Trainer(trainable_named_parameters(model), opt, loss_fn, o, eval_fn),
                      Contains("patience = -1 must be >= 0"));
    o.patience = 2;
    o.early_stop_metric = "bleu";
    Trainer t(trainable_named_parameters(model), opt, loss_fn, o, eval_fn);
    CHECK_THROWS_WITH(t.run(), Contains("early_stop_metric 'bleu'") && Contains("(accuracy, valid_loss)"));
    clear_tape();
}

TEST_CASE("training-state files are all or nothing and name what is wrong", "[train]") {
    TempDir tmp;
    GPT model(tiny_config(), 1);
    AdamW opt(trainable_named_parameters(model));
    Rng data(5);
    const std::string path = tmp.path("state.safetensors");
    save_training_state(path, trainable_named_parameters(model), opt, {{"data", &data}},
                        TrainingState{3, {{"method", "lora"}}});
    CHECK_THROWS_WITH(save_training_state(path, trainable_named_parameters(model), opt, {},
                                          TrainingState{3, {{"rng.x", "1"}}}),
                      Contains("'rng.x' is reserved"));

    GPT other(tiny_config(), 2);
    other.blocks[0]->freeze();  // fewer tensors than the file holds
    AdamW other_opt(trainable_named_parameters(other));
    const Snapshot before = snapshot(other.named_parameters());
    Rng other_data(9);
    CHECK_THROWS_WITH(load_training_state(path, trainable_named_parameters(other), other_opt, {{"data", &other_data}}),
                      Contains(path) && Contains("unexpected tensor 'optim.blocks.0."));
    CHECK_THROWS_WITH(load_training_state(path, trainable_named_parameters(model), opt, {{"dropout", &other_data}}),
                      Contains(path) && Contains("'rng.dropout' is missing"));
    CHECK(bitwise_equal(snapshot(other.named_parameters()), before));
    CHECK(other_data.state() == 9);

    GPT fresh(tiny_config(), 2);
    AdamW fresh_opt(trainable_named_parameters(fresh));
    const TrainingState st =
        load_training_state(path, trainable_named_parameters(fresh), fresh_opt, {{"data", &other_data}});
    CHECK(st.step == 3);
    CHECK(st.extra.at("method") == "lora");
    CHECK(other_data.state() == data.state());
    CHECK(bitwise_equal(snapshot(fresh.named_parameters()), snapshot(model.named_parameters())));
}
