//! poolgate configuration.
