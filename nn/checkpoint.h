#pragma once
// Checkpoints as safetensors files: models, any named tensors (adapters), and
// full training state for resuming.
//
// Every load reads and checks the whole file before it writes into a single
// tensor: on any error (missing, unexpected or misshapen tensor, wrong config,
// damaged file) it throws std::runtime_error naming the file and the key, and
// the destination is bitwise unchanged. Every save is atomic (temp file, then
// rename), so a crash leaves the previous file intact.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "autograd/rng.h"
#include "nn/gpt.h"
#include "nn/optim.h"

namespace peftlab {

// safetensors "__metadata__": string -> string.
using Metadata = std::map<std::string, std::string>;

struct StFile;

// Options of every loader here (and of peft/adapter_io.h's).
struct LoadOptions {
    // Accept tensors holding NaN or Inf. By default such a file is refused with
    // the tensor's name and the first bad element: a diverged run's weights
    // would otherwise turn every later forward into NaN without a word.
    bool allow_nonfinite = false;
};

// Reads a whole safetensors file (nn/safetensors.h) for the loader `fn`: the
// reader's errors (missing, truncated, bad header) are prefixed with fn, and
// the first non-finite value, in name order, throws std::runtime_error
// "<fn>: '<path>': tensor '<name>' holds <value> at element <i> (of <n>); ..."
// unless opts.allow_nonfinite.
StFile load_safetensors_checked(const char* fn, const std::string& path, const LoadOptions& opts);

// ---- any named tensors (adapters, tools) -------------------------------------------------
void save_named(const std::string& path, const NamedTensors& tensors, const Metadata& metadata = {});
// Copies the file's tensors into `into`, which must name exactly the file's
// tensors with the same shapes. Returns the file's metadata, for the caller's
// own checks.
Metadata load_named_into(const std::string& path, const NamedTensors& into, const LoadOptions& opts = {});

// ---- GPT models -------------------------------------------------------------------------
// Format tag in the metadata of model files.
inline constexpr const char* kModelFormat = "peftlab-gpt-v1";

// Saves every parameter by its dotted name, with metadata {"format": kModelFormat,
// "config": config JSON} plus `extra` (which may not redefine those two keys).
void save_model(const std::string& path, const GPT& model, const Metadata& extra = {});
// Loads into an existing model whose config must equal the file's. Returns the
// file's metadata.
Metadata load_model(const std::string& path, GPT& model, const LoadOptions& opts = {});
// Builds a model from the file's config and loads it. (GPT is neither copyable
// nor movable, hence the pointer.)
std::unique_ptr<GPT> load_model_new(const std::string& path, const LoadOptions& opts = {});

// ---- training state (resume) ------------------------------------------------------------
// Format tag in the metadata of training-state files.
inline constexpr const char* kTrainStateFormat = "peftlab-train-v1";

// Generators whose states a training-state file carries, by name ("data", "dropout").
using NamedRngs = std::vector<std::pair<std::string, Rng*>>;

// What a training-state file carries besides tensors and generator states.
struct TrainingState {
    int64_t step = 0;  // optimizer updates completed
    Metadata extra;    // the caller's own strings (e.g. a data position, a method config)
};

// One file: tensors as "params.<name>", optimizer state as "optim.<key>" (see
// Optimizer::state_dict), and metadata {"format", "step", "rng.<name>"} plus
// state.extra, whose keys may not collide with those.
void save_training_state(const std::string& path, const NamedTensors& tensors, const Optimizer& opt,
                         const NamedRngs& rngs, const TrainingState& state);
// Restores tensors, optimizer state and every generator in `rngs` (each must be
// in the file). All or nothing, as every load here.
TrainingState load_training_state(const std::string& path, const NamedTensors& tensors, Optimizer& opt,
                                  const NamedRngs& rngs, const LoadOptions& opts = {});

}  // namespace peftlab
