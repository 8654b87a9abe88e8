#include "nn/trainer.h"

#include <algorithm>
#include <charconv>
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

int64_t counted_targets(const std::vector<int32_t>& targets, int32_t ignore_index) {
    return int64_t(std::count_if(targets.begin(), targets.end(), [&](int32_t t) { return t != ignore_index; }));
}

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
    if (opts_.patience < 0) bad("patience", opts_.patience, "must be >= 0");
    if (opts_.patience > 0 && opts_.early_stop_metric.empty())
        bad("patience", opts_.patience, "needs early_stop_metric (the eval metric to watch)");
    if (opts_.patience > 0 && !eval_fn_)
        bad("patience", opts_.patience, "needs an eval function (early stopping watches its metric)");
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
    if (opts_.patience > 0)
        for (auto& [name, t] : tensors_) best_.emplace_back("best/" + name, t.clone());
}

NamedTensors Trainer::checkpoint_tensors() const {
    NamedTensors all = tensors_;
    all.insert(all.end(), best_.begin(), best_.end());
    return all;
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
    const bool root = (opts_.comm ? *opts_.comm : dist::world()).rank() == 0;
    if (!fs::exists(path)) {
        if (root && opts_.log_every > 0) fmt::print(stderr, "{}resume: no checkpoint at '{}', starting from step 0\n", opts_.log_prefix, path);
        return 0;
    }
    // Nothing is left to run from a step past the end: the file belongs to a longer run (or was
    // edited). Checked from the header before anything is loaded, so the tensors stay as they are.
    {
        const StMapped header(path);
        const auto it = header.metadata().find("step");
        int64_t step = 0;
        if (it != header.metadata().end() &&
            std::from_chars(it->second.data(), it->second.data() + it->second.size(), step).ec == std::errc() &&
            step > opts_.steps)
            throw std::runtime_error(fmt::format("Trainer: checkpoint '{}' is at step {}, past this run's {} steps: it "
                                                 "is from another run (remove it, or resume with the steps it was "
                                                 "made for)",
                                                 path, step, opts_.steps));
    }
    const TrainingState state = load_training_state(path, checkpoint_tensors(), opt_, all_rngs());
    last_ckpt_step_ = state.step;
    if (root && opts_.log_every > 0) fmt::print(stderr, "{}resumed from '{}' at step {}\n", opts_.log_prefix, path, state.step);
    return state.step;
}

bool Trainer::writes_files() const {
    return !opts_.out_dir.empty() && (opts_.comm ? *opts_.comm : dist::world()).rank() == 0;
}

void Trainer::reset_metrics(int64_t completed_steps) {
    rows_.clear();
    if (!writes_files()) return;
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
    if (!writes_files()) return;
    const std::string path = metrics_jsonl_path(opts_.out_dir);
    std::ofstream out(path, std::ios::app);
    out << row_json(row).dump() << '\n';
    out.flush();
    if (!out) throw std::runtime_error(fmt::format("Trainer: cannot append to '{}'", path));
}

void Trainer::write_csv() const {
    if (!writes_files()) return;
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
    last_ckpt_step_ = completed_steps;
    if (!writes_files()) return;  // rank 0 writes; the others hold the same state
    save_training_state(checkpoint_path(), checkpoint_tensors(), opt_, all_rngs(),
                        TrainingState{completed_steps, opts_.ckpt_metadata});
    write_csv();  // so a long run's CSV is current at every checkpoint
}

TrainSummary Trainer::run() {
    const auto t_start = Clock::now();
    dist::Communicator& comm = opts_.comm ? *opts_.comm : dist::world();
    const int R = comm.size(), rank = comm.rank();
    const bool root = rank == 0;
    if (root && !opts_.out_dir.empty()) fs::create_directories(opts_.out_dir);
    TrainSummary summary;
    summary.start_step = restore();
    if (R > 1) {
        // Every rank must continue from the same update (a shared out_dir).
        double start = double(summary.start_step);
        comm.all_reduce_sum(&start, 1);
        if (start != double(summary.start_step) * R)
            throw std::runtime_error(fmt::format(
                "Trainer: rank {} resumed at update {} but the {} ranks' updates sum to {}: every rank must read "
                "the same checkpoint ('{}' on a file system all ranks share)",
                rank, summary.start_step, R, start, checkpoint_path()));
        // One starting point everywhere, whatever each rank initialised.
        for (auto& [name, t] : tensors_) comm.broadcast(Tensor(t).data(), size_t(t.numel()) * sizeof(float), 0);
    }
    reset_metrics(summary.start_step);

    // Early stopping's state, read back from the metrics rows kept (a resumed
    // run continues the count; the best tensors came with the checkpoint).
    const std::string watched = "eval_" + opts_.early_stop_metric;
    double best_value = std::numeric_limits<double>::infinity();
    int64_t evals_since_best = 0;
    auto copy_tensors = [](const NamedTensors& from, const NamedTensors& to) {
        for (size_t i = 0; i < from.size(); ++i) Tensor(to[i].second).copy_from(from[i].second);
    };
    // One evaluation's verdict; true when patience has run out.
    auto observe = [&](int64_t completed, double value) {
        if (value < best_value) {
            best_value = value;
            summary.best_step = completed;
            evals_since_best = 0;
            return false;
        }
        return ++evals_since_best >= opts_.patience;
    };
    if (opts_.patience > 0)
        for (const MetricsRow& row : rows_)
            if (const double* v = find_metric(row, watched)) {
                const int64_t completed = int64_t(*find_metric(row, "step"));
                summary.stopped_early = observe(completed, *v) && completed < opts_.steps;
            }

    const int64_t total = opts_.steps;
    const int A = opts_.grad_accum;
    const int M = R * A;  // micro-batches per update over all ranks
    const bool tty = ::isatty(::fileno(stderr)) == 1;
    const bool show = opts_.log_every > 0 && root;
    double train_s = 0.0, comm_total_s = 0.0;
    double counted_tokens = 0.0;  // the loss functions' counted target tokens, all ranks, this run
    double last_draw = -1.0;

    // The trained tensors' gradients, packed contiguously (M > 1): what is
    // summed over micro-batches and all-reduced over ranks.
    const NamedTensors& trained = opt_.params();
    const size_t P = trained.size();
    std::vector<size_t> offset(P + 1, 0);
    for (size_t i = 0; i < P; ++i) offset[i + 1] = offset[i] + size_t(trained[i].second.numel());
    std::vector<float> packed(M > 1 ? offset[P] : 0);
    // Per update, summed over ranks: [0] sum of loss_m * n_m, [1] N, then per
    // rank an exception flag and a non-finite-loss flag (1 + micro-batch), then
    // per trained tensor whether any rank gave it a gradient.
    std::vector<double> status(2 + 2 * size_t(R) + P);

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
        if (root) fmt::print(stderr, "{}{}\n", opts_.log_prefix, summary.stop_reason);
    };

    int64_t step = summary.start_step;
    for (; step < total && !summary.stopped_early; ++step) {
        const auto t0 = Clock::now();
        const double comm_before = comm.comm_seconds();
        const double lr = opts_.schedule ? opts_.schedule->at(step) : opt_.lr();
        opt_.set_lr(lr);
        for (auto& [name, t] : tensors_) Tensor(t).zero_grad();
        std::fill(status.begin(), status.end(), 0.0);

        const uint64_t rng_start = data_rng_.state();
        uint64_t rng_end = rng_start;
        double loss_sum = 0.0, tokens = 0.0;
        std::string failure, error;
        bool packed_any = false;  // whether `packed` holds this step's first micro-batch yet
        // One micro-batch; throws on bad input (caught below when other ranks must hear of it).
        auto micro_batch = [&](int a) {
            const dist::Shard shard{rank * A + a, M};
            Rng rng(rng_start);
            MicroBatchLoss l = loss_fn_(step, rng, shard);
            if (!l.loss.defined() || l.loss.numel() != 1)
                throw std::invalid_argument(fmt::format(
                    "Trainer: the loss function returned {} at step index {}, not a scalar",
                    l.loss.defined() ? "shape " + shape_str(l.loss.shape()) : std::string("an undefined tensor"), step));
            if (l.tokens < 0)
                throw std::invalid_argument(fmt::format(
                    "Trainer: the loss function returned {} counted tokens at step index {}", l.tokens, step));
            if (a == 0)
                rng_end = rng.state();
            else if (rng.state() != rng_end)
                throw std::invalid_argument(fmt::format(
                    "Trainer: micro-batch {} of step index {} drew differently from the data generator than micro-batch "
                    "{}: every shard must draw the whole global batch and keep its rows (dist::Shard)",
                    shard.index, step, rank * A));
            if (M > 1 && l.tokens == 0) return;  // weighs nothing
            const double value = l.loss.item();
            if (!std::isfinite(value)) {
                failure = M > 1 ? fmt::format("the loss is {} in micro-batch {} of {}{}", value, shard.index + 1, M,
                                              R > 1 ? fmt::format(" (rank {})", rank) : "")
                                : fmt::format("the loss is {} in micro-batch 1 of 1", value);
                status[2 + size_t(R) + size_t(rank)] = 1.0 + shard.index;
                return;
            }
            if (M == 1) {
                backward(l.loss);
                loss_sum = value;
                tokens = double(l.tokens);
                return;
            }
            backward(mul_scalar(l.loss, float(l.tokens)));  // gradient of the token sum
            for (size_t i = 0; i < P; ++i) {
                Tensor t = trained[i].second;
                float* dst = packed.data() + offset[i];
                const size_t n = offset[i + 1] - offset[i];
                if (t.has_grad()) {
                    const float* g = t.impl()->gcell->grad->data;
                    if (!packed_any)
                        std::copy(g, g + n, dst);
                    else
                        for (size_t j = 0; j < n; ++j) dst[j] += g[j];
                    status[2 + 2 * size_t(R) + i] = 1.0;
                    t.zero_grad();
                } else if (!packed_any) {
                    std::fill(dst, dst + n, 0.f);
                }
            }
            packed_any = true;
            loss_sum += value * double(l.tokens);
            tokens += double(l.tokens);
        };
        for (int a = 0; a < A && failure.empty() && error.empty(); ++a) {
            if (R == 1) {
                micro_batch(a);
                continue;
            }
            try {
                micro_batch(a);
            } catch (const std::exception& e) {
                error = e.what();
                clear_tape();
            }
        }
        data_rng_.set_state(rng_end);
        // A rank whose micro-batches all had no counted token still sends (zero) gradients.
        if (M > 1 && !packed_any) std::fill(packed.begin(), packed.end(), 0.f);
        if (!error.empty()) status[2 + size_t(rank)] = 1.0;
        status[0] = loss_sum;
        status[1] = tokens;
        if (R > 1) {
            comm.all_reduce_sum(status.data(), status.size());
            for (int r = 0; r < R; ++r)
                if (status[2 + size_t(r)] != 0.0) {
                    const std::string what = dist::broadcast_string(comm, error, r);
                    clear_tape();
                    for (auto& [name, t] : tensors_) Tensor(t).zero_grad();
                    throw std::runtime_error(fmt::format("rank {} of {} failed at step {} of {}: {}", r, R, step + 1,
                                                         total, what));
                }
            for (int r = 0; r < R && failure.empty(); ++r)
                if (status[2 + size_t(R) + size_t(r)] != 0.0)
                    failure = fmt::format("the loss is not finite in micro-batch {} of {} (rank {})",
                                          int(status[2 + size_t(R) + size_t(r)]), M, r);
        }
        double norm = std::numeric_limits<double>::quiet_NaN();
        if (failure.empty() && M > 1) {
            if (status[1] <= 0.0)
                throw std::invalid_argument(fmt::format(
                    "Trainer: the global batch of step index {} has no counted target tokens", step));
            if (R > 1) comm.all_reduce_sum(packed.data(), packed.size());
            const float n_tokens = float(status[1]);
            for (size_t i = 0; i < P; ++i) {
                if (status[2 + 2 * size_t(R) + i] == 0.0) continue;  // no gradient anywhere: the optimizer skips it
                float* g = trained[i].second.impl()->gcell->buffer();
                const float* src = packed.data() + offset[i];
                const size_t n = offset[i + 1] - offset[i];
                for (size_t j = 0; j < n; ++j) g[j] = src[j] / n_tokens;
            }
        }
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
        const double comm_s = comm.comm_seconds() - comm_before;
        train_s += step_s;
        comm_total_s += comm_s;
        counted_tokens += status[1];

        const double loss = M > 1 ? status[0] / status[1] : status[0];
        summary.losses.push_back(loss);
        MetricsRow row{{"step", double(step + 1)}, {"loss", loss}, {"lr", lr}, {"grad_norm", norm},
                       {"ms_per_step", step_s * 1e3}};
        if (R > 1) {
            row.emplace_back("compute_ms", (step_s - comm_s) * 1e3);
            row.emplace_back("comm_ms", comm_s * 1e3);
        }
        if (opts_.tokens_per_step > 0) row.emplace_back("tokens_per_s", double(opts_.tokens_per_step) / step_s);

        const bool last = step + 1 == total;
        std::map<std::string, double> evals;
        if (eval_fn_ && (last || (opts_.eval_every > 0 && (step + 1) % opts_.eval_every == 0))) {
            NoGradGuard no_grad;
            evals = eval_fn_(step + 1);
            for (auto& [key, value] : evals) row.emplace_back("eval_" + key, value);
            summary.final_eval = evals;
            if (opts_.patience > 0) {
                const auto it = evals.find(opts_.early_stop_metric);
                if (it == evals.end()) {
                    std::string names;
                    for (auto& [key, value] : evals) names += (names.empty() ? "" : ", ") + key;
                    throw std::invalid_argument(fmt::format(
                        "Trainer: early_stop_metric '{}' is not among the eval function's metrics ({})",
                        opts_.early_stop_metric, names));
                }
                summary.stopped_early = observe(step + 1, it->second) && !last;  // at the last update: no early stop
                if (summary.best_step == step + 1) copy_tensors(tensors_, best_);
            }
        }
        append_metrics(row);

        if (show) {
            const int64_t done = step + 1 - summary.start_step;
            const double elapsed = seconds_since(t_start);
            const double eta = elapsed / double(done) * double(total - step - 1);
            // tokens_per_step when given (all tokens); else the target tokens the
            // loss function counted (MicroBatchLoss::tokens, all ranks).
            const std::string rate =
                opts_.tokens_per_step > 0
                    ? fmt::format(" | {} tok/s", format_rate(double(opts_.tokens_per_step) * done / train_s))
                    : fmt::format(" | {} target tok/s", format_rate(counted_tokens / train_s));
            // With several ranks: the step split into compute and all-reduce time (means so far).
            const std::string split =
                R > 1 ? fmt::format(" (compute {:.1f} + comm {:.1f}, {} ranks)", (train_s - comm_total_s) * 1e3 / done,
                                    comm_total_s * 1e3 / done, R)
                      : "";
            if (tty) {
                if (last || !evals.empty() || elapsed - last_draw >= 0.1) {
                    constexpr int kBar = 20;
                    const int filled = int(kBar * (step + 1) / std::max<int64_t>(total, 1));
                    fmt::print(stderr, "\r{}{}/{} [{}{}] loss {:.4f} | lr {:.2e}{} | {:.1f} ms/step{} | ETA {}\x1b[K",
                               opts_.log_prefix, step + 1, total, std::string(size_t(filled), '#'), std::string(size_t(kBar - filled), '.'),
                               loss, lr, rate, train_s * 1e3 / done, split, format_duration(eta));
                    last_draw = elapsed;
                }
            } else if (last || (step + 1) % opts_.log_every == 0) {
                fmt::print(stderr, "{}step {}/{} loss {:.4f} lr {:.3e} grad_norm {:.3f}{} | {:.1f} ms/step{} | ETA {}\n",
                           opts_.log_prefix, step + 1, total, loss, lr, norm, rate, train_s * 1e3 / done, split,
                           format_duration(eta));
            }
            if (!evals.empty()) {
                std::string line = fmt::format("{}eval at step {}:", opts_.log_prefix, step + 1);
                for (auto& [key, value] : evals) line += fmt::format(" {} {:.4f}", key, value);
                fmt::print(stderr, "{}{}\n", tty ? "\n" : "", line);
            }
            if (tty && last && evals.empty()) fmt::print(stderr, "\n");
        }

        if (summary.stopped_early && root && opts_.log_every > 0)
            fmt::print(stderr, "{}early stop at step {} of {}: {} has not improved on {:.6g} (step {}) in {} evaluation{}\n",
                       opts_.log_prefix, step + 1, total, opts_.early_stop_metric, best_value, summary.best_step,
                       evals_since_best, evals_since_best == 1 ? "" : "s");
        if (last || summary.stopped_early || (opts_.ckpt_every > 0 && (step + 1) % opts_.ckpt_every == 0))
            save_checkpoint(step + 1);
    }
    if (opts_.patience > 0 && summary.best_step > 0 && summary.stop_reason.empty()) {
        copy_tensors(best_, tensors_);
        summary.final_eval.clear();
        for (const MetricsRow& row : rows_)
            if (*find_metric(row, "step") == double(summary.best_step))
                for (auto& [key, value] : row)
                    if (key.rfind("eval_", 0) == 0) summary.final_eval[key.substr(5)] = value;
        if (root && opts_.log_every > 0)
            fmt::print(stderr, "{}the trained tensors are those of step {} ({} {:.6g})\n", opts_.log_prefix,
                       summary.best_step, opts_.early_stop_metric, best_value);
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
    summary.comm_ms_per_step = ran ? comm_total_s * 1e3 / double(ran) : 0.0;
    return summary;
}

}  // namespace peftlab
