//! Content-addressed store: entries, journals, locks, gc.
