// Prompt tuning (Lester et al. 2021): n trainable vectors prepended to the
// input embeddings only. n*d parameters, all at the input.
#include <fmt/format.h>

#include "peft/adapter.h"

namespace peftlab::peft {

class PromptTuning : public Adapter {
public:
    using Adapter::Adapter;
    std::string method() const override { return "prompt"; }

    bool adapts_linear(const std::string&) const override { return false; }
    SeqPrefix input_prefix(const ForwardInfo&) override {
        if (opts_.n == 0) return {};
        return {prompt_, Tensor(), {}};
    }
    int64_t virtual_tokens() const override { return opts_.n; }
    ParamFormula formula(const GPTConfig& c) const override { return {opts_.n * c.d_model, "n*d"}; }

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
