#include "store.h"

#include <algorithm>
#include <chrono>

#include "errors.h"

namespace cosmoe {
namespace {
constexpr size_t kLoadTimesKept = 100000;  // runtime_py.store.LOAD_TIMES_KEPT

double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}
bool ready(const std::shared_future<Unit>& f) {
  return f.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
}
}  // namespace

std::pair<uint64_t, uint64_t> Policy::rank(const Key& k) const {
  auto get = [](const std::map<Key, uint64_t>& m, const Key& key) {
    auto it = m.find(key);
    return it == m.end() ? uint64_t(0) : it->second;
  };
  // LFU: (uses, last use); LRU: (last use,).
  return by_uses ? std::make_pair(get(uses, k), get(last_use, k)) : std::make_pair(get(last_use, k), uint64_t(0));
}

const std::vector<std::string>& policy_names() {
  static const std::vector<std::string> names = {"resident", "paper", "lru", "lfu", "lru+prefetch"};
  return names;
}

Policy make_policy(const std::string& name) {
  Policy p;
  if (name == "resident") p.preload_all = true;
  else if (name == "paper") p.keep_only_selected = true;
  else if (name == "lfu") p.by_uses = true;
  else if (name == "lru+prefetch") p.prefetch = true;
  else if (name != "lru") {
    std::string all;
    for (const auto& n : policy_names()) all += (all.empty() ? "'" : ", '") + n + "'";
    bad_input("unknown policy " + repr(name) + "; choose from [" + all + "]");
  }
  return p;
}

ExpertStore::ExpertStore(const std::vector<int>& layer_ids, int experts, int top_k, int64_t unit_bytes,
                         int64_t capacity_bytes, const std::string& policy, Loader load,
                         std::function<int64_t(int, int)> file_bytes, const std::string& where)
    : layer_ids_(layer_ids), layers_(int(layer_ids.size())), experts_(experts), top_k_(top_k), unit_bytes_(unit_bytes),
      policy_(make_policy(policy)), load_(std::move(load)), file_bytes_(std::move(file_bytes)) {
  const int layers = layers_;
  capacity_ = std::min<int64_t>(std::max<int64_t>(capacity_bytes, 0) / unit_bytes, int64_t(layers) * experts);
  auto n = [](int64_t v) { return std::to_string(v); };
  if (capacity_ < top_k)
    bad_input(where + ": the budget leaves room for " + n(capacity_) + " expert(s) of " + n(unit_bytes) +
              " bytes; one layer needs " + n(top_k));
  if (policy_.keep_only_selected && capacity_ < int64_t(top_k) * layers)
    bad_input(where + ": policy 'paper' keeps " + n(top_k) + " experts in each of " + n(layers) + " layers (" +
              n(int64_t(top_k) * layers) + " units); the budget holds " + n(capacity_));
  if (policy_.preload_all && capacity_ < int64_t(layers) * experts)
    bad_input(where + ": policy 'resident' needs room for all " + n(int64_t(layers) * experts) +
              " experts; the budget holds " + n(capacity_));
  quota_ = capacity_ >= int64_t(top_k) * layers ? capacity_ / layers : -1;
  if (policy_.prefetch) worker_ = std::thread([this] { loader_thread(); });
  if (policy_.preload_all) {
    for (int l : layer_ids_)
      for (int e = 0; e < experts; ++e) {
        slots_[{l, e}] = Slot{timed_load({l, e}), {}, false, next_seq_++};
        ++stats_.preloaded;
      }
    note_size();
  }
}

ExpertStore::~ExpertStore() {
  if (worker_.joinable()) {
    {
      std::lock_guard<std::mutex> g(queue_mu_);
      stopping_ = true;
    }
    queue_cv_.notify_all();
    worker_.join();
  }
  std::lock_guard<std::mutex> g(mu_);
  while (!slots_.empty()) evict(slots_.begin()->first);
}

void ExpertStore::loader_thread() {
  for (;;) {
    std::packaged_task<Unit()> task;
    {
      std::unique_lock<std::mutex> lock(queue_mu_);
      queue_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and every queued load done
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();  // exceptions land in the future
  }
}

void ExpertStore::note_size() {
  int64_t n = int64_t(slots_.size());
  if (n > capacity_) internal("expert store holds " + std::to_string(n) + " units, capacity " + std::to_string(capacity_));
  std::lock_guard<std::mutex> g(stats_mu_);
  stats_.resident_units_max = std::max(stats_.resident_units_max, n);
}

bool ExpertStore::is_resident(int layer, int expert) const {
  std::lock_guard<std::mutex> g(mu_);
  return slots_.count({layer, expert}) > 0;
}

StoreStats ExpertStore::stats() const {
  std::lock_guard<std::mutex> g(mu_);
  std::lock_guard<std::mutex> h(stats_mu_);
  return stats_;
}

void ExpertStore::begin_layer(int layer, const std::vector<int>& selected) {
  if (!policy_.keep_only_selected) return;
  std::set<int> keep(selected.begin(), selected.end());
  std::lock_guard<std::mutex> g(mu_);
  std::vector<Key> drop;
  for (const auto& [k, slot] : slots_)
    if (k.first == layer && !keep.count(k.second)) drop.push_back(k);
  for (const Key& k : drop) evict(k);
}

Unit ExpertStore::get(int layer, int expert) {
  Key key{layer, expert};
  std::shared_future<Unit> future;
  bool have_unit;
  {
    std::unique_lock<std::mutex> lock(mu_);
    ++stats_.requests;
    auto it = slots_.find(key);
    if (it != slots_.end()) {
      ++stats_.hits;
      if (it->second.prefetched) {
        ++stats_.prefetch_used;
        it->second.prefetched = false;
      }
    } else {
      make_room(layer, {}, true, lock);
      slots_[key] = Slot{nullptr, {}, false, next_seq_++};
      note_size();
    }
    policy_.touch(key);
    pinned_.insert(key);
    future = slots_[key].future;
    have_unit = slots_[key].unit != nullptr;
  }
  Unit unit;
  try {
    if (future.valid()) {
      auto t = std::chrono::steady_clock::now();
      unit = future.get();
      std::lock_guard<std::mutex> g(mu_);
      stats_.wait_ms += ms_since(t);
      slots_[key].unit = unit;
      slots_[key].future = {};
    } else if (!have_unit) {
      unit = timed_load(key);
      std::lock_guard<std::mutex> g(mu_);
      slots_[key].unit = unit;
    } else {
      std::lock_guard<std::mutex> g(mu_);
      unit = slots_[key].unit;
    }
  } catch (...) {
    std::lock_guard<std::mutex> g(mu_);
    slots_.erase(key);
    pinned_.erase(key);
    throw;
  }
  std::lock_guard<std::mutex> g(mu_);
  pinned_.erase(key);
  return unit;
}

void ExpertStore::prefetch(int layer, const std::vector<int>& experts) {
  if (!policy_.prefetch || std::find(layer_ids_.begin(), layer_ids_.end(), layer) == layer_ids_.end()) return;
  std::set<Key> guess;
  for (int e : experts) guess.insert({layer, e});
  std::unique_lock<std::mutex> lock(mu_);
  for (int e : experts) {
    Key key{layer, e};
    if (slots_.count(key)) continue;
    if (!make_room(layer, guess, false, lock)) return;
    std::packaged_task<Unit()> task([this, key] { return timed_load(key); });
    Slot& slot = slots_[key];
    slot.prefetched = true;
    slot.seq = next_seq_++;
    slot.future = task.get_future().share();
    {
      std::lock_guard<std::mutex> g(queue_mu_);
      queue_.push_back(std::move(task));
    }
    queue_cv_.notify_one();
    ++stats_.prefetches;
    note_size();
  }
}

Unit ExpertStore::timed_load(const Key& key) {
  auto t = std::chrono::steady_clock::now();
  Unit unit = load_(key.first, key.second);
  double ms = ms_since(t);
  std::lock_guard<std::mutex> g(stats_mu_);  // not mu_: get() may hold that while it waits for this load
  ++stats_.loads;
  stats_.bytes_loaded += file_bytes_(key.first, key.second);
  stats_.load_ms.push_back(ms);
  if (stats_.load_ms.size() > kLoadTimesKept) stats_.load_ms.pop_front();
  return unit;
}

bool ExpertStore::make_room(int layer, const std::set<Key>& exclude, bool required,
                            std::unique_lock<std::mutex>& lock) {
  for (;;) {
    std::vector<Key> pool;
    for (const auto& [k, slot] : slots_)
      if (quota_ < 0 || k.first == layer) pool.push_back(k);
    bool full = quota_ >= 0 ? int64_t(pool.size()) >= quota_ : int64_t(pool.size()) >= capacity_;
    if (!full) return true;
    std::vector<Key> candidates, in_flight;
    for (const Key& k : pool) {
      if (pinned_.count(k) || exclude.count(k)) continue;
      const Slot& s = slots_.at(k);
      (s.future.valid() && !ready(s.future) ? in_flight : candidates).push_back(k);
    }
    if (candidates.empty() && !in_flight.empty() && required) {
      // Only wrong guesses still loading: wait for one (it then becomes evictable). The loader
      // thread never takes mu_, so waiting with it held cannot deadlock (as in runtime_py).
      slots_.at(in_flight.front()).future.wait();
      continue;
    }
    if (candidates.empty()) {
      if (required)
        bad_input("expert store: no unit of layer " + std::to_string(layer) + " can be evicted (capacity " +
                  std::to_string(capacity_) + " units, all in use)");
      return false;
    }
    (void)lock;
    auto order = [&](const Key& k) { return std::make_pair(policy_.rank(k), slots_.at(k).seq); };
    Key victim = *std::min_element(candidates.begin(), candidates.end(),
                                   [&](const Key& a, const Key& b) { return order(a) < order(b); });
    evict(victim);
  }
}

void ExpertStore::evict(Key key) {
  auto it = slots_.find(key);
  Slot slot = std::move(it->second);
  slots_.erase(it);
  policy_.forget(key);
  if (slot.future.valid()) slot.future.wait();  // a prefetch in flight finishes before its unit is dropped
  // The last reference goes with `slot`: the program and its packed weights are freed.
}

}  // namespace cosmoe
