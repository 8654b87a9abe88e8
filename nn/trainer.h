#pragma once
// The training loop every experiment uses: accumulation, clipping, schedule,
// evaluation, metrics files, checkpoints, bitwise-exact resume, NaN stop.
//
// One step (`step` = 0, 1, ... is the index handed to the loss function and the
// schedule; files and messages count completed updates, step + 1):
//   lr = schedule.at(step); zero grads;
//   the global batch is split into M = ranks x grad_accum micro-batches
//   (dist::Shard); this rank computes micro-batches rank*grad_accum + a,
//   a = 0..grad_accum-1, each loss_fn(step, copy of data_rng, shard);
//   grad_norm (clipped to clip_norm if > 0); optimizer step;
//   eval every eval_every updates and at the end; checkpoint every ckpt_every
//   updates and at the end.
//
// Weighting (M > 1): micro-batch m returns its mean loss over its n_m counted
// target tokens; backward(loss_m * n_m) gives the gradient of its token SUM,
// which is copied into one contiguous buffer of the trained tensors'
// gradients (first micro-batch) or added to it (the next ones, in order);
// the ranks' buffers are summed (one all-reduce of the trainable gradients
// only), and the sum divided by N = sum of n_m. That is the gradient of the
// mean over all N tokens of the global batch, whatever the split, as for one
// big batch (to float rounding). The reported loss is sum(loss_m * n_m) / N.
// Two ranks with grad_accum 1 add the same two buffers as one process with
// grad_accum 2 (g0 + g1 either way), so their loss curves and weights are
// bitwise equal. M = 1 is one batch: backward(loss), nothing packed.
//
// Data: every call gets a copy of the data generator as it was at the start of
// the step, must draw the whole global batch from it and keep rows
// [shard.begin(B), shard.end(B)); the generator then moves on as one draw of
// the global batch (checked: every shard must leave it in the same state). A
// checkpoint is thus the same whatever the number of ranks, and a run
// resumes on any number of ranks.
//
// Several ranks (TrainOptions::comm, default dist::world()): the trained
// tensors are broadcast from rank 0 at the start; every rank takes the same
// optimizer step; rank 0 alone prints and writes metrics and checkpoints;
// eval_fn runs on every rank (it may shard and all-reduce). An exception on
// one rank inside a step (bad input on its shard) is reported to every rank
// before the gradient all-reduce, and every rank throws std::runtime_error
// naming the failing rank and its message.
// A non-finite loss or gradient norm stops the run before the optimizer steps:
// run() prints and returns the reason (completed = false) and the last
// checkpoint written stays on disk.
//
// Resume: the checkpoint holds the trained tensors, the optimizer state, the
// data generator and every generator in TrainOptions::rngs, and the step. A
// loss function that draws its batches from (step, data_rng) alone, and a model
// whose only randomness is in those generators, then continue bitwise as if
// never interrupted. Metrics rows past the checkpoint are dropped on resume.
//
// Early stopping (patience > 0): after each evaluation, early_stop_metric
// (lower is better, e.g. "valid_loss") either improves on the best so far (a
// strict <; the trained tensors are copied aside) or counts one evaluation
// without improvement; after `patience` of those in a row the run stops
// (completed = true, stopped_early = true). Either way (not after a NaN stop)
// the tensors end as at the best evaluation and final_eval holds that
// evaluation's metrics; the optimizer state stays the last update's. The
// copy travels in every checkpoint (as "best/<name>"), and the best value and
// the count are read back from the metrics rows, so a resumed run stops where
// the uninterrupted one does.
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "autograd/rng.h"
#include "nn/checkpoint.h"
#include "nn/dist.h"
#include "nn/optim.h"

namespace peftlab {

struct TrainOptions {
    int64_t steps = 100;                  // optimizer updates in the whole run (resumed or not)
    int grad_accum = 1;                   // micro-batches per update on each rank (the global batch is split)
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
    dist::Communicator* comm = nullptr;   // the ranks to train with; nullptr: dist::world()
    int64_t patience = 0;                 // > 0: early stopping after this many evaluations without a new best
    std::string early_stop_metric;        // an eval_fn metric, lower is better; needed when patience > 0
};

struct TrainSummary {
    bool completed = false;       // false: stopped early, stop_reason says why
    std::string stop_reason;
    int64_t start_step = 0;       // updates already done before this run (from the checkpoint)
    int64_t steps = 0;            // updates done in all, including start_step
    std::vector<double> losses;   // losses[i]: loss of update start_step + i + 1 (mean over micro-batches)
    double final_loss = 0.0;      // loss of the last update done (NaN if there was none)
    std::map<std::string, double> final_eval;  // the last evaluation's metrics (early stopping: the best one's)
    bool stopped_early = false;   // patience ran out before `steps` updates
    int64_t best_step = 0;        // early stopping: the update whose tensors the run ends with (0: none evaluated)
    double wall_s = 0.0;          // this run, evaluation and checkpoints included
    double ms_per_step = 0.0;     // mean over this run's updates (forward, backward, optimizer)
    double tokens_per_s = 0.0;    // tokens_per_step / that time; 0 if tokens_per_step is 0
    double comm_ms_per_step = 0.0;  // part of ms_per_step spent in all-reduces (waiting included)
};

// One micro-batch's loss: its mean over `tokens` counted target tokens (the
// weight it gets when micro-batches are summed). A plain Tensor converts with
// tokens = 1 (every micro-batch weighs the same).
struct MicroBatchLoss {
    Tensor loss;
    int64_t tokens = 1;
    MicroBatchLoss() = default;
    MicroBatchLoss(Tensor l, int64_t n = 1) : loss(std::move(l)), tokens(n) {}  // NOLINT: implicit on purpose
};

// Targets that a mean loss counts (!= ignore_index, lm_loss's -1): the
// `tokens` of a MicroBatchLoss.
int64_t counted_targets(const std::vector<int32_t>& targets, int32_t ignore_index = -1);

// ("step", 12), ("loss", 2.31), ("lr", ...), ..., then eval metrics: one update's
// line in metrics.jsonl / metrics.csv.
using MetricsRow = std::vector<std::pair<std::string, double>>;

class Trainer {
public:
    // Returns the loss of one micro-batch (forward inside): a scalar that
    // requires grad, and its counted tokens. See "Data" above for the shard.
    using LossFn = std::function<MicroBatchLoss(int64_t step, Rng& data_rng, const dist::Shard& shard)>;
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
    // Rank 0 with an out_dir: the one that writes metrics and checkpoints.
    bool writes_files() const;
    // Loads the checkpoint if resuming from one; returns the step to start at.
    int64_t restore();
    // Keeps the metrics rows of updates <= completed_steps (in memory and in
    // metrics.jsonl); 0 starts fresh files.
    void reset_metrics(int64_t completed_steps);
    void append_metrics(const MetricsRow& row);
    void write_csv() const;
    void save_checkpoint(int64_t completed_steps);
    // What a checkpoint holds: the trained tensors, then the best copies.
    NamedTensors checkpoint_tensors() const;

    NamedTensors tensors_;
    Optimizer& opt_;
    LossFn loss_fn_;
    EvalFn eval_fn_;
    TrainOptions opts_;
    Rng data_rng_;
    std::vector<MetricsRow> rows_;  // one per update, eval metrics merged in
    int64_t last_ckpt_step_ = -1;       // -1: none written or loaded in this run
    NamedTensors best_;  // patience > 0: the trained tensors at the best evaluation, "best/<name>"
};

}  // namespace peftlab
