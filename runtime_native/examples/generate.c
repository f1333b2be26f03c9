/* Greedy generation through the C API: what an app links (docs/NATIVE.md). */
#include <stdio.h>

#include "cosmoe.h"

int main(int argc, char **argv) {
  if (argc < 2) { fprintf(stderr, "usage: %s BUNDLE\n", argv[0]); return 2; }
  cosmoe_params p = cosmoe_default_params();
  p.experts_per_layer = 4; /* each layer keeps 4 of its experts in memory */
  p.policy = "lru";
  cosmoe_runner *r = NULL;
  if (cosmoe_open(argv[1], &p, &r) != COSMOE_OK) {
    fprintf(stderr, "error: %s\n", cosmoe_last_error());
    return 2;
  }
  const int32_t prompt[] = {1, 2, 3, 4, 5}; /* token ids: the app owns its tokenizer */
  cosmoe_status s = cosmoe_prefill(r, prompt, 5, NULL);
  for (int i = 0; i < 16 && s == COSMOE_OK; ++i) {
    int32_t tok;
    s = cosmoe_sample(r, 0.0f, 1.0f, &tok); /* temperature 0: greedy */
    if (s == COSMOE_OK) printf("%d\n", tok);
    if (s == COSMOE_OK) s = cosmoe_decode(r, tok);
  }
  if (s != COSMOE_OK) fprintf(stderr, "error: %s\n", cosmoe_last_error());
  cosmoe_free(r);
  return s == COSMOE_OK ? 0 : 1;
}
