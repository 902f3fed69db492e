//! Experiment files: raw serde structs -> resolved, validated spec; sweeps.
