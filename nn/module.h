#pragma once
// Module: a named tree of parameters, named as PyTorch state dicts name them
// ("blocks.3.attn.q_proj.weight"). Modules are neither copied nor moved: a
// child records its parent and local name, so paths are always current.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "autograd/tensor.h"

namespace peftlab {

// ("blocks.0.attn.q_proj.weight", tensor), ... — the form parameters, adapters,
// optimizer state and checkpoints are exchanged in.
using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

class Module {
public:
    Module() = default;
    virtual ~Module() = default;
    Module(const Module&) = delete;
    Module& operator=(const Module&) = delete;

    // Dotted path from the root module ("" for the root).
    std::string path() const;
    // Full dotted name of one of this module's parameters or sub-paths.
    std::string child_path(const std::string& local) const;

    // Depth-first, in registration order: ("blocks.0.ln1.weight", tensor), ...
    NamedTensors named_parameters() const;
    std::vector<Tensor> parameters() const;
    std::vector<Tensor> trainable_parameters() const;
    // Parameter by full dotted name; throws std::out_of_range naming it.
    Tensor parameter(const std::string& name) const;

    // Names every parameter tensor by its full dotted path (for error messages);
    // call on the root once the tree is built.
    void name_parameters();

    void freeze();    // requires_grad off for every parameter of the subtree
    void unfreeze();  // requires_grad on
    void train(bool on = true);
    void eval() { train(false); }
    bool training() const { return training_; }

    int64_t num_params() const;
    int64_t num_trainable() const;

protected:
    // Registers a parameter (requires grad by default) under a local name.
    // Returns a handle sharing the registered tensor.
    Tensor register_parameter(const std::string& name, Tensor t, bool trainable = true);
    // Registers a child owned by this module (usually a member).
    void register_module(const std::string& name, Module& child);

private:
    void collect(const std::string& prefix, std::vector<std::pair<std::string, Tensor>>& out) const;

    const Module* parent_ = nullptr;
    std::string name_;
    std::vector<std::pair<std::string, Tensor>> params_;
    std::vector<std::pair<std::string, Module*>> children_;
    bool training_ = true;
};

// RAII: evaluation mode for the scope, the module's previous mode after.
class EvalScope {
public:
    explicit EvalScope(Module& m) : m_(m), was_training_(m.training()) { m_.eval(); }
    ~EvalScope() { m_.train(was_training_); }
    EvalScope(const EvalScope&) = delete;
    EvalScope& operator=(const EvalScope&) = delete;

private:
    Module& m_;
    bool was_training_;
};

}  // namespace peftlab
