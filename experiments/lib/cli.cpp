// The experiments' common flags: declaring them, parsing and checking them
// into CommonArgs, and the method specs and budgets they describe.
#include <cmath>
#include <filesystem>

#include <limits>
#include <string_view>

#include <fmt/format.h>
#include <omp.h>

#include "datasets/batch.h"
#include "experiments/lib/flags.h"
#include "experiments/lib/harness.h"
#include "nn/dist.h"
#include "nn/presets.h"
#include "peft/registry.h"

namespace fs = std::filesystem;

namespace peftlab::harness {

MethodSpec make_spec(const CommonArgs& a, const std::string& entry) {
    const flags::MethodEntry e = flags::method_entry("--methods", entry);
    MethodSpec s{e.method, entry, {}, false, a.recompute};
    s.options.n = a.prefix_len;
    s.options.seed = a.seed;
    if (!e.settings.empty()) s.options.section(e.method) = e.settings;  // read by the method alone
    s.options.positions = a.positions.empty() ? "keep" : a.positions;
    return s;
}

Budget make_budget(const CommonArgs& a) {
    Budget b;
    b.steps = a.steps;
    b.lr = a.lr;
    b.batch = a.batch;
    b.grad_accum = a.grad_accum;
    b.eval_examples = a.eval_examples;
    b.patience = a.patience;
    return b;
}

double default_lr(const std::string& method) {
    std::vector<double> grid = default_lr_grid(method);
    return grid.empty() ? 0.0 : grid[grid.size() / 2];
}

void add_data_flags(cxxopts::Options& o, const CommonArgs& d, const std::string& recorded) {
    // With `recorded` (adapter eval: the data an adapter recorded), --task and --seed have no default
    // value of their own: their help names what is used instead, and parse_data_flags keeps d's.
    using Value = std::shared_ptr<const cxxopts::Value>;
    const bool own_defaults = recorded.empty();
    const std::string recorded_note = own_defaults ? "" : " (default: " + recorded + ")";
    const Value task_value = own_defaults ? Value(cxxopts::value<std::string>()->default_value(d.task))
                                          : Value(cxxopts::value<std::string>());
    const Value seed_value = own_defaults ? Value(cxxopts::value<uint64_t>()->default_value(std::to_string(d.seed)))
                                          : Value(cxxopts::value<uint64_t>());
    // clang-format off
    o.add_options()
        ("task", "built-in or registered task (its data also builds the word vocabulary): " + [] { std::string s; for (auto& t : data::task_names()) s += (s.empty() ? "" : ", ") + t; return s; }() + recorded_note,
            task_value)
        ("train", "training data file (.jsonl, .csv, .tsv) instead of --task; alone, it is split 80/10/10 by a seeded shuffle", cxxopts::value<std::string>()->default_value(d.files.train))
        ("valid", "validation data file (with --train)", cxxopts::value<std::string>()->default_value(d.files.valid))
        ("test", "test data file (with --train)", cxxopts::value<std::string>()->default_value(d.files.test))
        ("task-type", "generation or classification (default: classification when --text-field, --label-field or --label-words is given)", cxxopts::value<std::string>()->default_value(""))
        ("input-field", "generation: the field of the input", cxxopts::value<std::string>()->default_value(d.files.input_field))
        ("output-field", "generation: the field of the output (rows sharing an input are its references)", cxxopts::value<std::string>()->default_value(d.files.output_field))
        ("text-field", "classification: the field of the text", cxxopts::value<std::string>()->default_value(d.files.text_field))
        ("label-field", "classification: the field of the label", cxxopts::value<std::string>()->default_value(d.files.label_field))
        ("label-words", "classification: words the model answers for labels, as label=word,label=word (default: the labels)", cxxopts::value<std::string>()->default_value(""))
        ("truncate", "an example longer than the model's context (--seq, or the base's max_seq): left (cut the source's start), right (its end) or error", cxxopts::value<std::string>()->default_value(d.truncate))
        ("seed", "random seed" + recorded_note, seed_value);
    // clang-format on
}

void add_common_flags(cxxopts::Options& o, const CommonArgs& d) {
    // clang-format off
    o.add_options()
        ("h,help", "print this help")
        ("config", "dimension preset: tiny, demo, small, medium, or a GPT-2 size: gpt2, gpt2-medium, gpt2-large, "
                   "gpt2-xl (nn/presets.h; the vocabulary is always the tokenizer's)", cxxopts::value<std::string>()->default_value(d.config))
        ("d-model", "model width d", cxxopts::value<int64_t>())
        ("layers", "number of layers L", cxxopts::value<int>())
        ("heads", "attention heads", cxxopts::value<int>())
        ("d-ff", "MLP hidden width", cxxopts::value<int64_t>())
        ("seq", "context length T (max_seq)", cxxopts::value<int64_t>())
        ("batch", "global batch rows per update (split over MPI ranks and --grad-accum micro-batches)", cxxopts::value<int64_t>()->default_value(std::to_string(d.batch)))
        ("grad-accum", "micro-batches per update on each rank: K splits --batch into K forward/backward passes "
                       "weighted by their target tokens (same update as one batch)", cxxopts::value<int64_t>()->default_value(std::to_string(d.grad_accum)));
    add_data_flags(o, d);
    o.add_options()
        ("threads", "threads for OpenBLAS and OpenMP (0 = all cores; default: PEFTLAB_THREADS, else all cores; "
                    "capped at the cores)", cxxopts::value<int64_t>())
        ("out", d.fine_tunes ? "output directory" : "also copy the base model here (it is cached under runs/pretrain/ either way)", cxxopts::value<std::string>()->default_value(d.out))
        ("tokenizer", "word, byte, or gpt2:DIR (GPT-2 BPE from DIR/vocab.json + merges.txt or encoder.json + vocab.bpe)", cxxopts::value<std::string>()->default_value(d.tokenizer))
        ("base", "Hugging Face GPT-2 directory (config.json, model.safetensors, vocab.json + merges.txt): use it as the base, skip pretraining", cxxopts::value<std::string>()->default_value(d.base))
        ("positions", "adapters' position convention: hf (HF PEFT: real tokens after the n virtual ones) or keep; default hf with --base, else keep", cxxopts::value<std::string>()->default_value(d.positions))
        ("corpus", "UTF-8 text file to pretrain on (default: the task's own pretraining text, e.g. the petrov-* "
                   "tasks' digit sequences or WordNet's glosses, else the built-in restaurant corpus)", cxxopts::value<std::string>()->default_value(d.corpus))
        ("pretrain-steps", "base pretraining updates", cxxopts::value<int64_t>()->default_value(std::to_string(d.pretrain_steps)))
        ("pretrain-patience", "early stopping: evaluate every 1/20 of --pretrain-steps and stop after this many "
                              "evaluations without a lower valid loss, keeping the best weights (0: off)",
            cxxopts::value<int64_t>()->default_value(std::to_string(d.pretrain_patience)))
        ("max-memory", "GB a run may use (its estimated peak is checked up front; default: what the system has "
                       "available; 0: no check)", cxxopts::value<std::string>());
    if (d.fine_tunes)
        o.add_options()
        ("methods", "comma-separated PEFT methods (listed below), each optionally with settings of its own "
                    "options, METHOD:KEY=VALUE[:KEY=VALUE] (e.g. lora:r=4)", cxxopts::value<std::string>()->default_value(
            [&] { std::string s; for (auto& m : d.methods) s += (s.empty() ? "" : ",") + m; return s; }()))
        ("steps", "fine-tuning updates per method", cxxopts::value<int64_t>()->default_value(std::to_string(d.steps)))
        ("patience", fmt::format("fine-tuning early stopping: evaluate every max(1, floor(--steps / {0})) updates and "
                                 "stop after this many evaluations without a lower valid loss, keeping the best weights "
                                 "(0: off, the last weights; at least the number of evaluations, {0} when --steps is a "
                                 "multiple of {0}: never stops, keeps the best)", d.patience_evals),
            cxxopts::value<int64_t>()->default_value(std::to_string(d.patience)))
        ("lr", "learning rate (0 = " + d.lr_zero + ")", cxxopts::value<std::string>()->default_value(fmt::format("{}", d.lr)))
        ("prefix-len", "n: prompt / prefix vectors", cxxopts::value<int64_t>()->default_value(std::to_string(d.prefix_len)))
        ("n-train", "training examples (0 = task default)", cxxopts::value<size_t>()->default_value(std::to_string(d.n_train)))
        ("eval-examples", "test examples scored by generation (at most the test split)", cxxopts::value<int64_t>()->default_value(std::to_string(d.eval_examples)))
        ("recompute", "blocks whose activations are recomputed in backward instead of kept (all, none, top:k, bottom:k, "
                      "0,2): less memory, one more forward of them per step, same results",
            cxxopts::value<std::string>()->default_value(d.recompute));
    // clang-format on
}

std::string methods_help() {
    std::string s = "Methods (--methods):\n";
    for (const peft::MethodInfo& m : peft::methods()) s += fmt::format("  {:<16} {}\n", m.name, m.description);
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

void parse_data_flags(const cxxopts::ParseResult& r, CommonArgs& a) {
    // Given, or a default: add_data_flags' `recorded` leaves --task and --seed without one (a's stay).
    auto has_value = [&](const char* flag) { return r.count(flag) || r[flag].has_default(); };
    if (has_value("task")) a.task = r["task"].as<std::string>();
    try {
        data::task_info(a.task);
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(std::string("--task: ") + e.what());
    }
    if (has_value("seed")) a.seed = r["seed"].as<uint64_t>();
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
    // A field flag of the other task type would be read by nothing.
    for (const char* f : {"input-field", "output-field", "text-field", "label-field", "label-words", "task-type"}) {
        if (!r.count(f)) continue;
        const std::string given = r[f].as<std::string>();
        if (a.files.train.empty())
            throw std::invalid_argument(fmt::format("--{} {}: data-file flags need --train", f, given));
        const bool for_generation = std::string_view(f) == "input-field" || std::string_view(f) == "output-field";
        if (std::string_view(f) != "task-type" && for_generation == a.files.classification)
            throw std::invalid_argument(fmt::format(
                "--{} {}: applies to {} tasks, and this run is {} ({})", f, given,
                for_generation ? "generation" : "classification", for_generation ? "classification" : "generation",
                type.empty() ? "--text-field, --label-field or --label-words says so" : "--task-type " + type));
    }
    a.truncate = r["truncate"].as<std::string>();
    data::parse_truncate(a.truncate);
}

CommonArgs parse_common(const cxxopts::ParseResult& r, const CommonArgs& d) {
    for (const auto& [flag, reason] : d.taken_over)
        if (r.count(flag)) throw std::invalid_argument(fmt::format("--{}: {}; drop it", flag, reason));
    CommonArgs a = d;
    a.config = r["config"].as<std::string>();
    try {
        a.model = model_preset(a.config);  // vocab is set from the tokenizer
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(std::string("--config: ") + e.what());
    }
    // Dimensions reach int-sized code (token positions, BLAS sizes): beyond 2^31 - 1 they would wrap.
    auto positive = [&](const char* flag, int64_t v) {
        if (v < 1) throw std::invalid_argument(fmt::format("--{}: {} must be >= 1", flag, v));
        if (v > std::numeric_limits<int>::max())
            throw std::invalid_argument(fmt::format("--{}: {} must be <= {}", flag, v, std::numeric_limits<int>::max()));
        return v;
    };
    if (r.count("d-model")) a.model.d_model = positive("d-model", r["d-model"].as<int64_t>());
    if (r.count("layers")) a.model.n_layers = int(positive("layers", r["layers"].as<int>()));
    if (r.count("heads")) a.model.n_heads = int(positive("heads", r["heads"].as<int>()));
    if (r.count("d-ff")) a.model.d_ff = positive("d-ff", r["d-ff"].as<int64_t>());
    if (r.count("seq")) a.model.max_seq = positive("seq", r["seq"].as<int64_t>());
    a.batch = positive("batch", r["batch"].as<int64_t>());
    a.grad_accum = int(std::min<int64_t>(positive("grad-accum", r["grad-accum"].as<int64_t>()), 1 << 20));
    dist::check_shards(a.batch, dist::world().size() * a.grad_accum,
                       fmt::format("--batch {} with --grad-accum {} on {} rank(s)", a.batch, a.grad_accum,
                                   dist::world().size()).c_str());
    parse_data_flags(r, a);
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
    a.pretrain_patience = r["pretrain-patience"].as<int64_t>();
    if (a.pretrain_patience < 0)
        throw std::invalid_argument(fmt::format("--pretrain-patience: {} must be >= 0 (0: off)", a.pretrain_patience));
    if (r.count("max-memory")) a.max_memory = flags::memory_limit_bytes("--max-memory", flags::real_flag(r, "max-memory"));
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
        const std::string method = flags::method_entry("--methods", m).method;
        if (method != "none" && std::find(known.begin(), known.end(), method) == known.end())
            throw std::invalid_argument(fmt::format("--methods: unknown method '{}' (see --help)", m));
        if (std::find(a.methods.begin(), a.methods.begin() + long(i), m) != a.methods.begin() + long(i))
            throw std::invalid_argument(fmt::format("--methods: '{}' is listed twice in '{}'", m, list));
    }
    a.steps = positive("steps", r["steps"].as<int64_t>());
    a.patience = r["patience"].as<int64_t>();
    if (a.patience < 0) throw std::invalid_argument(fmt::format("--patience: {} must be >= 0 (0: off)", a.patience));
    a.lr = flags::real_flag(r, "lr");
    if (!(a.lr >= 0.0)) throw std::invalid_argument(fmt::format("--lr: {} must be >= 0", a.lr));
    a.prefix_len = r["prefix-len"].as<int64_t>();
    if (a.prefix_len < 0) throw std::invalid_argument(fmt::format("--prefix-len: {} must be >= 0", a.prefix_len));
    a.n_train = r["n-train"].as<size_t>();
    if (int64_t(a.n_train) > max_useful_train_examples(a) || int64_t(a.n_train) < 0)
        throw std::invalid_argument(fmt::format(
            "--n-train: {} examples is more than this run can use: it draws at most --steps x --batch = {} x {} "
            "examples per method (plus the learning-rate search); use --n-train <= {}",
            a.n_train, a.steps, a.batch, max_useful_train_examples(a)));
    a.eval_examples = positive("eval-examples", r["eval-examples"].as<int64_t>());
    a.recompute = r["recompute"].as<std::string>();
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

}  // namespace peftlab::harness
