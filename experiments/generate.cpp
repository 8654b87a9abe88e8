// generate: a continuation, logits or token ids from a base (a Hugging Face
// GPT-2 directory or a peftlab checkpoint), with or without an adapter.
//
//   generate --base DIR --prompt "text" [--adapter DIR] [--max-new-tokens N]
//   generate --base DIR --adapter DIR --source "input"   # framed as fine-tuning frames it
//   generate --base DIR --input-ids 1,2,3 --dump-logits FILE.json   # JSON [T][V] floats
//   generate --base DIR --encode "text"                             # JSON [ids] on stdout
//   generate --base DIR --input-ids 1,2,3 [--max-new-tokens N]      # greedy ids as JSON, timing on stderr
//   generate --base DIR [--adapter DIR] --gguf OUT.gguf [--gguf-type f16]   # llama.cpp model file
//   generate --base DIR --adapter LORA_DIR --gguf-adapter OUT.gguf          # llama.cpp LoRA adapter file
//
// --gguf writes the base as llama.cpp's "gpt2" architecture (nn/gguf.h) with
// the tokenizer below; an adapter is merged into the weights first, which
// only an adapter that can be merged (or that trains the base itself) allows.
// --gguf-adapter writes the adapter alone, when it has a llama.cpp form
// (peft::Adapter::gguf_lora).
//
// --adapter DIR: peftlab's own adapter directory, or Hugging Face PEFT's
// (adapter_config.json + adapter_model.safetensors), read by peft/adapter_io.
// The tokenizer is the GPT-2 BPE of the base directory (vocab.json +
// merges.txt, or encoder.json + vocab.bpe), --tokenizer gpt2:DIR, or the one a
// peftlab checkpoint records.
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "autograd/tape.h"
#include "datasets/batch.h"
#include "datasets/gpt2_tokenizer.h"
#include "datasets/task.h"
#include "experiments/lib/flags.h"
#include "experiments/lib/gguf_export.h"
#include "experiments/lib/harness.h"
#include "nn/checkpoint.h"
#include "nn/generate.h"
#include "nn/gguf.h"
#include "nn/hf_gpt2.h"
#include "nn/safetensors.h"
#include "peft/adapter_io.h"

using namespace peftlab;
namespace fs = std::filesystem;

namespace {

std::invalid_argument bad_flag(const std::string& flag, const std::string& value, const std::string& why) {
    return std::invalid_argument(fmt::format("{} '{}': {}", flag, value, why));
}

std::vector<int32_t> parse_ids(const std::string& text) {
    std::vector<int32_t> ids;
    size_t start = 0;
    while (start <= text.size()) {
        const size_t comma = text.find(',', start);
        const std::string item = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        if (item.empty()) throw bad_flag("--input-ids", text, "expected comma-separated token ids, e.g. 1,2,3");
        ids.push_back(int32_t(flags::whole_number("--input-ids", item, 0, std::numeric_limits<int32_t>::max())));
        if (comma == std::string::npos) break;
        start = comma + 1;
    }
    return ids;
}

// Greedy continuation of one prompt of token ids: the new ids as a JSON array on
// stdout, and the prefill and per-token decoding times on stderr as JSON
// ({"prefill_ms", "decode_ms_per_token", "decode_tokens_per_s"}), the
// measurement tools/llama_bench.mjs makes on llama.cpp's side.
int greedy_ids(GPT& model, const std::vector<int32_t>& ids, int max_new) {
    using clock = std::chrono::steady_clock;
    if (int64_t(ids.size()) + max_new > model.config().max_seq)
        throw bad_flag("--max-new-tokens", std::to_string(max_new),
                       fmt::format("{} prompt ids + {} new exceed max_seq {}", ids.size(), max_new,
                                   model.config().max_seq));
    const int64_t V = model.config().vocab;
    DecodeBatch batch;
    Rng rng(0);
    const auto t0 = clock::now();
    Tensor logits = prefill(model, batch, {ids});
    std::vector<int32_t> out{sample_token(logits.data(), V, 0.f, 0, rng)};
    const auto t1 = clock::now();
    while (int(out.size()) < max_new) {
        logits = decode_step(model, batch, {out.back()});
        out.push_back(sample_token(logits.data(), V, 0.f, 0, rng));
    }
    const auto t2 = clock::now();
    const double prefill_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
    const double decode_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
    const int steps = max_new - 1;
    fmt::print("{}\n", nlohmann::json(out).dump());
    nlohmann::json timing = {{"prompt_tokens", ids.size()}, {"new_tokens", max_new}, {"prefill_ms", prefill_ms}};
    if (steps > 0) {
        timing["decode_ms_per_token"] = decode_ms / steps;
        timing["decode_tokens_per_s"] = 1000.0 * steps / decode_ms;
    }
    fmt::print(stderr, "{}\n", timing.dump());
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    cxxopts::Options opts("generate", "Continuation, logits or token ids from a GPT-2 / peftlab base and an adapter");
    opts.add_options()
        ("base", "Hugging Face GPT-2 directory (config.json + model.safetensors) or a peftlab checkpoint file",
         cxxopts::value<std::string>())
        ("adapter", "adapter directory (peftlab's or Hugging Face PEFT's)", cxxopts::value<std::string>())
        ("tokenizer", "gpt2:DIR (default: the base directory's GPT-2 files, or the tokenizer a checkpoint file records)", cxxopts::value<std::string>()->default_value(""))
        ("prompt", "text to continue", cxxopts::value<std::string>())  // method-names: the --prompt flag, no method
        ("source", "a task input, framed as fine-tuning and eval frame it (BOS, the text, the separator ' => '); "
                   "prints the answer, up to EOS", cxxopts::value<std::string>())
        ("max-new-tokens", "tokens to generate", cxxopts::value<std::string>()->default_value("32"))
        ("temperature", "0: greedy", cxxopts::value<std::string>()->default_value("0"))
        ("top-k", "sample among the k largest logits; 0: all", cxxopts::value<std::string>()->default_value("0"))
        ("seed", "sampling seed", cxxopts::value<std::string>()->default_value("0"))
        ("input-ids", "comma-separated token ids: with --dump-logits their logits, else their greedy continuation "
                      "(--max-new-tokens ids as JSON on stdout, timing on stderr)", cxxopts::value<std::string>())
        ("dump-logits", "write the logits of --input-ids as JSON [T][V] to this file", cxxopts::value<std::string>())
        ("encode", "print the token ids of this text as a JSON array", cxxopts::value<std::string>())
        ("gguf", "write the base (adapter merged) as a llama.cpp GGUF model file and exit", cxxopts::value<std::string>())
        ("gguf-type", "weight type of --gguf: f32 or f16 (norms and biases stay f32)",
         cxxopts::value<std::string>()->default_value("f32"))
        ("gguf-adapter", "write --adapter as a llama.cpp GGUF LoRA adapter file and exit", cxxopts::value<std::string>())
        ("dtype", "weights the forward multiplies with: f32, or f16 (rounded once, F32 accumulation; "
                  "GPT::set_weights_f16)", cxxopts::value<std::string>()->default_value("f32"))
        ("threads", "threads (default: PEFTLAB_THREADS, else all cores)", cxxopts::value<std::string>())
        ("help", "show this help");
    try {
        const cxxopts::ParseResult r = flags::parse(opts, argc, argv);
        flags::configure_threads(r.count("threads") ? std::optional<int64_t>(flags::int_flag(r, "threads", 0))
                                                    : std::nullopt);
        const bool gguf = r.count("gguf") || r.count("gguf-adapter");
        const int modes = int(r.count("prompt")) + int(r.count("source")) + int(r.count("encode")) +  // method-names: flags
                          int(r.count("input-ids")) +
                          int(gguf);
        if (modes != 1)
            throw std::invalid_argument(
                "give exactly one of --prompt, --source, --input-ids, --encode, --gguf/--gguf-adapter");
        if (r.count("dump-logits") && !r.count("input-ids"))
            throw std::invalid_argument("--dump-logits needs --input-ids");
        const std::string gguf_type = r["gguf-type"].as<std::string>();
        if (gguf_type != "f32" && gguf_type != "f16") throw bad_flag("--gguf-type", gguf_type, "expected f32 or f16");
        const std::string dtype = r["dtype"].as<std::string>();
        if (dtype != "f32" && dtype != "f16") throw bad_flag("--dtype", dtype, "expected f32 or f16");
        if (r.count("gguf-adapter") && !r.count("adapter"))
            throw std::invalid_argument("--gguf-adapter needs --adapter DIR");
        if (!r.count("base")) throw std::invalid_argument("--base DIR is required");
        const std::string base_path = r["base"].as<std::string>();
        if (!fs::exists(base_path)) throw bad_flag("--base", base_path, "does not exist");

        if (r.count("encode")) {
            auto tok = harness::base_tokenizer(r["tokenizer"].as<std::string>(), base_path);
            fmt::print("{}\n", nlohmann::json(tok->encode(r["encode"].as<std::string>())).dump());
            return 0;
        }

        const auto t0 = std::chrono::steady_clock::now();
        std::unique_ptr<GPT> model =
            fs::is_directory(base_path) ? load_hf_gpt2(base_path) : load_model_new(base_path);
        fmt::print(stderr, "loaded {} ({} parameters) in {:.2f} s\n", base_path, model->num_params(),
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        std::unique_ptr<peft::Adapter> adapter;
        if (r.count("adapter")) {
            const std::string dir = r["adapter"].as<std::string>();
            if (!fs::is_directory(dir)) throw bad_flag("--adapter", dir, "is not a directory");
            adapter = peft::load_any_adapter(dir, *model);
            adapter->activate(*model);
        }
        model->eval();

        if (r.count("gguf-adapter")) {
            const std::string out = r["gguf-adapter"].as<std::string>();
            const std::optional<GgufLora> lora = adapter->gguf_lora();
            if (!lora)
                throw bad_flag("--adapter", r["adapter"].as<std::string>(),
                               fmt::format("a {} adapter has no llama.cpp adapter form{}", adapter->method(),
                                           adapter->mergeable() ? " (--gguf writes it merged into the model)" : ""));
            save_gguf_lora(out, model->config(), *lora, "peftlab-" + adapter->method());
            fmt::print(stderr, "wrote {} ({}) as a llama.cpp LoRA adapter to {}\n", r["adapter"].as<std::string>(),
                       adapter->method(), out);
        }
        if (r.count("gguf")) {
            if (adapter && !adapter->holds_base()) {
                if (!adapter->mergeable())
                    throw bad_flag("--adapter", r["adapter"].as<std::string>(),
                                   fmt::format("a {} adapter cannot be merged into the weights, and a GGUF model file "
                                               "holds only weights",
                                               adapter->method()));
                adapter->merge();
            }
            const std::string out = r["gguf"].as<std::string>();
            // A base with no tokenizer of its own (no GPT-2 files beside it, none recorded) is
            // written without one: llama.cpp then runs token ids only.
            const std::string spec = r["tokenizer"].as<std::string>();
            const bool has_tokenizer =
                !spec.empty() ||
                (fs::is_directory(base_path) ? fs::exists(fs::path(base_path) / "vocab.json") ||
                                                   fs::exists(fs::path(base_path) / "encoder.json")
                                             : StMapped(base_path).metadata().count("tokenizer") > 0);
            const GgufVocab vocab =
                has_tokenizer ? harness::gguf_vocab(*harness::base_tokenizer(spec, base_path)) : GgufVocab{};
            GgufGpt2Options g;
            g.type = gguf_type == "f16" ? GgmlType::F16 : GgmlType::F32;
            save_gguf_gpt2(*model, out, vocab, g);
            fmt::print(stderr, "wrote {} as a llama.cpp gpt2 GGUF ({}, tokenizer: {}) to {}\n", base_path, gguf_type,
                       vocab.tokens.empty() ? "none, token ids only" : "GPT-2 BPE", out);
        }
        if (gguf) return 0;
        if (dtype == "f16") model->set_weights_f16(true);  // after any merge: the copies do not follow the weights

        if (r.count("input-ids")) {
            // --input-ids decodes greedily (or dumps logits): sampling flags would be ignored.
            for (const char* sampling : {"temperature", "top-k", "seed"})
                if (r.count(sampling))
                    throw bad_flag(fmt::format("--{}", sampling), r[sampling].as<std::string>(),
                                   "applies to --prompt only (--input-ids decodes greedily)");
            if (r.count("dump-logits") && r.count("max-new-tokens"))
                throw bad_flag("--max-new-tokens", r["max-new-tokens"].as<std::string>(),
                               "has no effect with --dump-logits (the logits of --input-ids alone)");
            const std::vector<int32_t> ids = parse_ids(r["input-ids"].as<std::string>());
            for (size_t i = 0; i < ids.size(); ++i)
                if (ids[i] >= model->config().vocab)
                    throw bad_flag("--input-ids", r["input-ids"].as<std::string>(),
                                   fmt::format("id {} at index {} is outside the vocabulary [0, {})", ids[i], i,
                                               model->config().vocab));
            if (!r.count("dump-logits")) return greedy_ids(*model, ids, int(flags::int_flag(r, "max-new-tokens", 1, std::numeric_limits<int>::max())));
            ModelInput in;
            in.B = 1;
            in.T = int64_t(ids.size());
            in.tokens = ids;
            NoGradGuard ng;
            const Tensor logits = model->forward(in);
            const int64_t V = logits.dim(2);
            nlohmann::json out = nlohmann::json::array();
            for (int64_t t = 0; t < in.T; ++t)
                out.push_back(std::vector<float>(logits.data() + t * V, logits.data() + (t + 1) * V));
            const std::string path = r["dump-logits"].as<std::string>();
            write_file_atomic(path, out.dump() + "\n");
            fmt::print(stderr, "wrote logits [{}][{}] to {}\n", in.T, V, path);
            return 0;
        }

        auto tok = harness::base_tokenizer(r["tokenizer"].as<std::string>(), base_path);
        harness::check_tokenizer_fits(*tok, model->config().vocab, base_path);
        // --source: the prompt a fine-tuned adapter was trained to answer (datasets/task.h's framing).
        const bool framed = r.count("source") > 0;
        const std::string flag = framed ? "--source" : "--prompt";  // method-names: the --prompt flag, no method
        const std::string text = r[flag.substr(2)].as<std::string>();
        std::vector<int32_t> prompt = tok->encode(text);
        if (prompt.empty() && !framed) throw bad_flag(flag, text, "encodes to no tokens");
        // A word vocabulary encodes a word it lacks as one unknown id: say which, as eval's flag does.
        if (tok->unk_id() >= 0) {
            std::vector<std::string> unknown;
            std::istringstream words(text);
            for (std::string w; words >> w;) {
                const std::vector<int32_t> ids = tok->encode(w);
                if (std::find(ids.begin(), ids.end(), tok->unk_id()) != ids.end()) unknown.push_back("'" + w + "'");
            }
            if (!unknown.empty())
                fmt::print(stderr, "note: {} word(s) of {} are not in the base's vocabulary and encode as the unknown "
                                   "id: {}\n", unknown.size(), flag, fmt::join(unknown, ", "));
        }
        GenerateOptions g;
        g.max_new_tokens = int(flags::int_flag(r, "max-new-tokens", 1, std::numeric_limits<int>::max()));
        const int64_t max_seq = model->config().max_seq;
        if (framed) {
            // The prompt of encode_example (BOS, source, separator), in the budget the new tokens leave;
            // as eval does (experiments/lib/evaluate.cpp), the source loses its first tokens to fit.
            const int64_t budget = max_seq - g.max_new_tokens;
            const int64_t fixed = 1 + int64_t(tok->encode(data::kSeparator).size());
            if (budget < fixed)
                throw bad_flag("--max-new-tokens", r["max-new-tokens"].as<std::string>(),
                               fmt::format("leaves {} of the base's max_seq {} for the framed source, whose BOS and "
                                           "separator alone take {}",
                                           std::max<int64_t>(budget, 0), max_seq, fixed));
            const size_t source_tokens = prompt.size();
            const data::EncodedExample e = data::encode_example({text, ""}, *tok, int(budget));
            prompt.assign(e.tokens.begin(), e.tokens.begin() + long(e.target_start));
            if (const size_t kept = prompt.size() - size_t(fixed); kept < source_tokens)
                fmt::print(stderr, "note: --source lost its first {} tokens to leave room for {} new ones in max_seq "
                                   "{} (as eval cuts it)\n", source_tokens - kept, g.max_new_tokens, max_seq);
        }
        if (int64_t(prompt.size()) >= max_seq)
            throw bad_flag(flag, text, fmt::format("{} tokens leave no room for a new one in the base's max_seq {}",
                                                   prompt.size(), max_seq));
        if (int64_t(prompt.size()) + g.max_new_tokens > max_seq)
            throw bad_flag("--max-new-tokens", r["max-new-tokens"].as<std::string>(),
                           fmt::format("the prompt's {} tokens + {} new exceed the base's max_seq {}: at most {} "
                                       "new tokens fit",
                                       prompt.size(), g.max_new_tokens, max_seq, max_seq - int64_t(prompt.size())));
        g.top_k = int(flags::int_flag(r, "top-k", 0, std::numeric_limits<int>::max()));
        g.seed = uint64_t(flags::int_flag(r, "seed", 0));
        const double temperature = flags::real_flag(r, "temperature");
        if (temperature < 0 || temperature > std::numeric_limits<float>::max())
            throw bad_flag("--temperature", r["temperature"].as<std::string>(), "expected a number >= 0 (0: greedy)");
        g.temperature = float(temperature);
        g.stop_token = tok->eos_id();
        g.pad_token = tok->pad_id();
        g.validate(model->config());
        const auto out = generate(*model, {prompt}, g);
        fmt::print("{}\n", tok->decode(out[0]));
    } catch (const std::exception& e) {
        fmt::print(stderr, "generate: {}\n", e.what());
        return 2;
    }
    return 0;
}
