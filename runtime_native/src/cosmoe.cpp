// The C API (include/cosmoe.h) over cosmoe::Runner: every call catches, stores one line as this
// thread's last error and returns a status.
#include "cosmoe.h"

#include <memory>
#include <new>
#include <string>

#include "errors.h"
#include "runner.h"

struct cosmoe_runner {
  std::unique_ptr<cosmoe::Runner> runner;
  std::string stopped;  // why the last cosmoe_generate stopped
};

namespace {
thread_local std::string last_error;

template <typename F>
cosmoe_status guarded(F&& f) {
  try {
    last_error.clear();
    f();
    return COSMOE_OK;
  } catch (const cosmoe::Error& e) {
    last_error = e.what();
    return e.status;
  } catch (const std::bad_alloc&) {
    last_error = "out of memory";
    return COSMOE_ERR_INTERNAL;
  } catch (const std::exception& e) {
    last_error = std::string("internal error: ") + e.what();
    return COSMOE_ERR_INTERNAL;
  }
}
}  // namespace

extern "C" {

cosmoe_params cosmoe_default_params(void) {
  cosmoe_params p{};
  p.budget_bytes = 0;
  p.experts_per_layer = 0;
  p.policy = "lru";
  p.threads = 0;
  p.check_hash = "first";
  p.prefetch_min_prob = 0.3f;
  p.seed = 0;
  return p;
}

cosmoe_status cosmoe_open(const char* bundle_dir, const cosmoe_params* params, cosmoe_runner** out) {
  if (out) *out = nullptr;
  return guarded([&] {
    if (!bundle_dir || !out) cosmoe::bad_input("cosmoe_open: bundle_dir and out must not be NULL");
    cosmoe_params p = params ? *params : cosmoe_default_params();
    auto r = std::make_unique<cosmoe_runner>();
    r->runner = std::make_unique<cosmoe::Runner>(bundle_dir, p);
    *out = r.release();
  });
}

void cosmoe_free(cosmoe_runner* runner) { delete runner; }

cosmoe_status cosmoe_reset(cosmoe_runner* r) {
  return guarded([&] { r->runner->reset(); });
}

cosmoe_status cosmoe_prefill(cosmoe_runner* r, const int32_t* ids, size_t n, float* all_logits) {
  return guarded([&] {
    if (!ids || n == 0) cosmoe::bad_input("cosmoe_prefill: give at least one token");
    r->runner->prefill(ids, n, all_logits);
  });
}

cosmoe_status cosmoe_decode(cosmoe_runner* r, int32_t id) {
  return guarded([&] { r->runner->decode(id); });
}

const float* cosmoe_logits(const cosmoe_runner* r) { return r->runner->logits().data(); }

cosmoe_status cosmoe_sample(cosmoe_runner* r, float temperature, float top_p, int32_t* out) {
  return guarded([&] {
    if (r->runner->logits().empty()) cosmoe::bad_input("cosmoe_sample: no logits yet; prefill first");
    *out = r->runner->sample(temperature, top_p);
  });
}

cosmoe_status cosmoe_generate(cosmoe_runner* r, const int32_t* prompt, size_t n_prompt, int32_t max_new_tokens,
                              float temperature, float top_p, const int32_t* stop_ids, size_t n_stop,
                              cosmoe_token_callback on_token, void* user, int32_t* out_tokens, size_t* n_out) {
  return guarded([&] {
    std::vector<int32_t> ids(prompt, prompt + (prompt ? n_prompt : 0));
    std::vector<int32_t> stops(stop_ids, stop_ids + (stop_ids ? n_stop : 0));
    auto gen = r->runner->generate(ids, max_new_tokens, temperature, top_p, stops, [&](int32_t id) {
      if (on_token) on_token(id, user);
    });
    if (out_tokens)
      for (size_t i = 0; i < gen.tokens.size(); ++i) out_tokens[i] = gen.tokens[i];
    if (n_out) *n_out = gen.tokens.size();
    r->stopped = gen.stopped;
  });
}

int32_t cosmoe_n_vocab(const cosmoe_runner* r) { return r->runner->config().vocab_size; }
int32_t cosmoe_n_ctx(const cosmoe_runner* r) { return r->runner->config().max_position_embeddings; }
int32_t cosmoe_n_past(const cosmoe_runner* r) { return r->runner->pos(); }

const char* cosmoe_metrics_json(cosmoe_runner* r) { return r->runner->metrics_json().c_str(); }

const char* cosmoe_stopped(const cosmoe_runner* r) { return r->stopped.c_str(); }

const char* cosmoe_last_error(void) { return last_error.c_str(); }

}  // extern "C"
