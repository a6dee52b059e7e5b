// Declaration-only stand-in for HighwayHash's arch_specific.h (see ../README.md): the
// names the TensorFlow wheel's XLA headers use, nothing that computes a hash.
#ifndef HIGHWAYHASH_ARCH_SPECIFIC_H_
#define HIGHWAYHASH_ARCH_SPECIFIC_H_

namespace highwayhash {
using TargetBits = unsigned;
}  // namespace highwayhash

// HighwayHash's own value for its portable target; only names a template argument here.
#define HH_TARGET_PREFERRED 1

#endif  // HIGHWAYHASH_ARCH_SPECIFIC_H_
