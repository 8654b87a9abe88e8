#include "peft/registry.h"

#include <stdexcept>

namespace peftlab::peft {

// One line per method: registry name, factory (defined in the method's own
// file in peft/), description. Adding a method adds a line here.
#define PEFTLAB_METHODS(X)                                                                                  \
    X("full", make_full, "full fine-tuning: every base parameter trains (the baseline)")                    \
    X("prompt", make_prompt, "prompt tuning (Lester et al. 2021): n soft tokens at the input only, n*d")    \
    X("prefix", make_prefix, "prefix tuning, hidden-state form: n vectors prepended to each layer's input, L*n*d") \
    X("prefix-kv", make_prefix_kv, "prefix tuning, key/value form (Li & Liang 2021): 2*L*n*d")              \
    X("lora", make_lora, "LoRA (Hu et al. 2021): rank-r deltas B*A on chosen projections")                  \
    X("bitfit", make_bitfit, "BitFit-style bias deltas on every Linear of the chosen layers")                 \
    X("ia3", make_ia3, "(IA)^3 (Liu et al. 2022): learned scaling of k, v and the MLP inner activation, L*(2d + F)") \
    X("ln-tuning", make_ln_tuning, "LN-tuning (Qi et al. 2022): trained copies of the LayerNorm gains and biases, (2L+1)*2d") \
    X("p-tuning", make_p_tuning, "P-tuning (Liu et al. 2021): n virtual tokens from a prompt encoder (MLP or LSTM), n*d at inference") \
    X("infix", make_infix, "infix tuning (Li & Liang 2021): the hidden-state prefix placed between source and target, L*n*d") \
    X("vera", make_vera, "VeRA (Kopiczko et al. 2024): shared frozen random A, B; trained vectors lambda_d [r], lambda_b [out], L*(2r + 2d)")

#define PEFTLAB_DECLARE(name, factory, description) std::unique_ptr<Adapter> factory(const AdapterOptions&);
PEFTLAB_METHODS(PEFTLAB_DECLARE)
#undef PEFTLAB_DECLARE

namespace {
std::vector<MethodInfo>& method_list() {
#define PEFTLAB_ENTRY(name, factory, description) MethodInfo{name, description, factory, true},
    static std::vector<MethodInfo> list{PEFTLAB_METHODS(PEFTLAB_ENTRY)};
#undef PEFTLAB_ENTRY
    return list;
}
}  // namespace

const std::vector<MethodInfo>& methods() { return method_list(); }

void register_method(MethodInfo info) {
    if (info.name.empty()) throw std::invalid_argument("register_method: empty method name");
    if (!info.make) throw std::invalid_argument("register_method: method '" + info.name + "' has no factory");
    info.builtin = false;
    for (const MethodInfo& m : methods())
        if (m.name == info.name) throw std::invalid_argument("register_method: method '" + info.name + "' is already registered");
    method_list().push_back(std::move(info));
}

std::vector<std::string> method_names() {
    std::vector<std::string> names;
    for (const MethodInfo& m : methods()) names.push_back(m.name);
    return names;
}

std::unique_ptr<Adapter> make_adapter(const std::string& name, const AdapterOptions& opts) {
    for (const MethodInfo& m : methods())
        if (m.name == name) return m.make(opts);
    std::string known;
    for (const MethodInfo& m : methods()) known += (known.empty() ? "" : ", ") + m.name;
    throw std::invalid_argument("unknown PEFT method '" + name + "' (known: " + known + ")");
}

}  // namespace peftlab::peft
