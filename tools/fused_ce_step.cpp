// One prefix-tuning training step (forward, loss, backward, AdamW) with the LM
// head and the loss fused (GPT::loss, autograd/ops_fused.h) or unfused
// (lm_loss(GPT::forward)), for the README's before/after numbers.
//
//   fused_ce_step --mode fused|unfused [--batch 8] [--seq 512] [--vocab 50257] [--d-model 768]
//                 [--layers 12] [--heads 12] [--prefix-len 16] [--steps 3] [--method prefix]
//
// Defaults: the GPT-2 small shape. One warm-up step, then --steps measured
// steps; prints the median ms per step, the peak tracked bytes of a measured
// step above what was alive before it (activations, logits, gradients in
// flight: autograd's mem:: counters), the process's peak RSS, the loss and
// the FLOP totals (equal for both modes). Run each mode in its own process so
// that peak RSS is that mode's.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include <cxxopts.hpp>
#include <fmt/format.h>

#include "autograd/flops.h"
#include "autograd/tape.h"
#include "experiments/lib/flags.h"
#include "nn/gpt.h"
#include "nn/optim.h"
#include "peft/registry.h"

using namespace peftlab;

int main(int argc, char** argv) {
    try {
        cxxopts::Options o("fused_ce_step", "time one prefix-tuning step with the LM head + loss fused or not");
        o.add_options()("mode", "fused or unfused", cxxopts::value<std::string>())(
            "batch", "B", cxxopts::value<int64_t>()->default_value("8"))(
            "seq", "T", cxxopts::value<int64_t>()->default_value("512"))(
            "vocab", "V", cxxopts::value<int64_t>()->default_value("50257"))(
            "d-model", "C", cxxopts::value<int64_t>()->default_value("768"))(
            "layers", "L", cxxopts::value<int>()->default_value("12"))(
            "heads", "H", cxxopts::value<int>()->default_value("12"))(
            "prefix-len", "prefix vectors per layer", cxxopts::value<int64_t>()->default_value("16"))(
            "method", "the PEFT method trained", cxxopts::value<std::string>()->default_value("prefix"))(  // method-names: the README's measurement, --method overrides
            "steps", "measured steps", cxxopts::value<int>()->default_value("3"))(
            "help", "show this help");
        auto a = flags::parse(o, argc, argv);
        flags::configure_threads(std::nullopt);  // PEFTLAB_THREADS, else all cores
        if (!a.count("mode")) throw std::invalid_argument("--mode: required (fused or unfused)");
        const std::string mode = a["mode"].as<std::string>();
        if (mode != "fused" && mode != "unfused")
            throw std::invalid_argument(fmt::format("--mode: '{}' is not fused or unfused", mode));
        const int steps = a["steps"].as<int>();
        if (steps < 1) throw std::invalid_argument(fmt::format("--steps: {} must be >= 1", steps));
        GPTConfig cfg;
        cfg.vocab = a["vocab"].as<int64_t>();
        cfg.d_model = a["d-model"].as<int64_t>();
        cfg.n_layers = a["layers"].as<int>();
        cfg.n_heads = a["heads"].as<int>();
        cfg.d_ff = 4 * cfg.d_model;
        cfg.max_seq = 1024;
        cfg.tie_embeddings = true;  // as GPT-2
        const int64_t B = a["batch"].as<int64_t>(), T = a["seq"].as<int64_t>();
        if (B < 1 || T < 1 || T > cfg.max_seq)
            throw std::invalid_argument(fmt::format("--batch {} / --seq {}: need B >= 1, 1 <= T <= 1024", B, T));
        GPT model(cfg, 1);
        peft::AdapterOptions ao;
        ao.n = a["prefix-len"].as<int64_t>();
        auto adapter = peft::make_adapter(a["method"].as<std::string>(), ao);
        adapter->activate(model);
        AdamW opt(adapter->parameters());
        Rng rng(7);
        ModelInput in;
        in.B = B;
        in.T = T;
        std::vector<int32_t> targets;
        for (int64_t i = 0; i < B * T; ++i) {
            in.tokens.push_back(int32_t(rng.below(uint32_t(cfg.vocab))));
            targets.push_back(int32_t(rng.below(uint32_t(cfg.vocab))));
        }
        model.train();
        float loss_value = 0.f;
        auto step = [&] {
            opt.zero_grad();
            Tensor loss = mode == "fused" ? model.loss(in, targets) : lm_loss(model.forward(in), targets);
            loss_value = loss.item();
            backward(loss);
            opt.step();
        };
        step();  // warm-up: gradients and AdamW moments allocated, free list filled
        std::vector<double> ms;
        int64_t peak = 0;
        flops::Counts counts{};
        for (int s = 0; s < steps; ++s) {
            const int64_t before = mem::current_bytes();
            mem::reset_peak();
            flops::reset();
            const auto t0 = std::chrono::steady_clock::now();
            step();
            ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
            peak = std::max(peak, mem::peak_bytes() - before);
            counts = flops::totals();
        }
        std::sort(ms.begin(), ms.end());
        rusage ru{};
        getrusage(RUSAGE_SELF, &ru);
        fmt::print("mode {} B {} T {} V {} C {} L {}: median {:.0f} ms/step (min {:.0f}, max {:.0f}, {} steps), "
                   "step peak tracked {:.1f} MB above {:.1f} MB alive, peak RSS {:.1f} MB, loss {:.6f}, "
                   "GFLOP fwd {:.3f} dx {:.3f} dw {:.3f} opt {:.6f}\n",
                   mode, B, T, cfg.vocab, cfg.d_model, cfg.n_layers, ms[ms.size() / 2], ms.front(), ms.back(),
                   steps, double(peak) / 1e6, double(mem::current_bytes()) / 1e6, double(ru.ru_maxrss) / 1e3,
                   loss_value, double(counts[0]) / 1e9, double(counts[1]) / 1e9, double(counts[2]) / 1e9,
                   double(counts[3]) / 1e9);
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "fused_ce_step: %s\n", e.what());
        return 1;
    }
}
