// sweep-depth: prefixes only in the top-k or the bottom-k layers, k = 0..L.
// Where the vectors enter matters: a prefix in the bottom layers reaches every
// layer above it through the real tokens' hidden states, one in the top layers
// reaches little, but the backward pass stops below the deepest trained layer.
#include <fmt/format.h>

#include "experiments/lib/harness.h"
#include "mpi/world.h"
#include "nn/safetensors.h"

using namespace peftlab;
using namespace peftlab::harness;

int main(int argc, char** argv) {
    peftlab::mpi::World world(&argc, &argv);  // several ranks under mpirun, else one process
    CommonArgs d;
    d.methods = {"prefix"};  // method-names: the study's default (prefix depth), --methods overrides
    d.steps = 200;
    d.out = "runs/sweep-depth";
    d.eval_examples = 100;
    d.lr_zero = "each method's default rate";
    cxxopts::Options opts("sweep-depth", "Metric against which layers carry the prefix (top-k / bottom-k)");
    add_common_flags(opts, d);
    CommonArgs a = parse_or_exit(opts, argc, argv, d);
    try {
        Base base = load_or_pretrain(a);
        data::Task task = load_task(a, base);
        Budget budget = make_budget(a);
        const int L = base.config.n_layers;
        std::vector<MethodResult> results;
        std::vector<Series> series;
        MethodSpec none{"none", "k=0 (base)", {}, false};
        MethodResult base_result = run_method(base, task, none, budget, "", a.seed);
        results.push_back(base_result);
        for (const std::string& m : a.methods)
            for (const char* side : {"top", "bottom"}) {
                Series s{fmt::format("{} {}-k", m, side), {{0.0, base_result.metric}}};
                for (int k = 1; k <= L; ++k) {
                    MethodSpec spec = make_spec(a, m);
                    spec.options.layers = fmt::format("{}:{}", side, k);
                    spec.label = fmt::format("{} {}:{}", m, side, k);
                    Budget b = budget;
                    if (b.lr == 0) b.lr = default_lr(spec.method);
                    results.push_back(run_method(base, task, spec, b, "", a.seed));
                    s.points.emplace_back(double(k), results.back().metric);
                }
                series.push_back(s);
            }
        std::string table =
            write_results(a.out, "sweep-depth", results, {{"config", base.config.to_json()}, {"task", task.name}});
        plot_png(a.out + "/metric_vs_depth.png", fmt::format("{} against prefix depth", task.metric_name()),
                 "k (layers with a prefix)", task.metric_name(), series);
        if (peftlab::dist::is_root()) write_file_atomic(
            a.out + "/report.md",
            fmt::format(
                "# sweep-depth on `{}`\n\nBudget: {} updates per run (lr {}: 0 = each method's default), seed {}. "
                "`top:k` = the k layers nearest the output, `bottom:k` = nearest the input. "
                "Compare step GFLOP: top-k prefixes skip the backward below them.\n\n{}\n"
                "Plots: `metric_vs_depth.png`, `loss_curves.png`.\n",
                task.name, a.steps, a.lr, a.seed, table));
        print_results_table(results);
        fmt::print("\nreport: {0}/report.md  plots: {0}/metric_vs_depth.png\n", a.out);
    } catch (const std::exception& e) {
        return world.fail("sweep-depth", e.what());
    }
    return 0;
}
