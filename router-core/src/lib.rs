//! poolgate routing core.
