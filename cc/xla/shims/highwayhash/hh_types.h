// Declaration-only stand-in for HighwayHash's hh_types.h (see ../README.md): its types.
#ifndef HIGHWAYHASH_HH_TYPES_H_
#define HIGHWAYHASH_HH_TYPES_H_

#include <stddef.h>
#include <stdint.h>

namespace highwayhash {
typedef uint64_t HHKey[4];
typedef char HHPacket[32];
typedef uint64_t HHResult64;
typedef uint64_t HHResult128[2];
typedef uint64_t HHResult256[4];
}  // namespace highwayhash

#endif  // HIGHWAYHASH_HH_TYPES_H_
