// Fine-tuning one method from the base: the learning-rate search, training
// at the best rate with its curves, a measured step, evaluation and the
// saved adapter (run_method).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>

#include <fmt/format.h>

#include "autograd/flops.h"
#include "autograd/tape.h"
#include "datasets/batch.h"
#include "experiments/lib/harness.h"
#include "experiments/lib/run.h"
#include "nn/checkpoint.h"
#include "nn/dist.h"
#include "nn/hf_gpt2.h"
#include "nn/optim.h"
#include "nn/trainer.h"
#include "peft/adapter_io.h"
#include "peft/registry.h"

namespace fs = std::filesystem;

namespace peftlab::harness {

using namespace detail;

double detail::seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::vector<double> default_lr_grid(const std::string& method) {
    if (method == "none") return {};
    return peft::make_adapter(method)->lr_grid();  // each method's own (Adapter::lr_grid)
}

Run detail::make_run(const Base& base, const MethodSpec& spec, uint64_t seed) {
    Run r;
    if (spec.random_base)
        r.model = std::make_unique<GPT>(base.config, seed + 999);
    else
        r.model = base.hf ? load_hf_gpt2(base.dir) : load_model_new(base.model_path);
    try {
        r.model->set_recompute(peft::parse_layers(spec.recompute, r.model->config().n_layers));
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(fmt::format("--recompute: {}", e.what()));
    }
    if (spec.method != "none") {
        r.adapter = peft::make_adapter(spec.method, spec.options);
        r.adapter->activate(*r.model);
    } else {
        r.model->freeze();
    }
    return r;
}

NamedTensors detail::trained_tensors(const Run& r) {
    if (!r.adapter) return {};
    NamedTensors out;
    for (auto& [n, t] : r.adapter->parameters()) out.emplace_back(n, t);
    return out;
}

namespace {

// Trains run `r` for `steps` at `lr`; fills the curves when `res` is given.
// patience > 0 (needs `res`): early stopping on the valid loss, the best weights kept.
TrainSummary train(Run& r, const data::Task& task, const data::Tokenizer& tok, int64_t steps, double lr,
                   int64_t batch, int grad_accum, int64_t eval_every, int64_t patience, uint64_t seed,
                   MethodResult* res, const std::string& prefix) {
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
    to.patience = res ? patience : 0;
    to.early_stop_metric = "valid_loss";  // watched only when patience > 0
    to.log_prefix = prefix;
    to.data_seed = seed;
    to.grad_accum = grad_accum;
    const int max_len = int(r.model->config().max_seq);
    // The global batch's example indices, then this shard's rows (padded to its own longest example).
    auto loss_fn = [&](int64_t, Rng& rng, const dist::Shard& shard) -> MicroBatchLoss {
        std::vector<size_t> idx(static_cast<size_t>(batch));
        for (auto& i : idx) i = rng.below(uint32_t(task.train.size()));
        const std::vector<size_t> mine(idx.begin() + shard.begin(batch), idx.begin() + shard.end(batch));
        data::Batch b = data::make_conditional_batch(task.train, mine, tok, max_len, data::PadSide::Right);
        ModelInput in{b.B, b.T, b.tokens, b.positions, b.valid, b.source_len};
        return {r.model->loss(in, b.targets), counted_targets(b.targets)};
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
        ModelInput in{b.B, b.T, b.tokens, b.positions, b.valid, b.source_len};
        Tensor loss = r.model->loss(in, b.targets);
        backward(loss);
        opt.step();
        opt.zero_grad();
    }
    flops::Counts c = flops::totals();
    res.step_flops = int64_t(flops::sum(c));
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
        {"P", c.max_seq}};
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
            TrainSummary s = train(r, task, tok, budget.search_steps, lr, budget.batch, budget.grad_accum, 0, 0, seed, nullptr,
                                   fmt::format("{} | lr search {}] ", tag, lr));
            double v = s.completed ? valid_loss(r, task, tok, budget.batch) : INFINITY;
            res.lr_search.emplace_back(lr, v);
            fmt::print(stderr, "{} | lr search] lr {} -> valid loss {:.4f} after {} steps\n", tag, lr, v,
                       budget.search_steps);
            if (v < best) best = v, best_lr = lr;
        };
        if (grid.size() > 1) {
            for (double lr : grid) try_lr(lr);
            // A best learning rate at the grid's edge means the search did not
            // bracket the optimum: step past that edge (same ratio as the grid's
            // end, to one significant digit: 1e-2 after 3e-3 gives 3e-2, not
            // 0.0333..., a rate a user can copy back as --lr) up to kExtend
            // times, then say so if it is still at the edge. Rates print in
            // their shortest exact form ({}), never rounded.
            constexpr int kExtend = 2;
            for (int e = 0; e < kExtend; ++e) {
                const double lo = grid.front(), hi = grid.back();
                double next = 0;
                if (best_lr == hi) next = hi * (hi / grid[grid.size() - 2]);
                else if (best_lr == lo) next = lo / (grid[1] / lo);
                else break;
                next = std::stod(fmt::format("{:.0e}", next));
                if (std::find(grid.begin(), grid.end(), next) != grid.end()) break;  // a grid finer than 1 digit
                fmt::print(stderr, "{} | lr search] best lr {} is at the grid's edge; trying {}\n", tag,
                           best_lr, next);
                if (next > hi) grid.push_back(next); else grid.insert(grid.begin(), next);
                try_lr(next);
            }
            if (best_lr == grid.front() || best_lr == grid.back()) {
                res.flags.push_back(fmt::format("lr at grid edge: best lr {} is the edge of the searched grid", best_lr));
                fmt::print(stderr, "{} | lr search] warning: {}\n", tag, res.flags.back());
            }
        }
        res.lr_grid = grid;
        res.lr = best_lr;
        Run r = make_run(base, spec, seed);
        // The base as it was before training: an adapter that trains the base itself is saved against it.
        // A random-init reference has no base on disk to load it onto, so it is not saved.
        const bool save = !out_dir.empty() && !spec.random_base;
        const std::string base_hash = save ? peft::base_hash(*r.model) : "";
        fmt::print("{}] {}\n", tag, trainable_params_line(*r.adapter, *r.model));
        measure_step(r, task, tok, budget.batch, res);
        // Early stopping looks more often, so it can stop near the best length.
        const int64_t eval_every =
            budget.eval_every ? budget.eval_every : std::max<int64_t>(1, budget.steps / (budget.patience > 0 ? 20 : 5));
        TrainSummary s = train(r, task, tok, budget.steps, best_lr, budget.batch, budget.grad_accum, eval_every,
                               budget.patience, seed, &res, fmt::format("{} | train lr {}] ", tag, best_lr));
        if (!s.completed) fmt::print(stderr, "{}] stopped early: {}\n", tag, s.stop_reason);
        res.steps = s.steps;
        res.best_step = s.completed ? s.best_step : 0;  // the Trainer sets it only under patience
        res.ms_per_step = s.ms_per_step;
        res.loss_curve = s.losses;
        for (auto& [n, t] : r.adapter->parameters()) res.trainable_params += t.numel();
        const bool full = r.adapter->changes_base();  // its tensors are the base's own
        res.trainable_pct =
            100.0 * double(res.trainable_params) / double(r.model->num_params() + (full ? 0 : res.trainable_params));
        res.final_valid_loss = valid_loss(r, task, tok, budget.batch);
        res.test_loss = split_loss(r, task.test, tok, budget.batch);
        score(r, task, tok, budget.eval_examples, budget.batch, res);
        if (save) {
            res.adapter_dir = out_dir + "/adapters/" + file_safe(res.label);
            if (dist::is_root()) {
                fs::create_directories(out_dir + "/adapters");
                // What it was trained on, and the content of those examples: adapter eval refuses edited files.
                nlohmann::json trained_on = task.recipe;
                if (!trained_on.is_null()) trained_on["content_hash"] = data_report_json(task).at("content_hash");
                peft::save_adapter(res.adapter_dir, *r.adapter, false, base_hash, trained_on);
            }
        }
    } else {
        Run r = make_run(base, spec, seed);
        res.final_valid_loss = valid_loss(r, task, tok, budget.batch);
        res.test_loss = split_loss(r, task.test, tok, budget.batch);
        score(r, task, tok, budget.eval_examples, budget.batch, res);
    }
    for (const std::string& f : res.flags) fmt::print(stderr, "{}] flag: {}\n", tag, f);
    const std::string kept = res.best_step > 0 ? fmt::format(", weights of update {}", res.best_step) : "";
    fmt::print(stderr, "{}] done: valid loss {:.4f} (selection split{}), test loss {:.4f}, {} {:.4f} ({:.0f} s)\n",
               tag, res.final_valid_loss, kept, res.test_loss, res.metric_name, res.metric, seconds_since(t_method));
    return res;
}

}  // namespace peftlab::harness
