//! Result tables (CSV, Markdown).
