#include "peft/adapter.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <cfloat>
#include <climits>
#include <set>
#include <sstream>
#include <stdexcept>
#include <type_traits>

#include <fmt/format.h>

#include "peft/registry.h"
#include "nn/json_limits.h"

namespace peftlab::peft {

nlohmann::json& AdapterOptions::section(const std::string& method) {
    if (!sections.is_object()) sections = nlohmann::json::object();
    nlohmann::json& s = sections[method];
    if (s.is_null()) s = nlohmann::json::object();
    return s;
}

nlohmann::json AdapterOptions::section_or_empty(const std::string& method) const {
    if (sections.is_object() && sections.contains(method)) return sections.at(method);
    return nlohmann::json::object();
}

nlohmann::json AdapterOptions::to_json() const {
    nlohmann::json j = {{"n", n}, {"layers", layers}, {"init", init}, {"init_tokens", init_tokens}, {"seed", seed}, {"positions", positions}};
    if (sections.is_object())
        for (const auto& [method, section] : sections.items()) j[method] = section;
    return j;
}

AdapterOptions AdapterOptions::from_json(const nlohmann::json& j) {
    if (!j.is_object()) throw std::invalid_argument("AdapterOptions: expected a JSON object, got " + json_excerpt(j));
    AdapterOptions o;
    const std::vector<std::string> known = method_names();
    for (auto it = j.begin(); it != j.end(); ++it) {
        const std::string& k = it.key();
        auto bad_value = [&] {
            return std::invalid_argument(fmt::format("AdapterOptions: key '{}' has a bad value {}", k, json_excerpt(*it)));
        };
        // get_to alone would truncate 2.5 to 2 and wrap -1 to 2^64 - 1 without a word.
        // A signed field refuses what only fits unsigned: 2^63 would wrap to -2^63.
        auto integer = [&](const nlohmann::json& v, bool is_unsigned) {
            if (!v.is_number_integer() || (is_unsigned && !v.is_number_unsigned())) throw bad_value();
            if (!is_unsigned && v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX)) throw bad_value();
        };
        auto get_integer = [&](auto& field) {
            integer(*it, std::is_unsigned_v<std::decay_t<decltype(field)>>);
            it->get_to(field);
        };
        try {
            if (k == "n") get_integer(o.n);
            else if (k == "layers") it->get_to(o.layers);
            else if (k == "init") it->get_to(o.init);
            else if (k == "init_tokens") {
                if (!it->is_array()) throw bad_value();
                for (const auto& v : *it) {
                    integer(v, false);
                    if (v.get<int64_t>() < INT32_MIN || v.get<int64_t>() > INT32_MAX) throw bad_value();
                }
                it->get_to(o.init_tokens);
            } else if (k == "seed") get_integer(o.seed);
            else if (k == "positions") {
                it->get_to(o.positions);
                if (o.positions != "hf" && o.positions != "keep")
                    throw std::invalid_argument(
                        fmt::format("AdapterOptions: positions = '{}' is not hf or keep", o.positions));
            }
            else if (std::find(known.begin(), known.end(), k) != known.end()) {
                if (!it->is_object())
                    throw std::invalid_argument(
                        fmt::format("AdapterOptions: '{}' options must be a JSON object, got {}", k, it->dump()));
                o.sections[k] = *it;
            } else {
                std::string names;
                for (const std::string& m : known) names += ", " + m;
                throw std::invalid_argument(fmt::format(
                    "AdapterOptions: unknown key '{}' (common keys: n, layers, init, init_tokens, seed, positions; method "
                    "sections:{})",
                    k, names));
            }
        } catch (const nlohmann::json::exception&) {
            throw bad_value();
        }
    }
    // n reaches int-sized code (token positions): beyond 2^31 - 1 it would wrap.
    if (o.n < 0 || o.n > INT32_MAX)
        throw std::invalid_argument(fmt::format("AdapterOptions: n = {} must be in [0, {}]", o.n, INT32_MAX));
    // Each section's own method validates it (its constructor reads it).
    for (const auto& [method, section] : o.sections.items()) make_adapter(method, o);
    return o;
}

MethodOptions::MethodOptions(const AdapterOptions& o, std::string method)
    : method_(std::move(method)), in_(o.section_or_empty(method_)) {
    if (!in_.is_object())
        throw std::invalid_argument(fmt::format("{} options: expected a JSON object, got {}", method_, in_.dump()));
}

std::invalid_argument MethodOptions::error(const std::string& key, const std::string& why) const {
    return std::invalid_argument(fmt::format("{} options: key '{}' {}", method_, key, why));
}

const nlohmann::json* MethodOptions::find(const std::string& key) {
    return in_.contains(key) ? &in_.at(key) : nullptr;
}

int64_t MethodOptions::integer(const std::string& key, int64_t def, int64_t min) {
    int64_t v = def;
    if (const nlohmann::json* j = find(key)) {
        if (!j->is_number_integer()) throw error(key, "must be an integer, got " + j->dump());
        v = j->get<int64_t>();
    }
    if (v < min) throw error(key, fmt::format("= {} must be >= {}", v, min));
    out_[key] = v;
    return v;
}

double MethodOptions::number(const std::string& key, double def) {
    double v = def;
    if (const nlohmann::json* j = find(key)) {
        if (!j->is_number()) throw error(key, "must be a number, got " + j->dump());
        v = j->get<double>();
    }
    // Methods keep such options as float: a double beyond float's range would convert with undefined behaviour.
    if (!std::isfinite(v) || std::abs(v) > double(FLT_MAX))
        throw error(key, fmt::format("= {} must be finite and within float range", v));
    out_[key] = v;
    return v;
}

bool MethodOptions::boolean(const std::string& key, bool def) {
    bool v = def;
    if (const nlohmann::json* j = find(key)) {
        if (!j->is_boolean()) throw error(key, "must be true or false, got " + j->dump());
        v = j->get<bool>();
    }
    out_[key] = v;
    return v;
}

std::string MethodOptions::choice(const std::string& key, const std::string& def,
                                  const std::vector<std::string>& allowed) {
    std::string v = def;
    if (const nlohmann::json* j = find(key)) {
        if (!j->is_string()) throw error(key, "must be a string, got " + j->dump());
        v = j->get<std::string>();
    }
    if (std::find(allowed.begin(), allowed.end(), v) == allowed.end()) {
        std::string list;
        for (const std::string& a : allowed) list += (list.empty() ? "" : ", ") + a;
        throw error(key, fmt::format("= '{}' is not one of {}", v, list));
    }
    out_[key] = v;
    return v;
}

std::vector<std::string> MethodOptions::strings(const std::string& key, const std::vector<std::string>& def) {
    std::vector<std::string> v = def;
    if (const nlohmann::json* j = find(key)) {
        if (!j->is_array() || !std::all_of(j->begin(), j->end(), [](const nlohmann::json& e) { return e.is_string(); }))
            throw error(key, "must be a list of strings, got " + j->dump());
        v = j->get<std::vector<std::string>>();
    }
    out_[key] = v;
    return v;
}

nlohmann::json MethodOptions::finish() {
    for (const auto& [key, value] : in_.items())
        if (!out_.contains(key)) {
            std::string list;
            for (const auto& [k, v] : out_.items()) list += (list.empty() ? "" : ", ") + k;
            throw error(key, fmt::format("is unknown (known: {})", list.empty() ? "none" : list));
        }
    return out_;
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

std::vector<int32_t> Adapter::position_offset(const ForwardInfo&) {
    if (opts_.positions != "hf") return {};
    return {int32_t(virtual_tokens())};
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

namespace {
// Adapters merged into each base, in merge order: unmerge must undo the last one.
std::map<const GPT*, std::vector<const Adapter*>>& merge_stacks() {
    static std::map<const GPT*, std::vector<const Adapter*>> stacks;
    return stacks;
}
}  // namespace

Adapter::~Adapter() {
    if (!merged_) return;
    auto& stack = merge_stacks()[base_];
    stack.erase(std::remove(stack.begin(), stack.end(), this), stack.end());
}

void Adapter::merge() {
    if (!mergeable()) throw std::logic_error(fmt::format("{} adapter: cannot be merged into the base", method()));
    if (!base_) throw std::logic_error(fmt::format("{} adapter: merge() before attach()", method()));
    if (merged_) return;
    merging_ = true;
    try {
        merge_into_base();
    } catch (...) {  // a merge that stops half-way leaves the base as it was
        merging_ = false;
        put_back_merge_targets();
        throw;
    }
    merging_ = false;
    merged_ = true;
    merge_stacks()[base_].push_back(this);
}

void Adapter::unmerge() {
    if (!merged_) return;
    auto& stack = merge_stacks()[base_];
    if (stack.empty() || stack.back() != this)
        throw std::logic_error(fmt::format(
            "{} adapter: unmerge() out of order: a {} adapter was merged into the same base after this one and "
            "is still merged; unmerge it first",
            method(), stack.empty() ? std::string("?") : stack.back()->method()));
    put_back_merge_targets();
    stack.pop_back();
    merged_ = false;
}

void Adapter::put_back_merge_targets() {
    // Newest first: a tensor taken twice gets its first copy, the value before the merge, last.
    for (auto it = merge_saved_.rbegin(); it != merge_saved_.rend(); ++it) it->first.copy_from(it->second);
    merge_saved_.clear();
}

Tensor Adapter::merge_target(const std::string& name) {
    if (!merging_)
        throw std::logic_error(fmt::format("{} adapter: merge_target('{}') outside merge_into_base", method(), name));
    Tensor t = base_->parameter(name);
    merge_saved_.emplace_back(t, t.clone());
    return t;
}

void Adapter::set_own_options(const std::string& method, nlohmann::json canonical) {
    opts_.sections = nlohmann::json::object();
    opts_.sections[method] = std::move(canonical);
}

int Adapter::layer_of(const std::string& path) {
    if (path.rfind("blocks.", 0) != 0) return -1;
    size_t dot = path.find('.', 7);
    try {
        return std::stoi(path.substr(7, dot == std::string::npos ? std::string::npos : dot - 7));
    } catch (const std::exception&) {
        return -1;
    }
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
