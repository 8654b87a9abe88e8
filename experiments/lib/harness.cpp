#include "experiments/lib/harness.h"

#include "experiments/lib/flags.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "autograd/flops.h"
#include "autograd/tape.h"
#include "autograd/threads.h"
#include "datasets/batch.h"
#include "datasets/corpus.h"
#include "datasets/gpt2_tokenizer.h"
#include "datasets/metrics.h"
#include "nn/checkpoint.h"
#include "nn/generate.h"
#include "nn/safetensors.h"
#include "nn/trainer.h"
#include "peft/registry.h"

namespace fs = std::filesystem;

namespace peftlab::harness {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Dimension presets; vocab is set from the tokenizer.
GPTConfig preset(const std::string& name) {
    GPTConfig c;
    if (name == "tiny") {
        c.d_model = 64, c.n_layers = 2, c.n_heads = 4, c.d_ff = 256, c.max_seq = 48;
    } else if (name == "demo") {
        c.d_model = 128, c.n_layers = 4, c.n_heads = 4, c.d_ff = 512, c.max_seq = 48;
    } else if (name == "small") {
        c.d_model = 256, c.n_layers = 4, c.n_heads = 4, c.d_ff = 1024, c.max_seq = 128;
    } else if (name == "medium") {
        c.d_model = 512, c.n_layers = 8, c.n_heads = 8, c.d_ff = 2048, c.max_seq = 256;
    } else {
        throw std::invalid_argument(
            fmt::format("--config: unknown preset '{}' (known: tiny, demo, small, medium)", name));
    }
    return c;
}

// Stable 64-bit FNV-1a of a string (cache keys).
uint64_t fnv1a(const std::string& s) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
}

// Default split sizes and generation lengths per task.
struct TaskDefaults {
    size_t n_train, n_valid, n_test;
    int max_new_tokens;
};
TaskDefaults task_defaults(const std::string& task) {
    // e2e: a low-data regime (as Li & Liang's 50-500 example E2E subsets),
    // where what the base learned in pretraining shows; sweep-data goes larger.
    if (task == "e2e") return {300, 200, 200, 40};
    if (task == "classify") return {2000, 200, 200, 2};
    return {2000, 200, 200, 16};  // algorithmic
}

}  // namespace

std::vector<std::string> split_list(const std::string& s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ','))
        if (!item.empty()) out.push_back(item);
    return out;
}

int64_t parse_count(const std::string& flag, const std::string& item) {
    size_t used = 0;
    long long v = -1;
    try {
        v = std::stoll(item, &used);
    } catch (const std::exception&) {
    }
    if (used != item.size() || v < 0)
        throw std::invalid_argument(fmt::format("{}: '{}' is not a whole number >= 0", flag, item));
    return int64_t(v);
}

MethodSpec make_spec(const CommonArgs& a, const std::string& entry) {
    MethodSpec s{entry == "prefix-reparam" ? "prefix" : entry, entry, {}, false};
    s.options.n = a.prefix_len;
    s.options.lora_rank = a.lora_rank;
    s.options.lora_alpha = float(2 * a.lora_rank);
    s.options.seed = a.seed;
    s.options.reparam = entry == "prefix-reparam";
    s.options.reparam_hidden = 4 * a.model.d_model;
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
        ("config", "dimension preset: tiny, demo, small, medium", cxxopts::value<std::string>()->default_value(d.config))
        ("vocab", "vocabulary size (byte tokenizer only; word vocabularies are built from the data)", cxxopts::value<int64_t>())
        ("d-model", "model width d", cxxopts::value<int64_t>())
        ("layers", "number of layers L", cxxopts::value<int>())
        ("heads", "attention heads", cxxopts::value<int>())
        ("d-ff", "MLP hidden width", cxxopts::value<int64_t>())
        ("seq", "context length T (max_seq)", cxxopts::value<int64_t>())
        ("batch", "batch rows", cxxopts::value<int64_t>()->default_value(std::to_string(d.batch)))
        ("task", "task: " + [] { std::string s; for (auto& t : data::task_names()) s += (s.empty() ? "" : ", ") + t; return s; }(),
            cxxopts::value<std::string>()->default_value(d.task))
        ("methods", "comma-separated PEFT methods", cxxopts::value<std::string>()->default_value(
            [&] { std::string s; for (auto& m : d.methods) s += (s.empty() ? "" : ",") + m; return s; }()))
        ("seed", "random seed", cxxopts::value<uint64_t>()->default_value(std::to_string(d.seed)))
        ("threads", "threads for OpenBLAS and OpenMP (0 = all cores)", cxxopts::value<int>()->default_value(std::to_string(d.threads)))
        ("steps", "fine-tuning updates per method", cxxopts::value<int64_t>()->default_value(std::to_string(d.steps)))
        ("lr", "learning rate (0 = small per-method search)", cxxopts::value<double>()->default_value(fmt::format("{}", d.lr)))
        ("out", "output directory", cxxopts::value<std::string>()->default_value(d.out))
        ("prefix-len", "n: prompt / prefix vectors", cxxopts::value<int64_t>()->default_value(std::to_string(d.prefix_len)))
        ("lora-rank", "LoRA rank r (on q and v)", cxxopts::value<int64_t>()->default_value(std::to_string(d.lora_rank)))
        ("tokenizer", "word, byte, or gpt2:DIR (GPT-2 BPE from DIR/vocab.json + merges.txt or encoder.json + vocab.bpe)", cxxopts::value<std::string>()->default_value(d.tokenizer))
        ("corpus", "UTF-8 text file to pretrain on (default: the built-in restaurant corpus)", cxxopts::value<std::string>()->default_value(d.corpus))
        ("pretrain-steps", "base pretraining updates", cxxopts::value<int64_t>()->default_value(std::to_string(d.pretrain_steps)))
        ("n-train", "training examples (0 = task default)", cxxopts::value<size_t>()->default_value(std::to_string(d.n_train)))
        ("eval-examples", "test examples scored by generation", cxxopts::value<int64_t>()->default_value(std::to_string(d.eval_examples)));
    // clang-format on
}

CommonArgs parse_common(const cxxopts::ParseResult& r, const CommonArgs& d) {
    CommonArgs a = d;
    a.config = r["config"].as<std::string>();
    a.model = preset(a.config);
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
    const auto& names = data::task_names();
    if (std::find(names.begin(), names.end(), a.task) == names.end())
        throw std::invalid_argument(fmt::format("--task: unknown task '{}'", a.task));
    a.methods = split_list(r["methods"].as<std::string>());
    for (const std::string& m : a.methods) {
        auto known = peft::method_names();
        if (m != "none" && m != "prefix-reparam" && std::find(known.begin(), known.end(), m) == known.end())
            throw std::invalid_argument(fmt::format("--methods: unknown method '{}'", m));
    }
    a.seed = r["seed"].as<uint64_t>();
    a.threads = r["threads"].as<int>();
    if (a.threads < 0) throw std::invalid_argument(fmt::format("--threads: {} must be >= 0", a.threads));
    a.steps = positive("steps", r["steps"].as<int64_t>());
    a.lr = r["lr"].as<double>();
    if (!(a.lr >= 0.0)) throw std::invalid_argument(fmt::format("--lr: {} must be >= 0", a.lr));
    a.out = r["out"].as<std::string>();
    a.prefix_len = r["prefix-len"].as<int64_t>();
    if (a.prefix_len < 0) throw std::invalid_argument(fmt::format("--prefix-len: {} must be >= 0", a.prefix_len));
    a.lora_rank = positive("lora-rank", r["lora-rank"].as<int64_t>());
    a.tokenizer = r["tokenizer"].as<std::string>();
    if (a.tokenizer != "word" && a.tokenizer != "byte" && !(a.tokenizer.rfind("gpt2:", 0) == 0 && a.tokenizer.size() > 5))
        throw std::invalid_argument(fmt::format("--tokenizer: '{}' is not word, byte or gpt2:DIR", a.tokenizer));
    a.corpus = r["corpus"].as<std::string>();
    a.pretrain_steps = positive("pretrain-steps", r["pretrain-steps"].as<int64_t>());
    a.n_train = r["n-train"].as<size_t>();
    a.eval_examples = positive("eval-examples", r["eval-examples"].as<int64_t>());
    a.model.dropout = 0.f;
    return a;
}

CommonArgs parse_or_exit(cxxopts::Options& opts, int argc, char** argv, const CommonArgs& defaults,
                         cxxopts::ParseResult* result) {
    try {
        cxxopts::ParseResult r = flags::parse(opts, argc, argv);
        CommonArgs a = parse_common(r, defaults);
        set_threads(a.threads);
        if (result) *result = r;
        return a;
    } catch (const std::exception& e) {
        fmt::print(stderr, "{}: {}\n(see --help)\n", opts.program(), e.what());
        std::exit(2);
    }
}

// ---- the pretrained base --------------------------------------------------------------------

Base load_or_pretrain(const CommonArgs& args) {
    // The tokenizer and corpus are cheap to rebuild; the model is what we cache.
    std::string corpus_text;
    if (args.corpus.empty()) {
        corpus_text = data::restaurant_corpus(20000, args.seed);
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
        // The task at its default size, so that every --n-train shares one
        // vocabulary and therefore one cached base.
        std::string vocab_text = corpus_text;
        CommonArgs default_size = args;
        default_size.n_train = 0;
        data::TaskData task = load_task(default_size);
        for (const auto* split : {&task.train, &task.valid, &task.test})
            for (const data::Example& ex : *split) vocab_text += "\n" + data::format_example(ex);
        base.tokenizer = std::make_unique<data::WordTokenizer>(data::WordTokenizer::build(vocab_text, 4000));
    }
    base.config = args.model;
    base.config.vocab = base.tokenizer->vocab_size();
    nlohmann::json key = {{"config", base.config.to_json()},
                          {"tokenizer", base.tokenizer->to_json()},
                          {"corpus", args.corpus},
                          {"steps", args.pretrain_steps},
                          {"seed", args.seed},
                          {"batch", args.batch},
                          {"format", 3}};  // bumped whenever the built-in corpus or the vocabulary's source changes
    base.dir = fmt::format("runs/pretrain/{:016x}", fnv1a(key.dump()));
    base.model_path = base.dir + "/model.safetensors";
    fs::create_directories(base.dir);
    if (fs::exists(base.model_path)) {
        load_model_new(base.model_path);  // validates the cached file now, not in every run
        std::ifstream info(base.dir + "/pretrain.json");
        nlohmann::json j = nlohmann::json::parse(info, nullptr, false);
        base.pretrain_valid_loss = j.is_object() ? j.value("valid_loss", 0.0) : 0.0;
        base.cached = true;
        fmt::print("base model: cached {} (valid loss {:.3f})\n", base.model_path, base.pretrain_valid_loss);
        return base;
    }

    auto t0 = std::chrono::steady_clock::now();
    std::vector<int32_t> stream = data::encode_lines(*base.tokenizer, corpus_text);
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
    fmt::print("pretraining base: {} params, {} steps of {}x{} tokens -> {}\n", model.num_params(), args.pretrain_steps,
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
                           {"key", key}};
    write_file_atomic(base.dir + "/pretrain.json", info.dump(2));
    fs::remove(trainer.checkpoint_path());  // the model file is what later runs need
    fmt::print("base model: pretrained in {:.0f} s, valid loss {:.3f}\n", base.pretrain_seconds,
               base.pretrain_valid_loss);
    return base;
}

data::TaskData load_task(const CommonArgs& args) {
    TaskDefaults d = task_defaults(args.task);
    return data::make_task(args.task, args.n_train ? args.n_train : d.n_train, d.n_valid, d.n_test, args.seed + 100);
}

// ---- fine-tuning one method -------------------------------------------------------------------

std::vector<double> default_lr_grid(const std::string& method) {
    if (method == "full") return {3e-4, 1e-3, 3e-3};
    if (method == "lora" || method == "bitfit") return {1e-3, 3e-3, 1e-2};
    if (method == "none") return {};
    return {3e-3, 1e-2, 3e-2};  // prompt and prefix vectors move further per step
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
        r.model = load_model_new(base.model_path);
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

double valid_loss(Run& r, const data::TaskData& task, const data::Tokenizer& tok, int64_t batch) {
    NoGradGuard no_grad;
    r.model->eval();
    double total = 0;
    int64_t count = 0;
    for (size_t start = 0; start < task.valid.size(); start += size_t(batch)) {
        std::vector<size_t> idx;
        for (size_t i = start; i < std::min(task.valid.size(), start + size_t(batch)); ++i) idx.push_back(i);
        data::Batch b =
            data::make_conditional_batch(task.valid, idx, tok, int(r.model->config().max_seq), data::PadSide::Right);
        ModelInput in{b.B, b.T, b.tokens, b.positions, b.valid};
        total += r.model->loss(in, b.targets).item() * double(idx.size());
        count += int64_t(idx.size());
    }
    r.model->train();
    return total / double(count);
}

// Generation-based metric on the first n test examples.
void score(Run& r, const data::TaskData& task, const data::Tokenizer& tok, int64_t n, int64_t batch,
           MethodResult& res) {
    NoGradGuard no_grad;
    r.model->eval();
    const int max_new = task_defaults(task.name).max_new_tokens;
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
    res.metric_name = task.metric_name;
    std::vector<data::Example> ex(task.test.begin(), task.test.begin() + n);
    for (size_t i = 0; i < std::min<size_t>(3, ex.size()); ++i) {
        res.samples.emplace_back(ex[i].source, hyps[i]);
        fmt::print("  sample: {}{}{}\n", ex[i].source, data::kSeparator, hyps[i]);
    }
    if (task.metric_name == "bleu") {
        std::vector<std::vector<std::string>> refs;
        std::vector<std::map<std::string, std::string>> mrs;
        for (auto& e : ex) {
            refs.push_back(e.references);
            mrs.push_back(e.slots);
        }
        res.metric = data::corpus_bleu(hyps, refs).bleu;
        res.extra_metrics["slot_error_rate"] = data::slot_error_rate(hyps, mrs, data::e2e_lexicon()).rate;
    } else if (task.metric_name == "accuracy") {
        std::vector<int> pred, gold;
        for (size_t i = 0; i < ex.size(); ++i) {
            auto words = data::split_words(hyps[i]);
            auto it = std::find(task.labels.begin(), task.labels.end(), words.empty() ? "" : words[0]);
            pred.push_back(it == task.labels.end() ? -1 : int(it - task.labels.begin()));
            gold.push_back(int(std::find(task.labels.begin(), task.labels.end(), ex[i].target) - task.labels.begin()));
        }
        res.metric = data::accuracy(pred, gold);
    } else {
        std::vector<std::string> refs;
        for (auto& e : ex) refs.push_back(e.target);
        res.metric = data::exact_match(hyps, refs);
    }
}

// Trains run `r` for `steps` at `lr`; fills the curves when `res` is given.
TrainSummary train(Run& r, const data::TaskData& task, const data::Tokenizer& tok, int64_t steps, double lr,
                   int64_t batch, int64_t eval_every, uint64_t seed, MethodResult* res) {
    NamedTensors params = trained_tensors(r);
    AdamWOptions ao;
    ao.lr = lr;
    ao.weight_decay = r.adapter && r.adapter->method() == "full" ? 0.01 : 0.0;
    AdamW opt(params, ao);
    TrainOptions to;
    to.steps = steps;
    to.clip_norm = 1.0;
    to.schedule = LRSchedule{lr, std::max<int64_t>(1, steps / 10), steps, LRSchedule::Decay::Cosine, 0.1};
    to.log_every = res ? std::max<int64_t>(1, steps / 5) : 0;
    to.eval_every = res ? eval_every : 0;
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
void measure_step(Run& r, const data::TaskData& task, const data::Tokenizer& tok, int64_t batch, MethodResult& res) {
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

MethodResult run_method(const Base& base, const data::TaskData& task, const MethodSpec& spec, const Budget& budget,
                        const std::string& out_dir, uint64_t seed) {
    const data::Tokenizer& tok = *base.tokenizer;
    MethodResult res;
    res.method = spec.method;
    res.label = spec.label.empty() ? spec.method : spec.label;
    auto t_method = std::chrono::steady_clock::now();
    fmt::print("\n== {} ==\n", res.label);

    if (spec.method != "none") {
        std::vector<double> grid = budget.lr > 0            ? std::vector<double>{budget.lr}
                                   : budget.lr_grid.empty() ? default_lr_grid(spec.method)
                                                            : budget.lr_grid;
        double best_lr = grid[0], best = INFINITY;
        if (grid.size() > 1) {
            for (double lr : grid) {
                Run r = make_run(base, spec, seed);
                TrainSummary s = train(r, task, tok, budget.search_steps, lr, budget.batch, 0, seed, nullptr);
                double v = s.completed ? valid_loss(r, task, tok, budget.batch) : INFINITY;
                res.lr_search.emplace_back(lr, v);
                fmt::print("  lr search: lr {:.0e} -> valid loss {:.4f} after {} steps\n", lr, v, budget.search_steps);
                if (v < best) best = v, best_lr = lr;
            }
        }
        res.lr = best_lr;
        Run r = make_run(base, spec, seed);
        measure_step(r, task, tok, budget.batch, res);
        int64_t eval_every = budget.eval_every ? budget.eval_every : std::max<int64_t>(1, budget.steps / 5);
        TrainSummary s = train(r, task, tok, budget.steps, best_lr, budget.batch, eval_every, seed, &res);
        if (!s.completed) fmt::print(stderr, "  {} stopped early: {}\n", res.label, s.stop_reason);
        res.steps = s.steps;
        res.ms_per_step = s.ms_per_step;
        res.loss_curve = s.losses;
        for (auto& [n, t] : r.adapter->parameters()) res.trainable_params += t.numel();
        const bool full = r.adapter->method() == "full";  // its tensors are the base's own
        res.trainable_pct =
            100.0 * double(res.trainable_params) / double(r.model->num_params() + (full ? 0 : res.trainable_params));
        res.final_valid_loss = valid_loss(r, task, tok, budget.batch);
        score(r, task, tok, budget.eval_examples, budget.batch, res);
        if (!out_dir.empty()) {
            fs::create_directories(out_dir + "/adapters");
            save_named(out_dir + "/adapters/" + res.label + ".safetensors", r.adapter->parameters(),
                       {{"method", spec.method}, {"options", spec.options.to_json().dump()}});
        }
    } else {
        Run r = make_run(base, spec, seed);
        res.final_valid_loss = valid_loss(r, task, tok, budget.batch);
        score(r, task, tok, budget.eval_examples, budget.batch, res);
    }
    fmt::print("  -> valid loss {:.4f}, {} {:.4f} ({:.0f} s)\n", res.final_valid_loss, res.metric_name, res.metric,
               seconds_since(t_method));
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
                        {"lr", lr}};
    for (auto& [k, v] : extra_metrics) j["metric"][k] = v;
    j["samples"] = nlohmann::json::array();
    for (auto& [source, generated] : samples) j["samples"].push_back({{"source", source}, {"generated", generated}});
    nlohmann::json search = nlohmann::json::array();
    for (auto& [lr_, v] : lr_search) search.push_back({{"lr", lr_}, {"valid_loss", std::isfinite(v) ? v : -1.0}});
    j["lr_search"] = search;
    return j;
}

std::string results_table_md(const std::vector<MethodResult>& rs) {
    std::string s =
        "| method | trainable params | % | step GFLOP | ms/step | peak MB | valid loss | metric |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for (const MethodResult& r : rs) {
        std::string metric = fmt::format("{} {:.4f}", r.metric_name, r.metric);
        for (auto& [k, v] : r.extra_metrics) metric += fmt::format(", {} {:.3f}", k, v);
        s += fmt::format("| {} | {} | {:.3f} | {:.2f} | {:.0f} | {:.1f} | {:.4f} | {} |\n", r.label, r.trainable_params,
                         r.trainable_pct, double(r.step_flops) / 1e9, r.ms_per_step, double(r.peak_bytes) / 1e6,
                         r.final_valid_loss, metric);
    }
    return s;
}

void print_results_table(const std::vector<MethodResult>& rs) {
    fmt::print("\n{:<22} {:>12} {:>8} {:>10} {:>9} {:>9} {:>10} {:>10}\n", "method", "trainable", "%", "GFLOP/step",
               "ms/step", "peak MB", "valid", "metric");
    for (const MethodResult& r : rs)
        fmt::print("{:<22} {:>12} {:>8.3f} {:>10.2f} {:>9.0f} {:>9.1f} {:>10.4f} {:>10.4f}\n", r.label,
                   r.trainable_params, r.trainable_pct, double(r.step_flops) / 1e9, r.ms_per_step,
                   double(r.peak_bytes) / 1e6, r.final_valid_loss, r.metric);
}

std::string write_results(const std::string& dir, const std::string& experiment, const std::vector<MethodResult>& rs,
                          const nlohmann::json& extra) {
    fs::create_directories(dir);
    nlohmann::json j = extra;
    j["experiment"] = experiment;
    j["methods"] = nlohmann::json::array();
    for (const MethodResult& r : rs) j["methods"].push_back(r.to_json());
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
        "set ylabel '{}'\nset key outside right\nset grid\n{}plot ",
        path, title, xlabel, ylabel, log_x ? "set logscale x\n" : "");
    for (size_t i = 0; i < series.size(); ++i) {
        std::string data_path = fmt::format("{}/{}.dat", tmp_dir, i);
        std::ofstream f(data_path);
        for (auto& [x, y] : series[i].points) f << x << " " << y << "\n";
        script +=
            fmt::format("{}'{}' using 1:2 with linespoints title '{}'", i ? ", " : "", data_path, series[i].title);
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
