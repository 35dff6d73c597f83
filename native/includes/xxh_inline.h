/* Compile xxHash into the including extension (static inline functions only). */
#ifndef LLM_SIDECAR_XXH_INLINE_H
#define LLM_SIDECAR_XXH_INLINE_H
#define XXH_INLINE_ALL
#include <xxhash.h>
#endif
