#include "programs.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include <executorch/runtime/platform/runtime.h>

#include "errors.h"

// The wheel ships libexecutorch_threadpool but not its header (extension/threadpool/threadpool.h in
// the ExecuTorch tree); these two declarations are copied from it, unchanged.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace cosmoe {

using executorch::extension::module::Module;
using EtError = executorch::runtime::Error;
using executorch::runtime::Span;

namespace {
// ExecuTorch logs at Info level to stderr (cpuinfo probes, kernel notes): a bad bundle must still
// give one line, so its messages go to stderr only with COSMOE_VERBOSE set.
void quiet_log(et_timestamp_t, et_pal_log_level_t level, const char* file, const char*, size_t line,
               const char* message, size_t length) {
  static const bool verbose = std::getenv("COSMOE_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "executorch %c %s:%zu] %.*s\n", char(level), file, line, int(length), message);
}

void init_runtime() {
  static const bool done = [] {
    executorch::runtime::register_pal(executorch::runtime::PalImpl::create(quiet_log, __FILE__));
    executorch::runtime::runtime_init();
    return true;
  }();
  (void)done;
}

std::string et_error(const std::string& path, const char* what, EtError e) {
  return path + ": " + what + " (ExecuTorch error " + std::to_string(int(e)) +
         "); the program is corrupt or from another ExecuTorch version, run `cosmoe-export lower` again";
}
}  // namespace

void Arena::reserve(const Plan& plan) {
  if (bound_) internal("arena: reserve after a program was bound");
  if (buffers_.size() < plan.size()) buffers_.resize(plan.size());
  for (size_t i = 0; i < plan.size(); ++i)
    if (buffers_[i].size() < plan[i]) buffers_[i].assign(plan[i], 0);  // zeroed: resident, so RSS counts it
}

bool Arena::fits(const Plan& plan) const {
  if (plan.size() > buffers_.size()) return false;
  for (size_t i = 0; i < plan.size(); ++i)
    if (plan[i] > buffers_[i].size()) return false;
  return true;
}

std::vector<Span<uint8_t>> Arena::spans(const Plan& plan) {
  bound_ = true;
  std::vector<Span<uint8_t>> out;
  for (size_t i = 0; i < plan.size(); ++i) out.emplace_back(buffers_[i].data(), plan[i]);
  return out;
}

size_t Arena::bytes() const {
  size_t n = 0;
  for (const auto& b : buffers_) n += b.size();
  return n;
}

Program::Program(const std::string& path) : path_(path) {
  init_runtime();
  module_ = std::make_unique<Module>(path, Module::LoadMode::Mmap);
  auto meta = module_->method_meta("forward");
  if (!meta.ok()) bad_input(et_error(path, "cannot read the program's forward method", meta.error()));
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    auto size = meta->memory_planned_buffer_size(i);
    if (!size.ok() || *size < 0) bad_input(et_error(path, "cannot read the program's memory plan", size.error()));
    plan_.push_back(size_t(*size));
  }
}

void Program::bind(Arena& arena) {
  if (arena.fits(plan_)) {
    spans_ = arena.spans(plan_);
  } else {  // an expert lowered with a larger plan than the arena's (another bundle's lowering)
    for (size_t size : plan_) {
      own_.emplace_back(size);
      spans_.emplace_back(own_.back().data(), size);
    }
  }
  planned_ = std::make_unique<executorch::runtime::HierarchicalAllocator>(
      Span<Span<uint8_t>>(spans_.data(), spans_.size()));
  EtError e = module_->load_method("forward", planned_.get());
  if (e != EtError::Ok) bad_input(et_error(path_, "cannot load the program", e));
}

std::vector<EValue> Program::run(const std::vector<EValue>& inputs) {
  auto out = module_->execute("forward", inputs);
  if (!out.ok()) internal(et_error(path_, "failed to run", out.error()));
  return std::move(*out);
}

size_t Program::private_bytes() const {
  size_t n = 0;
  for (const auto& b : own_) n += b.size();
  return n;
}

void set_threads(int threads) {
  init_runtime();
  if (threads > 0) executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(uint32_t(threads));
}

}  // namespace cosmoe
