//! cip: a declarative experiment orchestrator for training-data synthesis.
//!
//! The modules follow the data flow: an experiment file (`config`) becomes a DAG of keyed nodes
//! (`plan`), whose results live in a content-addressed store (`cache`). Executors (`exec`) run the
//! nodes (`nodes`), which drive ONNX models (`runtime`, `models`) over datasets (`data`); `report`
//! turns metrics into tables.

pub mod bench;
pub mod cache;
pub mod config;
pub mod data;
pub mod exec;
pub mod models;
pub mod nodes;
pub mod plan;
pub mod report;
pub mod runtime;
