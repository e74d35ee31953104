//! placeholder: the swapper library is being written in parallel.

/// Errors of the swapper library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("placeholder")]
    Placeholder,
}
