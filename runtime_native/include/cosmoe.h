/* cosmoe: run a cosmoe-export bundle's ExecuTorch programs on a device.
 *
 * The C API of the native runner (C at the boundary, C++ inside; no exceptions or STL types cross
 * it). Token ids in and out: the app owns its tokenizer. Semantics follow runtime_py
 * (docs/RUNTIME.md): the backbone programs stay resident, routed experts load on demand through a
 * budgeted store with one of the policies "resident", "paper", "lru", "lfu", "lru+prefetch".
 *
 *   cosmoe_params p = cosmoe_default_params();
 *   p.experts_per_layer = 4; p.policy = "lru";
 *   cosmoe_runner *r;
 *   if (cosmoe_open("bundle", &p, &r) != COSMOE_OK) { puts(cosmoe_last_error()); return 2; }
 *   cosmoe_prefill(r, ids, n);                       // logits of the last prompt token
 *   int32_t tok; cosmoe_sample(r, 0.0f, 1.0f, &tok); // greedy
 *   cosmoe_decode(r, tok);                           // and so on
 *   puts(cosmoe_metrics_json(r));
 *   cosmoe_free(r);
 *
 * Every function returns a status; on failure cosmoe_last_error() (per thread) holds one line that
 * names the file and the problem, as runtime_py's errors do. docs/NATIVE.md has the whole story.
 */
#ifndef COSMOE_H
#define COSMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  COSMOE_OK = 0,
  COSMOE_ERR_INTERNAL = 1, /* a bug or a backend failure on valid input */
  COSMOE_ERR_INPUT = 2,    /* bad input: a malformed bundle, a bad argument, a budget too small */
  COSMOE_ERR_CONTEXT = 3   /* the KV cache is full: no room for another token */
} cosmoe_status;

typedef struct cosmoe_runner cosmoe_runner;

typedef struct {
  int64_t budget_bytes;      /* total memory budget; 0: from experts_per_layer, or every expert */
  int32_t experts_per_layer; /* 0: from budget_bytes; else backbone + N x layers x expert bytes */
  const char *policy;        /* "resident", "paper", "lru", "lfu", "lru+prefetch" */
  int32_t threads;           /* XNNPACK threads; 0: every core */
  const char *check_hash;    /* "first" (sha256 on a file's first load), "always", "never" */
  float prefetch_min_prob;   /* lru+prefetch loads a guessed expert only at this probability */
  uint64_t seed;             /* sampling seed */
} cosmoe_params;

cosmoe_params cosmoe_default_params(void);

/* Open a bundle lowered to ExecuTorch (`cosmoe-export lower BUNDLE --target executorch`). */
cosmoe_status cosmoe_open(const char *bundle_dir, const cosmoe_params *params, cosmoe_runner **out);
void cosmoe_free(cosmoe_runner *runner);

/* Start a new sequence (the KV cache empties; the store keeps its experts). */
cosmoe_status cosmoe_reset(cosmoe_runner *runner);
/* Feed n tokens at the next positions (in chunks of the programs' max_tokens). Afterwards
 * cosmoe_logits() holds the last token's logits; with all_logits non-NULL, the logits of all n
 * tokens are written there, n x cosmoe_n_vocab() floats, row-major. */
cosmoe_status cosmoe_prefill(cosmoe_runner *runner, const int32_t *ids, size_t n, float *all_logits);
/* One token at the next position. */
cosmoe_status cosmoe_decode(cosmoe_runner *runner, int32_t id);
/* The last fed token's logits, cosmoe_n_vocab() floats; valid until the next call. */
const float *cosmoe_logits(const cosmoe_runner *runner);
/* From the last logits: greedy when temperature is 0, else seeded nucleus sampling. */
cosmoe_status cosmoe_sample(cosmoe_runner *runner, float temperature, float top_p, int32_t *out);

/* The whole loop: reset, prefill, sample and decode until max_new_tokens, a stop id or the
 * context; on_token (may be NULL) sees each new id as it is produced. out_tokens (may be NULL)
 * receives up to max_new_tokens ids and *n_out their count. Metrics cover this call. */
typedef void (*cosmoe_token_callback)(int32_t id, void *user);
cosmoe_status cosmoe_generate(cosmoe_runner *runner, const int32_t *prompt, size_t n_prompt,
                              int32_t max_new_tokens, float temperature, float top_p,
                              const int32_t *stop_ids, size_t n_stop, cosmoe_token_callback on_token,
                              void *user, int32_t *out_tokens, size_t *n_out);

int32_t cosmoe_n_vocab(const cosmoe_runner *runner);
int32_t cosmoe_n_ctx(const cosmoe_runner *runner);
/* Tokens in the KV cache. */
int32_t cosmoe_n_past(const cosmoe_runner *runner);
/* The metrics of the last cosmoe_generate (the keys of `cosmoe-export run --json`) as a JSON
 * object; valid until the next call on this runner. */
const char *cosmoe_metrics_json(cosmoe_runner *runner);
/* Why the last cosmoe_generate stopped: "max_new_tokens", "stop_token" or "context". */
const char *cosmoe_stopped(const cosmoe_runner *runner);
/* The last error of this thread, one line; "" when none. */
const char *cosmoe_last_error(void);

#ifdef __cplusplus
}
#endif
#endif /* COSMOE_H */
