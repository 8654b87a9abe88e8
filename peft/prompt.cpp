// Prompt tuning (Lester et al. 2021): n trainable vectors prepended to the
// input embeddings only. n*d parameters, all at the input. Hugging Face PEFT:
// PROMPT_TUNING, "prompt_embeddings" [n, d].
#include <fmt/format.h>

#include "peft/adapter.h"
#include "peft/adapter_io.h"

namespace peftlab::peft {

class PromptTuning : public Adapter {
public:
    explicit PromptTuning(AdapterOptions o) : Adapter(std::move(o)) {
        set_own_options("prompt", MethodOptions(opts_, "prompt").finish());
    }
    std::string method() const override { return "prompt"; }

    bool adapts_linear(const std::string&) const override { return false; }
    SeqPrefix input_prefix(const ForwardInfo&) override {
        if (opts_.n == 0) return {};
        return {prompt_, Tensor(), {}};
    }
    int64_t virtual_tokens() const override { return opts_.n; }
    ParamFormula formula(const GPTConfig& c) const override { return {opts_.n * c.d_model, "n*d"}; }
    std::vector<double> lr_grid() const override { return {3e-3, 1e-2, 3e-2}; }  // vectors move further per step

    // The prompt [n, C] expanded to every row and concatenated before the tokens.
    int64_t cost_input_prefix(cost::Tally& t, const GPTConfig& c, const cost::StepShape& s, cost::Sym& p) const override {
        if (opts_.n == 0) return 0;
        p = cost::expand(t, s.B * opts_.n * c.d_model, cost::kParam);
        return opts_.n;
    }
    // Decoding: the soft prompt's keys and values are cached in every layer.
    int64_t cost_decode_keys(int, const GPTConfig&) const override { return opts_.n; }
    std::vector<cost::ParamGroup> cost_groups(const GPTConfig& c) const override {
        return {{"embed", opts_.n * c.d_model}};
    }

    std::string hf_peft_type() const override { return "PROMPT_TUNING"; }
    std::optional<HfExport> hf_export() const override {
        HfExport e;
        e.config["peft_type"] = "PROMPT_TUNING";
        hf_add_prompt_learning_fields(e.config, opts_.n, base_->config());
        e.config["prompt_tuning_init"] = "RANDOM";  // how it started no longer matters: the values are in the file
        e.config["prompt_tuning_init_text"] = nullptr;
        e.config["tokenizer_name_or_path"] = nullptr;
        e.config["tokenizer_kwargs"] = nullptr;
        e.tensors.emplace_back("prompt_embeddings", prompt_);
        return e;
    }
    std::optional<AdapterOptions> hf_import_options(const ConfigFile& cfg, const GPTConfig& c, const StFile&) const override {
        if (cfg.str("peft_type") != "PROMPT_TUNING") return std::nullopt;
        AdapterOptions o;
        o.init = "random";  // every value is overwritten from the file
        o.n = hf_check_prompt_learning(cfg, c);
        return o;
    }

protected:
    void build(GPT& base) override {
        const int64_t n = opts_.n, d = base.config().d_model;
        Rng rng(opts_.seed);
        Tensor init;
        if (opts_.init == "random") init = Tensor::uniform({n, d}, rng, -0.5f, 0.5f);
        else if (opts_.init == "vocab" || opts_.init == "text") init = embedding_rows(init_token_ids(n, rng));
        else throw std::invalid_argument(fmt::format("prompt adapter: init '{}' is not random, vocab or text", opts_.init));
        prompt_ = add_param("prompt_embeddings", init);  // [n, d]
    }

private:
    Tensor prompt_;
};

std::unique_ptr<Adapter> make_prompt(const AdapterOptions& o) { return std::make_unique<PromptTuning>(o); }

}  // namespace peftlab::peft
