//! One module per node kind.
