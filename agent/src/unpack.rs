//! TODO(unpack)
