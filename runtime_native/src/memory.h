// Process memory as the kernel counts it, as runtime_py/memory.py reads it: Linux /proc, with
// getrusage as the fallback elsewhere (Android is Linux; on iOS/macOS the current RSS is read from
// mach and the peak cannot be reset, so it covers the whole process).
#pragma once

#include <cstdint>

namespace cosmoe {
int64_t rss_bytes();       // resident set size now
int64_t peak_rss_bytes();  // peak since the process started or since reset_peak_rss()
bool reset_peak_rss();     // Linux >= 4.0: writing 5 to clear_refs resets VmHWM
}  // namespace cosmoe
