// The files every run writes: results.json (MethodResult), metrics.csv,
// the markdown table, plots (gnuplot), and reading an earlier run's results.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

#include <fmt/format.h>

#include "experiments/lib/harness.h"
#include "nn/dist.h"
#include "nn/safetensors.h"

namespace fs = std::filesystem;

namespace peftlab::harness {

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
                        {"best_step", best_step},
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
    r.best_step = j.value("best_step", int64_t(0));
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

nlohmann::json run_settings_json(const CommonArgs& a, const Base& base, int64_t search_steps) {
    return {{"config", base.config.to_json()},
            {"seed", a.seed},
            {"steps", a.steps},
            {"search_steps", search_steps},
            {"batch", a.batch},
            {"lr", a.lr},
            {"prefix_len", a.prefix_len},
            {"n_train", a.n_train},
            {"tokenizer", a.tokenizer},
            {"recompute", a.recompute},
            {"patience", a.patience},
            // Absolute: `adapter eval --base` from another directory finds it (the cache is relative to the run's).
            {"base", {{"path", fs::absolute(base.model_path).lexically_normal().string()},
                      {"pretrain_valid_loss", base.pretrain_valid_loss}}}};
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

std::string early_stopping_words(int64_t patience) {
    return patience > 0 ? fmt::format(", kept at the best of its valid-loss evaluations (every 1/20 of the updates), "
                                      "stopping after {} without a lower one",
                                      patience)
                        : std::string();
}

namespace {
// With --patience: which update's weights the row's losses are of.
std::string kept_update(const MethodResult& r) {
    return r.best_step > 0 ? fmt::format(" (update {} of {} run)", r.best_step, r.steps) : "";
}
}  // namespace

std::vector<std::string> adapters_not_in(const std::string& out_dir, const std::vector<MethodResult>& rs) {
    // By name: every row saves under <out>/adapters/<label>, and a row kept from an
    // earlier run records the --out that run was given (relative, absolute, moved).
    std::set<std::string> saved;
    for (const MethodResult& r : rs)
        if (!r.adapter_dir.empty()) saved.insert(fs::path(r.adapter_dir).lexically_normal().filename());
    std::vector<std::string> others;
    std::error_code ec;
    for (const fs::directory_entry& e : fs::directory_iterator(fs::path(out_dir) / "adapters", ec))
        if (e.is_directory(ec) && !saved.count(e.path().filename())) others.push_back(e.path().filename());
    std::sort(others.begin(), others.end());
    return others;
}

std::string results_table_md(const std::vector<MethodResult>& rs) {
    std::string s =
        "| method | trainable params | % | step GFLOP | ms/step | peak MB | valid loss (selection split) | "
        "test loss (held out) | metric (test) | flags |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
    for (const MethodResult& r : rs) {
        std::string metric = fmt::format("{} {:.4f}", r.metric_name, r.metric);
        for (auto& [k, v] : r.extra_metrics) metric += fmt::format(", {} {:.3f}", k, v);
        std::string flags;
        for (const std::string& f : r.flags) flags += (flags.empty() ? "" : "; ") + f;
        s += fmt::format("| {} | {} | {:.3f} | {:.2f} | {:.0f} | {:.1f} | {:.4f}{} | {:.4f} | {} | {} |\n", r.label,
                         r.trainable_params, r.trainable_pct, double(r.step_flops) / 1e9, r.ms_per_step,
                         double(r.peak_bytes) / 1e6, r.final_valid_loss, kept_update(r), r.test_loss, metric, flags);
    }
    return s;
}

void print_results_table(const std::vector<MethodResult>& rs) {
    fmt::print("\n{:<22} {:>12} {:>8} {:>10} {:>9} {:>9} {:>10} {:>10} {:>10}\n", "method", "trainable", "%",
               "GFLOP/step", "ms/step", "peak MB", "valid*", "test loss", "metric");
    for (const MethodResult& r : rs) {
        fmt::print("{:<22} {:>12} {:>8.3f} {:>10.2f} {:>9.0f} {:>9.1f} {:>10.4f} {:>10.4f} {:>10.4f}{}\n", r.label,
                   r.trainable_params, r.trainable_pct, double(r.step_flops) / 1e9, r.ms_per_step,
                   double(r.peak_bytes) / 1e6, r.final_valid_loss, r.test_loss, r.metric, kept_update(r));
        for (const std::string& f : r.flags) fmt::print("{:<22}   flag: {}\n", "", f);
    }
    fmt::print("valid*: loss on the validation split, the one the learning rate (and with --patience, the update "
               "kept) was chosen on; "
               "test loss and metric: the held-out test split\n");
}

std::string write_results(const std::string& dir, const std::string& experiment, const std::vector<MethodResult>& rs,
                          const nlohmann::json& extra) {
    if (!dist::is_root()) return results_table_md(rs);  // rank 0 writes
    fs::create_directories(dir);
    nlohmann::json j = extra;
    j["experiment"] = experiment;
    j["methods"] = nlohmann::json::array();
    for (const MethodResult& r : rs) {
        j["methods"].push_back(r.to_json());
        j["methods"].back()["loss_curve"] = r.loss_curve;
    }
    // Generated samples may be invalid UTF-8 (a byte-level BPE model can stop
    // inside a character): written with U+FFFD for each bad byte, not refused
    // after a run's training (the log on stderr keeps the raw text).
    write_file_atomic(dir + "/results.json", j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace));

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

namespace {
// s inside a single-quoted gnuplot string, where a quote is written twice
// (a label such as "full's" would otherwise end the string).
std::string gp_quoted(const std::string& s) {
    std::string out;
    for (char c : s) out += c == '\'' ? std::string("''") : std::string(1, c);
    return out;
}
// s as one word for sh: single-quoted, a quote written '\''.
std::string sh_quoted(const std::string& s) {
    std::string out = "'";
    for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return out + "'";
}
}  // namespace

bool plot_png(const std::string& path, const std::string& title, const std::string& xlabel, const std::string& ylabel,
              const std::vector<Series>& series, bool log_x) {
    if (series.empty() || !dist::is_root()) return false;
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
        gp_quoted(path), gp_quoted(title), gp_quoted(xlabel), gp_quoted(ylabel), log_x ? "set logscale x\n" : "");
    for (size_t i = 0; i < series.size(); ++i) {
        std::string data_path = fmt::format("{}/{}.dat", tmp_dir, i);
        std::ofstream f(data_path);
        for (auto& [x, y] : series[i].points) f << x << " " << y << "\n";
        const std::string style = series[i].style.empty() ? "linespoints pointsize 1.2" : series[i].style;
        script += fmt::format("{}'{}' using 1:2 with {} linewidth 2 title '{}'", i ? ", " : "", gp_quoted(data_path),
                              style, gp_quoted(series[i].title));
        // A series of one point (one method on a scatter plot) carries its label beside it.
        if (series[i].points.size() == 1)
            script += fmt::format(", '{}' using 1:2:(\"{}\") with labels offset 1,1 left notitle", gp_quoted(data_path),
                                  series[i].title);
    }
    script += "\n";
    const std::string script_path = tmp_dir + "/plot.gp";
    std::ofstream(script_path) << script;
    int rc = std::system(fmt::format("gnuplot {} 2>/dev/null", sh_quoted(script_path)).c_str());
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
