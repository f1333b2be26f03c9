#include "memory.h"

#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__APPLE__)
#include <mach/mach.h>
#endif

namespace cosmoe {

int64_t rss_bytes() {
#if defined(__linux__)
  long pages = 0, resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return int64_t(resident) * sysconf(_SC_PAGESIZE);
#elif defined(__APPLE__)
  mach_task_basic_info info{};
  mach_msg_type_number_t count = MACH_TASK_BASIC_INFO_COUNT;
  if (task_info(mach_task_self(), MACH_TASK_BASIC_INFO, reinterpret_cast<task_info_t>(&info), &count) != KERN_SUCCESS)
    return 0;
  return int64_t(info.resident_size);
#else
  return 0;
#endif
}

int64_t peak_rss_bytes() {
#if defined(__linux__)
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    long kb = -1;
    while (std::fgets(line, sizeof line, f))
      if (std::strncmp(line, "VmHWM:", 6) == 0) kb = std::strtol(line + 6, nullptr, 10);
    std::fclose(f);
    if (kb >= 0) return int64_t(kb) * 1024;
  }
#endif
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
#if defined(__APPLE__)
  return int64_t(u.ru_maxrss);  // bytes on Apple platforms
#else
  return int64_t(u.ru_maxrss) * 1024;  // KiB elsewhere
#endif
}

bool reset_peak_rss() {
#if defined(__linux__)
  if (FILE* f = std::fopen("/proc/self/clear_refs", "w")) {
    bool ok = std::fputs("5", f) >= 0;
    return (std::fclose(f) == 0) && ok;
  }
#endif
  return false;
}

}  // namespace cosmoe
