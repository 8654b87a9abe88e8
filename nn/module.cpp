#include "nn/module.h"

#include <stdexcept>

namespace peftlab {

std::string Module::path() const {
    if (!parent_) return "";
    std::string p = parent_->path();
    return p.empty() ? name_ : p + "." + name_;
}

std::string Module::child_path(const std::string& local) const {
    std::string p = path();
    return p.empty() ? local : p + "." + local;
}

void Module::collect(const std::string& prefix, std::vector<std::pair<std::string, Tensor>>& out) const {
    for (const auto& [name, t] : params_) out.emplace_back(prefix + name, t);
    for (const auto& [name, child] : children_) child->collect(prefix + name + ".", out);
}

std::vector<std::pair<std::string, Tensor>> Module::named_parameters() const {
    std::vector<std::pair<std::string, Tensor>> out;
    collect(path().empty() ? "" : path() + ".", out);
    return out;
}

std::vector<Tensor> Module::parameters() const {
    std::vector<Tensor> out;
    for (auto& [n, t] : named_parameters()) out.push_back(t);
    return out;
}

std::vector<Tensor> Module::trainable_parameters() const {
    std::vector<Tensor> out;
    for (auto& [n, t] : named_parameters())
        if (t.requires_grad()) out.push_back(t);
    return out;
}

Tensor Module::parameter(const std::string& name) const {
    for (auto& [n, t] : named_parameters())
        if (n == name) return t;
    throw std::out_of_range("no parameter named '" + name + "' in module '" + path() + "'");
}

void Module::freeze() {
    for (auto& [n, t] : named_parameters()) Tensor(t).set_requires_grad(false);
}

void Module::unfreeze() {
    for (auto& [n, t] : named_parameters()) Tensor(t).set_requires_grad(true);
}

void Module::train(bool on) {
    training_ = on;
    for (auto& [n, c] : children_) c->train(on);
}

int64_t Module::num_params() const {
    int64_t n = 0;
    for (auto& [name, t] : named_parameters()) n += t.numel();
    return n;
}

int64_t Module::num_trainable() const {
    int64_t n = 0;
    for (auto& [name, t] : named_parameters())
        if (t.requires_grad()) n += t.numel();
    return n;
}

Tensor Module::register_parameter(const std::string& name, Tensor t, bool trainable) {
    t.set_name(name);
    t.set_requires_grad(trainable);
    params_.emplace_back(name, t);
    return t;
}

void Module::name_parameters() {
    for (auto& [n, t] : named_parameters()) Tensor(t).set_name(n);
}

void Module::register_module(const std::string& name, Module& child) {
    child.parent_ = this;
    child.name_ = name;
    children_.emplace_back(name, &child);
}

}  // namespace peftlab
