//! Data stages: sources, filters, splits and samples.
