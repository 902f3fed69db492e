//! Executors: local (threads, devices).
