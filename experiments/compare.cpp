// compare: every adaptation method from the same pretrained base, on the same
// data, with the same seed and step budget (and the same small learning-rate
// search for each), against two references: the unadapted base and full
// fine-tuning of a randomly initialised model.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>

#include "experiments/lib/harness.h"
#include "mpi/world.h"
#include "nn/safetensors.h"
#include "peft/registry.h"

using namespace peftlab;
using namespace peftlab::harness;

namespace {
// The learning rate(s) behind the rows, as report.md states them: --lr, or
// the best of each method's searched grid (3 by default, more once a search
// stepped past an edge; results.json's lr_grid holds them).
std::string lr_words(double lr, const std::vector<MethodResult>& results) {
    if (lr > 0) return fmt::format("learning rate {}", lr);
    size_t lo = SIZE_MAX, hi = 0;
    for (const MethodResult& m : results)
        if (!m.lr_grid.empty()) lo = std::min(lo, m.lr_grid.size()), hi = std::max(hi, m.lr_grid.size());
    if (hi == 0) return "no learning rate (nothing trained)";
    return lo == hi ? fmt::format("the best of {} learning rates", lo)
                    : fmt::format("the best of {} to {} learning rates (per method: lr_grid in results.json)", lo, hi);
}
}  // namespace

int main(int argc, char** argv) {
    peftlab::mpi::World world(&argc, &argv);  // several ranks under mpirun, else one process
    CommonArgs d;
    d.methods = peft::method_names();  // every registered method; --methods picks (and sets options: prefix:reparam=true)
    d.steps = 400;
    d.out = "runs/compare";
    d.eval_examples = 200;
    cxxopts::Options opts("compare", "Compare PEFT methods from one pretrained base under one budget");
    add_common_flags(opts, d);
    // clang-format off
    opts.add_options()
        ("search-steps", "updates per learning-rate candidate", cxxopts::value<int64_t>()->default_value("60"))
        ("fresh", "train every method again, even those a previous run with the same settings finished")
        ("no-baselines", "skip the unadapted-base and random-init rows");
    // clang-format on
    cxxopts::ParseResult r;
    CommonArgs a = parse_or_exit(opts, argc, argv, d, &r);
    const int64_t search_steps = r["search-steps"].as<int64_t>();
    if (search_steps < 1) {
        fmt::print(stderr, "compare: --search-steps: {} must be >= 1\n", search_steps);
        return 2;
    }
    try {
        Base base = load_or_pretrain(a);
        data::Task task = load_task(a, base);
        Budget budget = make_budget(a);
        budget.search_steps = search_steps;

        std::vector<MethodSpec> specs;
        if (!r.count("no-baselines")) specs.push_back({"none", "base (no adaptation)", {}, false});
        for (const std::string& m : a.methods) specs.push_back(make_spec(a, m));
        // The random-init reference trains every weight: the registered method that trains the base itself.
        if (!r.count("no-baselines"))
            for (const std::string& m : peft::method_names())
                if (peft::make_adapter(m)->changes_base()) {
                    specs.push_back({m, m + " (random init)", {}, true});
                    break;
                }

        nlohmann::json extra = run_settings_json(a, base, search_steps);
        extra["task"] = task.name;
        extra["eval_examples"] = std::min<int64_t>(a.eval_examples, int64_t(task.test.size()));
        extra["data"] = data_report_json(task);

        // results.json is written after every method; a rerun with the same
        // settings (the fields above) keeps the methods it finished and trains the rest.
        std::vector<MethodResult> results;
        std::map<std::string, MethodResult> finished =
            r.count("fresh") ? std::map<std::string, MethodResult>{} : finished_results(a.out + "/results.json", extra);
        std::string table;
        for (const MethodSpec& s : specs) {
            auto it = finished.find(s.label);
            if (it != finished.end()) {
                fmt::print(stderr, "[{}] finished in an earlier run ({}/results.json): kept\n", s.label, a.out);
                results.push_back(it->second);
            } else {
                results.push_back(run_method(base, task, s, budget, a.out, a.seed));
            }
            flag_below_base(results);
            table = write_results(a.out, "compare", results, extra);
        }

        std::vector<Series> by_params;
        for (const MethodResult& m : results)
            if (m.trainable_params > 0) by_params.push_back({m.label, {{double(m.trainable_params), m.metric}}});
        plot_png(a.out + "/metric_vs_params.png",
                 fmt::format("compare ({}): {} vs trainable parameters", task.name, task.metric_name()),
                 "trainable parameters", task.metric_name(), by_params, true);

        std::string md = fmt::format(
            "# compare: PEFT methods on `{}`\n\n"
            "Base: {} (d={}, L={}, H={}, d_ff={}, vocab={}, T={}), pretrained valid loss {:.3f}.\n"
            "Budget per method: {} updates{} of batch {} at {} "
            "(each tried for {} updates); seed {}.\n\n{}\n"
            "valid loss: the validation split, on which the learning rate (and with --patience, the update kept) was "
            "chosen; test loss and the metric: the "
            "held-out test split. Flags name degenerate outcomes (one class, constant or empty outputs, below the "
            "unadapted base, a learning rate at the edge of its grid).\n\n"
            "Metric: `{}` on {} test examples (greedy decoding).\n\n"
            "Plots: `loss_curves.png`, `valid_curves.png`, `metric_vs_params.png`.\n"
            "Adapters: `adapters/<method>/` (inspect with `build/bin/adapter inspect DIR`).\n",
            task.name, base.model_path, base.config.d_model, base.config.n_layers, base.config.n_heads, base.config.d_ff,
            base.config.vocab, base.config.max_seq, base.pretrain_valid_loss, a.steps, early_stopping_words(a.patience), a.batch, lr_words(a.lr, results),
            search_steps, a.seed, table, task.metric_name(), extra["eval_examples"].get<int64_t>());
        if (peftlab::dist::is_root()) write_file_atomic(a.out + "/report.md", md);
        print_results_table(results);
        fmt::print(
            "\nreport: {0}/report.md  results: {0}/results.json  metrics: {0}/metrics.csv\n"
            "plots:  {0}/loss_curves.png  {0}/valid_curves.png  {0}/metric_vs_params.png\n"
            "adapters: {0}/adapters/\n",
            a.out);
        if (const std::vector<std::string> others = adapters_not_in(a.out, results); !others.empty())
            fmt::print("note: {}/adapters/ also holds {} from an earlier run (no row of this results.json saved "
                       "them): {}\n",
                       a.out, others.size() == 1 ? "an adapter" : fmt::format("{} adapters", others.size()),
                       fmt::join(others, ", "));
    } catch (const std::exception& e) {
        return world.fail("compare", e.what());
    }
    return 0;
}
