// A bundle's manifest, read and validated as runtime_py/bundle.py does (docs/FORMAT.md is the spec):
// size-capped UTF-8 JSON without duplicate keys, the v1 schema's keys and types, relative paths
// that stay inside the bundle (symlinks included), one expert file per (layer, expert), the model
// config checked as runtime_py.config.CosmoeConfig checks it, and one ExecuTorch program per unit.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "router.h"

namespace cosmoe {

// The fields of runtime_py.config.CosmoeConfig the runner uses.
struct Config {
  int vocab_size = 0, hidden_size = 0, num_hidden_layers = 0, num_attention_heads = 0;
  int num_key_value_heads = 0, num_experts = 8, num_experts_per_tok = 2, max_position_embeddings = 2048;
  int head_size = 0;
  // Latent attention (every layer "mla", DeepSeek-V2/V3): cos/sin rows are qk_rope_head_dim wide.
  bool latent_attention = false;
  int kv_lora_rank = 0, qk_rope_head_dim = 0;
  int rope_width = 0;  // cos/sin columns
  // Each layer's two cache tensors (runtime_py CosmoeConfig.cache_spec): [heads, rows, width];
  // positional ones have a row per position (rows = the context), else a fixed state passed whole
  // and replaced (LFM2's "conv" layers: [1, conv_kernel - 1, D] and a [1, 1, 1] placeholder;
  // Qwen3.5's "linear" layers: the q/k/v convolution's [1, K - 1, C] and the recurrent [Hv, dk, dv]).
  struct CacheSpec {
    bool positional = true;
    // A sliding layer's program places the window from its slot count (units.window_far): it must be
    // given exactly the filled slots.
    bool windowed = false;
    int k[3] = {0, 0, 0}, v[3] = {0, 0, 0};
  };
  std::vector<CacheSpec> caches;
  bool norm_topk_prob = true;
  RouterParams router;      // router, score_bias, n_group, topk_group, routed_scaling_factor
  bool score_bias = false;  // layers.L.moe.score_bias [E] in the backbone
  int rotary_dim = 0;       // RoPE on the first rotary_dim dims of a head (0: all)
  float residual_multiplier = 1.0f;  // Granite: the routed sum is scaled as the layer's other branches
  bool layer_norm = false;           // norm "layer" (Phi-MoE): the FFN norms' biases enter the prefetch guess
  double rope_theta = 500000.0;
  // Llama 3.1 rope scaling ("llama3"); factor 0: none.
  double rope_factor = 0, rope_low = 0, rope_high = 0, rope_old_ctx = 0;
  // YaRN ("yarn", gpt-oss): as runtime_py.model._yarn_inv_freq; cos and sin times attention_factor.
  bool yarn = false, yarn_truncate = true;
  double yarn_factor = 1, yarn_beta_fast = 32, yarn_beta_slow = 1, yarn_old_ctx = 0, attention_factor = 1;
  bool router_bias = false;  // layers.L.moe.router.bias [E] (gpt-oss): inside the layer program; the guess adds it
  // The layer plan (format v2 model.layer_ffns; v1: "moe" everywhere): whether each layer has
  // routed experts, and those layers in order (runtime_py CosmoeConfig.moe_layers).
  std::vector<bool> routed;
  std::vector<int> moe_layers;
};

struct FileEntry {
  std::string path, role, sha256;
  int64_t bytes = 0;
  int layer = -1, expert = -1;
  std::string target, unit, precision, cache;  // programs
  int max_tokens = 1;                           // programs; absent in old bundles: 1
};

// One program unit: ("embed" | "layer" | "head" | "expert", layer, expert); -1 where it does not apply.
using UnitKey = std::tuple<std::string, int, int>;

class Bundle {
 public:
  Bundle() = default;
  Bundle(const Bundle&) = delete;  // programs and backbone point into files
  Bundle(Bundle&&) = default;
  // Reads and validates DIR/manifest.json; throws cosmoe::Error (COSMOE_ERR_INPUT) with one line.
  static Bundle open(const std::string& dir);

  std::string root;
  std::string manifest_path;
  Config config;
  std::vector<FileEntry> files;
  std::map<UnitKey, const FileEntry*> programs;  // the ExecuTorch programs
  const FileEntry* backbone = nullptr;

  std::string path_of(const FileEntry& f) const { return root + "/" + f.path; }
  // The file's path after a size check against the manifest (on every load).
  std::string checked_path(const FileEntry& f) const;
  // checked_path and, when `hash`, a sha256 check against the manifest.
  std::string verified_path(const FileEntry& f, bool hash) const;
  const FileEntry& program(const std::string& unit, int layer = -1, int expert = -1) const;
};

}  // namespace cosmoe
