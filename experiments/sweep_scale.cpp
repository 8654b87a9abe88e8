// sweep-scale: the gap to full fine-tuning against base size, in miniature.
//
// Lester et al. (2021, "The Power of Scale for Parameter-Efficient Prompt
// Tuning", Fig. 1) report prompt tuning closing the gap to full fine-tuning
// only at billions of parameters. This sweep asks the same question at the
// sizes a 2-core machine trains: for each base size (d_model x layers), a
// base pretrained with a budget that grows with its parameter count, then
// every method fine-tuned on the task under one budget; the gap of each
// method is its test loss minus full fine-tuning's on the same base (and the
// same for the task's metric). Output: runs/sweep-scale/{report.md,
// results.json, gap_vs_params.png}.
#include <algorithm>

#include <fmt/format.h>

#include "experiments/lib/flags.h"
#include "experiments/lib/harness.h"
#include "mpi/world.h"
#include "nn/safetensors.h"
#include "peft/registry.h"

using namespace peftlab;
using namespace peftlab::harness;

namespace {

// One base size: d_model x n_layers, heads of 32 dimensions (at least 1),
// d_ff = 4 d; vocabulary and context from the run's --config.
struct Size {
    int64_t d_model = 0;
    int n_layers = 0;
    std::string name() const { return fmt::format("{}x{}", d_model, n_layers); }
};

// "128x4" -> {128, 4}; throws naming --sizes and the item.
Size parse_size(const std::string& item) {
    const size_t x = item.find('x');
    if (x == std::string::npos)
        throw std::invalid_argument(fmt::format("--sizes: '{}' is not DxL (d_model x layers, e.g. 128x4)", item));
    Size s;
    s.d_model = flags::whole_number("--sizes", item.substr(0, x), 8);
    s.n_layers = int(flags::whole_number("--sizes", item.substr(x + 1), 1, std::numeric_limits<int>::max()));
    if (s.d_model > 4096 || s.n_layers > 64)
        throw std::invalid_argument(fmt::format("--sizes: '{}' is beyond this sweep (d <= 4096, L <= 64)", item));
    return s;
}

}  // namespace

int main(int argc, char** argv) {
    peftlab::mpi::World world(&argc, &argv);  // several ranks under mpirun, else one process
    CommonArgs d;
    d.methods = {"full", "prompt", "prefix", "prefix-kv", "lora"};  // method-names: the study's default (Lester et al.'s comparison), --methods overrides
    d.steps = 200;
    d.out = "runs/sweep-scale";
    d.eval_examples = 100;
    d.pretrain_steps = 300;  // here the fewest pretraining steps of any size (the budget grows with size)
    d.lr_zero = "a search over each method's few rates";
    for (const char* dim : {"d-model", "layers", "heads", "d-ff"})
        d.taken_over[dim] = "sweep-scale sets the dimensions of each base from --sizes";
    d.taken_over["base"] = "sweep-scale pretrains its own bases of --sizes";
    cxxopts::Options opts("sweep-scale", "Gap of each PEFT method to full fine-tuning against base size");
    add_common_flags(opts, d);
    opts.add_options()
        ("sizes", "base sizes DxL (d_model x layers; max(1, D / 32) heads, d_ff 4D), smallest first",
            cxxopts::value<std::string>()->default_value("48x2,96x3,160x4,256x6"))
        ("pretrain-tokens-per-param", "pretraining budget: tokens per base parameter (steps = this x params / "
                                      "(batch x seq), at least --pretrain-steps)",
            cxxopts::value<std::string>()->default_value("4"))
        ("pretrain-max-steps", "ceiling on any base's pretraining steps (0: none); a capped base is marked in the "
                               "report with its uncapped budget",
            cxxopts::value<std::string>()->default_value("0"));
    cxxopts::ParseResult r;
    CommonArgs a = parse_or_exit(opts, argc, argv, d, &r);
    try {
        std::vector<Size> sizes;
        for (const std::string& item : flags::split_list(r["sizes"].as<std::string>())) sizes.push_back(parse_size(item));
        if (sizes.empty()) throw std::invalid_argument("--sizes: names no size (e.g. 48x2,96x3)");
        const int64_t tokens_per_param = flags::int_flag(r, "pretrain-tokens-per-param", 1);
        const int64_t steps_min = a.pretrain_steps;
        const int64_t steps_max = flags::int_flag(r, "pretrain-max-steps", 0);
        scaled_pretrain_steps(0, tokens_per_param, 1, steps_min, steps_max);  // the flags' errors before any work
        // The reference every gap is taken against: the registered method that trains the base weights.
        std::string reference;
        for (const std::string& entry : a.methods) {
            const MethodSpec spec = make_spec(a, entry);
            if (peft::make_adapter(spec.method, spec.options)->changes_base()) reference = entry;
        }
        if (reference.empty())
            throw std::invalid_argument("--methods: the gap needs a method that trains the base weights (full fine-tuning)");

        std::vector<MethodResult> all;
        nlohmann::json per_size = nlohmann::json::array();
        std::map<std::string, Series> loss_gap, metric_gap;
        std::string table = "| base | params | pretrain steps | pretrain valid loss | method | trainable | updates kept | "
                            "test loss | gap (loss) | metric | gap (metric) |\n"
                            "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|\n";
        std::string metric_name;
        for (const Size& size : sizes) {
            CommonArgs s = a;
            s.model.d_model = size.d_model;
            s.model.n_layers = size.n_layers;
            s.model.n_heads = int(std::max<int64_t>(1, size.d_model / 32));
            s.model.d_ff = 4 * size.d_model;
            // The config with the tokenizer's vocabulary, before any training: the budget depends on it.
            const GPTConfig cfg = prepare_base(s).config;
            const double n_params = double(base_param_count(cfg));
            const int64_t T = cfg.max_seq;
            const int64_t budget_steps = scaled_pretrain_steps(n_params, tokens_per_param, s.batch * T, steps_min, 0);
            s.pretrain_steps = scaled_pretrain_steps(n_params, tokens_per_param, s.batch * T, steps_min, steps_max);
            const bool capped = s.pretrain_steps < budget_steps;
            Base base = load_or_pretrain(s);
            data::Task task = load_task(s, base);
            metric_name = task.metric_name();
            Budget budget = make_budget(s);
            std::map<std::string, MethodResult> by_method;
            for (const std::string& entry : s.methods) {
                MethodSpec spec = make_spec(s, entry);
                spec.label = fmt::format("{} @ {}", entry, size.name());
                by_method[entry] = run_method(base, task, spec, budget, "", s.seed);
                all.push_back(by_method[entry]);
            }
            const MethodResult& ref = by_method.at(reference);
            // With --pretrain-patience: the step the base's weights are from, of the budget.
            std::string steps = base.pretrain_best_step > 0
                                    ? fmt::format("{} of {}", base.pretrain_best_step, s.pretrain_steps)
                                    : std::to_string(s.pretrain_steps);
            if (capped) steps += fmt::format(" (capped; budget {})", budget_steps);
            nlohmann::json rows = nlohmann::json::array();
            for (const std::string& entry : s.methods) {
                const MethodResult& m = by_method[entry];
                const double gl = m.test_loss - ref.test_loss, gm = m.metric - ref.metric;
                if (entry != reference) {
                    loss_gap[entry].title = entry;
                    loss_gap[entry].points.emplace_back(n_params, gl);
                    metric_gap[entry].title = entry;
                    metric_gap[entry].points.emplace_back(n_params, gm);
                }
                rows.push_back({{"method", entry}, {"trainable_params", m.trainable_params}, {"test_loss", m.test_loss},
                                {"loss_gap", gl}, {"metric", m.metric}, {"metric_gap", gm}, {"lr", m.lr},
                                {"steps", m.steps}, {"best_step", m.best_step}});
                // With --patience: the update whose weights were kept, of the budget.
                const std::string kept =
                    m.best_step > 0 ? fmt::format("{} of {}", m.best_step, s.steps) : std::to_string(m.steps);
                table += fmt::format("| {} | {:.2f}M | {} | {:.4f} | {} | {} | {} | {:.4f} | {:+.4f} | {:.4f} | {:+.4f} |\n",
                                     size.name(), n_params / 1e6, steps, base.pretrain_valid_loss, entry,
                                     m.trainable_params, kept, m.test_loss, gl, m.metric, gm);
            }
            per_size.push_back({{"size", size.name()},
                                {"config", base.config.to_json()},
                                {"base_params", n_params},
                                {"pretrain_steps", s.pretrain_steps},
                                {"pretrain_best_step", base.pretrain_best_step},
                                {"pretrain_budget_steps", budget_steps},
                                {"pretrain_tokens", s.pretrain_steps * s.batch * T},
                                {"pretrain_valid_loss", base.pretrain_valid_loss},
                                {"methods", rows}});
        }
        std::vector<Series> loss_series, metric_series;
        for (auto& [m, sr] : loss_gap) loss_series.push_back(sr);
        for (auto& [m, sr] : metric_gap) metric_series.push_back(sr);
        write_results(a.out, "sweep-scale", all,
                      {{"task", a.task}, {"reference", reference}, {"sizes", per_size},
                       {"pretrain_tokens_per_param", tokens_per_param}, {"pretrain_steps_min", steps_min},
                       {"pretrain_steps_max", steps_max}});
        plot_png(a.out + "/gap_vs_params.png", "test loss gap to " + reference + " against base size",
                 "base parameters", "test loss - " + reference + "'s", loss_series, true);
        plot_png(a.out + "/metric_gap_vs_params.png", metric_name + " gap to " + reference + " against base size",
                 "base parameters", metric_name + " - " + reference + "'s", metric_series, true);
        if (peftlab::dist::is_root())
            write_file_atomic(
                a.out + "/report.md",
                fmt::format("# sweep-scale on `{}`\n\nBases d x L (heads of 32 dimensions, d_ff 4d), each pretrained "
                            "for max({}, {} tokens per parameter / (batch {} x seq)) steps{}{}; then every method for {} "
                            "updates{} (lr {}: 0 = each method's grid search), seed {}. Gap: the method's test loss "
                            "(and {}) minus {}'s on the same base.\n\n{}\nPlots: `gap_vs_params.png`, "
                            "`metric_gap_vs_params.png`.\n",
                            a.task, steps_min, tokens_per_param, a.batch,
                            steps_max > 0 ? fmt::format(" (at most {})", steps_max) : "",
                            early_stopping_words(a.pretrain_patience), a.steps, early_stopping_words(a.patience),
                            a.lr, a.seed, metric_name,
                            reference, table));
        fmt::print("\n{}\nreport: {}/report.md  plots: {}/gap_vs_params.png\n", table, a.out, a.out);
    } catch (const std::exception& e) {
        return world.fail("sweep-scale", e.what());
    }
    return 0;
}
