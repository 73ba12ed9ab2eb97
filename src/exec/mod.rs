//! The executor: runs a plan's stages in dependency order against the cache.
