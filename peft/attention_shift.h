#pragma once
// How far an adaptation moves attention over the content positions, per
// layer and head: the diagnostic of Petrov, Torr & Bibi, "When Do Prompting
// and Prefix-Tuning Work?" (ICLR 2024), Section 4. Their result: a prefix
// (virtual keys and values prepended in a layer) cannot change the relative
// attention over the content; renormalised over the content positions, a
// layer's attention is what it was without the prefix, for the same layer
// input. The prefix only mixes a bias into the attention output (and through
// it, changes what later layers read).
//
// Two measures, each a total variation TV(p, p') = 1/2 sum_j |p_j - p'_j|
// between attention distributions over the content keys of one query:
//   local       at each layer, for the adapted model's own layer input h
//               (the LN1 output the projections read): the base's attention
//               (the base's q_proj, k_proj on h; softmax over the content keys)
//               against the adapted model's (its observed q, k; softmax over
//               every key, prefix and virtual tokens included, then the
//               non-content columns dropped and the rest renormalised). A
//               prefix, in either form, gives 0 to rounding at every layer;
//               LoRA on q_proj/k_proj, or full fine-tuning, does not.
//   end_to_end  the base run on the tokens against the adapted model run on
//               them, layer by layer: the layer inputs differ after the first
//               layer, so any adaptation can move it there.
// Content positions are a row's own tokens: the last T queries and keys of a
// layer (virtual tokens and prefix keys come first); padding (in.valid 0) is
// neither a query nor a key. Computed in double from the float q and k.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "nn/gpt.h"

namespace peftlab::peft {

struct AttentionShift {
    int n_layers = 0, n_heads = 0;
    int64_t queries = 0;  // content query positions measured per layer and head (all rows)
    // [layer][head]: the mean and the max over queries of each measure.
    std::vector<std::vector<double>> local_mean, local_max, end_to_end_mean, end_to_end_max;

    double max_local() const;       // the largest local_max entry
    double mean_local() const;      // local_mean averaged over layers and heads
    double mean_end_to_end() const;  // end_to_end_mean averaged over layers and heads
    nlohmann::json to_json() const;
    // A markdown table: one row per layer, per head "local mean / end-to-end mean".
    std::string markdown() const;
};

// Runs `base` and `adapted` (a model with an adapter's hooks attached, or a
// fine-tuned copy of base) once each on `in` without gradients, observing
// every layer's attention (ModelHooks::observe_attention, through a
// forwarding wrapper around each model's hooks, restored afterwards). Throws
// std::invalid_argument when the configs differ in layers, heads or width.
AttentionShift attention_shift(GPT& base, GPT& adapted, const ModelInput& in);

}  // namespace peftlab::peft
