// Declaration-only stand-in for FarmHash's farmhash.h (see README.md): tsl/platform/
// fingerprint.h calls these functions, which TensorFlow's framework library defines.
#ifndef FARM_HASH_H_
#define FARM_HASH_H_

#include <stddef.h>
#include <stdint.h>

#include <utility>

namespace util {

typedef std::pair<uint64_t, uint64_t> uint128_t;
inline uint64_t Uint128Low64(const uint128_t x) { return x.first; }
inline uint64_t Uint128High64(const uint128_t x) { return x.second; }

uint32_t Fingerprint32(const char* s, size_t len);
uint64_t Fingerprint64(const char* s, size_t len);
uint128_t Fingerprint128(const char* s, size_t len);

}  // namespace util

#endif  // FARM_HASH_H_
