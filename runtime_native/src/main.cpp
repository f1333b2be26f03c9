// cosmoe-run: run a bundle on the native runner from the command line. Token ids in and out (the
// Python front end, `cosmoe-export run --backend native`, tokenizes). Exit 0 ok, 2 bad input with
// one line on stderr, 1 an internal error.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "cosmoe.h"
#include "memory.h"

namespace {

const char* kUsage =
    "usage: cosmoe-run BUNDLE (--prompt-ids IDS | --prompt-ids-file FILE) [options]\n"
    "\n"
    "Generate with a bundle lowered to ExecuTorch, the backbone resident and the routed experts\n"
    "loaded on demand under a memory budget. New token ids stream to stdout, one per line.\n"
    "\n"
    "  --prompt-ids IDS          comma-separated token ids\n"
    "  --prompt-ids-file FILE    the same, from a file (commas or whitespace)\n"
    "  --max-new-tokens N        default 64\n"
    "  --policy P                resident, paper, lru (default), lfu, lru+prefetch\n"
    "  --budget BYTES            total memory budget (default: every expert resident)\n"
    "  --experts-per-layer N     budget = backbone + N x layers x one expert\n"
    "  --threads N               XNNPACK threads (default: every core)\n"
    "  --temperature T           0 (default): greedy\n"
    "  --top-p P                 nucleus sampling mass, default 1\n"
    "  --seed S                  sampling seed, default 0\n"
    "  --stop-ids IDS            stop after generating one of these\n"
    "  --check-hash WHEN         first (default), always, never: sha256 of a program on load\n"
    "  --prefetch-min-prob P     lru+prefetch's confidence gate, default 0.3\n"
    "  --score FILE              no generation: write the logits of every prompt position, float32 [T, V]\n"
    "  --json FILE               write the metrics, tokens and why generation stopped as JSON\n"
    "  --quiet                   no metrics line on stderr\n"
    "\n"
    "Examples:\n"
    "  cosmoe-run build/demo/bundle --prompt-ids 1,2,3 --max-new-tokens 32\n"
    "  cosmoe-run build/demo/bundle --prompt-ids 1,2,3 --experts-per-layer 4 --policy lru+prefetch --json m.json\n";

[[noreturn]] void fail(const std::string& line, int code = 2) {
  std::fprintf(stderr, "error: %s\n", line.c_str());
  std::exit(code);
}

long long to_int(const std::string& flag, const std::string& v, long long lo, long long hi) {
  errno = 0;
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || errno || x < lo || x > hi)
    fail(flag + " " + v + ": expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return x;
}

float to_float(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  float x = std::strtof(v.c_str(), &end);
  if (v.empty() || *end) fail(flag + " " + v + ": expected a number");
  return x;
}

std::vector<int32_t> to_ids(const std::string& flag, std::string text) {
  for (char& c : text)
    if (c == ',' || c == '\n' || c == '\t' || c == '\r') c = ' ';
  std::vector<int32_t> ids;
  std::istringstream in(text);
  for (std::string tok; in >> tok;) ids.push_back(int32_t(to_int(flag, tok, INT32_MIN, INT32_MAX)));
  return ids;
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\\\"") : c == '\\' ? std::string("\\\\") : std::string(1, c);
  return out + "\"";
}

void on_token(int32_t id, void*) {
  std::printf("%d\n", id);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "-h" || args[0] == "--help") {
    std::fputs(kUsage, args.empty() ? stderr : stdout);
    return args.empty() ? 2 : 0;
  }
  std::string bundle;
  std::map<std::string, std::string> opt;
  bool quiet = false;
  const std::vector<std::string> valued = {"--prompt-ids", "--prompt-ids-file", "--max-new-tokens", "--policy",
                                           "--budget", "--experts-per-layer", "--threads", "--temperature", "--top-p",
                                           "--seed", "--stop-ids", "--check-hash", "--prefetch-min-prob", "--score",
                                           "--json"};
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--quiet") {
      quiet = true;
    } else if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a.rfind("--", 0) == 0) {
      if (std::find(valued.begin(), valued.end(), a) == valued.end()) fail("unknown option " + a + "; see --help");
      if (i + 1 >= args.size()) fail(a + ": needs a value");
      opt[a] = args[++i];
    } else if (bundle.empty()) {
      bundle = a;
    } else {
      fail("unexpected argument " + a + "; give one BUNDLE");
    }
  }
  if (bundle.empty()) fail("give a BUNDLE directory; see --help");
  if (opt.count("--prompt-ids") == opt.count("--prompt-ids-file")) fail("give exactly one of --prompt-ids, --prompt-ids-file");
  std::vector<int32_t> ids;
  if (opt.count("--prompt-ids")) {
    ids = to_ids("--prompt-ids", opt["--prompt-ids"]);
  } else {
    std::ifstream in(opt["--prompt-ids-file"]);
    if (!in) fail(opt["--prompt-ids-file"] + ": no such file");
    std::stringstream text;
    text << in.rdbuf();
    ids = to_ids(opt["--prompt-ids-file"], text.str());
  }
  if (ids.empty()) fail("--prompt-ids: is empty; give at least one token id");

  cosmoe_params p = cosmoe_default_params();
  std::string policy = opt.count("--policy") ? opt["--policy"] : "lru";
  std::string check = opt.count("--check-hash") ? opt["--check-hash"] : "first";
  p.policy = policy.c_str();
  p.check_hash = check.c_str();
  if (opt.count("--budget")) p.budget_bytes = to_int("--budget", opt["--budget"], 1, LLONG_MAX);
  if (opt.count("--experts-per-layer"))
    p.experts_per_layer = int32_t(to_int("--experts-per-layer", opt["--experts-per-layer"], 1, INT32_MAX));
  if (opt.count("--threads")) p.threads = int32_t(to_int("--threads", opt["--threads"], 1, 1024));
  if (opt.count("--seed")) p.seed = uint64_t(to_int("--seed", opt["--seed"], 0, LLONG_MAX));
  if (opt.count("--prefetch-min-prob")) p.prefetch_min_prob = to_float("--prefetch-min-prob", opt["--prefetch-min-prob"]);
  int max_new = int(opt.count("--max-new-tokens") ? to_int("--max-new-tokens", opt["--max-new-tokens"], 1, INT32_MAX) : 64);
  float temperature = opt.count("--temperature") ? to_float("--temperature", opt["--temperature"]) : 0.0f;
  float top_p = opt.count("--top-p") ? to_float("--top-p", opt["--top-p"]) : 1.0f;
  std::vector<int32_t> stops = opt.count("--stop-ids") ? to_ids("--stop-ids", opt["--stop-ids"]) : std::vector<int32_t>{};

  cosmoe_runner* r = nullptr;
  cosmoe_status s = cosmoe_open(bundle.c_str(), &p, &r);
  if (s != COSMOE_OK) fail(cosmoe_last_error(), s == COSMOE_ERR_INPUT ? 2 : 1);
  std::string json;
  if (opt.count("--score")) {
    std::vector<float> logits(ids.size() * size_t(cosmoe_n_vocab(r)));
    auto t0 = std::chrono::steady_clock::now();
    s = cosmoe_prefill(r, ids.data(), ids.size(), logits.data());
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (s == COSMOE_ERR_CONTEXT) s = COSMOE_ERR_INPUT;
    if (s != COSMOE_OK) fail(cosmoe_last_error(), s == COSMOE_ERR_INPUT ? 2 : 1);
    std::FILE* f = std::fopen(opt["--score"].c_str(), "wb");
    if (!f || std::fwrite(logits.data(), sizeof(float), logits.size(), f) != logits.size() || std::fclose(f) != 0)
      fail(opt["--score"] + ": cannot write the logits");
    json = "{\"backend\": \"native\", \"prompt_tokens\": " + std::to_string(ids.size()) +
           ", \"prefill_ms\": " + std::to_string(ms) +
           ", \"peak_rss_mb\": " + std::to_string(double(cosmoe::peak_rss_bytes()) / 1e6) + "}";
  } else {
    std::vector<int32_t> out(static_cast<size_t>(max_new));
    size_t n = 0;
    s = cosmoe_generate(r, ids.data(), ids.size(), max_new, temperature, top_p, stops.data(), stops.size(), on_token,
                        nullptr, out.data(), &n);
    if (s != COSMOE_OK) fail(cosmoe_last_error(), s == COSMOE_ERR_INPUT ? 2 : 1);
    std::string metrics = cosmoe_metrics_json(r);
    std::string tokens = "[";
    for (size_t i = 0; i < n; ++i) tokens += (i ? ", " : "") + std::to_string(out[i]);
    tokens += "]";
    // {**metrics, "tokens": [...], "stopped": "..."}, as `cosmoe-export run --json` writes it.
    json = metrics.substr(0, metrics.size() - 1) + ", \"tokens\": " + tokens + ", \"stopped\": " +
           json_string(cosmoe_stopped(r)) + "}";
    if (!quiet) std::fprintf(stderr, "[native, %s] %s\n", policy.c_str(), metrics.c_str());
  }
  if (opt.count("--json")) {
    std::FILE* f = std::fopen(opt["--json"].c_str(), "w");
    if (!f || std::fputs((json + "\n").c_str(), f) < 0 || std::fclose(f) != 0) fail(opt["--json"] + ": cannot write");
  }
  cosmoe_free(r);
  return 0;
}
