#include "experiments/lib/harness.h"

#include "experiments/lib/flags.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <omp.h>
#include <sys/resource.h>

#include "autograd/flops.h"
#include "autograd/tape.h"
#include "autograd/threads.h"
#include "datasets/batch.h"
#include "datasets/corpus.h"
#include "datasets/gpt2_tokenizer.h"
#include "datasets/metrics.h"
#include "datasets/tasks.h"
#include "nn/checkpoint.h"
#include "nn/generate.h"
#include "nn/hf_gpt2.h"
#include "nn/presets.h"
#include "nn/safetensors.h"
#include "nn/trainer.h"
#include "peft/adapter_io.h"
#include "peft/registry.h"

namespace fs = std::filesystem;

namespace peftlab::harness {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Stable 64-bit FNV-1a of a string (cache keys).
uint64_t fnv1a(const std::string& s) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
}

}  // namespace

MethodSpec make_spec(const CommonArgs& a, const std::string& entry) {
    MethodSpec s{entry == "prefix-reparam" ? "prefix" : entry, entry, {}, false};
    s.options.n = a.prefix_len;
    s.options.seed = a.seed;
    // --lora-rank and the prefix-reparam entry are shorthands for two methods'
    // own option sections (peft/adapter.h); each method reads only its own.
    s.options.section("lora") = {{"r", a.lora_rank}, {"lora_alpha", double(2 * a.lora_rank)}};
    if (entry == "prefix-reparam") s.options.section(s.method) = {{"reparam", true}, {"reparam_hidden", 4 * a.model.d_model}};
    s.options.positions = a.positions.empty() ? "keep" : a.positions;
    return s;
}

Budget make_budget(const CommonArgs& a) {
    Budget b;
    b.steps = a.steps;
    b.lr = a.lr;
    b.batch = a.batch;
    b.eval_examples = a.eval_examples;
    return b;
}

double default_lr(const std::string& method) {
    std::vector<double> grid = default_lr_grid(method);
    return grid.empty() ? 0.0 : grid[grid.size() / 2];
}

void add_common_flags(cxxopts::Options& o, const CommonArgs& d) {
    // clang-format off
    o.add_options()
        ("h,help", "print this help")
        ("config", "dimension preset: tiny, demo, small, medium (nn/presets.h)", cxxopts::value<std::string>()->default_value(d.config))
        ("vocab", "vocabulary size (byte tokenizer only; word vocabularies are built from the data)", cxxopts::value<int64_t>())
        ("d-model", "model width d", cxxopts::value<int64_t>())
        ("layers", "number of layers L", cxxopts::value<int>())
        ("heads", "attention heads", cxxopts::value<int>())
        ("d-ff", "MLP hidden width", cxxopts::value<int64_t>())
        ("seq", "context length T (max_seq)", cxxopts::value<int64_t>())
        ("batch", "batch rows", cxxopts::value<int64_t>()->default_value(std::to_string(d.batch)))
        ("task", "built-in or registered task (its data also builds the word vocabulary): " + [] { std::string s; for (auto& t : data::task_names()) s += (s.empty() ? "" : ", ") + t; return s; }(),
            cxxopts::value<std::string>()->default_value(d.task))
        ("train", "training data file (.jsonl, .csv, .tsv) instead of --task; alone, it is split 80/10/10 by a seeded shuffle", cxxopts::value<std::string>()->default_value(d.files.train))
        ("valid", "validation data file (with --train)", cxxopts::value<std::string>()->default_value(d.files.valid))
        ("test", "test data file (with --train)", cxxopts::value<std::string>()->default_value(d.files.test))
        ("task-type", "generation or classification (default: classification when --text-field, --label-field or --label-words is given)", cxxopts::value<std::string>()->default_value(""))
        ("input-field", "generation: the field of the input", cxxopts::value<std::string>()->default_value(d.files.input_field))
        ("output-field", "generation: the field of the output (rows sharing an input are its references)", cxxopts::value<std::string>()->default_value(d.files.output_field))
        ("text-field", "classification: the field of the text", cxxopts::value<std::string>()->default_value(d.files.text_field))
        ("label-field", "classification: the field of the label", cxxopts::value<std::string>()->default_value(d.files.label_field))
        ("label-words", "classification: words the model answers for labels, as label=word,label=word (default: the labels)", cxxopts::value<std::string>()->default_value(""))
        ("truncate", "an example longer than --seq: left (cut the source's start), right (its end) or error", cxxopts::value<std::string>()->default_value(d.truncate))
        ("seed", "random seed", cxxopts::value<uint64_t>()->default_value(std::to_string(d.seed)))
        ("threads", "threads for OpenBLAS and OpenMP (0 = all cores; default: PEFTLAB_THREADS, else all cores; "
                    "capped at the cores)", cxxopts::value<int64_t>())
        ("out", d.fine_tunes ? "output directory" : "also copy the base model here (it is cached under runs/pretrain/ either way)", cxxopts::value<std::string>()->default_value(d.out))
        ("tokenizer", "word, byte, or gpt2:DIR (GPT-2 BPE from DIR/vocab.json + merges.txt or encoder.json + vocab.bpe)", cxxopts::value<std::string>()->default_value(d.tokenizer))
        ("base", "Hugging Face GPT-2 directory (config.json, model.safetensors, vocab.json + merges.txt): use it as the base, skip pretraining", cxxopts::value<std::string>()->default_value(d.base))
        ("positions", "adapters' position convention: hf (HF PEFT: real tokens after the n virtual ones) or keep; default hf with --base, else keep", cxxopts::value<std::string>()->default_value(d.positions))
        ("corpus", "UTF-8 text file to pretrain on (default: the built-in restaurant corpus)", cxxopts::value<std::string>()->default_value(d.corpus))
        ("pretrain-steps", "base pretraining updates", cxxopts::value<int64_t>()->default_value(std::to_string(d.pretrain_steps)))
        ("max-memory", "GB a run may use (its estimated peak is checked up front; default: what the system has "
                       "available; 0: no check)", cxxopts::value<double>());
    if (d.fine_tunes)
        o.add_options()
        ("methods", "comma-separated PEFT methods (listed below)", cxxopts::value<std::string>()->default_value(
            [&] { std::string s; for (auto& m : d.methods) s += (s.empty() ? "" : ",") + m; return s; }()))
        ("steps", "fine-tuning updates per method", cxxopts::value<int64_t>()->default_value(std::to_string(d.steps)))
        ("lr", "learning rate (0 = small per-method search)", cxxopts::value<double>()->default_value(fmt::format("{}", d.lr)))
        ("prefix-len", "n: prompt / prefix vectors", cxxopts::value<int64_t>()->default_value(std::to_string(d.prefix_len)))
        ("lora-rank", "LoRA rank r (on q and v)", cxxopts::value<int64_t>()->default_value(std::to_string(d.lora_rank)))
        ("n-train", "training examples (0 = task default)", cxxopts::value<size_t>()->default_value(std::to_string(d.n_train)))
        ("eval-examples", "test examples scored by generation (at most the test split)", cxxopts::value<int64_t>()->default_value(std::to_string(d.eval_examples)));
    // clang-format on
}

std::string methods_help() {
    std::string s = "Methods (--methods):\n";
    for (const peft::MethodInfo& m : peft::methods()) s += fmt::format("  {:<16} {}\n", m.name, m.description);
    s += fmt::format("  {:<16} {}\n", "prefix-reparam", "prefix trained through an MLP reparameterization (Li & Liang)");
    s += fmt::format("  {:<16} {}\n", "none", "no training: the unadapted base");
    return s;
}

namespace {
// A run draws steps * batch training examples per method (more with the
// learning-rate search); generating far more than that only costs time.
int64_t max_useful_train_examples(const CommonArgs& a) {
    return std::max<int64_t>(100000, 10 * a.steps * a.batch);
}
}  // namespace

CommonArgs parse_common(const cxxopts::ParseResult& r, const CommonArgs& d) {
    CommonArgs a = d;
    a.config = r["config"].as<std::string>();
    try {
        a.model = model_preset(a.config);  // vocab is set from the tokenizer
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(std::string("--config: ") + e.what());
    }
    auto positive = [&](const char* flag, int64_t v) {
        if (v < 1) throw std::invalid_argument(fmt::format("--{}: {} must be >= 1", flag, v));
        return v;
    };
    if (r.count("vocab")) a.model.vocab = positive("vocab", r["vocab"].as<int64_t>());
    if (r.count("d-model")) a.model.d_model = positive("d-model", r["d-model"].as<int64_t>());
    if (r.count("layers")) a.model.n_layers = int(positive("layers", r["layers"].as<int>()));
    if (r.count("heads")) a.model.n_heads = int(positive("heads", r["heads"].as<int>()));
    if (r.count("d-ff")) a.model.d_ff = positive("d-ff", r["d-ff"].as<int64_t>());
    if (r.count("seq")) a.model.max_seq = positive("seq", r["seq"].as<int64_t>());
    a.batch = positive("batch", r["batch"].as<int64_t>());
    a.task = r["task"].as<std::string>();
    try {
        data::task_info(a.task);
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(std::string("--task: ") + e.what());
    }
    a.seed = r["seed"].as<uint64_t>();
    a.files.train = r["train"].as<std::string>();
    a.files.valid = r["valid"].as<std::string>();
    a.files.test = r["test"].as<std::string>();
    if (a.files.train.empty() && (!a.files.valid.empty() || !a.files.test.empty()))
        throw std::invalid_argument(fmt::format("--{}: needs --train", a.files.valid.empty() ? "test" : "valid"));
    if (!a.files.train.empty() && r.count("task"))
        throw std::invalid_argument(fmt::format("--task {} and --train {}: give one (a task, or data files)", a.task,
                                                a.files.train));
    const std::string type = r["task-type"].as<std::string>();
    if (type != "" && type != "generation" && type != "classification")
        throw std::invalid_argument(fmt::format("--task-type: '{}' is not generation or classification", type));
    a.files.classification = type.empty() ? r.count("text-field") || r.count("label-field") || r.count("label-words")
                                          : type == "classification";
    a.files.input_field = r["input-field"].as<std::string>();
    a.files.output_field = r["output-field"].as<std::string>();
    a.files.text_field = r["text-field"].as<std::string>();
    a.files.label_field = r["label-field"].as<std::string>();
    a.files.label_words.clear();
    for (const std::string& item : flags::split_list(r["label-words"].as<std::string>())) {
        const size_t eq = item.find('=');
        if (eq == std::string::npos || eq == 0 || eq + 1 == item.size())
            throw std::invalid_argument(fmt::format("--label-words: '{}' is not label=word", item));
        if (!a.files.label_words.emplace(item.substr(0, eq), item.substr(eq + 1)).second)
            throw std::invalid_argument(fmt::format("--label-words: label '{}' is given twice", item.substr(0, eq)));
    }
    a.files.seed = a.seed + 100;
    a.truncate = r["truncate"].as<std::string>();
    data::parse_truncate(a.truncate);
    a.threads = 0;
    if (r.count("threads")) {
        const int64_t t = r["threads"].as<int64_t>();
        if (t < 0) throw std::invalid_argument(fmt::format("--threads: {} must be >= 0", t));
        a.threads = int(std::min<int64_t>(t, 1 << 20));
    }
    a.out = r["out"].as<std::string>();
    a.tokenizer = r["tokenizer"].as<std::string>();
    if (a.tokenizer != "word" && a.tokenizer != "byte" && !(a.tokenizer.rfind("gpt2:", 0) == 0 && a.tokenizer.size() > 5))
        throw std::invalid_argument(fmt::format("--tokenizer: '{}' is not word, byte or gpt2:DIR", a.tokenizer));
    a.corpus = r["corpus"].as<std::string>();
    a.base = r["base"].as<std::string>();
    if (!a.base.empty() && !fs::is_directory(a.base))
        throw std::invalid_argument(fmt::format("--base: '{}' is not a directory", a.base));
    a.positions = r["positions"].as<std::string>();
    if (a.positions.empty()) a.positions = a.base.empty() ? "keep" : "hf";
    if (a.positions != "hf" && a.positions != "keep")
        throw std::invalid_argument(fmt::format("--positions: '{}' is not hf or keep", a.positions));
    a.pretrain_steps = positive("pretrain-steps", r["pretrain-steps"].as<int64_t>());
    if (r.count("max-memory")) {
        const double gb = r["max-memory"].as<double>();
        if (!(gb >= 0) || !std::isfinite(gb))
            throw std::invalid_argument(fmt::format("--max-memory: {} must be a number of GB >= 0", gb));
        a.max_memory = gb == 0 ? -1.0 : gb * 1e9;
    }
    a.model.dropout = 0.f;
    if (!a.fine_tunes) return a;

    const std::string list = r["methods"].as<std::string>();
    a.methods = flags::split_list(list);
    if (a.methods.empty())
        throw std::invalid_argument(fmt::format("--methods: '{}' names no method (known: {})", list, [] {
            std::string s;
            for (auto& m : peft::method_names()) s += (s.empty() ? "" : ", ") + m;
            return s;
        }()));
    auto known = peft::method_names();
    for (size_t i = 0; i < a.methods.size(); ++i) {
        const std::string& m = a.methods[i];
        if (m != "none" && m != "prefix-reparam" && std::find(known.begin(), known.end(), m) == known.end())
            throw std::invalid_argument(fmt::format("--methods: unknown method '{}' (see --help)", m));
        if (std::find(a.methods.begin(), a.methods.begin() + long(i), m) != a.methods.begin() + long(i))
            throw std::invalid_argument(fmt::format("--methods: '{}' is listed twice in '{}'", m, list));
    }
    a.steps = positive("steps", r["steps"].as<int64_t>());
    a.lr = r["lr"].as<double>();
    if (!(a.lr >= 0.0)) throw std::invalid_argument(fmt::format("--lr: {} must be >= 0", a.lr));
    a.prefix_len = r["prefix-len"].as<int64_t>();
    if (a.prefix_len < 0) throw std::invalid_argument(fmt::format("--prefix-len: {} must be >= 0", a.prefix_len));
    a.lora_rank = positive("lora-rank", r["lora-rank"].as<int64_t>());
    a.n_train = r["n-train"].as<size_t>();
    if (int64_t(a.n_train) > max_useful_train_examples(a) || int64_t(a.n_train) < 0)
        throw std::invalid_argument(fmt::format(
            "--n-train: {} examples is more than this run can use: it draws at most --steps x --batch = {} x {} "
            "examples per method (plus the learning-rate search); use --n-train <= {}",
            a.n_train, a.steps, a.batch, max_useful_train_examples(a)));
    a.eval_examples = positive("eval-examples", r["eval-examples"].as<int64_t>());
    return a;
}

CommonArgs parse_or_exit(cxxopts::Options& opts, int argc, char** argv, const CommonArgs& defaults,
                         cxxopts::ParseResult* result) {
    try {
        cxxopts::ParseResult r = flags::parse(opts, argc, argv, defaults.fine_tunes ? methods_help() : "");
        CommonArgs a = parse_common(r, defaults);
        a.threads = flags::configure_threads(r.count("threads") ? std::optional<int64_t>(a.threads) : std::nullopt);
        fmt::print(stderr, "{}: {} thread{} ({} cores; GOMP_SPINCOUNT={})\n", opts.program(), a.threads,
                   a.threads == 1 ? "" : "s", omp_get_num_procs(),
                   std::getenv("GOMP_SPINCOUNT") ? std::getenv("GOMP_SPINCOUNT") : "unset");
        if (result) *result = r;
        return a;
    } catch (const std::exception& e) {
        fmt::print(stderr, "{}: {}\n(see --help)\n", opts.program(), e.what());
        std::exit(2);
    }
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
                {"corpus", args.corpus.empty() ? task.corpus_id : args.corpus},
                {"steps", args.pretrain_steps},
                {"seed", args.seed},
                {"batch", args.batch},
                {"format", 3}};  // bumped whenever the built-in corpus or the vocabulary's source changes
    base.dir = fmt::format("runs/pretrain/{:016x}", fnv1a(base.key.dump()));
    base.model_path = base.dir + "/model.safetensors";
    base.cached = fs::exists(base.model_path);
    if (!base.cached) base.corpus_tokens = data::encode_lines(*base.tokenizer, corpus_text);
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
    // --out: created and written to now, not after the first method has trained.
    if (!a.out.empty()) {
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
    const int64_t need = std::max(longest_target + sep + 1, max_new + 2);
    if (cfg.max_seq < need)
        throw std::invalid_argument(fmt::format(
            "--seq {} is too short for task {}: its longest target takes {} tokens with separator and EOS, and "
            "generation needs {} new tokens after a prompt; use --seq >= {}",
            cfg.max_seq, task.name, longest_target + sep + 1, max_new, need));

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
                "--methods {}: no trainable parameters with these options ({} = 0; --prefix-len {}, --lora-rank {})",
                entry, pf.text, a.prefix_len, a.lora_rank));
        // Virtual tokens or prefix keys: the ones whose count follows --prefix-len.
        peft::AdapterOptions more = spec.options;
        more.n += 1;
        const bool uses_n = peft::make_adapter(spec.method, more)->formula(cfg).count != pf.count;
        const bool trains_base = adapter->changes_base();
        check_memory("--methods " + entry, estimate_peak_bytes(cfg, a.batch, T, (long double)pf.count, trains_base,
                                                               uses_n ? spec.options.n : 0, threads));
    }
}

namespace {
// The task fitted to the base's tokenizer and context, quietly (load_task(args, base) prints its report).
data::Task fitted_task(const CommonArgs& args, const Base& base);
}  // namespace

Base load_or_pretrain(const CommonArgs& args) {
    Base base = prepare_base(args);
    check_run(args, base, fitted_task(args, base));
    if (!base.cached) fmt::print(stderr, "[pretrain] a new base in {}: {}\n", base.dir, why_new_base(base.key));
    fs::create_directories(base.dir);
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
    // Valid loss every ~10% of the run, and a checkpoint every ~5%: a killed
    // run started again resumes from the last one (same data order, same curve).
    to.eval_every = std::max<int64_t>(1, args.pretrain_steps / 10);
    to.ckpt_every = std::max<int64_t>(1, args.pretrain_steps / 20);
    to.resume = true;
    to.log_prefix = "[pretrain] ";
    to.data_seed = args.seed + 1;
    to.tokens_per_step = args.batch * T;
    to.out_dir = base.dir;
    const int64_t B = args.batch;
    auto loss_fn = [&](int64_t, Rng& rng) {
        data::Batch b = data::make_lm_batch(stream, int(B), T, rng);
        ModelInput in{B, T, b.tokens, b.positions, b.valid};
        return model.loss(in, b.targets);
    };
    auto eval_fn = [&](int64_t) {
        Rng rng(args.seed + 7);
        double total = 0;
        const int n = 8;
        for (int i = 0; i < n; ++i) {
            data::Batch b = data::make_lm_batch(valid, int(B), T, rng);
            ModelInput in{B, T, b.tokens, b.positions, b.valid};
            total += model.loss(in, b.targets).item();
        }
        return std::map<std::string, double>{{"valid_loss", total / n}};
    };
    fmt::print(stderr, "[pretrain] base: {} params, {} steps of {}x{} tokens -> {}\n", model.num_params(), args.pretrain_steps,
               B, T, base.dir);
    Trainer trainer(trainable_named_parameters(model), opt, loss_fn, to, eval_fn);
    TrainSummary s = trainer.run();
    if (!s.completed) throw std::runtime_error("pretraining stopped: " + s.stop_reason);
    base.pretrain_valid_loss = s.final_eval.count("valid_loss") ? s.final_eval.at("valid_loss") : s.final_loss;
    base.pretrain_seconds = seconds_since(t0);
    save_model(base.model_path, model, {{"tokenizer", base.tokenizer->to_json().dump()}});
    nlohmann::json info = {{"valid_loss", base.pretrain_valid_loss},
                           {"train_loss", s.final_loss},
                           {"seconds", base.pretrain_seconds},
                           {"key", base.key}};
    write_file_atomic(base.dir + "/pretrain.json", info.dump(2));
    fs::remove(trainer.checkpoint_path());  // the model file is what later runs need
    fmt::print(stderr, "[pretrain] done in {:.0f} s, valid loss {:.3f}\n", base.pretrain_seconds,
               base.pretrain_valid_loss);
    return base;
}

data::Task load_task(const CommonArgs& args) {
    if (!args.files.train.empty()) {
        data::FileTaskOptions o = args.files;
        o.n_train = args.n_train;
        return data::load_file_task(o);
    }
    const data::TaskDefaults& d = data::task_info(args.task).defaults;
    return data::make_task(args.task, args.n_train ? args.n_train : d.n_train, d.n_valid, d.n_test, args.seed + 100);
}

namespace {
data::Task fitted_task(const CommonArgs& args, const Base& base) {
    data::Task task = load_task(args);
    data::fit_to_context(task, *base.tokenizer, int(base.config.max_seq), data::parse_truncate(args.truncate));
    return task;
}
}  // namespace

data::Task load_task(const CommonArgs& args, const Base& base) {
    data::Task task = fitted_task(args, base);
    for (const std::string& note : task.report.notes) fmt::print(stderr, "[data] {}\n", note);
    for (const auto& [split, r] : task.report.splits) {
        std::string left_out;
        if (r.blank_rows) left_out += fmt::format(", {} blank rows left out", r.blank_rows);
        if (r.duplicate_rows) left_out += fmt::format(", {} duplicate rows left out", r.duplicate_rows);
        if (r.dropped_too_long) left_out += fmt::format(", {} left out as too long for --seq {}", r.dropped_too_long, base.config.max_seq);
        if (r.truncated) left_out += fmt::format(", {} sources cut to fit --seq {} (--truncate {})", r.truncated, base.config.max_seq, args.truncate);
        fmt::print(stderr, "[data] {} {}: {} examples ({} pairs{}){}\n", task.name, split, r.examples, r.pairs,
                   r.path.empty() ? "" : " from " + r.path, left_out);
    }
    return task;
}

nlohmann::json data_report_json(const data::Task& task) {
    nlohmann::json j = {{"task", task.name}, {"notes", task.report.notes}, {"left_out", task.report.left_out()}};
    for (const auto& [split, r] : task.report.splits)
        j["splits"][split] = {{"path", r.path},           {"rows", r.rows},
                              {"examples", r.examples},   {"pairs", r.pairs},
                              {"blank_rows", r.blank_rows}, {"duplicate_rows", r.duplicate_rows},
                              {"truncated", r.truncated}, {"dropped_too_long", r.dropped_too_long}};
    return j;
}

// ---- fine-tuning one method -------------------------------------------------------------------

std::vector<double> default_lr_grid(const std::string& method) {
    if (method == "none") return {};
    return peft::make_adapter(method)->lr_grid();  // each method's own (Adapter::lr_grid)
}

namespace {

// The model and adapter of one run, built fresh from the cached base.
struct Run {
    std::unique_ptr<GPT> model;
    std::unique_ptr<peft::Adapter> adapter;  // null for "none"
};

Run make_run(const Base& base, const MethodSpec& spec, uint64_t seed) {
    Run r;
    if (spec.random_base)
        r.model = std::make_unique<GPT>(base.config, seed + 999);
    else
        r.model = base.hf ? load_hf_gpt2(base.dir) : load_model_new(base.model_path);
    if (spec.method != "none") {
        r.adapter = peft::make_adapter(spec.method, spec.options);
        r.adapter->activate(*r.model);
    } else {
        r.model->freeze();
    }
    return r;
}

NamedTensors trained_tensors(const Run& r) {
    if (!r.adapter) return {};
    NamedTensors out;
    for (auto& [n, t] : r.adapter->parameters()) out.emplace_back(n, t);
    return out;
}

// Mean target-token loss over a split (the validation split by default).
double split_loss(Run& r, const std::vector<data::Example>& split, const data::Tokenizer& tok, int64_t batch) {
    NoGradGuard no_grad;
    r.model->eval();
    double total = 0;
    int64_t count = 0;
    for (size_t start = 0; start < split.size(); start += size_t(batch)) {
        std::vector<size_t> idx;
        for (size_t i = start; i < std::min(split.size(), start + size_t(batch)); ++i) idx.push_back(i);
        data::Batch b =
            data::make_conditional_batch(split, idx, tok, int(r.model->config().max_seq), data::PadSide::Right);
        ModelInput in{b.B, b.T, b.tokens, b.positions, b.valid};
        total += r.model->loss(in, b.targets).item() * double(idx.size());
        count += int64_t(idx.size());
    }
    r.model->train();
    return total / double(count);
}
double valid_loss(Run& r, const data::Task& task, const data::Tokenizer& tok, int64_t batch) {
    return split_loss(r, task.valid, tok, batch);
}

// Generation-based metric on the first n test examples.
void score(Run& r, const data::Task& task, const data::Tokenizer& tok, int64_t n, int64_t batch,
           MethodResult& res) {
    NoGradGuard no_grad;
    r.model->eval();
    const int max_new = task.defaults.max_new_tokens;
    const int64_t prompt_budget = r.model->config().max_seq - max_new;
    std::vector<std::string> hyps;
    n = std::min<int64_t>(n, int64_t(task.test.size()));
    for (int64_t start = 0; start < n; start += batch) {
        std::vector<std::vector<int32_t>> prompts;
        for (int64_t i = start; i < std::min(n, start + batch); ++i) {
            data::EncodedExample e = data::encode_example(task.test[size_t(i)], tok, int(prompt_budget) + 64);
            std::vector<int32_t> p(e.tokens.begin(), e.tokens.begin() + long(e.target_start));
            if (int64_t(p.size()) > prompt_budget)
                p.erase(p.begin() + 1, p.begin() + 1 + long(int64_t(p.size()) - prompt_budget));
            prompts.push_back(p);
        }
        GenerateOptions go;
        go.max_new_tokens = max_new;
        go.stop_token = tok.eos_id();
        go.pad_token = tok.pad_id();
        for (auto& out : generate(*r.model, prompts, go)) hyps.push_back(tok.decode(out));
    }
    r.model->train();
    std::vector<data::Example> ex(task.test.begin(), task.test.begin() + n);
    for (size_t i = 0; i < std::min<size_t>(3, ex.size()); ++i) {
        res.samples.emplace_back(ex[i].source, hyps[i]);
        fmt::print(stderr, "[{} | eval] sample: {}{}{}\n", res.label, ex[i].source, data::kSeparator, hyps[i]);
    }
    res.eval_examples = n;
    // Degenerate outputs: every generation empty, or all the same.
    const bool all_empty = std::all_of(hyps.begin(), hyps.end(), [](const std::string& h) { return h.empty(); });
    if (hyps.size() > 1 && all_empty)
        res.flags.push_back(fmt::format("empty generations: all {} outputs are empty", hyps.size()));
    else if (hyps.size() > 1 && std::all_of(hyps.begin(), hyps.end(), [&](const std::string& h) { return h == hyps[0]; }))
        res.flags.push_back(fmt::format("constant output: all {} generations are \"{}\"", hyps.size(), hyps[0]));
    res.metric_name = task.metric_name();
    if (ex.empty()) return;
    data::Score sc = task.score(ex, hyps);
    res.metric = sc.value;
    res.extra_metrics = sc.extra;
    // The task's own flag (e.g. a classifier answering one class) says more than "constant output".
    if (!sc.flags.empty())
        std::erase_if(res.flags, [](const std::string& f) { return f.rfind("constant output", 0) == 0; });
    res.flags.insert(res.flags.end(), sc.flags.begin(), sc.flags.end());
}

// Trains run `r` for `steps` at `lr`; fills the curves when `res` is given.
TrainSummary train(Run& r, const data::Task& task, const data::Tokenizer& tok, int64_t steps, double lr,
                   int64_t batch, int64_t eval_every, uint64_t seed, MethodResult* res, const std::string& prefix) {
    NamedTensors params = trained_tensors(r);
    AdamWOptions ao;
    ao.lr = lr;
    ao.weight_decay = r.adapter ? r.adapter->weight_decay() : 0.0;
    AdamW opt(params, ao);
    TrainOptions to;
    to.steps = steps;
    to.clip_norm = 1.0;
    to.schedule = LRSchedule{lr, std::max<int64_t>(1, steps / 10), steps, LRSchedule::Decay::Cosine, 0.1};
    to.log_every = res ? std::max<int64_t>(1, steps / 5) : 0;
    to.eval_every = res ? eval_every : 0;
    to.log_prefix = prefix;
    to.data_seed = seed;
    const int max_len = int(r.model->config().max_seq);
    auto loss_fn = [&](int64_t, Rng& rng) {
        std::vector<size_t> idx(static_cast<size_t>(batch));
        for (auto& i : idx) i = rng.below(uint32_t(task.train.size()));
        data::Batch b = data::make_conditional_batch(task.train, idx, tok, max_len, data::PadSide::Right);
        ModelInput in{b.B, b.T, b.tokens, b.positions, b.valid};
        return r.model->loss(in, b.targets);
    };
    Trainer::EvalFn eval_fn;
    if (res)
        eval_fn = [&](int64_t step) {
            double v = valid_loss(r, task, tok, batch);
            res->valid_curve.emplace_back(step, v);
            return std::map<std::string, double>{{"valid_loss", v}};
        };
    Trainer trainer(params, opt, loss_fn, to, eval_fn);
    return trainer.run();
}

// One measured training step: FLOPs from the counters, peak tracked bytes.
void measure_step(Run& r, const data::Task& task, const data::Tokenizer& tok, int64_t batch, MethodResult& res) {
    NamedTensors params = trained_tensors(r);
    AdamW opt(params, AdamWOptions{});
    std::vector<size_t> idx;
    for (int64_t i = 0; i < batch; ++i) idx.push_back(size_t(i) % task.train.size());
    data::Batch b =
        data::make_conditional_batch(task.train, idx, tok, int(r.model->config().max_seq), data::PadSide::Right);
    flops::reset();
    mem::reset_peak();
    {
        ModelInput in{b.B, b.T, b.tokens, b.positions, b.valid};
        Tensor loss = r.model->loss(in, b.targets);
        backward(loss);
        opt.step();
        opt.zero_grad();
    }
    flops::Counts c = flops::totals();
    res.step_flops = int64_t(c[0] + c[1] + c[2] + c[3]);
    res.peak_bytes = mem::peak_bytes();
}

}  // namespace

std::string file_safe(const std::string& label) {
    std::string out;
    for (char c : label) {
        const bool ok = std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
        if (ok)
            out += c;
        else if (!out.empty() && out.back() != '-')
            out += '-';
    }
    while (!out.empty() && (out.back() == '-' || out.back() == '.')) out.pop_back();
    return out.empty() ? "adapter" : out;
}

std::string trainable_params_line(const peft::Adapter& adapter, const GPT& model) {
    int64_t trainable = 0;
    for (auto& [n, t] : adapter.parameters()) trainable += t.numel();
    // The base's own tensors when the adapter trains them (full fine-tuning): not counted twice.
    bool owns_base = false;
    for (auto& [n, t] : adapter.parameters())
        for (auto& [bn, bt] : model.named_parameters())
            if (t.data() == bt.data()) owns_base = true;
    const int64_t all = model.num_params() + (owns_base ? 0 : trainable);
    const GPTConfig& c = model.config();
    const peft::ParamFormula pf = adapter.formula(c);
    // The formula's symbols with their values (L: the layers the options choose).
    // r and h come from the method's own options (LoRA's "r", a reparameterization's "reparam_hidden").
    const nlohmann::json own = adapter.options().section_or_empty(adapter.method());
    auto own_int = [&](const char* key) { return own.contains(key) && own[key].is_number() ? own[key].get<int64_t>() : 0; };
    const std::map<std::string, int64_t> values = {
        {"L", int64_t(peft::parse_layers(adapter.options().layers, c.n_layers).size())},
        {"n", adapter.options().n},
        {"d", c.d_model},
        {"F", c.d_ff},
        {"r", own_int("r")},
        {"h", own_int("reparam_hidden")},
        {"V", c.vocab},
        {"S", c.max_seq}};
    std::string vals;
    for (auto& [sym, v] : values) {
        bool present = false;
        for (size_t i = 0; i < pf.text.size(); ++i)
            if (pf.text.compare(i, sym.size(), sym) == 0 && (i == 0 || !std::isalpha((unsigned char)pf.text[i - 1])) &&
                (i + 1 >= pf.text.size() || !std::isalpha((unsigned char)pf.text[i + 1])))
                present = true;
        if (present) vals += fmt::format("{}{}={}", vals.empty() ? "" : ", ", sym, v);
    }
    auto commas = [](int64_t v) {
        std::string s = std::to_string(v), out;
        for (size_t i = 0; i < s.size(); ++i) {
            if (i && (s.size() - i) % 3 == 0) out += ',';
            out += s[i];
        }
        return out;
    };
    return fmt::format("trainable params: {} || all params: {} || trainable%: {:.3f} ({} = {}{}{})", commas(trainable),
                       commas(all), 100.0 * double(trainable) / double(all), pf.text, commas(pf.count),
                       vals.empty() ? "" : "; ", vals);
}

MethodResult run_method(const Base& base, const data::Task& task, const MethodSpec& spec, const Budget& budget,
                        const std::string& out_dir, uint64_t seed) {
    const data::Tokenizer& tok = *base.tokenizer;
    MethodResult res;
    res.method = spec.method;
    res.label = spec.label.empty() ? spec.method : spec.label;
    auto t_method = std::chrono::steady_clock::now();
    const std::string tag = "[" + res.label;
    fmt::print(stderr, "{}] start\n", tag);

    if (spec.method != "none") {
        std::vector<double> grid = budget.lr > 0            ? std::vector<double>{budget.lr}
                                   : budget.lr_grid.empty() ? default_lr_grid(spec.method)
                                                            : budget.lr_grid;
        double best_lr = grid[0], best = INFINITY;
        auto try_lr = [&](double lr) {
            Run r = make_run(base, spec, seed);
            TrainSummary s = train(r, task, tok, budget.search_steps, lr, budget.batch, 0, seed, nullptr,
                                   fmt::format("{} | lr search {:.0e}] ", tag, lr));
            double v = s.completed ? valid_loss(r, task, tok, budget.batch) : INFINITY;
            res.lr_search.emplace_back(lr, v);
            fmt::print(stderr, "{} | lr search] lr {:.0e} -> valid loss {:.4f} after {} steps\n", tag, lr, v,
                       budget.search_steps);
            if (v < best) best = v, best_lr = lr;
        };
        if (grid.size() > 1) {
            for (double lr : grid) try_lr(lr);
            // A best learning rate at the grid's edge means the search did not
            // bracket the optimum: step past that edge (same ratio as the grid's
            // end) up to kExtend times, then say so if it is still at the edge.
            constexpr int kExtend = 2;
            for (int e = 0; e < kExtend; ++e) {
                const double lo = grid.front(), hi = grid.back();
                double next = 0;
                if (best_lr == hi) next = hi * (hi / grid[grid.size() - 2]);
                else if (best_lr == lo) next = lo / (grid[1] / lo);
                else break;
                fmt::print(stderr, "{} | lr search] best lr {:.0e} is at the grid's edge; trying {:.0e}\n", tag,
                           best_lr, next);
                if (next > hi) grid.push_back(next); else grid.insert(grid.begin(), next);
                try_lr(next);
            }
            if (best_lr == grid.front() || best_lr == grid.back()) {
                res.flags.push_back(fmt::format("lr at grid edge: best lr {:.0e} is the edge of the searched grid", best_lr));
                fmt::print(stderr, "{} | lr search] warning: {}\n", tag, res.flags.back());
            }
        }
        res.lr_grid = grid;
        res.lr = best_lr;
        Run r = make_run(base, spec, seed);
        // The base as it was before training: an adapter that trains the base itself is saved against it.
        const std::string base_hash = out_dir.empty() ? "" : peft::base_hash(*r.model);
        fmt::print("{}] {}\n", tag, trainable_params_line(*r.adapter, *r.model));
        measure_step(r, task, tok, budget.batch, res);
        int64_t eval_every = budget.eval_every ? budget.eval_every : std::max<int64_t>(1, budget.steps / 5);
        TrainSummary s = train(r, task, tok, budget.steps, best_lr, budget.batch, eval_every, seed, &res,
                               fmt::format("{} | train lr {:.0e}] ", tag, best_lr));
        if (!s.completed) fmt::print(stderr, "{}] stopped early: {}\n", tag, s.stop_reason);
        res.steps = s.steps;
        res.ms_per_step = s.ms_per_step;
        res.loss_curve = s.losses;
        for (auto& [n, t] : r.adapter->parameters()) res.trainable_params += t.numel();
        const bool full = r.adapter->changes_base();  // its tensors are the base's own
        res.trainable_pct =
            100.0 * double(res.trainable_params) / double(r.model->num_params() + (full ? 0 : res.trainable_params));
        res.final_valid_loss = valid_loss(r, task, tok, budget.batch);
        res.test_loss = split_loss(r, task.test, tok, budget.batch);
        score(r, task, tok, budget.eval_examples, budget.batch, res);
        if (!out_dir.empty()) {
            res.adapter_dir = out_dir + "/adapters/" + file_safe(res.label);
            fs::create_directories(out_dir + "/adapters");
            peft::save_adapter(res.adapter_dir, *r.adapter, false, base_hash);
        }
    } else {
        Run r = make_run(base, spec, seed);
        res.final_valid_loss = valid_loss(r, task, tok, budget.batch);
        res.test_loss = split_loss(r, task.test, tok, budget.batch);
        score(r, task, tok, budget.eval_examples, budget.batch, res);
    }
    for (const std::string& f : res.flags) fmt::print(stderr, "{}] flag: {}\n", tag, f);
    fmt::print(stderr, "{}] done: valid loss {:.4f} (LR-selection split), test loss {:.4f}, {} {:.4f} ({:.0f} s)\n",
               tag, res.final_valid_loss, res.test_loss, res.metric_name, res.metric, seconds_since(t_method));
    return res;
}

MethodResult evaluate(std::unique_ptr<GPT> model, std::unique_ptr<peft::Adapter> adapter, const data::Tokenizer& tok,
                      const data::Task& task, int64_t eval_examples, int64_t batch, const std::string& label) {
    MethodResult res;
    res.method = adapter ? adapter->method() : "none";
    res.label = label;
    Run r;
    r.model = std::move(model);
    r.adapter = std::move(adapter);
    if (r.adapter) {
        for (auto& [n, t] : r.adapter->parameters()) res.trainable_params += t.numel();
        fmt::print("[{}] {}\n", label, trainable_params_line(*r.adapter, *r.model));
    }
    res.final_valid_loss = valid_loss(r, task, tok, batch);
    res.test_loss = split_loss(r, task.test, tok, batch);
    score(r, task, tok, eval_examples, batch, res);
    return res;
}

// ---- outputs ------------------------------------------------------------------------------------

nlohmann::json MethodResult::to_json() const {
    nlohmann::json j = {{"method", method},
                        {"label", label},
                        {"trainable_params", trainable_params},
                        {"trainable_pct", trainable_pct},
                        {"step_flops", step_flops},
                        {"ms_per_step", ms_per_step},
                        {"peak_bytes", peak_bytes},
                        {"final_valid_loss", final_valid_loss},
                        {"metric", {{"name", metric_name}, {"value", metric}}},
                        {"steps", steps},
                        {"lr", lr},
                        {"lr_grid", lr_grid},
                        {"selection_split", "valid"},
                        {"test_loss", test_loss},
                        {"eval_examples", eval_examples},
                        {"flags", flags},
                        {"adapter_dir", adapter_dir}};
    for (auto& [k, v] : extra_metrics) j["metric"][k] = v;
    j["samples"] = nlohmann::json::array();
    for (auto& [source, generated] : samples) j["samples"].push_back({{"source", source}, {"generated", generated}});
    nlohmann::json search = nlohmann::json::array();
    for (auto& [lr_, v] : lr_search) search.push_back({{"lr", lr_}, {"valid_loss", std::isfinite(v) ? v : -1.0}});
    j["lr_search"] = search;
    nlohmann::json vc = nlohmann::json::array();
    for (auto& [step, v] : valid_curve) vc.push_back({step, v});
    j["valid_curve"] = vc;
    return j;
}

MethodResult MethodResult::from_json(const nlohmann::json& j) {
    MethodResult r;
    r.method = j.at("method");
    r.label = j.at("label");
    r.trainable_params = j.value("trainable_params", int64_t(0));
    r.trainable_pct = j.value("trainable_pct", 0.0);
    r.step_flops = j.value("step_flops", int64_t(0));
    r.ms_per_step = j.value("ms_per_step", 0.0);
    r.peak_bytes = j.value("peak_bytes", int64_t(0));
    r.final_valid_loss = j.value("final_valid_loss", 0.0);
    r.test_loss = j.value("test_loss", 0.0);
    r.eval_examples = j.value("eval_examples", int64_t(0));
    r.metric_name = j.at("metric").at("name");
    r.metric = j.at("metric").at("value");
    for (auto& [k, v] : j.at("metric").items())
        if (k != "name" && k != "value") r.extra_metrics[k] = v.get<double>();
    for (auto& smp : j.value("samples", nlohmann::json::array())) r.samples.emplace_back(smp.at("source"), smp.at("generated"));
    r.steps = j.value("steps", int64_t(0));
    r.lr = j.value("lr", 0.0);
    r.lr_grid = j.value("lr_grid", std::vector<double>{});
    for (auto& e : j.value("lr_search", nlohmann::json::array())) r.lr_search.emplace_back(e.at("lr"), e.at("valid_loss"));
    r.loss_curve = j.value("loss_curve", std::vector<double>{});
    for (auto& e : j.value("valid_curve", nlohmann::json::array())) r.valid_curve.emplace_back(e.at(0), e.at(1));
    r.flags = j.value("flags", std::vector<std::string>{});
    r.adapter_dir = j.value("adapter_dir", std::string());
    return r;
}

void flag_below_base(std::vector<MethodResult>& rs) {
    const MethodResult* base = nullptr;
    for (const MethodResult& r : rs)
        if (r.method == "none") base = &r;
    if (!base) return;
    const double ref = base->metric;
    for (MethodResult& r : rs) {
        if (&r == base || r.metric >= ref) continue;
        const std::string f = fmt::format("below base: {} {:.4f} < the unadapted base's {:.4f}", r.metric_name,
                                          r.metric, ref);
        if (std::find(r.flags.begin(), r.flags.end(), f) == r.flags.end()) r.flags.push_back(f);
    }
}

std::map<std::string, MethodResult> finished_results(const std::string& path, const nlohmann::json& settings) {
    std::map<std::string, MethodResult> out;
    std::ifstream f(path);
    if (!f) return out;
    nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
    if (!j.is_object() || !j.contains("methods") || !j["methods"].is_array()) return out;
    for (auto& [k, v] : settings.items())
        if (!j.contains(k) || j[k] != v) {
            fmt::print(stderr, "{}: from other settings ({} differs): every method runs again\n", path, k);
            return out;
        }
    try {
        for (const nlohmann::json& m : j["methods"]) {
            MethodResult r = MethodResult::from_json(m);
            out[r.label] = r;
        }
    } catch (const std::exception& e) {
        fmt::print(stderr, "{}: unreadable ({}): every method runs again\n", path, e.what());
        out.clear();
    }
    return out;
}

std::string results_table_md(const std::vector<MethodResult>& rs) {
    std::string s =
        "| method | trainable params | % | step GFLOP | ms/step | peak MB | valid loss (LR-selection split) | "
        "test loss (held out) | metric (test) | flags |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
    for (const MethodResult& r : rs) {
        std::string metric = fmt::format("{} {:.4f}", r.metric_name, r.metric);
        for (auto& [k, v] : r.extra_metrics) metric += fmt::format(", {} {:.3f}", k, v);
        std::string flags;
        for (const std::string& f : r.flags) flags += (flags.empty() ? "" : "; ") + f;
        s += fmt::format("| {} | {} | {:.3f} | {:.2f} | {:.0f} | {:.1f} | {:.4f} | {:.4f} | {} | {} |\n", r.label,
                         r.trainable_params, r.trainable_pct, double(r.step_flops) / 1e9, r.ms_per_step,
                         double(r.peak_bytes) / 1e6, r.final_valid_loss, r.test_loss, metric, flags);
    }
    return s;
}

void print_results_table(const std::vector<MethodResult>& rs) {
    fmt::print("\n{:<22} {:>12} {:>8} {:>10} {:>9} {:>9} {:>10} {:>10} {:>10}\n", "method", "trainable", "%",
               "GFLOP/step", "ms/step", "peak MB", "valid*", "test loss", "metric");
    for (const MethodResult& r : rs) {
        fmt::print("{:<22} {:>12} {:>8.3f} {:>10.2f} {:>9.0f} {:>9.1f} {:>10.4f} {:>10.4f} {:>10.4f}\n", r.label,
                   r.trainable_params, r.trainable_pct, double(r.step_flops) / 1e9, r.ms_per_step,
                   double(r.peak_bytes) / 1e6, r.final_valid_loss, r.test_loss, r.metric);
        for (const std::string& f : r.flags) fmt::print("{:<22}   flag: {}\n", "", f);
    }
    fmt::print("valid*: loss on the validation split, the one the learning rate was chosen on; "
               "test loss and metric: the held-out test split\n");
}

std::string write_results(const std::string& dir, const std::string& experiment, const std::vector<MethodResult>& rs,
                          const nlohmann::json& extra) {
    fs::create_directories(dir);
    nlohmann::json j = extra;
    j["experiment"] = experiment;
    j["methods"] = nlohmann::json::array();
    for (const MethodResult& r : rs) {
        j["methods"].push_back(r.to_json());
        j["methods"].back()["loss_curve"] = r.loss_curve;
    }
    write_file_atomic(dir + "/results.json", j.dump(2));

    std::string csv = "method,step,train_loss,valid_loss\n";
    for (const MethodResult& r : rs) {
        std::map<int64_t, double> valid(r.valid_curve.begin(), r.valid_curve.end());
        for (size_t i = 0; i < r.loss_curve.size(); ++i) {
            int64_t step = int64_t(i) + 1;
            auto it = valid.find(step);
            csv += fmt::format("{},{},{:.6f},{}\n", r.label, step, r.loss_curve[i],
                               it == valid.end() ? "" : fmt::format("{:.6f}", it->second));
        }
    }
    write_file_atomic(dir + "/metrics.csv", csv);

    std::vector<Series> curves;
    for (const MethodResult& r : rs) {
        if (r.loss_curve.empty()) continue;
        Series s{r.label, {}};
        // A running mean over 10 updates keeps the plot readable.
        double acc = 0;
        for (size_t i = 0; i < r.loss_curve.size(); ++i) {
            acc += r.loss_curve[i];
            if (i >= 10) acc -= r.loss_curve[i - 10];
            s.points.emplace_back(double(i + 1), acc / double(std::min<size_t>(i + 1, 10)));
        }
        curves.push_back(s);
    }
    plot_png(dir + "/loss_curves.png", experiment + ": training loss (running mean of 10)", "update", "loss", curves);

    // Validation loss during training beside it, with the unadapted base as a line.
    std::vector<Series> valid;
    double max_step = 1;
    for (const MethodResult& r : rs) max_step = std::max(max_step, double(r.loss_curve.size()));
    for (const MethodResult& r : rs) {
        if (r.method == "none") {
            valid.push_back({r.label, {{0.0, r.final_valid_loss}, {max_step, r.final_valid_loss}}, "lines dashtype 2"});
            continue;
        }
        if (r.valid_curve.empty()) continue;
        Series v{r.label, {}};
        for (auto& [step, loss] : r.valid_curve) v.points.emplace_back(double(step), loss);
        valid.push_back(v);
    }
    plot_png(dir + "/valid_curves.png", experiment + ": validation loss during training", "update", "valid loss",
             valid);
    return results_table_md(rs);
}

bool plot_png(const std::string& path, const std::string& title, const std::string& xlabel, const std::string& ylabel,
              const std::vector<Series>& series, bool log_x) {
    if (series.empty()) return false;
    if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
        fmt::print(stderr, "gnuplot not found: {} not drawn (make deps installs gnuplot-nox)\n", path);
        return false;
    }
    const std::string tmp_dir = path + ".plotdata";
    fs::create_directories(tmp_dir);
    std::string script = fmt::format(
        "set terminal pngcairo size 900,560 noenhanced\nset output '{}.tmp'\nset title '{}'\nset xlabel '{}'\n"
        "set ylabel '{}'\nset key outside right\nset grid\nset offsets graph 0.03, graph 0.03, graph 0.08, graph 0.08\n"
        "set colorsequence podo\n{}plot ",
        path, title, xlabel, ylabel, log_x ? "set logscale x\n" : "");
    for (size_t i = 0; i < series.size(); ++i) {
        std::string data_path = fmt::format("{}/{}.dat", tmp_dir, i);
        std::ofstream f(data_path);
        for (auto& [x, y] : series[i].points) f << x << " " << y << "\n";
        const std::string style = series[i].style.empty() ? "linespoints pointsize 1.2" : series[i].style;
        script += fmt::format("{}'{}' using 1:2 with {} linewidth 2 title '{}'", i ? ", " : "", data_path, style,
                              series[i].title);
        // A series of one point (one method on a scatter plot) carries its label beside it.
        if (series[i].points.size() == 1)
            script += fmt::format(", '{}' using 1:2:(\"{}\") with labels offset 1,1 left notitle", data_path,
                                  series[i].title);
    }
    script += "\n";
    const std::string script_path = tmp_dir + "/plot.gp";
    std::ofstream(script_path) << script;
    int rc = std::system(fmt::format("gnuplot '{}' 2>/dev/null", script_path).c_str());
    fs::remove_all(tmp_dir);
    if (rc != 0) {
        fmt::print(stderr, "gnuplot failed to draw {}\n", path);
        fs::remove(path + ".tmp");
        return false;
    }
    fs::rename(path + ".tmp", path);
    return true;
}

}  // namespace peftlab::harness
