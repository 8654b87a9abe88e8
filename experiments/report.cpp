// report: what each PEFT method costs — trainable parameters (counted and by
// formula), memory, training-step FLOPs by phase (analytic and measured on one
// real step), inference FLOPs per token with prefixes cached, and where the
// trainable tensors and gradients sit, layer by layer.
//
// The point it makes legible: a frozen base saves the dW GEMMs and the
// optimizer state, but the backward still carries dX through every layer
// between the loss and the lowest trainable one.
//
// With --preset (GPT-2 sizes) everything is analytic: nothing is allocated.
#include <algorithm>
#include <chrono>
#include <map>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <cxxopts.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "autograd/threads.h"
#include "experiments/lib/flags.h"
#include "experiments/lib/harness.h"
#include "autograd/tape.h"
#include "nn/hf_gpt2.h"
#include "nn/optim.h"
#include "nn/presets.h"
#include "nn/safetensors.h"
#include "peft/registry.h"
#include "peft/report.h"

using namespace peftlab;
using namespace peftlab::peft;
using peftlab::flags::int_flag;

namespace {

// The footer's reference: the registered method that trains the base's own weights (full fine-tuning).
std::string reference_method() {
    for (const std::string& m : method_names())
        if (make_adapter(m)->changes_base()) return m;
    throw std::logic_error("report: no registered method trains the base (the footer's reference)");
}

struct Args {
    std::string preset;  // "" = the small config, measured
    std::string base;    // a Hugging Face GPT-2 directory: its config.json's dimensions, measured
    GPTConfig cfg;
    ReportSettings settings;
    AdapterOptions options;
    std::vector<std::string> methods;
    std::string out;
    std::optional<int64_t> threads;  // --threads; none: PEFTLAB_THREADS, else all cores
    // --scale-model: the data-parallel step-time model (print_scale_model).
    bool scale_model = false;
    int64_t scale_batch = 64;     // global batch rows of the GPT-2 shapes' modelled update
    int64_t scale_seq = 1024;     // their tokens per row
    int max_ranks = 64;
    double latency_us = 10.0;     // per ring step
    double rank_gflops = 0.0;     // > 0: assume this per-rank rate instead of measuring it
};

Args parse_args(int argc, char** argv) {
    cxxopts::Options o("report", "Per-method parameter, memory and FLOP report for PEFT methods");
    // clang-format off
    o.add_options()
        ("h,help", "print this help")
        ("preset", "GPT-2 dimensions, analytic numbers only: gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                   "(dimension flags given with it override it)", cxxopts::value<std::string>()->default_value(""))
        ("base", "Hugging Face GPT-2 directory: measure its dimensions (config.json; shape-only numbers, random "
                 "weights for the gradient norms); adapters use positions hf", cxxopts::value<std::string>()->default_value(""))
        ("vocab", "vocabulary size V", cxxopts::value<std::string>()->default_value("256"))
        ("d-model", "model width d", cxxopts::value<std::string>()->default_value("256"))
        ("layers", "number of layers L", cxxopts::value<std::string>()->default_value("4"))
        ("heads", "attention heads H", cxxopts::value<std::string>()->default_value("4"))
        ("d-ff", "MLP hidden width F", cxxopts::value<std::string>()->default_value("1024"))
        ("seq", "T: tokens per row in the training step, and the decoding context (max_seq = T "
                "without a preset)", cxxopts::value<std::string>()->default_value("128"))
        ("batch", "B: rows per training step", cxxopts::value<std::string>()->default_value("16"))
        ("prefix-len", "n: prompt tokens / prefix vectors per layer", cxxopts::value<std::string>()->default_value("16"))
        ("adapter-layers", "layers that carry prefixes / LoRA / BitFit: all, top:k, bottom:k or 0,2,3",
            cxxopts::value<std::string>()->default_value("all"))
        ("methods", "comma-separated PEFT methods, each optionally with settings of its own options, "
                    "METHOD:KEY=VALUE[:KEY=VALUE] (e.g. lora:r=4, prefix:reparam=true); default: every registered method",
            cxxopts::value<std::string>()->default_value(""))
        ("out", "output directory (report.json, report.csv)", cxxopts::value<std::string>()->default_value("runs/report"))
        ("threads", "threads for OpenBLAS and OpenMP (0 = all cores; default: PEFTLAB_THREADS, else all cores; capped "
                    "at the cores)", cxxopts::value<std::string>())
        ("seed", "seed of the base weights, adapter init and batch", cxxopts::value<std::string>()->default_value("0"))
        ("recompute", "blocks with activation recomputation (all, none, top:k, bottom:k, 0,2): the step's FLOPs gain "
                      "phase recompute, and a table sets the measured activation peak and FLOPs against the same "
                      "step without", cxxopts::value<std::string>()->default_value("none"))
        ("scale-model", "also model data-parallel step time on 1..--max-ranks ranks for the GPT-2 small, medium and XL "
                        "shapes (compute from each method's throughput measured here on the measured config, a ring "
                        "all-reduce at 10 and 100 Gbit/s): scale_model.{md,json}")
        ("scale-batch", "global batch rows of the modelled GPT-2 update", cxxopts::value<std::string>()->default_value("64"))
        ("scale-seq", "tokens per row of the modelled GPT-2 update", cxxopts::value<std::string>()->default_value("1024"))
        ("max-ranks", "largest rank count modelled", cxxopts::value<std::string>()->default_value("64"))
        ("latency-us", "all-reduce latency per ring step, microseconds", cxxopts::value<std::string>()->default_value("10"))
        ("rank-gflops", "scale model: assume every rank computes this many GFLOP/s (e.g. 100000 for an accelerator) "
                        "instead of measuring this machine (0)", cxxopts::value<std::string>()->default_value("0"));
    // clang-format on
    const cxxopts::ParseResult r = flags::parse(o, argc, argv);

    Args a;
    a.preset = r["preset"].as<std::string>();
    if (!a.preset.empty()) {
        try {
            a.cfg = model_preset(a.preset);
        } catch (const std::invalid_argument& e) {
            throw std::invalid_argument(std::string("--preset: ") + e.what());
        }
    }
    // Without a preset every dimension flag applies (its default is the small
    // config); with one, only those given on the command line.
    a.base = r["base"].as<std::string>();
    if (!a.base.empty()) {
        if (!a.preset.empty()) throw std::invalid_argument("--base and --preset exclude each other");
        a.cfg = load_hf_gpt2_config(a.base);
        a.options.positions = "hf";
    }
    auto given = [&](const char* f) { return (a.preset.empty() && a.base.empty()) || r.count(f) > 0; };
    if (given("vocab")) a.cfg.vocab = int_flag(r, "vocab", 1);
    if (given("d-model")) a.cfg.d_model = int_flag(r, "d-model", 1);
    if (given("layers")) {
        // The report prints a per-layer map (one row per block): a bound on it, not on GPT-2's 48.
        constexpr int64_t kMaxLayers = 100000;
        const int64_t L = int_flag(r, "layers", 1);
        if (L > kMaxLayers)
            throw std::invalid_argument(fmt::format(
                "--layers: {} is more than the {} this report tabulates (one row per layer; GPT-2 XL has 48)", L,
                kMaxLayers));
        a.cfg.n_layers = int(L);
    }
    if (given("heads")) a.cfg.n_heads = int(int_flag(r, "heads", 1, std::numeric_limits<int>::max()));
    if (given("d-ff")) a.cfg.d_ff = int_flag(r, "d-ff", 1);
    if (a.cfg.d_model % a.cfg.n_heads != 0)
        throw std::invalid_argument(
            fmt::format("--heads: {} does not divide --d-model {}", a.cfg.n_heads, a.cfg.d_model));
    a.settings.seq = int_flag(r, "seq", 2);
    if (a.preset.empty() && a.base.empty()) a.cfg.max_seq = a.settings.seq;
    else if (a.settings.seq > a.cfg.max_seq)
        throw std::invalid_argument(
            fmt::format("--seq: {} exceeds the base's max_seq {}", a.settings.seq, a.cfg.max_seq));
    a.settings.batch = int_flag(r, "batch", 1);
    a.options.n = int_flag(r, "prefix-len", 0);
    a.options.layers = r["adapter-layers"].as<std::string>();
    try {
        parse_layers(a.options.layers, a.cfg.n_layers);
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(std::string("--adapter-layers: ") + e.what());
    }
    if (r.count("threads")) a.threads = int_flag(r, "threads", 0);
    a.settings.seed = uint64_t(int_flag(r, "seed", 0));
    a.settings.recompute = r["recompute"].as<std::string>();
    a.out = r["out"].as<std::string>();
    if (a.out.empty()) throw std::invalid_argument("--out: '' is not a directory name");
    a.scale_model = r.count("scale-model") > 0;
    a.scale_batch = int_flag(r, "scale-batch", 1);
    a.scale_seq = int_flag(r, "scale-seq", 2);
    a.max_ranks = int(std::min<int64_t>(int_flag(r, "max-ranks", 1), 1 << 16));
    for (auto [flag, value] : {std::pair{"latency-us", &a.latency_us}, std::pair{"rank-gflops", &a.rank_gflops}}) {
        *value = flags::real_flag(r, flag);
        if (*value < 0) throw std::invalid_argument(fmt::format("--{}: {} must be >= 0", flag, *value));
    }
    if (a.scale_model && !a.preset.empty())
        throw std::invalid_argument("--scale-model measures throughput on the measured config: drop --preset");
    if (a.scale_model && a.scale_batch < a.max_ranks)
        throw std::invalid_argument(fmt::format("--scale-batch {} is smaller than --max-ranks {}: a rank needs a row",
                                                a.scale_batch, a.max_ranks));

    for (const flags::MethodEntry& e : flags::method_entries("--methods", r["methods"].as<std::string>(), reported_methods())) {
        if (!e.settings.empty()) a.options.section(e.method) = e.settings;  // checked by the method when made
        a.methods.push_back(e.method);
    }
    return a;
}

// 1234567 -> "1.23M": FLOPs and counts at any scale in a few characters.
std::string si(double v) {
    const char* units[] = {"", "K", "M", "G", "T", "P", "E"};
    int u = 0;
    while (std::abs(v) >= 1000.0 && u < 6) {
        v /= 1000.0;
        ++u;
    }
    return u == 0 ? fmt::format("{:.0f}", v) : fmt::format("{:.3g}{}", v, units[u]);
}
std::string mb(int64_t bytes) { return fmt::format("{:.2f}", double(bytes) / 1e6); }
// a as a percentage of b; small shares keep three significant digits.
std::string pct(uint64_t a, uint64_t b) {
    if (!b) return "-";
    const double v = 100.0 * double(a) / double(b);
    if (v == 0.0) return "0%";
    if (v < 0.01) return "<0.01%";
    return v < 1.0 ? fmt::format("{:.2f}%", v) : fmt::format("{:.1f}%", v);
}

// "blocks 0-3" for a contiguous run of blocks, "none" for none.
std::string block_span(const std::vector<int>& blocks) {
    if (blocks.empty()) return "none";
    if (blocks.size() == 1) return fmt::format("block {}", blocks[0]);
    return fmt::format("blocks {}-{}", blocks.front(), blocks.back());
}

std::string csv_field(const std::string& s) {
    if (s.find_first_of(",\"\n") == std::string::npos) return s;
    std::string q = "\"";
    for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
    return q + "\"";
}

std::string to_csv(const std::vector<MethodReport>& rs) {
    std::string csv =
        "method,trainable_params,formula_params,formula,total_params,trainable_pct,bytes_params,bytes_grads,"
        "bytes_optimizer,bytes_activations_peak";
    for (int p = 0; p < flops::kPhases; ++p)
        csv += fmt::format(",{0}_analytic,{0}_measured", flops::phase_name(flops::Phase(p)));
    csv += ",inference_flops_per_token,inference_flops_per_token_measured\n";
    auto opt = [](const auto& o) { return o ? fmt::format("{}", *o) : std::string(); };
    for (const MethodReport& r : rs) {
        csv += fmt::format("{},{},{},{},{},{:.6f},{},{},{},{}", r.method, r.trainable_params, r.formula_params,
                           csv_field(r.formula), r.total_params, r.trainable_pct, r.bytes.params, r.bytes.grads,
                           r.bytes.optimizer, opt(r.bytes.activations_peak));
        for (int p = 0; p < flops::kPhases; ++p)
            csv += fmt::format(",{},{}", r.analytic[size_t(p)],
                               r.measured ? fmt::format("{}", (*r.measured)[size_t(p)]) : std::string());
        csv += fmt::format(",{},{}\n", r.inference_flops_per_token, opt(r.inference_flops_per_token_measured));
    }
    return csv;
}

// The footer: per method, its dW and dX against full fine-tuning's, and how
// far down the backward reaches.
std::vector<std::string> footer(const Args& a, const std::vector<MethodReport>& rs, const MethodReport& full) {
    std::vector<std::string> lines;
    lines.push_back(
        "A frozen base saves the dW GEMMs and the optimizer state, not the backward pass: dX still flows through "
        "every block between the loss and the lowest trainable one.");
    for (const MethodReport& r : rs) {
        if (make_adapter(r.method, a.options)->changes_base()) continue;
        std::string where;
        if (r.backward_blocks.empty()) where = "no backward at all";
        else if (r.backward_to_input)
            where = fmt::format("dX flows through all {} blocks, down to the trainable vectors at the input (on T+n = "
                                "{} tokens)",
                                a.cfg.n_layers, a.settings.seq + a.options.n);
        else if (r.backward_blocks.front() == 0)
            where = fmt::format("dX flows through all {} blocks (block 0 is trainable)", a.cfg.n_layers);
        else
            where = fmt::format("dX flows through {} only; none below block {}", block_span(r.backward_blocks),
                                r.backward_blocks.front());
        lines.push_back(fmt::format("  {:<10} backward_dw {:>7} of full's, backward_dx {:>6}, optimizer {:>7}, "
                                    "whole step {:>6}; {}",
                                    r.method + ":", pct(r.analytic[2], full.analytic[2]),
                                    pct(r.analytic[1], full.analytic[1]), pct(r.analytic[3], full.analytic[3]),
                                    pct(flops::sum(r.analytic), flops::sum(full.analytic)), where));
    }
    return lines;
}

void print_report(const Args& a, const std::vector<MethodReport>& rs, const MethodReport& full, bool measured) {
    const GPTConfig& c = a.cfg;
    // The method sections as the methods read them (defaults filled in).
    std::string sections;
    for (const std::string& m : a.methods) {
        const nlohmann::json own = make_adapter(m, a.options)->options().section_or_empty(m);
        if (!own.empty()) sections += fmt::format("; {} {}", m, own.dump());
    }
    fmt::print("peftlab report: {}V={} d={} L={} H={} F={} max_seq={}{} ({} base parameters)\n",
               a.preset.empty() ? (a.base.empty() ? "" : a.base + " ") : a.preset + " ", c.vocab, c.d_model, c.n_layers, c.n_heads, c.d_ff, c.max_seq,
               c.tie_embeddings ? " tied" : "", si(double(full.total_params)));
    fmt::print("one training step: B={} rows x T={} tokens, AdamW; n={}, adapter layers {}{}, positions {}\n",
               a.settings.batch, a.settings.seq, a.options.n, a.options.layers, sections, a.options.positions);
    if (measured) {
        double worst = 0.0;
        for (const MethodReport& r : rs) worst = std::max(worst, r.max_relative_gap());
        fmt::print("FLOPs: analytic (closed form) vs measured (autograd counters, one real step): largest gap "
                   "{:.4f}%{}\n",
                   100.0 * worst, worst == 0.0 ? " (exact)" : "");
    } else {
        fmt::print("analytic numbers only (nothing allocated)\n");
    }

    fmt::print("\nParameters and memory (float32; MB = 1e6 bytes)\n");
    fmt::print("{:<10} {:>13} {:>9} {:>10} {:>9} {:>9} {:>9} {:>12}  {}\n", "method", "trainable", "%", "total",
               "params MB", "grads MB", "AdamW MB", "act peak MB", "formula");
    for (const MethodReport& r : rs)
        fmt::print("{:<10} {:>13} {:>9.4f} {:>10} {:>9} {:>9} {:>9} {:>12}  {}{}\n", r.method, r.trainable_params,
                   r.trainable_pct, si(double(r.total_params)), mb(r.bytes.params), mb(r.bytes.grads),
                   mb(r.bytes.optimizer), r.bytes.activations_peak ? mb(*r.bytes.activations_peak) : "-", r.formula,
                   r.formula_params == r.trainable_params ? "" : fmt::format(" = {} (!)", r.formula_params));

    fmt::print("\nData-parallel training: bytes each rank all-reduces per update (the trained tensors' float32 "
               "gradients; nn/trainer.h)\n");
    fmt::print("{:<10} {:>15} {:>14} {:>10}\n", "method", "floats", "all-reduce MB", "vs full");
    for (const MethodReport& r : rs)
        fmt::print("{:<10} {:>15} {:>14} {:>10}\n", r.method, r.trainable_params, mb(r.bytes.allreduce),
                   pct(uint64_t(r.bytes.allreduce), uint64_t(full.bytes.allreduce)));

    fmt::print("\nFLOPs per training step{}\n", measured ? " (analytic = measured where marked exact)" : " (analytic)");
    fmt::print("{:<10} {:>9} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10}  {}\n", "method", "forward", "backward_dx",
               "backward_dw", "optimizer", "total", "dx/full", "dw/full", "measured", "backward through");
    for (const MethodReport& r : rs) {
        std::string check = "-";
        if (r.measured) {
            double gap = r.max_relative_gap();
            check = gap == 0.0 ? "exact" : fmt::format("{:+.3f}%", 100.0 * gap);
        }
        fmt::print("{:<10} {:>9} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10}  {}\n", r.method, si(double(r.analytic[0])),
                   si(double(r.analytic[1])), si(double(r.analytic[2])), si(double(r.analytic[3])),
                   si(double(flops::sum(r.analytic))), pct(r.analytic[1], full.analytic[1]),
                   pct(r.analytic[2], full.analytic[2]), check, block_span(r.backward_blocks));
    }

    fmt::print("\nInference FLOPs per generated token (B=1, context T={} with prefixes cached; LoRA merged)\n",
               a.settings.seq);
    fmt::print("{:<10} {:>12} {:>9} {:>10}\n", "method", "FLOPs", "vs full", "measured");
    for (const MethodReport& r : rs) {
        std::string check = "-";
        if (r.inference_flops_per_token_measured)
            check = *r.inference_flops_per_token_measured == r.inference_flops_per_token
                        ? "exact"
                        : si(double(*r.inference_flops_per_token_measured));
        fmt::print("{:<10} {:>12} {:>9} {:>10}\n", r.method, si(double(r.inference_flops_per_token)),
                   fmt::format("{:+.2f}%", 100.0 * (double(r.inference_flops_per_token) /
                                                       double(full.inference_flops_per_token) - 1.0)),
                   check);
    }

    fmt::print("\nPer-layer map: trainable parameters{}\n",
               measured ? " [gradient L2 norm after one step]" : "");
    std::vector<std::string> groups;
    for (const MethodReport& r : rs)
        for (const LayerGroup& g : r.per_layer)
            if (std::find(groups.begin(), groups.end(), g.group) == groups.end()) groups.push_back(g.group);
    const int width = measured ? 22 : 12;
    fmt::print("{:<12}", "group");
    for (const MethodReport& r : rs) fmt::print(" {:>{}}", r.method, width);
    fmt::print("\n");
    // One row per group; consecutive blocks with identical cells share a row ("blocks.0-47").
    std::vector<std::string> cells, prev;
    std::string first, last;
    auto flush = [&] {
        if (prev.empty()) return;
        std::string label = first == last ? first : first + "-" + last.substr(last.rfind('.') + 1);
        fmt::print("{:<12}", label);
        for (const std::string& c : prev) fmt::print(" {:>{}}", c, width);
        fmt::print("\n");
        prev.clear();
    };
    for (const std::string& g : groups) {
        cells.clear();
        for (const MethodReport& r : rs) {
            std::string cell = "-";
            for (const LayerGroup& x : r.per_layer)
                if (x.group == g && x.trainable_params > 0)
                    cell = x.grad_norm ? fmt::format("{} [{:.2e}]", si(double(x.trainable_params)), *x.grad_norm)
                                       : si(double(x.trainable_params));
            cells.push_back(cell);
        }
        const bool block = g.rfind("blocks.", 0) == 0;
        if (block && cells == prev && last.rfind("blocks.", 0) == 0) {
            last = g;
            continue;
        }
        flush();
        prev = cells;
        first = last = g;
    }
    flush();
    fmt::print("\n");
    for (const std::string& line : footer(a, rs, full)) fmt::print("{}\n", line);
}

}  // namespace

// The FLOP counters are 64-bit. A step's count grows at most linearly in the
// batch (the optimizer's share not at all), so the step at B = 1 bounds it:
// refuse a request whose B x count(B = 1) would not fit, instead of printing
// wrapped numbers. Each dimension is first bounded by a rough upper estimate
// (long double) so that the B = 1 count cannot overflow either.
static void check_counts_fit(const Args& a) {
    constexpr long double kMax = 18446744073709551615.0L;  // 2^64 - 1
    const GPTConfig& c = a.cfg;
    const long double d = c.d_model, F = c.d_ff, L = c.n_layers, V = c.vocab;
    const long double T = a.settings.seq + a.options.n;
    const long double rough_b1 = 100 * (L * T * (d * d + d * F + T * d) + T * V * d + V * d + L * d * F);
    if (rough_b1 > kMax / 64)
        throw std::invalid_argument(fmt::format(
            "one row of this step is ~{:.2e} FLOPs, beyond what the 64-bit counters can hold with any --batch; "
            "use smaller --seq / --d-model / --d-ff / --vocab / --prefix-len",
            double(rough_b1)));
    ReportSettings one = a.settings;
    one.batch = 1;
    std::vector<std::string> priced = a.methods;
    priced.push_back(reference_method());  // the footer's reference
    for (const std::string& m : priced) {
        const flops::Counts c1 = analytic_step_flops(a.cfg, one, m, a.options);
        long double per_row = 0;
        for (uint64_t v : c1) per_row += (long double)v;
        const long double total = per_row * (long double)a.settings.batch;
        if (total > kMax)
            throw std::invalid_argument(fmt::format(
                "--batch {} --seq {}: one {} step is ~{:.3e} FLOPs, more than the 64-bit counters hold "
                "({:.3e}); use --batch <= {}",
                a.settings.batch, a.settings.seq, m, double(total), double(kMax),
                (long long)(kMax / per_row)));
    }
}

// Measured: one rank's FLOP/s on this machine for `method` at the measured
// config (analytic FLOPs of the step over the median of 3 timed AdamW steps
// after a warm-up), the compute rate the scale model gives every rank.
double measure_throughput(const Args& a, const std::string& method) {
    GPT model(a.cfg, a.settings.seed);
    std::unique_ptr<Adapter> adapter = make_adapter(method, a.options);
    adapter->activate(model);
    AdamW opt(NamedTensors(adapter->parameters().begin(), adapter->parameters().end()));
    Rng rng(a.settings.seed);
    ModelInput in;
    in.B = a.settings.batch, in.T = a.settings.seq;
    std::vector<int32_t> targets;
    for (int64_t i = 0; i < in.B * in.T; ++i) {
        in.tokens.push_back(int32_t(rng.below(uint32_t(a.cfg.vocab))));
        targets.push_back(int32_t(rng.below(uint32_t(a.cfg.vocab))));
    }
    std::vector<double> times;
    for (int i = 0; i < 4; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        backward(model.loss(in, targets));
        opt.step();
        opt.zero_grad();
        if (i > 0) times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(times.begin(), times.end());
    return double(flops::sum(analytic_step_flops(a.cfg, a.settings, method, a.options))) / times[1];
}

// The data-parallel scale model: measured per-rank throughput, modelled
// compute split over K ranks and a ring all-reduce of the trained gradients.
void print_scale_model(const Args& a) {
    struct Net {
        const char* name;
        double bytes_per_s;
    };
    const Net nets[] = {{"10 Gbit/s", 10e9 / 8}, {"100 Gbit/s", 100e9 / 8}};
    const double latency = a.latency_us * 1e-6;
    std::vector<int> shown;
    for (int k = 1; k <= a.max_ranks; k *= 2) shown.push_back(k);
    nlohmann::json j = {{"measured_config", a.cfg.to_json()},
                        {"measured_batch", a.settings.batch},
                        {"measured_seq", a.settings.seq},
                        {"threads", threads()},
                        {"global_batch", a.scale_batch},
                        {"seq", a.scale_seq},
                        {"latency_s", latency},
                        {"rows", nlohmann::json::array()}};
    const std::string rate_source =
        a.rank_gflops > 0
            ? fmt::format("**Assumed** (not measured): every rank computes {} GFLOP/s.\n", a.rank_gflops)
            : fmt::format("**Measured** (this machine, {} thread(s) per rank): each method's training-step throughput "
                          "on the measured config (d={} L={} T={} B={}), analytic FLOPs over the median of 3 timed "
                          "AdamW steps.\n",
                          threads(), a.cfg.d_model, a.cfg.n_layers, a.settings.seq, a.settings.batch);
    std::string md = fmt::format(
        "# Data-parallel scale model\n\n{}"
        "**Modelled**: a GPT-2 update of a global batch of {} rows x {} tokens on K ranks = (forward + backward) / K "
        "+ optimizer, at that throughput per rank, then a ring all-reduce of the trained gradients (float32), "
        "2(K-1)/K x bytes / bandwidth + 2(K-1) x {} us, not overlapped. Step times in seconds; 'fastest K' is the K "
        "in 1..{} with the shortest step, '>=50% eff.' the largest K whose speed-up is still >= K/2.\n\n",
        rate_source, a.scale_batch, a.scale_seq, a.latency_us, a.max_ranks);
    std::map<std::string, double> throughput;
    md += fmt::format("| method | {} GFLOP/s per rank |\n|---|---:|\n", a.rank_gflops > 0 ? "assumed" : "measured");
    for (const std::string& m : a.methods) {
        throughput[m] = a.rank_gflops > 0 ? a.rank_gflops * 1e9 : measure_throughput(a, m);
        md += fmt::format("| {} | {:.1f} |\n", m, throughput[m] / 1e9);
    }
    md += "\n| model | method | all-reduce MB | network |";
    for (int k : shown) md += fmt::format(" K={} |", k);
    md += " fastest K | >=50% eff. |\n|---|---|---:|---|";
    for (size_t i = 0; i < shown.size(); ++i) md += "---:|";
    md += "---:|---:|\n";
    ReportSettings s = a.settings;
    s.batch = a.scale_batch;
    s.seq = a.scale_seq;
    for (const char* model : {"gpt2", "gpt2-medium", "gpt2-xl"}) {
        const GPTConfig cfg = model_preset(model);
        for (const std::string& m : a.methods) {
            const MethodReport r = report_method(cfg, s, m, a.options, false);
            for (const Net& net : nets) {
                const ScaleLimit lim = scale_limit(r.analytic, double(r.bytes.allreduce), a.max_ranks, throughput[m],
                                                   net.bytes_per_s, latency);
                md += fmt::format("| {} | {} | {} | {} |", model, m, mb(r.bytes.allreduce), net.name);
                nlohmann::json times = nlohmann::json::object();
                for (int k : shown) {
                    const ScalePoint p =
                        scale_point(r.analytic, double(r.bytes.allreduce), k, throughput[m], net.bytes_per_s, latency);
                    md += fmt::format(" {:.3g} |", p.step_s());
                    times[std::to_string(k)] = {{"compute_s", p.compute_s}, {"comm_s", p.comm_s}};
                }
                md += fmt::format(" {} | {} |\n", lim.fastest_ranks, lim.half_efficiency_ranks);
                j["rows"].push_back({{"model", model},
                                     {"method", m},
                                     {"allreduce_bytes", r.bytes.allreduce},
                                     {"network", net.name},
                                     {a.rank_gflops > 0 ? "flops_per_s_assumed" : "flops_per_s_measured", throughput[m]},
                                     {"step_flops", flops::sum(r.analytic)},
                                     {"modelled", times},
                                     {"fastest_ranks", lim.fastest_ranks},
                                     {"half_efficiency_ranks", lim.half_efficiency_ranks}});
            }
        }
    }
    std::filesystem::create_directories(a.out);
    write_file_atomic(a.out + "/scale_model.md", md);
    write_file_atomic(a.out + "/scale_model.json", j.dump(2) + "\n");
    fmt::print("\n{}\nwrote {}/scale_model.md and scale_model.json\n", md, a.out);
}

int main(int argc, char** argv) {
    Args a;
    try {
        a = parse_args(argc, argv);
    } catch (const std::exception& e) {
        fmt::print(stderr, "report: {}\n(see --help)\n", e.what());
        return 2;
    }
    try {
        flags::configure_threads(a.threads);  // capped at the cores, with a warning
        const bool measure = a.preset.empty();
        check_counts_fit(a);
        if (measure) {  // a real base and step: its memory must be there
            const long double need =
                harness::estimate_peak_bytes(a.cfg, a.settings.batch, a.settings.seq + a.options.n,
                                             harness::base_param_count(a.cfg), true, 0, threads())
                    .total();
            const long double avail = harness::available_memory_bytes();
            if (avail > 0 && need > avail)
                throw std::invalid_argument(fmt::format(
                    "the measured step needs an estimated {:.2f} GB, more than the {:.2f} GB available; use smaller "
                    "sizes, or --preset for the analytic report alone",
                    double(need / 1e9L), double(avail / 1e9L)));
        }
        std::vector<MethodReport> reports;
        for (const std::string& m : a.methods) reports.push_back(report_method(a.cfg, a.settings, m, a.options, measure));
        // Footer and ratios compare against full fine-tuning (the method that trains the base), analytic, listed or not.
        const std::string reference = reference_method();
        auto listed = std::find_if(reports.begin(), reports.end(), [&](const MethodReport& r) { return r.method == reference; });
        const MethodReport full =
            listed != reports.end() ? *listed : report_method(a.cfg, a.settings, reference, a.options, false);

        nlohmann::json j = {{"config", a.cfg.to_json()},
                            {"preset", a.preset},
                            {"measured", measure},
                            {"batch", a.settings.batch},
                            {"seq", a.settings.seq},
                            {"seed", a.settings.seed},
                            {"threads", threads()},
                            {"adapter_options", a.options.to_json()},
                            {"methods", nlohmann::json::array()}};
        for (const MethodReport& r : reports) j["methods"].push_back(r.to_json());
        j["summary"] = footer(a, reports, full);
        std::string recompute_md;  // the trade table, printed after the report
        if (a.settings.recompute != "none") {
            // The trade, method by method: the same step without recomputation.
            ReportSettings plain = a.settings;
            plain.recompute = "none";
            recompute_md = fmt::format(
                "\n## Activation recomputation (blocks: {})\n\n| method | activations peak MiB | with recompute | "
                "ratio | step GFLOP | with recompute | ratio |\n|---|---:|---:|---:|---:|---:|---:|\n",
                a.settings.recompute);
            nlohmann::json trade = nlohmann::json::array();
            auto or_null = [](const std::optional<int64_t>& v) { return v ? nlohmann::json(*v) : nlohmann::json(nullptr); };
            for (const MethodReport& r : reports) {
                const MethodReport p = report_method(a.cfg, plain, r.method, a.options, measure);
                const auto& with = measure ? *r.measured : r.analytic;
                const auto& without = measure ? *p.measured : p.analytic;
                const double gf = double(flops::sum(without)) / 1e9, gf_r = double(flops::sum(with)) / 1e9;
                const double act = p.bytes.activations_peak ? double(*p.bytes.activations_peak) / 1048576 : 0;
                const double act_r = r.bytes.activations_peak ? double(*r.bytes.activations_peak) / 1048576 : 0;
                recompute_md += fmt::format(
                    "| {} | {} | {} | {} | {:.2f} | {:.2f} | {:.2f}x |\n", r.method,
                    measure ? fmt::format("{:.1f}", act) : "-", measure ? fmt::format("{:.1f}", act_r) : "-",
                    measure && act > 0 ? fmt::format("{:.2f}x", act_r / act) : "-", gf, gf_r, gf > 0 ? gf_r / gf : 0.0);
                trade.push_back({{"method", r.method},
                                 {"activations_peak_bytes", or_null(p.bytes.activations_peak)},
                                 {"activations_peak_bytes_recompute", or_null(r.bytes.activations_peak)},
                                 {"step_flops", flops::sum(without)},
                                 {"step_flops_recompute", flops::sum(with)}});
            }
            j["recompute"] = {{"blocks", a.settings.recompute}, {"trade", trade}};
        }
        std::filesystem::create_directories(a.out);
        write_file_atomic(a.out + "/report.json", j.dump(2) + "\n");
        write_file_atomic(a.out + "/report.csv", to_csv(reports));

        print_report(a, reports, full, measure);
        fmt::print("{}", recompute_md);
        fmt::print("\nwrote {0}/report.json and {0}/report.csv\n", a.out);
        if (a.scale_model) print_scale_model(a);
        for (const MethodReport& r : reports)
            if (r.max_relative_gap() > 0.01) {
                fmt::print(stderr, "report: {}: analytic and measured FLOPs differ by {:.2f}% (> 1%)\n", r.method,
                           100.0 * r.max_relative_gap());
                return 1;
            }
    } catch (const std::exception& e) {
        fmt::print(stderr, "report: {}\n", e.what());
        return 1;
    }
    return 0;
}
