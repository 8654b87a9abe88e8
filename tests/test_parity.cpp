// PyTorch parity, as llm.c's test_gpt2.c: a tiny GPT and one batch (tests/fixtures/
// parity_model.safetensors, from tools/write_parity_model.cpp) against the values PyTorch
// computes for them in float64 (tests/fixtures/parity_expected.safetensors, from
// tools/torch_reference.py): logits, loss, every parameter's gradient, and the losses of 5
// AdamW steps. Regenerate both with `make fixtures`; this test reads only the committed files.
//
// The batch covers ignored targets (-1) and a right-padded row whose padding keys must never
// be attended: causality hides them from real tokens, so the check is on the logits at the
// padding positions, which are compared with the rest (ignoring the mask gives a logits
// error of 0.28). Errors are relative to the reference's scale: max|ours - ref| / max|ref|.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "autograd/tape.h"
#include "nn/gpt.h"
#include "nn/optim.h"
#include "nn/safetensors.h"

using namespace peftlab;

namespace {

// Relative to the repository root, where `make test` runs the suite.
const char* kModelPath = "tests/fixtures/parity_model.safetensors";
const char* kExpectedPath = "tests/fixtures/parity_expected.safetensors";

constexpr double kLogitsTol = 1e-4;
constexpr double kLossTol = 1e-5;
constexpr double kGradTol = 1e-3;
constexpr double kAdamWLossTol = 1e-4;

StFile load_fixture(const char* path) {
    if (!std::filesystem::exists(path))
        FAIL(fmt::format("parity fixture {} is missing (run the tests from the repository root; "
                         "regenerate with `make fixtures`)",
                         path));
    return load_safetensors(path);
}

const StTensor& get(const StFile& f, const char* path, const std::string& name) {
    auto it = f.tensors.find(name);
    if (it == f.tensors.end()) FAIL(fmt::format("{}: no tensor '{}'", path, name));
    return it->second;
}

// max|a - b| / max|b| over a's elements; a and b must hold the same number of values.
double rel_err(const float* a, const std::vector<float>& b) {
    double diff = 0, scale = 0;
    for (size_t i = 0; i < b.size(); ++i) {
        diff = std::max(diff, std::abs(double(a[i]) - double(b[i])));
        scale = std::max(scale, std::abs(double(b[i])));
    }
    return diff / scale;
}

std::vector<int32_t> ids(const StTensor& t) {
    std::vector<int32_t> out(t.data.size());
    std::transform(t.data.begin(), t.data.end(), out.begin(), [](float x) { return int32_t(x); });
    return out;
}

}  // namespace

TEST_CASE("GPT matches PyTorch: logits, loss, every gradient and 5 AdamW steps", "[parity]") {
    const StFile model_file = load_fixture(kModelPath);
    const StFile expected = load_fixture(kExpectedPath);

    auto cfg_it = model_file.metadata.find("config");
    if (cfg_it == model_file.metadata.end()) FAIL(fmt::format("{}: metadata has no 'config'", kModelPath));
    const GPTConfig cfg = GPTConfig::from_json(nlohmann::json::parse(cfg_it->second));
    GPT model(cfg, /*seed=*/0);  // every parameter is overwritten below

    // Parameters by name; the file must hold exactly the model's parameters plus the batch.
    auto params = model.named_parameters();
    for (auto& [name, p] : params) {
        const StTensor& t = get(model_file, kModelPath, name);
        INFO(name);
        REQUIRE(t.shape == p.shape());
        std::copy(t.data.begin(), t.data.end(), p.data());
    }
    REQUIRE(model_file.tensors.size() == params.size() + 3);

    const StTensor& tokens = get(model_file, kModelPath, "input.tokens");
    REQUIRE(tokens.shape.size() == 2);
    ModelInput in;
    in.B = tokens.shape[0];
    in.T = tokens.shape[1];
    in.tokens = ids(tokens);
    for (float v : get(model_file, kModelPath, "input.valid").data) in.valid.push_back(v != 0.f);
    const std::vector<int32_t> targets = ids(get(model_file, kModelPath, "input.targets"));

    // ---- forward and loss ----
    Tensor logits = model.forward(in);
    const StTensor& ref_logits = get(expected, kExpectedPath, "logits");
    REQUIRE(logits.shape() == ref_logits.shape);
    const double logits_err = rel_err(logits.data(), ref_logits.data);

    Tensor loss = lm_loss(logits, targets);
    const std::vector<float>& ref_loss = get(expected, kExpectedPath, "loss").data;
    const double loss_err = rel_err(loss.data(), ref_loss);

    // ---- gradients ----
    backward(loss);
    double worst_grad_err = 0, k_bias_ratio = 0;
    std::string worst_grad;
    for (auto& [name, p] : params) {
        const StTensor& ref = get(expected, kExpectedPath, "grad." + name);
        INFO("grad." << name);
        REQUIRE(ref.shape == p.shape());
        const Tensor g = p.grad();
        if (name.ends_with("attn.k_proj.bias")) {
            // Adding b to every key adds q.b to all of a query's scores, which softmax
            // ignores: this gradient is zero in exact arithmetic and both sides hold only
            // rounding noise, so it is held to the scale of the k_proj weight's gradient.
            std::string w = name.substr(0, name.size() - 4) + "weight";
            const std::vector<float>& ref_w = get(expected, kExpectedPath, "grad." + w).data;
            double scale = 0, ours = 0;
            for (float x : ref_w) scale = std::max(scale, double(std::abs(x)));
            for (int64_t i = 0; i < g.numel(); ++i) ours = std::max(ours, double(std::abs(g.data()[i])));
            CHECK(ours <= kGradTol * scale);
            k_bias_ratio = std::max(k_bias_ratio, ours / scale);
            continue;
        }
        const double err = rel_err(g.data(), ref.data);
        CHECK(err <= kGradTol);
        if (err > worst_grad_err) {
            worst_grad_err = err;
            worst_grad = name;
        }
    }
    REQUIRE(expected.tensors.size() == params.size() + 3);  // grads + logits, loss, adamw_losses

    // ---- AdamW: the first step uses the gradients above, as the reference does ----
    // Hyperparameters as the reference recorded them: {"lr", "betas", "eps", "weight_decay", "steps"}.
    auto adamw_it = expected.metadata.find("adamw");
    if (adamw_it == expected.metadata.end()) FAIL(fmt::format("{}: metadata has no 'adamw'", kExpectedPath));
    const nlohmann::json hp = nlohmann::json::parse(adamw_it->second);
    const std::vector<float>& ref_adamw = get(expected, kExpectedPath, "adamw_losses").data;
    REQUIRE(ref_adamw.size() == hp.at("steps").get<size_t>());
    AdamWOptions opts;
    opts.lr = hp.at("lr").get<double>();
    opts.beta1 = hp.at("betas").at(0).get<double>();
    opts.beta2 = hp.at("betas").at(1).get<double>();
    opts.eps = hp.at("eps").get<double>();
    opts.weight_decay = hp.at("weight_decay").get<double>();
    AdamW opt(trainable_named_parameters(model), opts);
    std::vector<float> adamw_losses;  // loss after each step
    for (size_t step = 0; step < ref_adamw.size(); ++step) {
        opt.step();
        opt.zero_grad();
        Tensor step_loss = lm_loss(model.forward(in), targets);
        backward(step_loss);
        adamw_losses.push_back(step_loss.item());
    }
    const double adamw_err = rel_err(adamw_losses.data(), ref_adamw);

    fmt::print("parity vs PyTorch (float64): logits {:.2e}, loss {:.2e}, worst gradient {:.2e} ({}), "
               "AdamW losses {:.2e}; k_proj.bias gradient (0 in exact arithmetic) {:.2e} of k_proj.weight's\n",
               logits_err, loss_err, worst_grad_err, worst_grad, adamw_err, k_bias_ratio);
    fmt::print("  loss {:.6f} (torch {:.6f}); after AdamW steps {:.6f} (torch {:.6f})\n", loss.item(),
               ref_loss[0], fmt::join(adamw_losses, " "), fmt::join(ref_adamw, " "));
    CHECK(logits_err <= kLogitsTol);
    CHECK(loss_err <= kLossTol);
    CHECK(adamw_err <= kAdamWLossTol);
}

TEST_CASE("GPT::loss (fused LM head + cross-entropy) matches PyTorch: loss and every gradient",
          "[parity][fused_ce]") {
    const StFile model_file = load_fixture(kModelPath);
    const StFile expected = load_fixture(kExpectedPath);
    auto cfg_it = model_file.metadata.find("config");
    if (cfg_it == model_file.metadata.end()) FAIL(fmt::format("{}: metadata has no 'config'", kModelPath));
    GPT model(GPTConfig::from_json(nlohmann::json::parse(cfg_it->second)), /*seed=*/0);
    auto params = model.named_parameters();
    for (auto& [name, p] : params) {
        const StTensor& t = get(model_file, kModelPath, name);
        REQUIRE(t.shape == p.shape());
        std::copy(t.data.begin(), t.data.end(), p.data());
    }
    const StTensor& tokens = get(model_file, kModelPath, "input.tokens");
    ModelInput in;
    in.B = tokens.shape[0];
    in.T = tokens.shape[1];
    in.tokens = ids(tokens);
    for (float v : get(model_file, kModelPath, "input.valid").data) in.valid.push_back(v != 0.f);
    const std::vector<int32_t> targets = ids(get(model_file, kModelPath, "input.targets"));

    Tensor loss = model.loss(in, targets);
    CHECK(rel_err(loss.data(), get(expected, kExpectedPath, "loss").data) <= kLossTol);
    backward(loss);
    for (auto& [name, p] : params) {
        if (name.ends_with("attn.k_proj.bias")) continue;  // rounding noise only (see above)
        INFO("grad." << name);
        CHECK(rel_err(p.grad().data(), get(expected, kExpectedPath, "grad." + name).data) <= kGradTol);
    }
}
