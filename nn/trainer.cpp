#include "nn/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <stdexcept>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "autograd/ops.h"
#include "autograd/tape.h"
#include "nn/safetensors.h"

namespace peftlab {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// "45s", "3m05s", "1h02m".
std::string format_duration(double s) {
    if (!std::isfinite(s) || s < 0) return "?";
    const int64_t t = int64_t(s + 0.5);
    if (t < 60) return fmt::format("{}s", t);
    if (t < 3600) return fmt::format("{}m{:02}s", t / 60, t % 60);
    return fmt::format("{}h{:02}m", t / 3600, (t % 3600) / 60);
}

std::string format_rate(double per_s) {
    if (per_s >= 1e6) return fmt::format("{:.2f}M", per_s / 1e6);
    if (per_s >= 1e3) return fmt::format("{:.1f}k", per_s / 1e3);
    return fmt::format("{:.0f}", per_s);
}

// Shortest text that reads back as the same double.
std::string format_value(double v) { return fmt::format("{}", v); }

std::string metrics_jsonl_path(const std::string& dir) { return (fs::path(dir) / "metrics.jsonl").string(); }
std::string metrics_csv_path(const std::string& dir) { return (fs::path(dir) / "metrics.csv").string(); }

nlohmann::ordered_json row_json(const MetricsRow& row) {
    nlohmann::ordered_json j = nlohmann::ordered_json::object();
    for (auto& [key, value] : row) {
        if (value == std::floor(value) && std::fabs(value) < 9007199254740992.0)
            j[key] = int64_t(value);  // steps and counts read as integers
        else
            j[key] = value;
    }
    return j;
}

const double* find_metric(const MetricsRow& row, const std::string& key) {
    for (auto& [k, v] : row)
        if (k == key) return &v;
    return nullptr;
}

}  // namespace

Trainer::Trainer(NamedTensors tensors, Optimizer& opt, LossFn loss_fn, TrainOptions opts, EvalFn eval_fn)
    : tensors_(std::move(tensors)),
      opt_(opt),
      loss_fn_(std::move(loss_fn)),
      eval_fn_(std::move(eval_fn)),
      opts_(std::move(opts)),
      data_rng_(opts_.data_seed) {
    auto bad = [](const char* field, auto value, const char* why) {
        throw std::invalid_argument(fmt::format("TrainOptions: {} = {} {}", field, value, why));
    };
    if (opts_.steps < 0) bad("steps", opts_.steps, "must be >= 0");
    if (opts_.grad_accum < 1) bad("grad_accum", opts_.grad_accum, "must be >= 1");
    if (!(opts_.clip_norm >= 0.0)) bad("clip_norm", opts_.clip_norm, "must be >= 0");
    if (opts_.eval_every < 0) bad("eval_every", opts_.eval_every, "must be >= 0");
    if (opts_.ckpt_every < 0) bad("ckpt_every", opts_.ckpt_every, "must be >= 0");
    if (opts_.log_every < 0) bad("log_every", opts_.log_every, "must be >= 0");
    if (opts_.tokens_per_step < 0) bad("tokens_per_step", opts_.tokens_per_step, "must be >= 0");
    if (opts_.resume && opts_.out_dir.empty()) bad("resume", "true", "needs out_dir (where the checkpoint is)");
    if (opts_.schedule) opts_.schedule->validate();
    if (!loss_fn_) throw std::invalid_argument("Trainer: the loss function is empty");

    std::set<std::string> rng_names{"data"};
    for (auto& [name, rng] : opts_.rngs) {
        if (!rng) throw std::invalid_argument(fmt::format("TrainOptions: rng '{}' is null", name));
        if (!rng_names.insert(name).second)
            throw std::invalid_argument(
                fmt::format("TrainOptions: rng name '{}' is used twice ('data' is the trainer's own)", name));
    }
    std::set<const TensorImpl*> saved;
    for (auto& [name, t] : tensors_) saved.insert(t.impl());
    for (auto& [name, t] : opt_.params())
        if (!saved.count(t.impl()))
            throw std::invalid_argument(fmt::format(
                "Trainer: optimizer parameter '{}' is not among the trainer's tensors, so checkpoints would miss it",
                name));
}

std::string Trainer::checkpoint_path() const {
    return opts_.out_dir.empty() ? "" : (fs::path(opts_.out_dir) / "checkpoint.safetensors").string();
}

NamedRngs Trainer::all_rngs() {
    NamedRngs rngs{{"data", &data_rng_}};
    rngs.insert(rngs.end(), opts_.rngs.begin(), opts_.rngs.end());
    return rngs;
}

int64_t Trainer::restore() {
    if (!opts_.resume) return 0;
    const std::string path = checkpoint_path();
    if (!fs::exists(path)) {
        if (opts_.log_every > 0) fmt::print(stderr, "{}resume: no checkpoint at '{}', starting from step 0\n", opts_.log_prefix, path);
        return 0;
    }
    const TrainingState state = load_training_state(path, tensors_, opt_, all_rngs());
    last_ckpt_step_ = state.step;
    if (opts_.log_every > 0) fmt::print(stderr, "{}resumed from '{}' at step {}\n", opts_.log_prefix, path, state.step);
    return state.step;
}

void Trainer::reset_metrics(int64_t completed_steps) {
    rows_.clear();
    if (opts_.out_dir.empty()) return;
    const std::string path = metrics_jsonl_path(opts_.out_dir);
    std::string kept;
    if (completed_steps > 0) {
        // A line cut short by a crash does not parse and is dropped with the rest past the checkpoint.
        std::ifstream in(path);
        for (std::string line; std::getline(in, line);) {
            const nlohmann::ordered_json j = nlohmann::ordered_json::parse(line, nullptr, false);
            if (j.is_discarded() || !j.is_object() || !j.contains("step") || !j["step"].is_number()) continue;
            if (j["step"].get<double>() > double(completed_steps)) continue;
            MetricsRow row;
            for (auto& [key, value] : j.items())
                if (value.is_number()) row.emplace_back(key, value.get<double>());
            rows_.push_back(std::move(row));
            kept += line + "\n";
        }
    }
    write_file_atomic(path, kept);
}

void Trainer::append_metrics(const MetricsRow& row) {
    rows_.push_back(row);
    if (opts_.out_dir.empty()) return;
    const std::string path = metrics_jsonl_path(opts_.out_dir);
    std::ofstream out(path, std::ios::app);
    out << row_json(row).dump() << '\n';
    out.flush();
    if (!out) throw std::runtime_error(fmt::format("Trainer: cannot append to '{}'", path));
}

void Trainer::write_csv() const {
    if (opts_.out_dir.empty()) return;
    // Columns in order of first appearance: the training columns, then eval metrics.
    std::vector<std::string> columns;
    for (const MetricsRow& row : rows_)
        for (auto& [key, value] : row)
            if (std::find(columns.begin(), columns.end(), key) == columns.end()) columns.push_back(key);
    std::string text;
    for (size_t c = 0; c < columns.size(); ++c) {
        if (c) text += ',';
        text += columns[c];
    }
    text += '\n';
    for (const MetricsRow& row : rows_) {
        for (size_t c = 0; c < columns.size(); ++c) {
            if (c) text += ',';
            if (const double* v = find_metric(row, columns[c])) text += format_value(*v);
        }
        text += '\n';
    }
    write_file_atomic(metrics_csv_path(opts_.out_dir), text);
}

void Trainer::save_checkpoint(int64_t completed_steps) {
    if (opts_.out_dir.empty()) return;
    save_training_state(checkpoint_path(), tensors_, opt_, all_rngs(),
                        TrainingState{completed_steps, opts_.ckpt_metadata});
    last_ckpt_step_ = completed_steps;
    write_csv();  // so a long run's CSV is current at every checkpoint
}

TrainSummary Trainer::run() {
    const auto t_start = Clock::now();
    if (!opts_.out_dir.empty()) fs::create_directories(opts_.out_dir);
    TrainSummary summary;
    summary.start_step = restore();
    reset_metrics(summary.start_step);

    const int64_t total = opts_.steps;
    const int k = opts_.grad_accum;
    const bool tty = ::isatty(::fileno(stderr)) == 1;
    const bool show = opts_.log_every > 0;
    double train_s = 0.0;
    double last_draw = -1.0;

    auto stop = [&](int64_t step, const std::string& what) {
        clear_tape();
        for (auto& [name, t] : tensors_) Tensor(t).zero_grad();
        summary.stop_reason = fmt::format(
            "training stopped at step {} of {}: {} (loss_fn step index {}); the optimizer was not stepped; {}",
            step + 1, total, what, step,
            last_ckpt_step_ >= 0 ? fmt::format("last good checkpoint: '{}' (step {})", checkpoint_path(),
                                               last_ckpt_step_)
                                 : std::string("no checkpoint was written"));
        if (tty && show) fmt::print(stderr, "\n");
        fmt::print(stderr, "{}{}\n", opts_.log_prefix, summary.stop_reason);
    };

    int64_t step = summary.start_step;
    for (; step < total; ++step) {
        const auto t0 = Clock::now();
        const double lr = opts_.schedule ? opts_.schedule->at(step) : opt_.lr();
        opt_.set_lr(lr);
        for (auto& [name, t] : tensors_) Tensor(t).zero_grad();

        double loss_sum = 0.0;
        std::string failure;
        for (int micro = 0; micro < k && failure.empty(); ++micro) {
            Tensor loss = loss_fn_(step, data_rng_);
            if (!loss.defined() || loss.numel() != 1)
                throw std::invalid_argument(fmt::format(
                    "Trainer: the loss function returned {} at step index {}, not a scalar",
                    loss.defined() ? "shape " + shape_str(loss.shape()) : std::string("an undefined tensor"), step));
            const double value = loss.item();
            if (!std::isfinite(value)) {
                failure = fmt::format("the loss is {} in micro-batch {} of {}", value, micro + 1, k);
                break;
            }
            backward(k > 1 ? mul_scalar(loss, 1.f / float(k)) : loss);
            loss_sum += value;
        }
        double norm = std::numeric_limits<double>::quiet_NaN();
        if (failure.empty()) {
            norm = opts_.clip_norm > 0.0 ? clip_grad_norm(tensors_, opts_.clip_norm) : grad_norm(tensors_);
            if (!std::isfinite(norm)) failure = fmt::format("the gradient norm is {}", norm);
        }
        if (!failure.empty()) {
            stop(step, failure);
            break;
        }
        opt_.step();
        const double step_s = seconds_since(t0);
        train_s += step_s;

        const double loss = loss_sum / k;
        summary.losses.push_back(loss);
        MetricsRow row{{"step", double(step + 1)}, {"loss", loss}, {"lr", lr}, {"grad_norm", norm},
                       {"ms_per_step", step_s * 1e3}};
        if (opts_.tokens_per_step > 0) row.emplace_back("tokens_per_s", double(opts_.tokens_per_step) / step_s);

        const bool last = step + 1 == total;
        std::map<std::string, double> evals;
        if (eval_fn_ && (last || (opts_.eval_every > 0 && (step + 1) % opts_.eval_every == 0))) {
            NoGradGuard no_grad;
            evals = eval_fn_(step + 1);
            for (auto& [key, value] : evals) row.emplace_back("eval_" + key, value);
            summary.final_eval = evals;
        }
        append_metrics(row);

        if (show) {
            const int64_t done = step + 1 - summary.start_step;
            const double elapsed = seconds_since(t_start);
            const double eta = elapsed / double(done) * double(total - step - 1);
            const std::string rate =
                opts_.tokens_per_step > 0
                    ? fmt::format(" | {} tok/s", format_rate(double(opts_.tokens_per_step) * done / train_s))
                    : "";
            if (tty) {
                if (last || !evals.empty() || elapsed - last_draw >= 0.1) {
                    constexpr int kBar = 20;
                    const int filled = int(kBar * (step + 1) / std::max<int64_t>(total, 1));
                    fmt::print(stderr, "\r{}{}/{} [{}{}] loss {:.4f} | lr {:.2e}{} | {:.1f} ms/step | ETA {}\x1b[K",
                               opts_.log_prefix, step + 1, total, std::string(size_t(filled), '#'), std::string(size_t(kBar - filled), '.'),
                               loss, lr, rate, train_s * 1e3 / done, format_duration(eta));
                    last_draw = elapsed;
                }
            } else if (last || (step + 1) % opts_.log_every == 0) {
                fmt::print(stderr, "{}step {}/{} loss {:.4f} lr {:.3e} grad_norm {:.3f}{} | {:.1f} ms/step | ETA {}\n",
                           opts_.log_prefix, step + 1, total, loss, lr, norm, rate, train_s * 1e3 / done, format_duration(eta));
            }
            if (!evals.empty()) {
                std::string line = fmt::format("{}eval at step {}:", opts_.log_prefix, step + 1);
                for (auto& [key, value] : evals) line += fmt::format(" {} {:.4f}", key, value);
                fmt::print(stderr, "{}{}\n", tty ? "\n" : "", line);
            }
            if (tty && last && evals.empty()) fmt::print(stderr, "\n");
        }

        if (last || (opts_.ckpt_every > 0 && (step + 1) % opts_.ckpt_every == 0)) save_checkpoint(step + 1);
    }

    summary.completed = summary.stop_reason.empty();
    summary.steps = step;
    write_csv();
    const double* final_loss = rows_.empty() ? nullptr : find_metric(rows_.back(), "loss");
    summary.final_loss = final_loss ? *final_loss : std::numeric_limits<double>::quiet_NaN();
    const int64_t ran = int64_t(summary.losses.size());
    summary.wall_s = seconds_since(t_start);
    summary.ms_per_step = ran ? train_s * 1e3 / double(ran) : 0.0;
    summary.tokens_per_s = ran && opts_.tokens_per_step > 0 ? double(opts_.tokens_per_step) * ran / train_s : 0.0;
    return summary;
}

}  // namespace peftlab
