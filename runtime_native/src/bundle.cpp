#include "bundle.h"

#include <sys/stat.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "errors.h"
#include "sha256.h"

namespace cosmoe {
namespace {

using nlohmann::json;

constexpr const char* kFormatName = "cosmoe-bundle";   // runtime_py/format.py FORMAT_NAME
constexpr int kFormatVersion = 2;                      // FORMAT_VERSION
constexpr int kPlanVersion = 2;                        // PLAN_VERSION: the first with model.layer_ffns
constexpr int64_t kMaxManifestBytes = 64LL << 20;      // MAX_MANIFEST_BYTES
constexpr const char* kManifestName = "manifest.json"; // MANIFEST_NAME

// runtime_py/manifest.schema.json: the keys a manifest and a file entry may have, and the choices of its
// enums (tests/runtime_native/test_native.py keeps them equal to the schema's).
const std::set<std::string> kTopKeys = {"format", "format_version", "model", "tokenizer",
                                        "quantization", "provenance", "files"};
const std::set<std::string> kTopRequired = {"format", "format_version", "model", "files", "provenance"};
const std::set<std::string> kFileKeys = {"path", "role", "target", "unit", "precision", "max_tokens", "cache",
                                         "bytes", "sha256", "dtype", "layer", "expert", "tensors", "gguf"};
const std::set<std::string> kRoles = {"backbone", "expert", "tokenizer", "program"};
const std::set<std::string> kTargets = {"executorch", "onnx", "gguf"};  // this runner loads executorch's
const std::set<std::string> kUnits = {"embed", "layer", "head", "expert", "model"};
const std::set<std::string> kDtypes = {"float32", "bfloat16", "float16"};
// runtime_py/config.py FFN_KINDS: FFN kind -> whether it has routed experts.
const std::map<std::string, bool> kFfnKinds = {{"moe", true}, {"dense", false}};
// runtime_py/config.py: every CosmoeConfig field, and the HF keys it ignores.
const std::set<std::string> kConfigKeys = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob", "expert_kind", "wd_rank",
    "shared_expert_intermediate_size", "head_dim", "qk_norm", "attention_bias", "attention_out_bias",
    "clip_qkv", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "layer_ffns", "dense_intermediate_size",
    "router", "score_bias", "n_group", "topk_group", "routed_scaling_factor", "shared_expert_gate", "rotary_dim",
    "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling", "sparsemixer_eps",
    "norm", "lm_head_bias", "layer_mixers", "sliding_window", "attention_sinks", "router_bias", "expert_bias",
    "expert_act", "swiglu_alpha", "swiglu_limit", "group_score", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
    "v_head_dim", "conv_kernel", "conv_bias", "topk_norm_eps", "linear_num_key_heads", "linear_num_value_heads",
    "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel", "attention_output_gate", "model_type", "architectures", "transformers_version", "torch_dtype", "dtype"};

// nlohmann keeps the last of two equal keys silently; two "files" lists would mean two bundles.
json parse_unique(const std::string& text, const std::string& where) {
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  json::parser_callback_t cb = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) open_objects.emplace_back();
    else if (event == json::parse_event_t::object_end) open_objects.pop_back();
    else if (event == json::parse_event_t::key && !open_objects.back().insert(parsed.get<std::string>()).second &&
             duplicate.empty())
      duplicate = parsed.get<std::string>();
    return true;
  };
  json j;
  try {
    j = json::parse(text, cb);
  } catch (const json::exception& e) {
    std::string msg = e.what();
    bad_input(where + ": not valid UTF-8 JSON (" + repr(msg.substr(0, 200)) + "); rebuild the bundle");
  }
  if (!duplicate.empty())
    bad_input(where + ": not valid UTF-8 JSON (\"key " + repr(duplicate) + " appears twice\"); rebuild the bundle");
  return j;
}

bool is_int(const json& v) { return v.is_number_integer(); }  // booleans are not numbers in nlohmann
bool is_number(const json& v) { return v.is_number() && std::isfinite(v.get<double>()); }

void check_relative_path(const std::string& rel, const std::string& where) {
  bool absolute = !rel.empty() && (rel[0] == '/' || rel[0] == '\\' || (rel.size() > 1 && rel[1] == ':'));
  if (absolute)
    bad_input(where + ": path " + repr(rel) + " is absolute; bundle paths must be relative to the bundle");
  bool dotdot = rel.find('\\') != std::string::npos;
  std::stringstream parts(rel);
  for (std::string part; std::getline(parts, part, '/');) dotdot |= part == "..";
  if (dotdot) bad_input(where + ": path " + repr(rel) + " leaves the bundle ('..' or backslash); rebuild the bundle");
}

std::string real_path(const std::string& p) {
  std::unique_ptr<char, decltype(&std::free)> r(realpath(p.c_str(), nullptr), &std::free);
  return r ? std::string(r.get()) : std::string();
}

int get_int(const json& model, const char* key, int fallback, std::vector<std::string>& problems, bool positive) {
  if (!model.contains(key)) return fallback;
  const json& v = model[key];
  if (!is_int(v) || v.get<int64_t>() <= 0 || v.get<int64_t>() > INT_MAX) {
    if (positive) problems.push_back(std::string(key) + " must be a positive integer, got " + v.dump());
    return fallback;
  }
  return int(v.get<int64_t>());
}

// runtime_py.config.CosmoeConfig.from_dict + validate, for the fields a runner depends on.
Config read_config(const json& model, const std::string& where) {
  if (!model.is_object()) bad_input(where + ": expected a JSON object, got " + std::string(model.type_name()));
  std::vector<std::string> p;
  if (model.contains("model_type") && model["model_type"] != "cosmoe")
    p.push_back("model_type is " + model["model_type"].dump() + ", expected 'cosmoe'");
  std::vector<std::string> unknown, missing;
  for (auto it = model.begin(); it != model.end(); ++it)
    if (!kConfigKeys.count(it.key())) unknown.push_back(repr(it.key()));
  for (const char* k : {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "intermediate_size"})
    if (!model.contains(k)) missing.push_back(repr(k));
  auto list = [](const std::vector<std::string>& xs) {
    std::string s = "[";
    for (size_t i = 0; i < xs.size(); ++i) s += (i ? ", " : "") + xs[i];
    return s + "]";
  };
  if (!unknown.empty()) p.push_back("unknown keys " + list(unknown));
  if (!missing.empty()) p.push_back("missing keys " + list(missing));
  if (!p.empty()) bad_input(where + ": " + p[0] + (p.size() > 1 ? "; " + p[1] : ""));
  Config c;
  c.vocab_size = get_int(model, "vocab_size", 0, p, true);
  c.hidden_size = get_int(model, "hidden_size", 0, p, true);
  c.num_hidden_layers = get_int(model, "num_hidden_layers", 0, p, true);
  c.num_attention_heads = get_int(model, "num_attention_heads", 0, p, true);
  c.num_key_value_heads = get_int(model, "num_key_value_heads", 0, p, true);
  get_int(model, "intermediate_size", 0, p, true);
  c.num_experts = get_int(model, "num_experts", 8, p, true);
  c.num_experts_per_tok = get_int(model, "num_experts_per_tok", 2, p, true);
  c.max_position_embeddings = get_int(model, "max_position_embeddings", 2048, p, true);
  int head_dim = model.contains("head_dim") && !model["head_dim"].is_null() ? get_int(model, "head_dim", 0, p, true) : 0;
  if (model.contains("norm_topk_prob")) {
    if (!model["norm_topk_prob"].is_boolean()) p.push_back("norm_topk_prob must be true or false");
    else c.norm_topk_prob = model["norm_topk_prob"].get<bool>();
  }
  // Routing (runtime_py/routers.py) and the other v2 knobs the runner itself applies; the ones the
  // layer programs apply (shared_expert_gate, the embedding, attention and logit multipliers) are
  // checked for their type only.
  if (model.contains("router")) {
    if (!model["router"].is_string() || !known_router(model["router"].get<std::string>()))
      p.push_back("router must be one of ['softmax', 'sigmoid', 'sparsemixer'], got " + model["router"].dump());
    else c.router.kind = model["router"].get<std::string>();
  }
  if (model.contains("norm")) {
    if (model["norm"] != "rms" && model["norm"] != "layer")
      p.push_back("norm must be one of ['rms', 'layer'], got " + model["norm"].dump());
    else c.layer_norm = model["norm"] == "layer";
  }
  if (model.contains("sparsemixer_eps")) {
    if (!is_number(model["sparsemixer_eps"]) || model["sparsemixer_eps"].get<double>() < 0)
      p.push_back("sparsemixer_eps must be a number >= 0, got " + model["sparsemixer_eps"].dump());
    else c.router.sparsemixer_eps = float(model["sparsemixer_eps"].get<double>());
  }
  for (const char* k : {"score_bias", "shared_expert_gate", "lm_head_bias", "attention_sinks", "router_bias", "expert_bias"})
    if (model.contains(k) && !model[k].is_boolean()) p.push_back(std::string(k) + " must be true or false");
  c.router_bias = model.contains("router_bias") && model["router_bias"].is_boolean() && model["router_bias"].get<bool>();
  // Sliding windows, sinks, expert biases and activations live inside the programs; the runner
  // only checks that the manifest names kinds it knows (runtime_py/config.py MIXER_KINDS, EXPERT_ACTS).
  std::vector<std::string> mixers;  // layer_mixers, empty when absent (full everywhere)
  if (model.contains("layer_mixers") && !model["layer_mixers"].is_null()) {
    const json& plan = model["layer_mixers"];
    bool ok = plan.is_array() && int64_t(plan.size()) == c.num_hidden_layers;
    for (const json& k : ok ? plan : json::array())
      ok &= k.is_string() && (k == "full" || k == "sliding" || k == "mla" || k == "conv" || k == "linear");
    if (!ok)
      p.push_back("layer_mixers must list 'full', 'sliding', 'mla', 'conv' or 'linear' for each of the num_hidden_layers "
                  "layers, got " + plan.dump().substr(0, 80));
    // Latent attention (CosmoeConfig._latent_problems): every layer or none.
    int mla = 0;
    for (const json& k : ok ? plan : json::array()) mla += k == "mla";
    if (mla && mla != c.num_hidden_layers) p.push_back("layer_mixers: 'mla' layers cannot mix with other token mixers");
    c.latent_attention = mla > 0;
    if (ok)
      for (const json& k : plan) mixers.push_back(k.get<std::string>());
  }
  int conv_kernel = get_int(model, "conv_kernel", 0, p, false);
  // Gated DeltaNet ("linear"): the q/k/v convolution's state and the recurrent state's sizes.
  const bool linear = std::count(mixers.begin(), mixers.end(), "linear") > 0;
  const int hk = get_int(model, "linear_num_key_heads", 0, p, linear), hv = get_int(model, "linear_num_value_heads", 0, p, linear);
  const int dk = get_int(model, "linear_key_head_dim", 0, p, linear), dv = get_int(model, "linear_value_head_dim", 0, p, linear);
  const int linear_kernel = get_int(model, "linear_conv_kernel", 0, p, linear);
  if (linear && (hk <= 0 || hv <= 0 || dk <= 0 || dv <= 0 || linear_kernel < 2))
    p.push_back("'linear' layers need positive linear_num_key_heads, linear_num_value_heads, linear_key_head_dim, "
                "linear_value_head_dim and linear_conv_kernel >= 2");
  if (std::count(mixers.begin(), mixers.end(), "conv") && conv_kernel < 2)
    p.push_back("layer_mixers has 'conv' layers but conv_kernel is " + std::to_string(conv_kernel) + " (at least 2 taps)");
  if (model.contains("topk_norm_eps")) {
    if (!is_number(model["topk_norm_eps"]) || model["topk_norm_eps"].get<double>() < 0)
      p.push_back("topk_norm_eps must be a number >= 0, got " + model["topk_norm_eps"].dump());
    else c.router.topk_norm_eps = float(model["topk_norm_eps"].get<double>());
  }
  if (c.latent_attention) {  // the cache holds the latent and the shared RoPE key (CosmoeConfig.cache_shape)
    c.kv_lora_rank = get_int(model, "kv_lora_rank", 0, p, true);
    c.qk_rope_head_dim = get_int(model, "qk_rope_head_dim", 0, p, true);
    if (c.kv_lora_rank <= 0 || c.qk_rope_head_dim <= 0 || get_int(model, "v_head_dim", 0, p, true) <= 0)
      p.push_back("'mla' layers need positive integers kv_lora_rank, qk_rope_head_dim and v_head_dim");
  }
  if (model.contains("group_score")) {
    if (model["group_score"] != "top2_sum" && model["group_score"] != "max")
      p.push_back("group_score must be one of ['top2_sum', 'max'], got " + model["group_score"].dump());
    else c.router.group_max = model["group_score"] == "max";
  }
  if (model.contains("expert_act") && !(model["expert_act"] == "silu" || model["expert_act"] == "clamped_swiglu"))
    p.push_back("expert_act must be one of ['silu', 'clamped_swiglu'], got " + model["expert_act"].dump());
  c.score_bias = model.contains("score_bias") && model["score_bias"].is_boolean() && model["score_bias"].get<bool>();
  c.router.n_group = get_int(model, "n_group", 1, p, true);
  c.router.topk_group = get_int(model, "topk_group", 1, p, true);
  c.rotary_dim = model.contains("rotary_dim") && !model["rotary_dim"].is_null() ? get_int(model, "rotary_dim", 0, p, true) : 0;
  auto positive = [&](const char* k, double fallback) {
    if (!model.contains(k) || (model[k].is_null() && std::string(k) == "attention_multiplier")) return fallback;
    if (!is_number(model[k]) || model[k].get<double>() <= 0) {
      p.push_back(std::string(k) + " must be a positive number, got " + model[k].dump());
      return fallback;
    }
    return model[k].get<double>();
  };
  c.router.routed_scaling_factor = float(positive("routed_scaling_factor", 1.0));
  c.residual_multiplier = float(positive("residual_multiplier", 1.0));
  for (const char* k : {"embedding_multiplier", "attention_multiplier", "logits_scaling"}) positive(k, 1.0);
  if (model.contains("rope_theta")) {
    if (!is_number(model["rope_theta"]) || model["rope_theta"].get<double>() <= 0)
      p.push_back("rope_theta must be a positive number, got " + model["rope_theta"].dump());
    else c.rope_theta = model["rope_theta"].get<double>();
  }
  if (model.contains("rope_scaling") && !model["rope_scaling"].is_null()) {
    const json& r = model["rope_scaling"];
    std::string kind = r.is_object() && r.contains("rope_type") && r["rope_type"].is_string()
                           ? r["rope_type"].get<std::string>() : "";
    if (kind == "llama3") {
      auto num = [&](const char* k) {
        if (!r.contains(k) || !is_number(r[k]) || r[k].get<double>() <= 0) {
          p.push_back(std::string("rope_scaling (llama3) needs positive numbers for ") + k);
          return 0.0;
        }
        return r[k].get<double>();
      };
      c.rope_factor = num("factor");
      c.rope_low = num("low_freq_factor");
      c.rope_high = num("high_freq_factor");
      c.rope_old_ctx = num("original_max_position_embeddings");
    } else if (kind == "yarn") {
      auto num = [&](const char* k) {
        if (!r.contains(k) || !is_number(r[k]) || r[k].get<double>() <= 0) {
          p.push_back(std::string("rope_scaling (yarn) needs positive numbers for ") + k);
          return 1.0;
        }
        return r[k].get<double>();
      };
      c.yarn = true;
      c.yarn_factor = num("factor");
      c.yarn_beta_fast = num("beta_fast");
      c.yarn_beta_slow = num("beta_slow");
      c.yarn_old_ctx = num("original_max_position_embeddings");
      c.attention_factor = num("attention_factor");
      if (!r.contains("truncate") || !r["truncate"].is_boolean()) p.push_back("rope_scaling (yarn) needs truncate true or false");
      else c.yarn_truncate = r["truncate"].get<bool>();
    } else if (kind != "default") {
      p.push_back("rope_scaling.rope_type must be one of ['default', 'llama3', 'yarn'], got " +
                  (r.is_object() && r.contains("rope_type") ? r["rope_type"].dump() : std::string("None")));
    }
  }
  c.routed.assign(size_t(std::max(c.num_hidden_layers, 0)), true);
  if (model.contains("layer_ffns") && !model["layer_ffns"].is_null()) {  // CosmoeConfig._plan_problems
    const json& plan = model["layer_ffns"];
    bool strings = plan.is_array();
    for (const json& k : strings ? plan : json::array()) strings &= k.is_string();
    if (!strings) {
      p.push_back("layer_ffns must be a list of FFN kinds, got " + plan.dump().substr(0, 80));
    } else {
      if (int64_t(plan.size()) != c.num_hidden_layers)
        p.push_back("layer_ffns lists " + std::to_string(plan.size()) + " layers, num_hidden_layers is " +
                    std::to_string(c.num_hidden_layers));
      bool any_routed = false, any_dense = false, known = true;
      for (size_t i = 0; i < plan.size(); ++i) {
        auto kind = kFfnKinds.find(plan[i].get<std::string>());
        if (kind == kFfnKinds.end()) {
          known = false;
          continue;
        }
        any_routed |= kind->second;
        any_dense |= !kind->second;
        if (i < c.routed.size()) c.routed[i] = kind->second;
      }
      if (!known) p.push_back("layer_ffns has unknown kinds; known: ['moe', 'dense']");
      else if (!any_routed) p.push_back("layer_ffns has no 'moe' layer; CoSMoE needs routed experts in at least one layer");
      if (any_dense && get_int(model, "dense_intermediate_size", 0, p, true) == 0)
        p.push_back("layer_ffns has 'dense' layers but dense_intermediate_size is 0");
    }
  }
  for (int l = 0; l < int(c.routed.size()); ++l)
    if (c.routed[size_t(l)]) c.moe_layers.push_back(l);
  c.router.num_experts = c.num_experts;
  c.router.top_k = c.num_experts_per_tok;
  c.router.renormalise = c.norm_topk_prob;
  if (p.empty()) {
    const RouterParams& r = c.router;
    if (c.num_experts % r.n_group || r.topk_group > r.n_group)
      p.push_back("n_group must divide num_experts and be at least topk_group");
    else if (r.n_group > 1 && (c.num_experts / r.n_group < 2 || r.topk_group * (c.num_experts / r.n_group) < r.top_k))
      p.push_back("topk_group groups cannot hold num_experts_per_tok experts (a group needs 2 or more)");
    if (c.num_experts_per_tok > c.num_experts)
      p.push_back("num_experts_per_tok (" + std::to_string(c.num_experts_per_tok) + ") exceeds num_experts (" +
                  std::to_string(c.num_experts) + ")");
    if (!head_dim && c.hidden_size % c.num_attention_heads)
      p.push_back("num_attention_heads does not divide hidden_size; set head_dim explicitly");
    if (c.num_attention_heads % c.num_key_value_heads)
      p.push_back("num_key_value_heads does not divide num_attention_heads");
    c.head_size = head_dim ? head_dim : c.hidden_size / c.num_attention_heads;
    if (c.head_size % 2) p.push_back("head size " + std::to_string(c.head_size) + " must be even for rotary embeddings");
    if (c.rotary_dim % 2 || c.rotary_dim > c.head_size)
      p.push_back("rotary_dim (" + std::to_string(c.rotary_dim) + ") must be even and at most the head size (" +
                  std::to_string(c.head_size) + ")");
    if (c.latent_attention && (c.qk_rope_head_dim % 2 || c.qk_rope_head_dim >= c.head_size))
      p.push_back("'mla' layers need an even qk_rope_head_dim below head_dim");
    c.rope_width = c.latent_attention ? c.qk_rope_head_dim : c.head_size;
    const int ctx = c.max_position_embeddings;
    for (int l = 0; l < c.num_hidden_layers; ++l) {  // CosmoeConfig.cache_spec
      const std::string kind = l < int(mixers.size()) ? mixers[size_t(l)] : "full";
      Config::CacheSpec s;
      if (kind == "conv") {
        s.positional = false;
        s.k[0] = 1, s.k[1] = conv_kernel - 1, s.k[2] = c.hidden_size;
        s.v[0] = s.v[1] = s.v[2] = 1;
      } else if (kind == "linear") {
        s.positional = false;
        s.k[0] = 1, s.k[1] = linear_kernel - 1, s.k[2] = 2 * hk * dk + hv * dv;
        s.v[0] = hv, s.v[1] = dk, s.v[2] = dv;
      } else if (kind == "mla") {
        s.k[0] = 1, s.k[1] = ctx, s.k[2] = c.kv_lora_rank;
        s.v[0] = 1, s.v[1] = ctx, s.v[2] = c.qk_rope_head_dim;
      } else {
        s.k[0] = s.v[0] = c.num_key_value_heads, s.k[1] = s.v[1] = ctx, s.k[2] = s.v[2] = c.head_size;
        s.windowed = kind == "sliding";
      }
      c.caches.push_back(s);
    }
    if (int64_t(c.moe_layers.size()) * c.num_experts > (1 << 16))
      p.push_back("too many expert files (MoE layers x experts exceeds the limit of 65,536); check the sizes");
    double kv = 0;
    for (const auto& s : c.caches) kv += 4.0 * (double(s.k[0]) * s.k[1] * s.k[2] + double(s.v[0]) * s.v[1] * s.v[2]);
    if (kv > double(128LL << 30)) p.push_back("max_position_embeddings needs a KV cache above 128 GiB; check the sizes");
  }
  if (!p.empty()) {
    std::string all = p[0];
    for (size_t i = 1; i < p.size(); ++i) all += "; " + p[i];
    bad_input(where + ": " + all);
  }
  return c;
}

FileEntry read_entry(const json& f, size_t i, const std::string& where) {
  std::string at = where + ": invalid manifest at files/" + std::to_string(i);
  if (!f.is_object()) bad_input(at + ": " + f.dump().substr(0, 80) + " is not of type 'object'");
  for (auto it = f.begin(); it != f.end(); ++it)
    if (!kFileKeys.count(it.key()))
      bad_input(at + ": Additional properties are not allowed (" + repr(it.key()) + " was unexpected)");
  for (const char* k : {"path", "role", "bytes", "sha256"})
    if (!f.contains(k)) bad_input(at + ": " + repr(k) + " is a required property");
  FileEntry e;
  auto str = [&](const char* k, const std::set<std::string>* allowed) {
    if (!f.contains(k)) return std::string();
    if (!f[k].is_string()) bad_input(at + "/" + k + ": " + f[k].dump() + " is not of type 'string'");
    std::string s = f[k].get<std::string>();
    if (allowed && !allowed->count(s)) bad_input(at + "/" + k + ": " + repr(s) + " is not one of the allowed values");
    return s;
  };
  auto integer = [&](const char* k, int64_t min, int64_t fallback) {
    if (!f.contains(k)) return fallback;
    if (!is_int(f[k]) || f[k].get<int64_t>() < min)
      bad_input(at + "/" + k + ": " + f[k].dump().substr(0, 80) + " is not an integer >= " + std::to_string(min));
    return f[k].get<int64_t>();
  };
  e.path = str("path", nullptr);
  if (e.path.empty()) bad_input(at + "/path: '' should be non-empty");
  e.role = str("role", &kRoles);
  e.target = str("target", &kTargets);
  e.unit = str("unit", &kUnits);
  e.precision = str("precision", nullptr);
  static const std::set<std::string> caches = {"prefix", "context"};
  e.cache = str("cache", &caches);
  str("dtype", &kDtypes);
  e.sha256 = str("sha256", nullptr);
  bool hex = e.sha256.size() == 64;
  for (char ch : e.sha256) hex &= (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f');
  if (!hex) bad_input(at + "/sha256: " + repr(e.sha256) + " does not match '^[0-9a-f]{64}$'");
  e.bytes = integer("bytes", 0, 0);
  e.max_tokens = int(std::min<int64_t>(integer("max_tokens", 1, 1), INT_MAX));
  e.layer = int(std::min<int64_t>(integer("layer", 0, -1), INT_MAX));
  e.expert = int(std::min<int64_t>(integer("expert", 0, -1), INT_MAX));
  if (f.contains("tensors") && (!f["tensors"].is_object() || f["tensors"].empty()))
    bad_input(at + "/tensors: must be a non-empty object");
  if (f.contains("gguf") && !f["gguf"].is_object())  // llama.cpp's file: described, never loaded here
    bad_input(at + "/gguf: " + f["gguf"].dump().substr(0, 80) + " is not of type 'object'");
  return e;
}

}  // namespace

Bundle Bundle::open(const std::string& dir) {
  struct stat st {};
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) bad_input(dir + ": not a bundle directory (no such directory)");
  Bundle b;
  b.root = dir;
  while (b.root.size() > 1 && b.root.back() == '/') b.root.pop_back();
  b.manifest_path = b.root + "/" + kManifestName;
  const std::string& where = b.manifest_path;
  if (stat(where.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
    bad_input(where + ": missing; is " + b.root + " a bundle written by `cosmoe-export split`?");
  if (st.st_size > kMaxManifestBytes)
    bad_input(where + ": " + std::to_string(st.st_size) + " bytes exceeds the " + std::to_string(kMaxManifestBytes) +
              "-byte manifest limit");
  std::ifstream in(where, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  json m = parse_unique(text, where);

  if (!m.is_object()) bad_input(where + ": manifest must be a JSON object");
  if (!m.contains("format") || m["format"] != kFormatName)
    bad_input(where + ": format is " + (m.contains("format") ? m["format"].dump() : "None") + ", expected '" +
              kFormatName + "'");
  if (m.contains("format_version") && is_int(m["format_version"]) && m["format_version"].get<int64_t>() > kFormatVersion)
    bad_input(where + ": format version " + m["format_version"].dump() + " is newer than this runtime reads (" +
              std::to_string(kFormatVersion) + "); upgrade cosmoe-export");
  for (const auto& k : kTopRequired)
    if (!m.contains(k)) bad_input(where + ": invalid manifest at (top level): " + repr(k) + " is a required property");
  for (auto it = m.begin(); it != m.end(); ++it)
    if (!kTopKeys.count(it.key()))
      bad_input(where + ": invalid manifest at (top level): Additional properties are not allowed (" + repr(it.key()) +
                " was unexpected)");
  if (!is_int(m["format_version"]) || m["format_version"].get<int64_t>() < 1)
    bad_input(where + ": invalid manifest at format_version: " + m["format_version"].dump() + " is not an integer >= 1");
  if (m["model"].is_object() && m["model"].contains("layer_ffns") && m["format_version"].get<int64_t>() < kPlanVersion)
    bad_input(where + ": model.layer_ffns needs format version " + std::to_string(kPlanVersion) +
              ", the manifest says " + m["format_version"].dump() + "; rebuild the bundle");
  if (!m["files"].is_array()) bad_input(where + ": invalid manifest at files: is not of type 'array'");
  if (!m["provenance"].is_object()) bad_input(where + ": invalid manifest at provenance: is not of type 'object'");
  bool quantized = m.contains("quantization");

  const json& files = m["files"];
  for (size_t i = 0; i < files.size(); ++i) {
    FileEntry e = read_entry(files[i], i, where);
    check_relative_path(e.path, where);
    if (e.role == "expert" && (e.layer < 0 || e.expert < 0))
      bad_input(where + ": expert file " + repr(e.path) + " lacks its layer or expert index");
    bool has_tensors = files[i].contains("tensors");
    if ((e.role == "backbone" || e.role == "expert") && has_tensors != quantized)
      bad_input(where + ": file " + repr(e.path) + (has_tensors ? " has" : " lacks") +
                " per-tensor encodings but the manifest " + (quantized ? "is" : "is not") +
                " quantized; rebuild the bundle");
    b.files.push_back(e);
  }
  b.config = read_config(m["model"], where + " (model)");

  // runtime_py.bundle.Bundle._check_files
  std::string root_real = real_path(b.root);
  std::set<std::string> seen;
  std::set<std::pair<int, int>> experts;
  for (const FileEntry& f : b.files) {
    if (!seen.insert(f.path).second) bad_input(where + ": file " + repr(f.path) + " listed twice");
    std::string real = real_path(b.path_of(f));
    if (!real.empty() && real != root_real && real.compare(0, root_real.size() + 1, root_real + "/") != 0)
      bad_input(where + ": " + repr(f.path) + " resolves outside the bundle (symlink?) to " + real);
    if (f.role == "expert") experts.insert({f.layer, f.expert});
    if (f.role == "backbone" && !b.backbone) b.backbone = &f;
  }
  const Config& c = b.config;
  // Expert files exist for the MoE layers of the plan only: a dense layer has none.
  for (int l : c.moe_layers)
    for (int e = 0; e < c.num_experts; ++e)
      if (!experts.count({l, e}))
        bad_input(where + ": expert files do not cover every (layer, expert); missing e.g. [(" + std::to_string(l) +
                  ", " + std::to_string(e) + ")]");
  if (experts.size() != c.moe_layers.size() * size_t(c.num_experts))
    bad_input(where + ": expert files listed for layers without routed experts, or twice; rebuild the bundle");
  if (!b.backbone) bad_input(where + ": no backbone file listed");

  // runtime_py.program_backend.ProgramEngine: one ExecuTorch program per unit.
  for (const FileEntry& f : b.files)
    if (f.role == "program" && f.target == "executorch") {
      bool per_layer = f.unit == "layer" || f.unit == "expert";
      b.programs[{f.unit, per_layer ? f.layer : -1, f.unit == "expert" ? f.expert : -1}] = &f;
    }
  size_t want = 2 + size_t(c.num_hidden_layers) + c.moe_layers.size() * size_t(c.num_experts);
  bool complete = b.programs.size() == want && b.programs.count({"embed", -1, -1}) && b.programs.count({"head", -1, -1});
  for (int l = 0; complete && l < c.num_hidden_layers; ++l) {
    complete &= b.programs.count({"layer", l, -1}) > 0;
    for (int e = 0; complete && c.routed[size_t(l)] && e < c.num_experts; ++e)
      complete &= b.programs.count({"expert", l, e}) > 0;
  }
  if (!complete)
    bad_input(b.root + ": the executorch programs do not cover every unit; run `cosmoe-export lower " + b.root +
              " --target executorch`");
  return b;
}

std::string Bundle::checked_path(const FileEntry& f) const {
  std::string p = path_of(f);
  struct stat st {};
  if (stat(p.c_str(), &st) != 0) bad_input(p + ": missing; the bundle is incomplete, rebuild it");
  if (int64_t(st.st_size) != f.bytes)
    bad_input(p + ": " + std::to_string(st.st_size) + " bytes on disk, manifest says " + std::to_string(f.bytes) +
              "; the file changed after the bundle was written, rebuild it");
  return p;
}

std::string Bundle::verified_path(const FileEntry& f, bool hash) const {
  std::string p = checked_path(f);
  if (hash && sha256_file(p) != f.sha256)
    bad_input(p + ": sha256 differs from the manifest; the file changed after the bundle was written. Rebuild it or "
              "run `cosmoe-export verify --integrity`");
  return p;
}

const FileEntry& Bundle::program(const std::string& unit, int layer, int expert) const {
  return *programs.at({unit, layer, expert});
}

}  // namespace cosmoe
