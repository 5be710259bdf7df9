//! poolgate benchmark support.
