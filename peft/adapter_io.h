#pragma once
// Adapter files: peftlab's own format, and Hugging Face PEFT's layout.
//
// Own format (save_adapter / load_adapter), a directory holding
//   adapter_model.safetensors  the adapter's tensors under their own names
//                              ("blocks.3.prefix.key", "prefix_mlp.fc1.weight", ...)
//   adapter_config.json        {"format": "peftlab-adapter-v2", "method", "options"
//                              (AdapterOptions::to_json: common keys and the method's own section), "layers" (resolved),
//                              "inference", "base_config" (GPTConfig JSON),
//                              "base_hash" (base_hash() of the base it was trained on),
//                              optionally "trained_on" (the caller's record of its data)}
// "inference" is true when the file holds inference_parameters() rather than a
// training-time reparameterization; it is so for every adapter whose training
// tensors are its inference tensors (all but an unmaterialized reparameterized prefix).
//
// Hugging Face PEFT layout (export_hf / import_hf), what PeftModel.save_pretrained
// writes for a causal LM in inference mode: each method writes its own
// peft_type's fields and tensors (Adapter::hf_export; e.g. PROMPT_TUNING
// "prompt_embeddings" [n, d], LORA "base_model.model.<module>.lora_A.weight"),
// plus adapter_config.json's common fields; "base_model_name_or_path" is
// "peftlab:<base_hash>", checked on import when present.
//
// Every file is written atomically (temp file, then rename); the tensors are
// written before the config. Every load checks the config, the base, the
// tensor names and shapes and (unless LoadOptions::allow_nonfinite) that every
// value is finite before it copies a value, and throws std::runtime_error
// naming the file and the key or field; the base's weights are then unchanged and
// its requires_grad flags restored.
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "nn/safetensors.h"
#include "nn/checkpoint.h"
#include "peft/adapter.h"

namespace peftlab::peft {

// A parsed JSON config file whose accessors name the function, file and key in
// every error (std::runtime_error "import_hf: 'dir/adapter_config.json': key 'r': ...").
class ConfigFile {
public:
    ConfigFile(const char* fn, std::string path);
    std::runtime_error error(const std::string& what) const;
    std::runtime_error key_error(const std::string& key, const std::string& what) const;
    bool has(const std::string& key) const;  // present and not null
    const nlohmann::json& at(const std::string& key) const;
    std::string str(const std::string& key) const;
    bool boolean(const std::string& key) const;
    int64_t integer(const std::string& key) const;
    double number(const std::string& key) const;
    // An integer key that must equal the base's value.
    void expect(const std::string& key, int64_t base_value) const;

private:
    const char* fn_;
    std::string path_;
    nlohmann::json j_;
};

// adapter_config.json of an adapter in peftlab's own format, read and checked
// without a base or the weights: "format", "method" (a registered method),
// "options" (AdapterOptions::from_json), "layers" (indices in [0, 2^31 - 1]),
// "inference", "base_config" (a valid GPTConfig) and "base_hash". Throws
// std::runtime_error naming fn, the file and the key; a Hugging Face PEFT
// directory is named as such (import_hf reads it). load_adapter and
// `adapter inspect` both read through it.
struct AdapterConfig {
    ConfigFile file;                   // names the file and key in the errors of later checks
    std::unique_ptr<Adapter> adapter;  // make_adapter(method, options), not attached
    std::vector<int> layers;           // as recorded; load_adapter checks them against the attached adapter's
    bool inference = false;            // the weights file holds inference_parameters()
    GPTConfig base_config;
    std::string base_hash;
};
AdapterConfig read_adapter_config(const char* fn, const std::string& dir);

// Refuses (cfg.key_error under options_key), before attach allocates anything,
// options whose tensors could not come from the weights `file`: a config must
// not make a reader allocate more than the file holds (plus 2^24 floats that a
// method builds without storing). Every whole number among the options (n and
// the method's own, e.g. a rank or a hidden width) is bounded first, so that
// the adapter's formula (int64 products of sizes) cannot overflow.
void check_sizes(const ConfigFile& cfg, const char* options_key, const Adapter& adapter, const GPTConfig& c,
                 const StFile& file);

// Throws std::runtime_error naming fn and path unless `file` holds exactly
// dest's keys with equal shapes. Changes nothing.
void check_tensors(const char* fn, const std::string& path, const StFile& file, const NamedTensors& dest);
// After check_tensors: copies each file tensor into dest's tensor of that key.
void copy_tensors(const StFile& file, const NamedTensors& dest);

// The fields every PEFT prompt-learning config carries (num_virtual_tokens =
// n, token_dim, num_layers, ...), and their check against the base on import
// (returns num_virtual_tokens).
void hf_add_prompt_learning_fields(nlohmann::json& cfg, int64_t n, const GPTConfig& c);
int64_t hf_check_prompt_learning(const ConfigFile& cfg, const GPTConfig& c);

inline constexpr const char* kAdapterFormat = "peftlab-adapter-v2";  // v2: options in per-method sections
inline constexpr const char* kAdapterWeightsFile = "adapter_model.safetensors";
inline constexpr const char* kAdapterConfigFile = "adapter_config.json";

// Content hash of a model's weights: FNV-1a 64 (offset basis 0xcbf29ce484222325,
// prime 0x100000001b3) over the raw float32 bytes (little-endian, as in memory) of
// every parameter in named_parameters() order, as 16 lowercase hex digits. Names
// and shapes are not hashed: the config, stored beside it, fixes them.
std::string base_hash(const GPT& base);

// Writes dir/adapter_model.safetensors and dir/adapter_config.json (creating dir).
// inference: save inference_parameters() (a reparameterized prefix as its computed
// matrices) instead of the training-time tensors.
// Full fine-tuning trains the base itself, so its file is the whole model and the
// base it must be loaded onto can no longer be hashed: pass original_base_hash =
// base_hash(model) taken before training (required for "full"; for other methods,
// if given, it must equal the attached base's hash). A merged LoRA is refused
// (its base holds the merged weights): unmerge first.
// trained_on: what the caller trained the adapter on (the harness: its task or
// data files and seed), stored as given under "trained_on" when not null and
// never read by load_adapter (see trained_on()).
void save_adapter(const std::string& dir, const Adapter& adapter, bool inference = false,
                  const std::string& original_base_hash = {}, const nlohmann::json& trained_on = nullptr);
// The "trained_on" value of a peftlab adapter directory's config; null when it
// has none (older adapters, Hugging Face PEFT's layout). Throws
// std::runtime_error as ConfigFile for an unreadable or malformed config.
nlohmann::json trained_on(const std::string& dir);

// Rebuilds the saved adapter on `base` (same config and base_hash, or it throws
// "base config differs: n_layers 4 != 2" / "base weights differ (hash ... != ...)"):
// made by name through the registry with the saved options, attached (not
// activated: call activate(base) to run it alone), materialized if the file is an
// inference file, then filled from the file. For "full" this overwrites every
// weight of `base` with the fine-tuned model.
std::unique_ptr<Adapter> load_adapter(const std::string& dir, GPT& base, const LoadOptions& opts = {});

// The two adapter layouts share their file names (adapter_config.json,
// adapter_model.safetensors); the config tells them apart: peftlab's has
// "format" (kAdapterFormat), Hugging Face PEFT's has "peft_type".
enum class AdapterLayout { none, peftlab, hugging_face };
// `none` when dir holds no adapter_config.json. Throws std::runtime_error
// naming the file when it is unreadable, not a JSON object, or has neither key.
AdapterLayout adapter_layout(const std::string& dir);

// load_adapter or import_hf, as adapter_layout(dir) says; throws naming the
// file when dir holds no adapter.
std::unique_ptr<Adapter> load_any_adapter(const std::string& dir, GPT& base, const LoadOptions& opts = {});

// Writes the adapter in Hugging Face PEFT's layout to dir (creating it), as its
// method's hf_export() gives it. Methods without a PEFT counterpart, a
// configuration the method cannot express (a prefix on chosen layers only), an
// adapter with virtual tokens under positions "keep" (PEFT's logits would
// differ: its real tokens follow the virtual ones) and a merged adapter are
// refused, naming the directory and why. LoRA and IA3 use GPT-2's module names
// (nn/hf_gpt2.h: transformer.h.N.attn.c_attn, ...; see each method's hf_export).
void export_hf(const std::string& dir, const Adapter& adapter);

// Reads a PEFT adapter directory onto `base` (with positions "hf", PEFT's
// convention), as the first registered method
// whose hf_import_options accepts its config (PROMPT_TUNING -> "prompt",
// PREFIX_TUNING -> "prefix-kv" on every layer, LORA -> "lora", ...). Attached,
// not activated. Checks peft_type, task_type, dimensions against the base and
// every tensor's name and shape; features a method does not implement (LoRA:
// rslora, DoRA, biases, rank/alpha patterns that leave modules with different
// ranks after mapping, regex target_modules) are refused by name.
std::unique_ptr<Adapter> import_hf(const std::string& dir, GPT& base, const LoadOptions& opts = {});

}  // namespace peftlab::peft
