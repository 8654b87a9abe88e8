// F16 weights (autograd/half.h, GPT::set_weights_f16): the conversion against
// IEEE 754 binary16's encodings and the F16C instruction, linear_half against
// linear on the rounded weight, and the model against its F32 twin whose
// weights were rounded the same way.
#include <catch2/catch.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "autograd/half.h"
#include "autograd/ops.h"
#include "autograd/tape.h"
#include "nn/generate.h"
#include "nn/gpt.h"
#include "tests/testing.h"

using namespace peftlab;
using namespace peftlab::testing;

TEST_CASE("float_to_half gives IEEE 754 binary16's encodings, ties to even", "[half]") {
    // Encodings from the binary16 format (IEEE 754-2008, 3.6): 1 sign, 5
    // exponent bits (bias 15), 10 mantissa bits; subnormals m * 2^-24.
    CHECK(float_to_half(0.f) == 0x0000);
    CHECK(float_to_half(-0.f) == 0x8000);
    CHECK(float_to_half(1.f) == 0x3c00);
    CHECK(float_to_half(-2.f) == 0xc000);
    CHECK(float_to_half(0.5f) == 0x3800);
    CHECK(float_to_half(0.1f) == 0x2e66);              // 0.0999755859375
    CHECK(float_to_half(0x3p-26f) == 0x0001);          // 0.75 of the smallest subnormal: up
    CHECK(float_to_half(65504.f) == 0x7bff);           // the largest finite half
    CHECK(float_to_half(65519.996f) == 0x7bff);        // below the midpoint to 2^16
    CHECK(float_to_half(65520.f) == 0x7c00);           // the midpoint: ties to even, which is infinity
    CHECK(float_to_half(1e10f) == 0x7c00);
    CHECK(float_to_half(-std::numeric_limits<float>::infinity()) == 0xfc00);
    CHECK(float_to_half(0x1p-14f) == 0x0400);          // the smallest normal
    CHECK(float_to_half(0x1p-24f) == 0x0001);          // the smallest subnormal
    CHECK(float_to_half(0x1p-25f) == 0x0000);          // halfway to 2^-24: ties to even (0)
    CHECK(float_to_half(0x3p-25f) == 0x0002);          // halfway between 1 and 2 units: even (2)
    CHECK(float_to_half(1.f + 0x1p-11f) == 0x3c00);    // halfway between 1 and 1 + 2^-10: even
    CHECK(float_to_half(1.f + 0x3p-11f) == 0x3c02);    // halfway between 1 + 2^-10 and 1 + 2^-9: even
    CHECK(float_to_half(1.f + 0x1p-11f + 0x1p-20f) == 0x3c01);  // just past halfway: up
    CHECK(float_to_half(0x1.ffep-15f) == 0x0400);      // a subnormal that rounds up to the smallest normal
    CHECK(float_to_half(2047.f / 1024.f * 0x1p-1f) == 0x3bff);  // 1 - 2^-11 exactly representable
    const uint16_t nan = float_to_half(std::numeric_limits<float>::quiet_NaN());
    CHECK((nan & 0x7c00) == 0x7c00);
    CHECK((nan & 0x03ff) != 0);

    // Every half converts to a float and back to itself (NaNs: to a NaN).
    for (uint32_t h = 0; h < 0x10000; ++h) {
        const float f = half_to_float(uint16_t(h));
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) {
            REQUIRE(std::isnan(f));
            continue;
        }
        REQUIRE(float_to_half(f) == h);
    }
    CHECK(half_to_float(0x0001) == 0x1p-24f);
    CHECK(half_to_float(0x7bff) == 65504.f);
    CHECK(half_to_float(0xfc00) == -std::numeric_limits<float>::infinity());
}

#if defined(__F16C__)
TEST_CASE("float_to_half and half_to_float agree with the F16C instructions", "[half]") {
    // The CPU's vcvtps2ph (round to nearest even) and vcvtph2ps: an independent
    // implementation of the same IEEE conversion, on random bit patterns
    // covering every exponent, and on every half.
    Rng rng(7);
    for (int i = 0; i < 1 << 20; ++i) {
        const uint32_t bits = uint32_t(rng.below(1u << 16)) << 16 | uint32_t(rng.below(1u << 16));
        const float f = std::bit_cast<float>(bits);
        if (std::isnan(f)) continue;
        const uint16_t hw = uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
        if (float_to_half(f) != hw) FAIL(fmt::format("float bits {:#010x}: ours {:#06x}, F16C {:#06x}", bits, float_to_half(f), hw));
    }
    for (uint32_t h = 0; h < 0x10000; ++h) {
        const float hw = _cvtsh_ss(uint16_t(h));
        if (std::isnan(hw)) continue;
        REQUIRE(std::bit_cast<uint32_t>(half_to_float(uint16_t(h))) == std::bit_cast<uint32_t>(hw));
    }
}
#endif

TEST_CASE("linear_half equals linear on the weight rounded to F16, bit for bit", "[half]") {
    Rng rng(3);
    // (out, in): a weight the few-row kernel takes (out * in >= 2^16; tails
    // past the vector width and a last partial block of 4 rows), and a small
    // one that goes to BLAS. Row counts on both sides of the few-row limit.
    for (const auto& [outf, in] : {std::pair<int64_t, int64_t>{303, 259}, {2050, 64}, {40, 24}}) {
        const Tensor w = Tensor::normal({outf, in}, rng, 0.f, 0.5f);
        const Tensor bias = Tensor::normal({outf}, rng, 0.f, 0.5f);
        const HalfMatrix h = HalfMatrix::from(w);
        const Tensor rounded = h.to_float();
        for (const int64_t rows : {1, 2, 3, 5, 8, 13, 16, 17, 40}) {
            const Tensor x = Tensor::normal({rows, in}, rng, 0.f, 1.f);
            INFO("weight [" << outf << ", " << in << "], " << rows << " rows");
            CHECK(bitwise_equal(linear_half(x, h, bias), linear(x, rounded, bias)));
            CHECK(bitwise_equal(linear_half(x, h), linear(x, rounded)));
        }
        const Tensor x3 = Tensor::normal({2, 3, in}, rng, 0.f, 1.f);  // leading dims kept
        const Tensor y3 = linear_half(x3, h, bias);
        CHECK(y3.shape() == Shape{2, 3, outf});
        CHECK(bitwise_equal(y3, linear(x3, rounded, bias)));
    }
}

TEST_CASE("linear_half refuses mismatched shapes and inputs that need a gradient", "[half]") {
    Rng rng(4);
    const HalfMatrix h = HalfMatrix::from(Tensor::normal({8, 6}, rng, 0.f, 1.f));
    CHECK_THROWS_WITH(linear_half(Tensor::zeros({2, 5}), h), Catch::Contains("[2, 5]") && Catch::Contains("[8, 6]"));
    CHECK_THROWS_WITH(linear_half(Tensor::zeros({2, 6}), h, Tensor::zeros({7})), Catch::Contains("bias [7]"));
    CHECK_THROWS_WITH(HalfMatrix::from(Tensor::zeros({2, 3, 4})), Catch::Contains("[2, 3, 4]"));
    Tensor x = Tensor::zeros({2, 6});
    x.set_requires_grad(true);
    CHECK_THROWS_WITH(linear_half(x, h), Catch::Contains("NoGradGuard"));
    NoGradGuard no_grad;
    CHECK(linear_half(x, h).shape() == Shape{2, 8});
}

namespace {
// Weights the few-row kernel takes: C * F = 128 * 512 and V * C >= 2^16.
GPTConfig f16_config(bool tied) {
    GPTConfig c = small_gpt(600, 48);  // 2 layers, 4 heads
    c.d_model = 128;
    c.d_ff = 512;
    c.tie_embeddings = tied;
    return c;
}

// The F32 model that `model` with F16 weights should equal: every Linear
// weight rounded to F16, the embeddings not. A tied head becomes a separate
// head holding the rounded wte, since the embedding itself stays F32.
std::unique_ptr<GPT> rounded_twin(const GPT& model) {
    GPTConfig cfg = model.config();
    cfg.tie_embeddings = false;
    auto twin = std::make_unique<GPT>(cfg, 0);
    const NamedTensors ours = model.named_parameters();
    for (auto& [name, t] : twin->named_parameters()) {
        const auto it = std::find_if(ours.begin(), ours.end(), [&](const auto& p) { return p.first == name; });
        const Tensor src = it != ours.end() ? it->second : model.wte.weight;  // head.weight of a tied model: wte
        REQUIRE(src.shape() == t.shape());
        const bool rounds = t.ndim() == 2 && name != "wte.weight" && name != "wpe.weight";
        const Tensor v = rounds ? HalfMatrix::from(src).to_float() : src;
        std::copy(v.data(), v.data() + v.numel(), Tensor(t).data());
    }
    return twin;
}
}  // namespace

TEST_CASE("GPT with F16 weights equals its F32 twin with rounded weights, bit for bit", "[half]") {
    for (const bool tied : {false, true}) {
        INFO((tied ? "tied head" : "separate head"));
        const GPTConfig cfg = f16_config(tied);
        auto model = sharp_model(cfg, 11, 3.f);
        auto twin = rounded_twin(*model);
        model->eval();
        twin->eval();
        Rng rng(5);
        const std::vector<std::vector<int32_t>> prompts = {random_tokens(rng, 9, cfg.vocab),
                                                           random_tokens(rng, 4, cfg.vocab),
                                                           random_tokens(rng, 13, cfg.vocab)};
        NoGradGuard no_grad;
        const Tensor f32 = model->forward(padded_batch(prompts, true));
        model->set_weights_f16(true);
        REQUIRE(model->weights_f16());
        const Tensor f16 = model->forward(padded_batch(prompts, true));
        CHECK(bitwise_equal(f16, twin->forward(padded_batch(prompts, true))));
        CHECK_FALSE(bitwise_equal(f16, f32));  // the rounding is seen...
        float diff = 0.f, scale = 0.f;  // ...and small
        for (int64_t i = 0; i < f32.numel(); ++i) {
            diff = std::max(diff, std::fabs(f16.data()[i] - f32.data()[i]));
            scale = std::max(scale, std::fabs(f32.data()[i]));
        }
        CHECK(diff < 0.01f * scale);
        // Decoding: every step is a few-row GEMM on F16 weights.
        GenerateOptions opts;
        opts.max_new_tokens = 12;
        CHECK(generate(*model, prompts, opts) == generate(*twin, prompts, opts));
        // The loss under F16 is the twin's (unfused there, fused here: equal to rounding).
        const ModelInput in = padded_batch(prompts, false);
        std::vector<int32_t> targets(size_t(in.B * in.T), -1);
        for (size_t i = 0; i + 1 < targets.size(); ++i) targets[i] = in.valid[i + 1] ? in.tokens[i + 1] : -1;
        CHECK(model->loss(in, targets).item() == Approx(twin->loss(in, targets).item()).epsilon(1e-5));
        model->set_weights_f16(false);
        CHECK(bitwise_equal(model->forward(padded_batch(prompts, true)), f32));
    }
}

// Once, a weight above 65504 became infinity in F16, and every logit NaN.
TEST_CASE("F16 weights refuse an element outside binary16's range, naming it; the model stays F32", "[half]") {
    CHECK(first_outside_half(std::vector<float>{1.f, -65504.f, 65519.f}.data(), 3) == 3);
    CHECK(first_outside_half(std::vector<float>{1.f, -65520.f, 2.f}.data(), 3) == 1);
    CHECK(first_outside_half(std::vector<float>{NAN}.data(), 1) == 0);
    auto model = sharp_model(f16_config(false), 2, 3.f);
    const ModelInput in = single_row({1, 2, 3});
    model->blocks[1]->mlp.fc.weight.data()[5 * model->config().d_model + 2] = 1e6f;
    CHECK_THROWS_WITH(model->set_weights_f16(true), Catch::Contains("blocks.1.mlp.fc.weight") &&
                                                        Catch::Contains("element (5, 2) = 1000000") &&
                                                        Catch::Contains("outside F16's range"));
    CHECK_FALSE(model->weights_f16());
    CHECK(model->blocks[0]->attn.q_proj.weight_f16 == nullptr);  // converted before the bad one, not installed
    CHECK(model->loss(in, {2, 3, -1}).item() > 0.f);  // still F32: grad mode is allowed
}

TEST_CASE("GPT with F16 weights refuses a forward that records gradients", "[half]") {
    auto model = sharp_model(f16_config(false), 2, 3.f);
    model->set_weights_f16(true);
    const ModelInput in = single_row({1, 2, 3});
    CHECK_THROWS_AS(model->forward(in), std::logic_error);
    CHECK_THROWS_WITH(model->loss(in, {2, 3, -1}), Catch::Contains("set_weights_f16") && Catch::Contains("NoGradGuard"));
    model->set_weights_f16(false);
    CHECK(model->loss(in, {2, 3, -1}).item() > 0.f);
}
