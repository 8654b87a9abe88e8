#pragma once
// The training loop every experiment uses: accumulation, clipping, schedule,
// evaluation, metrics files, checkpoints, bitwise-exact resume, NaN stop.
//
// One step (`step` = 0, 1, ... is the index handed to the loss function and the
// schedule; files and messages count completed updates, step + 1):
//   lr = schedule.at(step); zero grads;
//   k = grad_accum times: loss = loss_fn(step, data_rng); backward(loss / k);
//   grad_norm (clipped to clip_norm if > 0); optimizer step;
//   eval every eval_every updates and at the end; checkpoint every ckpt_every
//   updates and at the end.
// A non-finite loss or gradient norm stops the run before the optimizer steps:
// run() prints and returns the reason (completed = false) and the last
// checkpoint written stays on disk.
//
// Resume: the checkpoint holds the trained tensors, the optimizer state, the
// data generator and every generator in TrainOptions::rngs, and the step. A
// loss function that draws its batches from (step, data_rng) alone, and a model
// whose only randomness is in those generators, then continue bitwise as if
// never interrupted. Metrics rows past the checkpoint are dropped on resume.
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "autograd/rng.h"
#include "nn/checkpoint.h"
#include "nn/optim.h"

namespace peftlab {

struct TrainOptions {
    int64_t steps = 100;                  // optimizer updates in the whole run (resumed or not)
    int grad_accum = 1;                   // micro-batches (loss_fn calls) per update
    double clip_norm = 0.0;               // > 0: clip the global gradient norm to this
    std::optional<LRSchedule> schedule;   // unset: the optimizer's lr throughout
    int64_t eval_every = 0;               // 0: evaluate only at the end (when there is an eval fn)
    int64_t ckpt_every = 0;               // 0: checkpoint only at the end; no checkpoints without out_dir
    int64_t log_every = 10;               // plain log line period off a TTY; 0: no progress output
    std::string log_prefix;               // starts every progress line, e.g. "[lora | lr 1e-03] "
    std::string out_dir;                  // metrics and checkpoint; "": write no files
    bool resume = false;                  // continue from out_dir's checkpoint if there is one
    uint64_t data_seed = 0;               // seeds the data generator handed to loss_fn
    int64_t tokens_per_step = 0;          // tokens per update (all micro-batches), for tokens/s
    NamedRngs rngs;                       // more generators to checkpoint, e.g. {"dropout", &model.dropout_rng()}
    Metadata ckpt_metadata;               // extra strings stored in every checkpoint
};

struct TrainSummary {
    bool completed = false;       // false: stopped early, stop_reason says why
    std::string stop_reason;
    int64_t start_step = 0;       // updates already done before this run (from the checkpoint)
    int64_t steps = 0;            // updates done in all, including start_step
    std::vector<double> losses;   // losses[i]: loss of update start_step + i + 1 (mean over micro-batches)
    double final_loss = 0.0;      // loss of the last update done (NaN if there was none)
    std::map<std::string, double> final_eval;  // the last evaluation's metrics
    double wall_s = 0.0;          // this run, evaluation and checkpoints included
    double ms_per_step = 0.0;     // mean over this run's updates (forward, backward, optimizer)
    double tokens_per_s = 0.0;    // tokens_per_step / that time; 0 if tokens_per_step is 0
};

// ("step", 12), ("loss", 2.31), ("lr", ...), ..., then eval metrics: one update's
// line in metrics.jsonl / metrics.csv.
using MetricsRow = std::vector<std::pair<std::string, double>>;

class Trainer {
public:
    // Returns the loss of one micro-batch (forward inside): a scalar that requires grad.
    using LossFn = std::function<Tensor(int64_t step, Rng& data_rng)>;
    // Metrics after `completed_steps` updates; runs under NoGradGuard. It must
    // switch the model to eval() and back itself and leave the generators alone.
    using EvalFn = std::function<std::map<std::string, double>(int64_t completed_steps)>;

    // `tensors`: what a checkpoint saves and the gradient norm covers — every
    // parameter of `opt` must be among them (std::invalid_argument otherwise).
    Trainer(NamedTensors tensors, Optimizer& opt, LossFn loss_fn, TrainOptions opts, EvalFn eval_fn = {});

    TrainSummary run();

    // <out_dir>/checkpoint.safetensors
    std::string checkpoint_path() const;
    Rng& data_rng() { return data_rng_; }

private:
    NamedRngs all_rngs();
    // Loads the checkpoint if resuming from one; returns the step to start at.
    int64_t restore();
    // Keeps the metrics rows of updates <= completed_steps (in memory and in
    // metrics.jsonl); 0 starts fresh files.
    void reset_metrics(int64_t completed_steps);
    void append_metrics(const MetricsRow& row);
    void write_csv() const;
    void save_checkpoint(int64_t completed_steps);

    NamedTensors tensors_;
    Optimizer& opt_;
    LossFn loss_fn_;
    EvalFn eval_fn_;
    TrainOptions opts_;
    Rng data_rng_;
    std::vector<MetricsRow> rows_;  // one per update, eval metrics merged in
    int64_t last_ckpt_step_ = -1;       // -1: none written or loaded in this run
};

}  // namespace peftlab
