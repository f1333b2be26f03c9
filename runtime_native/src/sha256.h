// SHA-256 (FIPS 180-4) of a file, for the manifest's integrity check.
//
// Written here rather than taken from OpenSSL: an Android NDK or iOS app has no system libcrypto to
// link, and a runner that needs one more cross-compiled library to check 64 hex digits is harder to
// ship. Every file it hashes is checked against the manifest's digest (hashlib's), so a wrong
// digest fails every native test.
#pragma once

#include <string>

namespace cosmoe {
// Lowercase hex digest of the whole file; throws cosmoe::Error when it cannot be read.
std::string sha256_file(const std::string& path);
}  // namespace cosmoe
