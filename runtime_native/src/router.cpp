#include "router.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace cosmoe {

bool known_router(const std::string& kind) { return kind == "softmax" || kind == "sigmoid" || kind == "sparsemixer"; }

void softmax(const float* logits, int e, float* probs) {
  float m = *std::max_element(logits, logits + e);
  float sum = 0;
  for (int i = 0; i < e; ++i) sum += probs[i] = std::exp(logits[i] - m);
  float inv = 1.0f / sum;
  for (int i = 0; i < e; ++i) probs[i] *= inv;
}

void top_k_ids(const float* scores, int e, int k, int* idx) {
  std::vector<int> order(static_cast<size_t>(e));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int a, int b) { return scores[a] > scores[b] || (scores[a] == scores[b] && a < b); });
  std::copy(order.begin(), order.begin() + k, idx);
}

namespace {

// runtime_py.routers._choose: top-k of scores + bias among the topk_group best groups (a group's
// score is the sum of its two best, or its best with group_score "max"), into idx [K]. `choice`
// holds E floats.
void choose(const RouterParams& r, const float* scores, const float* bias, float* choice, int* idx) {
  const int e = r.num_experts, g = r.n_group;
  for (int i = 0; i < e; ++i) choice[i] = bias ? scores[i] + bias[i] : scores[i];
  if (g > 1) {
    const int per = e / g;
    std::vector<float> group(static_cast<size_t>(g));
    for (int j = 0; j < g; ++j) {
      int best[2];
      top_k_ids(choice + j * per, per, 2, best);
      group[size_t(j)] = r.group_max ? choice[j * per + best[0]] : choice[j * per + best[0]] + choice[j * per + best[1]];
    }
    std::vector<int> keep(static_cast<size_t>(r.topk_group));
    top_k_ids(group.data(), g, r.topk_group, keep.data());
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < g; ++j)
      if (std::find(keep.begin(), keep.end(), j) == keep.end())
        for (int i = 0; i < per; ++i) choice[j * per + i] = ninf;
  }
  top_k_ids(choice, e, r.top_k, idx);
}

// runtime_py.routers.sparsemixer_router (Phi-MoE at inference), top-2: the best expert, weighted by
// its softmax among the scores within 2 * eps (relative) of it; then the same without it.
// `masked` holds E floats.
void sparsemixer(const RouterParams& r, const float* scores, float* masked, int* idx, float* w) {
  const int e = r.num_experts;
  const float ninf = -std::numeric_limits<float>::infinity();
  std::copy(scores, scores + e, masked);
  for (int j = 0; j < 2; ++j) {
    int best = int(std::max_element(masked, masked + e) - masked);  // the first maximum, as torch.max
    float top = masked[best], m = ninf, sum = 0;
    std::vector<float> gates(static_cast<size_t>(e));
    for (int i = 0; i < e; ++i) {
      float factor = std::max(std::fabs(scores[i]), top);
      gates[size_t(i)] = (top - scores[i]) / factor > 2 * r.sparsemixer_eps ? ninf : masked[i];
      m = std::max(m, gates[size_t(i)]);
    }
    for (int i = 0; i < e; ++i) sum += gates[size_t(i)] == ninf ? 0.0f : std::exp(gates[size_t(i)] - m);
    idx[j] = best;
    w[j] = std::exp(gates[size_t(best)] - m) / sum;
    std::copy(scores, scores + e, masked);  // the second pass: the scores without the first choice
    masked[best] = ninf;
  }
}

}  // namespace

void route(const RouterParams& r, const float* logits, const float* bias, float* scratch, int* idx, float* w) {
  const int e = r.num_experts, k = r.top_k;
  if (r.kind == "sparsemixer") {
    sparsemixer(r, logits, scratch, idx, w);
    if (r.routed_scaling_factor != 1.0f)
      for (int j = 0; j < k; ++j) w[j] *= r.routed_scaling_factor;
    return;
  }
  float* scores = scratch;  // [E]
  if (r.kind == "sigmoid")
    for (int i = 0; i < e; ++i) scores[i] = 1.0f / (1.0f + std::exp(-logits[i]));
  else
    softmax(logits, e, scores);
  choose(r, scores, bias, scratch + e, idx);
  float sum = 0;
  for (int j = 0; j < k; ++j) sum += w[j] = scores[idx[j]];
  if (r.renormalise) {
    // softmax: weights / sum; sigmoid: weights / (sum + topk_norm_eps), as runtime_py/routers.py.
    float denom = r.kind == "sigmoid" ? sum + r.topk_norm_eps : sum;
    for (int j = 0; j < k; ++j) w[j] /= denom;
  }
  if (r.routed_scaling_factor != 1.0f)
    for (int j = 0; j < k; ++j) w[j] *= r.routed_scaling_factor;
}

}  // namespace cosmoe
