#pragma once
// The PEFT adapter interface. An adapter owns its trainable tensors, attaches
// to a base GPT through nn's hook points (ModelHooks), and says what it can do
// and what it costs. Code outside a method's own file never asks for a method
// by name or type: it asks the adapter (changes_base, mergeable, lr_grid,
// weight_decay, the cost_* terms, hf_export, ...).
// The base is frozen on attach (except by a method that changes_base()) and
// never written to, so one base serves many adapters, even mixed within one
// batch (peft/multi.h).
//
// Adding a method: one file in peft/ defining a subclass, plus one
// PEFTLAB_METHOD line in peft/registry.cpp (README: "Adding a PEFT method").
// A method defined elsewhere (a test, a user's program) registers itself at
// run time with register_method (peft/registry.h).
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "nn/gguf.h"
#include "nn/gpt.h"
#include "peft/cost.h"

namespace peftlab {
struct StFile;
}

namespace peftlab::peft {

using peftlab::NamedTensors;

// Options every adapter has, plus each method's own options in a section named
// after the method. JSON: the common keys and one object per method, e.g.
//   {"n": 16, "layers": "all", "init": "vocab", "init_tokens": [], "seed": 0,
//    "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}}
// A section is read and validated by its method (MethodOptions below), which
// rejects keys it does not know; an adapter keeps only its own section, with
// every default filled in (so a saved adapter records what it ran with).
struct AdapterOptions {
    int64_t n = 16;              // virtual tokens / prefix vectors per layer
    std::string layers = "all";  // "all", "none", "0,2,5", "top:k", "bottom:k"
    // Initialisation of prepended vectors: random | vocab | text ("vocab":
    // embeddings of sampled vocabulary tokens; "text": of init_tokens, e.g. a
    // task description or the class-label words, cycled to n).
    std::string init = "vocab";
    std::vector<int32_t> init_tokens;
    uint64_t seed = 0;
    // Position convention (nn/hooks.h position_offset): "keep" (AdapterHub;
    // peftlab's default: real tokens at 0..T-1, prepended vectors without
    // position embedding) or "hf" (Hugging Face PEFT: n virtual tokens or
    // prefix vectors take positions 0..n-1, real tokens n..n+T-1; the default
    // for bases loaded from a Hugging Face checkpoint).
    std::string positions = "keep";
    // Method name -> that method's own options (a JSON object).
    nlohmann::json sections = nlohmann::json::object();

    // Method `method`'s section, created empty if absent.
    nlohmann::json& section(const std::string& method);
    // The section, or an empty object.
    nlohmann::json section_or_empty(const std::string& method) const;

    nlohmann::json to_json() const;
    // Unknown keys and bad values throw std::invalid_argument naming the key; a
    // key naming a registered method is that method's section and is validated
    // by the method.
    static AdapterOptions from_json(const nlohmann::json& j);
};

// Reads one method's section of AdapterOptions, naming the method and key in
// every error ("lora options: key 'r' = 0 must be >= 1"). Each getter returns
// the default when the key is absent; finish() rejects keys nobody read and
// returns the section with every read key (defaults filled in).
class MethodOptions {
public:
    MethodOptions(const AdapterOptions& o, std::string method);
    int64_t integer(const std::string& key, int64_t def, int64_t min);
    double number(const std::string& key, double def);
    bool boolean(const std::string& key, bool def);
    std::string choice(const std::string& key, const std::string& def, const std::vector<std::string>& allowed);
    std::vector<std::string> strings(const std::string& key, const std::vector<std::string>& def);
    nlohmann::json finish();

private:
    std::invalid_argument error(const std::string& key, const std::string& why) const;
    const nlohmann::json* find(const std::string& key);
    std::string method_;
    nlohmann::json in_, out_ = nlohmann::json::object();
};

// Resolves a layer spec against L layers, ascending; throws naming the spec.
std::vector<int> parse_layers(const std::string& spec, int L);

// A trainable-parameter count and the formula it comes from, e.g. {16384, "L*n*d"}.
struct ParamFormula {
    int64_t count = 0;
    std::string text;
};

class ConfigFile;  // a parsed JSON config file whose errors name the file and key (peft/adapter_io.h)

// What Hugging Face PEFT's PeftModel.save_pretrained writes for an adapter in
// inference mode: the peft_type-specific fields of adapter_config.json (the
// common ones are added by export_hf) and the tensors by file key.
struct HfExport {
    nlohmann::json config;
    NamedTensors tensors;
};

class Adapter : public ModelHooks {
public:
    explicit Adapter(AdapterOptions opts) : opts_(std::move(opts)) {}
    ~Adapter() override;

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

    // ---- capabilities ---------------------------------------------------------------------
    // True when the method trains the base's own weights (full fine-tuning):
    // its tensors are the base's, its file is the whole model, and the base
    // serves no other adapter.
    virtual bool changes_base() const { return false; }
    // True when merge() can fold the adapter into the base weights (LoRA).
    virtual bool mergeable() const { return false; }
    // W += delta for inference without the extra path; the merged base serves
    // this adapter only. Several adapters merged into one base must be
    // unmerged in reverse order: unmerge() of one merged before another still
    // merged throws std::logic_error naming both, so the base always ends
    // bitwise as it was. merge() throws std::logic_error unless mergeable().
    void merge();
    void unmerge();
    bool merged() const { return merged_; }
    // The base holds this adapter's changes now (changes_base() or merged()):
    // it cannot be mixed with other adapters (MultiAdapter, Server) or saved alone.
    bool holds_base() const { return changes_base() || merged_; }
    // Positions of the model's position table that the vectors this adapter
    // prepends take: virtual_tokens() under positions = "hf", 0 under "keep"
    // (real tokens keep positions 0..T-1). The Server's rule for every
    // method: prompt + max_new_tokens + prefix_positions() <= max_seq.
    int64_t prefix_positions() const { return opts_.positions == "hf" ? virtual_tokens() : 0; }

    // Fine-tuning defaults: the learning rates the harness searches (prefix
    // vectors move further per step than weight deltas), and AdamW's weight
    // decay (0 for deltas, which decay towards the base anyway).
    virtual std::vector<double> lr_grid() const = 0;
    virtual double weight_decay() const { return 0.0; }

    // ---- the analytic cost model (peft/cost.h, walked by peft/report.cpp) ------------------
    // Each term is what the method's hooks add to GPT::forward at the same
    // point, op by op in flops.h's convention; no base is needed (a report
    // prices GPT-2 XL without allocating it). Defaults add nothing.
    // Once per forward, before the embeddings (a reparameterization MLP).
    virtual void cost_begin_forward(cost::Tally&, const GPTConfig&, const cost::StepShape&) const {}
    // input_prefix: the number of vectors prepended to every row's input (0:
    // none); adds their cost and sets p to the [B, n, C] tensor.
    virtual int64_t cost_input_prefix(cost::Tally&, const GPTConfig&, const cost::StepShape&, cost::Sym& p) const {
        return 0;
    }
    // layer_prefix: keys and values prepended in layer l's attention; `base`
    // is the Sym of the base's weights (frozen unless changes_base()).
    virtual cost::KeyValueCost cost_layer_prefix(int layer, cost::Tally&, const GPTConfig&, const cost::StepShape&,
                                                 cost::Sym base) const {
        return {};
    }
    // The Linear at `path` ("blocks.2.attn.q_proj") on R rows: cost_linear_input
    // may change its input x [R, in] before the GEMM (linear_input), cost_linear
    // its output y [R, out] after (linear_delta, linear_output). Return the new Sym.
    virtual cost::Sym cost_linear_input(const std::string& path, cost::Tally&, const GPTConfig&, int64_t R,
                                        int64_t in, cost::Sym x) const {
        return x;
    }
    virtual cost::Sym cost_linear(const std::string& path, cost::Tally&, const GPTConfig&, int64_t R, int64_t in,
                                  int64_t out, cost::Sym x, cost::Sym y) const {
        return y;
    }
    // Whether linear_delta gives the Linear at `path` a bias delta [out]
    // (a trainable parameter), which the Linear adds to its bias: an [out]
    // add before the GEMM instead of a pass over the output.
    virtual bool cost_bias_delta(const std::string& path, const GPTConfig&) const { return false; }
    // The LayerNorm at `path` ("blocks.2.ln1", "ln_f") reads gain `gamma` and
    // bias `beta` (the base's, as given): set them to the Syms of what
    // layer_norm_params substitutes (kParam for a trained copy).
    virtual void cost_layer_norm(const std::string& path, const GPTConfig&, cost::Sym& gamma, cost::Sym& beta) const {}
    // Decoding one token (B = 1) with the adapter as deployed (merged if
    // mergeable, prefixes cached): vectors in layer l's attention besides the
    // context, and the method's extra FLOPs.
    virtual int64_t cost_decode_keys(int layer, const GPTConfig&) const { return 0; }
    virtual int64_t cost_decode_extra(const GPTConfig&) const { return 0; }
    // Trainable parameters by group of the per-layer map (peft/report.h:
    // group_of), as the method lays them out.
    virtual std::vector<cost::ParamGroup> cost_groups(const GPTConfig& cfg) const = 0;

    // ---- Hugging Face PEFT (peft/adapter_io.h: export_hf, import_hf) ----------------------
    // The peft_type-specific config fields and tensors of this (attached)
    // adapter; nullopt when PEFT has no counterpart. Throws
    // std::invalid_argument when this configuration has none (naming why).
    virtual std::optional<HfExport> hf_export() const { return std::nullopt; }
    // PEFT's peft_type of that export ("LORA"), "" when there is none.
    virtual std::string hf_peft_type() const { return ""; }
    // Called on an unattached adapter made with default options: the options
    // of this method that reads PEFT config `cfg` with weights `file`, or
    // nullopt when `cfg` is not this method's (its peft_type). `file` is read
    // only where the config alone does not fix the options (LoRA: how a fused
    // GPT-2 c_attn pair splits into q/k/v); its keys and shapes are checked
    // later, so a wrong one must not throw here. Throws naming the file and key.
    virtual std::optional<AdapterOptions> hf_import_options(const ConfigFile& cfg, const GPTConfig& c,
                                                            const StFile& file) const {
        return std::nullopt;
    }
    // Fills the attached adapter from the PEFT file at `path` (keys and shapes
    // checked first, naming the file and key). Default: the keys hf_export writes.
    virtual void hf_import_tensors(const std::string& path, const StFile& file);

    // ---- llama.cpp (nn/gguf.h: save_gguf_lora) ---------------------------------------------
    // This (attached) adapter as llama.cpp LoRA pairs on the gpt2 GGUF tensors,
    // for generate --gguf-adapter; nullopt when llama.cpp has no counterpart
    // (a mergeable adapter can still be exported merged into the model file).
    virtual std::optional<GgufLora> gguf_lora() const { return std::nullopt; }

    const AdapterOptions& options() const { return opts_; }
    GPT* base() const { return base_; }
    // The chosen layers, resolved against the attached base.
    const std::vector<int>& layers() const { return layers_; }
    // The chosen layers in a model of this config (no base needed).
    std::vector<int> chosen_layers_of(const GPTConfig& cfg) const { return parse_layers(opts_.layers, cfg.n_layers); }

protected:
    // Builds the tensors; base is already frozen and layers_ resolved.
    virtual void build(GPT& base) = 0;
    // Folds the adapter into the base weights (mergeable methods), changing
    // in place only tensors taken with merge_target; unmerge() puts each back.
    virtual void merge_into_base() {}
    // In merge_into_base: the base's tensor `name` ("blocks.0.attn.q_proj.weight")
    // to change in place. A copy is kept, and unmerge() restores it bitwise.
    // Throws std::logic_error when called outside merge_into_base.
    Tensor merge_target(const std::string& name);
    // Registers a trainable tensor under its name.
    Tensor add_param(const std::string& name, Tensor t);
    // Keeps only this method's own section, `canonical` (MethodOptions::finish).
    void set_own_options(const std::string& method, nlohmann::json canonical);
    // How many layers the options choose in a model of this config (formulas
    // need no attached base, so reports can price GPT-2 XL without allocating it).
    int64_t chosen_layers(const GPTConfig& cfg) const {
        return int64_t(parse_layers(opts_.layers, cfg.n_layers).size());
    }
    // Layer index of a Linear path "blocks.<l>.<...>", -1 for any other path.
    static int layer_of(const std::string& path);
    // Whether `path` lies in a chosen layer of a model of this config (no base needed).
    bool in_chosen_layer(const GPTConfig& cfg, const std::string& path) const {
        const int l = layer_of(path);
        for (int c : chosen_layers_of(cfg))
            if (c == l) return true;
        return false;
    }
    // Rows of the base's token embedding for `ids` (detached copies), [ids.size(), d].
    Tensor embedding_rows(const std::vector<int32_t>& ids) const;
    // n token ids: init_tokens cycled ("text"), or sampled from the vocabulary ("vocab").
    std::vector<int32_t> init_token_ids(int64_t n, Rng& rng) const;

    AdapterOptions opts_;
    NamedTensors params_;
    GPT* base_ = nullptr;
    std::vector<int> layers_;

private:
    // The merge_target tensors back as they were before the merge.
    void put_back_merge_targets();
    bool merged_ = false;
    bool merging_ = false;  // inside merge_into_base: merge_target may be called
    std::vector<std::pair<Tensor, Tensor>> merge_saved_;  // (base tensor, its value before the merge)
};

}  // namespace peftlab::peft
