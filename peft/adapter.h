#pragma once
// The PEFT adapter interface. An adapter owns its trainable tensors, attaches
// to a base GPT through nn's hook points (ModelHooks), and says what it costs.
// The base is frozen on attach (except by `full`) and never written to, so one
// base serves many adapters, even mixed within one batch (peft/multi.h).
//
// Adding a method: one file in peft/ defining a subclass, plus one
// PEFTLAB_METHOD line in peft/registry.cpp (README: "Adding a PEFT method").
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "nn/gpt.h"

namespace peftlab::peft {

using peftlab::NamedTensors;

struct AdapterOptions {
    int64_t n = 16;                // virtual tokens / prefix vectors per layer
    std::string layers = "all";    // "all", "none", "0,2,5", "top:k", "bottom:k"
    bool reparam = false;          // prefix forms: P = MLP(P') during training
    int64_t reparam_hidden = 512;  // hidden width of that MLP
    // Initialisation. prompt: random | vocab | text ; prefix forms: random | vocab
    // ("vocab": embeddings of sampled vocabulary tokens; "text": of init_tokens,
    // e.g. a task description or the class-label words, cycled to n).
    std::string init = "vocab";
    std::vector<int32_t> init_tokens;
    int64_t lora_rank = 8;
    float lora_alpha = 16.f;
    std::vector<std::string> lora_targets = {"q_proj", "v_proj"};
    uint64_t seed = 0;
    // Position convention (nn/hooks.h position_offset): "keep" (AdapterHub;
    // peftlab's default: real tokens at 0..T-1, prepended vectors without
    // position embedding) or "hf" (Hugging Face PEFT: n virtual tokens or
    // prefix vectors take positions 0..n-1, real tokens n..n+T-1; the default
    // for bases loaded from a Hugging Face checkpoint).
    std::string positions = "keep";

    nlohmann::json to_json() const;
    // Unknown keys and bad values throw std::invalid_argument naming the key.
    static AdapterOptions from_json(const nlohmann::json& j);
};

// Resolves a layer spec against L layers, ascending; throws naming the spec.
std::vector<int> parse_layers(const std::string& spec, int L);

// A trainable-parameter count and the formula it comes from, e.g. {16384, "L*n*d"}.
struct ParamFormula {
    int64_t count = 0;
    std::string text;
};

class Adapter : public ModelHooks {
public:
    explicit Adapter(AdapterOptions opts) : opts_(std::move(opts)) {}

    virtual std::string method() const = 0;

    // Freezes the base, then creates this method's tensors for it. Once per adapter.
    void attach(GPT& base);
    // attach (if needed) and install this adapter as the base's hooks.
    void activate(GPT& base);

    // Trainable tensors by name, training-time (reparameterization MLP included).
    // Names place a tensor in the model ("blocks.3.prefix.key", "prompt_embeddings").
    const NamedTensors& parameters() const { return params_; }
    // What inference needs: for reparameterized prefixes, the materialized
    // prefix (computed from the MLP); otherwise the trainable tensors.
    virtual NamedTensors inference_parameters() const { return params_; }
    // Replaces the reparameterization by its output, for inference.
    virtual void materialize() {}

    // Positions this adapter's prepended vectors take under positions = "hf"
    // (HF PEFT's num_virtual_tokens); 0 for one that prepends nothing.
    virtual int64_t virtual_tokens() const { return 0; }
    // ModelHooks: {virtual_tokens()} under "hf", {} (keep) under "keep".
    std::vector<int32_t> position_offset(const ForwardInfo&) override;

    // Trainable parameters as a formula of the config (training-time) and at inference.
    virtual ParamFormula formula(const GPTConfig& cfg) const = 0;
    virtual ParamFormula inference_formula(const GPTConfig& cfg) const { return formula(cfg); }

    const AdapterOptions& options() const { return opts_; }
    GPT* base() const { return base_; }
    // The chosen layers, resolved against the attached base.
    const std::vector<int>& layers() const { return layers_; }

protected:
    // Builds the tensors; base is already frozen and layers_ resolved.
    virtual void build(GPT& base) = 0;
    // Registers a trainable tensor under its name.
    Tensor add_param(const std::string& name, Tensor t);
    // How many layers the options choose in a model of this config (formulas
    // need no attached base, so reports can price GPT-2 XL without allocating it).
    int64_t chosen_layers(const GPTConfig& cfg) const {
        return int64_t(parse_layers(opts_.layers, cfg.n_layers).size());
    }
    // Rows of the base's token embedding for `ids` (detached copies), [ids.size(), d].
    Tensor embedding_rows(const std::vector<int32_t>& ids) const;
    // n token ids: init_tokens cycled ("text"), or sampled from the vocabulary ("vocab").
    std::vector<int32_t> init_token_ids(int64_t n, Rng& rng) const;

    AdapterOptions opts_;
    NamedTensors params_;
    GPT* base_ = nullptr;
    std::vector<int> layers_;
};

}  // namespace peftlab::peft
