// The decode loop over a bundle's ExecuTorch programs, as runtime_py/program_backend.py and
// runtime_py/runner.py run it (read them side by side): embed -> for each layer (the layer program
// with the KV cache as it lies, unfilled slots masked; top-k routing here; the selected experts
// through the budgeted store; the weighted sum) -> head. Prompts are prefilled in chunks of the
// programs' max_tokens.
//
// Shapes: T tokens in this call, S cache slots passed in, C context, D hidden, G kv heads,
// Dh head size, E experts, K experts per token, V vocabulary.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "bundle.h"
#include "cosmoe.h"
#include "programs.h"
#include "store.h"

namespace cosmoe {

struct Generation {
  std::vector<int32_t> tokens;
  std::string stopped;  // "max_new_tokens" | "stop_token" | "context"
};

class Runner {
 public:
  Runner(const std::string& bundle_dir, const cosmoe_params& params);

  // A new sequence: what the cache holds is dead, so its rows start over (nothing to move).
  void reset() {
    pos_ = 0;
    if (prefix_cache_) rows_ = 0;
  }
  // Tokens at positions pos.. ; all_logits (may be null) gets [n, V].
  void prefill(const int32_t* ids, size_t n, float* all_logits);
  void decode(int32_t id) { prefill(&id, 1, nullptr); }
  const std::vector<float>& logits() const { return logits_; }
  int32_t sample(float temperature, float top_p);
  Generation generate(const std::vector<int32_t>& prompt, int max_new_tokens, float temperature, float top_p,
                      const std::vector<int32_t>& stop_ids, const std::function<void(int32_t)>& on_token);
  // The prompt as it can run, or a bad-input error: empty, ids outside the vocabulary, too long.
  void check_prompt(const std::vector<int32_t>& ids, int max_new_tokens) const;
  const std::string& metrics_json() const { return metrics_; }

  const Config& config() const { return bundle_.config; }
  int pos() const { return pos_; }

 private:
  void chunk(const int32_t* ids, int t, int pos, float* all_logits);
  // At least `need` rows per kv head in every positional cache: rows_ grows in steps of kCacheStep,
  // each head's filled rows moved to its new place.
  void grow_cache(int need);
  // x [T, D], weights/idx [T, K] -> y [T, D] through the store (runtime_py Runner._dispatch).
  void dispatch(int layer, const float* x, int t, const std::vector<float>& weights, const std::vector<int>& idx,
                float* y);
  void measure_costs(int64_t budget_bytes, int experts_per_layer);
  Unit load_expert(int layer, int expert);

  Bundle bundle_;
  cosmoe_params params_;
  std::string policy_;
  bool hash_always_, hash_first_;
  Arena arena_;
  std::unique_ptr<Program> embed_, head_;
  std::vector<std::unique_ptr<Program>> layers_;
  std::vector<std::vector<float>> routers_, norms_;  // [E*D], [D] per layer: the prefetch guess
  std::vector<std::vector<float>> norm_biases_;      // [D] per layer when the norms are LayerNorms, else empty
  std::vector<std::vector<float>> router_biases_;    // [E] per MoE layer when the router has a bias (gpt-oss), else empty
  std::vector<std::vector<float>> score_biases_;     // [E] per MoE layer with a score bias, else empty
  std::vector<float> inv_freq_;                        // [Dh/2]
  int chunk_ = 1;
  bool prefix_cache_ = true;
  // Per layer room for [G, C, Dh], from calloc: the kernel maps zero pages on first write, so the
  // cache is resident only as far as it is filled (the budget still counts the whole context). A
  // positional cache is laid out [G, rows_, Dh] and goes to the layer program as it lies, without a
  // copy (its programs take unplanned inputs); slots past the filled ones are masked. A prefix of
  // [G, C, Dh] is not one block, and copying it out every call was a fifth of a decode step at hidden
  // 512 (docs/NATIVE.md, "The KV cache is not copied").
  static constexpr int kCacheStep = 16;
  int rows_ = 0;
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::vector<std::unique_ptr<float[], Free>> k_cache_, v_cache_;
  int pos_ = 0;
  std::vector<float> logits_;  // [V]
  std::unique_ptr<ExpertStore> store_;
  std::vector<std::vector<int>> selections_;  // per layer: K ids per token, token after token
  bool recording_ = false;
  std::mt19937_64 rng_;
  std::vector<std::vector<bool>> hashed_;  // experts whose program was hashed (check_hash "first")
  std::mutex hashed_mu_;

 public:
  int64_t kv_bytes = 0, backbone_bytes = 0, unit_bytes = 0, budget_bytes = 0;
  int64_t min_budget_bytes = 0, resident_budget_bytes = 0;

 private:
  std::string metrics_ = "{}";
};

}  // namespace cosmoe
