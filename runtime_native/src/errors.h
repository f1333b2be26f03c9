// Failures inside the runner are exceptions carrying a status and one line; the C API (cosmoe.cpp)
// turns them into a status code and cosmoe_last_error(). Nothing throws across the C boundary.
#pragma once

#include <stdexcept>
#include <string>

#include "cosmoe.h"

namespace cosmoe {

class Error : public std::runtime_error {
 public:
  Error(cosmoe_status status, const std::string& line) : std::runtime_error(line), status(status) {}
  cosmoe_status status;
};

// Bad input: the line names the file (or argument) and the problem, as runtime_py's errors do.
[[noreturn]] inline void bad_input(const std::string& line) { throw Error(COSMOE_ERR_INPUT, line); }
[[noreturn]] inline void internal(const std::string& line) { throw Error(COSMOE_ERR_INTERNAL, line); }

// Python's repr() of a string as the messages quote it: 'text'.
inline std::string repr(const std::string& s) { return "'" + s + "'"; }

}  // namespace cosmoe
