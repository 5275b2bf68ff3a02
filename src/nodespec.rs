//! Node selection grammar (placeholder; being written).
