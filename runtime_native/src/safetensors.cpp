#include "safetensors.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "errors.h"

namespace cosmoe {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ULL << 20;  // the safetensors library's MAX_HEADER_SIZE
const char* kFix = "the file is corrupt or was not written by a safetensors writer; re-export it";
const std::map<std::string, int> kBits = {
    {"BOOL", 8}, {"U8", 8}, {"I8", 8}, {"F8_E5M2", 8}, {"F8_E4M3", 8}, {"I16", 16}, {"U16", 16}, {"F16", 16},
    {"BF16", 16}, {"I32", 32}, {"U32", 32}, {"F32", 32}, {"F64", 64}, {"I64", 64}, {"U64", 64}};

float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float f16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  auto bad = [&](const std::string& why) { bad_input(path + ": not a valid safetensors file: " + why + "; " + kFix); };
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) bad_input(path + ": missing; the bundle is incomplete, rebuild it");
  uint64_t size = uint64_t(in.tellg());
  in.seekg(0);
  uint8_t len_bytes[8];
  if (size < 8 || !in.read(reinterpret_cast<char*>(len_bytes), 8)) bad("shorter than its 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  if (n > kMaxHeaderBytes) bad("header of " + std::to_string(n) + " bytes exceeds the 100 MiB limit");
  if (n > size - 8) bad("header length " + std::to_string(n) + " runs past the end of the file");
  std::string text(n, '\0');
  in.read(text.data(), std::streamsize(n));
  data_offset_ = 8 + n;
  uint64_t data_bytes = size - data_offset_;
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception&) {
    bad("the header is not valid UTF-8 JSON");
  }
  if (!header.is_object()) bad("the header is not a JSON object");
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const auto& t = it.value();
    std::string where = "tensor " + repr(it.key());
    if (!t.is_object() || t.size() != 3 || !t.contains("dtype") || !t.contains("shape") || !t.contains("data_offsets"))
      bad(where + " needs exactly dtype, shape and data_offsets");
    if (!t["dtype"].is_string() || !kBits.count(t["dtype"].get<std::string>())) bad(where + " has an unknown dtype");
    Info info;
    info.dtype = t["dtype"].get<std::string>();
    uint64_t elements = 1;
    if (!t["shape"].is_array()) bad(where + " has a shape that is not a list");
    for (const auto& d : t["shape"]) {
      if (!d.is_number_unsigned()) bad(where + " has a negative or non-integer dimension");
      uint64_t v = d.get<uint64_t>();
      if (v && elements > UINT64_MAX / v) bad(where + " has a shape whose size overflows");
      elements *= v;
      info.shape.push_back(int64_t(v));
    }
    const auto& off = t["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      bad(where + " needs data_offsets [begin, end] of two non-negative integers");
    info.begin = off[0].get<uint64_t>();
    info.end = off[1].get<uint64_t>();
    if (info.end < info.begin || info.end > data_bytes) bad(where + " has offsets outside the data section");
    if (elements > UINT64_MAX / 64 || elements * kBits.at(info.dtype) / 8 != info.end - info.begin)
      bad(where + " has " + std::to_string(info.end - info.begin) + " bytes, which is not its dtype x shape");
    spans.emplace_back(info.begin, info.end);
    tensors_[it.key()] = info;
  }
  // The tensors must tile the data section exactly: no gap, no overlap, no byte no tensor owns.
  std::sort(spans.begin(), spans.end());
  uint64_t at = 0;
  for (const auto& [b, e] : spans) {
    if (b != at) bad(b < at ? "two tensors overlap" : "the data section has bytes no tensor owns");
    at = e;
  }
  if (at != data_bytes) bad("the data section has " + std::to_string(data_bytes - at) + " trailing bytes no tensor owns");
}

std::vector<float> SafetensorsFile::read_float(const std::string& name, const std::vector<int64_t>& shape) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) bad_input(path_ + ": has no tensor " + repr(name) + "; rebuild the bundle");
  const Info& info = it->second;
  if (info.shape != shape) bad_input(path_ + ": tensor " + repr(name) + " has the wrong shape; rebuild the bundle");
  if (info.dtype != "F32" && info.dtype != "BF16" && info.dtype != "F16")
    bad_input(path_ + ": tensor " + repr(name) + " is " + info.dtype + ", expected a float dtype; rebuild the bundle");
  std::ifstream in(path_, std::ios::binary);
  in.seekg(std::streamoff(data_offset_ + info.begin));
  std::vector<char> raw(info.end - info.begin);
  if (!in.read(raw.data(), std::streamsize(raw.size()))) bad_input(path_ + ": cannot read tensor " + repr(name));
  size_t n = 1;
  for (int64_t d : shape) n *= size_t(d);
  std::vector<float> out(n);
  if (info.dtype == "F32") {
    std::memcpy(out.data(), raw.data(), n * 4);
  } else {
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, raw.data() + 2 * i, 2);
      out[i] = info.dtype == "BF16" ? bf16_to_float(h) : f16_to_float(h);
    }
  }
  return out;
}

}  // namespace cosmoe
