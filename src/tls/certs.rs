//! Loading and checking certificate chains and keys (being written).
