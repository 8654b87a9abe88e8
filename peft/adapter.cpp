#include "peft/adapter.h"

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <set>
#include <sstream>
#include <stdexcept>
#include <type_traits>

#include <fmt/format.h>

#include "nn/json_limits.h"

namespace peftlab::peft {

nlohmann::json AdapterOptions::to_json() const {
    return {{"n", n},
            {"layers", layers},
            {"reparam", reparam},
            {"reparam_hidden", reparam_hidden},
            {"init", init},
            {"init_tokens", init_tokens},
            {"lora_rank", lora_rank},
            {"lora_alpha", lora_alpha},
            {"lora_targets", lora_targets},
            {"seed", seed}};
}

AdapterOptions AdapterOptions::from_json(const nlohmann::json& j) {
    if (!j.is_object()) throw std::invalid_argument("AdapterOptions: expected a JSON object, got " + json_excerpt(j));
    AdapterOptions o;
    for (auto it = j.begin(); it != j.end(); ++it) {
        const std::string& k = it.key();
        auto bad_value = [&] {
            return std::invalid_argument(fmt::format("AdapterOptions: key '{}' has a bad value {}", k, json_excerpt(*it)));
        };
        // get_to alone would truncate 2.5 to 2 and wrap -1 to 2^64 - 1 without a word.
        auto integer = [&](const nlohmann::json& v, bool is_unsigned) {
            if (!v.is_number_integer() || (is_unsigned && !v.is_number_unsigned())) throw bad_value();
        };
        auto get_integer = [&](auto& field) {
            integer(*it, std::is_unsigned_v<std::decay_t<decltype(field)>>);
            it->get_to(field);
        };
        try {
            if (k == "n") get_integer(o.n);
            else if (k == "layers") it->get_to(o.layers);
            else if (k == "reparam") it->get_to(o.reparam);
            else if (k == "reparam_hidden") get_integer(o.reparam_hidden);
            else if (k == "init") it->get_to(o.init);
            else if (k == "init_tokens") {
                if (!it->is_array()) throw bad_value();
                for (const auto& v : *it) {
                    integer(v, false);
                    if (v.get<int64_t>() < INT32_MIN || v.get<int64_t>() > INT32_MAX) throw bad_value();
                }
                it->get_to(o.init_tokens);
            } else if (k == "lora_rank") get_integer(o.lora_rank);
            else if (k == "lora_alpha") {
                // A double beyond float's range would convert with undefined behaviour.
                if (!it->is_number() || !(std::abs(it->get<double>()) <= double(FLT_MAX))) throw bad_value();
                it->get_to(o.lora_alpha);
            }
            else if (k == "lora_targets") it->get_to(o.lora_targets);
            else if (k == "seed") get_integer(o.seed);
            else throw std::invalid_argument(fmt::format("AdapterOptions: unknown key '{}'", k));
        } catch (const nlohmann::json::exception&) {
            throw bad_value();
        }
    }
    if (o.n < 0) throw std::invalid_argument(fmt::format("AdapterOptions: n = {} must be >= 0", o.n));
    if (o.lora_rank < 1) throw std::invalid_argument(fmt::format("AdapterOptions: lora_rank = {} must be >= 1", o.lora_rank));
    if (o.reparam_hidden < 1)
        throw std::invalid_argument(fmt::format("AdapterOptions: reparam_hidden = {} must be >= 1", o.reparam_hidden));
    return o;
}

std::vector<int> parse_layers(const std::string& spec, int L) {
    auto bad = [&](const std::string& why) {
        return std::invalid_argument(fmt::format("layers '{}': {} (model has {} layers; use all, none, "
                                                 "top:k, bottom:k or a list like 0,2,3)",
                                                 spec, why, L));
    };
    std::vector<int> out;
    if (spec == "all" || spec.empty()) {
        for (int l = 0; l < L; ++l) out.push_back(l);
        return out;
    }
    if (spec == "none") return out;
    auto parse_int = [&](const std::string& s) {
        size_t used = 0;
        int v = 0;
        try {
            v = std::stoi(s, &used);
        } catch (const std::exception&) {
            throw bad("'" + s + "' is not a number");
        }
        if (used != s.size()) throw bad("'" + s + "' is not a number");
        return v;
    };
    if (spec.rfind("top:", 0) == 0 || spec.rfind("bottom:", 0) == 0) {
        bool top = spec[0] == 't';
        int k = parse_int(spec.substr(top ? 4 : 7));
        if (k < 0 || k > L) throw bad(fmt::format("k = {} is not in 0..{}", k, L));
        for (int l = 0; l < k; ++l) out.push_back(top ? L - k + l : l);
        return out;
    }
    std::set<int> chosen;
    std::stringstream ss(spec);
    std::string item;
    while (std::getline(ss, item, ',')) {
        int l = parse_int(item);
        if (l < 0 || l >= L) throw bad(fmt::format("layer {} does not exist", l));
        chosen.insert(l);
    }
    return {chosen.begin(), chosen.end()};
}

void Adapter::attach(GPT& base) {
    if (base_) {
        if (base_ != &base)
            throw std::logic_error(fmt::format("{} adapter: already attached to another model", method()));
        return;
    }
    base.freeze();
    base_ = &base;
    layers_ = parse_layers(opts_.layers, base.config().n_layers);
    build(base);
}

void Adapter::activate(GPT& base) {
    attach(base);
    base.set_hooks(this);
}

Tensor Adapter::add_param(const std::string& name, Tensor t) {
    t.set_name(name);
    t.set_requires_grad(true);
    params_.emplace_back(name, t);
    return t;
}

Tensor Adapter::embedding_rows(const std::vector<int32_t>& ids) const {
    const Tensor& wte = base_->wte.weight;
    const int64_t d = wte.dim(1);
    Tensor out = Tensor::empty({int64_t(ids.size()), d});
    for (size_t i = 0; i < ids.size(); ++i) {
        if (ids[i] < 0 || ids[i] >= wte.dim(0))
            throw std::invalid_argument(fmt::format("{} adapter: init token {} is outside the vocabulary [0, {})",
                                                    method(), ids[i], wte.dim(0)));
        std::copy_n(wte.data() + int64_t(ids[i]) * d, d, out.data() + int64_t(i) * d);
    }
    return out;
}

std::vector<int32_t> Adapter::init_token_ids(int64_t n, Rng& rng) const {
    std::vector<int32_t> ids(static_cast<size_t>(n));
    if (opts_.init == "text") {
        if (opts_.init_tokens.empty())
            throw std::invalid_argument(fmt::format("{} adapter: init 'text' needs init_tokens", method()));
        for (int64_t i = 0; i < n; ++i) ids[size_t(i)] = opts_.init_tokens[size_t(i) % opts_.init_tokens.size()];
    } else {
        for (auto& id : ids) id = int32_t(rng.below(uint32_t(base_->config().vocab)));
    }
    return ids;
}

}  // namespace peftlab::peft
