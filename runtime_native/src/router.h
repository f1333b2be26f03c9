// Routers: one token's router logits -> its experts and their weights, as runtime_py/routers.py
// computes them (the registry of CosmoeConfig.router). The layer programs return raw logits; the
// runner routes, so each router is written once per runtime.
#pragma once

#include <string>

namespace cosmoe {

struct RouterParams {
  std::string kind = "softmax";  // runtime_py/config.py ROUTERS: "softmax" | "sigmoid" | "sparsemixer"
  int num_experts = 8, top_k = 2;
  bool renormalise = true;             // norm_topk_prob
  int n_group = 1, topk_group = 1;     // group-limited top-k (DeepSeek-V2/V3, GLM)
  bool group_max = false;              // group_score "max" (DeepSeek-V2), else the sum of the two best
  float routed_scaling_factor = 1.0f;  // GLM, DeepSeek-V3
  float sparsemixer_eps = 0.01f;       // Phi-MoE
  float topk_norm_eps = 1e-20f;        // the sigmoid router's renormalisation (LFM2: 1e-6)
};

// Known router kinds (runtime_py/config.py ROUTERS).
bool known_router(const std::string& kind);

// logits [E] (fp32), bias [E] or nullptr (the selection-only score bias) -> idx [K] and w [K].
// `scratch` holds 3 * E floats.
void route(const RouterParams& r, const float* logits, const float* bias, float* scratch, int* idx, float* w);

// Softmax over E in fp32 (max subtracted, the sum's reciprocal), as torch.softmax.
void softmax(const float* logits, int e, float* probs);

// The top-k ids of scores [E], descending, ties to the lower id (torch.topk on CPU).
void top_k_ids(const float* scores, int e, int k, int* idx);

}  // namespace cosmoe
