//! TODO(fetch)
