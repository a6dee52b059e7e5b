// Declaration-only stand-in for HighwayHash's highwayhash.h (see ../README.md).
#ifndef HIGHWAYHASH_HIGHWAYHASH_H_
#define HIGHWAYHASH_HIGHWAYHASH_H_

#include "highwayhash/arch_specific.h"
#include "highwayhash/hh_types.h"

namespace highwayhash {

// xla/printer.h has one as a member of HighwayHashPrinter, so the type must be complete;
// the printer's constructor and methods are in TensorFlow's library and tf_smallmm never
// makes one. Storage as large and aligned as the largest real layout (the AVX2 target's:
// 128 bytes of state, a 32-byte packet and a count, 32-byte aligned).
template <TargetBits Target>
class alignas(32) HighwayHashCatT {
  unsigned char opaque_[192];
};

}  // namespace highwayhash

#endif  // HIGHWAYHASH_HIGHWAYHASH_H_
