#pragma once
// Per-method cost reports: trainable parameters (counted and by formula),
// memory, and training-step FLOPs split by phase, each both analytic (closed
// form, below) and measured (one real step through the autograd counters);
// inference FLOPs per generated token with prefixes cached; and a per-layer
// map of where the trainable parameters and gradients are.
//
// The analytic model mirrors the counting convention of autograd/flops.h op
// by op, including which gradients each op computes: a frozen weight costs no
// dW GEMM, but dX still flows through every layer between the loss and the
// lowest layer holding something trainable (prompt tuning: all of them; a
// prefix only in the top k layers: only those k). The formulas are written
// out in report.cpp and in the README section "Cost reports".
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "autograd/flops.h"
#include "nn/gpt.h"
#include "peft/adapter.h"

namespace peftlab::peft {

// The shape of the measured step and of the decoding context.
struct ReportSettings {
    int64_t batch = 16;  // B rows per training step
    int64_t seq = 128;   // T real tokens per row; also the decoding context length
    uint64_t seed = 0;   // base weights, adapter init and the random batch
    // Blocks with activation recomputation (GPT::set_recompute), a layer spec
    // (parse_layers: all, none, top:k, 0,2): their forward counts again under
    // phase recompute, and the measured activation peak is the step's with it.
    std::string recompute = "none";
    // Throws std::invalid_argument naming the field and value (batch >= 1, seq >= 2).
    void validate() const;
};

// One parameter group of the per-layer map: "embed" (wte, wpe,
// prompt_embeddings), "blocks.<l>", "head" (ln_f, head) or "reparam"
// (training-time encoders: <x>_mlp.*, <x>_encoder.*). grad_norm is the L2 norm of the group's gradients after one
// step's backward (absent when nothing was measured).
struct LayerGroup {
    std::string group;
    int64_t trainable_params = 0;
    std::optional<double> grad_norm;
};

// Group of a trainable tensor by its name; throws naming a name it cannot place.
std::string group_of(const std::string& tensor_name);

struct MethodReport {
    std::string method;
    int64_t trainable_params = 0;  // counted from the attached adapter (the formula's value when not measured)
    int64_t formula_params = 0;    // Adapter::formula
    std::string formula;           // e.g. "L*n*d"
    int64_t total_params = 0;      // base + adapter
    double trainable_pct = 0.0;

    struct Bytes {
        int64_t params = 0;     // trainable parameters, float32
        int64_t grads = 0;      // their gradients
        int64_t optimizer = 0;  // AdamW's two moments
        // Sent and received by each data-parallel rank per update: the trained
        // tensors' gradients, float32, in one all-reduce (nn/trainer.h); the
        // frozen base sends nothing.
        int64_t allreduce = 0;
        // Peak tracked bytes during one step above those alive before it
        // (see report.cpp, measure_step); absent when not measured.
        std::optional<int64_t> activations_peak;
    } bytes;

    flops::Counts analytic{};               // one training step, by phase
    std::optional<flops::Counts> measured;  // the same, from the counters
    std::vector<std::pair<std::string, flops::Counts>> measured_by_region;

    uint64_t inference_flops_per_token = 0;  // analytic, B = 1
    std::optional<uint64_t> inference_flops_per_token_measured;

    // Blocks whose backward does any work (dX or dW): every block from the
    // lowest one holding something trainable up (all of them if the input
    // is trainable).
    std::vector<int> backward_blocks;
    // dX reaches the input of block 0: vectors trained there are prepended to
    // it (prompt tuning, P-tuning), not a block's own parameters.
    bool backward_to_input = false;
    std::vector<LayerGroup> per_layer;

    nlohmann::json to_json() const;
    // Largest relative gap |analytic - measured| / max(analytic, 1) over the
    // four phases and inference; 0 when nothing was measured.
    double max_relative_gap() const;
};

// The analytic FLOPs of one training step (forward, loss, backward, AdamW) of
// `method` on cfg with B = s.batch rows of T = s.seq tokens, by phase.
// Throws std::invalid_argument for an unknown method or bad options.
flops::Counts analytic_step_flops(const GPTConfig& cfg, const ReportSettings& s, const std::string& method,
                                  const AdapterOptions& opts);
// Analytic FLOPs to decode one token (B = 1) whose context holds T = s.seq
// real tokens (T - 1 cached plus itself) and, with prefixes cached, n prefix
// vectors in each chosen layer (prompt tuning: n virtual tokens in every layer).
// A mergeable adapter is counted merged (LoRA: W + BA, no extra work), as
// deployed for one tenant.
uint64_t analytic_inference_flops(const GPTConfig& cfg, const ReportSettings& s, const std::string& method,
                                  const AdapterOptions& opts);
// How far a step's backward reaches: the blocks with backward work, ascending,
// and whether dX reaches block 0's input (MethodReport::backward_blocks,
// backward_to_input).
struct BackwardReach {
    std::vector<int> blocks;
    bool to_input = false;
};
BackwardReach analytic_backward_reach(const GPTConfig& cfg, const std::string& method, const AdapterOptions& opts);
// Trainable parameters per group as the method lays them out (no allocation).
std::vector<LayerGroup> analytic_groups(const GPTConfig& cfg, const std::string& method, const AdapterOptions& opts);

// Methods with an analytic model: every registered one (each supplies its
// terms through Adapter's cost_* functions).
std::vector<std::string> reported_methods();

// ---- data parallelism on paper ----
// A ring all-reduce of `bytes` over K ranks (Thakur, Rabenseifner & Gropp,
// "Optimization of collective communication operations in MPICH", 2005;
// Baidu's ring all-reduce, Horovod, NCCL): a reduce-scatter then an
// all-gather, 2(K-1) steps each moving bytes/K per rank, so
//   t = 2(K-1)/K * bytes / bandwidth + 2(K-1) * latency   (0 for K = 1).
// bandwidth in bytes/s per link, latency in s per step.
double ring_allreduce_seconds(double bytes, int ranks, double bandwidth, double latency);

// Modelled time of one update of a fixed global batch on K data-parallel
// ranks: forward and backward (step[0..2]) split K ways at `flops_per_s` per
// rank, the optimizer (step[3]) in full on every rank, then the all-reduce,
// not overlapped with compute (the Trainer all-reduces after the backward).
struct ScalePoint {
    int ranks = 1;
    double compute_s = 0, comm_s = 0;
    double step_s() const { return compute_s + comm_s; }
};
ScalePoint scale_point(const flops::Counts& step, double allreduce_bytes, int ranks, double flops_per_s,
                       double bandwidth, double latency);
// Where scaling stops over K = 1..max_ranks: the K with the shortest modelled
// step (the first, on ties) and the largest K whose parallel efficiency
// t(1) / (K t(K)) is still >= 0.5.
struct ScaleLimit {
    int fastest_ranks = 1;
    int half_efficiency_ranks = 1;
};
ScaleLimit scale_limit(const flops::Counts& step, double allreduce_bytes, int max_ranks, double flops_per_s,
                       double bandwidth, double latency);

// The report of one method. With measure = false nothing is allocated: every
// number comes from the formulas (usable at GPT-2 XL scale). With measure =
// true a base is built, the adapter attached, and one real AdamW step runs
// (counters reset around it), then one cached decoding step.
MethodReport report_method(const GPTConfig& cfg, const ReportSettings& s, const std::string& method,
                           const AdapterOptions& opts, bool measure);

}  // namespace peftlab::peft
