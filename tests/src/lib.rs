//! Test harness for poolgate end-to-end tests.
