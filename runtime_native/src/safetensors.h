// A strict safetensors reader for the few float tensors the runner reads from the backbone file
// (each layer's router and MoE norm, for lru+prefetch's guess), checked as
// runtime_py/safetensors_header.py checks headers: a size cap, two in-bounds offsets per tensor
// that match dtype x shape, and tensors that tile the data section with no gap or overlap.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace cosmoe {

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);  // reads and validates the header
  // The tensor as fp32 (F32, BF16 or F16 in the file), with its shape checked against `shape`.
  std::vector<float> read_float(const std::string& name, const std::vector<int64_t>& shape) const;

 private:
  struct Info {
    std::string dtype;
    std::vector<int64_t> shape;
    uint64_t begin = 0, end = 0;
  };
  std::string path_;
  uint64_t data_offset_ = 0;
  std::map<std::string, Info> tensors_;
};

}  // namespace cosmoe
