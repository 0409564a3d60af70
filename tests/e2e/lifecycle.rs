//! Lifecycle tests.
