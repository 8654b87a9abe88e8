// The pretrained base: its tokenizer and cache key, the checks a run makes
// before spending compute (check_run, the memory estimate), and pretraining
// into the cache (load_or_pretrain).
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include <fmt/format.h>
#include <sys/resource.h>

#include "autograd/threads.h"
#include "datasets/batch.h"
#include "datasets/corpus.h"
#include "datasets/gpt2_tokenizer.h"
#include "datasets/tasks.h"
#include "experiments/lib/harness.h"
#include "experiments/lib/run.h"
#include "nn/checkpoint.h"
#include "nn/dist.h"
#include "nn/hf_gpt2.h"
#include "nn/json_limits.h"
#include "nn/safetensors.h"
#include "nn/trainer.h"
#include "peft/registry.h"

namespace fs = std::filesystem;

namespace peftlab::harness {

using detail::fitted_task;
using detail::seconds_since;

uint64_t detail::fnv1a(std::string_view s, uint64_t h) {
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
}

std::unique_ptr<data::Tokenizer> base_tokenizer(const std::string& spec, const std::string& base_path) {
    if (!spec.empty() && spec.rfind("gpt2:", 0) != 0)
        throw std::invalid_argument(fmt::format("--tokenizer '{}': expected gpt2:DIR", spec));
    if (fs::is_directory(base_path)) {  // a Hugging Face GPT-2 directory: its own files, or --tokenizer's
        return std::make_unique<data::GPT2Tokenizer>(
            data::GPT2Tokenizer::from_dir(spec.empty() ? base_path : spec.substr(5)));
    }
    StMapped file(base_path);
    auto it = file.metadata().find("tokenizer");
    const std::string where = fmt::format("--base '{}': metadata 'tokenizer'", base_path);
    if (!spec.empty()) {
        // The files may have moved: --tokenizer names where they are now. The
        // vocabulary must still be the one the checkpoint was trained with.
        auto tok = std::make_unique<data::GPT2Tokenizer>(data::GPT2Tokenizer::from_dir(spec.substr(5)));
        if (it != file.metadata().end()) {
            const nlohmann::json rec = parse_json_limited(it->second, where);
            const auto text = [&](const char* key) {
                return rec.is_object() && rec.contains(key) && rec[key].is_string() ? rec[key].get<std::string>()
                                                                                     : std::string("?");
            };
            const std::string type = text("type"), fingerprint = text("fingerprint");
            if (type != "gpt2" || fingerprint != tok->fingerprint())
                throw std::invalid_argument(fmt::format(
                    "--tokenizer {}: its GPT-2 vocabulary has fingerprint {}, but {} records {} (a model runs only "
                    "with the vocabulary it was trained with)",
                    spec, tok->fingerprint(), where,
                    type == "gpt2" ? "fingerprint " + fingerprint : "a '" + type + "' tokenizer"));
        }
        return tok;
    }
    if (it == file.metadata().end())
        throw std::invalid_argument(fmt::format("--base '{}': the checkpoint records no tokenizer (not a base made by "
                                                "pretrain); pass --tokenizer gpt2:DIR",
                                                base_path));
    const nlohmann::json rec = parse_json_limited(it->second, where);  // its errors name `where` already
    try {
        return data::tokenizer_from_json(rec);
    } catch (const std::invalid_argument& e) {  // what the JSON says is wrong, named where it came from
        throw std::invalid_argument(fmt::format("{}: {}", where, e.what()));
    } catch (const std::runtime_error& e) {
        throw std::runtime_error(fmt::format("{}: {}", where, e.what()));
    }
}

void check_tokenizer_fits(const data::Tokenizer& tok, int64_t model_vocab, const std::string& base_path) {
    if (tok.vocab_size() > model_vocab)
        throw std::invalid_argument(fmt::format(
            "--base '{}': the tokenizer has {} tokens but the model's vocabulary (embedding rows) is {}, so ids {}..{} "
            "have no embedding; pass the tokenizer the model was trained with",
            base_path, tok.vocab_size(), model_vocab, model_vocab, tok.vocab_size() - 1));
}

// ---- the pretrained base --------------------------------------------------------------------

Base prepare_base(const CommonArgs& args) {
    if (!args.base.empty()) {  // a Hugging Face GPT-2: its own tokenizer and weights
        Base base;
        base.dir = base.model_path = args.base;
        base.hf = true;
        base.cached = true;
        base.tokenizer = std::make_unique<data::GPT2Tokenizer>(
            data::GPT2Tokenizer::from_dir(args.tokenizer.rfind("gpt2:", 0) == 0 ? args.tokenizer.substr(5) : args.base));
        base.config = load_hf_gpt2_config(args.base);
        check_tokenizer_fits(*base.tokenizer, base.config.vocab, args.base);
        return base;
    }
    // The tokenizer and corpus are cheap to rebuild; the model is what we cache.
    // The task at its default size, so that every --n-train shares one
    // vocabulary and therefore one cached base.
    CommonArgs default_size = args;
    default_size.n_train = 0;
    const data::Task task = load_task(default_size);
    std::string corpus_text;
    if (args.corpus.empty()) {
        corpus_text = task.corpus ? task.corpus(args.seed) : data::restaurant_corpus(data::kDefaultCorpusLines, args.seed);
        if (!task.corpus)
            fmt::print(stderr, "[pretrain] task {} brings no pretraining text: the built-in restaurant corpus is used "
                               "(--corpus FILE for text of your own)\n", task.name);
    } else {
        data::TextSplit split = data::load_text_corpus(args.corpus, 0.05, args.seed);
        corpus_text = split.train + split.valid;
    }
    Base base;
    if (args.tokenizer == "byte") {
        base.tokenizer = std::make_unique<data::ByteTokenizer>();
    } else if (args.tokenizer.rfind("gpt2:", 0) == 0) {
        base.tokenizer = std::make_unique<data::GPT2Tokenizer>(data::GPT2Tokenizer::from_dir(args.tokenizer.substr(5)));
    } else {
        // The vocabulary covers the domain: the corpus and every split of the
        // task, so that unseen venue names are distinct words (with untrained
        // embeddings) rather than <unk>.
        std::string vocab_text = corpus_text;
        for (const auto* split : {&task.train, &task.valid, &task.test})
            for (const data::Example& ex : *split) (vocab_text += '\n') += data::format_example(ex);
        base.tokenizer = std::make_unique<data::WordTokenizer>(data::WordTokenizer::build(vocab_text, 4000));
    }
    base.config = args.model;
    base.config.vocab = base.tokenizer->vocab_size();
    base.key = {{"config", base.config.to_json()},
                {"tokenizer", base.tokenizer->to_json()},
                // A corpus file by its content: an edited file is another base.
                {"corpus", args.corpus.empty() ? task.corpus_id
                                               : fmt::format("{} {:016x}", args.corpus, detail::fnv1a(corpus_text))},
                {"steps", args.pretrain_steps},
                {"seed", args.seed},
                {"batch", args.batch},
                {"format", 3}};  // bumped whenever the built-in corpus or the vocabulary's source changes
    if (args.pretrain_patience > 0) base.key["patience"] = args.pretrain_patience;
    // Split batches sum their gradients in another order: another base, bitwise.
    if (const int m = dist::world().size() * args.grad_accum; m > 1) base.key["micro_batches"] = m;
    base.dir = fmt::format("runs/pretrain/{:016x}", detail::fnv1a(base.key.dump()));
    base.model_path = base.dir + "/model.safetensors";
    base.cached = fs::exists(base.model_path);
    if (!base.cached) {
        try {
            base.corpus_tokens = data::encode_lines(*base.tokenizer, corpus_text);
        } catch (const std::invalid_argument& e) {  // a line the tokenizer refuses: whose text it is
            throw std::invalid_argument(fmt::format(
                "pretraining text ({}): {}", args.corpus.empty() ? "task " + task.name + "'s corpus" : "--corpus " + args.corpus,
                e.what()));
        }
    }
    return base;
}

namespace {

// Why no cached base fits `key`: the parts of the key (config fields, steps,
// seed, batch, corpus, tokenizer, format) in which the nearest cached base
// differs, e.g. "config.max_seq 48 -> 64, steps 4000 -> 20".
std::string why_new_base(const nlohmann::json& key) {
    std::error_code ec;
    if (!fs::is_directory("runs/pretrain", ec)) return "no base is cached yet (runs/pretrain/ does not exist)";
    std::string best;
    size_t best_n = SIZE_MAX;
    for (const auto& entry : fs::directory_iterator("runs/pretrain", ec)) {
        std::ifstream f(entry.path() / "pretrain.json");
        nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
        if (!j.is_object() || !j.contains("key") || !j["key"].is_object()) continue;
        const nlohmann::json& old = j["key"];
        std::vector<std::string> diffs;
        for (auto& [k, v] : key.items()) {
            if (old.contains(k) && old[k] == v) continue;
            if (k == "config" && old.contains(k) && old[k].is_object() && v.is_object()) {
                for (auto& [ck, cv] : v.items())
                    if (!old[k].contains(ck) || old[k][ck] != cv)
                        diffs.push_back(fmt::format("config.{} {} -> {}", ck,
                                                    old[k].contains(ck) ? old[k][ck].dump() : "(none)", cv.dump()));
            } else if (k == "tokenizer") {
                diffs.push_back("tokenizer (vocabulary: the task's data builds it)");
            } else {
                diffs.push_back(fmt::format("{} {} -> {}", k, old.contains(k) ? old[k].dump() : "(none)", v.dump()));
            }
        }
        if (diffs.size() < best_n) {
            best_n = diffs.size();
            best = entry.path().string() + " differs in: ";
            for (size_t i = 0; i < diffs.size(); ++i) best += (i ? ", " : "") + diffs[i];
        }
    }
    return best.empty() ? "no base is cached yet" : "the nearest cached base " + best;
}

// Pretraining windows: T tokens per row, at most the validation stream's length - 2.
int64_t pretrain_window(const Base& base) {
    const int64_t valid_len = int64_t(base.corpus_tokens.size()) / 20;
    return std::min<int64_t>(base.config.max_seq, valid_len - 2);
}

std::string gb(long double bytes) { return fmt::format("{:.2f} GB", double(bytes / 1e9L)); }

}  // namespace

long double base_param_count(const GPTConfig& c) {
    const long double d = c.d_model, F = c.d_ff, L = c.n_layers;
    // wte + wpe + per block (2 LayerNorms, q k v o with biases, the MLP) + ln_f (+ an untied head)
    return c.vocab * d + c.max_seq * d + L * (4 * d * d + 2 * d * F + F + 9 * d) + 2 * d +
           (c.tie_embeddings ? 0 : c.vocab * d);
}

int64_t scaled_pretrain_steps(long double n_params, int64_t tokens_per_param, int64_t tokens_per_step,
                              int64_t min_steps, int64_t max_steps) {
    if (max_steps > 0 && max_steps < min_steps)
        throw std::invalid_argument(
            fmt::format("--pretrain-max-steps: {} is below --pretrain-steps {}, the fewest steps of any base",
                        max_steps, min_steps));
    const long double scaled = std::ceil(tokens_per_param * n_params / (long double)tokens_per_step);
    // Compared as long double: a user's sizes can put the scaled count past int64.
    long double steps = std::max<long double>(min_steps, scaled);
    if (max_steps > 0) steps = std::min<long double>(steps, max_steps);
    if (steps > (long double)std::numeric_limits<int64_t>::max())
        throw std::invalid_argument(fmt::format(
            "--pretrain-tokens-per-param: {} tokens per parameter of {:.3g} parameters is {:.3g} updates, past "
            "any count of steps; set --pretrain-max-steps",
            tokens_per_param, (double)n_params, (double)steps));
    return int64_t(steps);
}

MemoryEstimate estimate_peak_bytes(const GPTConfig& c, int64_t batch, int64_t seq, long double trainable,
                                   bool trains_base, int64_t extra_tokens, int threads) {
    const long double f = 4;  // float32
    const long double d = c.d_model, F = c.d_ff, L = c.n_layers, B = batch, T = seq;
    const long double Tk = T + extra_tokens;
    MemoryEstimate m;
    m.weights = f * base_param_count(c) + (trains_base ? 0 : f * trainable);
    m.training_state = 3 * f * trainable;  // gradient + AdamW's two moments
    // Saved for backward per token and layer: LayerNorm outputs, q k v, the
    // attention output and projections, residuals (~16 d), fc, GELU in and
    // out (~3 d_ff); then the logits, their softmax and gradient (3 V per token).
    m.activations = f * (L * B * Tk * (16 * d + 3 * F) + 3 * B * T * c.vocab);
    // Attention's per-thread probabilities and their gradient, [Tq, Tk] each
    // (virtual tokens counted as queries too: prompt tuning's are).
    m.attention = f * std::max(threads, 1) * 2 * Tk * Tk;
    return m;
}

std::string MemoryEstimate::describe() const {
    return fmt::format("{} (weights {}, gradients and AdamW state {}, activations {}, attention scratch {})",
                       gb(total()), gb(weights), gb(training_state), gb(activations), gb(attention));
}

long double available_memory_bytes() {
    long double avail = -1;
    std::ifstream meminfo("/proc/meminfo");
    std::string name;
    long long kb = 0;
    std::string unit;
    while (meminfo >> name >> kb >> unit)
        if (name == "MemAvailable:") avail = (long double)kb * 1024;
    struct rlimit rl {};
    if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        long double used = 0;
        std::ifstream status("/proc/self/status");
        std::string line;
        while (std::getline(status, line))
            if (line.rfind("VmSize:", 0) == 0) used = std::stold(line.substr(7)) * 1024;
        const long double left = (long double)rl.rlim_cur - used;
        avail = avail < 0 ? left : std::min(avail, left);
    }
    return avail;
}

void check_run(const CommonArgs& a, const Base& base, const data::Task& task) {
    // --out: created and written to now, not after the first method has trained
    // (by rank 0, the one that writes).
    if (!a.out.empty() && dist::is_root()) {
        std::error_code ec;
        fs::create_directories(a.out, ec);
        const std::string probe = a.out + "/.write-test";
        std::ofstream f(probe);
        if (ec || !f || !(f << "ok") || !(f.flush()))
            throw std::invalid_argument(fmt::format("--out: cannot write to '{}'{}", a.out,
                                                    ec ? " (" + ec.message() + ")" : std::string()));
        f.close();
        fs::remove(probe, ec);
    }

    const GPTConfig& cfg = base.config;
    const int threads = std::max(1, peftlab::threads());
    const long double budget = a.max_memory > 0 ? (long double)a.max_memory : available_memory_bytes();
    const std::string budget_src =
        a.max_memory > 0 ? fmt::format("--max-memory {:.2f}", a.max_memory / 1e9) : "available memory";
    auto check_memory = [&](const std::string& what, const MemoryEstimate& m) {
        if (a.max_memory < 0 || budget < 0 || m.total() <= budget) return;
        throw std::invalid_argument(fmt::format(
            "{}: estimated peak memory {} exceeds the {} {} (config d={} L={} H={} d_ff={} T={} vocab={}, batch {}); "
            "use smaller sizes, or --max-memory GB to set the limit yourself (0: no check)",
            what, m.describe(), gb(budget), budget_src, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.max_seq,
            cfg.vocab, a.batch));
    };
    // The base alone must fit (before any adapter is priced: formulas of a huge model can overflow).
    check_memory("the base model", estimate_peak_bytes(cfg, 1, 1, 0, false, 0, 1));

    if (!base.cached) {
        const int64_t tokens = int64_t(base.corpus_tokens.size());
        const int64_t T = pretrain_window(base);
        if (T < cfg.max_seq)
            throw std::invalid_argument(fmt::format(
                "--corpus '{}': {} tokens give a validation stream of {} tokens, too short for pretraining windows "
                "of --seq {} tokens; the corpus needs at least 20 x (T + 2) = {} tokens (or use a smaller --seq)",
                a.corpus.empty() ? "(built-in)" : a.corpus, tokens, tokens / 20, cfg.max_seq, 20 * (cfg.max_seq + 2)));
        check_memory("pretraining", estimate_peak_bytes(cfg, a.batch, T, base_param_count(cfg), true, 0, threads));
    }
    if (!a.fine_tunes) return;

    // Sequence length: every target must fit with BOS, separator and EOS
    // (encode_example), and generation needs room for its new tokens after a prompt.
    const data::Tokenizer& tok = *base.tokenizer;
    const int64_t sep = int64_t(tok.encode(data::kSeparator).size());
    int64_t longest_target = 0, longest_example = 0;
    for (const auto* split : {&task.train, &task.valid, &task.test})
        for (const data::Example& ex : *split) {
            const int64_t t = int64_t(tok.encode(ex.target).size());
            longest_target = std::max(longest_target, t);
            longest_example = std::max(longest_example, int64_t(tok.encode(ex.source).size()) + sep + t + 2);
        }
    const int64_t max_new = task.defaults.max_new_tokens;
    // BOS, one source token at least, the separator, the target, EOS.
    const int64_t need = std::max(longest_target + sep + 3, max_new + 2);
    if (cfg.max_seq < need)
        throw std::invalid_argument(fmt::format(
            "--seq {} is too short for task {}: its longest target takes {} tokens with BOS, a source token, the "
            "separator and EOS, and generation needs {} new tokens after a prompt; use --seq >= {}",
            cfg.max_seq, task.name, longest_target + sep + 3, max_new, need));

    if (a.eval_examples > int64_t(task.test.size()))
        fmt::print(stderr, "note: --eval-examples {}: the {} test split has {} examples; scoring all {}\n",
                   a.eval_examples, task.name, task.test.size(), task.test.size());

    const int64_t T = std::min<int64_t>(cfg.max_seq, longest_example);
    for (const std::string& entry : a.methods) {
        MethodSpec spec = make_spec(a, entry);
        if (spec.method == "none") continue;
        std::unique_ptr<peft::Adapter> adapter = peft::make_adapter(spec.method, spec.options);
        const peft::ParamFormula pf = adapter->formula(cfg);
        if (pf.count <= 0)
            throw std::invalid_argument(fmt::format(
                "--methods {}: no trainable parameters with these options ({} = 0; --prefix-len {} and the entry's "
                "settings)",
                entry, pf.text, a.prefix_len));
        // Virtual tokens or prefix keys: the ones whose count follows --prefix-len.
        peft::AdapterOptions more = spec.options;
        more.n += 1;
        const bool uses_n = peft::make_adapter(spec.method, more)->formula(cfg).count != pf.count;
        const bool trains_base = adapter->changes_base();
        check_memory("--methods " + entry, estimate_peak_bytes(cfg, a.batch, T, (long double)pf.count, trains_base,
                                                               uses_n ? spec.options.n : 0, threads));
    }
}

Base load_or_pretrain(const CommonArgs& args) {
    Base base = prepare_base(args);
    check_run(args, base, fitted_task(args, *base.tokenizer, base.config.max_seq));
    if (!base.cached) fmt::print(stderr, "[pretrain] a new base in {}: {}\n", base.dir, why_new_base(base.key));
    if (dist::is_root()) fs::create_directories(base.dir);
    if (base.hf) {
        load_hf_gpt2(base.dir);  // validates the weights now, not in every run
        fmt::print(stderr, "[base] Hugging Face GPT-2 {} (d={} L={} V={})\n", base.dir, base.config.d_model,
                   base.config.n_layers, base.config.vocab);
        return base;
    }
    if (base.cached) {
        load_model_new(base.model_path);  // validates the cached file now, not in every run
        std::ifstream info(base.dir + "/pretrain.json");
        nlohmann::json j = nlohmann::json::parse(info, nullptr, false);
        base.pretrain_valid_loss = j.is_object() ? j.value("valid_loss", 0.0) : 0.0;
        base.pretrain_best_step = j.is_object() ? j.value("best_step", int64_t(0)) : 0;
        fmt::print(stderr, "[pretrain] cached base {} (valid loss {:.3f})\n", base.model_path, base.pretrain_valid_loss);
        return base;
    }

    auto t0 = std::chrono::steady_clock::now();
    std::vector<int32_t> stream = std::move(base.corpus_tokens);
    base.corpus_tokens.clear();
    const size_t valid_len = stream.size() / 20;
    std::vector<int32_t> valid(stream.end() - long(valid_len), stream.end());
    stream.resize(stream.size() - valid_len);
    const int T = int(std::min<int64_t>(base.config.max_seq, int64_t(valid_len) - 2));
    GPT model(base.config, args.seed);
    AdamWOptions ao;
    ao.lr = 2e-3;
    ao.weight_decay = 0.01;
    AdamW opt(trainable_named_parameters(model), ao);
    TrainOptions to;
    to.steps = args.pretrain_steps;
    to.clip_norm = 1.0;
    to.schedule = LRSchedule{ao.lr, std::max<int64_t>(1, args.pretrain_steps / 20), args.pretrain_steps,
                             LRSchedule::Decay::Cosine, 0.1};
    to.log_every = std::max<int64_t>(1, args.pretrain_steps / 10);
    // Valid loss every ~10% of the run (~5% when stopping early), and a
    // checkpoint every ~5%: a killed run started again resumes from the last
    // one (same data order, same curve).
    to.eval_every = std::max<int64_t>(1, args.pretrain_steps / (args.pretrain_patience > 0 ? 20 : 10));
    to.ckpt_every = std::max<int64_t>(1, args.pretrain_steps / 20);
    to.patience = args.pretrain_patience;
    to.early_stop_metric = "valid_loss";  // watched only when patience > 0
    to.resume = true;
    to.log_prefix = "[pretrain] ";
    to.data_seed = args.seed + 1;
    to.tokens_per_step = args.batch * T;
    to.grad_accum = args.grad_accum;
    to.out_dir = base.dir;
    const int64_t B = args.batch;
    // The global batch's B windows (drawn as make_lm_batch draws them), this shard's rows.
    auto window_offsets = [&](const std::vector<int32_t>& s, Rng& rng) {
        std::vector<size_t> offsets(static_cast<size_t>(B));
        for (auto& off : offsets) off = rng.below(uint32_t(s.size() - size_t(T)));
        return offsets;
    };
    auto loss_fn = [&](int64_t, Rng& rng, const dist::Shard& shard) -> MicroBatchLoss {
        const std::vector<size_t> all = window_offsets(stream, rng);
        const std::vector<size_t> mine(all.begin() + shard.begin(B), all.begin() + shard.end(B));
        data::Batch b = data::make_lm_batch(stream, mine, T);
        ModelInput in{b.B, T, b.tokens, b.positions, b.valid, b.source_len};
        return {model.loss(in, b.targets), counted_targets(b.targets)};
    };
    // The 8 validation batches shared out over the ranks, sums all-reduced.
    auto eval_fn = [&](int64_t) {
        dist::Communicator& comm = dist::world();
        Rng rng(args.seed + 7);
        double total = 0;
        const int n = 8;
        for (int i = 0; i < n; ++i) {
            const std::vector<size_t> offsets = window_offsets(valid, rng);
            if (i % comm.size() != comm.rank()) continue;
            data::Batch b = data::make_lm_batch(valid, offsets, T);
            ModelInput in{B, T, b.tokens, b.positions, b.valid, b.source_len};
            total += model.loss(in, b.targets).item();
        }
        comm.all_reduce_sum(&total, 1);
        return std::map<std::string, double>{{"valid_loss", total / n}};
    };
    fmt::print(stderr, "[pretrain] base: {} params, {} steps of {}x{} tokens -> {}\n", model.num_params(), args.pretrain_steps,
               B, T, base.dir);
    Trainer trainer(trainable_named_parameters(model), opt, loss_fn, to, eval_fn);
    TrainSummary s = trainer.run();
    if (!s.completed) throw std::runtime_error("pretraining stopped: " + s.stop_reason);
    base.pretrain_valid_loss = s.final_eval.count("valid_loss") ? s.final_eval.at("valid_loss") : s.final_loss;
    base.pretrain_best_step = s.best_step;
    base.pretrain_seconds = seconds_since(t0);
    if (dist::is_root()) {
        save_model(base.model_path, model, {{"tokenizer", base.tokenizer->to_json().dump()}});
        nlohmann::json info = {{"valid_loss", base.pretrain_valid_loss},
                               {"train_loss", s.final_loss},
                               {"seconds", base.pretrain_seconds},
                               {"steps_done", s.steps},
                               {"best_step", s.best_step},
                               {"key", base.key}};
        write_file_atomic(base.dir + "/pretrain.json", info.dump(2));
        fs::remove(trainer.checkpoint_path());  // the model file is what later runs need
    }
    // The other ranks load the base from rank 0's file (runs/ on a shared file system).
    dist::world().barrier();
    fmt::print(stderr, "[pretrain] done in {:.0f} s, valid loss {:.3f}{}\n", base.pretrain_seconds,
               base.pretrain_valid_loss,
               s.best_step > 0 ? fmt::format(" (the weights of step {} of {} run)", s.best_step, s.steps) : "");
    return base;
}

}  // namespace peftlab::harness
