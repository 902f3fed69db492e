//! The DAG (petgraph), node keys (blake3), and "why does this node rerun".
