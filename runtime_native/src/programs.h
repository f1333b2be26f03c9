// The bundle's ExecuTorch programs, loaded through the mmap loader, with one planned-memory arena
// for all of them.
//
// Each program plans buffers for its activations and its inputs and outputs. Loaded the default way
// every method gets its own: an expert lowered for N up to the context planned 7 MB next to a 1 MB
// int4 program, and a whole wearable bundle 1.5 GB of plans for 187 MB of weights. The runner runs
// one program at a time, so every program's buffer i points into the same arena buffer i, sized for
// the largest plan of the backbone and the experts. The price: a program's outputs live in the
// arena, so the runner copies them out before it runs the next one.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/runtime/core/hierarchical_allocator.h>

namespace cosmoe {

using executorch::runtime::EValue;

// Planned-buffer sizes of a method, one per buffer index.
using Plan = std::vector<size_t>;

class Arena {
 public:
  // Grow to hold `plan`; only before any program is bound to the arena.
  void reserve(const Plan& plan);
  bool fits(const Plan& plan) const;
  std::vector<executorch::runtime::Span<uint8_t>> spans(const Plan& plan);
  size_t bytes() const;

 private:
  std::vector<std::vector<uint8_t>> buffers_;
  bool bound_ = false;
};

class Program {
 public:
  // Opens the program (mmap) and reads its plan; nothing is loaded yet.
  explicit Program(const std::string& path);
  const Plan& plan() const { return plan_; }
  // Load "forward" with its buffers in the arena when the plan fits, else in buffers of its own.
  void bind(Arena& arena);
  // Run "forward"; the outputs are valid until the next program runs.
  std::vector<EValue> run(const std::vector<EValue>& inputs);
  size_t private_bytes() const;

 private:
  std::string path_;
  std::unique_ptr<executorch::extension::module::Module> module_;
  Plan plan_;
  std::vector<std::vector<uint8_t>> own_;
  std::vector<executorch::runtime::Span<uint8_t>> spans_;
  std::unique_ptr<executorch::runtime::HierarchicalAllocator> planned_;
};

// XNNPACK's thread count (the shared ExecuTorch threadpool); 0 leaves it as it is.
void set_threads(int threads);

}  // namespace cosmoe
