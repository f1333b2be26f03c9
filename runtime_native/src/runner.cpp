#include "runner.h"

#include "router.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <sstream>

#include <executorch/extension/tensor/tensor.h>
#include <nlohmann/json.hpp>

#include "errors.h"
#include "memory.h"
#include "router.h"
#include "safetensors.h"

namespace cosmoe {

using executorch::aten::ScalarType;
using executorch::extension::from_blob;
using executorch::extension::TensorPtr;
using Clock = std::chrono::steady_clock;

namespace {

// runtime_py.runner.PREFETCH_MIN_PROB
constexpr float kPrefetchMinProb = 0.3f;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::string mb(double bytes, int digits) {
  std::ostringstream s;
  s.setf(std::ios::fixed);
  s.precision(digits);
  s << bytes / 1e6;
  std::string out = s.str();
  // Python's {:,} thousands separators
  size_t dot = out.find('.');
  for (int i = int(dot == std::string::npos ? out.size() : dot) - 3; i > (out[0] == '-' ? 1 : 0); i -= 3)
    out.insert(size_t(i), ",");
  return out;
}

// Copy a program output into a caller buffer; checks the element count.
void copy_out(const EValue& v, float* dst, size_t n, const char* what) {
  const auto& t = v.toTensor();
  if (size_t(t.numel()) != n) internal(std::string("program output ") + what + " has an unexpected shape");
  std::memcpy(dst, t.const_data_ptr<float>(), n * sizeof(float));
}

// runtime_py.model.rope_inv_freq, in fp32 as torch computes it.
// With partial rotary (rotary_dim R < Dh): the frequencies of an R-dim RoPE, then zeros (pairs that
// do not rotate).
std::vector<float> rope_inv_freq(const Config& c) {
  int dim = c.rotary_dim ? c.rotary_dim : c.rope_width;
  std::vector<float> inv(size_t(c.rope_width / 2), 0.0f);
  for (int i = 0; i < dim / 2; ++i)
    inv[size_t(i)] = 1.0f / std::pow(float(c.rope_theta), float(2 * i) / float(dim));
  if (c.yarn) {
    // YaRN: interpolated (divided by factor) below the correction range, kept above, a ramp between.
    double base = c.rope_theta, old_ctx = c.yarn_old_ctx;
    auto correction_dim = [&](double rotations) {
      return double(dim) * std::log(old_ctx / (rotations * 2 * M_PI)) / (2 * std::log(base));
    };
    double low = correction_dim(c.yarn_beta_fast), high = correction_dim(c.yarn_beta_slow);
    if (c.yarn_truncate) low = std::floor(low), high = std::ceil(high);
    low = std::max(low, 0.0), high = std::min(high, double(dim - 1));
    if (low == high) high += 0.001;
    for (int i = 0; i < dim / 2; ++i) {
      float pos_freq = std::pow(float(base), float(2 * i) / float(dim));
      float ramp = std::clamp(float((double(i) - low) / (high - low)), 0.0f, 1.0f);
      float extrapolation = 1 - ramp;
      inv[size_t(i)] = 1.0f / (float(c.yarn_factor) * pos_freq) * (1 - extrapolation) + 1.0f / pos_freq * extrapolation;
    }
    return inv;
  }
  if (c.rope_factor <= 0) return inv;
  // Llama 3.1: long wavelengths are divided by `factor`, short ones kept, a smooth ramp between.
  float factor = float(c.rope_factor), low = float(c.rope_low), high = float(c.rope_high);
  float old_ctx = float(c.rope_old_ctx);
  float low_wavelen = old_ctx / low, high_wavelen = old_ctx / high;
  for (int i = 0; i < dim / 2; ++i) {
    float& f = inv[size_t(i)];
    float wavelen = 2.0f * float(M_PI) / f;
    float scaled = wavelen > low_wavelen ? f / factor : f;
    float smooth = (old_ctx / wavelen - low) / (high - low);
    float smoothed = (1 - smooth) * scaled / factor + smooth * scaled;
    bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
    f = medium ? smoothed : scaled;
  }
  return inv;
}

// numpy.percentile's default (linear interpolation between closest ranks).
double percentile(std::vector<double> xs, double q) {
  if (xs.empty()) return 0.0;
  std::sort(xs.begin(), xs.end());
  double rank = q / 100.0 * double(xs.size() - 1);
  size_t lo = size_t(std::floor(rank)), hi = std::min(lo + 1, xs.size() - 1);
  return xs[lo] + (xs[hi] - xs[lo]) * (rank - double(lo));
}

// CoSMoEs Eq. 5 (runtime_py.routing_metrics.exrep): H_norm = floor(H/2) / (K*(T-1)), in percent.
double exrep(const std::vector<int>& sel, int k, int e) {
  size_t t = sel.size() / size_t(k);
  if (t < 2) return 0.0;
  int64_t h = 0;
  std::vector<int> prev(static_cast<size_t>(e)), cur(static_cast<size_t>(e));
  for (size_t i = 0; i < t; ++i) {
    std::fill(cur.begin(), cur.end(), 0);
    for (int j = 0; j < k; ++j) cur[size_t(sel[i * size_t(k) + size_t(j)])] = 1;
    if (i)
      for (int x = 0; x < e; ++x) h += std::abs(cur[size_t(x)] - prev[size_t(x)]);
    prev.swap(cur);
  }
  return 100.0 * double(h / 2) / double(int64_t(k) * int64_t(t - 1));
}

}  // namespace

Runner::Runner(const std::string& bundle_dir, const cosmoe_params& params)
    : bundle_(Bundle::open(bundle_dir)), params_(params), rng_(params.seed) {
  reset_peak_rss();  // the peak of this run, as runtime_py's Runner does
  policy_ = params.policy ? params.policy : "lru";
  make_policy(policy_);  // an unknown name is bad input before anything loads
  std::string check = params.check_hash ? params.check_hash : "first";
  if (check != "first" && check != "always" && check != "never")
    bad_input("unknown check_hash " + repr(check) + "; choose from ['first', 'always', 'never']");
  hash_always_ = check == "always";
  hash_first_ = check == "first";
  if (params.budget_bytes > 0 && params.experts_per_layer > 0) bad_input("give a budget or experts per layer, not both");
  if (params.budget_bytes < 0 || params.experts_per_layer < 0) bad_input("budget and experts per layer must be positive");
  set_threads(params.threads);
  const Config& c = bundle_.config;
  int layers = c.num_hidden_layers;

  // The backbone file: hashed when it is read, and each layer's router and MoE norm (never
  // quantized) read for lru+prefetch's guess, as ProgramEngine._routers.
  std::string backbone = bundle_.verified_path(*bundle_.backbone, hash_first_ || hash_always_);
  SafetensorsFile st(backbone);
  for (int l = 0; l < layers; ++l) {
    // A dense layer has no router (an empty one here: the prefetch guess never targets it).
    routers_.push_back(c.routed[size_t(l)] ? st.read_float("layers." + std::to_string(l) + ".moe.router.weight",
                                                           {c.num_experts, c.hidden_size})
                                           : std::vector<float>());
    router_biases_.push_back(c.routed[size_t(l)] && c.router_bias
                                 ? st.read_float("layers." + std::to_string(l) + ".moe.router.bias", {c.num_experts})
                                 : std::vector<float>());
    norms_.push_back(st.read_float("layers." + std::to_string(l) + ".ffn_norm.weight", {c.hidden_size}));
    norm_biases_.push_back(c.layer_norm ? st.read_float("layers." + std::to_string(l) + ".ffn_norm.bias", {c.hidden_size})
                                        : std::vector<float>());
    // The selection-only score bias (runtime_py/routers.py): the runner routes, so it reads it.
    score_biases_.push_back(c.routed[size_t(l)] && c.score_bias
                                ? st.read_float("layers." + std::to_string(l) + ".moe.score_bias", {c.num_experts})
                                : std::vector<float>());
  }
  inv_freq_ = rope_inv_freq(c);
  // Tokens per call: the least max_tokens of any unit (an expert takes at most the chunk's tokens).
  chunk_ = std::numeric_limits<int>::max();
  for (const auto& [key, f] : bundle_.programs) chunk_ = std::min(chunk_, f->max_tokens);
  for (int l = 0; l < layers; ++l) prefix_cache_ &= bundle_.program("layer", l).cache == "prefix";
  rows_ = prefix_cache_ ? 0 : c.max_position_embeddings;  // a static cache: always the whole context
  hashed_.assign(size_t(layers), std::vector<bool>(size_t(c.num_experts), false));

  // Backbone programs stay resident; their cost is what loading them (and the arena) added to RSS,
  // never less than their files.
  int64_t before = rss_bytes();
  auto open = [&](const FileEntry& f) {
    return std::make_unique<Program>(bundle_.verified_path(f, hash_first_ || hash_always_));
  };
  embed_ = open(bundle_.program("embed"));
  head_ = open(bundle_.program("head"));
  for (int l = 0; l < layers; ++l) layers_.push_back(open(bundle_.program("layer", l)));
  arena_.reserve(embed_->plan());
  arena_.reserve(head_->plan());
  for (const auto& p : layers_) arena_.reserve(p->plan());
  // Experts of a bundle share one shape and precision: the first MoE layer's expert 0's plan stands
  // for all; one with a larger plan gets buffers of its own (Program::bind).
  arena_.reserve(Program(bundle_.checked_path(bundle_.program("expert", c.moe_layers[0], 0))).plan());
  embed_->bind(arena_);
  head_->bind(arena_);
  for (const auto& p : layers_) p->bind(arena_);
  const int64_t grown = rss_bytes() - before;
  kv_bytes = 0;
  for (int l = 0; l < 2 * layers; ++l) {  // keys of every layer, then values (CosmoeConfig.cache_spec)
    const int* dims = l < layers ? c.caches[size_t(l)].k : c.caches[size_t(l - layers)].v;
    size_t n = size_t(dims[0]) * size_t(dims[1]) * size_t(dims[2]);
    auto* p = static_cast<float*>(std::calloc(n, sizeof(float)));
    if (!p) throw std::bad_alloc();
    (l < layers ? k_cache_ : v_cache_).emplace_back(p);
    kv_bytes += int64_t(n) * 4;  // ProgramEngine.cache_bytes
  }
  int64_t files = 0;
  for (const char* u : {"embed", "head"}) files += bundle_.program(u).bytes;
  for (int l = 0; l < layers; ++l) files += bundle_.program("layer", l).bytes;
  backbone_bytes = std::max(grown, files) + kv_bytes;
  measure_costs(params.budget_bytes, params.experts_per_layer);
  selections_.assign(size_t(layers), {});
}

Unit Runner::load_expert(int layer, int expert) {
  const FileEntry& f = bundle_.program("expert", layer, expert);
  bool hash;
  {
    std::lock_guard<std::mutex> g(hashed_mu_);  // the prefetch thread loads too
    hash = hash_always_ || (hash_first_ && !hashed_[size_t(layer)][size_t(expert)]);
  }
  auto unit = std::make_shared<Program>(bundle_.verified_path(f, hash));
  unit->bind(arena_);
  if (hash) {
    std::lock_guard<std::mutex> g(hashed_mu_);
    hashed_[size_t(layer)][size_t(expert)] = true;
  }
  return unit;
}

// Budget arithmetic as runtime_py.runner.Runner.__init__.
void Runner::measure_costs(int64_t budget, int experts_per_layer) {
  const Config& c = bundle_.config;
  // Budgets count the layers with routed experts only: a dense layer's MLP is in its layer program.
  int layers = int(c.moe_layers.size()), experts = c.num_experts, k = c.num_experts_per_tok;
  {
    // One expert's resident bytes as loaded: the RSS growth of loading two (the first MoE layer,
    // experts 0 and 1), halved; never less than the file (ProgramEngine._measure_unit_bytes).
    int n = std::min(2, experts), first = c.moe_layers[0];
    int64_t file = 0;
    for (int e = 0; e < n; ++e) file = std::max(file, bundle_.program("expert", first, e).bytes);
    int64_t before = rss_bytes();
    std::vector<Unit> held;
    for (int e = 0; e < n; ++e) {
      held.push_back(std::make_shared<Program>(bundle_.checked_path(bundle_.program("expert", first, e))));
      held.back()->bind(arena_);
    }
    unit_bytes = std::max((rss_bytes() - before) / n, file);
  }
  min_budget_bytes = backbone_bytes + int64_t(k) * unit_bytes;
  resident_budget_bytes = backbone_bytes + int64_t(layers) * experts * unit_bytes;
  std::string where = bundle_.root;
  if (experts_per_layer > 0) {
    if (experts_per_layer < k || experts_per_layer > experts)
      bad_input(where + ": experts per layer must be between top-k " + std::to_string(k) + " and " +
                std::to_string(experts) + ", not " + std::to_string(experts_per_layer));
    budget = backbone_bytes + int64_t(experts_per_layer) * layers * unit_bytes;
  }
  if (budget <= 0) budget = resident_budget_bytes;
  if (budget < min_budget_bytes)
    bad_input(where + ": budget " + mb(double(budget), 1) + " MB is below the minimum " + mb(double(min_budget_bytes), 1) +
              " MB for native (backbone and KV cache " + mb(double(backbone_bytes), 1) + " MB + " + std::to_string(k) +
              " experts of " + mb(double(unit_bytes), 2) + " MB); raise --budget");
  budget_bytes = budget;
  store_ = std::make_unique<ExpertStore>(
      c.moe_layers, experts, k, unit_bytes, budget - backbone_bytes, policy_,
      [this](int l, int e) { return load_expert(l, e); },
      [this](int l, int e) { return bundle_.program("expert", l, e).bytes; }, where);
}

void Runner::prefill(const int32_t* ids, size_t n, float* all_logits) {
  const Config& c = bundle_.config;
  for (size_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= c.vocab_size)
      bad_input(bundle_.root + ": prompt token ids must be in [0, " + std::to_string(c.vocab_size) + ")");
  if (pos_ + int64_t(n) > c.max_position_embeddings)
    throw Error(COSMOE_ERR_CONTEXT, "positions up to " + std::to_string(pos_ + int64_t(n) - 1) +
                                        " are past the model's context of " +
                                        std::to_string(c.max_position_embeddings) + " tokens");
  for (size_t i = 0; i < n; i += size_t(chunk_)) {
    int t = int(std::min(n - i, size_t(chunk_)));
    chunk(ids + i, t, pos_, all_logits ? all_logits + i * size_t(c.vocab_size) : nullptr);
    pos_ += t;
  }
}

void Runner::chunk(const int32_t* ids, int t, int pos, float* all_logits) {
  const Config& c = bundle_.config;
  // cos/sin rows are Dh = rope_width wide; each layer's cache tensors are its CacheSpec's.
  const int d = c.hidden_size, dh = c.rope_width, e = c.num_experts;
  const int k = c.num_experts_per_tok;
  const size_t T = size_t(t), D = size_t(d), Dh = size_t(dh);
  // The cache's rows as they lie (runner.h): room for this call's keys, at least one slot (a program
  // input cannot be empty; masked at pos 0); for programs exported with a static cache, all of it.
  if (prefix_cache_) grow_cache(pos + t);
  const int s = rows_;
  const size_t S = size_t(s);

  std::vector<int64_t> ids64(ids, ids + t);
  std::vector<float> x(T * D), base(T * D), xn(T * D), router(T * size_t(e)), y(T * D);
  {
    auto in = from_blob(ids64.data(), {1, t}, ScalarType::Long);
    copy_out(embed_->run({*in})[0], x.data(), T * D, "x");  // [1, T, D]
  }
  // RoPE rows pos..pos+T-1: [T, Dh] each (runtime_py.model.rope_cos_sin).
  const float rope_scale = float(c.attention_factor);
  std::vector<float> cos(T * Dh), sin(T * Dh);
  for (size_t i = 0; i < T; ++i)
    for (size_t j = 0; j < Dh; ++j) {
      float f = float(pos + int(i)) * inv_freq_[j % (Dh / 2)];
      cos[i * Dh + j] = std::cos(f) * rope_scale;  // YaRN's attention factor (1 otherwise)
      sin[i * Dh + j] = std::sin(f) * rope_scale;
    }
  // Additive masks (runtime_py.program_backend.layer_masks): slot_mask [S], new_mask [T, T]; or,
  // for a static cache, one [T, C + T].
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<float> slot_mask(S, ninf), new_mask(T * T, 0.0f), full_mask;
  for (int j = 0; j < std::min(pos, s); ++j) slot_mask[size_t(j)] = 0;
  for (size_t i = 0; i < T; ++i)
    for (size_t j = i + 1; j < T; ++j) new_mask[i * T + j] = ninf;
  if (!prefix_cache_) {
    full_mask.resize(T * (S + T));
    for (size_t i = 0; i < T; ++i) {
      std::copy(slot_mask.begin(), slot_mask.end(), full_mask.begin() + long(i * (S + T)));
      std::copy(new_mask.begin() + long(i * T), new_mask.begin() + long((i + 1) * T),
                full_mask.begin() + long(i * (S + T) + S));
    }
  }
  auto cos_t = from_blob(cos.data(), {t, dh}), sin_t = from_blob(sin.data(), {t, dh});
  auto slot_t = from_blob(slot_mask.data(), {s}), new_t = from_blob(new_mask.data(), {t, t});
  // A sliding layer's slots: the filled ones only (CacheSpec.windowed), copied out of the cache.
  const int filled = std::max(pos, 1);
  auto filled_t = from_blob(slot_mask.data(), {filled});
  TensorPtr full_t = prefix_cache_ ? nullptr : from_blob(full_mask.data(), {t, s + t});
  std::vector<float> k_in, v_in, scratch(3 * size_t(e));
  std::vector<float> weights(T * size_t(k));
  std::vector<int> idx(T * size_t(k));

  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    float* kc = k_cache_[size_t(layer)].get();
    float* vc = v_cache_[size_t(layer)].get();
    const Config::CacheSpec& spec = c.caches[size_t(layer)];
    // Positional: [G, S, W] as laid out, S = rows_ >= pos + T (a sliding layer: its first `filled`
    // rows, copied); a state: all its rows, as it is.
    const size_t Gk = size_t(spec.k[0]), Gv = size_t(spec.v[0]), Wk = size_t(spec.k[2]), Wv = size_t(spec.v[2]);
    const size_t Rk = size_t(spec.k[1]), Rv = size_t(spec.v[1]);
    const size_t Lk = spec.positional ? S : Rk, Lv = spec.positional ? S : Rv;  // rows per head as laid out
    const bool exact = prefix_cache_ && spec.windowed;
    const size_t Sk = exact ? size_t(filled) : Lk, Sv = exact ? size_t(filled) : Lv;  // rows passed
    const float *k_src = kc, *v_src = vc;
    if (exact) {
      k_in.resize(Gk * Sk * Wk);
      v_in.resize(Gv * Sv * Wv);
      for (size_t h = 0; h < Gk; ++h) std::memcpy(&k_in[h * Sk * Wk], &kc[h * Lk * Wk], Sk * Wk * sizeof(float));
      for (size_t h = 0; h < Gv; ++h) std::memcpy(&v_in[h * Sv * Wv], &vc[h * Lv * Wv], Sv * Wv * sizeof(float));
      k_src = k_in.data(), v_src = v_in.data();
    }
    auto x_t = from_blob(x.data(), {1, t, d});
    // from_blob takes a non-const pointer; the program only reads its inputs.
    auto k_t = from_blob(const_cast<float*>(k_src), {1, int(Gk), int(Sk), int(Wk)});
    auto v_t = from_blob(const_cast<float*>(v_src), {1, int(Gv), int(Sv), int(Wv)});
    std::vector<EValue> inputs = prefix_cache_
        ? std::vector<EValue>{*x_t, *cos_t, *sin_t, exact ? *filled_t : *slot_t, *new_t, *k_t, *v_t}
        : std::vector<EValue>{*x_t, *cos_t, *sin_t, *full_t, *k_t, *v_t};
    // -> base [1, T, D], xn [T, D], router logits [T, E], k_new [1, G, T, Wk], v_new [1, G, T, Wv]
    // (a state layer: the new state, shaped as the one passed in)
    std::vector<EValue> out = layers_[size_t(layer)]->run(inputs);
    if (out.size() != 5) internal("layer program " + std::to_string(layer) + " has " + std::to_string(out.size()) +
                                  " outputs, expected 5");
    copy_out(out[0], base.data(), T * D, "base");
    copy_out(out[1], xn.data(), T * D, "xn");
    copy_out(out[2], router.data(), T * size_t(e), "router_logits");
    const float* k_new = out[3].toTensor().const_data_ptr<float>();
    const float* v_new = out[4].toTensor().const_data_ptr<float>();
    const size_t Nk = spec.positional ? T : Rk, Nv = spec.positional ? T : Rv;  // rows returned per head
    if (size_t(out[3].toTensor().numel()) != Gk * Nk * Wk || size_t(out[4].toTensor().numel()) != Gv * Nv * Wv)
      internal("layer program k_new or v_new has an unexpected shape");
    const size_t at = spec.positional ? size_t(pos) : 0;  // rows pos..pos+T-1, or the whole state
    for (size_t h = 0; h < Gk; ++h) std::memcpy(&kc[(h * Lk + at) * Wk], k_new + h * Nk * Wk, Nk * Wk * sizeof(float));
    for (size_t h = 0; h < Gv; ++h) std::memcpy(&vc[(h * Lv + at) * Wv], v_new + h * Nv * Wv, Nv * Wv * sizeof(float));
    if (!c.routed[size_t(layer)]) {  // a dense layer: base already holds its MLP; nothing routed
      x.swap(base);
      continue;
    }
    const std::vector<float>& bias = score_biases_[size_t(layer)];
    for (size_t i = 0; i < T; ++i)
      route(c.router, &router[i * size_t(e)], bias.empty() ? nullptr : bias.data(), scratch.data(),
            &idx[i * size_t(k)], &weights[i * size_t(k)]);
    dispatch(layer, xn.data(), t, weights, idx, y.data());
    // runtime_py.model.add_residual: Granite scales the routed sum as the layer's other branches.
    const float m = c.residual_multiplier;
    if (m == 1.0f)
      for (size_t i = 0; i < T * D; ++i) x[i] = base[i] + y[i];  // [1, T, D]
    else
      for (size_t i = 0; i < T * D; ++i) x[i] = base[i] + y[i] * m;
  }
  logits_.resize(size_t(c.vocab_size));
  auto x_t = from_blob(x.data(), {1, t, d});
  std::vector<EValue> out = head_->run({*x_t});  // [1, T, V]
  const auto& lt = out[0].toTensor();
  const size_t V = size_t(c.vocab_size);
  if (size_t(lt.numel()) != T * V) internal("head program output has an unexpected shape");
  const float* l = lt.const_data_ptr<float>();
  std::memcpy(logits_.data(), l + (T - 1) * V, V * sizeof(float));
  if (all_logits) std::memcpy(all_logits, l, T * V * sizeof(float));
}

void Runner::grow_cache(int need) {
  if (need <= rows_) return;
  const Config& c = bundle_.config;
  const int rows = std::min(c.max_position_embeddings, (need + kCacheStep - 1) / kCacheStep * kCacheStep);
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const Config::CacheSpec& spec = c.caches[size_t(layer)];
    if (!spec.positional) continue;
    for (auto [buf, dims] : {std::pair{k_cache_[size_t(layer)].get(), spec.k},
                             std::pair{v_cache_[size_t(layer)].get(), spec.v}}) {
      // [G, rows_, W] -> [G, rows, W]: the last head first, each to a place at or after its own, so
      // no head is overwritten before it moves. Rows past rows_ hold stale values, masked until written.
      const size_t w = size_t(dims[2]), before = size_t(rows_), after = size_t(rows);
      for (size_t h = size_t(dims[0]); h-- > 1;)
        std::memmove(buf + h * after * w, buf + h * before * w, before * w * sizeof(float));
    }
  }
  rows_ = rows;
}

void Runner::dispatch(int layer, const float* x, int t, const std::vector<float>& weights, const std::vector<int>& idx,
                      float* y) {
  const Config& c = bundle_.config;
  const int k = c.num_experts_per_tok, e = c.num_experts, d = c.hidden_size;
  const size_t D = size_t(d);
  std::vector<int> selected(idx.begin(), idx.begin() + long(t) * k);
  std::sort(selected.begin(), selected.end());
  selected.erase(std::unique(selected.begin(), selected.end()), selected.end());
  if (recording_) {
    auto& rows = selections_[size_t(layer)];
    rows.insert(rows.end(), idx.begin(), idx.begin() + long(t) * k);
  }
  store_->begin_layer(layer, selected);
  // The guess reads layer l+1's router: only when l+1 has one (not past the last layer, not dense).
  if (store_->policy().prefetch && layer + 1 < c.num_hidden_layers && c.routed[size_t(layer + 1)]) {
    // Layer l+1's router on this layer's MoE input, exactly rescaled (runtime_py.model.guess_logits):
    // the mean over tokens of its softmax, top-k, kept only when confident.
    const std::vector<float>& router = routers_[size_t(layer + 1)];
    const std::vector<float>& norm = norms_[size_t(layer + 1)];
    const std::vector<float>& prev = norms_[size_t(layer)];
    // LayerNorms: (x - b_l) * ratio + b_{l+1}, their biases (empty for RMSNorm).
    const std::vector<float>& bias = norm_biases_[size_t(layer + 1)];
    const std::vector<float>& prev_bias = norm_biases_[size_t(layer)];
    std::vector<float> ratio(D), guess(D), mean(size_t(e), 0.0f), logits(static_cast<size_t>(e));
    std::vector<float> probs(static_cast<size_t>(e));
    for (size_t j = 0; j < D; ++j) ratio[j] = norm[j] / (std::fabs(prev[j]) < 1e-6f ? 1e-6f : prev[j]);
    for (int i = 0; i < t; ++i) {
      for (size_t j = 0; j < D; ++j) {
        float v = x[size_t(i) * D + j];
        guess[j] = bias.empty() ? v * ratio[j] : (v - prev_bias[j]) * ratio[j] + bias[j];
      }
      const std::vector<float>& router_bias = router_biases_[size_t(layer + 1)];
      for (int x_e = 0; x_e < e; ++x_e) {
        float acc = 0;
        for (size_t j = 0; j < D; ++j) acc += guess[j] * router[size_t(x_e) * D + j];
        logits[size_t(x_e)] = router_bias.empty() ? acc : acc + router_bias[size_t(x_e)];
      }
      softmax(logits.data(), e, probs.data());
      for (int x_e = 0; x_e < e; ++x_e) mean[size_t(x_e)] += probs[size_t(x_e)];
    }
    for (float& p : mean) p /= float(t);
    std::vector<int> top(static_cast<size_t>(k));
    top_k_ids(mean.data(), e, k, top.data());
    std::vector<int> sure;
    for (int j = 0; j < k; ++j)
      if (mean[size_t(top[size_t(j)])] >= (params_.prefetch_min_prob > 0 ? params_.prefetch_min_prob : kPrefetchMinProb))
        sure.push_back(top[size_t(j)]);
    if (!sure.empty()) store_->prefetch(layer + 1, sure);
  }
  // Resident experts first: a miss may evict, and must not evict one this layer still needs.
  std::stable_sort(selected.begin(), selected.end(),
                   [&](int a, int b) { return store_->is_resident(layer, a) && !store_->is_resident(layer, b); });
  std::fill(y, y + size_t(t) * D, 0.0f);
  std::vector<float> xs, tmp;
  for (int ex : selected) {
    // The tokens routed to ex and their weights (runtime_py.model.dispatch_experts).
    std::vector<int> tok;
    std::vector<float> w;
    for (int i = 0; i < t; ++i)
      for (int j = 0; j < k; ++j)
        if (idx[size_t(i * k + j)] == ex) {
          tok.push_back(i);
          w.push_back(weights[size_t(i * k + j)]);
        }
    Unit unit = store_->get(layer, ex);
    const int n = int(tok.size());
    xs.resize(size_t(n) * D);
    for (int i = 0; i < n; ++i) std::memcpy(&xs[size_t(i) * D], x + size_t(tok[size_t(i)]) * D, D * sizeof(float));
    auto in = from_blob(xs.data(), {n, d});
    std::vector<EValue> out = unit->run({*in});  // [N, D]
    const float* o = out[0].toTensor().const_data_ptr<float>();
    if (size_t(out[0].toTensor().numel()) != size_t(n) * D) internal("expert program output has an unexpected shape");
    for (int i = 0; i < n; ++i) {
      float* row = y + size_t(tok[size_t(i)]) * D;
      const float* src = o + size_t(i) * D;
      const float wi = w[size_t(i)];
      for (size_t j = 0; j < D; ++j) row[j] += src[j] * wi;
    }
  }
}

void Runner::check_prompt(const std::vector<int32_t>& ids, int max_new_tokens) const {
  const Config& c = bundle_.config;
  const std::string& where = bundle_.root;
  if (ids.empty()) bad_input(where + ": the prompt is empty; give at least one token");
  for (int32_t id : ids)
    if (id < 0 || id >= c.vocab_size)
      bad_input(where + ": prompt token ids must be in [0, " + std::to_string(c.vocab_size) + ")");
  if (int64_t(ids.size()) >= c.max_position_embeddings)
    bad_input(where + ": the prompt has " + std::to_string(ids.size()) + " tokens and the model's context is " +
              std::to_string(c.max_position_embeddings) + "; shorten the prompt");
  if (max_new_tokens < 1) bad_input(where + ": max_new_tokens must be at least 1");
}

int32_t Runner::sample(float temperature, float top_p) {
  if (temperature < 0 || !(top_p > 0 && top_p <= 1)) bad_input("temperature must be >= 0 and top_p in (0, 1]");
  const size_t v = logits_.size();
  if (temperature == 0)
    return int32_t(std::max_element(logits_.begin(), logits_.end()) - logits_.begin());
  // Nucleus sampling: the smallest prefix of the sorted distribution whose mass reaches top_p.
  std::vector<float> probs(v);
  float m = *std::max_element(logits_.begin(), logits_.end());
  double sum = 0;
  for (size_t i = 0; i < v; ++i) sum += probs[i] = std::exp((logits_[i] - m) / temperature);
  std::vector<int32_t> order(v);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return probs[size_t(a)] > probs[size_t(b)]; });
  double kept = 0, before = 0;
  size_t n = 0;
  for (; n < v && before < top_p * sum; ++n) {
    before += probs[size_t(order[n])];
    kept = before;
  }
  double r = std::uniform_real_distribution<double>(0.0, kept)(rng_), at = 0;
  for (size_t i = 0; i < n; ++i) {
    at += probs[size_t(order[i])];
    if (r < at) return order[i];
  }
  return order[n - 1];
}

Generation Runner::generate(const std::vector<int32_t>& prompt, int max_new_tokens, float temperature, float top_p,
                            const std::vector<int32_t>& stop_ids, const std::function<void(int32_t)>& on_token) {
  const Config& c = bundle_.config;
  check_prompt(prompt, max_new_tokens);
  if (temperature < 0 || !(top_p > 0 && top_p <= 1)) bad_input("temperature must be >= 0 and top_p in (0, 1]");
  for (auto& s : selections_) s.clear();
  recording_ = true;
  StoreStats before = store_->stats();
  reset();
  auto t0 = Clock::now();
  prefill(prompt.data(), prompt.size(), nullptr);
  double prefill_ms = seconds_since(t0) * 1e3;
  StoreStats prefilled = store_->stats();
  Generation gen{{}, "max_new_tokens"};
  double decode_s = 0;
  int steps = 0;
  for (;;) {
    int32_t tok = sample(temperature, top_p);
    gen.tokens.push_back(tok);
    if (on_token) on_token(tok);
    if (std::find(stop_ids.begin(), stop_ids.end(), tok) != stop_ids.end()) {
      gen.stopped = "stop_token";
      break;
    }
    if (int(gen.tokens.size()) >= max_new_tokens) break;
    int pos = int(prompt.size() + gen.tokens.size()) - 1;
    if (pos >= c.max_position_embeddings) {  // the KV cache never grows past the context
      gen.stopped = "context";
      break;
    }
    auto t = Clock::now();
    decode(tok);
    decode_s += seconds_since(t);
    ++steps;
  }
  recording_ = false;

  // The metrics of runtime_py.runner.Runner._metrics, key for key and in the same order.
  StoreStats st = store_->stats();
  int64_t recent = std::min<int64_t>(st.loads - before.loads, int64_t(st.load_ms.size()));
  std::vector<double> load_ms(st.load_ms.end() - recent, st.load_ms.end());
  if (load_ms.empty()) load_ms.push_back(0.0);
  int64_t requests = st.requests - before.requests, decode_requests = st.requests - prefilled.requests;
  double ex = 0;
  if (!selections_[size_t(c.moe_layers[0])].empty()) {  // over the MoE layers, as runtime_py
    for (int l : c.moe_layers) ex += exrep(selections_[size_t(l)], c.num_experts_per_tok, c.num_experts);
    ex /= double(c.moe_layers.size());
  }
  nlohmann::ordered_json m;
  m["backend"] = "native";
  m["policy"] = policy_;
  m["prompt_tokens"] = prompt.size();
  m["new_tokens"] = steps + 1;
  m["prefill_ms"] = prefill_ms;
  m["decode_tok_s"] = decode_s > 0 ? nlohmann::ordered_json(double(steps) / decode_s) : nlohmann::ordered_json(nullptr);
  m["peak_rss_mb"] = double(peak_rss_bytes()) / 1e6;
  m["budget_bytes"] = budget_bytes;
  m["backbone_bytes"] = backbone_bytes;
  m["expert_unit_bytes"] = unit_bytes;
  m["resident_expert_bytes_max"] = st.resident_units_max * unit_bytes;
  m["expert_loads"] = st.loads - before.loads;
  m["expert_bytes_loaded"] = st.bytes_loaded - before.bytes_loaded;
  m["expert_load_ms_p50"] = percentile(load_ms, 50);
  m["expert_load_ms_p95"] = percentile(load_ms, 95);
  m["hit_rate"] = requests ? double(st.hits - before.hits) / double(requests) : 1.0;
  m["decode_hit_rate"] = decode_requests ? double(st.hits - prefilled.hits) / double(decode_requests) : 1.0;
  m["exrep"] = ex;
  m["loads_per_token"] = steps ? double(st.loads - prefilled.loads) / steps : 0.0;
  m["prefetches"] = st.prefetches - before.prefetches;
  m["prefetch_used"] = st.prefetch_used - before.prefetch_used;
  m["prefetch_wait_ms"] = st.wait_ms - before.wait_ms;
  metrics_ = m.dump();
  return gen;
}

}  // namespace cosmoe
