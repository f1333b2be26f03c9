// SHA-256 (FIPS 180-4) of a file, for the manifest's integrity check.
//
// libcrypto's where the build finds OpenSSL (CMake: COSMOE_HAVE_OPENSSL), else a portable one written
// here: an Android NDK or iOS app has no system libcrypto to link, and a runner that needs one more
// cross-compiled library to check 64 hex digits is harder to ship. tests/test_native_malformed.py
// builds the portable one (the sanitizer build) and the release build takes libcrypto; every file
// either hashes is checked against the manifest's digest (hashlib's), so a wrong digest fails tests.
#pragma once

#include <string>

namespace cosmoe {
// Lowercase hex digest of the whole file; throws cosmoe::Error when it cannot be read.
std::string sha256_file(const std::string& path);
}  // namespace cosmoe
