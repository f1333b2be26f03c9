// The expert store: which (layer, expert) units are resident, within a byte budget. It mirrors
// runtime_py/store.py line for line (read the two side by side): the same capacity and quota
// arithmetic, the same policies under the same names, the same counters.
//
// Capacity: C = (budget - backbone bytes) // unit bytes units. When C >= K * L every layer gets a
// quota of C // L units and evicts within itself; below that the layers share one pool. C < K is
// an error: one token of one layer would not fit. A unit being loaded in the background counts.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "programs.h"

namespace cosmoe {

using Key = std::pair<int, int>;  // (layer, expert)
using Unit = std::shared_ptr<Program>;

// Eviction order plus the hooks of runtime_py.store.Policy; the default is LRU.
struct Policy {
  bool preload_all = false;         // load every expert up front (and never evict)
  bool prefetch = false;            // the runner guesses the next layer's experts
  bool keep_only_selected = false;  // CoSMoEs Eq. 8
  bool by_uses = false;             // LFU: counts survive eviction
  uint64_t clock = 0;
  std::map<Key, uint64_t> last_use, uses;

  void touch(const Key& k) { last_use[k] = ++clock; ++uses[k]; }
  void forget(const Key& k) { last_use.erase(k); }
  // Lowest rank is evicted first.
  std::pair<uint64_t, uint64_t> rank(const Key& k) const;
};

// Policy name -> policy, as runtime_py.store.POLICIES.
Policy make_policy(const std::string& name);
const std::vector<std::string>& policy_names();

struct StoreStats {
  int64_t requests = 0, hits = 0, loads = 0, bytes_loaded = 0;
  std::deque<double> load_ms;  // the most recent load times (bounded)
  double wait_ms = 0;
  int64_t preloaded = 0, prefetches = 0, prefetch_used = 0, resident_units_max = 0;
};

class ExpertStore {
 public:
  using Loader = std::function<Unit(int layer, int expert)>;
  // layer_ids: the layers with routed experts (runtime_py ExpertStore's layer_ids; dense layers have none).
  ExpertStore(const std::vector<int>& layer_ids, int experts, int top_k, int64_t unit_bytes, int64_t capacity_bytes,
              const std::string& policy, Loader load, std::function<int64_t(int, int)> file_bytes,
              const std::string& where);
  ~ExpertStore();

  // The router chose `selected` for this layer (all tokens of this call).
  void begin_layer(int layer, const std::vector<int>& selected);
  // The unit of (layer, expert), loading it (and evicting per policy) when it is not resident.
  Unit get(int layer, int expert);
  // Start loading these units in the background if room can be made without evicting a unit in
  // use or another of this guess.
  void prefetch(int layer, const std::vector<int>& experts);
  bool is_resident(int layer, int expert) const;
  StoreStats stats() const;
  const Policy& policy() const { return policy_; }
  int64_t capacity() const { return capacity_; }

 private:
  struct Slot {
    Unit unit;
    std::shared_future<Unit> future;  // valid while a background load is (or was) in flight
    bool prefetched = false;
    uint64_t seq = 0;  // insertion order: ties in rank go to the oldest slot, as a Python dict iterates
  };
  Unit timed_load(const Key& key);
  bool make_room(int layer, const std::set<Key>& exclude, bool required, std::unique_lock<std::mutex>& lock);
  void evict(Key key);  // by value: callers pass keys that live in slots_
  void note_size();
  void loader_thread();

  std::vector<int> layer_ids_;
  int layers_, experts_, top_k_;
  int64_t unit_bytes_, capacity_;
  int64_t quota_;  // per layer; -1: one shared pool
  Policy policy_;
  Loader load_;
  std::function<int64_t(int, int)> file_bytes_;
  std::map<Key, Slot> slots_;
  uint64_t next_seq_ = 0;
  std::set<Key> pinned_;
  mutable std::mutex mu_;        // slots, pinned, policy, request counters
  mutable std::mutex stats_mu_;  // load counters: the loader thread updates them while get() holds mu_
  StoreStats stats_;
  // The prefetch loader: one thread, one queue.
  std::thread worker_;
  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<std::packaged_task<Unit()>> queue_;
  bool stopping_ = false;
};

}  // namespace cosmoe
